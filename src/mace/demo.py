"""`mace demo`: what container isolation adds to a ping, measured and corrected, end to end.

A throwaway testbed (host namespace with bridge and NAT, a container, a peer standing in
for the internet, optionally K co-located containers flooding it) carries two pings to the
same target at the same time: one from the container, one from the host namespace (the
ground truth).  mace traces the container; each of its probes is matched with its egress
and ingress reports, and

    corrected RTT = container RTT - egress expense - ingress expense

should equal the host's native RTT.  The same measurement drives benchmarks/accuracy.py.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mace.capture import others
from mace.errors import MaceError, ResourceError
from mace.output.clock import wall_offset_ns
from mace.output.report import Report
from mace.targets.netns import discover, resolve
from mace.testing.testbed import Testbed, interrupt
from mace.tracer import Tracer

PING_LINE = re.compile(r"^\[(\d+\.\d+)\] .*icmp_seq=(\d+) .*time=([\d.]+) ms")


@dataclass
class Probe:
    seq: int
    received: float            # wall clock, s (ping -D)
    rtt_ns: int
    egress_ns: int | None = None
    ingress_ns: int | None = None
    # of the matched reports: ns after t0 at each hop (None where not traced), end event's CPU
    egress_hops: tuple | None = None
    ingress_hops: tuple | None = None
    egress_cpu: int | None = None
    ingress_cpu: int | None = None
    wire_ns: int | None = None          # the same probe's RTT on the uplink (a capture)
    # CLOCK_MONOTONIC ns where the matched egress report ended and the ingress one began;
    # the capture's stamps of the request and the reply (CLOCK_REALTIME ns)
    egress_end: int | None = None
    ingress_start: int | None = None
    wire_out: int | None = None
    wire_in: int | None = None

    @property
    def corrected_ns(self) -> int | None:
        if self.egress_ns is None or self.ingress_ns is None:
            return None
        return self.rtt_ns - self.egress_ns - self.ingress_ns


@dataclass
class Run:
    """One demo measurement: the container's probes, matched; the host's RTTs."""

    probes: list[Probe]
    native_ns: list[int]
    counters: dict = field(default_factory=dict)
    colocated: int = 0
    other_tracers: list = field(default_factory=list)   # on mace's tracepoints (capture.others)
    segment: str = "device"

    @property
    def matched(self) -> list[Probe]:
        return [p for p in self.probes if p.corrected_ns is not None]


def parse_ping(text: str) -> list[tuple[int, float, int]]:
    """(icmp_seq, receive time in s, RTT in ns) of each reply of `ping -D`."""
    out = []
    for line in text.splitlines():
        m = PING_LINE.match(line)
        if m and "(DUP!)" not in line:
            out.append((int(m.group(2)), float(m.group(1)), round(float(m.group(3)) * 1e6)))
    return out


def match(probes: list[Probe], reports: list[Report], wall_offset_ns: int) -> None:
    """Give each probe the egress report of its request and the ingress report of its reply.

    A reply reaches the container's device (end of the ingress report) shortly before
    ping stamps it; the request leaves (egress t0) shortly after the send time that
    receive time minus RTT gives.  Matching by time, not by order, keeps one missed
    report from shifting all the others."""
    slack = 2_000_000      # ping stamps the reply a little after it reached the device
    eg = sorted(((r.t0 + wall_offset_ns, r) for r in reports if r.dir == 0), key=lambda x: x[0])
    ing = sorted(((r.t0 + r.latency + wall_offset_ns, r) for r in reports if r.dir == 1),
                 key=lambda x: x[0])
    used_e, used_i = set(), set()
    for p in probes:
        recv = int(p.received * 1e9)
        sent = recv - p.rtt_ns
        best = None
        for i, (t, _) in enumerate(ing):
            if i in used_i or not sent < t <= recv + slack:
                continue
            if best is None or abs(recv - t) < abs(recv - ing[best][0]):
                best = i
        if best is not None:
            used_i.add(best)
            r = ing[best][1]
            p.ingress_ns, p.ingress_hops, p.ingress_cpu = r.latency, r.hops, r.cpu
            p.ingress_start = r.t0
        best = None
        for i, (t, _) in enumerate(eg):
            if i in used_e or not sent - slack <= t < recv:
                continue
            if best is None or abs(t - sent) < abs(eg[best][0] - sent):
                best = i
        if best is not None:
            used_e.add(best)
            r = eg[best][1]
            p.egress_ns, p.egress_hops, p.egress_cpu = r.latency, r.hops, r.cpu
            p.egress_end = r.t0 + r.latency


def need_ping() -> None:
    if shutil.which("ping") is None:
        raise ResourceError("ping is not installed", hint="apt-get install iputils-ping")


def measure(tb: Testbed, *, count: int, interval: float, colocated: int = 0,
            trace: bool = True, tracer_kw: dict | None = None, plan_kw: dict | None = None,
            warn: Callable[[str], None] | None = None, segment: str = "device",
            wire: str | None = None) -> Run:
    """Ping the peer from container 0 and from the host namespace at the same time, with
    containers 1..colocated flooding the peer, tracing container 0 unless `trace` is off.
    `plan_kw` goes to the plan (e.g. {"hops": True}), `tracer_kw` to the Tracer.
    `warn` hears of other tracers of mace's tracepoints, a line each, before the pings.

    The socket segment (the testbed's containers have cgroups) ends where the receive call
    returns, so the pings time from user space to user space (`ping -U`, not the kernel's
    receive stamp).  With `wire` (a file), tcpdump captures the uplink meanwhile and each
    probe gets its RTT on the wire (Probe.wire_ns)."""
    c = tb.containers[0]
    floods = []
    deadline = int(count * interval + 10)
    socket_segment = segment == "socket"
    ping = ["ping", "-n", "-D", *(["-U"] if socket_segment else []), "-c", str(count),
            "-i", str(interval), tb.peer_ip]
    tracer = None
    if trace:
        topo = discover([resolve(tb.ns_path(c.ns))])
        kw = dict(plan_kw or {}, segment=segment)
        if socket_segment:
            kw.update(end_at_queue=False, cgroups=[c.cgroup])
        tracer = Tracer(topo.plan(**kw), **(tracer_kw or {})).open()
        for line in others.warn_lines(tracer.other_tracers) if warn is not None else ():
            warn(line)
    reports: list[Report] = []
    capture = None
    try:
        if wire is not None:
            capture = start_capture(tb, tb.uplink, wire)
        for other in tb.containers[1:1 + colocated]:
            floods.append(tb.popen(other.ns, ["ping", "-n", "-q", "-f", "-w", str(deadline),
                                              tb.peer_ip], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL))
        if tracer is not None:
            tracer.start()
        offset = wall_offset_ns()
        # each its own ICMP identifier, to tell them apart on the uplink
        box = tb.popen(c.ns, [*ping[:1], "-e", str(BOX_ID), *ping[1:]], stdout=subprocess.PIPE, text=True)
        # half an interval apart: interleaved, so both see the same conditions, but never
        # in flight at the same moment, where one would queue behind the other
        time.sleep(interval / 2)
        host = tb.popen(tb.host_ns, [*ping[:1], "-e", str(HOST_ID), *ping[1:]], stdout=subprocess.PIPE,
                        text=True)
        limit = time.monotonic() + deadline + 5

        def done() -> bool:
            return (box.poll() is not None and host.poll() is not None) or time.monotonic() >= limit

        if tracer is not None:
            tracer.follow(done, reports.extend, timeout_ms=50)
        while not done():
            time.sleep(0.05)
        for p in (box, host):
            if p.poll() is None:
                p.kill()
        if tracer is not None:
            time.sleep(0.01)
            reports += tracer.stop()
        box_out, host_out = box.communicate()[0], host.communicate()[0]
        counters = tracer.stats() if tracer is not None else {}
    finally:
        for f in floods:
            f.kill()
        if tracer is not None:
            tracer.close()
        if capture is not None:
            stop_capture(capture)
    probes = [Probe(seq, recv, rtt) for seq, recv, rtt in parse_ping(box_out)]
    if not probes:
        raise MaceError("the container's ping got no replies", hint="is the testbed working? (nft, ip_forward)")
    match(probes, reports, offset)
    if wire is not None:
        wire_rtts(probes, wire)
    return Run(probes, [rtt for _, _, rtt in parse_ping(host_out)], counters, colocated,
               tracer.other_tracers if tracer is not None else [], segment)


BOX_ID, HOST_ID = 0x4D41, 0x4D42       # the pings' ICMP identifiers ("MA", "MB")
CAPTURE_BLOCK_S = 1.2                  # > tcpdump's block timeout (pcap_set_timeout 1000 ms)


def start_capture(tb: Testbed, dev: str, path: str) -> subprocess.Popen:
    """tcpdump on `dev` of the testbed's host: the probes' ICMP echoes (the floods' are left
    out in the kernel, or tcpdump drops some under load), nanosecond stamps, into `path`;
    ready when it says it listens.  Not in immediate mode: that wakes tcpdump for
    every packet from inside the uplink's transmit, a cost (~5 µs here) that lands inside
    mace's egress and in the wire RTT; buffered, the kernel hands packets over a block at a
    time, retired by a timer (libpcap's timeout, tcpdump's 1 s), so stop_capture waits one
    out before the SIGINT that would drop an unretired block."""
    if shutil.which("tcpdump") is None:
        raise ResourceError("tcpdump is not installed (the wire RTT comes from a capture)",
                            hint="apt-get install tcpdump")
    echoes = (f"(icmp[icmptype] == icmp-echo or icmp[icmptype] == icmp-echoreply) "
              f"and (icmp[4:2] == {BOX_ID} or icmp[4:2] == {HOST_ID})")
    p = tb.popen(tb.host_ns, ["tcpdump", "-i", dev, "-n", "-U",
                              "--time-stamp-precision=nano", "-w", path, echoes],
                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in p.stderr:
        if "listening on" in line:
            return p
    p.wait(timeout=5)
    raise ResourceError(f"tcpdump did not start on {dev}", hint="see `tcpdump -i DEV` by hand")


def stop_capture(p: subprocess.Popen) -> None:
    time.sleep(CAPTURE_BLOCK_S)
    interrupt(p)            # tcpdump writes out what it holds on SIGINT


def wire_rtts(probes: list[Probe], path: str) -> None:
    """Each probe's RTT on the uplink: its request's capture stamp to its reply's (the
    capture's taps sit next to the uplink's transmit and receive; the container's probes
    are told from the host's by their ICMP identifier, which the NAT keeps here)."""
    from mace.testing import pcap
    found = [e for e in pcap.echoes(path) if e.id == BOX_ID]
    req, rep = pcap.by_seq(found, pcap.ECHO_REQUEST), pcap.by_seq(found, pcap.ECHO_REPLY)
    for p in probes:
        if p.seq in req and p.seq in rep and rep[p.seq].ts > req[p.seq].ts:
            p.wire_out, p.wire_in = req[p.seq].ts, rep[p.seq].ts
            p.wire_ns = p.wire_in - p.wire_out


def quantiles(values: list[float]) -> dict:
    v = sorted(values)
    if not v:
        return {"median": None, "p99": None}
    return {"median": statistics.median(v), "p99": v[min(len(v) - 1, round(0.99 * (len(v) - 1)))]}


def summarize(run: Run) -> dict:
    """Median and p99 of each quantity; bias is compared quantile by quantile, with the
    host's native RTT (the device segment) or the RTT on the wire (the socket segment)."""
    m = run.matched
    socket_segment = run.segment == "socket"
    rows = {
        "container RTT (raw)": quantiles([p.rtt_ns for p in run.probes]),
        "mace egress expense": quantiles([p.egress_ns for p in m]),
        "mace ingress expense": quantiles([p.ingress_ns for p in m]),
        "corrected RTT": quantiles([p.corrected_ns for p in m]),
        "native RTT (host)": quantiles(run.native_ns),
    }
    ref = rows["native RTT (host)"]
    if socket_segment:
        rows["wire RTT (uplink capture)"] = quantiles([p.wire_ns for p in m if p.wire_ns is not None])
        ref = rows["wire RTT (uplink capture)"]
    for name, q in (("raw bias", rows["container RTT (raw)"]), ("remaining bias", rows["corrected RTT"])):
        rows[name] = {k: (q[k] - ref[k]) if q[k] is not None and ref[k] is not None else None
                      for k in ("median", "p99")}
    return {"rows": rows, "probes": len(run.probes), "matched": len(m), "colocated": run.colocated,
            "segment": run.segment}


def render(summary: dict, console) -> None:
    from rich.table import Table

    socket_segment = summary.get("segment") == "socket"
    t = Table(title=f"mace demo ({summary.get('segment', 'device')} segment): {summary['probes']} "
                    f"pings from a container, {summary['colocated']} co-located flooding container(s)",
              title_justify="left")
    t.add_column("")
    t.add_column("median µs", justify="right")
    t.add_column("p99 µs", justify="right")
    for name, q in summary["rows"].items():
        fmt = (lambda v: "-" if v is None else f"{v / 1000:+.1f}") if "bias" in name else \
              (lambda v: "-" if v is None else f"{v / 1000:.1f}")
        style = "bold" if name in ("corrected RTT", "remaining bias") else None
        t.add_row(name, fmt(q["median"]), fmt(q["p99"]), style=style)
    console.print(t)
    versus = "the RTT on the wire (the same probes on the uplink)" if socket_segment else "native"
    console.print(f"{summary['matched']} of {summary['probes']} probes matched with an egress and "
                  "an ingress report. corrected = container RTT - egress - ingress, per probe; "
                  f"bias = corrected (or raw) minus {versus}, quantile by quantile."
                  + (" The pings time from user space to user space (ping -U): the socket "
                     "segment ends when the receive call returns." if socket_segment else ""))


def main(count: int, interval: float, colocated: int, console=None, segment: str = "device") -> int:
    import tempfile

    from rich.console import Console

    console = console or Console()
    need_ping()
    socket_segment = segment == "socket"
    with Testbed(containers_n=1 + colocated, masquerade=True, cgroups=socket_segment) as tb, \
            tempfile.TemporaryDirectory(prefix="mace-demo-") as tmp:
        # one ping first: ARP and the first packet's connection tracking are not the topic
        tb.run(tb.containers[0].ns, ["ping", "-n", "-c", "2", "-i", "0.2", tb.peer_ip], timeout=10)
        tb.run(tb.host_ns, ["ping", "-n", "-c", "2", "-i", "0.2", tb.peer_ip], timeout=10)
        run = measure(tb, count=count, interval=interval, colocated=colocated, segment=segment,
                      wire=os.path.join(tmp, "uplink.pcap") if socket_segment else None,
                      warn=lambda line: print(line, file=sys.stderr, flush=True))
    render(summarize(run), console)
    return 0


if __name__ == "__main__":
    sys.exit(main(100, 0.02, 0))

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
from mace.testing.testbed import Testbed
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


def need_ping() -> None:
    if shutil.which("ping") is None:
        raise ResourceError("ping is not installed", hint="apt-get install iputils-ping")


def measure(tb: Testbed, *, count: int, interval: float, colocated: int = 0,
            trace: bool = True, tracer_kw: dict | None = None, plan_kw: dict | None = None,
            warn: Callable[[str], None] | None = None) -> Run:
    """Ping the peer from container 0 and from the host namespace at the same time, with
    containers 1..colocated flooding the peer, tracing container 0 unless `trace` is off.
    `plan_kw` goes to the plan (e.g. {"hops": True}), `tracer_kw` to the Tracer.
    `warn` hears of other tracers of mace's tracepoints, a line each, before the pings."""
    c = tb.containers[0]
    floods = []
    deadline = int(count * interval + 10)
    ping = ["ping", "-n", "-D", "-c", str(count), "-i", str(interval), tb.peer_ip]
    tracer = None
    if trace:
        topo = discover([resolve(tb.ns_path(c.ns))])
        tracer = Tracer(topo.plan(**(plan_kw or {})), **(tracer_kw or {})).open()
        for line in others.warn_lines(tracer.other_tracers) if warn is not None else ():
            warn(line)
    reports: list[Report] = []
    try:
        for other in tb.containers[1:1 + colocated]:
            floods.append(tb.popen(other.ns, ["ping", "-n", "-q", "-f", "-w", str(deadline),
                                              tb.peer_ip], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL))
        if tracer is not None:
            tracer.start()
        offset = wall_offset_ns()
        box = tb.popen(c.ns, ping, stdout=subprocess.PIPE, text=True)
        # half an interval apart: interleaved, so both see the same conditions, but never
        # in flight at the same moment, where one would queue behind the other
        time.sleep(interval / 2)
        host = tb.popen(tb.host_ns, ping, stdout=subprocess.PIPE, text=True)
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
    probes = [Probe(seq, recv, rtt) for seq, recv, rtt in parse_ping(box_out)]
    if not probes:
        raise MaceError("the container's ping got no replies", hint="is the testbed working? (nft, ip_forward)")
    match(probes, reports, offset)
    return Run(probes, [rtt for _, _, rtt in parse_ping(host_out)], counters, colocated,
               tracer.other_tracers if tracer is not None else [])


def quantiles(values: list[float]) -> dict:
    v = sorted(values)
    if not v:
        return {"median": None, "p99": None}
    return {"median": statistics.median(v), "p99": v[min(len(v) - 1, round(0.99 * (len(v) - 1)))]}


def summarize(run: Run) -> dict:
    """Median and p99 of each quantity; bias is compared quantile by quantile."""
    m = run.matched
    rows = {
        "container RTT (raw)": quantiles([p.rtt_ns for p in run.probes]),
        "mace egress expense": quantiles([p.egress_ns for p in m]),
        "mace ingress expense": quantiles([p.ingress_ns for p in m]),
        "corrected RTT": quantiles([p.corrected_ns for p in m]),
        "native RTT (host)": quantiles(run.native_ns),
    }
    native = rows["native RTT (host)"]
    for name, q in (("raw bias", rows["container RTT (raw)"]), ("remaining bias", rows["corrected RTT"])):
        rows[name] = {k: (q[k] - native[k]) if q[k] is not None and native[k] is not None else None
                      for k in ("median", "p99")}
    return {"rows": rows, "probes": len(run.probes), "matched": len(m), "colocated": run.colocated}


def render(summary: dict, console) -> None:
    from rich.table import Table

    t = Table(title=f"mace demo: {summary['probes']} pings from a container, "
                    f"{summary['colocated']} co-located flooding container(s)",
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
    console.print(f"{summary['matched']} of {summary['probes']} probes matched with an egress and "
                  "an ingress report. corrected = container RTT - egress - ingress, per probe; "
                  "bias = corrected (or raw) minus native, quantile by quantile.")


def main(count: int, interval: float, colocated: int, console=None) -> int:
    from rich.console import Console

    console = console or Console()
    need_ping()
    with Testbed(containers_n=1 + colocated, masquerade=True) as tb:
        # one ping first: ARP and the first packet's connection tracking are not the topic
        tb.run(tb.containers[0].ns, ["ping", "-n", "-c", "2", "-i", "0.2", tb.peer_ip], timeout=10)
        tb.run(tb.host_ns, ["ping", "-n", "-c", "2", "-i", "0.2", tb.peer_ip], timeout=10)
        run = measure(tb, count=count, interval=interval, colocated=colocated,
                      warn=lambda line: print(line, file=sys.stderr, flush=True))
    render(summarize(run), console)
    return 0


if __name__ == "__main__":
    sys.exit(main(100, 0.02, 0))

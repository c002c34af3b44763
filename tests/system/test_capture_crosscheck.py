"""A packet capture as a second instrument: tcpdump on the container's eth0 and on the uplink
while mace traces the same pings, every probe matched in both.

What is sound to assert, from the kernel's structure (measurements: issue 12's report):

- transmit (egress at both points): `xmit_one` calls the tap, `dev_queue_xmit_nit`, which
  clones the skb and stamps the clone (`net_timestamp_set`, or `tpacket_rcv`'s own
  `ktime_get_real_ts64` when no socket wants timestamps), copies it into tcpdump's ring and
  only then returns to `trace_net_dev_start_xmit`.  So each capture stamp lies before mace's
  stamp at the same point, by that tap's own cost.  That cost is not constant: the first tap
  on the path runs cold (~8 µs median, up to 16 µs with --immediate-mode), the uplink's a few
  µs later runs warm (~3 µs); it follows the machine's state, so it cannot be subtracted as a
  constant and only the order is asserted.  The capture's egress interval holds the eth0
  tap's cost, mace's the uplink tap's: that is the 4-8 µs by which they differ.
- receive (ingress): the tap runs after `trace_netif_receive_skb` at both points, and the
  stamp both instruments' intervals are compared on is taken alike at both points (at
  `netif_rx` by `net_timestamp_check` when a socket wants timestamps, as ping's SO_TIMESTAMP
  does, else in the tap), so the two intervals agree: medians within ±0.5 µs were measured;
  the bound is 3 µs.
"""

from __future__ import annotations

import shutil
import signal
import statistics
import subprocess
import time

import pytest
from conftest import IN_CI

from mace.plan import ContainerPath, Plan
from mace.testing import pcap
from mace.tracer import Tracer

N = 100                     # probes, 5 ms apart: half a second of light traffic
INGRESS_MEDIAN_NS = 3000    # measured |median| <= 450 ns over 9 runs; see the module docstring
OFFSET_DRIFT_NS = 5000      # realtime - monotonic moves only with a clock step
ECHO = "icmp[icmptype] == icmp-echo or icmp[icmptype] == icmp-echoreply"


@pytest.fixture
def tcpdump_present():
    if shutil.which("tcpdump") is None:
        reason = "the capture cross-check needs `tcpdump` (Debian package tcpdump)"
        if IN_CI:
            pytest.fail(f"CI=true but {reason}", pytrace=False)
        pytest.skip(reason)


def start_capture(tb, ns: str, dev: str, path) -> subprocess.Popen:
    # -c: tcpdump exits by itself once it has read every probe and reply, whatever its
    # ring's block timeout (a SIGINT would drop packets still in an unretired block)
    p = tb.popen(ns, ["tcpdump", "-i", dev, "-n", "--time-stamp-precision=nano", "-c", str(2 * N),
                      "-w", str(path), ECHO], stderr=subprocess.PIPE, text=True)
    line = p.stderr.readline()
    assert "listening on" in line, line + p.stderr.read()
    return p


def stop_capture(p: subprocess.Popen) -> None:
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGINT)        # a probe missing: keep what it has, for the message
        p.wait(timeout=10)


def trace_pings(tb, c) -> list:
    # to the uplink's driver: the capture taps the uplink there, in xmit_one, after its qdisc
    plan = Plan([ContainerPath(c.ns, c.inner, c.veth, tb.bridge)], tb.uplink, hops=True,
                end_at_queue=False)
    reports = []
    with Tracer(plan) as tr:
        tr.start()
        pg = tb.popen(c.ns, ["ping", "-n", "-q", "-c", str(N), "-i", "0.005", tb.peer_ip],
                      stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        tr.run(until=lambda: pg.poll() is not None or time.monotonic() > deadline,
               on_reports=reports.extend)
        time.sleep(0.02)
        reports += tr.stop()
    out = pg.stdout.read()
    assert pg.wait(timeout=5) == 0 and f" {N} received" in out, out
    return reports


def test_mace_and_tcpdump_see_the_same_probes_in_the_order_the_kernel_stamps_them(
        testbed_factory, tcpdump_present, tmp_path):
    tb = testbed_factory(containers_n=1, masquerade=True)
    c = tb.containers[0]
    tb.run(c.ns, ["ping", "-n", "-c", "2", "-i", "0.05", tb.peer_ip], check=True)   # ARP settled
    caps = {"in": start_capture(tb, c.ns, c.inner, tmp_path / "in.pcap"),
            "up": start_capture(tb, tb.host_ns, tb.uplink, tmp_path / "up.pcap")}
    time.sleep(0.2)             # the filter is attached before "listening", the ring may lag
    off0 = pcap.realtime_offset()
    reports = trace_pings(tb, c)
    off1 = pcap.realtime_offset()
    for p in caps.values():
        stop_capture(p)
    assert abs(off1 - off0) < OFFSET_DRIFT_NS, "CLOCK_REALTIME was stepped during the test"
    off = (off0 + off1) // 2

    found = {k: pcap.echoes(tmp_path / f"{k}.pcap") for k in caps}
    req = {k: pcap.by_seq(v, pcap.ECHO_REQUEST) for k, v in found.items()}
    rep = {k: pcap.by_seq(v, pcap.ECHO_REPLY) for k, v in found.items()}
    seqs = list(range(1, N + 1))
    for k in caps:
        assert sorted(req[k]) == sorted(rep[k]) == seqs, (k, sorted(req[k]), sorted(rep[k]))
    # masquerade rewrote the source on the uplink: matched by sequence, not address
    assert {e.src for e in req["up"].values()} == {tb.host_ip}
    eg = sorted((r for r in reports if r.container == 0 and r.dir == 0), key=lambda r: r.t0)
    ing = sorted((r for r in reports if r.container == 0 and r.dir == 1), key=lambda r: r.t0)
    assert len(eg) == len(ing) == N

    ingress_diff = []
    for s, e, g in zip(seqs, eg, ing, strict=True):
        a, b = req["in"][s].ts - off, req["up"][s].ts - off
        # the same probe: mace's start lies inside its capture interval, 5 ms from any other
        assert a < e.t0 < b < e.t0 + e.latency, (s, a - e.t0, b - e.t0 - e.latency, e)
        u, i = rep["up"][s].ts - off, rep["in"][s].ts - off
        assert abs(u - g.t0) < 1_000_000 and abs(i - g.t0 - g.latency) < 1_000_000, (s, g)
        ingress_diff.append((i - u) - g.latency)
    med = statistics.median(ingress_diff)
    assert abs(med) < INGRESS_MEDIAN_NS, (med, sorted(ingress_diff))

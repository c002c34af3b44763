"""Correlation on the real kernel: real packets through testbeds, one report per packet."""

from __future__ import annotations

import re
import sys
import textwrap
import time

import pytest
from helpers import resolve_peer, trace_while

from mace.output.report import coverage
from mace.plan import ContainerPath, Plan
from mace.tracer import Tracer

COUNTERS = ("reports", "local", "dropped", "orphans", "expired", "evicted", "rejected", "in_flight")


def plan_for(tb, indices=None, **kw) -> Plan:
    cs = [tb.containers[i] for i in (indices if indices is not None else range(len(tb.containers)))]
    return Plan([ContainerPath(c.ns, c.inner, c.veth, tb.bridge) for c in cs], tb.uplink, **kw)


def rtts_by_seq(text: str) -> dict[int, float]:
    return {int(s): float(t) * 1000 for s, t in re.findall(r"icmp_seq=(\d+) .*time=([\d.]+) ms", text)}


def assert_consistent(stats):
    """Every packet that crossed a boundary is accounted for exactly once."""
    for c in stats["containers"]:
        for d in ("egress", "ingress"):
            k = c[d]
            assert k["crossed"] == sum(k[n] for n in COUNTERS), (d, k)


def by(reports, container, direction):
    return sorted((r for r in reports if r.container == container and r.dir == direction),
                  key=lambda r: r.seq)


@pytest.mark.parametrize("veth,queue", [(True, True), (False, False)],
                         ids=["veth-start", "inner-start-xmit-end"])
@pytest.mark.parametrize("hops", [False, True], ids=["boundary", "hops"])
def test_n_pings_give_n_reports_each_way_within_the_rtt(testbed, hops, veth, queue):
    tb, c, n = testbed, testbed.containers[0], 20
    plan = plan_for(tb, hops=hops, start_at_veth=veth, end_at_queue=queue)

    def start():
        return [tb.popen(c.ns, ["ping", "-n", "-c", str(n), "-i", "0.05", tb.peer_ip],
                         stdout=-1, text=True)]

    reports, stats, procs = trace_while(plan, start)
    rtt = rtts_by_seq(procs[0].stdout.read())
    assert len(rtt) == n
    eg, ing = by(reports, 0, 0), by(reports, 0, 1)
    assert [r.seq for r in eg] == list(range(1, n + 1))
    assert [r.seq for r in ing] == list(range(1, n + 1))
    assert len(reports) == 2 * n
    for i in range(n):
        e, g = eg[i], ing[i]
        assert e.len == g.len == 84
        assert 0 < e.latency and 0 < g.latency
        # the same probe's request and reply: both crossings fit inside its RTT
        assert e.t0 < g.t0
        assert (e.latency + g.latency) / 1000 < rtt[i + 1], (i, e, g, rtt[i + 1])
        for r in (e, g):
            seen = [h for h in r.hops if h is not None]
            assert seen == sorted(seen) and all(0 < h <= r.latency for h in seen)
            if hops:
                # egress slots: 0 (inner xmit -> veth) is timed only from the inner start, 4
                # (the uplink queue) only when the end is the uplink's driver; the routing
                # decision (3, and 0 of ingress) every time: one packet at a time here
                untimed = {i for i, skip in ((0, veth), (4, plan.end_at_queue)) if skip}
                if r.direction == "ingress":
                    untimed = set()
                assert [h is None for h in r.hops] == [i in untimed for i in range(len(r.hops))], r
    k = stats["containers"][0]
    for d in ("egress", "ingress"):
        # the new bridge's IGMP reports go into the container too: host traffic, "local"
        assert k[d]["reports"] == k[d]["crossed"] - k[d]["local"] == n
        assert coverage(k[d]) == 1.0
    assert stats["rings"]["lost"] == 0
    assert_consistent(stats)


def test_containers_sharing_eth0_are_told_apart_and_others_ignored(testbed_factory):
    tb = testbed_factory(containers_n=3, masquerade=True)
    plan = plan_for(tb, [0, 1])               # the third container is not monitored
    counts, sizes = (7, 11, 13), (100, 200, 300)
    resolve_peer(tb)

    def start():
        return [tb.popen(c.ns, ["ping", "-n", "-q", "-c", str(counts[i]), "-s", str(sizes[i]),
                                "-i", "0.03", tb.peer_ip], stdout=-1)
                for i, c in enumerate(tb.containers)]

    reports, stats, _ = trace_while(plan, start)
    for i in (0, 1):
        for d in (0, 1):
            rs = by(reports, i, d)
            assert len(rs) == counts[i], (i, d)
            assert {r.len for r in rs} == {20 + 8 + sizes[i]}      # each packet is its own
    assert {r.container for r in reports} == {0, 1}
    assert len(reports) == 2 * (counts[0] + counts[1])
    assert_consistent(stats)


def test_masquerade_path(testbed_factory):
    tb = testbed_factory(containers_n=1, masquerade=True)
    c = tb.containers[0]
    # to the uplink's driver: the qdisc, where the packets wait, is inside the segment
    reports, stats, _ = trace_while(plan_for(tb, end_at_queue=False), lambda: [
        tb.popen(c.ns, ["ping", "-n", "-q", "-c", "15", "-i", "0.03", tb.peer_ip], stdout=-1)])
    assert len(by(reports, 0, 0)) == len(by(reports, 0, 1)) == 15
    assert_consistent(stats)


SINK = textwrap.dedent("""
    import socket, sys, time
    kind, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    if kind == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", port)); s.settimeout(0.5)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try: s.recv(65536)
            except socket.timeout: pass
    else:
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port)); s.listen(1); s.settimeout(seconds)
        c, _ = s.accept()
        while c.recv(1 << 20): pass
""")

SOURCE = textwrap.dedent("""
    import socket, sys, time
    kind, host, port, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    end = time.monotonic() + seconds
    data = b"x" * (1400 if kind == "udp" else 65536)
    if kind == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        n = 0
        while time.monotonic() < end and n < 200000:
            s.sendto(data, (host, port)); n += 1
    else:
        s = socket.create_connection((host, port), timeout=5)
        sent = 0
        while time.monotonic() < end and sent < 4 << 30:
            s.sendall(data); sent += len(data)
        s.close()
""")


@pytest.mark.parametrize("kind", ["udp", "tcp"])
def test_bulk_traffic_coverage(testbed_factory, kind):
    tb = testbed_factory(containers_n=1, masquerade=True)
    c = tb.containers[0]
    sink = tb.popen(tb.peer_ns, [sys.executable, "-c", SINK, kind, "5201", "4"])
    time.sleep(0.3)
    # to the uplink's driver: the qdisc, where the packets wait, is inside the segment
    reports, stats, _ = trace_while(plan_for(tb, end_at_queue=False), lambda: [
        tb.popen(c.ns, [sys.executable, "-c", SOURCE, kind, tb.peer_ip, "5201", "1"])],
        ring_pages=1024)
    sink.wait(timeout=10)
    k = stats["containers"][0]
    assert k["egress"]["reports"] > 1000
    for d in ("egress", "ingress") if kind == "tcp" else ("egress",):
        assert coverage(k[d]) >= 0.99, (d, k[d], stats["correlator"])
    assert stats["rings"]["lost"] == 0
    assert_consistent(stats)


def test_tiny_table_under_a_flood_reports_less_but_never_nonsense(testbed_factory):
    # A slow uplink queues packets in its qdisc: a few hundred in flight at once.
    tb = testbed_factory(containers_n=1, uplink_rate_kbit=4000)
    c = tb.containers[0]
    max_age = 200_000_000
    # to the uplink's driver: the qdisc, where the packets wait, is inside the segment
    reports, stats, _ = trace_while(plan_for(tb, end_at_queue=False), lambda: [
        tb.popen(c.ns, ["ping", "-n", "-q", "-f", "-l", "64", "-c", "3000", "-w", "20", tb.peer_ip],
                 stdout=-1),
        tb.popen(c.ns, ["ping", "-n", "-q", "-f", "-l", "64", "-c", "3000", "-s", "500", "-w", "20",
                        tb.peer_ip], stdout=-1)], table_size=16, max_age_ns=max_age, ring_pages=1024)
    k = stats["containers"][0]
    evicted = k["egress"]["evicted"] + k["ingress"]["evicted"] + stats["correlator"]["evicted"]
    assert evicted > 0
    assert len(reports) < 2 * 6000
    assert all(0 < r.latency <= max_age for r in reports)
    assert all(r.len in (84, 528) for r in reports)
    assert_consistent(stats)
    assert coverage(k["egress"]) < 1.0 or coverage(k["ingress"]) < 1.0


def test_update_switches_containers_without_a_gap_or_a_duplicate(testbed_factory):
    """Tracer.update hands over between captures: A is traced throughout its first two
    phases with every probe reported exactly once; B from the first update on; A's index
    afresh (nothing) once the second update drops it."""
    tb = testbed_factory(containers_n=2)
    a, b = tb.containers
    full = plan_for(tb)
    pa, pb = full.containers
    n, interval = 150, 0.01
    resolve_peer(tb)
    with Tracer(Plan([pa], tb.uplink)) as tr:
        tr.start()
        pings = [tb.popen(c.ns, ["ping", "-n", "-c", str(n), "-i", str(interval), tb.peer_ip],
                          stdout=-1, text=True) for c in (a, b)]
        reports = []
        deadline = time.monotonic() + 0.5
        tr.run(until=lambda: time.monotonic() > deadline, on_reports=reports.extend)
        reports += tr.update(Plan([pa, pb], tb.uplink))
        deadline = time.monotonic() + 0.5
        tr.run(until=lambda: time.monotonic() > deadline, on_reports=reports.extend)
        a_before = tr.stats()["containers"][0]
        reports += tr.update(Plan([None, pb], tb.uplink))
        dropped_a = time.monotonic_ns()
        tr.run(until=lambda: all(p.poll() is not None for p in pings), on_reports=reports.extend)
        time.sleep(0.02)
        reports += tr.stop()
        stats = tr.stats()
    for p in pings:
        assert p.wait(timeout=5) == 0
    assert stats["rings"]["updates"] == 2
    a_reports = [r for r in reports if r.container == 0]
    for d in ("egress", "ingress"):
        seqs = [r.seq for r in a_reports if r.direction == d]
        assert seqs == list(range(1, len(seqs) + 1)), d      # no duplicate, no hole
        assert len(seqs) >= 0.8 / interval / 2, d            # ~1 s of pings at least
        k = a_before[d]
        assert k["orphans"] == k["rejected"] == k["evicted"] == 0, k
    # A's index was dropped by the second update: nothing after it, counters afresh
    assert all(r.t0 < dropped_a for r in a_reports)
    assert stats["containers"][0]["egress"]["reports"] == 0
    assert_consistent(stats)
    b_eg = by(reports, 1, 0)
    assert [r.seq for r in b_eg] == list(range(1, len(b_eg) + 1))
    assert len(b_eg) >= 1.0 / interval / 2
    k = stats["containers"][1]["egress"]
    # B's first packet may have crossed its veth just before B was traced: at most one orphan
    assert k["orphans"] <= 1 and k["rejected"] == k["evicted"] == 0, k


@pytest.mark.parametrize("hops", [False, True], ids=["boundary", "hops"])
def test_a_packet_that_waits_for_the_containers_arp_is_reported_with_the_wait(testbed, hops):
    # The host forgets the container's address: the peer's first ping waits in the
    # neighbour queue until the container answers through its veth, and leaves it in the
    # chain that answer is received in (Correlator._answer)
    tb, c, n = testbed, testbed.containers[0], 5
    tb.run(tb.host_ns, ["ip", "neigh", "flush", "all"], check=True)
    reports, stats, procs = trace_while(plan_for(tb, hops=hops), lambda: [
        tb.popen(tb.peer_ns, ["ping", "-n", "-c", str(n), "-i", "0.1", c.ip], stdout=-1, text=True)])
    assert f" {n} received" in procs[0].stdout.read()
    ing = by(reports, 0, 1)
    assert [(r.seq, r.len) for r in ing] == [(k, 84) for k in range(1, n + 1)], ing
    assert stats["correlator"]["parked"] >= 1, stats["correlator"]

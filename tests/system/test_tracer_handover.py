"""Tracer.update under a flood: the handover between two captures delivers each event once,
even when the drain thread runs between the moment the cut is taken and the moment the old
capture is told about it, and when a hit's two copies are stamped on both sides of the cut
(the flood makes that happen about once in six handovers)."""

from __future__ import annotations

import subprocess
import threading
import time

import mace.tracer
from mace.plan import ContainerPath, Plan
from mace.tracer import Tracer

PINGS = 100000


def test_a_drain_between_the_cut_and_the_old_capture_cut_duplicates_nothing(testbed_factory, monkeypatch):
    tb = testbed_factory(containers_n=2)
    a, b = tb.containers
    pa, pb = (ContainerPath(c.ns, c.inner, c.veth, tb.bridge) for c in (a, b))
    real = mace.tracer._cut_time
    main = threading.main_thread()

    def slow_cut() -> int:
        # Let both captures run a while before the cut (B's packets then fall wholly inside
        # the window, which B's old capture did not trace), take it, then give the drain
        # thread time to release events stamped after it (the reorder delay is 100 µs
        # here): the races the handover must close.
        if threading.current_thread() is main:
            time.sleep(0.05)
        t = real()
        if threading.current_thread() is main:
            time.sleep(0.15)
        return t

    with Tracer(Plan([pa], tb.uplink), reorder_us=100) as tr:
        tr.start()
        flood = tb.popen(a.ns, ["ping", "-n", "-q", "-f", "-c", str(PINGS), "-w", "30", tb.peer_ip],
                         stdout=subprocess.DEVNULL)
        # B, added and dropped by the updates, pings too: its packets inside the switch
        # window belong to neither capture, and must not come out restamped at the cut
        other = tb.popen(b.ns, ["ping", "-n", "-q", "-i", "0.002", "-w", "4", tb.peer_ip],
                         stdout=subprocess.DEVNULL)
        reports = []
        deadline = time.monotonic() + 0.4
        tr.run(until=lambda: time.monotonic() > deadline, on_reports=reports.extend)
        monkeypatch.setattr(mace.tracer, "_cut_time", slow_cut)
        for plan in (Plan([pa, pb], tb.uplink), Plan([pa, None], tb.uplink), Plan([pa, pb], tb.uplink)):
            reports += tr.update(plan)
            deadline = time.monotonic() + 0.2
            tr.run(until=lambda deadline=deadline: time.monotonic() > deadline, on_reports=reports.extend)
        tr.run(until=lambda: flood.poll() is not None, on_reports=reports.extend)
        time.sleep(0.02)
        reports += tr.stop()
        stats = tr.stats()
    assert flood.wait(timeout=5) == 0
    other.wait(timeout=10)
    theirs = [r for r in reports if r.container == 1]
    assert theirs and all(r.latency > 1000 for r in theirs), min(r.latency for r in theirs)
    assert stats["rings"]["updates"] == 3
    assert stats["rings"]["cut"] > 0              # both captures saw the switch window
    assert stats["rings"]["inexact"] == 0         # the old capture's log covered the cut
    for d, name in enumerate(("egress", "ingress")):
        mine = [r for r in reports if r.container == 0 and r.dir == d]
        # the correlator numbers what it reports, so a packet delivered twice shows as a
        # second report of the same entry time, not as a repeated seq
        assert len({r.t0 for r in mine}) == len(mine), name
        assert [r.seq for r in mine] == list(range(1, len(mine) + 1)), name
        assert len(mine) == PINGS, (name, str(stats["containers"][0][name]), str(stats["rings"]))
        k = stats["containers"][0][name]
        assert k["rejected"] == k["orphans"] == k["evicted"] == k["expired"] == 0, (name, k)

"""Hundreds of containers traced at once, more than a page of filter text can name (about
160 veths): the veths go by the prefix they share (name ~ "m<tag>v*"), or, when no prefix
may stand for them, their names are spread over several perf events of each tracepoint.
Either way each ping of a few containers, the first and the last among them, is reported
once, in its own container, and nothing in the others; with several events per
tracepoint, also across handovers (Tracer.update) while the pings run."""

from __future__ import annotations

import threading
import time

from helpers import pings, resolve_peer

import mace.plan
from mace.plan import ContainerPath, Plan
from mace.tracer import Tracer

CONTAINERS = 250            # past a /24 too: the last ones are in 198.18.1.0/24
PINGS = 10
SENDERS = (0, 1, CONTAINERS // 2, CONTAINERS - 2, CONTAINERS - 1)


def plan_of(tb) -> Plan:
    return Plan([ContainerPath(c.ns, c.inner, c.veth, tb.bridge) for c in tb.containers], tb.uplink)


def check_reports(plan: Plan, reports, stats) -> None:
    """Every sender's PINGS echoes and replies, once each, in its own container; nothing
    from the containers that sent nothing."""
    assert {r.container for r in reports} == set(SENDERS), sorted({r.container for r in reports})
    for i in SENDERS:
        assert plan.containers[i].veth.endswith(f"v{i}")
        for d, name in enumerate(("egress", "ingress")):
            mine = [r for r in reports if r.container == i and r.dir == d]
            k = stats["containers"][i][name]
            assert len(mine) == PINGS, (i, name, len(mine), k)
            # a packet delivered twice would be a second report of the same entry time
            assert len({r.t0 for r in mine}) == PINGS, (i, name)
            assert [r.seq for r in mine] == list(range(1, PINGS + 1)), (i, name)
            assert all(r.latency > 0 for r in mine)
            assert k["orphans"] == k["rejected"] == k["evicted"] == k["expired"] == 0, (i, name, k)
    rings = stats["rings"]
    assert rings["lost"] == 0 and rings["errors"] == 0 and rings["inexact"] == 0, rings


def trace(tb, plan: Plan, updates=()) -> tuple[list, dict, int]:
    """Pings from SENDERS (0.05 s apart) while `plan` is traced, handing over to each plan
    of `updates` in turn while they run; the reports, the stats and the perf events per CPU."""
    resolve_peer(tb)
    reports: list = []
    errors: list = []

    def ping_all():
        try:
            pings(tb, [(tb.containers[i], PINGS) for i in SENDERS], interval="0.05")
        except BaseException as e:      # noqa: BLE001 - re-raised by the test's thread
            errors.append(e)

    with Tracer(plan) as tr:
        tr.start()
        events = tr.capture.events_per_cpu
        sender = threading.Thread(target=ping_all)
        sender.start()
        for nxt in updates:
            deadline = time.monotonic() + 0.15
            tr.run(until=lambda deadline=deadline: time.monotonic() > deadline, on_reports=reports.extend)
            reports += tr.update(nxt)
            assert tr.capture.events_per_cpu == events      # the same split after the handover
        tr.run(until=lambda: not sender.is_alive(), on_reports=reports.extend)
        sender.join()
        time.sleep(0.05)
        reports += tr.stop()
        stats = tr.stats()
    if errors:
        raise errors[0]
    return reports, stats, events


def without(plan: Plan, index: int) -> Plan:
    assert index not in SENDERS
    return Plan([None if i == index else c for i, c in enumerate(plan.containers)], plan.uplink)


def test_many_containers_by_their_veth_prefix(testbed_factory):
    tb = testbed_factory(containers_n=CONTAINERS)
    assert tb.containers[-1].ip.startswith("198.18.1.")
    plan = plan_of(tb)
    probes = plan.probes()
    prefix = f"m{tb.tag}v"
    assert all(p.prefixes == (prefix,) for p in probes if any(d.startswith(prefix) for d in p.devices))
    # an idle container leaves (its veth still passes the glob, and decodes as no device of
    # the plan) and comes back: two handovers, while the others ping
    reports, stats, events = trace(tb, plan, updates=(without(plan, CONTAINERS // 3), plan))
    assert events == len(probes)                     # one event per tracepoint and CPU
    assert stats["rings"]["updates"] == 2
    check_reports(plan, reports, stats)


def test_many_containers_named_one_by_one_over_several_events(testbed_factory, monkeypatch):
    monkeypatch.setattr(mace.plan, "GLOB_FROM", 10**6)      # no prefix: every veth by its name
    tb = testbed_factory(containers_n=CONTAINERS)
    plan = plan_of(tb)
    split = {p.tracepoint: len(p.filters()) for p in plan.probes()}
    assert all(p.prefixes == () for p in plan.probes())
    assert split[mace.plan.XMIT] == split[mace.plan.RX] == split[mace.plan.RECV] == 2, split
    reports, stats, events = trace(tb, plan, updates=(without(plan, CONTAINERS // 3), plan))
    assert events == sum(split.values())
    assert stats["rings"]["updates"] == 2
    check_reports(plan, reports, stats)

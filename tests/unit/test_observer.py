"""The observer's cost in the summary (events per reported packet, samples of unreported traffic,
mace's estimated own cost inside each segment) and the other tracers it names (no privileges)."""

from __future__ import annotations

import json
import types

import pytest

from mace.capture.others import OtherTracer
from mace.defaults import FILTERED_HIT_COST_NS, SAMPLE_COST_NS
from mace.output.summary import COUNTERS, build, filtered_hits, format_text, path_steps
from mace.plan import ContainerPath, Plan

BRIDGED = ContainerPath("c0", "eth0", "vethaa", "br0")
ROUTED = ContainerPath("c1", "eth0", "vethbb")


def plan(containers=(BRIDGED,), *, hops=False, end_at_queue=False, veth_start=False) -> Plan:
    p = Plan(list(containers), "up0", hops=hops, end_at_queue=end_at_queue)
    p.start_at_veth = veth_start        # set after construction: works whatever its default
    return p


# -- Plan.samples_per_packet ------------------------------------------------------------------

# (containers, hops, end_at_queue, veth start) -> (egress, ingress)
VARIANTS = {
    # with hops, the routing decision is one sample more each way
    "default": ((BRIDGED,), False, False, False, 4, 3),
    "end-at-queue": ((BRIDGED,), False, True, False, 3, 3),
    "hops": ((BRIDGED,), True, False, False, 7, 6),
    "hops-end-at-queue": ((BRIDGED,), True, True, False, 6, 6),
    "routed": ((ROUTED,), False, False, False, 4, 3),
    "routed-hops": ((ROUTED,), True, False, False, 6, 5),
    "veth-start": ((BRIDGED,), False, False, True, 4, 3),
    "veth-start-end-at-queue": ((BRIDGED,), False, True, True, 3, 3),
    "veth-start-hops": ((BRIDGED,), True, False, True, 6, 6),
    "veth-start-routed-hops": ((ROUTED,), True, False, True, 5, 5),
    "mixed-hops": ((ROUTED, BRIDGED), True, False, False, 7, 6),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_samples_per_packet_counts_the_traced_steps_of_each_path(variant):
    containers, hops, eaq, veth, eg, ing = VARIANTS[variant]
    p = plan(containers, hops=hops, end_at_queue=eaq, veth_start=veth)
    assert p.samples_per_packet() == {"egress": eg, "ingress": ing}


def test_samples_per_packet_without_a_start_flag_starts_at_the_inner_device():
    shape = types.SimpleNamespace(hops=False, bridges=["br0"], end_at_queue=False)
    assert Plan.samples_per_packet(shape) == {"egress": 4, "ingress": 3}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_plans_filters_match_exactly_the_samples_per_packet(variant):
    """Two derivations agree: the steps of a packet's path that the plan's in-kernel filters
    let through are the samples its chain counts."""
    containers, hops, eaq, veth, _, _ = VARIANTS[variant]
    p = plan(containers, hops=hops, end_at_queue=eaq, veth_start=veth)
    probes = {pr.tracepoint: pr for pr in p.probes()}
    for d, steps in path_steps(p).items():
        matched = sum(1 for tp, dev in steps if tp in probes and probes[tp].passes(dev))
        assert matched == p.samples_per_packet()[d], (d, steps, probes)


def test_filtered_hits_inside_the_segments():
    # without hops the bridge is not in the filters: its receive (egress) and its xmit and
    # queue (ingress) are built and rejected, as is the queue on the veth (ingress)
    assert filtered_hits(plan(), plan().probes()) == {"egress": 1, "ingress": 3}
    assert filtered_hits(plan(hops=True), plan(hops=True).probes()) == {"egress": 0, "ingress": 2}
    assert filtered_hits(plan((ROUTED,)), plan((ROUTED,)).probes()) == {"egress": 0, "ingress": 1}


def test_a_tracepoint_not_enabled_costs_nothing():
    p = plan()
    probes = [pr for pr in p.probes() if pr.tracepoint != "net:net_dev_queue"]
    assert filtered_hits(p, probes) == {"egress": 1, "ingress": 1}


# -- the summary ------------------------------------------------------------------------------

def direction(reports):
    out = {n: 0 for n in COUNTERS}
    out.update(reports=reports, min_ns=10_000 if reports else None,
               max_ns=10_000 if reports else None, sum_ns=10_000 * reports)
    return out


class FakeCorrelator:
    def histogram(self, i, d):
        from mace.correlate import _correlate
        return [0] * _correlate.BUCKETS


class FakeTracer:
    """What build() reads from a stopped Tracer."""

    def __init__(self, plan, per_container, events, other_tracers=(), seconds=10.0):
        self.plan = plan
        self.other_tracers = list(other_tracers)
        self.correlator = FakeCorrelator()
        self.started_at, self.stopped_at = 50.0, 50.0 + seconds
        self._stats = {
            "containers": [{"egress": direction(e), "ingress": direction(i)} for e, i in per_container],
            "rings": {"events": events, "lost": 0, "kernel_dropped": 0, "errors": 0, "late": 0},
            "correlator": {"table_size": 4096, "table_bytes": 4096 * 64, "evicted": 0},
        }

    def stats(self):
        return self._stats


BPFTRACE = OtherTracer(4242, "bpftrace", "bpf tracepoint", "net:net_dev_start_xmit", 2, suppresses=True)
PERF = OtherTracer(77, "perf", "perf", None, 3)


def summary_of(tracer):
    n = len(tracer.stats()["containers"])
    return build(tracer, [f"c{i}" for i in range(n)], list(range(n)))


def test_build_gives_the_observers_cost():
    # 10 egress and 8 ingress reports of two containers; 4 + 3 events per packet's chain
    t = FakeTracer(plan((BRIDGED, ROUTED)), [(6, 5), (4, 3)], events=1000, seconds=8.0)
    obs = summary_of(t)["observer"]
    assert obs["events_per_report"] == pytest.approx(1000 / 18, abs=1e-3)
    assert obs["samples_per_packet"] == {"egress": 4, "ingress": 3}
    assert obs["unreported_samples_per_s"] == pytest.approx((1000 - 10 * 4 - 8 * 3) / 8.0, abs=0.1)
    cost = obs["own_cost_ns_estimate"]
    # two containers: the veths' tracepoints walk two names per hit
    walk = cost["basis"]["filter_walk_inside_ns"]
    assert walk["egress"] > 0 and walk["ingress"] > 0
    assert cost["egress"] == 3 * SAMPLE_COST_NS + 1 * FILTERED_HIT_COST_NS + walk["egress"]
    assert cost["ingress"] == 2 * SAMPLE_COST_NS + 3 * FILTERED_HIT_COST_NS + walk["ingress"]
    basis = cost["basis"]
    assert basis["sample_ns"] == SAMPLE_COST_NS == 1000
    assert basis["filtered_hit_ns"] == FILTERED_HIT_COST_NS == 170
    assert basis["samples_inside"] == {"egress": 3, "ingress": 2}
    assert basis["filtered_hits_inside"] == {"egress": 1, "ingress": 3}
    assert "KERNEL-NOTES" in basis["source"]
    json.dumps(obs)


def test_build_with_hops_counts_more_samples_and_fewer_filtered_hits():
    cost = summary_of(FakeTracer(plan(hops=True), [(1, 1)], events=11))["observer"]["own_cost_ns_estimate"]
    walk = cost["basis"]["filter_walk_inside_ns"]
    # with hops each direction has the routing decision too (7 and 6 samples)
    assert (cost["egress"], cost["ingress"]) == (6 * SAMPLE_COST_NS + walk["egress"],
                                                 5 * SAMPLE_COST_NS + 2 * FILTERED_HIT_COST_NS + walk["ingress"])


def test_the_filter_walk_is_per_term_and_per_extra_event():
    from mace.output.summary import filter_work_ns
    p = plan()
    probes = p.probes()
    walk = filter_work_ns(p, probes)
    per_hit = {q.tracepoint: 31 * (len(q.terms()) - 1) + 46 * (len(q.filters()) - 1)
               for q in probes if q.devices}
    assert walk == {d: sum(per_hit.get(tp, 0) for tp, _ in steps[1:]) for d, steps in path_steps(p).items()}


def test_unreported_samples_are_never_negative():
    # the chains of reports an update() reset are still in the rings' count: never below zero
    obs = summary_of(FakeTracer(plan(), [(10, 10)], events=5))["observer"]
    assert obs["unreported_samples_per_s"] == 0


def test_no_reports_no_duration_no_ratio():
    t = FakeTracer(plan(), [(0, 0)], events=300)
    t.stopped_at = None
    obs = summary_of(t)["observer"]
    assert obs["events_per_report"] is None and obs["unreported_samples_per_s"] is None
    walk = obs["own_cost_ns_estimate"]["basis"]["filter_walk_inside_ns"]
    assert obs["own_cost_ns_estimate"]["egress"] == 3 * SAMPLE_COST_NS + FILTERED_HIT_COST_NS + walk["egress"]
    line = [x for x in format_text(summary_of(t)).splitlines() if x.startswith("observer:")]
    assert line == ["observer: - events per reported packet, - samples/s unreported, own cost ≈ "
                    "3.4 µs egress / 2.7 µs ingress (estimate)"]


def test_format_text_gives_one_observer_line_after_the_totals():
    t = FakeTracer(plan(), [(5, 5)], events=120, seconds=4.0)
    lines = format_text(summary_of(t)).splitlines()
    assert lines[-2].startswith("120 events in 4.0 s;")
    assert lines[-1] == ("observer: 12.0 events per reported packet, 21 samples/s unreported, "
                         "own cost ≈ 3.4 µs egress / 2.7 µs ingress (estimate)")


def test_other_tracers_are_recorded_and_shown_one_line_each():
    t = FakeTracer(plan(), [(1, 1)], events=7, other_tracers=[PERF, BPFTRACE])
    s = summary_of(t)
    assert s["other_tracers"] == [PERF.as_dict(), BPFTRACE.as_dict()]
    json.dumps(s)
    lines = format_text(s).splitlines()
    shown = [x for x in lines if "PID" in x]
    assert len(shown) == 2
    assert shown[0] == f"warning: {BPFTRACE.describe()}"     # the one that can suppress first
    assert shown[1] == f"warning: {PERF.describe()}"
    assert "PID 4242 (bpftrace)" in shown[0] and "suppress" in shown[0]
    assert lines.index(shown[0]) > max(i for i, x in enumerate(lines) if x.startswith("observer:"))


def test_no_other_tracers_no_line():
    s = summary_of(FakeTracer(plan(), [(1, 1)], events=7))
    assert s["other_tracers"] == []
    assert not [x for x in format_text(s).splitlines() if "warning" in x or "PID" in x]


def test_ftrace_is_shown_without_a_pid():
    ftrace = OtherTracer(None, "ftrace", "ftrace", "net:netif_receive_skb")
    s = summary_of(FakeTracer(plan(), [(1, 1)], events=7, other_tracers=[ftrace]))
    assert s["other_tracers"] == [ftrace.as_dict()]
    assert f"warning: {ftrace.describe()}" in format_text(s).splitlines()

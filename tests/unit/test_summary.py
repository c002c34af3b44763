"""The end-of-trace summary from constructed tracer statistics, and the latency histogram's
percentiles against a sorted list (no privileges)."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mace.correlate import _correlate
from mace.output.report import Histogram
from mace.output.summary import COUNTERS, build, format_text
from mace.plan import ContainerPath, Plan

NB = _correlate.BUCKETS          # per container and direction
MAX_LATENCY = 4_000_000_000     # --max-age is at most 4 s: no report is older


def hist_of(values) -> list[int]:
    counts = [0] * NB
    for v in values:
        counts[_correlate.bucket_of(v)] += 1
    return counts


def bucket_middle(v: int) -> float:
    lo, hi = _correlate.bucket_bounds(_correlate.bucket_of(v))
    return (lo + hi - 1) / 2


def sorted_percentile(values, q) -> int:
    """Nearest rank: the smallest value with at least q % of the values at or below it."""
    s = sorted(values)
    return s[max(1, math.ceil(q * len(s) / 100)) - 1]


# -- Histogram.percentile ---------------------------------------------------------------------

def test_every_latency_has_a_bucket():
    assert _correlate.bucket_of(MAX_LATENCY) < _correlate.bucket_of(10**12) < NB


def test_empty_histogram_has_no_percentile():
    h = Histogram([0] * NB)
    assert h.total == 0
    for q in (0, 50, 100):
        assert h.percentile(q) is None
    assert h.max_value() is None


@pytest.mark.parametrize("v", [0, 1, 127, 128, 129, 80_932, 1_000_000, MAX_LATENCY])
def test_single_value_is_every_percentile(v):
    h = Histogram(hist_of([v]))
    lo, hi = _correlate.bucket_bounds(_correlate.bucket_of(v))
    assert lo <= v < hi
    for q in (0, 0.1, 50, 99.9, 100):
        assert h.percentile(q) == bucket_middle(v)
    assert h.max_value() == hi - 1


def test_exact_below_128_ns():
    for v in range(128):
        assert _correlate.bucket_bounds(_correlate.bucket_of(v)) == (v, v + 1)


def test_edges_are_the_smallest_and_the_largest():
    values = [1000, 2000, 3000, 50_000]
    h = Histogram(hist_of(values))
    assert h.percentile(0) == bucket_middle(1000)      # rank at least 1: the smallest
    assert h.percentile(100) == bucket_middle(50_000)
    assert h.percentile(25) == bucket_middle(1000)
    assert h.percentile(25.01) == bucket_middle(2000)
    assert h.percentile(75) == bucket_middle(3000)
    assert h.percentile(75.01) == bucket_middle(50_000)


def test_minus_gives_the_window():
    older = Histogram(hist_of([10, 20]))
    newer = Histogram(hist_of([10, 20, 30_000, 40_000]))
    window = newer.minus(older)
    assert window.total == 2 and window.percentile(1) == bucket_middle(30_000)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.lists(st.integers(0, MAX_LATENCY), min_size=1, max_size=200),
       st.floats(0, 100, allow_nan=False))
def test_percentile_is_the_sorted_lists_within_a_bucket(values, q):
    p = Histogram(hist_of(values)).percentile(q)
    want = sorted_percentile(values, q)
    lo, hi = _correlate.bucket_bounds(_correlate.bucket_of(want))
    assert lo <= p < hi
    assert abs(p - want) <= max(0.5, 0.016 * want)


# -- the summary ------------------------------------------------------------------------------

def direction(reports, lo, hi, total, **counters):
    out = {n: 0 for n in COUNTERS}
    out.update(reports=reports, min_ns=lo, max_ns=hi, sum_ns=total)
    out.update(counters)
    return out


class FakeCorrelator:
    def __init__(self, hists):
        self.hists = hists

    def histogram(self, i, d):
        return self.hists[i][d]


class FakeTracer:
    """What build() reads from a stopped Tracer."""

    def __init__(self, stats, hists, started_at=100.0, stopped_at=112.3456):
        self._stats = stats
        self.plan = Plan([ContainerPath("web", "eth0", "vethaa", "br0"),
                          ContainerPath("db", "eth0", "vethbb", "br0")], "up0")
        self.other_tracers = []
        self.correlator = FakeCorrelator(hists)
        self.started_at = started_at
        self.stopped_at = stopped_at

    def stats(self):
        return self._stats


EG_VALUES = [40_000, 41_000, 42_000, 90_000]


def make_tracer(kernel_dropped=0):
    stats = {
        "containers": [
            {"egress": direction(4, 40_000, 90_000, sum(EG_VALUES), crossed=6, local=1, orphans=1),
             "ingress": direction(0, None, None, 0, expired=2)},
            {"egress": direction(0, None, None, 0), "ingress": direction(1, 7_000, 7_000, 7_000)},
        ],
        "rings": {"events": 1234, "lost": 5, "kernel_dropped": kernel_dropped, "errors": 2, "late": 1},
        "correlator": {"table_size": 4096, "table_bytes": 4096 * 64, "evicted": 3, "other": 9},
    }
    hists = [[hist_of(EG_VALUES), hist_of([])], [hist_of([]), hist_of([7_000])]]
    return FakeTracer(stats, hists)


def test_build_gives_counts_coverage_percentiles_and_counters():
    s = build(make_tracer(), ["web", "/run/netns/db"], [11, 22])
    assert s["duration_s"] == 12.346
    assert [(c["target"], c["netns"]) for c in s["containers"]] == [("web", 11), ("/run/netns/db", 22)]
    eg = s["containers"][0]["egress"]
    assert eg["count"] == 4 and eg["coverage"] == 4 / 5       # one orphan missed
    assert (eg["min_ns"], eg["max_ns"], eg["mean_ns"]) == (40_000, 90_000, sum(EG_VALUES) / 4)
    assert eg["p50_ns"] == bucket_middle(41_000)
    assert eg["p99_ns"] == min(bucket_middle(90_000), 90_000)   # kept within what was seen
    assert eg["crossed"] == 6 and eg["local"] == 1 and eg["orphans"] == 1
    assert set(COUNTERS) <= set(eg)
    ing = s["containers"][0]["ingress"]
    assert ing["count"] == 0 and ing["coverage"] == 0.0 and ing["mean_ns"] is None
    assert ing["p50_ns"] is None and ing["expired"] == 2
    assert s["containers"][1]["egress"]["coverage"] is None     # nothing crossed, nothing missed
    # one value: every percentile is that value, not its bucket's middle
    one = s["containers"][1]["ingress"]
    assert one["p50_ns"] == one["p90_ns"] == one["p99_ns"] == 7_000
    assert (s["events"], s["lost"], s["kernel_dropped"], s["malformed"], s["late"]) == (1234, 5, 0, 2, 1)
    assert s["table"] == {"size": 4096, "bytes": 4096 * 64, "evicted_unattributed": 3}
    assert s["correlator"]["other"] == 9
    json.dumps(s)                               # --summary-json writes it as it is


def test_build_without_a_finished_run_has_no_duration():
    t = make_tracer()
    t.stopped_at = None
    assert build(t, ["a", "b"], [1, 2])["duration_s"] is None


def test_format_text_one_line_per_target_and_direction_then_totals():
    text = format_text(build(make_tracer(), ["web", "/run/netns/db"], [11, 22]))
    segment, *lines = text.splitlines()
    # what is measured, then the table, a line per shortfall explained, the totals, the
    # observer's cost (test_observer.py)
    assert segment.startswith("segment: device (")
    assert len(lines) == 1 + 4 + 3 + 1 + 1
    head = lines[0].split()
    assert head[:9] == ["target", "dir", "count", "cover", "min", "p50", "p90", "p99", "max"]
    # targets are shown whole, and the columns line up behind the longest
    assert lines[3].startswith("/run/netns/db egress ")
    assert lines[1].startswith("web           egress ")
    assert lines[1].split()[:6] == ["web", "egress", "4", "80.0%", "40.0", f"{bucket_middle(41_000) / 1000:.1f}"]
    assert lines[1].split()[-4:] == ["1", "0", "0", "0"]        # orphan expired evicted rejected
    assert lines[2].split()[:8] == ["web", "ingress", "0", "0.0%", "-", "-", "-", "-"]
    assert lines[2].split()[-4:] == ["0", "2", "0", "0"]
    assert lines[3].split()[3] == "-"                          # no coverage to show
    assert lines[4].split()[4:9] == ["7.0"] * 5
    # every shortfall with the counters behind it: web egress lost an orphan, web ingress two
    # expired, db egress saw nothing cross
    assert lines[5] == ("web egress: 6 crossed its veth, 1 stayed on the host (local), 0 dropped by "
                        "the kernel, 1 lost to the columns above, 0 in flight at the end")
    assert lines[6].startswith("web ingress: 0 crossed its veth") and "2 lost to the columns" in lines[6]
    assert lines[7].startswith("/run/netns/db egress: 0 crossed") and "is the container sending?" in lines[7]
    assert lines[8] == ("1234 events in 12.346 s; lost (ring full) 5, malformed 2, table 4096 "
                        "entries (256 KiB), evicted before attribution 3")
    assert lines[9].startswith("observer: ")
    assert "warning" not in text


def test_format_text_warns_of_samples_the_kernel_dropped():
    text = format_text(build(make_tracer(kernel_dropped=7), ["web", "db"], [11, 22]))
    last = text.splitlines()[-1]
    assert last.startswith("warning: the kernel dropped 7 samples")
    # web's coverage is below 100%: the traced containers' own reports may be affected
    assert "some of its reports may be missing" in last


def test_the_kernel_drop_warning_says_when_no_traced_report_is_missing():
    t = make_tracer(kernel_dropped=7)
    for c in t._stats["containers"]:
        for k in c.values():
            k.update(orphans=0, expired=0)
    last = format_text(build(t, ["web", "db"], [11, 22])).splitlines()[-1]
    assert "no traced packet seen to cross lost a later step" in last


def report(container, direction, latency, hops):
    from mace.output.report import Report
    return Report(container=container, dir=direction, seq=1, t0=0, latency=latency, len=84, cpu=0,
                  hops=hops)


def test_the_summary_counts_what_was_written_and_says_what_count_left_out():
    from mace.output.summary import Tally
    t = Tally(2, hops=False, end_at_queue=True)
    t.add([report(0, 0, 40_000, ()), report(0, 0, 41_000, ())])       # 2 of the 4 made
    s = build(make_tracer(), ["web", "db"], [11, 22], tally=t)
    eg = s["containers"][0]["egress"]
    assert (eg["count"], eg["made"]) == (2, 4)
    assert "web egress: 2 of 4 reports written (--count)" in format_text(s).splitlines()


def test_hop_medians_of_several_containers_ending_at_the_driver():
    # egress has 6 intervals then (the queue is a step of its own), ingress 5: rows must not mix
    from mace.output.summary import Tally
    t = Tally(2, hops=True, end_at_queue=False)
    t.add([report(1, 0, 10_000, (None, 2_000, 5_000, 6_000, 8_000)),
           report(1, 1, 6_000, (500, 1_000, 3_000, 4_000))])
    eg, ing = t.hop_medians(1, 0), t.hop_medians(1, 1)
    assert list(eg) == ["veth backlog", "bridge", "route", "uplink queue", "uplink xmit"]
    assert eg["uplink xmit"] == bucket_middle(2_000) and ing["container receive"] == bucket_middle(2_000)
    t.grow()
    t.add([report(2, 0, 10_000, (None, 2_000, 5_000, None, 8_000))])
    assert list(t.hop_medians(2, 0))[-1] == "uplink xmit"


def test_hop_medians_per_step_in_the_json_and_the_text():
    from mace.output.summary import Tally
    t = Tally(2, hops=True, end_at_queue=True)
    # egress from the veth start: no inner xmit slot, no uplink queue slot (the queue is the end)
    t.add([report(0, 0, 10_000, (None, 2_000, 5_000, 7_000, None)),
           report(0, 0, 12_000, (None, 2_000, 6_000, 8_000, None)),
           report(0, 1, 6_000, (500, 1_000, 3_000, 4_000))])
    s = build(make_tracer(), ["web", "db"], [11, 22], tally=t)
    eg = s["containers"][0]["egress"]["hop_p50_ns"]
    assert list(eg) == ["veth backlog", "bridge", "route", "uplink queue"]
    assert eg["veth backlog"] == bucket_middle(2_000) and eg["uplink queue"] == bucket_middle(3_000)
    ing = s["containers"][0]["ingress"]["hop_p50_ns"]
    assert list(ing) == ["route", "bridge", "veth", "container rx", "container receive"]
    assert ing["container receive"] == bucket_middle(2_000)
    assert "hop_p50_ns" not in s["containers"][1]["egress"] or not s["containers"][1]["egress"]["hop_p50_ns"]
    text = format_text(s)
    assert f"web egress hops, p50 µs to each step: veth backlog {bucket_middle(2_000) / 1000:.1f}" in text
    json.dumps(s)


def test_a_target_that_went_away_is_named_with_when():
    s = build(make_tracer(), ["web", "db"], [11, 22], stopped={1: 4.25})
    assert s["containers"][1]["stopped_after_s"] == 4.25 and "stopped_after_s" not in s["containers"][0]
    assert "db: stopped 4.25 s after the start" in format_text(s)


def test_packets_that_never_reached_the_uplink_are_explained_with_the_devices_to_try():
    t = make_tracer()
    t._stats["containers"][1]["egress"].update(crossed=9, local=9)
    text = format_text(build(t, ["web", "db"], [11, 22], other_routes=("eth1", "wg0")))
    line = next(x for x in text.splitlines() if x.startswith("db egress: none reached"))
    assert "up0" in line and "the host also routes by eth1, wg0 (add it with --uplink DEV)" in line

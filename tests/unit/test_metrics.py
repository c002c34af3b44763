"""mace.service.metrics without a kernel: the address option, and what a scrape shows of
containers that come, go and come back (no privileges needed)."""

from __future__ import annotations

import pytest

from mace.errors import UsageError
from mace.service.metrics import BOUNDS_NS, Book, Collector, Series, Snapshot, parse_address


@pytest.mark.parametrize("text, expected", [
    ("9464", ("127.0.0.1", 9464)),
    ("0.0.0.0:9464", ("0.0.0.0", 9464)),
    ("[::]:9464", ("::", 9464)),
    ("[::1]:1", ("::1", 1)),
])
def test_metrics_addresses(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize("text, message", [
    ("", "not a port"), ("0", "not a port"), ("65536", "not a port"), ("x", "not a port"),
    ("host:9464", "not an IP address"), ("::1:9464", "needs brackets"), ("1.2.3:9", "not an IP"),
])
def test_bad_metrics_addresses_are_usage_errors(text, message):
    with pytest.raises(UsageError, match=message):
        parse_address(text)


def test_bounds_are_one_two_five_per_decade_from_a_microsecond_to_100_ms():
    assert BOUNDS_NS[:4] == [1000, 2000, 5000, 10_000] and BOUNDS_NS[-1] == 100_000_000
    assert len(BOUNDS_NS) == 16


def series(name: str, n: int) -> Series:
    counts = [[n] + [0] * len(BOUNDS_NS)] + [[0] * (len(BOUNDS_NS) + 1)] * 5
    return Series((name, "", ""), [{"reported": n}, {"reported": n}],
                  [(counts, [n * 500] + [0] * 5)] * 2)


def test_a_gone_container_is_served_once_then_leaves():
    book = Book()
    book.retire(series("web", 3))
    assert [s.labels[0] for s in book.snapshot([], None).series] == ["web"]
    assert book.snapshot([], None).series == []


def test_a_container_back_under_its_name_continues_its_counters():
    book = Book()
    book.retire(series("web", 3))                       # the first incarnation went
    snap = book.snapshot([series("web", 2)], None)      # the restarted one runs
    assert [s.outcomes[0]["reported"] for s in snap.series] == [5]
    snap = book.snapshot([series("web", 4)], None)      # still counted on top
    assert [s.outcomes[0]["reported"] for s in snap.series] == [7]
    assert snap.traced == 1


def test_kernel_drops_never_go_down():
    book = Book()
    book.close_tracer({"rings": {"events": 10, "lost": 1, "kernel_dropped": 4}})
    snap = book.snapshot([], None)
    assert (snap.events, snap.ring_lost, snap.kernel_dropped) == (10, 1, 4)


def test_collector_families_and_cumulative_buckets():
    snap = Snapshot([series("web", 3)], events=9, ring_lost=0, kernel_dropped=0, traced=1, table_fill=0.5)
    fams = {f.name: f for f in Collector(lambda: snap, hops=False, end_at_queue=True).collect()}
    assert set(fams) == {"mace_build_info", "mace_container_latency_seconds", "mace_packets",
                         "mace_events", "mace_ring_lost", "mace_kernel_dropped",
                         "mace_containers_traced", "mace_table_fill_ratio"}
    buckets = [s for s in fams["mace_container_latency_seconds"].samples
               if s.name.endswith("_bucket") and s.labels["direction"] == "egress"]
    assert [s.value for s in buckets] == [3] * 17 and buckets[-1].labels["le"] == "+Inf"
    assert buckets[0].labels["le"] == "1e-06"

"""mace.service.metrics without a kernel: the address option, and what a scrape shows of
containers that come, go and come back (no privileges needed)."""

from __future__ import annotations

import pytest

from mace.errors import UsageError
from mace.service.metrics import (
    BOUNDS_NS,
    GRACE,
    GRACE_ENV,
    Book,
    Collector,
    Series,
    Snapshot,
    grace_from_env,
    make_app,
    parse_address,
)


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


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def names(snap: Snapshot) -> list[str]:
    return [s.labels[0] for s in snap.series]


def test_a_gone_container_stays_its_grace_then_leaves_with_the_scrape_that_serves_it():
    clock = Clock()
    book = Book(grace=120, clock=clock)
    book.retire(series("web", 3))
    for _ in range(5):                      # scrapes within the grace: still there, frozen
        clock.now += 20
        snap = book.snapshot([], None)
        assert names(snap) == ["web"] and snap.series[0].outcomes[0]["reported"] == 3
    clock.now += 20                         # 120 s: served once more, then gone
    assert names(book.snapshot([], None)) == ["web"]
    assert names(book.snapshot([], None)) == []


def test_a_gone_container_no_scrape_has_served_waits_for_one():
    clock = Clock()
    book = Book(grace=120, clock=clock)
    book.retire(series("web", 3))
    clock.now += 3600                       # no scraper for an hour
    assert names(book.snapshot([], None)) == ["web"]
    assert names(book.snapshot([], None)) == []


def test_zero_grace_serves_a_gone_container_once():
    book = Book(grace=0, clock=Clock())
    book.retire(series("web", 3))
    assert names(book.snapshot([], None)) == ["web"]
    assert names(book.snapshot([], None)) == []


def test_gone_again_its_new_last_values_get_a_grace_of_their_own():
    clock = Clock()
    book = Book(grace=120, clock=clock)
    book.retire(series("web", 3))
    clock.now += 100
    book.snapshot([], None)
    book.retire(series("web", 2))           # a later incarnation under the same names went
    clock.now += 100                        # 200 s after the first, 100 after the second
    snap = book.snapshot([], None)
    assert names(snap) == ["web"] and snap.series[0].outcomes[0]["reported"] == 5
    clock.now += 20
    assert names(book.snapshot([], None)) == ["web"]
    assert names(book.snapshot([], None)) == []


def test_gone_containers_are_bounded_oldest_first():
    clock = Clock()
    book = Book(grace=120, limit=2, clock=clock)
    for name in ("a", "b", "c"):
        book.retire(series(name, 1))
        clock.now += 1
    assert sorted(names(book.snapshot([], None))) == ["b", "c"]


def test_grace_from_the_environment():
    assert grace_from_env({}) == GRACE == 120
    assert grace_from_env({GRACE_ENV: " 2.5 "}) == 2.5
    assert grace_from_env({GRACE_ENV: "0"}) == 0
    for bad in ("-1", "soon", "inf", "nan"):
        with pytest.raises(UsageError, match=GRACE_ENV):
            grace_from_env({GRACE_ENV: bad})


def _get(app, path: str, method: str = "GET") -> tuple[str, bytes]:
    from wsgiref.util import setup_testing_defaults

    environ = {"PATH_INFO": path, "REQUEST_METHOD": method}
    setup_testing_defaults(environ)
    got = []
    body = b"".join(app(environ, lambda status, headers: got.append(status)))
    return got[0], body


def test_probes_ask_healthz_which_takes_no_snapshot():
    """/healthz answers from health() alone: only a scrape of /metrics takes a snapshot,
    so a probe cannot serve (and end) a gone container's series."""
    from prometheus_client import CollectorRegistry

    clock = Clock()
    book = Book(grace=0, clock=clock)
    book.retire(series("web", 3))
    taken = []

    def snapshot():
        taken.append(1)
        return book.snapshot([], None)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(snapshot, hops=False, end_at_queue=True))
    healthy = [True]
    app = make_app(registry, lambda: (healthy[0], "ok" if healthy[0] else "starting"))
    for _ in range(3):
        assert _get(app, "/healthz") == ("200 OK", b"ok\n")
    healthy[0] = False
    assert _get(app, "/healthz") == ("503 Service Unavailable", b"starting\n")
    for path in ("/", "/favicon.ico", "/metrics/x"):
        status, _ = _get(app, path)
        assert status.startswith("404"), path
    assert _get(app, "/healthz", "POST")[0].startswith("405")
    assert taken == []
    status, body = _get(app, "/metrics")
    assert status == "200 OK" and b'mace_packets_total{container="web"' in body
    assert taken == [1]
    assert b'container="web"' not in _get(app, "/metrics")[1]


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

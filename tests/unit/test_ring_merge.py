"""Merging several per-CPU rings into one time-ordered stream (mace.capture._ring.Rings), checked by
hand on small cases and against mace.testing.reference on random ring images (hypothesis)."""

from __future__ import annotations

import struct
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mace.capture._ring import DEV_NONE, DEV_OTHER, Rings
from mace.capture.perf import Event
from mace.testing.reference import ReferenceDecoder, merge
from mace.testing.synthetic import (
    PAGE,
    RAW_AT,
    NetEvent,
    RingImage,
    builtin_format,
    builtin_layout,
    lost,
    other,
    sample,
    throttle,
)

XMIT = "net:net_dev_start_xmit"
RECV = "net:netif_receive_skb"
RX = "net:netif_rx"
QUEUE = "net:net_dev_queue"
KFREE = "skb:kfree_skb"
ALL = [XMIT, RECV, RX, QUEUE, KFREE]
DEVICES = ["eth0", "veth1", "br0"]


fmt = builtin_format
layout = builtin_layout


def encode(e: NetEvent) -> bytes:
    return e.encode()


def make_rings(cpus=(0, 1, 2), tps=ALL, devices=DEVICES, pages=1, **kw) -> Rings:
    rings = Rings(cpus=list(cpus), ring_pages=pages, reorder_ns=0, **kw)
    for tp in tps:
        rings.add_kind(**layout(tp))
    rings.set_devices(devices)
    return rings


def attach_all(rings: Rings, n: int, pages=1) -> list[RingImage]:
    imgs = []
    for i in range(n):
        img = RingImage(pages)
        rings.attach(i, img.buf)
        imgs.append(img)
    return imgs


def ev(ts: int, cpu: int, skb: int | None = None, tp: str = RECV, dev: str = "eth0") -> NetEvent:
    return NetEvent(tp, ts=ts, cpu=cpu, tid=100 + cpu, skb=ts if skb is None else skb, len=60, dev=dev)


def drain(rings: Rings, final=True, horizon=0) -> list[tuple]:
    n = rings.drain(final=final, horizon=horizon)
    out = rings.batch()
    assert len(out) == n
    return out


def keys(out) -> list[tuple[int, int]]:
    """(ts, skb) of each event: enough to identify the test's events."""
    return [(t[0], t[1]) for t in out]


# -- hand-made cases ------------------------------------------------------------------------


def test_interleaved_rings_are_merged_by_timestamp():
    rings = make_rings()
    imgs = attach_all(rings, 3)
    for cpu, img in enumerate(imgs):
        img.write(*(encode(ev(ts, cpu)) for ts in range(cpu + 1, 30, 3)))
    out = drain(rings)
    assert [t[0] for t in out] == list(range(1, 30))
    assert [t[4] for t in out] == [(ts - 1) % 3 for ts in range(1, 30)]
    assert [t[3] for t in out] == [100 + (ts - 1) % 3 for ts in range(1, 30)]


def test_ties_go_to_lower_ring_then_arrival_order():
    # ring order is the order of `cpus`, not the CPU number
    rings = make_rings(cpus=[7, 3, 0])
    imgs = attach_all(rings, 3)
    imgs[2].write(encode(ev(5, 0, skb=20)), encode(ev(5, 0, skb=21)), encode(ev(4, 0, skb=22)))
    imgs[0].write(encode(ev(5, 7, skb=0)), encode(ev(6, 7, skb=1)), encode(ev(5, 7, skb=2)))
    imgs[1].write(encode(ev(5, 3, skb=10)), encode(ev(5, 3, skb=11)))
    assert rings.cpu_list == [7, 3, 0]
    out = drain(rings)
    assert keys(out) == [(4, 22), (5, 0), (5, 2), (5, 10), (5, 11), (5, 20), (5, 21), (6, 1)]


def test_local_disorder_inside_one_ring():
    # cpu 0: a sample stamped at 20 is interrupted by a nested one stamped at 25, which
    # reserves ring space first; cpu 1 has events between the two.
    rings = make_rings(cpus=[0, 1])
    a, b = attach_all(rings, 2)
    a.write(encode(ev(10, 0)), encode(ev(25, 0)), encode(ev(20, 0)), encode(ev(40, 0)),
            encode(ev(30, 0)), encode(ev(29, 0)))
    b.write(encode(ev(21, 1)), encode(ev(22, 1)), encode(ev(26, 1)), encode(ev(35, 1)))
    out = drain(rings)
    assert [(t[0], t[4]) for t in out] == [(10, 0), (20, 0), (21, 1), (22, 1), (25, 0), (26, 1),
                                          (29, 0), (30, 0), (35, 1), (40, 0)]
    assert rings.stats()["late"] == 0


def test_horizon_releases_only_older_events():
    rings = make_rings()
    imgs = attach_all(rings, 3)
    imgs[0].write(*(encode(ev(t, 0)) for t in (10, 40, 35, 70)))
    imgs[1].write(*(encode(ev(t, 1)) for t in (20, 50)))
    imgs[2].write(*(encode(ev(t, 2)) for t in (30, 40, 90)))
    assert [t[0] for t in drain(rings, final=False, horizon=40)] == [10, 20, 30, 35, 40, 40]
    assert [r["pending"] for r in rings.ring_stats()] == [1, 1, 1]
    assert all(img.tail == img.head for img in imgs)
    # nothing new below the horizon: an equal horizon releases nothing
    assert drain(rings, final=False, horizon=40) == []
    assert [t[0] for t in drain(rings, final=False, horizon=69)] == [50]
    # new events merge with those kept back
    imgs[1].write(encode(ev(60, 1)), encode(ev(80, 1)))
    assert [(t[0], t[4]) for t in drain(rings, final=False, horizon=85)] == [(60, 1), (70, 0), (80, 1)]
    assert [t[0] for t in drain(rings)] == [90]
    s = rings.stats()
    assert (s["late"], s["pending"], s["drained"], s["samples"]) == (0, 0, 11, 11)


def test_horizon_ties_are_released_together():
    rings = make_rings()
    imgs = attach_all(rings, 3)
    for cpu, img in enumerate(imgs):
        img.write(encode(ev(7, cpu, skb=cpu)), encode(ev(8, cpu, skb=10 + cpu)))
    assert keys(drain(rings, final=False, horizon=7)) == [(7, 0), (7, 1), (7, 2)]
    assert keys(drain(rings)) == [(8, 10), (8, 11), (8, 12)]


def test_default_horizon_waits_reorder_ns():
    # without an explicit horizon a drain releases what is older than now - reorder_ns
    # (CLOCK_MONOTONIC, the clock perf stamps samples with)
    rings = Rings(cpus=[0, 1], ring_pages=1, reorder_ns=1_000_000_000)
    rings.add_kind(**layout(RECV))
    a, b = attach_all(rings, 2)
    now = time.monotonic_ns()
    a.write(encode(ev(now - 5_000_000_000, 0)), encode(ev(now - 1_000_000, 0)))
    b.write(encode(ev(now - 4_000_000_000, 1)), encode(ev(now + 3_600_000_000_000, 1)))
    assert [t[0] for t in drain(rings, final=False)] == [now - 5_000_000_000, now - 4_000_000_000]
    assert rings.stats()["pending"] == 2
    assert [t[0] for t in drain(rings, final=True)] == [now - 1_000_000, now + 3_600_000_000_000]


def test_late_event_is_counted_and_delivered():
    rings = make_rings()
    imgs = attach_all(rings, 3)
    imgs[0].write(encode(ev(10, 0)), encode(ev(40, 0)))
    imgs[1].write(encode(ev(20, 1)))
    assert [t[0] for t in drain(rings, final=False, horizon=45)] == [10, 20, 40]
    # cpu 2 publishes an event stamped before what was released; another stamped exactly at
    # the newest release, which is not late
    imgs[2].write(encode(ev(30, 2)), encode(ev(40, 2, skb=99)), encode(ev(50, 2)))
    imgs[1].write(encode(ev(5, 1)))
    out = drain(rings, final=False, horizon=45)
    assert keys(out) == [(5, 5), (30, 30), (40, 99)]
    assert [r["late"] for r in rings.ring_stats()] == [0, 1, 1]
    assert rings.stats()["late"] == 2
    assert keys(drain(rings)) == [(50, 50)]
    assert rings.stats()["samples"] == 7


def test_unattached_rings_are_skipped():
    rings = make_rings(cpus=[0, 1, 2])
    img0 = RingImage(1)
    img2 = RingImage(2)
    rings.attach(0, img0.buf)
    rings.attach(2, img2.buf)
    img0.write(encode(ev(3, 0)))
    img2.write(encode(ev(1, 2)), encode(ev(2, 2)))
    assert keys(drain(rings)) == [(1, 1), (2, 2), (3, 3)]
    assert [r["records"] for r in rings.ring_stats()] == [1, 0, 2]


def test_forced_release_across_rings():
    rings = make_rings(cpus=[0, 1], stage_cap=2)
    a, b = attach_all(rings, 2)
    a.write(*(encode(ev(t, 0)) for t in (10, 20, 30, 40)))
    b.write(*(encode(ev(t, 1)) for t in (15, 25, 35, 45)))
    assert [t[0] for t in drain(rings, final=False, horizon=1)] == [10, 15, 20, 25]
    assert rings.more
    assert drain(rings, final=False, horizon=1) == []
    assert not rings.more
    assert [t[0] for t in drain(rings)] == [30, 35, 40, 45]
    assert [(r["forced"], r["late"]) for r in rings.ring_stats()] == [(1, 0), (1, 0)]


def test_forced_release_makes_older_events_late_but_loses_none():
    # ring 0's stage fills with recent events; releasing them early makes an older event
    # that ring 1 has not yet staged late
    rings = make_rings(cpus=[0, 1], stage_cap=2)
    a, b = attach_all(rings, 2)
    a.write(*(encode(ev(t, 0)) for t in (100, 110, 120)))
    b.write(*(encode(ev(t, 1)) for t in (1, 2, 3)))
    out = []
    while True:
        out += drain(rings, final=True)
        if not rings.more:
            break
    assert sorted(t[0] for t in out) == [1, 2, 3, 100, 110, 120]
    assert keys(out) == [(1, 1), (2, 2), (100, 100), (110, 110), (3, 3), (120, 120)]
    s = rings.stats()
    assert s["late"] == 1 and s["forced"] == 2 and s["drained"] == 6


def test_counters_are_kept_per_ring():
    rings = make_rings()
    imgs = attach_all(rings, 3)
    imgs[0].write(lost(3), encode(ev(1, 0)))
    imgs[1].write(throttle(), throttle(unthrottle=True), other(42))
    imgs[2].write(encode(ev(2, 2, tp=KFREE)), struct.pack("<IHH", 9, 0, 0) + bytes(8))
    assert keys(drain(rings)) == [(1, 1), (2, 2)]
    per = [{k: r[k] for k in ("records", "samples", "lost", "throttled", "unknown", "errors")}
           for r in rings.ring_stats()]
    assert per == [dict(records=2, samples=1, lost=3, throttled=0, unknown=0, errors=0),
                   dict(records=3, samples=0, lost=0, throttled=2, unknown=1, errors=0),
                   dict(records=1, samples=1, lost=0, throttled=0, unknown=0, errors=1)]
    assert drain(rings) == [] and rings.stats()["errors"] == 1


def test_dev_values_after_merge():
    rings = make_rings(cpus=[0, 1])
    a, b = attach_all(rings, 2)
    a.write(encode(ev(1, 0, dev="br0")), encode(ev(3, 0, tp=KFREE)))
    b.write(encode(ev(2, 1, dev="lo")), encode(ev(4, 1, tp=XMIT, dev="veth1")))
    assert [(t[0], t[5], t[7]) for t in drain(rings)] == [(1, 1, 2), (2, 1, DEV_OTHER), (3, 4, DEV_NONE),
                                                          (4, 0, 1)]


# -- property tests against the reference ---------------------------------------------------

DEV_POOL = ["eth0", "veth1", "br0", "eth1", "docker0", "", "abcdefghijklmno", "abcdefghijklmnop", None]
CHECKED = ("records", "samples", "lost", "throttled", "unknown", "errors")

timestamps = st.one_of(st.integers(1, 40), st.integers(1, 2**64 - 1))

@st.composite
def net_events(draw) -> NetEvent:
    # Fields the merge does not look at come from one wide integer: hypothesis spends most of
    # its time per draw, and the suite must stay fast.
    tp = draw(st.sampled_from(ALL))
    ts = draw(timestamps)
    dev = draw(st.sampled_from(DEV_POOL))
    bits = draw(st.integers(0, 2**160 - 1))
    return NetEvent(tp, ts=ts, dev=dev, skb=bits & (2**64 - 1), len=(bits >> 64) & 0xFFFFFFFF,
                    tid=(bits >> 96) & 0xFFFFFFFF, cpu=(bits >> 128) & 0xFFFF,
                    flags=(bits >> 144) & 0xFF,
                    protocol=None if (bits >> 152) & 1 else (bits >> 136) & 0xFFFF)


extras = st.one_of(
    st.builds(lost, st.integers(0, 2**40)),
    st.builds(throttle, st.booleans()),
    st.builds(other, st.sampled_from([1, 3, 4, 7, 10, 11, 100, 0xFFFF]), st.binary(max_size=24)),
)

items = st.one_of(net_events().map(encode), net_events().map(encode), net_events().map(encode), extras)

FMT_BY_ID = {fmt(tp).id: fmt(tp) for tp in ALL}
CORRUPTIONS = ["name-loc", "name-len", "raw-size-huge", "raw-size-small", "size-0", "size-odd",
               "size-huge", "truncated-raw"]


def corrupt(rec: bytes, how: str) -> bytes:
    """A sample made malformed in one of the ways the decoder must survive."""
    b = bytearray(rec)
    f = FMT_BY_ID[struct.unpack_from("<H", rec, RAW_AT)[0]]
    if how in ("name-loc", "name-len") and "name" in f.fields:
        at = RAW_AT + f.fields["name"].offset
        loc = struct.unpack_from("<I", b, at)[0]
        loc = (loc & 0xFFFF0000) | 0x1000 if how == "name-loc" else (loc & 0xFFFF) | (0x200 << 16)
        struct.pack_into("<I", b, at, loc)
    elif how == "raw-size-huge":
        struct.pack_into("<I", b, RAW_AT - 4, 0xFFFFFFF0)
    elif how == "raw-size-small":
        struct.pack_into("<I", b, RAW_AT - 4, 4)
    elif how == "size-0":
        struct.pack_into("<H", b, 6, 0)
    elif how == "size-odd":
        struct.pack_into("<H", b, 6, len(rec) - 4)
    elif how == "size-huge":
        struct.pack_into("<H", b, 6, 0xFFF8)
    elif how == "truncated-raw":
        ts, = struct.unpack_from("<Q", rec, 8)
        tid, = struct.unpack_from("<i", rec, RAW_AT + 4)
        return sample(ts, 0, tid, rec[RAW_AT:RAW_AT + 12])   # tp id kept, fields cut off
    return bytes(b)


malformed = st.builds(corrupt, net_events().map(encode), st.sampled_from(CORRUPTIONS))


@st.composite
def ring_setups(draw):
    """A list of rings, each (pages, start offset, records), and the tracepoints to register."""
    nrings = draw(st.integers(1, 4))
    rings = []
    for _ in range(nrings):
        pages = draw(st.sampled_from([1, 2, 4]))
        size = pages * PAGE
        lap = draw(st.integers(0, 3))
        start = lap * size + draw(st.integers(0, size // 8 - 1)) * 8
        if draw(st.booleans()):      # often start near the end, so a record wraps
            start = lap * size + size - draw(st.integers(1, 30)) * 8
        n = draw(st.integers(0, 40))
        recs = draw(st.lists(items, min_size=n, max_size=n))
        if draw(st.integers(0, 3)) == 0:     # sometimes one malformed record somewhere
            recs.insert(draw(st.integers(0, len(recs))), draw(malformed))
        rings.append((pages, start, recs))
    tps = draw(st.one_of(st.just(ALL), st.permutations(ALL).flatmap(
        lambda p: st.integers(1, len(p)).map(lambda n: p[:n]))))
    devices = draw(st.sampled_from([DEVICES, [], ["abcdefghijklmno", "eth1", "eth0"]]))
    return rings, list(tps), devices


def build(setup) -> tuple[Rings, list[RingImage]]:
    ring_list, tps, devices = setup
    rings = make_rings(cpus=range(len(ring_list)), tps=tps, devices=devices,
                       pages=max(p for p, _, _ in ring_list))
    imgs = []
    for i, (pages, start, recs) in enumerate(ring_list):
        img = RingImage(pages)
        img.start_at(start)
        img.write(*recs)             # as many as fit, like the kernel
        rings.attach(i, img.buf)
        imgs.append(img)
    return rings, imgs


def reference(setup, imgs):
    _, tps, devices = setup
    dec = ReferenceDecoder([layout(tp) for tp in tps], devices)
    per_ring, counters = [], dict.fromkeys(CHECKED, 0)
    for cpu, img in enumerate(imgs):
        events, c = dec.decode(img.data(), cpu)
        per_ring.append(events)
        for k in CHECKED:
            counters[k] += getattr(c, k)
    return per_ring, counters


PROPERTY = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@PROPERTY
@given(ring_setups())
def test_final_drain_matches_reference(setup):
    rings, imgs = build(setup)
    per_ring, counters = reference(setup, imgs)
    expected, kept = merge(per_ring)
    assert kept == [[] for _ in per_ring]
    got = [Event(*t) for t in drain(rings)]
    assert got == expected
    s = rings.stats()
    assert {k: s[k] for k in CHECKED} == counters
    assert (s["late"], s["pending"], s["forced"], s["drained"]) == (0, 0, 0, len(expected))
    assert not rings.more
    assert all(img.tail == img.head for img in imgs)


@PROPERTY
@given(ring_setups(), st.one_of(st.integers(1, 45), st.integers(1, 2**64 - 1)))
def test_split_drain_matches_reference(setup, horizon):
    rings, imgs = build(setup)
    per_ring, counters = reference(setup, imgs)
    expected, _ = merge(per_ring)
    first_ref, kept = merge(per_ring, horizon)
    first = [Event(*t) for t in drain(rings, final=False, horizon=horizon)]
    assert first == first_ref
    assert [r["pending"] for r in rings.ring_stats()] == [len(k) for k in kept]
    second = [Event(*t) for t in drain(rings)]
    assert first + second == expected
    assert second == [e for e in expected if e.ts > horizon]
    s = rings.stats()
    assert {k: s[k] for k in CHECKED} == counters
    assert (s["late"], s["pending"], s["drained"]) == (0, 0, len(expected))


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(ring_setups(), st.integers(1, 6))
def test_tiny_stage_loses_nothing(setup, cap):
    _, imgs = build(setup)
    # a second reader with a tiny stage over the same images
    ring_list, tps, devices = setup
    small = make_rings(cpus=range(len(ring_list)), tps=tps, devices=devices, stage_cap=cap)
    per_ring, counters = reference(setup, imgs)
    for i, img in enumerate(imgs):
        small.attach(i, img.buf)
    out = []
    for _ in range(10_000):
        n = small.drain(final=True)
        batch = small.batch()
        assert len(batch) == n
        # every batch is in global time order; across forced batches order may break (late)
        assert [t[0] for t in batch] == sorted(t[0] for t in batch)
        out += batch
        if not small.more:
            break
    assert not small.more
    expected, _ = merge(per_ring)
    assert sorted(Event(*t) for t in out) == sorted(expected)
    s = small.stats()
    assert {k: s[k] for k in CHECKED} == counters
    assert s["pending"] == 0 and s["drained"] == len(expected)

"""Decoding synthetic perf ring images with mace.capture._ring.Rings (no privileges needed)."""

from __future__ import annotations

import struct

import pytest

from mace.capture._ring import DEV_NONE, DEV_OTHER, EVENT_SIZE, RECORD_FORMAT, EventSink, Rings
from mace.capture.perf import Event
from mace.testing.reference import ReferenceDecoder
from mace.testing.synthetic import (
    PAGE,
    PERF_RECORD_SAMPLE,
    RAW_AT,
    NetEvent,
    RingImage,
    builtin_format,
    builtin_layout,
    lost,
    other,
    raw_record,
    sample,
    throttle,
)

XMIT = "net:net_dev_start_xmit"
RECV = "net:netif_receive_skb"
RX = "net:netif_rx"
QUEUE = "net:net_dev_queue"
KFREE = "skb:kfree_skb"
CONSUME = "skb:consume_skb"
ALL = [XMIT, RECV, RX, QUEUE, KFREE]
DEVICES = ["eth0", "veth1", "br-lan", "wg0"]


fmt = builtin_format
layout = builtin_layout


def make_rings(tps=ALL, devices=DEVICES, cpus=(0,), pages=1, **kw) -> Rings:
    rings = Rings(cpus=list(cpus), ring_pages=pages, reorder_ns=0, **kw)
    for i, tp in enumerate(tps):
        assert rings.add_kind(**layout(tp)) == i
    rings.set_devices(devices)
    return rings


def attach(rings: Rings, pages=1, ring=0, start=None) -> RingImage:
    img = RingImage(pages)
    if start is not None:
        img.start_at(start)
    rings.attach(ring, img.buf)
    return img


def expect(e: NetEvent, tps=ALL, devices=DEVICES) -> tuple:
    """The batch tuple Rings should produce for `e`."""
    f = fmt(e.tracepoint)
    if "name" not in f.fields:
        dev = DEV_NONE
    else:
        dev = devices.index(e.dev) if e.dev in devices else DEV_OTHER
    return (e.ts, e.skb if "skbaddr" in f.fields else 0, e.len if "len" in f.fields else 0,
            e.tid, e.cpu, tps.index(e.tracepoint), e.flags, dev,
            (e.protocol or 0) if "protocol" in f.fields else 0)


def drain_all(rings: Rings, final=True, horizon=0) -> list[tuple]:
    n = rings.drain(final=final, horizon=horizon)
    out = rings.batch()
    assert len(out) == n
    return out


def stats(rings: Rings, *keys: str) -> tuple:
    s = rings.stats()
    return tuple(s[k] for k in keys)


def with_header(rec: bytes, *, size: int | None = None, rtype: int | None = None) -> bytes:
    """`rec` with its perf_event_header's size and/or type replaced (length unchanged)."""
    t, misc, sz = struct.unpack_from("<IHH", rec)
    return struct.pack("<IHH", t if rtype is None else rtype, misc, sz if size is None else size) + rec[8:]


def patch_u32(rec: bytes, at: int, value: int) -> bytes:
    b = bytearray(rec)
    struct.pack_into("<I", b, at, value)
    return bytes(b)


SAMPLES = [
    NetEvent(XMIT, ts=1000, cpu=0, tid=4242, skb=0xFFFF888012345600, len=1514, dev="eth0", protocol=0x0800, flags=0x08),
    NetEvent(RECV, ts=1010, cpu=0, tid=0, skb=0xFFFF888012345700, len=98, dev="veth1"),
    NetEvent(RX, ts=1020, cpu=0, tid=7, skb=0xFFFF888012345800, len=60, dev="br-lan", flags=0x10),
    NetEvent(QUEUE, ts=1030, cpu=0, tid=99, skb=0xFFFF888012345900, len=4096, dev="wg0"),
    NetEvent(KFREE, ts=1040, cpu=0, tid=1, skb=0xFFFF888012345A00, protocol=0x86DD),
    NetEvent(XMIT, ts=1050, cpu=0, tid=2, skb=0xFFFF888012345B00, len=66, dev="docker0", protocol=0x0806),
]


# -- ordinary samples ----------------------------------------------------------------------


def test_constants():
    assert EVENT_SIZE == 32 == struct.calcsize(RECORD_FORMAT)
    assert (DEV_NONE, DEV_OTHER) == (-1, -2)


def test_samples_of_several_tracepoints():
    rings = make_rings()
    img = attach(rings)
    assert img.write(*(e.encode() for e in SAMPLES)) == len(SAMPLES)
    assert drain_all(rings) == [expect(e) for e in SAMPLES]
    assert not rings.more
    s = rings.stats()
    assert s == dict(records=6, samples=6, lost=0, throttled=0, unknown=0, errors=0, late=0,
                     forced=0, cut=0, straddled=0, pending=0, drained=6, inexact=0)
    assert img.tail == img.head
    # batch_bytes carries the same events, packed
    raw = rings.batch_bytes()
    assert len(raw) == 6 * EVENT_SIZE
    assert list(struct.iter_unpack(RECORD_FORMAT, raw)) == [expect(e) for e in SAMPLES]
    # a second drain finds nothing new
    assert drain_all(rings) == []
    assert rings.stats()["records"] == 6


def test_decoded_fields_match_reference_decoder():
    rings = make_rings()
    img = attach(rings)
    img.write(*(e.encode() for e in SAMPLES))
    ref_events, ref_c = ReferenceDecoder([layout(tp) for tp in ALL], DEVICES).decode(img.data())
    assert [Event(*t) for t in drain_all(rings)] == ref_events
    assert stats(rings, "records", "samples", "errors") == (ref_c.records, ref_c.samples, ref_c.errors)


def test_header_fields_tid_cpu_flags():
    rings = make_rings(cpus=(300,))
    img = attach(rings)
    e = NetEvent(RECV, ts=2**63 + 5, cpu=300, tid=2**32 - 1, skb=2**64 - 1, len=2**32 - 1,
                 dev="eth0", flags=0xFF)
    img.write(e.encode())
    assert drain_all(rings) == [(2**63 + 5, 2**64 - 1, 2**32 - 1, 2**32 - 1, 300, 1, 0xFF, 0, 0)]


def test_thread_is_the_common_pid_and_cpu_the_rings():
    # mace asks for TIME|RAW only: the record's common header names the thread, and a ring
    # holds one CPU's events, so neither PERF_SAMPLE_TID nor PERF_SAMPLE_CPU is paid for
    rings = make_rings(cpus=(5, 3))
    img = attach(rings, ring=1)
    raw = raw_record(fmt(RECV), dict(skbaddr=1, len=2, name="eth0"), pid=555)
    rec = sample(10, 0, 77, raw)
    assert struct.unpack_from("<i", rec, RAW_AT + 4)[0] == 77        # nothing else carries it
    img.write(rec)
    (ev,) = drain_all(rings)
    assert ev[3] == 77 and ev[4] == 3


def test_samples_arrive_sorted_within_a_ring():
    rings = make_rings()
    img = attach(rings)
    evs = [NetEvent(RECV, ts=t, skb=i, dev="eth0") for i, t in enumerate([50, 10, 40, 40, 20, 60, 10])]
    img.write(*(e.encode() for e in evs))
    out = drain_all(rings)
    # stable sort: equal timestamps keep arrival order (skb 2 before 3, 1 before 6)
    assert [(t[0], t[1]) for t in out] == [(10, 1), (10, 6), (20, 4), (40, 2), (40, 3), (50, 0), (60, 5)]


# -- records that wrap around the end of the data area --------------------------------------


@pytest.mark.parametrize("pages", [1, 2])
@pytest.mark.parametrize("e", [SAMPLES[0], SAMPLES[1], SAMPLES[4]], ids=["xmit", "recv", "kfree"])
def test_record_split_across_wrap(e, pages):
    rec = e.encode()
    assert len(rec) % 8 == 0
    before = NetEvent(RX, ts=e.ts - 1, skb=1, len=11, dev="wg0")
    after = NetEvent(QUEUE, ts=e.ts + 1, skb=2, len=22, dev="veth1")
    size = pages * PAGE
    for lap in (0, 3):                        # positions beyond the first lap are masked too
        for k in range(0, len(rec) + 8, 8):   # k bytes of the record before the wrap point
            rings = make_rings(pages=pages)
            img = attach(rings, pages=pages, start=lap * size + size - len(before.encode()) - k)
            assert img.write(before.encode(), rec, after.encode()) == 3
            assert drain_all(rings) == [expect(before), expect(e), expect(after)], (lap, k)
            assert stats(rings, "records", "samples", "errors") == (3, 3, 0)
            assert img.tail == img.head


def test_non_sample_records_split_across_wrap():
    for rec, key, value in [(lost(9), "lost", 9), (throttle(), "throttled", 1),
                            (other(77, b"x" * 40), "unknown", 1)]:
        for k in range(8, len(rec), 8):
            rings = make_rings()
            img = attach(rings, start=PAGE - k)
            e = NetEvent(RECV, ts=5, skb=3, dev="eth0")
            img.write(rec, e.encode())
            assert drain_all(rings) == [expect(e)]
            assert rings.stats()[key] == value and rings.stats()["errors"] == 0


def test_record_filling_the_whole_ring_wraps():
    # one record exactly as large as the data area, starting in the middle
    rings = make_rings()
    img = attach(rings, start=PAGE // 2)
    raw = raw_record(fmt(RECV), dict(skbaddr=0xABC, len=5, name="veth1"))
    raw += bytes(PAGE - RAW_AT - len(raw))
    rec = sample(123, 0, 9, raw)
    assert len(rec) == PAGE
    assert img.write(rec) == 1
    assert drain_all(rings) == [(123, 0xABC, 5, 9, 0, 1, 0, 1, 0)]


# -- LOST, THROTTLE, unknown ----------------------------------------------------------------


def test_lost_records_add_to_lost():
    rings = make_rings()
    img = attach(rings)
    e1, e2 = SAMPLES[0], SAMPLES[1]
    img.write(e1.encode(), lost(5), lost(7, ident=3), e2.encode(), lost(2**40))
    assert drain_all(rings) == [expect(e1), expect(e2)]
    assert stats(rings, "records", "samples", "lost", "errors") == (5, 2, 5 + 7 + 2**40, 0)


def test_short_lost_record_is_an_error_but_reading_goes_on():
    rings = make_rings()
    img = attach(rings)
    img.write(other(2, b"12345678"), SAMPLES[1].encode())      # LOST of 16 bytes: no count
    assert drain_all(rings) == [expect(SAMPLES[1])]
    assert stats(rings, "records", "lost", "errors", "samples") == (2, 0, 1, 1)


def test_throttle_and_unthrottle_are_counted():
    rings = make_rings()
    img = attach(rings)
    img.write(throttle(), SAMPLES[0].encode(), throttle(unthrottle=True), throttle(), SAMPLES[1].encode())
    assert drain_all(rings) == [expect(SAMPLES[0]), expect(SAMPLES[1])]
    assert stats(rings, "records", "samples", "throttled", "unknown", "errors") == (5, 2, 3, 0, 0)


def test_unknown_record_types_are_counted():
    rings = make_rings()
    img = attach(rings)
    img.write(other(3), other(99, b"payload!"), SAMPLES[2].encode(), other(0xFFFF, bytes(100)))
    assert drain_all(rings) == [expect(SAMPLES[2])]
    assert stats(rings, "records", "samples", "unknown", "errors") == (4, 1, 3, 0)


def test_samples_of_unregistered_tracepoints_are_unknown():
    rings = make_rings(tps=[XMIT, RECV])
    img = attach(rings)
    e_ok = NetEvent(RECV, ts=3, skb=1, dev="eth0")
    img.write(NetEvent(KFREE, ts=1, skb=9).encode(), NetEvent(CONSUME, ts=2, skb=8).encode(),
              NetEvent(RX, ts=4, skb=7, dev="eth0").encode(), e_ok.encode())
    assert drain_all(rings) == [expect(e_ok, tps=[XMIT, RECV])]
    assert stats(rings, "records", "samples", "unknown", "errors") == (4, 1, 3, 0)


def test_rings_without_kinds_count_everything_unknown():
    rings = make_rings(tps=[])
    img = attach(rings)
    img.write(*(e.encode() for e in SAMPLES))
    assert drain_all(rings) == []
    assert stats(rings, "records", "samples", "unknown") == (6, 0, 6)


# -- malformed records ----------------------------------------------------------------------


def _short_sample() -> bytes:
    # a 40-byte sample: too short to hold a raw block of 8 bytes
    return struct.pack("<IHH", PERF_RECORD_SAMPLE, 0, 40) + bytes(32)


MALFORMED = {
    "size-0": with_header(SAMPLES[3].encode(), size=0),
    "size-not-multiple-of-8": with_header(SAMPLES[3].encode(), size=len(SAMPLES[3].encode()) - 4),
    "size-4": with_header(bytes(16), size=4, rtype=PERF_RECORD_SAMPLE),
    "size-past-head": with_header(SAMPLES[3].encode(), size=0xFFF8),
    "raw-size-past-record-end": patch_u32(SAMPLES[3].encode(), RAW_AT - 4, len(SAMPLES[3].encode()) - RAW_AT + 4),
    "raw-size-huge": patch_u32(SAMPLES[3].encode(), RAW_AT - 4, 0xFFFFFFFF),
    "raw-size-below-8": patch_u32(SAMPLES[3].encode(), RAW_AT - 4, 4),
    "sample-too-short": _short_sample(),
}


@pytest.mark.parametrize("bad", list(MALFORMED), ids=list(MALFORMED))
@pytest.mark.parametrize("start", [0, PAGE - 64])
def test_malformed_record_stops_the_ring(bad, start):
    rings = make_rings()
    img = attach(rings, start=start)
    first, hidden, later = SAMPLES[0], SAMPLES[1], SAMPLES[2]
    assert img.write(first.encode(), MALFORMED[bad], hidden.encode(), lost(4)) == 4
    # the good record before it is delivered; nothing after it is read
    assert drain_all(rings) == [expect(first)]
    s = rings.stats()
    assert s["errors"] == 1 and s["samples"] == 1 and s["lost"] == 0
    assert img.tail == img.head                # the broken rest was skipped
    # records written afterwards are read normally
    img.write(later.encode(), throttle())
    assert drain_all(rings) == [expect(later)]
    s = rings.stats()
    assert (s["errors"], s["samples"], s["throttled"]) == (1, 2, 1)
    assert img.tail == img.head


@pytest.mark.parametrize("bad", list(MALFORMED), ids=list(MALFORMED))
def test_malformed_record_matches_reference(bad):
    rings = make_rings()
    img = attach(rings)
    img.write(SAMPLES[0].encode(), MALFORMED[bad], SAMPLES[1].encode())
    ref_events, c = ReferenceDecoder([layout(tp) for tp in ALL], DEVICES).decode(img.data())
    assert [Event(*t) for t in drain_all(rings)] == ref_events
    assert stats(rings, "records", "samples", "lost", "throttled", "unknown", "errors") == (
        c.records, c.samples, c.lost, c.throttled, c.unknown, c.errors)


@pytest.mark.parametrize("start", [0, PAGE - 8, PAGE - 48])
def test_record_claiming_just_past_head(start):
    rings = make_rings()
    img = attach(rings, start=start)
    good, bad = SAMPLES[0].encode(), SAMPLES[1].encode()
    img.write(good, with_header(bad, size=len(bad) + 8))       # 8 bytes more than published
    assert drain_all(rings) == [expect(SAMPLES[0])]
    assert stats(rings, "records", "errors") == (1, 1) and img.tail == img.head
    img.write(bad)
    assert drain_all(rings) == [expect(SAMPLES[1])]
    assert stats(rings, "records", "errors") == (2, 1)


def test_malformed_record_in_one_ring_leaves_other_rings_alone():
    rings = make_rings(cpus=[0, 1])
    img0, img1 = attach(rings, ring=0), attach(rings, ring=1)
    e0, e1, e2 = (NetEvent(RECV, ts=t, cpu=c, skb=t, dev="eth0") for t, c in [(1, 0), (2, 1), (3, 1)])
    img0.write(MALFORMED["size-0"], e0.encode())
    img1.write(e1.encode(), e2.encode())
    assert drain_all(rings) == [expect(e1), expect(e2)]
    assert [s["errors"] for s in rings.ring_stats()] == [1, 0]


def _name_loc(e: NetEvent, loc: int) -> bytes:
    """The sample of `e` with the __data_loc word of its name replaced."""
    return patch_u32(e.encode(), RAW_AT + fmt(e.tracepoint).fields["name"].offset, loc)


@pytest.mark.parametrize("loc", [
    (5 << 16) | 200,         # offset beyond the raw block
    (200 << 16) | 64,        # length beyond the raw block
    (0xFFFF << 16) | 0xFFFF,
    (8 << 16) | 70,          # ends just past the raw block of a 76-byte raw_size
], ids=["offset", "length", "both", "just-past"])
def test_name_outside_raw_block_skips_only_that_record(loc):
    rings = make_rings()
    img = attach(rings)
    bad = NetEvent(XMIT, ts=15, skb=0xBAD, len=1, dev="eth0")
    rec = _name_loc(bad, loc)
    assert struct.unpack_from("<I", rec, RAW_AT - 4)[0] == 76
    a, b = SAMPLES[0], SAMPLES[1]
    img.write(a.encode(), rec, b.encode(), lost(1))
    assert drain_all(rings) == [expect(a), expect(b)]
    assert stats(rings, "records", "samples", "errors", "lost") == (4, 2, 1, 1)


def test_name_ending_exactly_at_raw_block_end_is_decoded():
    rings = make_rings()
    img = attach(rings)
    e = NetEvent(XMIT, ts=15, skb=0x600D, len=1, dev="eth0")
    # raw_size is 76 (64 fixed + "eth0\0" + padding); the name may extend to byte 76
    img.write(_name_loc(e, (12 << 16) | 64))
    (ev,) = drain_all(rings)
    assert ev[7] == 0 and rings.stats()["errors"] == 0


def test_raw_block_shorter_than_the_layout_is_skipped():
    rings = make_rings()
    img = attach(rings)
    # a net_dev_start_xmit record whose raw block (20 bytes) cannot hold skbaddr/len/protocol
    raw = struct.pack("<HBBi", 2307, 0, 0, 1) + bytes(12)
    img.write(sample(1, 0, 1, raw), SAMPLES[1].encode())
    assert drain_all(rings) == [expect(SAMPLES[1])]
    assert stats(rings, "records", "samples", "errors") == (2, 1, 1)


# -- device names ---------------------------------------------------------------------------


def test_device_names_resolve_to_slots():
    devices = ["eth0", "veth1", "a" * 15, "x", "br-lan"]
    rings = make_rings(tps=[RECV, KFREE], devices=devices)
    img = attach(rings)
    names = devices + ["eth1", "eth", "veth10", "a" * 14, "b" * 15, "X", ""]
    evs = [NetEvent(RECV, ts=i, skb=i, dev=n) for i, n in enumerate(names)]
    evs.append(NetEvent(KFREE, ts=100, skb=100))
    img.write(*(e.encode() for e in evs))
    got = [t[7] for t in drain_all(rings)]
    assert got == [0, 1, 2, 3, 4] + [DEV_OTHER] * 7 + [DEV_NONE]
    assert rings.devices == devices
    for i, n in enumerate(devices):
        assert rings.device_slot(n) == i
    for n in ["eth1", "", "a" * 16, "a" * 40]:
        assert rings.device_slot(n) == DEV_OTHER


def test_sixteen_byte_name_without_nul_is_other():
    devices = ["abcdefghijklmno"]                 # 15 bytes: the longest valid name
    rings = make_rings(tps=[RECV], devices=devices)
    img = attach(rings)
    f = fmt(RECV)
    recs = [
        sample(1, 0, 1, raw_record(f, dict(skbaddr=1, len=1, name=b"abcdefghijklmno\0"))),  # slot 0
        sample(2, 0, 1, raw_record(f, dict(skbaddr=2, len=1, name=b"abcdefghijklmnop"))),  # 16, no NUL
        sample(3, 0, 1, raw_record(f, dict(skbaddr=3, len=1, name=b"abcdefghijklmnopq\0"))),
        sample(4, 0, 1, raw_record(f, dict(skbaddr=4, len=1, name=b"abcdefghijklmno"))),   # no NUL, 15
        sample(5, 0, 1, raw_record(f, dict(skbaddr=5, len=1, name=b""))),                  # empty
        sample(6, 0, 1, raw_record(f, dict(skbaddr=6, len=1, name=b"abcdefghijklmno\0junk"))),
    ]
    img.write(*recs)
    ref, _ = ReferenceDecoder([layout(RECV)], devices).decode(img.data())
    got = drain_all(rings)
    assert [t[7] for t in got] == [0, DEV_OTHER, DEV_OTHER, 0, DEV_OTHER, 0]
    assert [Event(*t) for t in got] == ref
    assert rings.stats()["errors"] == 0


def test_non_utf8_name_matches_reference():
    devices = ["eth\ufffd", "veth1"]
    rings = make_rings(tps=[RECV], devices=devices)
    img = attach(rings)
    f = fmt(RECV)
    img.write(sample(1, 0, 1, raw_record(f, dict(skbaddr=1, len=1, name=b"eth\xff\0"))),
              sample(2, 0, 1, raw_record(f, dict(skbaddr=2, len=1, name="eth\ufffd"))))
    ref, _ = ReferenceDecoder([layout(RECV)], devices).decode(img.data())
    got = drain_all(rings)
    assert [t[7] for t in got] == [DEV_OTHER, 0]      # byte-exact: 0xff is not U+FFFD
    assert [Event(*t) for t in got] == ref


def test_name_length_limits_the_lookup():
    # __data_loc length 3 over "eth0": the decoder sees "eth"
    rings = make_rings(tps=[RECV], devices=["eth0", "eth"])
    img = attach(rings)
    e = NetEvent(RECV, ts=1, skb=1, dev="eth0")
    rec = e.encode()
    loc = struct.unpack_from("<I", rec, RAW_AT + 20)[0]
    img.write(patch_u32(rec, RAW_AT + 20, (3 << 16) | (loc & 0xFFFF)), e.encode())
    assert [t[7] for t in drain_all(rings)] == [1, 0]


def test_events_without_name_field_are_dev_none():
    rings = make_rings(tps=[KFREE, CONSUME, "skb:skb_copy_datagram_iovec"])
    img = attach(rings)
    f = fmt("skb:skb_copy_datagram_iovec")
    img.write(NetEvent(KFREE, ts=1, skb=1, protocol=8).encode(), NetEvent(CONSUME, ts=2, skb=2).encode(),
              sample(3, 0, 1, raw_record(f, dict(skbaddr=3, len=-1))))
    assert drain_all(rings) == [(1, 1, 0, 1, 0, 0, 0, DEV_NONE, 8), (2, 2, 0, 1, 0, 1, 0, DEV_NONE, 0),
                                (3, 3, 0xFFFFFFFF, 1, 0, 2, 0, DEV_NONE, 0)]


def test_many_devices():
    devices = [f"veth{i:x}" for i in range(2000)]
    rings = make_rings(tps=[RECV], devices=devices)
    for i in range(0, 2000, 7):
        assert rings.device_slot(devices[i]) == i
    assert rings.device_slot("veth7d0") == DEV_OTHER      # 0x7d0 == 2000


def test_set_devices_accepts_bytes_and_replaces_table():
    rings = make_rings(tps=[RECV], devices=[b"eth0", "eth1"])
    assert rings.device_slot("eth0") == 0 and rings.device_slot("eth1") == 1
    rings.set_devices(["eth1"])
    assert rings.device_slot("eth0") == DEV_OTHER and rings.device_slot("eth1") == 0
    rings.set_devices([])
    assert rings.device_slot("eth1") == DEV_OTHER and rings.devices == []


@pytest.mark.parametrize("names", [
    ["eth0", "eth1", "eth0"],
    ["eth0", b"eth0"],
    ["a" * 16],
    ["ok", "b" * 20],
    [""],
    ["et\0h"],
], ids=["duplicate", "duplicate-bytes", "16-bytes", "too-long", "empty", "nul"])
def test_set_devices_rejects_bad_lists(names):
    rings = make_rings(tps=[RECV], devices=["keep0", "keep1"])
    with pytest.raises(ValueError):
        rings.set_devices(names)
    # the previous table is still in use
    assert rings.devices == ["keep0", "keep1"]
    assert rings.device_slot("keep1") == 1
    img = attach(rings)
    img.write(NetEvent(RECV, ts=1, dev="keep1").encode())
    assert drain_all(rings)[0][7] == 1


# -- incremental reading --------------------------------------------------------------------


def test_incremental_reading_advances_tail():
    rings = make_rings()
    img = attach(rings)
    evs = [NetEvent(ALL[i % 4], ts=10 * i, skb=i, len=i, dev=DEVICES[i % 4]) for i in range(400)]
    delivered = []
    i = 0
    rounds = 0
    while i < len(evs):
        chunk = evs[i:i + 1 + rounds % 5]
        assert img.write(*(e.encode() for e in chunk)) == len(chunk)
        head = img.head
        delivered += drain_all(rings)
        assert img.tail == head
        i += len(chunk)
        rounds += 1
    assert img.head > 5 * PAGE                      # the data area wrapped several times
    assert delivered == [expect(e) for e in evs]
    assert stats(rings, "records", "samples", "errors", "pending", "drained") == (400, 400, 0, 0, 400)


def test_partial_drains_hold_back_pending_events():
    rings = make_rings()
    img = attach(rings)
    evs = [NetEvent(RECV, ts=t, skb=t, dev="eth0") for t in (10, 20, 30, 40)]
    img.write(*(e.encode() for e in evs))
    assert drain_all(rings, final=False, horizon=25) == [expect(e) for e in evs[:2]]
    assert rings.stats()["pending"] == 2 and img.tail == img.head
    img.write(NetEvent(RECV, ts=35, skb=35, dev="eth0").encode())
    assert [t[0] for t in drain_all(rings, final=False, horizon=35)] == [30, 35]
    assert [t[0] for t in drain_all(rings)] == [40]
    assert rings.stats()["pending"] == 0 and rings.stats()["late"] == 0


def test_ring_that_was_filled_to_capacity():
    rings = make_rings()
    img = attach(rings, start=1000)
    evs = []
    while True:
        e = NetEvent(RECV, ts=len(evs), skb=len(evs), dev="veth1")
        if not img.write(e.encode()):
            break
        evs.append(e)
    assert img.free() < 72
    assert drain_all(rings) == [expect(e) for e in evs]
    assert img.free() == PAGE


# -- a stage too small for the ring ---------------------------------------------------------


def test_tiny_stage_forces_several_drains():
    rings = make_rings(stage_cap=4)
    img = attach(rings)
    evs = [NetEvent(ALL[i % 5], ts=100 + i, skb=i, len=i, dev="eth0") for i in range(10)]
    img.write(*(e.encode() for e in evs[:5]), lost(3), throttle(), *(e.encode() for e in evs[5:]))
    sizes, mores, out = [], [], []
    for _ in range(10):
        out += drain_all(rings, final=False, horizon=1)
        sizes.append(len(rings.batch()))
        mores.append(rings.more)
        if not rings.more:
            break
    assert sizes == [4, 4, 0] and mores == [True, True, False]
    out += drain_all(rings)                   # the last two wait for a final drain
    assert out == [expect(e) for e in evs]
    s = rings.stats()
    assert (s["forced"], s["samples"], s["records"], s["lost"], s["throttled"], s["late"]) == (2, 10, 12, 3, 1, 0)


def test_tiny_stage_final_drains_lose_nothing():
    rings = make_rings(stage_cap=4)
    img = attach(rings, start=PAGE - 40)
    evs = [NetEvent(RECV, ts=1000 - i if i % 3 else 1000 + i, skb=i, dev="wg0") for i in range(23)]
    img.write(*(e.encode() for e in evs))
    out, more = [], []
    while True:
        out += drain_all(rings, final=True)
        more.append(rings.more)
        if not rings.more:
            break
    assert more == [True] * 5 + [False]
    assert sorted(out) == sorted(expect(e) for e in evs)
    assert len(out) == 23
    s = rings.stats()
    assert (s["forced"], s["samples"], s["pending"], s["drained"]) == (5, 23, 0, 23)
    assert img.tail == img.head


def test_exact_stage_fill_is_not_forced():
    rings = make_rings(stage_cap=4)
    img = attach(rings)
    img.write(*(NetEvent(RECV, ts=i, dev="eth0").encode() for i in range(4)))
    assert len(drain_all(rings, final=False, horizon=1)) == 2
    assert not rings.more and rings.stats()["forced"] == 0 and rings.stats()["pending"] == 2


def test_full_stage_still_counts_non_sample_records():
    rings = make_rings(stage_cap=1)
    img = attach(rings)
    img.write(NetEvent(RECV, ts=1, dev="eth0").encode(), lost(2), throttle(), other(50),
              NetEvent(RECV, ts=2, dev="eth0").encode())
    drain_all(rings, final=False, horizon=0xFFFF)
    assert rings.more
    assert stats(rings, "records", "lost", "throttled", "unknown", "forced") == (4, 2, 1, 1, 1)
    drain_all(rings, final=False, horizon=0xFFFF)
    assert not rings.more and rings.stats()["samples"] == 2


def test_feed_drains_until_no_ring_stalls():
    rings = make_rings(stage_cap=3)
    img = attach(rings)
    img.write(*(NetEvent(RECV, ts=i, dev="eth0").encode() for i in range(10)))
    assert rings.feed(EventSink(), final=True) == 10
    s = rings.stats()
    assert (s["drained"], s["forced"], s["pending"]) == (10, 3, 0) and not rings.more


# -- configuration errors -------------------------------------------------------------------


def test_attach_errors():
    rings = make_rings(cpus=[0, 1])
    img = RingImage(1)
    with pytest.raises(ValueError):
        rings.attach(2, img.buf)
    with pytest.raises(ValueError):
        rings.attach(-1, img.buf)
    with pytest.raises(ValueError):
        rings.attach(0, bytearray(1000))
    rings.attach(0, img.buf)
    with pytest.raises(ValueError):
        rings.attach(0, RingImage(1).buf)
    with pytest.raises((TypeError, BufferError)):
        rings.attach(1, bytes(2 * PAGE))          # not writable


def test_bad_data_area_is_rejected():
    rings = make_rings()
    img = RingImage(1)
    struct.pack_into("<QQ", img.buf, 1040, PAGE, 3000)       # not a power of two
    with pytest.raises(ValueError):
        rings.attach(0, img.buf)
    struct.pack_into("<QQ", img.buf, 1040, PAGE, 2 * PAGE)   # larger than the image
    with pytest.raises(ValueError):
        rings.attach(0, img.buf)


def test_control_page_without_data_offset():
    # kernels before 4.1 leave data_offset/data_size zero: the data area follows the page
    rings = make_rings()
    buf = bytearray(2 * PAGE)
    rings.attach(0, buf)
    rec = SAMPLES[1].encode()
    buf[PAGE:PAGE + len(rec)] = rec
    struct.pack_into("<Q", buf, 1024, len(rec))
    assert drain_all(rings) == [expect(SAMPLES[1])]
    assert struct.unpack_from("<Q", buf, 1032)[0] == len(rec)
    with pytest.raises(ValueError):
        make_rings().attach(0, bytearray(PAGE + 3000))


def test_too_many_devices():
    rings = make_rings(tps=[RECV])
    names = [f"d{i}" for i in range(32768)]
    with pytest.raises(ValueError):
        rings.set_devices(names)
    rings.set_devices(names[:32767])
    assert rings.device_slot("d32766") == 32766 and rings.device_slot("d0") == 0


@pytest.mark.parametrize("kw", [dict(cpus=[]), dict(cpus=[0], ring_pages=3), dict(cpus=[0], ring_pages=0),
                                dict(cpus=[0], ring_pages=1, watermark=PAGE)])
def test_constructor_errors(kw):
    with pytest.raises(ValueError):
        Rings(**kw)


def test_add_kind_errors():
    rings = Rings(cpus=[0], ring_pages=1)
    base = layout(RECV)
    with pytest.raises(ValueError):
        rings.add_kind(**{**base, "tp_id": 65536})
    with pytest.raises(ValueError):
        rings.add_kind(**{**base, "tp_id": -1})
    rings.add_kind(**base)
    with pytest.raises(ValueError):
        rings.add_kind(**base)
    for i in range(254):
        rings.add_kind(**{**base, "tp_id": 10000 + i})
    with pytest.raises(ValueError):
        rings.add_kind(**{**base, "tp_id": 20000})


def test_closed_rings_refuse_to_drain():
    rings = make_rings()
    img = attach(rings)
    img.write(SAMPLES[0].encode())
    rings.close()
    rings.close()
    with pytest.raises(ValueError):
        rings.drain(final=True)


@pytest.mark.parametrize("head_past,tail", [(PAGE + 8, 0), (20, 4)])
def test_impossible_control_page_resynchronises(head_past, tail):
    # head more than a ring ahead of tail, or a tail off the 8-byte grid: no kernel writes
    # that; the reader counts an error and skips to head instead of reading out of bounds
    rings = make_rings()
    img = attach(rings)
    struct.pack_into("<QQ", img.buf, 1024, tail + head_past, tail)
    assert drain_all(rings) == []
    assert stats(rings, "errors", "samples") == (1, 0)
    assert img.tail == img.head
    img.write(NetEvent(RECV, ts=5, skb=1, len=60, dev="eth0").encode())
    assert len(drain_all(rings)) == 1


def test_add_kind_rejects_fields_outside_min_raw():
    rings = Rings(cpus=[0], ring_pages=1)
    good = layout(RECV)
    with pytest.raises(ValueError, match="outside min_raw"):
        rings.add_kind(**{**good, "min_raw": good["skb_off"] + 4})
    with pytest.raises(ValueError, match="bad field offset"):
        rings.add_kind(**{**good, "len_off": -5})
    assert rings.add_kind(**good) == 0


def test_close_while_another_thread_drains_is_safe():
    import threading

    for _ in range(50):
        rings = make_rings(cpus=(0, 1))
        imgs = [attach(rings, ring=i) for i in range(2)]
        for img in imgs:
            img.write(*(NetEvent(RECV, ts=t, skb=t, len=60, dev="eth0").encode() for t in range(1, 30)))
        stop = threading.Event()
        errors = []

        def reader(rings=rings, stop=stop, errors=errors):
            while not stop.is_set():
                try:
                    rings.drain(final=True)
                    rings.wait(0)
                except ValueError:
                    return          # closed under us: the documented outcome
                except BaseException as e:
                    errors.append(e)
                    return

        t = threading.Thread(target=reader)
        t.start()
        rings.close()
        stop.set()
        t.join(5)
        assert not t.is_alive() and not errors
        assert rings.fds_open == []
        with pytest.raises(ValueError, match="closed"):
            rings.drain()


def test_cut_at_discards_what_a_newer_capture_delivers():
    rings = make_rings(cpus=(0, 1), stage_cap=3)
    imgs = [attach(rings, ring=r) for r in (0, 1)]
    for r, img in enumerate(imgs):
        img.write(*(NetEvent(RECV, ts=10 * i + r, dev="eth0").encode() for i in range(6)))
    rings.cut_at(31)
    out = []
    while True:
        out += drain_all(rings, final=True)
        if not rings.more:
            break
    assert [e[0] for e in out] == [0, 1, 10, 11, 20, 21, 30]
    s = rings.stats()
    assert (s["samples"], s["cut"], s["pending"]) == (12, 5, 0)


def test_device_slots_may_be_left_unused():
    rings = make_rings(devices=["eth0", None, "br0"])
    assert rings.devices == ["eth0", None, "br0"]
    assert (rings.device_slot("eth0"), rings.device_slot("br0")) == (0, 2)


def test_start_at_discards_what_an_older_capture_delivered():
    rings = make_rings(cpus=(0, 1), stage_cap=3)
    imgs = [attach(rings, ring=r) for r in (0, 1)]
    for r, img in enumerate(imgs):
        img.write(*(NetEvent(RECV, ts=10 * i + r, dev="eth0").encode() for i in range(6)))
    rings.start_at(21)
    out = []
    while True:
        out += drain_all(rings, final=True)
        if not rings.more:
            break
    assert [e[0] for e in out] == [21, 30, 31, 40, 41, 50, 51]
    s = rings.stats()
    assert (s["samples"], s["cut"], s["pending"]) == (12, 5, 0)

"""The pure parts of benchmarks/sample_cost.py: the perf ABI it hand-defines and its ring counting."""

import ctypes
import struct

from benchmarks import sample_cost as sc


def test_attr_layout_matches_perf_attr_size_ver7():
    A = sc.PerfEventAttr
    assert ctypes.sizeof(A) == sc.PERF_ATTR_SIZE_VER7 == 128
    # offsets from include/uapi/linux/perf_event.h
    assert (A.config.offset, A.sample_type.offset, A.wakeup_watermark.offset) == (8, 24, 48)
    assert (A.clockid.offset, A.aux_watermark.offset, A.sig_data.offset) == (92, 104, 120)


def test_make_attr_sampling_and_counting():
    cfgs = {c.key: c for c in sc.configs(110)}
    a = sc.make_attr(305, cfgs["time_raw_clockid"], 1 << 20)
    assert (a.size, a.type, a.config, a.sample_period) == (128, sc.PERF_TYPE_TRACEPOINT, 305, 1)
    assert a.sample_type == sc.PERF_SAMPLE_TIME | sc.PERF_SAMPLE_RAW == 0x404
    assert a.flags == sc.ATTR_DISABLED | sc.ATTR_WATERMARK | sc.ATTR_USE_CLOCKID == (1 | 1 << 14 | 1 << 25)
    assert (a.wakeup_watermark, a.clockid) == (1 << 20, 1)
    c = sc.make_attr(305, cfgs["count"], 0)
    assert (c.sample_period, c.sample_type, c.flags) == (0, 0, sc.ATTR_DISABLED)


def test_record_estimate_bounds_the_sizes_seen_on_linux_6_18():
    # observed: RAW 32, TIME|RAW 40, TID|TIME|RAW 48, TID|TIME|CPU|RAW 56 (getppid, 12-byte
    # format); raw_syscalls:sys_enter TIME|RAW 88 (64-byte format)
    t, r = sc.PERF_SAMPLE_TIME, sc.PERF_SAMPLE_RAW
    tid, cpu = sc.PERF_SAMPLE_TID, sc.PERF_SAMPLE_CPU
    for st, fixed, seen in [(r, 12, 32), (t | r, 12, 40), (tid | t | r, 12, 48),
                            (tid | t | cpu | r, 12, 56), (t | r, 64, 88)]:
        assert seen <= sc.record_bytes_estimate(st, fixed) <= seen + 16


def test_ring_pages_power_of_two_with_room():
    assert sc.ring_pages_for(0) == 8
    n = 200_000 * 96
    pages = sc.ring_pages_for(n)
    assert pages & (pages - 1) == 0 and pages * sc.PAGE >= n * 5 // 4
    assert pages // 2 * sc.PAGE < n * 5 // 4


def _sample(size=40):
    return struct.pack("<IHH", sc.PERF_RECORD_SAMPLE, 0, size) + bytes(size - 8)


def test_count_records_fast_path():
    c = sc.count_records(_sample() * 1000)
    assert c == {"samples": 1000, "lost": 0, "throttled": 0, "other": 0, "record_bytes": 40}
    assert sc.count_records(b"")["samples"] == 0


def test_count_records_counts_lost_and_throttle():
    lost = struct.pack("<IHHQQ", sc.PERF_RECORD_LOST, 0, 24, 7, 123)
    thr = struct.pack("<IHHQQQ", sc.PERF_RECORD_THROTTLE, 0, 32, 1, 2, 3)
    c = sc.count_records(_sample() * 3 + lost + thr + _sample() * 2)
    assert c == {"samples": 5, "lost": 123, "throttled": 1, "other": 0, "record_bytes": 40}
    # a zero size ends the walk instead of looping
    assert sc.count_records(_sample() + bytes(16))["other"] == 1

"""Sample cost: what ONE perf tracepoint sample costs on this kernel, by the choices mace makes.

A forked worker pinned to one CPU (the last allowed one) runs `os.getppid()` in a tight
loop (CPython calls getppid(2) directly; glibc does not cache it) and times the loop by
its own CPU time (CLOCK_THREAD_CPUTIME_ID: the sample is written in the caller's context, so
it is in there, while time the worker spends preempted on this shared machine is not).
The harness, pinned to the other CPUs, opens one perf event for that CPU (pid=-1, cpu=N),
as mace does, by ctypes `perf_event_open` with a `struct perf_event_attr` defined here,
on `syscalls:sys_enter_getppid` (id read from tracefs by `mace.capture.tracefs`):

    none                nothing attached (the baseline of the round)
    counting only       sample_period=0, no sample_type, no ring
    RAW ... TID|TIME|CPU|RAW   one sample per call, sample_type as named
    + use_clockid       TIME|RAW with use_clockid=1, clockid=CLOCK_MONOTONIC
    + filter            TIME|RAW with PERF_EVENT_IOC_SET_FILTER "__syscall_nr >= 0" (always
                        matches) or "__syscall_nr == -1" (never matches)
    raw_syscalls        raw_syscalls:sys_enter filtered "id == <getppid>", TIME|RAW: a
                        72-byte raw record instead of 24

Name filters (`name_filters` in the result): what a device-name filter costs each hit of a
net tracepoint, for the choices a plan with many containers has (mace.plan, veth_prefixes).
The worker sends 60-byte frames on an AF_PACKET socket bound to a veth named like Docker's
(veth + 7 hex), in a network namespace of its own whose peer end is down: each send hits
net:net_dev_queue once on that device, then the device's noop qdisc drops the frame (no
carrier, no qdisc).  The events are mace's (TIME|RAW, use_clockid, a sample per hit), on
that CPU, with filters of veth names that are not the device's (a miss: the kernel compares
each), of 1 to 160 names (a page holds about 160), the same split over several events of
the tracepoint (as mace opens more than a page of names), a prefix glob (`name ~ "P*"`)
that misses or matches, and the device's own name (a sample is written).  Full: 5 rounds x
best of 2 loops x 30k sends; quick: 2 x 2 x 4k.

Sampled events map a ring of 1 + 2^k pages large enough for one loop's records, with
watermark=1 and wakeup_watermark = the whole ring, so no sample ever queues a wakeup;
the harness drains it between loops (while the worker waits) and counts the samples and
the PERF_RECORD_LOST records.  A measurement is the best of `reps` loops of `calls`;
rounds are interleaved, each in a rotated order, and the added cost of a configuration is
the median over rounds of (its ns per call minus `none` of the same round), with the
min/max of those per-round differences.  Full: 5 rounds x best of 2 loops x 200k calls;
quick: 2 x 2 x 50k.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import functools
import gc
import itertools
import mmap
import os
import platform
import signal
import statistics
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.common import pyplot, save, wait_quiet

GETPPID_TP = "syscalls:sys_enter_getppid"
RAW_SYSCALLS_TP = "raw_syscalls:sys_enter"
# machine -> (perf_event_open, getppid) syscall numbers
SYSCALL_NR = {"x86_64": (298, 110), "aarch64": (241, 173)}

PERF_TYPE_TRACEPOINT = 2
PERF_SAMPLE_TID = 1 << 1
PERF_SAMPLE_TIME = 1 << 2
PERF_SAMPLE_CPU = 1 << 7
PERF_SAMPLE_RAW = 1 << 10
# bits of the attr's flag word (include/uapi/linux/perf_event.h, LSB first)
ATTR_DISABLED = 1 << 0
ATTR_WATERMARK = 1 << 14
ATTR_USE_CLOCKID = 1 << 25
PERF_ATTR_SIZE_VER7 = 128      # up to sig_data: every kernel since 5.13 knows all of it
PERF_FLAG_FD_CLOEXEC = 1 << 3
CLOCK_MONOTONIC = 1
PERF_EVENT_IOC_ENABLE = 0x2400                 # _IO('$', 0)
PERF_EVENT_IOC_DISABLE = 0x2401                # _IO('$', 1)
PERF_EVENT_IOC_SET_FILTER = 0x40082406         # _IOW('$', 6, char *)
PERF_RECORD_LOST = 2
PERF_RECORD_THROTTLE = 5
PERF_RECORD_SAMPLE = 9
PAGE = mmap.PAGESIZE
# offsets in struct perf_event_mmap_page
MMAP_DATA_HEAD, MMAP_DATA_TAIL, MMAP_DATA_OFFSET, MMAP_DATA_SIZE = 1024, 1032, 1040, 1048

QUIET_LIMIT_S = 1.0
QUIET_BELOW = 0.15


class PerfEventAttr(ctypes.Structure):
    """struct perf_event_attr up to PERF_ATTR_SIZE_VER7; the bitfield word is one u64."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("size", ctypes.c_uint32),
        ("config", ctypes.c_uint64),
        ("sample_period", ctypes.c_uint64),
        ("sample_type", ctypes.c_uint64),
        ("read_format", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("wakeup_watermark", ctypes.c_uint32),   # union with wakeup_events; ATTR_WATERMARK picks
        ("bp_type", ctypes.c_uint32),
        ("config1", ctypes.c_uint64),
        ("config2", ctypes.c_uint64),
        ("branch_sample_type", ctypes.c_uint64),
        ("sample_regs_user", ctypes.c_uint64),
        ("sample_stack_user", ctypes.c_uint32),
        ("clockid", ctypes.c_int32),
        ("sample_regs_intr", ctypes.c_uint64),
        ("aux_watermark", ctypes.c_uint32),
        ("sample_max_stack", ctypes.c_uint16),
        ("reserved_2", ctypes.c_uint16),
        ("aux_sample_size", ctypes.c_uint32),
        ("reserved_3", ctypes.c_uint32),
        ("sig_data", ctypes.c_uint64),
    ]


@dataclass(frozen=True)
class Config:
    key: str
    label: str
    tracepoint: str | None = GETPPID_TP      # None: no event
    sample_type: int | None = None           # None: counting only, no ring
    clockid: bool = False
    filter: str | None = None


def configs(getppid_nr: int) -> list[Config]:
    tr = PERF_SAMPLE_TIME | PERF_SAMPLE_RAW
    return [
        Config("none", "none (no event)", tracepoint=None),
        Config("count", "counting only"),
        Config("raw", "RAW", sample_type=PERF_SAMPLE_RAW),
        Config("time_raw", "TIME|RAW", sample_type=tr),
        Config("tid_time_raw", "TID|TIME|RAW", sample_type=tr | PERF_SAMPLE_TID),
        Config("tid_time_cpu_raw", "TID|TIME|CPU|RAW",
               sample_type=tr | PERF_SAMPLE_TID | PERF_SAMPLE_CPU),
        Config("time_raw_clockid", "TIME|RAW + use_clockid MONOTONIC", sample_type=tr, clockid=True),
        Config("filter_hit", "TIME|RAW + filter that matches", sample_type=tr,
               filter="__syscall_nr >= 0"),
        Config("filter_miss", "TIME|RAW + filter that never matches", sample_type=tr,
               filter="__syscall_nr == -1"),
        Config("raw_syscalls", f"raw_syscalls:sys_enter (id == {getppid_nr}), TIME|RAW",
               tracepoint=RAW_SYSCALLS_TP, sample_type=tr, filter=f"id == {getppid_nr}"),
    ]


def make_attr(tp_id: int, cfg: Config, wakeup_bytes: int) -> PerfEventAttr:
    """The attr of `cfg`: opened disabled, a sample per hit (if sampling) and no wakeups
    before `wakeup_bytes` of records."""
    a = PerfEventAttr()
    a.type = PERF_TYPE_TRACEPOINT
    a.size = PERF_ATTR_SIZE_VER7
    a.config = tp_id
    a.flags = ATTR_DISABLED
    if cfg.sample_type is not None:
        a.sample_period = 1
        a.sample_type = cfg.sample_type
        a.flags |= ATTR_WATERMARK
        a.wakeup_watermark = wakeup_bytes
    if cfg.clockid:
        a.flags |= ATTR_USE_CLOCKID
        a.clockid = CLOCK_MONOTONIC
    return a


def record_bytes_estimate(sample_type: int, raw_fixed: int) -> int:
    """An upper bound of a sample's size: header, 8 bytes per TID/TIME/CPU, and the raw
    record (u32 size + the format's fields + up to 8 bytes of the kernel's padding), so
    that a ring sized from it never fills in one loop."""
    words = sum(bool(sample_type & f) for f in (PERF_SAMPLE_TID, PERF_SAMPLE_TIME, PERF_SAMPLE_CPU))
    raw = (4 + raw_fixed + 8 + 7) // 8 * 8 if sample_type & PERF_SAMPLE_RAW else 0
    return 8 + 8 * words + raw


def ring_pages_for(nbytes: int, minimum: int = 8) -> int:
    """The smallest power-of-two page count holding `nbytes` with a quarter to spare."""
    need = -(-nbytes * 5 // 4) // PAGE
    pages = minimum
    while pages < need:
        pages *= 2
    return pages


def count_records(data: bytes) -> dict:
    """Samples, samples lost (sum of PERF_RECORD_LOST), throttle and other records in a
    stretch of ring, and the size of the samples."""
    n = len(data)
    if n >= 8:
        typ, size = struct.unpack_from("<I2xH", data, 0)
        # fast path: one event's samples all have the same size
        if typ == PERF_RECORD_SAMPLE and size >= 8 and size % 4 == 0 and n % size == 0:
            import numpy as np
            rows = np.frombuffer(data, dtype="<u4").reshape(-1, size // 4)
            if (rows[:, 0] == PERF_RECORD_SAMPLE).all() and ((rows[:, 1] >> 16) == size).all():
                return {"samples": len(rows), "lost": 0, "throttled": 0, "other": 0, "record_bytes": size}
    out = {"samples": 0, "lost": 0, "throttled": 0, "other": 0, "record_bytes": 0}
    off = 0
    while off + 8 <= n:                     # slow path: walk every header
        typ, size = struct.unpack_from("<I2xH", data, off)
        if size < 8:
            out["other"] += 1
            break
        if typ == PERF_RECORD_SAMPLE:
            out["samples"] += 1
            out["record_bytes"] = size
        elif typ == PERF_RECORD_LOST and off + 24 <= n:
            out["lost"] += struct.unpack_from("<Q", data, off + 16)[0]
        elif typ == PERF_RECORD_THROTTLE:
            out["throttled"] += 1
        else:
            out["other"] += 1
        off += size
    return out


def set_filter(fd: int, text: str) -> None:
    """PERF_EVENT_IOC_SET_FILTER with a filter of any length up to the kernel's page
    (fcntl.ioctl copies at most 1024 bytes of a bytes argument)."""
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(text.encode())
    if libc.ioctl(fd, ctypes.c_ulong(PERF_EVENT_IOC_SET_FILTER), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{os.strerror(err)} (SET_FILTER, {len(text)} bytes)")


# -- the worker ------------------------------------------------------------------------------------

class Worker:
    """A forked process pinned to `cpu` that runs timed loops on request: of getppid(), or,
    with `send_on`, of 60-byte frames sent on a veth of that name (see _send_call)."""

    def __init__(self, cpu: int, send_on: str | None = None):
        cmd_r, self._cmd = os.pipe()
        self._res, res_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            code = 1
            try:
                os.close(self._cmd)
                os.close(self._res)
                _worker_main(cmd_r, res_w, cpu, send_on)
                code = 0
            finally:
                os._exit(code)
        os.close(cmd_r)
        os.close(res_w)

    def loop(self, calls: int) -> tuple[int, int]:
        """(CPU, wall) nanoseconds the worker took for `calls` getppid() calls."""
        os.write(self._cmd, calls.to_bytes(8, "little"))
        reply = _read_exact(self._res, 16)
        if len(reply) != 16:
            raise RuntimeError("the benchmark's worker died")
        return struct.unpack("<QQ", reply)

    def close(self) -> None:
        if self.pid <= 0:
            return
        try:
            os.write(self._cmd, (0).to_bytes(8, "little"))
        except OSError:
            pass
        for fd in (self._cmd, self._res):
            os.close(fd)
        end = time.monotonic() + 5
        while time.monotonic() < end:
            if os.waitpid(self.pid, os.WNOHANG)[0]:
                break
            time.sleep(0.01)
        else:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        self.pid = -1


def _read_exact(fd: int, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def _send_call(dev: str):
    """In a network namespace of this process's own (it dies with it): a veth `dev` whose
    peer is down, and a function that sends one frame on it.  Without carrier the device
    keeps its noop qdisc, so each send is one hit of net:net_dev_queue on `dev` and a drop,
    the cheapest path through a device that a net tracepoint sees."""
    import socket

    from pyroute2 import IPRoute
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x40000000) != 0:          # CLONE_NEWNET
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
    for conf in ("all", "default"):             # no IPv6 of its own on the device: only the loop's frames
        with open(f"/proc/sys/net/ipv6/conf/{conf}/disable_ipv6", "w") as f:
            f.write("1\n")
    with IPRoute() as ipr:
        ipr.link("add", ifname=dev, kind="veth", peer={"ifname": "peer0"}, state="up")
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    sock.bind((dev, 0))
    frame = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5" + bytes(46)   # local experimental type
    return functools.partial(sock.send, frame)


def _worker_main(cmd_r: int, res_w: int, cpu: int, send_on: str | None = None) -> None:
    os.sched_setaffinity(0, {cpu})
    call = _send_call(send_on) if send_on else os.getppid
    gc.disable()
    cpu_clock, wall, repeat = time.thread_time_ns, time.perf_counter_ns, itertools.repeat
    while True:
        msg = _read_exact(cmd_r, 8)
        calls = int.from_bytes(msg, "little") if len(msg) == 8 else 0
        if not calls:
            return
        w0, c0 = wall(), cpu_clock()
        for _ in repeat(None, calls):
            call()
        c1, w1 = cpu_clock(), wall()
        os.write(res_w, struct.pack("<QQ", c1 - c0, w1 - w0))


# -- one perf event -------------------------------------------------------------------------------

class Event:
    """One tracepoint event on one CPU (pid=-1), with its ring if it samples."""

    def __init__(self, cfg: Config, tp_id: int, raw_fixed: int, cpu: int, calls: int, nr_open: int):
        self.cfg = cfg
        self.map = None
        self.tail = 0
        self.totals = {"samples": 0, "lost": 0, "throttled": 0, "other": 0, "record_bytes": 0}
        self.pages = 0
        if cfg.sample_type is not None:
            self.pages = ring_pages_for(calls * record_bytes_estimate(cfg.sample_type, raw_fixed))
        attr = make_attr(tp_id, cfg, self.pages * PAGE)
        libc = ctypes.CDLL(None, use_errno=True)
        sc = libc.syscall
        sc.restype = ctypes.c_long
        sc.argtypes = [ctypes.c_long, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_ulong]
        fd = sc(nr_open, ctypes.addressof(attr), -1, cpu, -1, PERF_FLAG_FD_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{os.strerror(err)} (perf_event_open)", f"{cfg.tracepoint} on cpu {cpu}")
        self.fd = fd
        try:
            if cfg.filter:
                set_filter(fd, cfg.filter)
            if self.pages:
                self.map = mmap.mmap(fd, (1 + self.pages) * PAGE, mmap.MAP_SHARED,
                                     mmap.PROT_READ | mmap.PROT_WRITE)
                self.data_off = struct.unpack_from("<Q", self.map, MMAP_DATA_OFFSET)[0] or PAGE
                self.data_size = struct.unpack_from("<Q", self.map, MMAP_DATA_SIZE)[0] or self.pages * PAGE
            fcntl.ioctl(fd, PERF_EVENT_IOC_ENABLE, 0)
        except BaseException:
            self.close()
            raise

    def drain(self) -> None:
        """Count what the kernel wrote since the last drain and hand the space back."""
        if self.map is None:
            return
        m = self.map
        head = struct.unpack_from("<Q", m, MMAP_DATA_HEAD)[0]
        n = head - self.tail
        start = self.tail % self.data_size
        base = self.data_off
        if start + n <= self.data_size:
            data = m[base + start: base + start + n]
        else:                                  # the stretch wraps: copy both parts
            data = m[base + start: base + self.data_size] + m[base: base + start + n - self.data_size]
        struct.pack_into("<Q", m, MMAP_DATA_TAIL, head)
        self.tail = head
        c = count_records(data)
        for k in ("samples", "lost", "throttled", "other"):
            self.totals[k] += c[k]
        self.totals["record_bytes"] = c["record_bytes"] or self.totals["record_bytes"]

    def close(self) -> dict:
        """Disable, drain, close; returns the totals with the event's count."""
        if self.fd < 0:
            return self.totals
        try:
            fcntl.ioctl(self.fd, PERF_EVENT_IOC_DISABLE, 0)
            self.totals["count"] = int.from_bytes(os.read(self.fd, 8), "little")
            self.drain()
        finally:
            if self.map is not None:
                self.map.close()
                self.map = None
            os.close(self.fd)
            self.fd = -1
        return self.totals


# -- the run ---------------------------------------------------------------------------------------

def _params(quick: bool) -> dict:
    return {"rounds": 2, "reps": 2, "calls": 50_000} if quick else {"rounds": 5, "reps": 2, "calls": 200_000}


def _blocker() -> str | None:
    if os.geteuid() != 0:
        return "needs root (perf tracepoint events on a CPU)"
    if platform.machine() not in SYSCALL_NR:
        return f"no syscall numbers for {platform.machine()}"
    return None


def _measure(worker: Worker, cfg: Config, formats: dict, cpu: int, p: dict, nr_open: int) -> tuple:
    """Best CPU and wall ns per call of `reps` loops with `cfg` attached, and the event's totals."""
    ev = None
    if cfg.tracepoint is not None:
        fmt = formats[cfg.tracepoint]
        ev = Event(cfg, fmt.id, fmt.size, cpu, p["calls"], nr_open)
    cpu_ns, wall_ns = [], []
    try:
        for _ in range(p["reps"]):
            c, w = worker.loop(p["calls"])
            cpu_ns.append(c)
            wall_ns.append(w)
            if ev is not None:
                ev.drain()
    finally:
        totals = ev.close() if ev is not None else {}
    return (min(cpu_ns) / p["calls"], min(wall_ns) / p["calls"],
            totals | ({"ring_pages": ev.pages} if ev is not None else {}))


def _spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def run(quick: bool) -> dict:
    reason = _blocker()
    if reason:
        return {"skipped": reason}
    from mace.capture.tracefs import read_formats
    from mace.errors import MaceError

    try:
        formats = read_formats([GETPPID_TP, RAW_SYSCALLS_TP])
    except MaceError as e:
        return {"skipped": str(e)}
    nr_open, nr_getppid = SYSCALL_NR[platform.machine()]
    p = _params(quick)
    cfgs = configs(nr_getppid)
    allowed = sorted(os.sched_getaffinity(0))
    cpu = allowed[-1]
    ns = {c.key: [] for c in cfgs}
    wall = {c.key: [] for c in cfgs}
    totals = {c.key: {} for c in cfgs}
    busy = []
    worker = Worker(cpu)
    try:
        os.sched_setaffinity(0, set(allowed[:-1]) or {cpu})
        worker.loop(p["calls"])                               # warm-up
        for r in range(p["rounds"]):
            busy.append(wait_quiet(QUIET_LIMIT_S, QUIET_BELOW))
            k = r % len(cfgs)
            for cfg in cfgs[k:] + cfgs[:k]:
                v, w, t = _measure(worker, cfg, formats, cpu, p, nr_open)
                ns[cfg.key].append(v)
                wall[cfg.key].append(w)
                for name, x in t.items():
                    if name in ("record_bytes", "ring_pages"):
                        totals[cfg.key][name] = x
                    else:
                        totals[cfg.key][name] = totals[cfg.key].get(name, 0) + x
    except OSError as e:
        return {"error": f"{type(e).__name__}: {e}", **p, "cpu": cpu}
    finally:
        worker.close()
        os.sched_setaffinity(0, set(allowed))
    base = ns["none"]
    rows = []
    for c in cfgs:
        added = [x - b for x, b in zip(ns[c.key], base, strict=True)]
        t = totals[c.key]
        loops = p["calls"] * p["reps"] * p["rounds"]
        row = {**asdict(c), "ns_per_call": ns[c.key], "added_ns": added,
               "ns": _spread(ns[c.key]), "added": _spread(added), "wall_ns_per_call": wall[c.key]}
        if t:
            row.update(t)
            row["count_per_call"] = t.get("count", 0) / loops
            row["samples_per_call"] = t.get("samples", 0) / loops
        rows.append(row)
    tt, full = ns["time_raw"], ns["tid_time_cpu_raw"]
    saves = [a - b for a, b in zip(full, tt, strict=True)]
    return {**p, "cpu": cpu, "loop": "os.getppid()", "clock": "thread CPU time (wall kept too)",
            "perf_event_open": "pid=-1, cpu=N",
            "tracepoint_ids": {n: f.id for n, f in formats.items()},
            "busy_before_round": busy, "configs": rows, "tid_cpu_saving": _spread(saves),
            "name_filters": run_name_filters(quick, cpu, nr_open)}


# -- name filters ----------------------------------------------------------------------------------

QUEUE_TP = "net:net_dev_queue"
IFNAMSIZ = 16


@dataclass(frozen=True)
class NameConfig:
    key: str
    label: str
    filters: tuple[str | None, ...] = ()     # one perf event each (None: unfiltered); (): none
    names: int = 0                           # name comparisons a hit on the device costs
    sampled: bool = False                    # the device's hits pass: a sample is written


def _veth_names(n: int, rng, avoid: str) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        name = f"veth{rng.getrandbits(28):07x}"
        if name != avoid and name not in out:
            out.append(name)
    return out


def _chain(names: list[str]) -> str:
    return " || ".join(f'name == "{d}"' for d in names)


def name_configs(dev: str, seed: int = 0) -> list[NameConfig]:
    """The filters compared, on hits of the device `dev` (a Docker-like veth name)."""
    import random
    rng = random.Random(seed)
    page = _veth_names(160, rng, dev)          # 160 such names fill a page (3,996 bytes)
    split = _veth_names(500, rng, dev)
    return [
        NameConfig("none", "none (no event)"),
        NameConfig("sample", "no filter: every hit sampled", (None,), sampled=True),
        NameConfig("own", "its own name: sampled", (_chain([dev]),), names=1, sampled=True),
        NameConfig("miss1", "1 other name", (_chain(page[:1]),), names=1),
        NameConfig("miss40", "40 other names", (_chain(page[:40]),), names=40),
        NameConfig("miss160", "160 other names (a page)", (_chain(page),), names=160),
        NameConfig("own_last", "160 names, its own last: sampled",
                   (_chain([*page[:159], dev]),), names=160, sampled=True),
        NameConfig("events4", "4 events of 1 other name each", tuple(_chain([n]) for n in page[:4]),
                   names=4),
        NameConfig("split500", "500 other names over 4 events",
                   tuple(_chain(split[i:i + 125]) for i in range(0, 500, 125)), names=500),
        NameConfig("glob_miss", 'a prefix glob that misses (name ~ "cali*")', ('name ~ "cali*"',), names=1),
        NameConfig("glob_hit", 'a prefix glob that matches (name ~ "veth*"): sampled',
                   ('name ~ "veth*"',), names=1, sampled=True),
    ]


def _name_params(quick: bool) -> dict:
    return {"rounds": 2, "reps": 2, "calls": 4_000} if quick else {"rounds": 5, "reps": 2, "calls": 30_000}


def _measure_names(worker: Worker, cfg: NameConfig, fmt, cpu: int, p: dict, nr_open: int) -> tuple:
    """Best CPU ns per send of `reps` loops with cfg's events attached, and their totals."""
    events = []
    cpu_ns = []
    totals: dict = {}
    try:
        for text in cfg.filters:
            c = Config(cfg.key, cfg.label, tracepoint=QUEUE_TP, sample_type=PERF_SAMPLE_TIME | PERF_SAMPLE_RAW,
                       clockid=True, filter=text)
            # a ring for every sample of a loop where samples come, the smallest elsewhere
            events.append(Event(c, fmt.id, fmt.size + IFNAMSIZ, cpu, p["calls"] if cfg.sampled else 0, nr_open))
        for _ in range(p["reps"]):
            cpu_ns.append(worker.loop(p["calls"])[0])
            for ev in events:
                ev.drain()
    finally:
        for ev in events:
            for k, v in ev.close().items():
                if k not in ("record_bytes",):
                    totals[k] = totals.get(k, 0) + v
    return min(cpu_ns) / p["calls"], totals


def run_name_filters(quick: bool, cpu: int, nr_open: int) -> dict:
    """The name-filter part (see the module's docstring)."""
    import secrets

    from mace.capture.tracefs import read_formats
    from mace.errors import MaceError
    try:
        fmt = read_formats([QUEUE_TP])[QUEUE_TP]
    except MaceError as e:
        return {"skipped": str(e)}
    p = _name_params(quick)
    dev = f"veth{secrets.token_hex(4)[:7]}"
    cfgs = name_configs(dev)
    allowed = sorted(os.sched_getaffinity(0))
    ns = {c.key: [] for c in cfgs}
    totals = {c.key: {} for c in cfgs}
    worker = Worker(cpu, send_on=dev)
    try:
        os.sched_setaffinity(0, set(allowed[:-1]) or {cpu})
        worker.loop(p["calls"])                               # warm-up
        for r in range(p["rounds"]):
            wait_quiet(QUIET_LIMIT_S, QUIET_BELOW)
            k = r % len(cfgs)
            for cfg in cfgs[k:] + cfgs[:k]:
                v, t = _measure_names(worker, cfg, fmt, cpu, p, nr_open)
                ns[cfg.key].append(v)
                for name, x in t.items():
                    totals[cfg.key][name] = totals[cfg.key].get(name, 0) + x
    except (OSError, RuntimeError) as e:
        return {"error": f"{type(e).__name__}: {e}", **p, "cpu": cpu}
    finally:
        worker.close()
        os.sched_setaffinity(0, set(allowed))
    base = ns["none"]
    sends = p["calls"] * p["reps"] * p["rounds"]
    rows = []
    for c in cfgs:
        added = [x - b for x, b in zip(ns[c.key], base, strict=True)]
        t = totals[c.key]
        rows.append({**asdict(c), "filter_bytes": [len(f or "") for f in c.filters],
                     "ns_per_call": ns[c.key], "added_ns": added, "ns": _spread(ns[c.key]),
                     "added": _spread(added),
                     "count_per_call": t.get("count", 0) / sends, "samples_per_call": t.get("samples", 0) / sends,
                     "lost": t.get("lost", 0)})
    return {**p, "cpu": cpu, "tracepoint": QUEUE_TP, "device": dev,
            "loop": "AF_PACKET send of 60 bytes on a veth without carrier", "configs": rows,
            "derived": derive_name_costs(rows)}


def derive_name_costs(rows: list[dict]) -> dict:
    """What the rows say about a plan's choices: the cost of each name compared, of each
    more event of a tracepoint, of a hit a prefix glob admits; from these, the number of
    names past which a glob costs less even if every hit it admits were another device's
    (each such hit is sampled: glob_hit), and the projected cost of a hit at N names."""
    med = {r["key"]: r["added"]["median"] for r in rows}
    pts = [(1, med["miss1"]), (40, med["miss40"]), (160, med["miss160"])]
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    per_name = (sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts))
    per_event = (med["events4"] - med["miss1"]) / 3
    admitted = med["glob_hit"] - med["glob_miss"]
    breakeven = 1 + (med["glob_hit"] - med["miss1"]) / per_name if per_name > 0 else None
    from mace.plan import GLOB_FROM

    def exact(n: int) -> float:
        return med["miss1"] + (n - 1) * per_name + (-(-n // 160) - 1) * per_event

    return {"per_name_ns": per_name, "per_event_ns": per_event, "sample_ns": med["sample"],
            "glob_miss_ns": med["glob_miss"], "glob_admitted_extra_ns": admitted,
            "breakeven_names": breakeven, "glob_from": GLOB_FROM,
            "projected_miss_ns": {str(n): exact(n) for n in (1, 8, 32, 128, 500, 1000)},
            "measured_split500_ns": med["split500"]}


# -- harness interface ---------------------------------------------------------------------------

def _by_key(result: dict) -> dict:
    return {c["key"]: c for c in result.get("configs", [])}


def _not_measured(result: dict) -> str | None:
    if result.get("skipped"):
        return f"skipped: {result['skipped']}"
    if result.get("error") or not result.get("configs"):
        return f"failed: {result.get('error', 'no configurations measured')}"
    return None


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    names = result.get("name_filters") or {}
    fig, axes = plt.subplots(2, 1, figsize=(10, 10.5)) if names else plt.subplots(figsize=(10, 5.5))
    ax, nax = (axes[0], axes[1]) if names else (axes, None)
    if nax is not None:
        _plot_names(nax, names)
    why = _not_measured(result)
    if why:
        ax.axis("off")
        ax.text(0.5, 0.5, why, ha="center", va="center", wrap=True)
        save(fig, path)
        return
    rows = [c for c in result["configs"] if c["key"] != "none"][::-1]
    med = [c["added"]["median"] for c in rows]
    err = [[m - c["added"]["min"] for m, c in zip(med, rows, strict=True)],
           [c["added"]["max"] - m for m, c in zip(med, rows, strict=True)]]
    colors = ["tab:gray" if c["sample_type"] is None or c["key"] == "filter_miss"
              else "tab:orange" if c["key"] == "tid_time_cpu_raw" else "tab:blue" for c in rows]
    y = range(len(rows))
    ax.barh(y, med, xerr=err, color=colors, capsize=3, ecolor="black")
    top = max(c["added"]["max"] for c in rows)
    for i, (m, c) in enumerate(zip(med, rows, strict=True)):
        ax.text(max(m, c["added"]["max"]) + top * 0.02, i, f"+{m:.0f} ns", va="center", fontsize=8)
    ax.set_yticks(list(y))
    ax.set_yticklabels([c["label"] for c in rows], fontsize=8)
    ax.set_xlim(min(0, min(c["added"]["min"] for c in rows)), top * 1.15)
    ax.set_xlabel("added ns per getppid() call vs no event (median of rounds, whiskers min..max)")
    none = _by_key(result)["none"]["ns"]["median"]
    ax.set_title(f"cost of one perf tracepoint sample: getppid loop on CPU {result['cpu']}, "
                 f"{result['calls']:,} calls x best of {result['reps']}, {result['rounds']} rounds\n"
                 f"baseline {none:.0f} ns per call; gray: no sample written, orange: mace until now",
                 fontsize=10)
    save(fig, path)


def _plot_names(ax, names: dict) -> None:
    why = _not_measured(names)
    if why:
        ax.axis("off")
        ax.text(0.5, 0.5, f"name filters {why}", ha="center", va="center", wrap=True)
        return
    rows = [c for c in names["configs"] if c["key"] != "none"][::-1]
    med = [c["added"]["median"] for c in rows]
    err = [[m - c["added"]["min"] for m, c in zip(med, rows, strict=True)],
           [c["added"]["max"] - m for m, c in zip(med, rows, strict=True)]]
    colors = ["tab:blue" if c["sampled"] else "tab:gray" for c in rows]
    y = range(len(rows))
    ax.barh(y, med, xerr=err, color=colors, capsize=3, ecolor="black")
    top = max(c["added"]["max"] for c in rows)
    for i, (m, c) in enumerate(zip(med, rows, strict=True)):
        ax.text(max(m, c["added"]["max"]) + top * 0.02, i, f"+{m:.0f} ns", va="center", fontsize=8)
    ax.set_yticks(list(y))
    ax.set_yticklabels([c["label"] for c in rows], fontsize=8)
    ax.set_xlim(min(0, min(c["added"]["min"] for c in rows)), top * 1.18)
    ax.set_xlabel(f"added ns per hit of {names['tracepoint']} vs no event (median of rounds, "
                  "whiskers min..max)")
    d = names["derived"]
    be = d["breakeven_names"]
    ax.set_title(f"device-name filters: {d['per_name_ns']:.0f} ns per name compared, "
                 f"{d['per_event_ns']:.0f} ns per more event, a sample {d['sample_ns']:.0f} ns\n"
                 f"a prefix glob costs less past {be:.0f} names (mace switches at {d['glob_from']}); "
                 f"{names['calls']:,} sends x best of {names['reps']}, {names['rounds']} rounds\n"
                 "blue: the hit is sampled, gray: rejected by the filter", fontsize=10)


def _range(s: dict, sign: str = "+") -> str:
    return f"{sign}{s['median']:.0f} ns ({s['min']:.0f}..{s['max']:.0f})"


def summary(result: dict) -> list[dict]:
    why = _not_measured(result)
    if why:
        return [{"metric": "sample cost", "value": why, "target": "", "met": None}]
    rows = []
    for c in result["configs"]:
        if c["key"] == "none":
            value = f"{c['ns']['median']:.0f} ns per call ({c['ns']['min']:.0f}..{c['ns']['max']:.0f})"
        else:
            unit = "per sample" if c.get("samples_per_call", 0) >= 0.5 else "per call, no sample"
            value = f"+{c['added']['median']:.0f} ns {unit} ({c['added']['min']:.0f}..{c['added']['max']:.0f})"
        # RESULTS.md puts the metric in a table cell, where a bare | would end the cell
        rows.append({"metric": c["label"].replace("|", "\\|"), "value": value, "target": "", "met": None})
    lost = sum(c.get("lost", 0) for c in result["configs"])
    rows.append({"metric": "samples lost (PERF_RECORD_LOST), all configurations",
                 "value": f"{lost:,}", "target": "", "met": None})
    s = result["tid_cpu_saving"]
    rows.append({"metric": "dropping TID and CPU saves (TID\\|TIME\\|CPU\\|RAW - TIME\\|RAW, per round)",
                 "value": f"{s['median']:.0f} ns per sample ({s['min']:.0f}..{s['max']:.0f})",
                 "target": "> 0", "met": s["median"] > 0})
    return rows + name_summary(result.get("name_filters") or {})


def name_summary(names: dict) -> list[dict]:
    if not names:
        return []
    why = _not_measured(names)
    if why:
        return [{"metric": "name filters", "value": why, "target": "", "met": None}]
    rows = [{"metric": f"name filter: {c['label']}",
             "value": f"+{c['added']['median']:.0f} ns per hit ({c['added']['min']:.0f}..{c['added']['max']:.0f})",
             "target": "", "met": None} for c in names["configs"] if c["key"] != "none"]
    d = names["derived"]
    be = d["breakeven_names"]
    rows += [
        {"metric": "name filter: each name compared (fit over 1, 40, 160 names)",
         "value": f"{d['per_name_ns']:.1f} ns per hit", "target": "", "met": None},
        {"metric": "name filter: each more perf event of the tracepoint",
         "value": f"{d['per_event_ns']:.0f} ns per hit", "target": "", "met": None},
        {"metric": "names past which a prefix glob costs less, every admitted hit another device's",
         "value": "-" if be is None else f"{be:.0f}", "target": f"<= GLOB_FROM ({d['glob_from']})",
         "met": None if be is None else be <= d["glob_from"]},
    ]
    return rows


def notes(result: dict) -> list[str]:
    if _not_measured(result):
        return []
    by = _by_key(result)
    out = [
        f"Method: a worker pinned to CPU {result['cpu']} calls `os.getppid()` {result['calls']:,} times "
        "per loop, timed by its own CPU time (time preempted by other load is not counted); "
        f"a measurement is the best of {result['reps']} loops, {result['rounds']} rounds, "
        "interleaved in rotated order; added = median over rounds of (configuration - `none` of the same "
        "round), in parentheses the min..max of those differences. One perf event per configuration, "
        "opened for the CPU (pid=-1) by ctypes `perf_event_open`; sampled events write into a ring sized "
        "for one loop (drained between loops, wakeup_watermark = the ring, so no wakeups).",
    ]
    sizes = ", ".join(f"{c['label']} {c['record_bytes']} B" for c in result["configs"]
                      if c.get("record_bytes"))
    if sizes:
        out.append(f"Sample sizes in the ring: {sizes}.")
    counted = [c for c in result["configs"] if "count" in c]
    lost = sum(c.get("lost", 0) for c in counted)
    thr = sum(c.get("throttled", 0) for c in counted)
    per = ", ".join(f"{c['key']} {c['count_per_call']:.3f}" for c in counted)
    out.append(f"Event counts per call: {per} (1.000: every call counted; more: other getppid() callers "
               f"on that CPU); {lost:,} samples lost, {thr:,} throttle records.")
    cnt, tr = by["count"]["added"]["median"], by["time_raw"]["added"]["median"]
    out.append(f"`counting only` (+{cnt:.0f} ns) is the floor every enabled syscall tracepoint adds: "
               "the syscall entry/exit slow path (SYSCALL_WORK_SYSCALL_TRACEPOINT, set on every task "
               "while any syscalls:* event is enabled), building the raw record and counting. Net "
               f"tracepoints have no syscall slow path. The sample itself (TIME|RAW minus counting) "
               f"costs {tr - cnt:.0f} ns here.")
    hit, miss = by["filter_hit"]["added"]["median"], by["filter_miss"]["added"]["median"]
    out.append(f"Filters: a filter that never matches costs +{miss:.0f} ns (vs +{cnt:.0f} counting only), "
               f"one that always matches +{hit:.0f} ns (vs +{tr:.0f} unfiltered): the filter runs after "
               "the record is built and before the ring write, so a rejected hit still pays the build.")
    ck = by["time_raw_clockid"]["added"]["median"]
    out.append(f"use_clockid CLOCK_MONOTONIC: +{ck:.0f} ns vs +{tr:.0f} ns with perf's default clock "
               "(local_clock); mace until now used TID|TIME|CPU|RAW with use_clockid.")
    rs = by["raw_syscalls"]
    out.append(f"Record size: raw_syscalls:sys_enter ({rs.get('record_bytes', '?')} B samples, filtered by id) "
               f"+{rs['added']['median']:.0f} ns vs sys_enter_getppid with a matching filter "
               f"({by['filter_hit'].get('record_bytes', '?')} B) +{hit:.0f} ns.")
    busy = [b for b in result.get("busy_before_round", []) if b is not None]
    if busy:
        out.append(f"The machine was shared: all CPUs were {min(busy) * 100:.0f}-{max(busy) * 100:.0f}% busy "
                   "just before the rounds.")
    return out + name_notes(result.get("name_filters") or {})


def name_notes(names: dict) -> list[str]:
    if not names or _not_measured(names):
        return []
    d = names["derived"]
    proj = d["projected_miss_ns"]
    return [
        f"Name filters: {names['calls']:,} AF_PACKET sends per loop on a veth without carrier "
        f"({names['device']}), each one hit of {names['tracepoint']}; events as mace opens them "
        "(TIME|RAW, use_clockid, a sample per hit); the other names are random Docker-like veth "
        "names, so each comparison runs past the common `veth`.",
        f"The kernel evaluates a filter's names one by one ({d['per_name_ns']:.0f} ns each here: an "
        "indirect call per predicate) and every perf event of the tracepoint on that CPU in turn "
        f"(+{d['per_event_ns']:.0f} ns each): splitting names over events lifts the page limit "
        f"but not the cost. A hit rejected by an exact filter of N names costs about "
        f"{proj['32']:.0f} ns at N=32, {proj['128']:.0f} at 128, {proj['500']:.0f} at 500 "
        f"(measured over 4 events: {d['measured_split500_ns']:.0f} ns), on every hit of the "
        "tracepoint on any device, inside mace's segments too.",
        f"A prefix glob costs one comparison ({d['glob_miss_ns']:.0f} ns per rejected hit); each hit "
        f"it admits is sampled (+{d['glob_admitted_extra_ns']:.0f} ns). Past "
        f"{d['breakeven_names']:.0f} names a glob costs less even if every hit it admits were another "
        f"device's: mace switches a group of veths to their common prefix from {d['glob_from']} on "
        "(mace.plan.GLOB_FROM).",
    ]

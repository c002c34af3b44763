# cython: language_level=3
"""Report lines (MACE, JSON lines, CSV) straight from packed reports, without a Python
object per report.

The correlator hands reports on as packed records (REPORT_FORMAT, 56 bytes each: see
includes/mace_corr.h).  Everything a line owes to its target (the label, the namespace,
the runtime's names: JSON-escaped for JSON lines, quoted as Python's csv module quotes them
for CSV) is made once per target in Python (mace.output.sinks.target_prefix) and copied
per report, so the per-report work is integers only and runs without the GIL.

The text is byte for byte that of the Python sinks kept as the reference
(mace.testing.reference_sinks), `ts` included: the wall clock is the report's
CLOCK_MONOTONIC stamp plus the run's offset, written from the integer (clock.wall), never
through a double.

Example::

    f = Formatter("jsonl", clock.wall_offset_ns(), hops=False)
    f.add_target(target_prefix("jsonl", "web", 4026532281, {"container": "web"}))
    out = bytearray()
    f.format(correlator.take_reports(), out)     # one line per report, appended to out
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_GET_SIZE, PyByteArray_Resize
from libc.stdint cimport INT64_MIN, UINT64_MAX, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy

from mace.includes.abi cimport MACE_ASSERT, MACE_DEBUG_ON
from mace.includes.corr cimport MACE_HOPS, mace_report

import struct as _struct

from mace.output import clock as _clock


cdef enum:
    F_MACE = 0
    F_JSONL = 1
    F_CSV = 2
    # the longest line of any format without its target's text and hop keys: JSON's fixed
    # keys (70 bytes), ts (20), seq (20), latency and len (10 each), cpu (5), the hops' braces
    FIXED_MAX = 160
    HOP_VALUE_MAX = 11  # a separator and a 32-bit number (or "null")

FORMATS = {"mace": F_MACE, "jsonl": F_JSONL, "csv": F_CSV}
DIRECTIONS = ("egress", "ingress")
REPORT_SIZE = sizeof(mace_report)
DEBUG = bool(MACE_DEBUG_ON)

# What a record that no line can be made of looks like to the error message.
_RECORD = _struct.Struct(f"=QQIIHBBHH{MACE_HOPS}I")
assert _RECORD.size == REPORT_SIZE

cdef const char *DIR_NAME[2]
DIR_NAME[0] = b"egress"
DIR_NAME[1] = b"ingress"
cdef Py_ssize_t DIR_LEN[2]
DIR_LEN[0] = 6
DIR_LEN[1] = 7

cdef char PAIRS[200]          # "00" "01" ... "99": two digits per division
cdef uint64_t POW10[20]       # 10**0 .. 10**19


cdef void _tables() noexcept:
    cdef int i
    for i in range(100):
        PAIRS[2 * i] = <char>(48 + i // 10)
        PAIRS[2 * i + 1] = <char>(48 + i % 10)
    POW10[0] = 1
    for i in range(1, 20):
        POW10[i] = POW10[i - 1] * 10


_tables()


cdef struct text_t:
    const char *s
    Py_ssize_t n


@cython.cdivision(True)
cdef inline int _ndigits(uint64_t v) noexcept nogil:
    cdef int n = 1
    while n < 20 and v >= POW10[n]:
        n += 1
    return n


@cython.cdivision(True)
cdef inline char *_digits(char *p, uint64_t v, int n) noexcept nogil:
    # v in exactly n digits, zero-padded on the left; returns the end
    cdef char *q = p + n
    cdef uint64_t k
    while q - p >= 2:
        k = v % 100
        v = v // 100
        q -= 2
        q[0] = PAIRS[2 * k]
        q[1] = PAIRS[2 * k + 1]
    if q > p:
        q[-1] = <char>(48 + v % 10)
    return p + n


cdef inline char *_uint(char *p, uint64_t v) noexcept nogil:
    return _digits(p, v, _ndigits(v))


cdef inline char *_put(char *p, const char *s, Py_ssize_t n) noexcept nogil:
    memcpy(p, s, n)
    return p + n


cdef char *_wall_slow(char *p, uint64_t t0, int64_t offset, int digits) noexcept nogil:
    # Outside 0 .. 2**64 - 1 ns (a test's offset, never a clock's): Python's integers, as
    # clock.wall itself.  Its text is at most 11 + digits characters: [:11 + digits].
    cdef Py_ssize_t n
    with gil:
        text = _clock.wall(<object>t0 + <object>offset, digits).encode()    # Python's +
        n = len(text)
        MACE_ASSERT(n <= 20, "a wall-clock time has at most 20 characters")
        memcpy(p, <const char *>text, n)
    return p + n


@cython.cdivision(True)
cdef inline char *_wall(char *p, uint64_t t0, int64_t offset, int digits) noexcept nogil:
    # clock.wall(t0 + offset, digits): seconds, '.', the nine digits of the ns (rounded
    # to `digits` first), cut to 11 + digits characters as the Python slice cuts it
    cdef uint64_t ns, m, half, step, sec
    cdef int s, n
    if offset >= 0:
        ns = t0 + <uint64_t>offset
        if ns < t0:
            return _wall_slow(p, t0, offset, digits)
    else:
        m = <uint64_t>(-(offset + 1)) + 1
        if t0 < m:
            return _wall_slow(p, t0, offset, digits)
        ns = t0 - m
    if digits < 9:
        step = POW10[9 - digits]
        half = step // 2
        if ns > UINT64_MAX - half:
            return _wall_slow(p, t0, offset, digits)
        ns = (ns + half) // step * step
    sec = ns // 1000000000
    s = _ndigits(sec)
    _digits(p, sec, s)
    p[s] = b'.'
    _digits(p + s + 1, ns % 1000000000, 9)
    n = s + 10
    if n > 11 + digits:
        n = 11 + digits
    return p + n


cdef struct conf_t:
    int fmt
    bint hops
    int64_t offset
    text_t *targets
    Py_ssize_t ntargets
    text_t keys[2][MACE_HOPS]   # per direction, the text before each hop's value (JSON: its key)
    int nkeys[2]


cdef enum:
    OK = 0
    BAD_TARGET = 1
    BAD_DIR = 2
    BAD_HOPS = 3


cdef inline char *_mace(const conf_t *c, char *p, const mace_report *r, const text_t *t) noexcept nogil:
    # [prefix ][sec.usec] (seq) dir: latency
    p = _put(p, t.s, t.n)
    p[0] = b'['
    p = _wall(p + 1, r.t0, c.offset, 6)
    p = _put(p, b"] (", 3)
    p = _uint(p, r.seq)
    p = _put(p, b") ", 2)
    p = _put(p, DIR_NAME[r.dir], DIR_LEN[r.dir])
    p = _put(p, b": ", 2)
    p = _uint(p, r.latency)
    p[0] = b'\n'
    return p + 1


cdef inline char *_jsonl(const conf_t *c, char *p, const mace_report *r, const text_t *t) noexcept nogil:
    # {"ts":...,<target's fields>,"dir":"...","seq":..,"latency_ns":..,"len":..,"cpu":..[,"hops":{..}]}
    cdef int i, d = r.dir
    p = _put(p, b'{"ts":', 6)
    p = _wall(p, r.t0, c.offset, 9)
    p[0] = b','
    p = _put(p + 1, t.s, t.n)
    p = _put(p, b',"dir":"', 8)
    p = _put(p, DIR_NAME[d], DIR_LEN[d])
    p = _put(p, b'","seq":', 8)
    p = _uint(p, r.seq)
    p = _put(p, b',"latency_ns":', 14)
    p = _uint(p, r.latency)
    p = _put(p, b',"len":', 7)
    p = _uint(p, r.len)
    p = _put(p, b',"cpu":', 7)
    p = _uint(p, r.cpu)
    if c.hops:
        p = _put(p, b',"hops":{', 9)
        for i in range(c.nkeys[d]):
            if i:
                p[0] = b','
                p += 1
            p = _put(p, c.keys[d][i].s, c.keys[d][i].n)
            if r.hop[i]:
                p = _uint(p, r.hop[i])
            else:
                p = _put(p, b"null", 4)
        p[0] = b'}'
        p += 1
    return _put(p, b"}\n", 2)


cdef inline char *_csv(const conf_t *c, char *p, const mace_report *r, const text_t *t) noexcept nogil:
    # ts<,netns,target,container>,dir,seq,latency_ns,len,cpu[,hop cells of both directions]
    cdef int col, ncols, base, nh
    p = _wall(p, r.t0, c.offset, 9)
    p = _put(p, t.s, t.n)
    p[0] = b','
    p = _put(p + 1, DIR_NAME[r.dir], DIR_LEN[r.dir])
    p[0] = b','
    p = _uint(p + 1, r.seq)
    p[0] = b','
    p = _uint(p + 1, r.latency)
    p[0] = b','
    p = _uint(p + 1, r.len)
    p[0] = b','
    p = _uint(p + 1, r.cpu)
    if c.hops:
        ncols = c.nkeys[0] + c.nkeys[1]
        base = 0 if r.dir == 0 else c.nkeys[0]
        nh = r.nhops if r.nhops < MACE_HOPS else MACE_HOPS
        for col in range(ncols):
            p[0] = b','
            p += 1
            if base <= col < base + nh and r.hop[col - base]:
                p = _uint(p, r.hop[col - base])
    p[0] = b'\n'
    return p + 1


cdef inline int _check(const conf_t *c, const mace_report *r) noexcept nogil:
    # what the reference sinks could not write either (they raise)
    cdef int nh
    if r.dir > 1:
        return BAD_DIR
    if not c.hops or c.fmt == F_MACE:
        return OK
    nh = r.nhops if r.nhops < MACE_HOPS else MACE_HOPS
    if c.fmt == F_JSONL and nh != c.nkeys[r.dir]:
        return BAD_HOPS     # the hops are named one by one (zip(..., strict=True))
    if c.fmt == F_CSV and (0 if r.dir == 0 else c.nkeys[0]) + nh > c.nkeys[0] + c.nkeys[1]:
        return BAD_HOPS     # beyond the last hop column
    return OK


@cython.boundscheck(False)
@cython.wraparound(False)
cdef Py_ssize_t _run(const conf_t *c, const char *src, Py_ssize_t n, char *out, Py_ssize_t line_max,
                     Py_ssize_t target, char **end, int *why) noexcept nogil:
    # Lines of the n records at src, from out on; the index of the first record no line can
    # be made of (why says why), or -1.  out has room for n lines of line_max bytes.
    cdef Py_ssize_t i, t
    cdef mace_report r
    cdef char *p = out
    for i in range(n):
        memcpy(&r, src + i * sizeof(mace_report), sizeof(mace_report))     # any alignment
        t = target if target >= 0 else r.container
        why[0] = BAD_TARGET if t >= c.ntargets else _check(c, &r)
        if why[0] != OK:
            end[0] = p
            return i
        if c.fmt == F_JSONL:
            p = _jsonl(c, p, &r, &c.targets[t])
        elif c.fmt == F_CSV:
            p = _csv(c, p, &r, &c.targets[t])
        else:
            p = _mace(c, p, &r, &c.targets[t])
        MACE_ASSERT(p - out <= (i + 1) * line_max, "a report line fits its reserved room")
    end[0] = p
    return -1


@cython.final
cdef class Formatter:
    """Lines of one format for packed reports, each target's own text made once.

    `fmt` is "mace", "jsonl" or "csv"; `wall_offset_ns` turns the reports' CLOCK_MONOTONIC
    stamps into wall-clock ns (clock.wall_offset_ns()); with `hops`, JSON lines and CSV rows
    carry each report's hops, `hop_names` giving per direction the text before each hop's
    value (JSON: its key and colon; CSV: only their number, the hop columns).  Targets are
    numbered in the order added, as the reports' container index numbers them.
    """
    cdef conf_t conf
    cdef Py_ssize_t cap             # targets allocated
    cdef Py_ssize_t longest         # longest target text: with line_max, the room a line takes
    cdef Py_ssize_t line_max
    cdef list keep                  # the bytes objects every text_t points into

    def __cinit__(self):
        self.conf.targets = NULL
        self.conf.ntargets = 0
        self.cap = 0
        self.keep = []

    def __init__(self, str fmt, wall_offset_ns: int, *, bint hops=False, hop_names=((), ())):
        cdef int d, i
        cdef Py_ssize_t keys = 0
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}: one of {', '.join(FORMATS)}")
        if len(hop_names) != 2 or any(len(names) > MACE_HOPS for names in hop_names):
            raise ValueError(f"hop_names: two directions of at most {MACE_HOPS} hops each")
        self.conf.fmt = FORMATS[fmt]
        self.conf.offset = wall_offset_ns       # OverflowError beyond 64 bits
        self.conf.hops = hops
        for d in range(2):
            self.conf.nkeys[d] = len(hop_names[d])
            for i, name in enumerate(hop_names[d]):
                key = bytes(name)
                self.keep.append(key)
                self.conf.keys[d][i].s = key
                self.conf.keys[d][i].n = len(key)
                keys += len(key)
        self.line_max = FIXED_MAX + keys + HOP_VALUE_MAX * (self.conf.nkeys[0] + self.conf.nkeys[1])
        self.longest = 0

    def __dealloc__(self):
        free(self.conf.targets)

    @property
    def targets(self) -> int:
        """How many targets were added."""
        return self.conf.ntargets

    def add_target(self, text) -> int:
        """The next target (container index): the text every line of its reports carries
        (mace.output.sinks.target_prefix).  Returns its index."""
        cdef bytes b = bytes(text)
        cdef text_t *grown
        cdef Py_ssize_t i = self.conf.ntargets
        if i == self.cap:
            grown = <text_t *>realloc(self.conf.targets, (2 * self.cap + 4) * sizeof(text_t))
            if grown == NULL:
                raise MemoryError()
            self.conf.targets = grown
            self.cap = 2 * self.cap + 4
        self.keep.append(b)
        self.conf.targets[i].s = b
        self.conf.targets[i].n = len(b)
        self.conf.ntargets = i + 1
        if len(b) > self.longest:
            self.longest = len(b)
        return i

    def format(self, data, bytearray out, Py_ssize_t target=-1) -> int:
        """Append one line per packed report in `data` to `out`; returns how many.

        Each report is its container index's target's, or all are `target`'s (>= 0: the
        service, whose queues are one namespace's).  A report no line can be made of
        (an unknown target or direction, a hop count its direction does not have) raises
        ValueError and leaves `out` as it was."""
        cdef Py_buffer inb, outb
        cdef Py_ssize_t n, start, room, line_max, bad = -1
        cdef char *p = NULL
        cdef char *base
        cdef int why = OK
        if target < -1 or target >= self.conf.ntargets:
            raise IndexError(f"target {target}: {self.conf.ntargets} known")
        PyObject_GetBuffer(data, &inb, PyBUF_SIMPLE)
        try:
            if inb.len % sizeof(mace_report):
                raise ValueError(f"{inb.len} bytes are not whole reports of {sizeof(mace_report)}")
            n = inb.len // sizeof(mace_report)
            if n == 0:
                return 0
            line_max = self.line_max + self.longest
            if n > (<Py_ssize_t>0x7fffffffffffffff - PyByteArray_GET_SIZE(out)) // line_max:
                raise MemoryError()
            start = PyByteArray_GET_SIZE(out)
            room = n * line_max
            PyByteArray_Resize(out, start + room)
            # an exported buffer keeps another thread from resizing `out` while we write
            PyObject_GetBuffer(out, &outb, PyBUF_WRITABLE)
            try:
                base = <char *>outb.buf + start
                with nogil:
                    bad = _run(&self.conf, <const char *>inb.buf, n, base, line_max, target, &p, &why)
            finally:
                PyBuffer_Release(&outb)
            PyByteArray_Resize(out, start if bad >= 0 else start + (p - base))
            if bad >= 0:
                raise ValueError(self._refusal(bad, why, (<const char *>inb.buf)[
                    bad * sizeof(mace_report):(bad + 1) * sizeof(mace_report)], target))
            return n
        finally:
            PyBuffer_Release(&inb)

    def _refusal(self, Py_ssize_t i, int why, bytes record, Py_ssize_t target) -> str:
        _t0, _seq, _lat, _len, container, d, nhops, *_rest = _RECORD.unpack(record)
        if why == BAD_TARGET:
            return f"report {i} is of container {container}: {self.conf.ntargets} target(s) known"
        if why == BAD_DIR:
            return f"report {i} has direction {d}: 0 (egress) or 1 (ingress)"
        return (f"report {i} ({DIRECTIONS[d]}) carries {nhops} hops: its direction has "
                f"{self.conf.nkeys[d]} of {self.conf.nkeys[0] + self.conf.nkeys[1]} hop columns")

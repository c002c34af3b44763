"""Synthetic perf ring images: the bytes the kernel would write, built in Python.

Unit tests and benchmarks feed these to `mace.capture._ring.Rings.attach` so the decoder, the
cross-CPU merge and the correlator run without privileges.  Layouts come from format files
captured on a real kernel (`formats/`), so the raw records look exactly like the
kernel's, field offsets included.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import cache
from importlib import resources

from mace.capture.tracefs import EventFormat, parse_format

PAGE = 4096
PERF_RECORD_LOST = 2
PERF_RECORD_THROTTLE = 5
PERF_RECORD_UNTHROTTLE = 6
PERF_RECORD_SAMPLE = 9
HEAD_AT, TAIL_AT, DATA_OFFSET_AT, DATA_SIZE_AT = 1024, 1032, 1040, 1048


@cache
def builtin_format(qualified: str) -> EventFormat:
    """The layout of `system:name` as captured on Linux 6.18 (see formats/)."""
    system, _, name = qualified.partition(":")
    text = resources.files("mace.testing").joinpath(f"formats/{system}_{name}.format").read_text()
    return parse_format(text, system)


@cache
def builtin_layout(qualified: str) -> dict:
    """`Rings.add_kind` arguments for a captured tracepoint."""
    from mace.capture.perf import kind_layout
    return kind_layout(builtin_format(qualified))


def raw_record(fmt: EventFormat, values: dict, *, flags: int = 0, pid: int = 0) -> bytes:
    """The raw block of one tracepoint record: common header, fields, then __data_loc strings."""
    fixed = bytearray(fmt.size)
    struct.pack_into("<HBBi", fixed, 0, fmt.id, flags, 0, pid)
    tail = bytearray()
    for name, value in values.items():
        f = fmt.fields[name]
        if f.data_loc:
            data = value.encode() + b"\0" if isinstance(value, str) else bytes(value)
            struct.pack_into("<I", fixed, f.offset, (len(data) << 16) | (len(fixed) + len(tail)))
            tail += data
        elif isinstance(value, (str, bytes)):       # a char array in place
            data = value.encode() if isinstance(value, str) else value
            fixed[f.offset:f.offset + f.size] = data[:f.size].ljust(f.size, b"\0")
        else:
            code = {1: "B", 2: "H", 4: "I", 8: "Q"}[f.size]
            if f.signed:
                code = code.lower()
            struct.pack_into("<" + code, fixed, f.offset, value)
    return bytes(fixed + tail)


RAW_AT = 20        # where the raw block starts in a sample (see sample)


def sample(ts: int, cpu: int, tid: int, raw: bytes, *, pid: int | None = None) -> bytes:
    """A PERF_RECORD_SAMPLE with sample_type TIME|RAW, as mace opens its events: the
    thread is the raw block's common_pid (set here to `tid`) and the CPU is the ring's, so
    `cpu` and `pid` are not in the record (kept for callers that describe an event).  The
    kernel pads the raw block so that its u32 size plus the data is a multiple of 8."""
    del cpu, pid
    if len(raw) >= 8:
        raw = raw[:4] + struct.pack("<I", tid & 0xFFFFFFFF) + raw[8:]
    raw_size = (len(raw) + 4 + 7) // 8 * 8 - 4
    size = 8 + 8 + 4 + raw_size
    return (struct.pack("<IHH", PERF_RECORD_SAMPLE, 0, size) + struct.pack("<Q", ts)
            + struct.pack("<I", raw_size) + raw + bytes(raw_size - len(raw)))


def lost(count: int, ident: int = 0) -> bytes:
    return struct.pack("<IHHQQ", PERF_RECORD_LOST, 0, 24, ident, count)


def throttle(unthrottle: bool = False) -> bytes:
    kind = PERF_RECORD_UNTHROTTLE if unthrottle else PERF_RECORD_THROTTLE
    return struct.pack("<IHHQQQ", kind, 0, 32, 0, 0, 0)


def other(rtype: int, payload: bytes = b"") -> bytes:
    """A record of any type, e.g. one the reader does not know."""
    size = 8 + (len(payload) + 7) // 8 * 8
    return struct.pack("<IHH", rtype, 0, size) + payload.ljust(size - 8, b"\0")


@dataclass
class NetEvent:
    """What a test says happened; `encode` turns it into a sample."""

    tracepoint: str
    ts: int
    cpu: int = 0
    tid: int = 1
    skb: int = 0
    len: int = 0
    dev: str | None = None
    protocol: int | None = None
    flags: int = 0

    def encode(self) -> bytes:
        fmt = builtin_format(self.tracepoint)
        values = net_values(fmt, self.skb, self.len, self.dev, self.protocol)
        return sample(self.ts, self.cpu, self.tid, raw_record(fmt, values, flags=self.flags))


def net_values(fmt: EventFormat, skb: int, length: int, dev: str | None,
               protocol: int | None) -> dict:
    """raw_record values for the fields a tracepoint has of these: its key (skbaddr, or a
    socket's), length (a receive's signed return) and protocol (a receive's flags), and
    name (see mace.capture.perf.field_names)."""
    from mace.capture.perf import field_names
    names = field_names(fmt.qualified)
    values: dict = {}
    if names["key"] in fmt.fields:
        values[names["key"]] = skb
    if names["len"] in fmt.fields:
        f = fmt.fields[names["len"]]
        values[names["len"]] = length - (1 << 32) if f.signed and length >= 1 << 31 else length
    if names["proto"] in fmt.fields and protocol is not None:
        values[names["proto"]] = protocol
    if "name" in fmt.fields:
        values["name"] = dev or ""
    return values


class RingImage:
    """A writable buffer laid out like a perf mmap: control page, then `pages` data pages.

    `write` appends records at data_head (wrapping around the end like the kernel) and
    publishes the new head.  `start_at` moves head and tail to an offset, to make the next
    records straddle the wrap point.
    """

    def __init__(self, pages: int = 1):
        assert pages > 0 and pages & (pages - 1) == 0
        self.size = pages * PAGE
        self.buf = bytearray(PAGE + self.size)
        struct.pack_into("<QQ", self.buf, DATA_OFFSET_AT, PAGE, self.size)

    @property
    def head(self) -> int:
        return struct.unpack_from("<Q", self.buf, HEAD_AT)[0]

    @property
    def tail(self) -> int:
        return struct.unpack_from("<Q", self.buf, TAIL_AT)[0]

    def free(self) -> int:
        return self.size - (self.head - self.tail)

    def start_at(self, offset: int) -> None:
        assert self.head == self.tail, "ring must be empty"
        struct.pack_into("<QQ", self.buf, HEAD_AT, offset, offset)

    def write(self, *records: bytes) -> int:
        """Append records; returns how many fitted (the rest would be LOST in the kernel)."""
        done = 0
        for rec in records:
            if len(rec) > self.free():
                break
            head = self.head
            off = head % self.size
            first = min(len(rec), self.size - off)
            self.buf[PAGE + off:PAGE + off + first] = rec[:first]
            if first < len(rec):
                self.buf[PAGE:PAGE + len(rec) - first] = rec[first:]
            struct.pack_into("<Q", self.buf, HEAD_AT, head + len(rec))
            done += 1
        return done

    def data(self) -> bytes:
        """Unread bytes between tail and head, unwrapped (for the reference decoder)."""
        tail, head = self.tail, self.head
        out = bytearray()
        pos = tail
        while pos < head:
            off = pos % self.size
            n = min(head - pos, self.size - off)
            out += self.buf[PAGE + off:PAGE + off + n]
            pos += n
        return bytes(out)

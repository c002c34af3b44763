"""A minimal pcap reader: ICMP echo packets and their capture timestamps, for cross-checks.

tcpdump (`-w FILE --time-stamp-precision=nano`) is a second instrument next to mace's
tracepoints; this reads what it wrote, with the standard library only.  Both the classic
microsecond format (magic 0xa1b2c3d4) and the nanosecond one (0xa1b23c4d) are read, in
either byte order; link types Ethernet (with 802.1Q tags), Linux cooked (SLL, SLL2) and raw
IPv4.  IPv4 only: enough for the testbeds' pings.

Stamps are CLOCK_REALTIME ns, as AF_PACKET reports them.  `realtime_offset()` gives what to
subtract to compare them with CLOCK_MONOTONIC (mace's clock).

Matching the same probe in two captures: a masquerading host may rewrite the ICMP echo
identifier (conntrack picks a free one when it clashes), but never the sequence number; so
within one ping run, (type, seq) names a probe on either side of the NAT.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator
from typing import NamedTuple

MAGIC_US = 0xA1B2C3D4
MAGIC_NS = 0xA1B23C4D
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_LINUX_SLL2 = 276
ECHO_REPLY, ECHO_REQUEST = 0, 8
_ETH_IPV4, _ETH_VLAN = 0x0800, (0x8100, 0x88A8)


class Echo(NamedTuple):
    """One ICMP echo request (type 8) or reply (type 0) seen by a capture."""

    ts: int             # CLOCK_REALTIME ns
    type: int
    id: int
    seq: int
    src: str
    dst: str
    length: int         # IP total length


def records(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(timestamp ns, link type, frame) for each record of a pcap file's bytes."""
    if len(data) < 24:
        raise ValueError("not a pcap file: shorter than its header")
    for order in ("<", ">"):
        magic = struct.unpack_from(order + "I", data)[0]
        if magic in (MAGIC_US, MAGIC_NS):
            break
    else:
        raise ValueError(f"not a pcap file: magic {data[:4].hex()} (pcapng is not read)")
    frac = 1 if magic == MAGIC_NS else 1000
    linktype = struct.unpack_from(order + "I", data, 20)[0] & 0xFFFF
    rec = struct.Struct(order + "IIII")
    off = 24
    while off + rec.size <= len(data):
        sec, sub, incl, _orig = rec.unpack_from(data, off)
        off += rec.size
        if off + incl > len(data):
            break               # a truncated last record: tcpdump killed mid-write
        yield sec * 1_000_000_000 + sub * frac, linktype, data[off:off + incl]
        off += incl


def _ipv4(linktype: int, frame: bytes) -> bytes | None:
    if linktype in (LINKTYPE_RAW, LINKTYPE_IPV4):
        return frame if frame[:1] and frame[0] >> 4 == 4 else None
    if linktype == LINKTYPE_ETHERNET:
        off, proto = 14, struct.unpack_from("!H", frame, 12)[0] if len(frame) >= 14 else 0
        while proto in _ETH_VLAN and len(frame) >= off + 4:
            proto = struct.unpack_from("!H", frame, off + 2)[0]
            off += 4
    elif linktype == LINKTYPE_LINUX_SLL:
        off, proto = 16, struct.unpack_from("!H", frame, 14)[0] if len(frame) >= 16 else 0
    elif linktype == LINKTYPE_LINUX_SLL2:
        off, proto = 20, struct.unpack_from("!H", frame, 0)[0] if len(frame) >= 20 else 0
    else:
        raise ValueError(f"pcap link type {linktype} is not read")
    return frame[off:] if proto == _ETH_IPV4 else None


def _echo(ts: int, ip: bytes) -> Echo | None:
    if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != socket.IPPROTO_ICMP:
        return None
    ihl = (ip[0] & 0xF) * 4
    if len(ip) < ihl + 8 or struct.unpack_from("!H", ip, 6)[0] & 0x1FFF:
        return None             # a later fragment has no ICMP header
    typ, _code, _sum, ident, seq = struct.unpack_from("!BBHHH", ip, ihl)
    if typ not in (ECHO_REPLY, ECHO_REQUEST):
        return None
    return Echo(ts, typ, ident, seq, socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20]),
                struct.unpack_from("!H", ip, 2)[0])


def echoes(source: bytes | str | os.PathLike) -> list[Echo]:
    """The ICMP echo requests and replies in a pcap file (a path, or its bytes), in order."""
    if not isinstance(source, (bytes, bytearray)):
        with open(source, "rb") as f:
            source = f.read()
    out = []
    for ts, linktype, frame in records(bytes(source)):
        ip = _ipv4(linktype, frame)
        e = _echo(ts, ip) if ip is not None else None
        if e is not None:
            out.append(e)
    return out


def by_seq(found: list[Echo], typ: int) -> dict[int, Echo]:
    """The first echo of `typ` per sequence number (a duplicate, e.g. a retransmission by a
    bridge loop, would otherwise hide the original)."""
    out: dict[int, Echo] = {}
    for e in found:
        if e.type == typ:
            out.setdefault(e.seq, e)
    return out


def realtime_offset(tries: int = 50) -> int:
    """CLOCK_REALTIME - CLOCK_MONOTONIC in ns: the realtime reading bracketed by two
    monotonic ones, from the narrowest bracket of `tries` (a preemption widens a bracket;
    the narrowest one is the best estimate, good to its half width, usually < 100 ns)."""
    best = None
    for _ in range(tries):
        m1 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        r = time.clock_gettime_ns(time.CLOCK_REALTIME)
        m2 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        if best is None or m2 - m1 < best[0]:
            best = (m2 - m1, r - (m1 + m2) // 2)
    return best[1]

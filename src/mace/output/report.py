"""Latency reports as Python sees them, and the statistics every summary shows."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

from mace.correlate import _correlate

DIRECTIONS = _correlate.DIRECTIONS
# The packed record's struct layout; it doubles as the record's version (a saved queue in
# another layout cannot be read back).
REPORT_FORMAT: str = _correlate.REPORT_FORMAT
_REPORT = struct.Struct(REPORT_FORMAT)
REPORT_SIZE = _REPORT.size
_CONTAINER = struct.Struct("=H")
_CONTAINER_AT = 24          # offset of mace_report.container (after t0, seq, latency, len)
assert _CONTAINER_AT == struct.calcsize(REPORT_FORMAT[:5]), "REPORT_FORMAT and _CONTAINER_AT disagree"


class Report(NamedTuple):
    """One packet's crossing of the measured segment in one direction."""

    container: int      # index in the plan's containers
    dir: int            # 0 egress, 1 ingress
    seq: int            # per container and direction, from 1 (64 bits: it does not wrap)
    t0: int             # CLOCK_MONOTONIC ns when the packet entered the segment
    latency: int        # ns
    len: int            # bytes without the Ethernet header
    cpu: int            # CPU of the end event
    hops: tuple         # ns after t0 at each intermediate step, None where not seen

    @property
    def direction(self) -> str:
        return DIRECTIONS[self.dir]


def unpack(raw: bytes) -> Iterator[Report]:
    """Reports from Correlator.take_reports() bytes."""
    for t0, seq, lat, length, cont, d, nhops, cpu, _pad, *hops in _REPORT.iter_unpack(raw):
        yield Report(cont, d, seq, t0, lat, length, cpu,
                     tuple(h if h else None for h in hops[:nhops]))


def pack(r: Report) -> bytes:
    """The packed record of a report, as the correlator writes it (tests, saved state)."""
    hops = [h or 0 for h in r.hops] + [0] * (_correlate.HOPS - len(r.hops))
    return _REPORT.pack(r.t0, r.seq, r.latency, r.len, r.container, r.dir, len(r.hops), r.cpu, 0, *hops)


def split(chunks) -> dict[int, bytearray]:
    """Packed reports grouped by container index, each group in order."""
    out: dict[int, bytearray] = {}
    for raw in chunks:
        mv = memoryview(raw)
        for off in range(0, len(raw), REPORT_SIZE):
            c = _CONTAINER.unpack_from(raw, off + _CONTAINER_AT)[0]
            group = out.get(c)
            if group is None:
                group = out[c] = bytearray()
            group += mv[off:off + REPORT_SIZE]
    return out


def coverage(counts: dict) -> float | None:
    """Reports / packets that crossed and should have been reported.

    Packets that stayed on the host (local), were dropped by the kernel (dropped), or are
    still on their way (in_flight) are not misses; orphans, expiries, evictions and
    rejections are."""
    missed = counts["orphans"] + counts["expired"] + counts["evicted"] + counts["rejected"]
    total = counts["reports"] + missed
    return counts["reports"] / total if total else None


@dataclass
class Histogram:
    """A latency histogram with the correlator's log-linear buckets."""

    counts: list[int]

    @property
    def total(self) -> int:
        return sum(self.counts)

    def percentile(self, q: float) -> float | None:
        """The q-th percentile (0..100) in ns, at the middle of its bucket (< 1.6 % off)."""
        n = self.total
        if n == 0:
            return None
        rank = max(1, -(-q * n // 100))       # ceil, at least the first report
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank:
                lo, hi = _correlate.bucket_bounds(i)
                return (lo + hi - 1) / 2
        return None

    def max_value(self) -> float | None:
        """Upper edge of the highest non-empty bucket."""
        for i in range(len(self.counts) - 1, -1, -1):
            if self.counts[i]:
                return _correlate.bucket_bounds(i)[1] - 1
        return None

    def minus(self, older: Histogram) -> Histogram:
        """Counts added since `older` (a sliding window from two snapshots)."""
        return Histogram([a - b for a, b in zip(self.counts, older.counts, strict=True)])

"""Obviously-correct pure-Python models of the hot loop, for tests and benchmarks.

Each function here mirrors a Cython fast path in mace._ring (and later mace._correlate)
with plain loops and dicts.  Property tests feed both the same input and require the same
output; benchmarks report the Cython speed as a ratio to these.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from mace.perf import Event
from mace.synthetic import PERF_RECORD_LOST, PERF_RECORD_SAMPLE, PERF_RECORD_THROTTLE, PERF_RECORD_UNTHROTTLE

DEV_NONE = -1
DEV_OTHER = -2


@dataclass
class RingCounters:
    records: int = 0
    samples: int = 0
    lost: int = 0
    throttled: int = 0
    unknown: int = 0
    errors: int = 0


@dataclass
class ReferenceDecoder:
    """Decodes unwrapped ring bytes the way `Rings` does.  kinds: dicts as for add_kind."""

    kinds: list[dict]
    devices: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.by_tp = {k["tp_id"]: i for i, k in enumerate(self.kinds)}
        self.slots = {name: i for i, name in enumerate(self.devices)}

    def device(self, raw: bytes) -> int:
        name = raw[:16].split(b"\0", 1)[0]
        if not name or len(name) >= 16:
            return DEV_OTHER
        return self.slots.get(name.decode(errors="replace"), DEV_OTHER)

    def decode(self, data: bytes) -> tuple[list[Event], RingCounters]:
        events: list[Event] = []
        c = RingCounters()
        pos = 0
        while pos < len(data):
            avail = len(data) - pos
            if avail < 8:
                c.errors += 1
                break
            rtype, _misc, size = struct.unpack_from("<IHH", data, pos)
            if size < 8 or size % 8 or size > avail:
                c.errors += 1
                break
            rec = data[pos:pos + size]
            c.records += 1
            if rtype == PERF_RECORD_SAMPLE:
                status, ev = self._sample(rec)
                if status == "ok":
                    c.samples += 1
                    events.append(ev)
                elif status == "unknown":
                    c.unknown += 1
                elif status == "bad-field":
                    c.errors += 1
                else:
                    c.errors += 1
                    break
            elif rtype == PERF_RECORD_LOST:
                if size >= 24:
                    c.lost += struct.unpack_from("<Q", rec, 16)[0]
                else:
                    c.errors += 1
            elif rtype in (PERF_RECORD_THROTTLE, PERF_RECORD_UNTHROTTLE):
                c.throttled += 1
            else:
                c.unknown += 1
            pos += size
        return events, c

    def _sample(self, rec: bytes):
        if len(rec) < 44:
            return "malformed", None
        raw_size = struct.unpack_from("<I", rec, 32)[0]
        if raw_size < 8 or raw_size > len(rec) - 36:
            return "malformed", None
        raw = rec[36:36 + raw_size]
        tp = struct.unpack_from("<H", raw, 0)[0]
        if tp not in self.by_tp:
            return "unknown", None
        kind = self.by_tp[tp]
        k = self.kinds[kind]
        if raw_size < max(k["min_raw"], 8):
            return "bad-field", None
        tid = struct.unpack_from("<I", rec, 12)[0]
        ts = struct.unpack_from("<Q", rec, 16)[0]
        cpu = struct.unpack_from("<I", rec, 24)[0] & 0xFFFF

        def field_at(off: int, code: str) -> int:
            return struct.unpack_from("<" + code, raw, off)[0] if off >= 0 else 0

        dev = DEV_NONE
        if k["name_off"] >= 0:
            loc = field_at(k["name_off"], "I")
            noff, nlen = loc & 0xFFFF, loc >> 16
            if noff + nlen > raw_size:
                return "bad-field", None
            dev = self.device(raw[noff:noff + nlen])
        return "ok", Event(ts=ts, skb=field_at(k["skb_off"], "Q"), len=field_at(k["len_off"], "I"),
                           tid=tid, cpu=cpu, kind=kind, flags=raw[2], dev=dev,
                           proto=field_at(k["proto_off"], "H"))


def merge(per_ring: list[list[Event]], horizon: int | None = None) -> tuple[list[Event], list[list[Event]]]:
    """Merge rings into time order (ties: lower ring first, then arrival order) and split at
    `horizon` (None: everything).  Returns (released, kept back per ring)."""
    tagged = [(ev.ts, r, i, ev) for r, evs in enumerate(per_ring) for i, ev in enumerate(evs)]
    tagged.sort(key=lambda t: t[:3])
    released = [t[3] for t in tagged if horizon is None or t[0] <= horizon]
    kept = [[ev for ev in sorted(evs, key=lambda e: e.ts) if horizon is not None and ev.ts > horizon]
            for evs in per_ring]
    return released, kept

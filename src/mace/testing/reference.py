"""Obviously-correct pure-Python models of the hot loop, for tests and benchmarks.

Each function here mirrors a Cython fast path in mace.capture._ring (and later mace.correlate._correlate)
with plain loops and dicts.  Property tests feed both the same input and require the same
output; benchmarks report the Cython speed as a ratio to these.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from socket import IPPROTO_TCP, IPPROTO_UDP, MSG_ERRQUEUE, MSG_PEEK

from mace.capture._ring import DEV_NONE, DEV_OTHER
from mace.capture.perf import Event
from mace.correlate._correlate import (
    ANSWERS_KEPT,
    ARP_L3,
    ARP_PAD_L3,
    CALLS,
    CLASSES,
    CTX_BITS,
    ETH_HLEN,
    FLUSH_MAX_NS,
    HOPS,
    NA_L3,
    ND_L3,
    PQ,
    SYNC_MAX_NS,
    TYPES,
)
from mace.testing.synthetic import (
    PERF_RECORD_LOST,
    PERF_RECORD_SAMPLE,
    PERF_RECORD_THROTTLE,
    PERF_RECORD_UNTHROTTLE,
    RAW_AT,
)


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
        # names compare as bytes, as in the kernel and in Rings
        self.slots = {(n.encode() if isinstance(n, str) else bytes(n)): i
                      for i, n in enumerate(self.devices)}

    def device(self, raw: bytes) -> int:
        name = raw[:16].split(b"\0", 1)[0]
        if not name or len(name) >= 16:
            return DEV_OTHER
        return self.slots.get(name, DEV_OTHER)

    def decode(self, data: bytes, cpu: int = 0) -> tuple[list[Event], RingCounters]:
        """The events of one ring's bytes; `cpu` is the ring's (samples do not carry it)."""
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
                status, ev = self._sample(rec, cpu)
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

    def _sample(self, rec: bytes, cpu: int):
        # sample_type TIME|RAW: header, time, raw size, raw block (see mace.testing.synthetic)
        if len(rec) < RAW_AT + 8:
            return "malformed", None
        raw_size = struct.unpack_from("<I", rec, RAW_AT - 4)[0]
        if raw_size < 8 or raw_size > len(rec) - RAW_AT:
            return "malformed", None
        raw = rec[RAW_AT:RAW_AT + raw_size]
        tp = struct.unpack_from("<H", raw, 0)[0]
        if tp not in self.by_tp:
            return "unknown", None
        kind = self.by_tp[tp]
        k = self.kinds[kind]
        if raw_size < max(k["min_raw"], 8):
            return "bad-field", None
        tid = struct.unpack_from("<I", raw, 4)[0]         # common_pid
        ts = struct.unpack_from("<Q", rec, 8)[0]

        def field_at(off: int, code: str) -> int:
            return struct.unpack_from("<" + code, raw, off)[0] if off >= 0 else 0

        dev = DEV_NONE
        if k["name_off"] >= 0 and k.get("name_size"):
            dev = self.device(raw[k["name_off"]:k["name_off"] + k["name_size"]])
        elif k["name_off"] >= 0:
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


# -- correlation --------------------------------------------------------------------------

# The constants come from the compiled correlator, so the two cannot drift apart; the rules
# that use them are written out again below, which is the point of a reference.
T_NONE = 0
T_XMIT, T_RECV, T_RX, T_QUEUE, T_FREE, T_ROUTE, T_CALL, T_RETURN, T_READY, T_RECEIVED = (TYPES[t] for t in (
    "net:net_dev_start_xmit", "net:netif_receive_skb", "net:netif_rx", "net:net_dev_queue", "skb:kfree_skb",
    "fib:fib_table_lookup", "syscalls:sys_enter_sendto", "syscalls:sys_exit_sendto", "sock:sk_data_ready",
    "sock:sock_recv_length"))
C_INNER, C_VETH, C_BRIDGE, C_UPLINK = (CLASSES[c] for c in ("inner", "veth", "bridge", "uplink"))
EGRESS, INGRESS = 0, 1
COUNTERS = ("crossed", "reports", "local", "dropped", "orphans", "expired", "evicted", "rejected", "unpaired")


@dataclass
class Step:
    type: int
    cls: int
    prev: frozenset          # steps this one may directly follow
    sync: bool
    traced: bool
    attr: bool = False
    end: bool = False
    hop: int = -1


def paths(hops: bool, bridge: bool, end_at_queue: bool,
          veth_start: bool = False, route: bool = False, socket: bool = False) -> tuple[list[Step], list[Step]]:
    """The two paths, as in Correlator._plan.  A route step only times the routing decision
    of the chain it lies in (see ReferenceCorrelator._route): no step follows it."""
    egress = [
        Step(T_XMIT, C_INNER, frozenset(), False, not veth_start),
        Step(T_RX, C_VETH, frozenset({0}), True, hops or veth_start, attr=True, hop=0),
        Step(T_RECV, C_VETH, frozenset({0, 1}), False, True, attr=True, hop=1),
        Step(T_RECV, C_BRIDGE, frozenset({2}), True, hops and bridge, hop=2),
        Step(T_ROUTE, C_UPLINK, frozenset({2, 3}), True, route, hop=3),
        Step(T_QUEUE, C_UPLINK, frozenset({2, 3}), True, True, end=end_at_queue,
             hop=-1 if end_at_queue else 4),
        Step(T_XMIT, C_UPLINK, frozenset({5}), False, not end_at_queue, end=True),
    ]
    ingress = [
        Step(T_RECV, C_UPLINK, frozenset(), False, True),
        Step(T_ROUTE, C_BRIDGE | C_VETH, frozenset({0}), True, route, hop=0),
        Step(T_XMIT, C_BRIDGE, frozenset({0}), True, hops and bridge, hop=1),
        Step(T_XMIT, C_VETH, frozenset({0, 2}), True, True, attr=True, hop=2),
        Step(T_RX, C_INNER, frozenset({3}), True, hops, hop=3),
        Step(T_RECV, C_INNER, frozenset({3, 4}), False, True, end=not socket, hop=4 if socket else -1),
    ]
    if socket:      # into a socket's queue in the receive's chain, out of it by a receive call
        ingress += [Step(T_READY, 0, frozenset({5}), True, True),
                    Step(T_RECEIVED, 0, frozenset({6}), False, True, end=True)]
    return egress, ingress


def payload_fits(ret: int, l3: int, proto: int, ipv6: bool) -> bool:
    """What a datagram socket's receive returns of an l3-byte packet: all of it (raw IPv4),
    or what follows the IP header (IPv4 20..60 in steps of 4, IPv6 40.. in steps of 8) and
    UDP's 8 bytes."""
    if ret > l3:
        return False
    h = l3 - ret
    if proto == IPPROTO_UDP:
        if h < 8:
            return False
        h -= 8
    elif h == 0 and not ipv6:
        return True
    if ipv6:
        return 40 <= h <= 512 and h % 8 == 0
    return 20 <= h <= 60 and h % 4 == 0


@dataclass
class Entry:
    dir: int
    t0: int
    l3: int
    start_dev: int
    proto: int
    cpu: int
    tid: int
    step: int = 0
    tlast: int = 0
    container: int = -1
    ctx: int = 0             # interrupt context of the last matched event
    parked: bool = False     # waiting in a neighbour queue (ARP, ND)
    queued: bool = False     # ... behind another packet, which asked the neighbour
    ipv6: bool = False       # queued in a socket: an IPv6 packet
    hops: list = field(default_factory=lambda: [0] * HOPS)


@dataclass
class RefReport:
    t0: int
    latency: int
    len: int
    seq: int
    container: int
    dir: int
    cpu: int
    hops: tuple


class ReferenceCorrelator:
    """Mace's correlation rules with a dict for a table (unbounded, never evicts).

    Same inputs as mace.correlate._correlate.Correlator; `explain`, when given, is called with a
    line of text for every decision (a debugging aid: `mace` keeps none of this).
    """

    def __init__(self, kind_types, dev_classes, dev_containers, inner_slots, *,
                 max_age_ns=1_000_000_000, hops=False, bridge=True, end_at_queue=False,
                 veth_start=False, route=False, socket=False, explain=None):
        self.kind_types = list(kind_types)
        self.dev_classes = list(dev_classes)
        self.dev_containers = list(dev_containers)
        self.inner_of = list(inner_slots)
        self.max_age = max_age_ns
        self.paths = paths(hops, bridge, end_at_queue, veth_start, route, socket)
        self.veth_start = veth_start
        self.socket = socket
        self.nhops = (5, 5 if socket else 4)
        # tid % CALLS -> (tid, when its send call began): one thread a slot, as the
        # correlator's table (a thread whose slot another took is not in a call)
        self.calls: dict[int, tuple[int, int]] = {}
        self.socks: dict[int, list[int]] = {}       # socket -> [head, tail] of its queue
        self.boundary = (1 if hops or veth_start else 2, 3)
        self.table: dict[int, Entry] = {}
        # cpu -> [(skb, ts of its entry's last move)], oldest first: call chains awaiting
        # their next synchronous step (several when a batch of receives precedes forwarding)
        self.pending: dict[int, list[tuple[int, int]]] = {}
        # cpu -> its last packet event (skb, type, class, tid, ctx), whether a routing
        # decision came since, whether its pending chains are a batch
        self.notes: dict[int, dict] = {}
        self.count = [[dict.fromkeys(COUNTERS, 0) for _ in range(2)] for _ in self.inner_of]
        self.glob: dict[str, int] = {}
        self.seq = [[0, 0] for _ in self.inner_of]
        self.reports: list[RefReport] = []
        self.now = 0
        # per direction: when a neighbour resolution began (0: none in progress), and the
        # call chain that flushes its queue; when a packet last asked, and the receives since
        # that may be the answer, the oldest replaced.  A chain: [skb (the answer's, whose
        # later steps move it), ts (0: none), cpu, tid, ctx, the container it sends to or -1]
        self.nq_since = [0, 0]
        self.nq_open = [False, False]
        self.flush = [[0, 0, 0, 0, 0, -1] for _ in range(2)]
        self.ask_at = [0, 0]
        self.answers = [[[0, 0, 0, 0, 0, -1] for _ in range(ANSWERS_KEPT)] for _ in range(2)]
        self.answer_next = [0, 0]
        self.explain = explain

    def _say(self, text):
        if self.explain:
            self.explain(text)

    def _g(self, name):
        self.glob[name] = self.glob.get(name, 0) + 1

    def _c(self, container, direction, name):
        self.count[container][direction][name] += 1

    def _retire(self, e: Entry, counter: str):
        if counter == "expired" and (self._awaits_socket(e) or (e.container >= 0 and self._queued(e))):
            # the container never read it; or nothing ended its chain: no socket took it
            counter = "unpaired"
        if e.container >= 0:
            self._c(e.container, e.dir, counter)
        else:
            self._g({"expired": "stale", "evicted": "evicted"}.get(counter, "superseded"))

    def _expired(self, e: Entry) -> bool:
        """Past its age by the correlator's clock (the newest event seen)."""
        return self.now > e.t0 + self.max_age

    def _sync_wait(self, e: Entry) -> bool:
        return any(st.traced and st.sync and st.type != T_ROUTE and e.step in st.prev
                   for st in self.paths[e.dir][e.step + 1:])

    def _route(self, ev, cls: int) -> None:
        """A routing decision times the CPU's one pending call chain, if it is that chain's
        (same thread and context, not parked, in time) and its path has a route step for
        this device's class next; the first one counts.  A batch (several pending) gets none."""
        note = self.notes.setdefault(ev.cpu, {})
        note["routed"] = True
        q = self.pending.get(ev.cpu, [])
        e = self.table.get(q[0][0]) if len(q) == 1 and not note.get("batch") else None
        if (e is not None and e.cpu == ev.cpu and e.tid == ev.tid and e.ctx == ev.flags & CTX_BITS
                and not e.parked and 0 <= ev.ts - (e.t0 + e.tlast) <= SYNC_MAX_NS):
            for st in self.paths[e.dir][e.step + 1:]:
                if st.type == T_ROUTE and st.traced and e.step in st.prev and st.cls & cls:
                    if not e.hops[st.hop]:
                        e.hops[st.hop] = max(ev.ts - e.t0, 1)
                    return
        self._g("route_unclaimed")

    def _match(self, e: Entry, ev, t: int, cls: int, adjacent: bool) -> int:
        adjacent = (adjacent and e.cpu == ev.cpu and e.tid == ev.tid
                    and e.ctx == ev.flags & CTX_BITS and ev.ts - (e.t0 + e.tlast) <= SYNC_MAX_NS)
        l3 = ev.len - ETH_HLEN if t in (T_XMIT, T_QUEUE) else ev.len
        if l3 != e.l3 or ev.ts < e.t0 + e.tlast:
            return -1
        for j, st in enumerate(self.paths[e.dir]):
            if j <= e.step or not st.traced or e.step not in st.prev:
                continue
            if st.type != t or not st.cls & cls:
                continue
            if st.sync and not adjacent:
                to = self.dev_containers[ev.dev] if st.cls == C_VETH else -1
                if e.parked:
                    if not self._flushed(e, ev, to):
                        continue
                elif not (self._may_queue(e) and self._flushed(e, ev, to)):
                    continue
            if e.container >= 0:
                if st.cls == C_VETH and self.dev_containers[ev.dev] != e.container:
                    continue
                if st.cls == C_INNER and ev.dev != self.inner_of[e.container]:
                    continue
            elif st.attr and e.dir == EGRESS:
                x = self.dev_containers[ev.dev]
                if x < 0 or self.inner_of[x] != e.start_dev:
                    continue
            if st.sync and not adjacent and not e.parked:
                self._say(f"{ev.skb:#x} left the neighbour queue its chain ended in")
                e.parked = e.queued = True
                self._g("parked")
            return j
        return -1

    def _flushed(self, e: Entry, ev, to: int) -> bool:
        # `to`: the container ev sends to (-1: not said); an answer from a container's veth
        # flushes only packets to it
        return any((ev.cpu, ev.tid, ev.flags & CTX_BITS) == (cpu, tid, ctx)
                   and 0 <= ev.ts - ts <= FLUSH_MAX_NS and ts > e.t0 + e.tlast
                   and (to < 0 or cont < 0 or cont == to)
                   for _, ts, cpu, tid, ctx, cont in (*self.answers[e.dir], self.flush[e.dir]) if ts)

    def _answer(self, ev, t: int, cls: int) -> None:
        if t not in (T_RECV, T_RX):
            return
        if ev.len not in (ARP_L3, ND_L3, NA_L3) and not (ev.len == ARP_PAD_L3 and cls & C_UPLINK):
            return
        if t == T_RX and ev.proto not in (0x0806, 0x86DD):
            return
        for d in (EGRESS, INGRESS):
            if not cls & (C_UPLINK if d == EGRESS else C_VETH):
                continue
            if self.ask_at[d] and ev.ts <= self.ask_at[d] + self.max_age:
                # every receive of an answer's size may be it (a 72-byte TCP ACK, a padded
                # frame are as well); the answer's next steps move its own chain
                kept = self.answers[d]
                now = self._chain(ev, self.dev_containers[ev.dev] if d == INGRESS else -1)
                same = [k for k, a in enumerate(kept) if a[0] == ev.skb and 0 <= ev.ts - a[1] <= SYNC_MAX_NS]
                if same:
                    kept[same[0]] = now
                else:
                    kept[self.answer_next[d]] = now
                    self.answer_next[d] = (self.answer_next[d] + 1) % ANSWERS_KEPT
            f = self.flush[d]
            # the answer's next steps (its backlog) move the chain the queue is flushed in
            later = ev.skb and f[0] == ev.skb and 0 <= ev.ts - f[1] <= SYNC_MAX_NS
            if self.nq_open[d] or later:
                self._say(f"neighbour answered ({'egress' if d == EGRESS else 'ingress'})")
                self.nq_open[d] = False
                self.flush[d] = self._chain(ev, self.dev_containers[ev.dev] if d == INGRESS else -1)

    @staticmethod
    def _chain(ev, cont: int) -> list[int]:
        return [ev.skb, ev.ts, ev.cpu, ev.tid, ev.flags & CTX_BITS, cont]

    def _may_queue(self, e: Entry) -> bool:
        since = self.nq_since[e.dir]
        last = e.t0 + e.tlast
        if not since or self.now > since + self.max_age or last + SYNC_MAX_NS < since:
            return False
        if not self.nq_open[e.dir] and last > self.flush[e.dir][1]:
            return False
        if e.dir == EGRESS and e.container < 0:
            return False
        for st in self.paths[e.dir][e.step + 1:]:
            if not st.traced or not st.sync or e.step not in st.prev:
                continue
            if e.dir == EGRESS and st.type == T_QUEUE and st.cls & C_UPLINK:
                return True
            if e.dir == INGRESS and st.type == T_XMIT and st.cls & (C_BRIDGE | C_VETH):
                return True
        return False

    def feed(self, events) -> None:
        for ev in events:
            self.event(ev)

    def event(self, ev) -> None:
        t = self.kind_types[ev.kind] if ev.kind < len(self.kind_types) else T_NONE
        cls = self.dev_classes[ev.dev] if 0 <= ev.dev < len(self.dev_classes) else 0
        self._g("events")
        self.now = max(self.now, ev.ts)
        if t == T_ROUTE:
            self._route(ev, cls)
            return
        if t in (T_CALL, T_RETURN):
            self._call(ev, t == T_CALL)
            return
        if t == T_READY:
            self._ready(ev)
            return
        if t == T_RECEIVED:
            self._received(ev)
            return
        if ev.skb == 0:
            self._g("ignored")
            return
        if t == T_FREE:
            self._g("frees")
            e = self.table.pop(ev.skb, None)
            if e is not None:
                self._say(f"{ev.skb:#x} dropped (kfree_skb)")
                self._retire(e, "expired" if self._expired(e) else "dropped")
            return
        if t == T_NONE or cls == 0:
            self._g("ignored")
            self._settle(ev, t, cls)
            self._note(ev, t, cls)
            return
        adjacent, front = self._settle(ev, t, cls)
        self._note(ev, t, cls)
        self._answer(ev, t, cls)
        e = self.table.get(ev.skb)
        if e is not None and self._expired(e):
            self._say(f"{ev.skb:#x} expired")
            self._retire(e, "expired")
            del self.table[ev.skb]
            e = None
        if e is not None:
            j = self._match(e, ev, t, cls, adjacent)
            if j >= 0:
                self._advance(e, ev, j, front)
                return
            if self._conflict(e, ev, t, cls):
                return
        self._fresh(ev, t, cls)

    def _settle(self, ev, t: int, cls: int) -> tuple[bool, bool]:
        """Before ev: the chains queued before it (if it continues one) or all of them (if
        it starts something else than the batch) ended.  Returns (adjacent, front)."""
        q = self.pending.setdefault(ev.cpu, [])
        skbs = [skb for skb, _ in q]
        if ev.skb in skbs:
            pos = skbs.index(ev.skb)
            for skb, ts in q[:pos]:     # ev is another packet's step: it asks for nothing
                self._resolve(ev.cpu, skb, ts, ev, t, cls, asks=False)
            del q[:pos + 1]
            if not q:
                self.notes.setdefault(ev.cpu, {})["batch"] = False
            return True, True
        if q and not self._sibling(q[-1][0], ev, t, cls):
            for i, (skb, ts) in enumerate(q):      # a request would be the newest chain's
                self._resolve(ev.cpu, skb, ts, ev, t, cls, asks=i == len(q) - 1)
            q.clear()
            self.notes.setdefault(ev.cpu, {})["batch"] = False
        return False, False

    def _note(self, ev, t: int, cls: int) -> None:
        """Two packets' events of one kind and class in a row on a CPU, in one thread and
        context, with no routing decision between: a batch, whose decisions are not timed."""
        note = self.notes.setdefault(ev.cpu, {})
        me = (t, cls, ev.tid, ev.flags & CTX_BITS)
        if note.get("skb") and note["skb"] != ev.skb and note["what"] == me and not note["routed"]:
            note["batch"] = True
        note.update(skb=ev.skb, what=me, routed=False)

    def _sibling(self, skb: int, ev, t: int, cls: int) -> bool:
        e = self.table.get(skb)
        if e is None:
            return False
        st = self.paths[e.dir][e.step]
        return st.type == t and bool(st.cls & cls) and e.tid == ev.tid and e.ctx == ev.flags & CTX_BITS

    def _push(self, e: Entry, ev, front: bool) -> None:
        if not self._sync_wait(e):
            return
        q = self.pending.setdefault(ev.cpu, [])
        if len(q) == PQ:
            self._g("pending_overflow")
            del q[0]
        q.insert(0 if front else len(q), (ev.skb, ev.ts))

    def _advance(self, e: Entry, ev, j: int, front: bool) -> None:
        st = self.paths[e.dir][j]
        delta = ev.ts - e.t0
        if st.attr and e.container < 0:
            if e.dir == INGRESS:
                e.proto = ev.proto
            if e.proto not in (0x0800, 0x86DD):
                self._g("nonip")
                del self.table[ev.skb]
                return
            e.container = self.dev_containers[ev.dev]
            self._c(e.container, e.dir, "crossed")
        if st.hop >= 0:
            e.hops[st.hop] = delta
        if e.parked:
            self.nq_open[e.dir] = False
            self.flush[e.dir] = self._chain(ev, e.container if e.dir == INGRESS else -1)
            self.flush[e.dir][0] = 0        # (a packet's step, not an answer's)
        e.step, e.tlast, e.cpu, e.tid, e.parked, e.queued = j, delta, ev.cpu, ev.tid, False, False
        e.ctx = ev.flags & CTX_BITS
        self._say(f"{ev.skb:#x} {'egress' if e.dir == EGRESS else 'ingress'} step {j}")
        if st.end:
            self._report(e, ev)
            del self.table[ev.skb]
            return
        self._push(e, ev, front)

    def _report(self, e: Entry, ev) -> None:
        c, d = e.container, e.dir
        self.seq[c][d] += 1
        self._c(c, d, "reports")
        self.reports.append(RefReport(e.t0, ev.ts - e.t0, e.l3, self.seq[c][d], c, d, ev.cpu,
                                      tuple(e.hops[:self.nhops[d]])))

    def _awaits_socket(self, e: Entry) -> bool:
        """Received by a container's device, its socket's data_ready next if any takes it."""
        st = self.paths[INGRESS][e.step]
        return self.socket and e.container >= 0 and e.dir == INGRESS and st.type == T_RECV and st.cls == C_INNER

    def _queued(self, e: Entry) -> bool:
        """Waiting in a socket's queue (the socket segment)."""
        return self.socket and e.dir == INGRESS and self.paths[INGRESS][e.step].type == T_READY

    # -- the socket segment ---------------------------------------------------------------------

    def _call(self, ev, enter: bool) -> None:
        if enter:
            self.calls[ev.tid % CALLS] = (ev.tid, ev.ts)
        elif self.calls.get(ev.tid % CALLS, (None,))[0] == ev.tid:
            del self.calls[ev.tid % CALLS]

    def _ready(self, ev) -> None:
        """A packet joins socket ev.skb's queue, in the chain that received it (the CPU's one
        pending chain, not a batch), keyed from now on by its place there.  One we cannot
        tell keeps its place in a datagram socket's queue, empty: a receive takes it."""
        q = self.pending.get(ev.cpu, [])
        note = self.notes.get(ev.cpu, {})
        e = self.table.get(q[0][0]) if self.socket and len(q) == 1 and not note.get("batch") else None
        if e is not None and self._expired(e):
            self._retire(e, "expired")
            del self.table[q[0][0]]
            e = None
        j = None
        if e is not None:
            j = next((j for j, st in enumerate(self.paths[INGRESS])
                      if j > e.step and st.type == T_READY and e.step in st.prev), None)
        if (e is None or e.dir != INGRESS or e.container < 0 or e.cpu != ev.cpu or e.tid != ev.tid
                or e.ctx != ev.flags & CTX_BITS or e.parked or not 0 <= ev.ts - (e.t0 + e.tlast) <= SYNC_MAX_NS
                or j is None):
            self._g("sock_unclaimed")
            if self.socket and ev.proto != IPPROTO_TCP:
                self.socks.setdefault(ev.skb, [0, 0])[1] += 1   # its place kept: a receive takes it
            return
        skb = q[0][0]
        del q[0]
        if not q:
            note["batch"] = False
        del self.table[skb]
        if ev.proto == IPPROTO_TCP:
            self._c(e.container, INGRESS, "unpaired")
            return
        head_tail = self.socks.setdefault(ev.skb, [0, 0])
        e.ipv6 = e.proto == 0x86DD
        e.step, e.tlast, e.cpu, e.ctx, e.proto = j, ev.ts - e.t0, ev.cpu, ev.flags & CTX_BITS, ev.proto
        self.table[("queued", ev.skb, head_tail[1])] = e
        self._g("inserts")
        head_tail[1] += 1
        self._say(f"{skb:#x} queued on socket {ev.skb:#x}")

    def _received(self, ev) -> None:
        """A receive call of socket ev.skb returned ev.len bytes: the head of its queue."""
        ret = ev.len - (1 << 32) if ev.len >= 1 << 31 else ev.len
        if not self.socket or ret < 0 or ev.proto & (MSG_PEEK | MSG_ERRQUEUE):
            return
        ht = self.socks.get(ev.skb)
        if ht is None or ht[0] == ht[1]:
            self._g("recv_unpaired")
            return
        key = ("queued", ev.skb, ht[0])
        ht[0] += 1
        e = self.table.pop(key, None)
        if e is None:
            self._g("recv_unpaired")
            return
        if self._expired(e):
            self._retire(e, "expired")
            self._g("recv_unpaired")
            return
        if ev.ts >= e.t0 + e.tlast and payload_fits(ret, e.l3, e.proto, e.ipv6):
            self._report(e, ev)
        else:
            self._c(e.container, INGRESS, "unpaired")

    def _resolve(self, cpu: int, skb: int, ts: int, ev, t: int, cls: int, asks: bool) -> None:
        e = self.table.get(skb)
        if e is None or e.cpu != cpu or e.t0 + e.tlast != ts or not self._sync_wait(e):
            return
        if self._expired(e):
            self._retire(e, "expired")
            del self.table[skb]
            return
        if asks and ev.tid == e.tid and ev.flags & CTX_BITS == e.ctx:
            if e.dir == EGRESS:
                ask = ND_L3 if e.proto == 0x86DD else ARP_L3
                arp = e.container >= 0 and t == T_QUEUE and cls & C_UPLINK and ev.len - ETH_HLEN == ask
            else:
                arp = t == T_XMIT and cls & (C_BRIDGE | C_VETH) and (
                    (ev.proto == 0x0806 and ev.len - ETH_HLEN == ARP_L3)
                    or (ev.proto == 0x86DD and ev.len - ETH_HLEN == ND_L3))
            if arp:
                self._say(f"{skb:#x} parked behind a neighbour request")
                e.parked = True
                self._g("parked")
                self.ask_at[e.dir] = e.t0 + e.tlast
                if not self.nq_open[e.dir]:
                    self.nq_open[e.dir] = True
                    self.nq_since[e.dir] = e.t0 + e.tlast
                return
        if self._may_queue(e):
            self._say(f"{skb:#x} queued behind a neighbour request")
            e.parked = e.queued = True
            self._g("parked")
            return
        if self._awaits_socket(e):
            self._c(e.container, INGRESS, "unpaired")       # no socket took it in its chain
        elif e.container >= 0:
            self._c(e.container, e.dir, "local" if e.dir == EGRESS else "rejected")
        else:
            self._g("foreign" if e.dir == EGRESS else "unclaimed")
        self._say(f"{skb:#x} call chain ended at step {e.step}")
        del self.table[skb]

    def _conflict(self, e: Entry, ev, t: int, cls: int) -> bool:
        del self.table[ev.skb]
        if t == T_XMIT and cls & C_VETH and e.dir == EGRESS:
            if e.container >= 0:
                self._c(e.container, EGRESS, "local")
            y = self.dev_containers[ev.dev]
            if ev.proto in (0x0800, 0x86DD):
                self._c(y, INGRESS, "crossed")
                self._c(y, INGRESS, "local")
            self._say(f"{ev.skb:#x} container to container")
            return True
        self._say(f"{ev.skb:#x} conflict at step {e.step}")
        if self._awaits_socket(e):
            self._c(e.container, INGRESS, "unpaired")       # over before a socket took it
        else:
            self._retire(e, "rejected")
        return False

    def _fresh(self, ev, t: int, cls: int) -> None:
        if t == T_XMIT and cls & C_INNER and not self.veth_start:
            e = Entry(EGRESS, ev.ts, ev.len - ETH_HLEN, ev.dev, ev.proto, ev.cpu, ev.tid,
                      ctx=ev.flags & CTX_BITS)
        elif t == T_RX and cls & C_VETH and self.veth_start:
            if ev.proto not in (0x0800, 0x86DD):
                self._g("nonip")
                return
            x = self.dev_containers[ev.dev]
            t0 = ev.ts
            if self.socket:     # handed to the veth by its own thread, inside a send call
                tid, t0 = self.calls.get(ev.tid % CALLS, (None, 0))
                t0 = t0 if tid == ev.tid else 0
                if ev.flags & CTX_BITS or not t0 or t0 > ev.ts or ev.ts - t0 > self.max_age:
                    self._c(x, EGRESS, "crossed")
                    self._c(x, EGRESS, "unpaired")
                    return
            e = Entry(EGRESS, t0, ev.len, ev.dev, ev.proto, ev.cpu, ev.tid,
                      step=1, container=x, ctx=ev.flags & CTX_BITS, tlast=ev.ts - t0)
            if t0 != ev.ts:
                e.hops[0] = ev.ts - t0
            self._c(x, EGRESS, "crossed")
        elif t == T_RECV and cls & C_UPLINK:
            e = Entry(INGRESS, ev.ts, ev.len, ev.dev, 0, ev.cpu, ev.tid, ctx=ev.flags & CTX_BITS)
        else:
            if cls & C_VETH:
                x = self.dev_containers[ev.dev]
                if t == self.paths[EGRESS][self.boundary[EGRESS]].type:
                    self._c(x, EGRESS, "crossed")
                    self._c(x, EGRESS, "orphans")
                elif t == T_XMIT and ev.proto in (0x0800, 0x86DD):
                    # no uplink start: the host sent it (this table never gives entries up)
                    self._c(x, INGRESS, "crossed")
                    self._c(x, INGRESS, "local")
            return
        self._g("inserts")
        self.table[ev.skb] = e
        self._say(f"{ev.skb:#x} {'egress' if e.dir == EGRESS else 'ingress'} start")
        self._push(e, ev, False)

    def finish(self) -> list[list[int]]:
        """Expire what is past its age; the rest is in flight, as Correlator.finish()."""
        for skb, e in list(self.table.items()):
            if self._expired(e):
                self._retire(e, "expired")
                del self.table[skb]
        out = [[0, 0] for _ in self.inner_of]
        for e in self.table.values():
            if e.container >= 0:
                out[e.container][e.dir] += 1
        return out

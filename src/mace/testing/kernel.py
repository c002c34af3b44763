"""Event generators that stand in for a traced kernel (test support, no privileges).

Two models of one kernel, for two uses, sharing the plan's tracepoints and filters:

- *Stories* (`tell`): random packet stories the way the kernel traces them for a plan, then
  only what the plan's in-kernel filters let through.  A story is a list of call chains
  (segments): each runs on one CPU and thread with no other packet's event of that CPU in
  between; between segments the skb sits in a queue (backlog, qdisc, neighbour queue) and
  may continue on another CPU, interleaved with other packets.  skb addresses come from a
  small pool and are reused as soon as their packet is gone, also when it left silently.
  Every odd case the correlator must survive is told now and then; the property tests
  (tests/unit/test_correlate.py) compare the correlator with the reference model on them.
- *The flood model* (`KernelModel`, `build_images`): a discrete-event model of a busy host
  (ping floods, UDP senders, a shaped uplink qdisc that queues and drops, the peer's
  replies, unrelated drops) written into full perf ring images: the correlator
  benchmark's input (benchmarks/correlate.py), and what it says completed.

Nothing here imports hypothesis: callers draw seeds and worlds and hand a `random.Random` in.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field
from socket import MSG_PEEK
from typing import NamedTuple

from mace.capture._ring import DEV_NONE
from mace.capture.perf import Event, field_names
from mace.plan import FREE, QUEUE, READY, RECEIVED, RECV, ROUTE, RX, XMIT, ContainerPath, Plan
from mace.testing.synthetic import NetEvent, builtin_format

# -- shared ------------------------------------------------------------------------------------

INNER, BRIDGE, UPLINK = "eth0", "br0", "up0"
NOISE_DEVICES = ("wlan0", "docker0", "lo")      # never in a plan: filtered in the kernel
ETH_HLEN = 14
IP, IP6, ARP = 0x0800, 0x86DD, 0x0806     # the tracepoints store ntohs(skb->protocol)
ARP_L3 = 28
ARP_PAD_L3 = 46      # an ARP reply padded to Ethernet's minimum frame, as a NIC receives it
EGRESS, INGRESS = 0, 1
TP = {"xmit": XMIT, "recv": RECV, "rx": RX, "queue": QUEUE, "free": FREE, "route": ROUTE,
      "call": "syscalls:sys_enter_sendto", "return": "syscalls:sys_exit_sendto", "ready": READY,
      "recvmsg": RECEIVED}
CALL_TPS = ("call", "return", "recvmsg")       # bound to the containers' cgroups
SOCK_BASE = 0xFFFF8881_3A000000                # socket addresses (sockets are not skbs)
ICMP, UDP, TCP = 1, 17, 6
F_SOFTIRQ = 0x10                # common_flags of a sample taken in softirq context


# -- stories: the world (containers, plan, what the kernel lets through) ----------------------


@dataclass(frozen=True)
class Box:
    """A container as the host sees it.  `mon`: its index in the plan, None if unmonitored
    (its inner device is eth0 too, so the plan's filters let its eth0 events through)."""

    veth: str
    bridge: str | None
    mon: int | None
    inner: str = INNER


class Kernel:
    """What reaches the correlator for a plan: the probes' device filters, kind numbers (index
    in plan.probes()) and device slots (index in plan.devices)."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.probes = plan.probes()
        self.kind = {p.tracepoint: i for i, p in enumerate(self.probes)}
        self.slot = {n: i for i, n in enumerate(plan.devices)}

    def visible(self, tp: str, dev: str | None, role: str | None = None) -> bool:
        k = self.kind.get(tp)
        if k is None:
            return False
        if self.probes[k].cgroups:    # a call: the acting container's veth stands for its cgroup
            return dev in {c.veth for _, c in self.plan.active}
        if tp == ROUTE:     # the plan's route filter: a forward lookup to an uplink, or a route
            return dev in self.probes[k].devices or (role == "fwd" and dev in self.plan.uplinks)
        devices = self.probes[k].devices
        return not devices or dev in devices

    def event(self, tp, dev, skb, length, proto, ts, cpu, tid, flags=0, role=None) -> Event | None:
        """The decoded event, or None when the kernel's filter drops it.  Fields the
        tracepoint does not have read as 0 (as `Rings` decodes them)."""
        if not self.visible(tp, dev, role):
            return None
        f = builtin_format(tp).fields
        names = field_names(tp)
        return Event(ts=ts, skb=skb if names["key"] in f else 0,
                     len=length & 0xFFFFFFFF if names["len"] in f else 0, tid=tid, cpu=cpu,
                     kind=self.kind[tp], flags=flags,
                     dev=self.slot[dev] if "name" in f else DEV_NONE,
                     proto=proto & 0xFFFF if names["proto"] in f else 0)

    def net_event(self, ev: Event) -> NetEvent:
        """The synthetic sample that decodes to `ev`."""
        tp = self.probes[ev.kind].tracepoint
        return NetEvent(tp, ts=ev.ts, cpu=ev.cpu, tid=ev.tid, skb=ev.skb, len=ev.len,
                        dev=self.plan.devices[ev.dev] if ev.dev >= 0 else None,
                        protocol=ev.proto, flags=ev.flags)


@dataclass
class World:
    boxes: list[Box]
    plan: Plan
    cpus: list[int]
    pool: list[int]
    max_age: int
    # a socket's generation per (box, protocol): one never read again is closed (its process
    # went away), and the box's later packets of that protocol go to a new socket
    sockets: dict[tuple[int, int], int] = field(default_factory=dict, repr=False)

    @property
    def kernel(self) -> Kernel:
        return Kernel(self.plan)


def make_plan(boxes: list[Box], *, hops: bool, end_at_queue: bool, start_at_veth: bool = False,
              socket: bool = False) -> Plan:
    mon = sorted((b for b in boxes if b.mon is not None), key=lambda b: b.mon)
    return Plan([ContainerPath(f"ns{b.mon}", b.inner, b.veth, b.bridge, f"/cg/{b.veth}" if socket else None)
                 for b in mon], UPLINK, hops=hops, end_at_queue=end_at_queue,
                start_at_veth=start_at_veth, segment="socket" if socket else "device")


# -- stories ----------------------------------------------------------------------------------


class Act(NamedTuple):
    """One tracepoint hit as the kernel would emit it (before filtering)."""

    tp: str                 # key of TP
    dev: str | None
    skb: int
    len: int
    proto: int = 0
    role: str | None = None     # "start", "vstart" (egress start at the veth), "end" (ingress
                                # end, egress xmit uplink), "endq"; a route lookup: "fwd" (from
                                # a container's side to an uplink), "out" (the host's own)


@dataclass
class Story:
    kind: str
    segments: list[list[Act]]
    skbs: tuple = ()
    truth: tuple | None = None      # (container, dir, l3) when the packet must be reportable
    other_tid: frozenset = frozenset()   # segments that run on another thread (neighbour queue)


def egress_chains(box: Box, skb: int, L: int, proto: int) -> list[list[Act]]:
    """xmit inner -> netif_rx veth || receive veth -> receive bridge -> route -> queue uplink
    || xmit uplink (an ARP frame is not routed)"""
    a = [Act("xmit", box.inner, skb, L + ETH_HLEN, proto, "start"),
         Act("rx", box.veth, skb, L, proto, "vstart")]
    b = [Act("recv", box.veth, skb, L)]
    if box.bridge:
        b.append(Act("recv", box.bridge, skb, L))
    if proto != ARP:
        b.append(Act("route", UPLINK, 0, 0, 0, "fwd"))
    b.append(Act("queue", UPLINK, skb, L + ETH_HLEN, 0, "endq"))
    return [a, b, [Act("xmit", UPLINK, skb, L + ETH_HLEN, proto, "end")]]


def ingress_chains(box: Box, skb: int, L: int, proto: int) -> list[list[Act]]:
    """receive uplink -> route -> xmit bridge -> xmit veth -> netif_rx inner || receive inner"""
    a = [Act("recv", UPLINK, skb, L, 0, "start")]
    if proto != ARP:
        a.append(Act("route", box.bridge or box.veth, 0, 0))
    if box.bridge:
        a.append(Act("xmit", box.bridge, skb, L + ETH_HLEN, proto))
    a += [Act("xmit", box.veth, skb, L + ETH_HLEN, proto), Act("rx", box.inner, skb, L, proto)]
    return [a, [Act("recv", box.inner, skb, L, 0, "end")]]


def truncate(segments: list[list[Act]], keep: int, free: bool) -> list[list[Act]]:
    """The first `keep` acts; with `free` the packet is then dropped with skb:kfree_skb in
    the same call chain, otherwise it vanishes without a trace."""
    out, n = [], 0
    for seg in segments:
        if n >= keep:
            break
        part = seg[:keep - n]
        n += len(part)
        out.append(list(part))
    if free:
        # the packet's address (a route lookup, which may be the last act, carries none)
        last = next(a for seg in reversed(out) for a in reversed(seg) if a.skb)
        out[-1].append(Act("free", None, last.skb, 0, last.proto))
    return out


def merge_last(segments: list[list[Act]], join: bool) -> list[list[Act]]:
    """Optionally run the last segment straight on from the previous one (no queue)."""
    if join and len(segments) >= 2:
        return segments[:-2] + [segments[-2] + segments[-1]]
    return segments


def length(rnd) -> int:
    # common sizes often, so that lengths collide between packets
    return rnd.choice([84, 84, 84, 84, 52, 1500, rnd.randint(29, 1500)])


# how often each kind of story is told: host traffic reuses addresses of container packets
# that are over, which is where the pairing rules matter
STORIES = {"egress": 8, "ingress": 8, "host_in": 4, "host_out": 4, "host_bound": 4, "noise": 1,
           "noise_free": 1, "zero": 1}


def new_story(w: World, rnd, take, vanish: bool = False) -> Story | None:
    """A random story; `take(n)` hands out n free skb addresses or None.  With `vanish`,
    some packets disappear anywhere without a trace, also from a queue (which the kernel
    does not do: it frees them with kfree_skb, or consumes them when delivered)."""
    kind = rnd.choices(list(STORIES), weights=list(STORIES.values()))[0]
    how = None
    if kind == "egress":
        how = rnd.choices(["full", "local", "drop", "vanish", "parked", "c2c", "arp"],
                          weights=[8, 4, 2, vanish, 2, 2, 1])[0]
    elif kind == "ingress":
        how = rnd.choices(["full", "drop", "vanish", "parked", "arp"], weights=[8, 2, vanish, 2, 1])[0]
    box = rnd.choice(w.boxes)
    L = length(rnd)
    dup = rnd.random() < 0.04
    story = None
    if kind == "zero":
        act = rnd.choice([Act("xmit", INNER, 0, L + ETH_HLEN, IP), Act("recv", UPLINK, 0, L),
                          Act("queue", UPLINK, 0, L + ETH_HLEN), Act("free", None, 0, 0),
                          Act("recv", box.veth, 0, L)])
        return Story("zero", [[act]])
    skbs = take(3 if how == "parked" else 1)
    if skbs is None and how == "parked":
        how = "full"
        skbs = take(1)
    if skbs is None:
        return None
    skb = skbs[0]
    if kind == "egress":
        if how == "c2c" and len(w.boxes) < 2:
            how = "full"
        segs = egress_chains(box, skb, L, IP)
        truth = (box.mon, EGRESS, L) if box.mon is not None else None
        if how == "full":
            segs = merge_last(segs, rnd.random() < 0.5)
        elif how in ("local", "arp"):
            if how == "arp":
                L = ARP_L3
                segs = egress_chains(box, skb, L, ARP)
            segs = truncate(segs, 3 + (bool(box.bridge) and rnd.random() < 0.5), False)
            truth = None
        elif how in ("drop", "vanish"):      # reportable if it got as far as the end
            total = sum(map(len, segs))
            segs = truncate(segs, rnd.randint(1, total - 1), how == "drop")
        elif how == "parked":
            a, b, x = segs
            arp = skbs[1]
            b[-1:] = [Act("queue", UPLINK, arp, ARP_L3 + ETH_HLEN)]
            if rnd.random() < 0.7:
                b.append(Act("xmit", UPLINK, arp, ARP_L3 + ETH_HLEN, ARP))
            # the answer, in whose call chain the queue is flushed (on a NIC, padded)
            answer = Act("recv", UPLINK, skbs[2], rnd.choice([ARP_L3, ARP_L3, ARP_PAD_L3]))
            resume = [answer, Act("queue", UPLINK, skb, L + ETH_HLEN, 0, "endq")]
            segs = merge_last([a, b, resume, x], rnd.random() < 0.5)
            if rnd.random() < 0.2:       # no reply: the neighbour queue drops it
                segs = [a, b, [Act("free", None, skb, 0, IP)]]
            story = Story("egress-parked", segs, tuple(skbs), truth, frozenset({2}))
        elif how == "c2c":
            to = rnd.choice([o for o in w.boxes if o is not box])
            a, b, _ = segs
            b = [b[0], Act("xmit", to.veth, skb, L + ETH_HLEN, IP), Act("rx", to.inner, skb, L, IP)]
            segs = [a, b, [Act("recv", to.inner, skb, L)]]
            truth = None
        story = story or Story(f"egress-{how}", segs, tuple(skbs), truth)
    elif kind == "ingress":
        if how == "arp":
            L = ARP_L3
        segs = ingress_chains(box, skb, L, ARP if how == "arp" else IP)
        truth = (box.mon, INGRESS, L) if box.mon is not None and how != "arp" else None
        if how in ("drop", "vanish"):
            total = sum(map(len, segs))
            segs = truncate(segs, rnd.randint(1, total - 1), how == "drop")
        elif how == "parked":
            a, e = segs
            arp = skbs[1]
            req = ([Act("xmit", box.bridge, arp, ARP_L3 + ETH_HLEN, ARP)] if box.bridge else []) + [
                Act("xmit", box.veth, arp, ARP_L3 + ETH_HLEN, ARP), Act("rx", box.inner, arp, ARP_L3, ARP)]
            cut = 2 if a[1].tp == "route" else 1      # the lookup comes before the request
            # the container answers; the queue is flushed where its answer reaches the host's
            # neighbour code, after its backlog (in that chain, or a later one)
            ans = skbs[2]
            sent = [Act("xmit", box.inner, ans, ARP_L3 + ETH_HLEN, ARP), Act("rx", box.veth, ans, ARP_L3, ARP)]
            backlog = [Act("recv", box.veth, ans, ARP_L3)] + (
                [Act("recv", box.bridge, ans, ARP_L3)] if box.bridge else [])
            if rnd.random() < 0.3:
                segs = [a[:cut] + req, sent, backlog + a[cut:], e]
                other = frozenset({1, 2})
            else:
                segs = [a[:cut] + req, sent + backlog + a[cut:], e]
                other = frozenset({1})
            if rnd.random() < 0.2:
                segs = [a[:cut] + req, [Act("free", None, skb, 0, IP)]]
            story = Story("ingress-parked", segs, tuple(skbs), truth, other)
        story = story or Story(f"ingress-{how}", segs, tuple(skbs), truth)
    elif kind == "host_in":      # the host itself sends into a container: starts at the veth
        proto = rnd.choice([IP, IP, IP6, ARP])
        segs = ingress_chains(box, skb, ARP_L3 if proto == ARP else L, proto)
        segs[0] = segs[0][1:]
        story = Story("host-in", segs, tuple(skbs))
    elif kind == "host_out":        # its route lookup is an output one (input: loopback)
        segs = [[Act("route", UPLINK, 0, 0, 0, "out"), Act("queue", UPLINK, skb, L + ETH_HLEN),
                 Act("xmit", UPLINK, skb, L + ETH_HLEN, IP)]]
        if rnd.random() < 0.5:
            segs = [segs[0][:1], segs[0][1:]]
        story = Story("host-out", segs, tuple(skbs))
    elif kind == "host_bound":      # routed to the host itself: its route is the uplink's
        story = Story("host-bound", [[Act("recv", UPLINK, skb, rnd.choice([L, ARP_L3])),
                                      Act("route", UPLINK, 0, 0)]], tuple(skbs))
    elif kind == "noise":
        dev, other = rnd.sample(NOISE_DEVICES, 2)
        story = Story("noise", [[Act("recv", dev, skb, L), Act("queue", other, skb, L + ETH_HLEN),
                                 Act("xmit", other, skb, L + ETH_HLEN, IP)]], tuple(skbs))
    else:                         # a packet we never saw, dropped
        story = Story("noise-free", [[Act("free", None, skb, 0, IP)]], tuple(skbs))
    if w.plan.socket:
        story = socketize(story, w, box, L, rnd)
    if dup:     # a packet's event twice (a socket's events are not a packet's: a second
        # data_ready or receive is another packet's, a second call another send)
        segs = story.segments
        i = rnd.randrange(len(segs))
        j = rnd.randrange(len(segs[i]))
        if segs[i][j].tp not in ("ready", "recvmsg", "call", "return"):
            segs[i].insert(j + 1, segs[i][j])
    return story


def socketize(story: Story, w: World, box: Box, L: int, rnd) -> Story:
    """The socket segment's part of a story: an egress packet is sent from a send call (its
    entry before, its exit after the veth takes it, in the same chain); an ingress packet
    received by the container's device joins a socket's queue in that chain, and a receive
    call of another thread takes it later.  Now and then a call with no packet, a receive
    of nothing, a peek, a host socket's data_ready."""
    segs = story.segments
    bi = w.boxes.index(box)
    sk = SOCK_BASE + 0x800 * bi     # the box's socket of this protocol (+ proto, generation)
    if story.kind.startswith("egress") and segs and segs[0] and segs[0][0].tp == "xmit":
        segs[0] = [Act("call", box.veth, 0, 0, role="call"), *segs[0], Act("return", box.veth, 0, 0)]
    elif (story.kind in ("ingress-full", "ingress-parked") and segs[-1] and segs[-1][0].tp == "recv"
          and segs[-1][0].dev == box.inner):
        proto = rnd.choice([ICMP, ICMP, UDP, TCP])
        ret = {ICMP: rnd.choice([L - 20, L]), UDP: L - 28, TCP: L - 40}[proto]
        sk += 0x40 * proto + 0x100_0000 * w.sockets.get((bi, proto), 0)    # a socket per protocol
        recv = segs[-1][0]._replace(role=None)
        # (a stream's data_ready and receives are filtered out: see Plan.socket_probes)
        ready = [] if proto == TCP else [Act("ready", None, sk, 0, proto)]
        segs[-1] = [recv, *ready, *segs[-1][1:]]
        take = [Act("recvmsg", box.veth, sk, ret, 0, "end")]
        if proto == TCP:
            take = []
        elif rnd.random() < 0.1:    # a peek first: the packet stays queued
            take.insert(0, Act("recvmsg", box.veth, sk, ret, MSG_PEEK))
        elif rnd.random() < 0.05:   # nothing read: the process went away, its socket closed
            take = []
            w.sockets[(bi, proto)] = w.sockets.get((bi, proto), 0) + 1
        if take:
            segs.append(take)
            story.other_tid = story.other_tid | {len(segs) - 1}
    elif story.kind in ("noise", "noise-free") and rnd.random() < 0.5:
        extra = rnd.choice([
            [Act("call", box.veth, 0, 0), Act("return", box.veth, 0, 0)],         # a write to a file
            [Act("ready", None, SOCK_BASE + 0x40_000, 0, UDP)],                   # a host socket
            [Act("recvmsg", box.veth, sk, -11, 0)],                               # EAGAIN
            [Act("recvmsg", box.veth, SOCK_BASE + 0x80_000, L, 0)],               # a socket never seen
        ])
        segs.append(extra)
    return story


class Emitted(NamedTuple):
    act: Act
    cpu: int
    tid: int
    story: int
    flags: int = 0          # common_flags of the chain: task, softirq, BH off


@dataclass
class Stream:
    world: World
    events: list[Event]                 # what the correlator sees, in time order
    stories: list[Story]
    emitted: list[Emitted] = field(repr=False, default_factory=list)
    ts: list[int] = field(repr=False, default_factory=list)   # per emitted act
    realistic: bool = True      # no packet vanished untraced from a queue

    def truths(self) -> list[tuple]:
        """Per reportable packet: (container, dir, l3, start times, end times, all times)."""
        by_story: dict[int, list[tuple[Act, int]]] = {}
        for em, ts in zip(self.emitted, self.ts, strict=True):
            by_story.setdefault(em.story, []).append((em, ts))
        out = []
        eaq = self.world.plan.end_at_queue
        for i, story in enumerate(self.stories):
            if story.truth is None:
                continue
            c, d, L = story.truth
            # the packet's events, and the story's own that carry no skb of it (its route
            # lookups, its send call, the receive call that took it)
            mine = [(em, ts) for em, ts in by_story.get(i, [])
                    if em.act.skb == story.skbs[0] or em.act.tp in ("route", "call", "recvmsg")]
            end_role = "endq" if d == EGRESS and eaq else "end"
            start_role = "vstart" if d == EGRESS and self.world.plan.start_at_veth else "start"
            if d == EGRESS and self.world.plan.socket:
                start_role = "call"
            starts = {ts for em, ts in mine if em.act.role == start_role}
            ends = {ts: em.cpu for em, ts in mine if em.act.role == end_role}
            out.append((c, d, L, starts, ends, {ts for _, ts in mine}))
        return out


def tids_of(cpu: int) -> list[int]:
    return [1000 * (cpu + 1) + k for k in range(3)]


def tell(w: World, rnd, n_stories: int, *, vanish: bool = False, big_gap: float = 0.02) -> Stream:
    """Run n_stories stories over the world's CPUs; returns the stream after filtering."""
    k = w.kernel
    free = list(w.pool)
    # Where a packet ended, its address is not reused before that CPU visibly moved on to
    # another packet: the new packet's events would continue the old call chain there.
    # (Any other CPU may reuse it at once.)
    held: dict[int, set[int]] = {c: set() for c in w.cpus}
    running: dict[int, list | None] = {c: None for c in w.cpus}   # [story, seg, pos, tid]
    ready: list[tuple[int, int]] = []        # (story, next segment)
    # a socket's queue: the stories whose packet it holds, in the order they joined it.  A
    # receive call takes the head, so a story's receive waits until its packet is the head.
    queues: dict[int, list[int]] = {}
    last_tid: dict[int, int] = {}
    last_cpu: dict[int, int] = {}            # story -> CPU of its last visible event
    stories: list[Story] = []
    emitted: list[Emitted] = []

    def taker(cpu):
        def take(n):
            usable = [a for a in free if a not in held[cpu]]
            if len(usable) < n:
                return None
            # like a slab allocator, mostly hand out what was freed last
            got = usable[-n:] if rnd.random() < 0.7 else rnd.sample(usable, n)
            for a in got:
                free.remove(a)
            return got
        return take

    def start(si, seg, cpu, other_tid=False):
        choices = tids_of(cpu)
        if other_tid and si in last_tid:
            choices = [t for t in choices if t != last_tid[si]]
        # a call chain runs in one context: a task (with or without BH off) or a softirq
        running[cpu] = [si, seg, 0, rnd.choice(choices), rnd.choice((0x00, 0x10, 0x80, 0x90))]

    def at_head(si, seg):
        first = stories[si].segments[seg][0]
        if first.tp != "recvmsg" or not any(a.role == "end" for a in stories[si].segments[seg]):
            return True
        q = queues.get(first.skb)
        return bool(q) and q[0] == si

    budget = n_stories
    while True:
        idle = [c for c in w.cpus if running[c] is None]
        opts = [("run", c) for c in w.cpus if running[c] is not None]
        takes = [r for r in ready if at_head(*r)]
        if idle and takes:
            opts.append(("resume", None))
        if idle and budget > 0:
            opts.append(("new", None))
        if not opts:
            break
        what, cpu = rnd.choice(opts)
        if what == "new":
            budget -= 1
            cpu = rnd.choice(idle)
            story = new_story(w, rnd, taker(cpu), vanish)
            if story is None:
                continue
            stories.append(story)
            start(len(stories) - 1, 0, cpu)
        elif what == "resume":
            si, seg = takes[rnd.randrange(len(takes))]
            ready.remove((si, seg))
            start(si, seg, rnd.choice(idle), seg in stories[si].other_tid)
        else:
            si, seg, pos, tid, flags = running[cpu]
            story = stories[si]
            act = story.segments[seg][pos]
            emitted.append(Emitted(act, cpu, tid, si, flags))
            last_tid[si] = tid
            if act.tp == "ready":
                queues.setdefault(act.skb, []).append(si)
            elif act.tp == "recvmsg" and act.role == "end":
                assert queues[act.skb].pop(0) == si
            # (a socket's events carry a socket, not an skb, and end no call chain)
            if act.skb and act.tp not in ("free", "ready", "recvmsg") and k.visible(TP[act.tp], act.dev):
                last_cpu[si] = cpu
                held[cpu] &= {act.skb}         # the CPU moved on
            pos += 1
            if pos < len(story.segments[seg]):
                running[cpu][2] = pos
                continue
            running[cpu] = None
            if seg + 1 < len(story.segments):
                ready.append((si, seg + 1))
                continue
            owned = [a for a in story.skbs if a]
            free.extend(owned)
            if si in last_cpu:
                held[last_cpu[si]].update(owned)
    # time: strictly increasing, mostly short gaps, sometimes one past max_age
    ts, t, events = [], 1_000_000, []
    for em in emitted:
        r = rnd.random()
        if r < big_gap:
            t += rnd.randint(w.max_age // 2, w.max_age * 2)
        else:
            t += rnd.randint(1, 300) if r < 0.6 else rnd.randint(1, 5000)
        ts.append(t)
        a = em.act
        ev = k.event(TP[a.tp], a.dev, a.skb, a.len, a.proto, t, em.cpu, em.tid, em.flags, a.role)
        if ev is not None:
            events.append(ev)
    return Stream(w, events, stories, emitted, ts, realistic=not vanish)


# -- the flood model: a small discrete-event model of a busy host -------------------------------

MODEL_CPUS = 2
MODEL_RING_PAGES = 256
MODEL_TAG = "5e1a0"                 # device names as a testbed would make them
SKB_POOL = 384                      # skb addresses the model recycles
SKB_BASE = 0xFFFF8881_2C400000
PING_PRELOAD = 32                   # ping -f -l 32
UDP_PAYLOAD = 1400
ICMP_L3 = 84                        # ping -s 56
UDP_L3 = 20 + 8 + UDP_PAYLOAD
R_QDISC_DROP, R_NO_SOCKET = 64, 3   # skb_drop_reason values (mace/testing/formats/skb_kfree_skb)


def model_plan() -> Plan:
    """The plan the flood model traces: two containers behind a bridge (a third, not
    traced, shares their inner device name)."""
    br = f"m{MODEL_TAG}br"
    # ending at the driver keeps the shaped qdisc, its queueing and its drops, inside the
    # segment: the harder chain for the correlator
    return Plan([ContainerPath("c0", INNER, f"m{MODEL_TAG}v0", br),
                 ContainerPath("c1", INNER, f"m{MODEL_TAG}v1", br)], f"m{MODEL_TAG}up",
                end_at_queue=False)


class _Packet:
    __slots__ = ("skb", "cont", "l3", "kind", "src")

    def __init__(self, skb, cont, l3, kind, src):
        self.skb, self.cont, self.l3, self.kind, self.src = skb, cont, l3, kind, src


class _Source:
    __slots__ = ("kind", "cont", "cpu", "tid")

    def __init__(self, kind, cont, cpu, tid):
        self.kind, self.cont, self.cpu, self.tid = kind, cont, cpu, tid


class KernelModel:
    """Discrete-event model of what the traced kernel does for the synthetic plan.

    Actions sit in a heap keyed by the time they become runnable; a call chain (a
    "segment") starts when its CPU is free and emits its events back to back, so the
    events of one chain are adjacent on that CPU and each CPU's timestamps only grow.
    Containers 0 and 1 are monitored (their veths are in the filter), container 2 is not:
    only its `eth0` events (same name) and its uplink events are seen.
    """

    GAP_NS = 450            # mean time between two traced steps of one call chain
    LINK_NS_PER_BYTE = 8    # shaped uplink: 1 Gbit/s
    LINK_BURST = 3000       # bytes
    LINK_LIMIT_NS = 2_000_000   # packets that would wait longer are dropped (tbf latency)
    UDP_INTERVAL_NS = 30_000    # each UDP sender is paced: 3 x 385 Mbit/s offered

    def __init__(self, rng: random.Random, plan, ncpu: int = MODEL_CPUS, pool: int = SKB_POOL):
        self.rng = rng
        self.ncpu = ncpu
        self.veth = [c.veth for c in plan.containers] + [None]   # container 2: not traced
        self.uplink = plan.uplink
        self.filters = Kernel(plan)
        self.heap: list = []
        self.seq = 0
        t0 = 1_000_000_000_000 + rng.randrange(1000)
        self.clock = [t0] * ncpu            # timestamp of each CPU's last event
        self.task = [0] * ncpu              # tid current on each CPU (softirqs run in it)
        self.out: list[list[tuple]] = [[] for _ in range(ncpu)]
        addrs = [SKB_BASE + i * 0x100 for i in range(pool)]     # 256-byte slab objects
        rng.shuffle(addrs)
        self.free = [addrs[i::ncpu] for i in range(ncpu)]       # per-CPU LIFO free lists
        self.pool = pool
        self.live = set()
        self.max_live = 0
        self.grown = 0
        self.link_v = t0                    # token bucket: when the link is next free
        self.queued = 0
        self.max_queued = 0
        self.drops = 0
        self.truth: list[tuple[int, int, int]] = []   # (end ts, container, direction)
        self.t0 = t0

    # plumbing ------------------------------------------------------------------------------

    def at(self, t: int, fn, *args) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, fn, args))

    def _gap(self) -> int:
        return 60 + int(self.rng.expovariate(1 / self.GAP_NS))

    def begin(self, cpu: int, t: int, tid: int | None) -> int:
        """Start a call chain on `cpu` no earlier than t; tid None: whatever runs there."""
        idle = self.clock[cpu] < t
        self.clock[cpu] = max(self.clock[cpu], t)
        if tid is None:
            tid = 0 if idle else self.task[cpu]
        self.task[cpu] = tid
        return tid

    def emit(self, cpu, tid, flags, tp, skb, length, dev, proto=0, reason=0) -> int:
        ts = self.clock[cpu] + self._gap()
        self.clock[cpu] = ts
        if self.filters.visible(tp, dev):       # what the plan's in-kernel filters let through
            self.out[cpu].append((ts, tp, tid, flags, skb, length, dev, proto, reason))
        return ts

    def work(self, cpu: int, ns: int) -> None:
        """Untraced work (user space, the peer's stack) keeps the CPU busy."""
        self.clock[cpu] += ns

    def alloc(self, cpu: int) -> int:
        for fl in (self.free[cpu], *(self.free[c] for c in range(self.ncpu) if c != cpu)):
            if fl:
                skb = fl.pop()
                break
        else:
            skb = SKB_BASE + (self.pool + self.grown) * 0x100
            self.grown += 1
        self.live.add(skb)
        self.max_live = max(self.max_live, len(self.live))
        return skb

    def release(self, t: int, cpu: int, skb: int) -> None:
        self.live.discard(skb)
        self.free[cpu].append(skb)

    def release_after(self, ts: int, cpu: int, skb: int) -> None:
        # the address may be handed out again only once the free has happened
        self.at(ts + 1, self.release, cpu, skb)

    # traffic ---------------------------------------------------------------------------------

    def ping_send(self, t: int, src: _Source) -> None:
        skb = self.alloc(src.cpu)
        tid = self.begin(src.cpu, t, src.tid)
        end = self.emit(src.cpu, tid, 0, XMIT, skb, ICMP_L3 + ETH_HLEN, INNER, IP)
        end = self.veth_rx(src, tid, skb, ICMP_L3, end)
        pkt = _Packet(skb, src.cont, ICMP_L3, "icmp", src)
        # veth_xmit -> netif_rx: the backlog runs at local_bh_enable, in the sender's context
        self.at(end + 150 + self.rng.randrange(300), self.veth_backlog, src.cpu, tid, pkt)

    def veth_rx(self, src: _Source, tid: int, skb: int, l3: int, end: int) -> int:
        """veth_xmit hands the packet to its peer: netif_rx on the host-side veth, at once."""
        veth = self.veth[src.cont]
        if veth is None:
            return end
        return self.emit(src.cpu, tid, 0, RX, skb, l3, veth, IP)

    def udp_send(self, t: int, src: _Source, left: int) -> None:
        skb = self.alloc(src.cpu)
        self.work(src.cpu, 800 + self.rng.randrange(1500))      # user space and sendto()
        tid = self.begin(src.cpu, t, src.tid)
        end = self.emit(src.cpu, tid, 0, XMIT, skb, UDP_L3 + ETH_HLEN, INNER, IP)
        end = self.veth_rx(src, tid, skb, UDP_L3, end)
        pkt = _Packet(skb, src.cont, UDP_L3, "udp", src)
        self.at(end + 150 + self.rng.randrange(300), self.veth_backlog, src.cpu, tid, pkt)
        if left > 1:        # paced from its schedule, not from when the CPU let it run
            iv = self.UDP_INTERVAL_NS
            self.at(t + iv // 2 + self.rng.randrange(iv), self.udp_send, src, left - 1)

    def veth_backlog(self, t: int, cpu: int, tid: int, pkt: _Packet) -> None:
        """Host side: veth receive -> bridge -> route, NAT -> dev_queue_xmit on the uplink
        -> token bucket: sent now, queued, or dropped."""
        self.begin(cpu, t, tid)
        if self.veth[pkt.cont]:
            self.emit(cpu, tid, F_SOFTIRQ, RECV, pkt.skb, pkt.l3, self.veth[pkt.cont])
        q = self.emit(cpu, tid, F_SOFTIRQ, QUEUE, pkt.skb, pkt.l3 + ETH_HLEN, self.uplink)
        size = pkt.l3 + ETH_HLEN
        start = max(self.link_v, q - self.LINK_BURST * self.LINK_NS_PER_BYTE)
        depart = max(start, q)
        if depart - q > self.LINK_LIMIT_NS:
            self.drops += 1
            end = self.emit(cpu, tid, F_SOFTIRQ, FREE, pkt.skb, 0, None, IP, R_QDISC_DROP)
            self.release_after(end, cpu, pkt.skb)
            if pkt.kind == "icmp":      # ping -f sends on when a reply is overdue
                self.at(end + 200_000, self.ping_send, pkt.src)
            return
        self.link_v = start + size * self.LINK_NS_PER_BYTE
        if depart == q:
            self.uplink_xmit(cpu, tid, pkt)
        else:
            self.queued += 1
            self.max_queued = max(self.max_queued, self.queued)
            self.at(depart, self.dequeue, pkt)

    def dequeue(self, t: int, pkt: _Packet) -> None:
        """The qdisc watchdog fires on the less busy CPU and sends the head packet."""
        self.queued -= 1
        cpu = min(range(self.ncpu), key=lambda c: self.clock[c])
        tid = self.begin(cpu, t, None)
        self.uplink_xmit(cpu, tid, pkt)

    def uplink_xmit(self, cpu: int, tid: int, pkt: _Packet) -> None:
        end = self.emit(cpu, tid, F_SOFTIRQ, XMIT, pkt.skb, pkt.l3 + ETH_HLEN, self.uplink, IP)
        if self.veth[pkt.cont]:
            self.truth.append((end, pkt.cont, 0))
        # veth_xmit into the peer: its backlog runs next on this CPU
        self.at(end + 300 + self.rng.randrange(700), self.peer, cpu, tid, pkt)

    def peer(self, t: int, cpu: int, tid: int, pkt: _Packet) -> None:
        """The peer's stack (not traced): answers pings, queues UDP for its sink."""
        self.begin(cpu, t, tid)
        self.work(cpu, 1500 + self.rng.randrange(1500))
        if pkt.kind == "udp":
            sink_cpu = self.rng.randrange(self.ncpu)
            self.at(self.clock[cpu] + 5_000 + self.rng.randrange(60_000),
                    self.release, sink_cpu, pkt.skb)
            return
        reply = _Packet(self.alloc(cpu), pkt.cont, ICMP_L3, "reply", pkt.src)
        self.release_after(self.clock[cpu], cpu, pkt.skb)   # consume_skb(request), untraced
        self.at(self.clock[cpu] + 300 + self.rng.randrange(700), self.uplink_backlog, cpu, tid, reply)

    def uplink_backlog(self, t: int, cpu: int, tid: int, pkt: _Packet) -> None:
        """Uplink receive -> de-NAT, route -> bridge -> veth xmit (synchronous)."""
        self.begin(cpu, t, tid)
        self.emit(cpu, tid, F_SOFTIRQ, RECV, pkt.skb, pkt.l3, self.uplink)
        if self.veth[pkt.cont]:
            end = self.emit(cpu, tid, F_SOFTIRQ, XMIT, pkt.skb, pkt.l3 + ETH_HLEN,
                            self.veth[pkt.cont], IP)
        else:
            end = self.clock[cpu] + 400        # bridge to an unmonitored veth: not traced
        self.at(end + 150 + self.rng.randrange(400), self.inner_backlog, cpu, tid, pkt)

    def inner_backlog(self, t: int, cpu: int, tid: int, pkt: _Packet) -> None:
        self.begin(cpu, t, tid)
        end = self.emit(cpu, tid, F_SOFTIRQ, RECV, pkt.skb, pkt.l3, INNER)
        if self.veth[pkt.cont]:
            self.truth.append((end, pkt.cont, 1))
        # ping wakes up, reads the reply (freeing it) and, flooding, sends the next request
        self.at(end + 3_000 + self.rng.randrange(12_000), self.ping_recv, pkt)

    def ping_recv(self, t: int, pkt: _Packet) -> None:
        src = pkt.src
        self.begin(src.cpu, t, src.tid)
        self.work(src.cpu, 1000 + self.rng.randrange(1000))
        self.release(t, src.cpu, pkt.skb)
        self.ping_send(self.clock[src.cpu], src)

    def noise_drop(self, t: int) -> None:
        """A packet the host drops (no socket, ...): its only traced event is kfree_skb."""
        cpu = self.rng.randrange(self.ncpu)
        skb = self.alloc(cpu)
        tid = self.begin(cpu, t, None)
        end = self.emit(cpu, tid, F_SOFTIRQ, FREE, skb, 0, None, IP, R_NO_SOCKET)
        self.release_after(end, cpu, skb)
        self.at(t + int(self.rng.expovariate(1 / 50_000)), self.noise_drop)

    def run(self, until_bytes: int, sizes: dict[str, int]) -> None:
        """Start the sources and run until every CPU wrote `until_bytes` of records."""
        rng = self.rng
        for cont in range(3):
            ping = _Source("icmp", cont, cont % self.ncpu, 3100 + cont)
            for i in range(PING_PRELOAD):
                self.at(self.t0 + i * 4000 + rng.randrange(2000), self.ping_send, ping)
            udp = _Source("udp", cont, (cont + 1) % self.ncpu, 3200 + cont)
            self.at(self.t0 + rng.randrange(5000), self.udp_send, udp, 10**9)
        self.at(self.t0 + 1000, self.noise_drop)
        written = [0] * self.ncpu
        seen = [0] * self.ncpu
        while self.heap and min(written) < until_bytes:
            t, _, fn, args = heapq.heappop(self.heap)
            fn(t, *args)
            for c in range(self.ncpu):
                for ev in self.out[c][seen[c]:]:
                    written[c] += sizes[ev[1]]
                seen[c] = len(self.out[c])


def build_images(plan, probes, pages: int = MODEL_RING_PAGES, seed: int = 11, ncpu: int = MODEL_CPUS):
    """One RingImage per CPU, all cut at one instant (a consistent snapshot), as full as the
    busiest ring allows; and what the model says about them (`expected_reports`: the packets
    that completed each direction before the cut)."""
    from mace.testing.synthetic import RingImage, net_values, raw_record, sample

    fmts = {p.tracepoint: builtin_format(p.tracepoint) for p in probes}
    rng = random.Random(seed)
    model = KernelModel(rng, plan, ncpu=ncpu)

    def record(cpu, ev) -> bytes:
        ts, tp, tid, flags, skb, length, dev, proto, reason = ev
        fmt = fmts[tp]
        values = net_values(fmt, skb, length, dev, proto)
        if "reason" in fmt.fields:
            values["reason"] = reason
            values["location"] = 0xFFFFFFFF_81C0_0000 + 0x1F0 * reason
        return sample(ts, cpu, tid, raw_record(fmt, values, flags=flags, pid=tid))

    longest = max((d for d in plan.devices if d), key=len)      # the largest record of each
    sizes = {tp: len(record(0, (0, tp, 0, 0, 1, 0, longest, 0, 0))) for tp in fmts}
    cap = pages * 4096
    model.run(cap + 4096, sizes)
    # the instant at which the first ring is full; everything up to it goes in, on both
    cut = None
    for cpu in range(ncpu):
        used = 0
        for ev in model.out[cpu]:
            if used + sizes[ev[1]] > cap:
                cut = ev[0] - 1 if cut is None else min(cut, ev[0] - 1)
                break
            used += sizes[ev[1]]
    images, counts, kinds = [], [], {}
    for cpu in range(ncpu):
        img = RingImage(pages)
        n = 0
        for ev in model.out[cpu]:
            if ev[0] > cut:
                break
            if not img.write(record(cpu, ev)):
                raise RuntimeError("synthetic record did not fit")
            n += 1
            kinds[ev[1]] = kinds.get(ev[1], 0) + 1
        images.append(img)
        counts.append(n)
    truth = [0, 0]
    for ts, _cont, d in model.truth:
        if ts <= cut:
            truth[d] += 1
    info = {
        "records_per_ring": counts,
        "fill_per_ring": [round((img.head - img.tail) / cap, 4) for img in images],
        "events_by_tracepoint": kinds,
        "span_ms": round((cut - model.t0) / 1e6, 2),
        "skb_pool": SKB_POOL,
        "skb_max_live": model.max_live,
        "skb_pool_grown": model.grown,
        "qdisc_max_queued": model.max_queued,
        "qdisc_drops": model.drops,
        "expected_reports": {"egress": truth[0], "ingress": truth[1]},
    }
    return images, info

"""The correlator (mace.correlate._correlate.Correlator) against its pure-Python model
(mace.testing.reference.ReferenceCorrelator) on realistic event streams, plus hand-written scenarios
that pin the intended behaviour (no privileges needed).

The streams are packet stories told by mace.testing.kernel (`tell`) for a plan, kept to
what the plan's in-kernel filters let through; hypothesis draws the world (containers,
bridges, options, CPUs, the skb pool) and the story generator's seed.  Where the kernel
would behave so (no packet vanishes untraced from a queue), every report must also be a
packet the generator really sent through (`check_against_truth`).
"""

from __future__ import annotations

import random
import struct
from collections import Counter
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mace.capture._ring import RECORD_FORMAT, Rings
from mace.capture.perf import Event
from mace.correlate import _correlate
from mace.output.report import Report, unpack
from mace.plan import EGRESS_HOPS, INGRESS_HOPS, RECV, XMIT, ContainerPath, Plan
from mace.testing.kernel import (
    ARP,
    ARP_L3,
    ARP_PAD_L3,
    BRIDGE,
    EGRESS,
    ETH_HLEN,
    INGRESS,
    INNER,
    IP,
    TP,
    UPLINK,
    Box,
    Kernel,
    Stream,
    World,
    make_plan,
    tell,
)
from mace.testing.reference import ReferenceCorrelator, ReferenceDecoder, merge
from mace.testing.synthetic import PAGE, RingImage, builtin_layout

COUNTERS = _correlate.CONTAINER_COUNTERS
GLOBALS = tuple(g for g in _correlate.GLOBAL_COUNTERS if g != "max_probe")
DIRS = _correlate.DIRECTIONS
BIG_TABLE = 4096
NCPU = 8
_RECORD = struct.Struct(RECORD_FORMAT)


# -- hypothesis draws the worlds and the story seeds -------------------------------------------

MAX_AGES = [1_000_000_000, 100_000, 20_000]


@st.composite
def worlds(draw, max_cpus: int = 4) -> World:
    n_mon = draw(st.integers(1, 3))
    n_unmon = draw(st.integers(0, 2))
    bridged = draw(st.booleans())
    boxes = []
    for i in range(n_mon + n_unmon):
        on_bridge = bridged and draw(st.integers(0, 4)) > 0
        mon = i if i < n_mon else None
        boxes.append(Box(f"m{i}v0" if mon is not None else f"u{i}v0", BRIDGE if on_bridge else None, mon))
    veth = draw(st.booleans())
    plan = make_plan(boxes, hops=draw(st.booleans()), end_at_queue=draw(st.booleans()),
                     start_at_veth=veth, socket=veth and draw(st.booleans()))
    cpus = sorted(draw(st.permutations(range(NCPU)))[:draw(st.integers(1, max_cpus))])
    npool = draw(st.integers(4, 16))
    slots = random.Random(draw(st.integers(0, 2**32 - 1))).sample(range(256), npool)
    pool = [0xFFFF888104000000 + 0x100 * k for k in sorted(slots)]
    return World(boxes, plan, cpus, pool, draw(st.sampled_from(MAX_AGES)))


@st.composite
def streams(draw, max_stories: int = 120, max_cpus: int = 4) -> Stream:
    # The stories come from a seeded generator: hypothesis draws are slow, and its small
    # integers would make most streams tiny.
    w = draw(worlds(max_cpus))
    rnd = random.Random(draw(st.integers(0, 2**32 - 1)))
    n = rnd.randint(1, 10) if rnd.random() < 0.2 else rnd.randint(max_stories // 3, max_stories)
    return tell(w, rnd, n, vanish=rnd.random() < 0.5)


# -- running both correlators -----------------------------------------------------------------


def pack(events) -> bytes:
    return b"".join(_RECORD.pack(*ev) for ev in events)


@dataclass
class Outcome:
    reports: list[Report]
    counts: list[dict]                  # per container, per direction name: COUNTERS
    in_flight: list[list[int]]
    glob: dict
    used: int                           # table entries after finish(), attributed or not
    corr: object = field(default=None, repr=False)   # the Cython correlator, if it was one

    def identity_holds(self) -> bool:
        for c, per in enumerate(self.counts):
            for d, name in enumerate(DIRS):
                k = per[name]
                if k["crossed"] != sum(k[n] for n in COUNTERS[1:]) + self.in_flight[c][d]:
                    return False
        return True


def cython_outcome(corr) -> Outcome:
    in_flight = corr.finish()
    reports = list(unpack(corr.take_reports()))
    c = corr.counters()
    counts = [{d: {n: per[d][n] for n in COUNTERS} for d in DIRS} for per in c["containers"]]
    return Outcome(reports, counts, in_flight, {g: c["global"][g] for g in GLOBALS},
                   c["global"]["table_used"], corr)


def run_cython(plan: Plan, events, *, max_age: int, table_size: int = BIG_TABLE,
               chunks: list[int] | None = None) -> Outcome:
    corr = plan.correlator(plan.probes(), table_size=table_size, max_age_ns=max_age, ncpu=NCPU)
    data = pack(events)
    if chunks is None:
        corr.feed_bytes(data)
    else:
        at = 0
        for n in chunks + [len(events)]:
            corr.feed_bytes(data[at * _RECORD.size:(at + n) * _RECORD.size])
            at += n
    return cython_outcome(corr)


def reference(plan: Plan, *, max_age: int, explain=None) -> ReferenceCorrelator:
    classes, owner = plan.device_classes()
    kinds = [_correlate.TYPES.get(p.tracepoint, 0) for p in plan.probes()]
    return ReferenceCorrelator(kinds, classes, owner, plan.inner_slots(), max_age_ns=max_age,
                               hops=plan.hops, bridge=bool(plan.bridges),
                               end_at_queue=plan.end_at_queue, veth_start=plan.start_at_veth,
                               route=plan.route, socket=plan.socket, explain=explain)


def run_reference(plan: Plan, events, *, max_age: int, explain=None) -> Outcome:
    ref = reference(plan, max_age=max_age, explain=explain)
    ref.feed(events)
    in_flight = ref.finish()
    reports = [Report(r.container, r.dir, r.seq, r.t0, r.latency, r.len, r.cpu,
                      tuple(h or None for h in r.hops))
               for r in ref.reports]
    counts = [{DIRS[d]: dict(per[d]) for d in (0, 1)} for per in ref.count]
    return Outcome(reports, counts, in_flight, {g: ref.glob.get(g, 0) for g in GLOBALS},
                   len(ref.table))


def without_seq(r: Report) -> Report:
    return r._replace(seq=0)


ROUTE_SLOT = (EGRESS_HOPS.index("route"), INGRESS_HOPS.index("route"))


def route_hops(r: Report) -> tuple:
    return (r.hops[ROUTE_SLOT[r.dir]],) if len(r.hops) > ROUTE_SLOT[r.dir] else ()


def without_route(r: Report) -> Report:
    """The report without its sequence number and its routing decision's time."""
    hops = list(r.hops)
    if len(hops) > ROUTE_SLOT[r.dir]:
        hops[ROUTE_SLOT[r.dir]] = None
    return r._replace(seq=0, hops=tuple(hops))


def assert_made_by(reports, made, *, seq=False):
    """Every report is one of `made` (with `seq`, the same list), but for the time of its
    routing decision: which chain a decision belongs to is read off the CPU's pending
    chains, and a correlator that gave up or forgot an entry sees other ones.  Where the
    stream is realistic, check_against_truth tells that a decision it times is the packet's."""
    if seq:
        assert [without_route(r)._replace(seq=r.seq) for r in reports] == \
            [without_route(r)._replace(seq=r.seq) for r in made]
        return
    missing = Counter(map(without_route, reports)) - Counter(map(without_route, made))
    assert not missing, f"reports the reference does not make: {list(missing)}"


def check_latency_stats(out: Outcome) -> None:
    """The correlator's per-container latency summaries and histograms agree with its reports."""
    per = out.corr.counters()["containers"]
    for c in range(len(per)):
        for d, name in enumerate(DIRS):
            lats = [r.latency for r in out.reports if (r.container, r.dir) == (c, d)]
            k = per[c][name]
            assert (k["min_ns"], k["max_ns"], k["sum_ns"]) == \
                (min(lats, default=None), max(lats, default=None), sum(lats))
            want = Counter(_correlate.bucket_of(v) for v in lats)
            hist = out.corr.histogram(c, d)
            assert {i: n for i, n in enumerate(hist) if n} == dict(want)
            for i in want:
                lo, hi = _correlate.bucket_bounds(i)
                assert all(lo <= v < hi for v in lats if _correlate.bucket_of(v) == i)


def check_against_truth(stream: Stream, reports: list[Report]) -> None:
    """Every report is a packet that really crossed: its start, end and hop times are
    events of one story of that container, direction and length."""
    truths = stream.truths()
    for r in reports:
        fits = [t for t in truths if t[:3] == (r.container, r.dir, r.len) and r.t0 in t[3]
                and r.t0 + r.latency in t[4] and t[4][r.t0 + r.latency] == r.cpu
                and all(h is None or r.t0 + h in t[5] for h in r.hops)]
        assert fits, f"report pairs events of different packets: {r}"


# -- the same as the reference, event for event -----------------------------------------------

MAIN = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@MAIN
@given(streams())
def test_same_reports_and_counters_as_the_reference(stream):
    plan, age = stream.world.plan, stream.world.max_age
    cy = run_cython(plan, stream.events, max_age=age)
    ref = run_reference(plan, stream.events, max_age=age)
    assert cy.reports == ref.reports
    assert cy.counts == ref.counts
    assert cy.in_flight == ref.in_flight
    assert (cy.glob, cy.used) == (ref.glob, ref.used)
    assert cy.identity_holds(), (cy.counts, cy.in_flight)
    check_latency_stats(cy)
    if stream.realistic:
        check_against_truth(stream, ref.reports)


# -- a tiny table gives fewer reports, never a wrong pairing ----------------------------------


PROM_BOUNDS = [100, 200, 500, 1000, 2000, 5000, 10_000, 50_000]


def expected_buckets(reports, container, direction, hops):
    """What enable_buckets() must count, from the reports themselves: the bucket of the
    first bound >= the value, the latency in row 0 and, with hops, each interval from the
    previous step seen to a hop slot (row 1 + slot) or to the end (the last row)."""
    import bisect
    nb = len(PROM_BOUNDS) + 1
    rows = _correlate.HOPS + 2
    counts, sums = [[0] * nb for _ in range(rows)], [0] * rows

    def add(row, v):
        counts[row][bisect.bisect_left(PROM_BOUNDS, v)] += 1
        sums[row] += v

    for r in reports:
        if (r.container, r.dir) != (container, direction):
            continue
        add(0, r.latency)
        if hops:
            prev = 0
            for i, h in enumerate((*r.hops, *[None] * (_correlate.HOPS - len(r.hops)), r.latency)):
                if h is not None:
                    add(rows - 1 if i == _correlate.HOPS else 1 + i, max(h - prev, 0))
                    prev = h
    return counts, sums


@MAIN
@given(streams(), st.booleans())
def test_caller_buckets_count_every_report_exactly(stream, hops):
    plan, age = stream.world.plan, stream.world.max_age
    corr = plan.correlator(plan.probes(), table_size=BIG_TABLE, max_age_ns=age, ncpu=NCPU)
    corr.enable_buckets(PROM_BOUNDS, hops=hops)
    corr.feed_bytes(pack(stream.events))
    out = cython_outcome(corr)
    for c in range(len(plan.containers)):
        for d in (0, 1):
            assert corr.buckets(c, d) == expected_buckets(out.reports, c, d, hops)


def test_caller_buckets_survive_growth_and_restart_with_a_reset_container():
    plan = make_plan([Box("m0v0", BRIDGE, 0)], hops=True, end_at_queue=False, start_at_veth=False)
    corr = plan.correlator(plan.probes(), table_size=BIG_TABLE, max_age_ns=10**9, ncpu=NCPU)
    with pytest.raises(RuntimeError):
        corr.buckets(0, 0)
    corr.enable_buckets([1000, 2000], hops=True)
    with pytest.raises(RuntimeError):
        corr.enable_buckets([1000])
    s = Script(plan)
    egress(s, A, 84)
    corr.feed_bytes(pack(s.events))
    counts, sums = corr.buckets(0, 0)
    assert sum(counts[0]) == 1 and sums[0] > 0
    classes, owner = plan.device_classes()
    corr.reconfigure(classes + [2], owner + [1], plan.inner_slots() + [plan.inner_slots()[0]])
    assert corr.buckets(1, 0) == ([[0, 0, 0]] * (_correlate.HOPS + 2), [0] * (_correlate.HOPS + 2))
    assert corr.buckets(0, 0) == (counts, sums)
    corr.reconfigure(classes + [2], owner + [1], plan.inner_slots() + [plan.inner_slots()[0]], reset=[0])
    assert corr.buckets(0, 0) == ([[0, 0, 0]] * (_correlate.HOPS + 2), [0] * (_correlate.HOPS + 2))
    with pytest.raises(ValueError):
        type(corr).enable_buckets(plan.correlator(plan.probes()), [5, 5])


@settings(MAIN, max_examples=150)
@given(streams(), st.sampled_from([2, 4, 8]))
def test_tiny_table_never_pairs_wrongly(stream, table_size):
    plan, age = stream.world.plan, stream.world.max_age
    cy = run_cython(plan, stream.events, max_age=age, table_size=table_size)
    ref = run_reference(plan, stream.events, max_age=age)
    # A table that gave up an entry of a CPU's pending batch no longer knows the batch: its
    # packets' routing decisions are then left untimed (None), never given to another
    assert_made_by(cy.reports, ref.reports)
    assert all(0 < r.latency <= age for r in cy.reports)
    assert cy.identity_holds(), (cy.counts, cy.in_flight)
    if stream.realistic:
        check_against_truth(stream, cy.reports)
    # sequence numbers still count each container's reports from 1
    for c in range(len(plan.containers)):
        for d in (EGRESS, INGRESS):
            assert [r.seq for r in cy.reports if (r.container, r.dir) == (c, d)] == \
                list(range(1, cy.counts[c][DIRS[d]]["reports"] + 1))


# -- the whole pipeline: ring images -> Rings -> Correlator -----------------------------------


def run_pipeline(stream: Stream, *, max_age: int) -> tuple[Outcome, list[list[Event]], Rings]:
    w, k = stream.world, stream.world.kernel
    per_ring = [[ev for ev in stream.events if ev.cpu == c] for c in w.cpus]
    biggest = max(sum(len(k.net_event(ev).encode()) for ev in evs) for evs in per_ring)
    pages = 1
    while pages * PAGE < biggest:
        pages *= 2
    rings = Rings(cpus=w.cpus, ring_pages=pages, reorder_ns=0)
    layouts = [builtin_layout(p.tracepoint) for p in k.probes]
    for i, layout in enumerate(layouts):
        assert rings.add_kind(**layout) == i
    rings.set_devices(w.plan.devices)
    decoder = ReferenceDecoder(layouts, w.plan.devices)
    for i, evs in enumerate(per_ring):
        img = RingImage(pages)
        assert img.write(*(k.net_event(ev).encode() for ev in evs)) == len(evs)
        assert decoder.decode(img.data(), w.cpus[i])[0] == evs      # the images say what we meant
        rings.attach(i, img.buf)
    corr = w.plan.correlator(k.probes, table_size=BIG_TABLE, max_age_ns=max_age, ncpu=NCPU)
    rings.feed(corr, final=True)
    return cython_outcome(corr), per_ring, rings


@settings(MAIN, max_examples=60)
@given(streams(max_stories=40, max_cpus=3))
def test_pipeline_from_ring_images_matches_the_reference(stream):
    age = stream.world.max_age
    cy, per_ring, rings = run_pipeline(stream, max_age=age)
    merged, kept = merge(per_ring)
    assert kept == [[] for _ in per_ring]
    assert merged == stream.events
    s = rings.stats()
    assert (s["samples"], s["lost"], s["errors"], s["unknown"], s["late"]) == (len(merged), 0, 0, 0, 0)
    ref = run_reference(stream.world.plan, merged, max_age=age)
    assert cy.reports == ref.reports
    assert cy.counts == ref.counts
    assert cy.in_flight == ref.in_flight
    assert (cy.glob, cy.used) == (ref.glob, ref.used)


# -- batching ---------------------------------------------------------------------------------


@settings(MAIN, max_examples=60)
@given(streams(), st.sampled_from([1, 2, 3, 8, 64]))
def test_batch_boundaries_change_no_report(stream, report_cap):
    """A small report buffer makes consume() stop early, again and again, and the sweep run
    after each short batch: neither may change what is reported."""
    w = stream.world
    corr = w.plan.correlator(w.plan.probes(), table_size=BIG_TABLE, max_age_ns=w.max_age,
                             ncpu=NCPU, report_cap=report_cap)
    corr.feed_bytes(pack(stream.events))
    cy = cython_outcome(corr)
    ref = run_reference(w.plan, stream.events, max_age=w.max_age)
    assert cy.reports == ref.reports
    assert cy.identity_holds(), (cy.counts, cy.in_flight)


# -- hand-written scenarios -------------------------------------------------------------------

A, B, C, D = (0xFFFF888104000000 + 0x100 * k for k in (1, 2, 3, 4))
R = 0xFFFF888104000F00          # an ARP request
Q = 0xFFFF888104000E00          # the answer (an ARP reply)
M0, M1, U = Box("m0v0", BRIDGE, 0), Box("m1v0", BRIDGE, 1), Box("u2v0", BRIDGE, None)


class Script:
    """A hand-written stream: each call adds one event `dt` ns after the previous one and
    returns its time.  Events the plan's filters would drop are refused."""

    def __init__(self, plan: Plan, t: int = 1000):
        self.plan, self.kernel, self.events, self.t = plan, Kernel(plan), [], t

    def __call__(self, tp, dev, skb, length, *, proto=IP, cpu=0, tid=1, dt=100, at=None,
                 flags=0, role=None) -> int:
        self.t = at if at is not None else self.t + dt
        ev = self.kernel.event(TP[tp], dev, skb, length, proto, self.t, cpu, tid, flags, role)
        assert ev is not None, f"{tp} on {dev} does not pass this plan's filters"
        self.events.append(ev)
        return self.t


def correlate(s: Script, *, max_age: int = 1_000_000_000) -> Outcome:
    """Run both correlators on the script; they must agree on everything."""
    cy = run_cython(s.plan, s.events, max_age=max_age)
    ref = run_reference(s.plan, s.events, max_age=max_age)
    assert cy.reports == ref.reports
    assert (cy.counts, cy.in_flight, cy.glob, cy.used) == (ref.counts, ref.in_flight, ref.glob, ref.used)
    assert cy.identity_holds()
    return cy


def counts(out: Outcome, container: int, direction: str, *names) -> tuple:
    return tuple(out.counts[container][direction][n] for n in names)


def egress(s: Script, skb, L, *, veth="m0v0", bridge=BRIDGE, cpu=0, tid=1, cpu2=None, tid2=None):
    """A complete egress packet; returns its start and end times."""
    cpu2 = cpu if cpu2 is None else cpu2
    tid2 = tid + 1 if tid2 is None else tid2
    t0 = s("xmit", INNER, skb, L + ETH_HLEN, cpu=cpu, tid=tid)
    if s.plan.hops:
        s("rx", veth, skb, L, cpu=cpu, tid=tid)
    s("recv", veth, skb, L, cpu=cpu2, tid=tid2)
    if s.plan.hops and bridge:
        s("recv", bridge, skb, L, cpu=cpu2, tid=tid2)
    t1 = s("queue", UPLINK, skb, L + ETH_HLEN, cpu=cpu2, tid=tid2)
    if not s.plan.end_at_queue:
        t1 = s("xmit", UPLINK, skb, L + ETH_HLEN, cpu=cpu2, tid=tid2)
    return t0, t1


def ingress(s: Script, skb, L, *, veth="m0v0", bridge=BRIDGE, cpu=0, tid=1, cpu2=None, tid2=None):
    cpu2 = cpu if cpu2 is None else cpu2
    tid2 = tid + 1 if tid2 is None else tid2
    t0 = s("recv", UPLINK, skb, L, cpu=cpu, tid=tid)
    if s.plan.hops and bridge:
        s("xmit", bridge, skb, L + ETH_HLEN, cpu=cpu, tid=tid)
    s("xmit", veth, skb, L + ETH_HLEN, cpu=cpu, tid=tid)
    if s.plan.hops:
        s("rx", INNER, skb, L, cpu=cpu, tid=tid)
    t1 = s("recv", INNER, skb, L, cpu=cpu2, tid=tid2)
    return t0, t1


@pytest.mark.parametrize("hops", [False, True], ids=["boundary", "hops"])
def test_plain_egress_and_ingress_reports_with_hops(hops):
    s = Script(make_plan([M0], hops=hops, end_at_queue=False))
    s("xmit", INNER, A, 98, cpu=0, tid=1, at=1000)
    if hops:
        s("rx", "m0v0", A, 84, cpu=0, tid=1, at=1100)
    s("recv", "m0v0", A, 84, cpu=1, tid=7, at=1500)      # from the backlog, elsewhere
    if hops:
        s("recv", BRIDGE, A, 84, cpu=1, tid=7, at=1600)
        s("route", UPLINK, 0, 0, cpu=1, tid=7, at=1650, role="fwd")     # the forward lookup
    s("queue", UPLINK, A, 98, cpu=1, tid=7, at=1700)
    s("xmit", UPLINK, A, 98, cpu=2, tid=9, at=2500)      # from the qdisc, elsewhere
    s("recv", UPLINK, B, 84, cpu=1, tid=7, at=3000)
    if hops:
        s("route", BRIDGE, 0, 0, cpu=1, tid=7, at=3020)                  # towards the bridge
        s("route", BRIDGE, 0, 0, cpu=1, tid=7, at=3030)                  # a second: the first counts
        s("xmit", BRIDGE, B, 98, cpu=1, tid=7, at=3050)
    s("xmit", "m0v0", B, 98, cpu=1, tid=7, at=3100)
    if hops:
        s("rx", INNER, B, 84, cpu=1, tid=7, at=3150)
    s("recv", INNER, B, 84, cpu=3, tid=11, at=4000)
    out = correlate(s)
    eg_hops = (100, 500, 600, 650, 700) if hops else (None, 500, None, None, 700)
    in_hops = (20, 50, 100, 150) if hops else (None, None, 100, None)
    assert out.reports == [Report(0, EGRESS, 1, 1000, 1500, 84, 2, eg_hops),
                           Report(0, INGRESS, 1, 3000, 1000, 84, 3, in_hops)]
    for d in DIRS:
        assert counts(out, 0, d, "crossed", "reports") == (1, 1)
    assert out.in_flight == [[0, 0]]
    assert out.glob["inserts"] == 2


def test_egress_from_the_veth_samples_no_inner_xmit_and_knows_its_container_at_once():
    plan = make_plan([M0, M1], hops=False, end_at_queue=False, start_at_veth=True)
    assert not Kernel(plan).visible(XMIT, INNER)         # no container's egress xmit is sampled
    s = Script(plan)
    s("rx", "m1v0", A, 84, cpu=0, tid=1, at=1000)        # veth_xmit: netif_rx on the host side
    s("recv", "m1v0", A, 84, cpu=1, tid=7, at=1500)      # from the backlog, elsewhere
    s("queue", UPLINK, A, 98, cpu=1, tid=7, at=1700)
    s("xmit", UPLINK, A, 98, cpu=2, tid=9, at=2500)      # from the qdisc, elsewhere
    out = correlate(s)
    assert out.reports == [Report(1, EGRESS, 1, 1000, 1500, 84, 2, (None, 500, None, None, 700))]
    assert counts(out, 1, "egress", "crossed", "reports") == (1, 1)
    assert counts(out, 0, "egress", "crossed", "reports") == (0, 0)


def test_arp_from_a_container_starts_nothing_at_the_veth():
    s = Script(make_plan([M0], hops=False, end_at_queue=False, start_at_veth=True))
    s("rx", "m0v0", R, ARP_L3, proto=ARP, at=1000)
    s("recv", "m0v0", R, ARP_L3, tid=2, at=1500)
    out = correlate(s)
    assert out.reports == [] and out.glob["nonip"] == 1 and out.glob["inserts"] == 0
    assert counts(out, 0, "egress", "crossed") == (0,)


def test_a_veth_start_still_needs_the_chain_the_inner_start_needs():
    # the host's own packet reusing the address after a silent local delivery: the uplink
    # queue is not in the old entry's call chain, so nothing is paired
    s = Script(make_plan([M0], hops=False, end_at_queue=False, start_at_veth=True))
    s("rx", "m0v0", A, 84, tid=1, at=1000)
    s("recv", "m0v0", A, 84, tid=2, at=1500)             # delivered to the host, freed silently
    s("recv", UPLINK, C, 84, tid=3, at=1600)             # the CPU moves on
    s("queue", UPLINK, A, 98, tid=4, at=2000)            # the host's own packet, same address
    s("xmit", UPLINK, A, 98, tid=4, at=2100)
    out = correlate(s)
    assert [r for r in out.reports if r.dir == EGRESS] == []


def test_end_at_queue_ends_egress_at_the_queue_event():
    plan = make_plan([M0], hops=False, end_at_queue=True)
    assert not Kernel(plan).visible(XMIT, UPLINK)        # not even traced
    s = Script(plan)
    s("xmit", INNER, A, 98, at=1000)
    s("recv", "m0v0", A, 84, tid=2, at=1500)
    s("queue", UPLINK, A, 98, tid=2, at=1600)
    out = correlate(s)
    assert out.reports == [Report(0, EGRESS, 1, 1000, 600, 84, 0, (None, 500, None, None, None))]
    assert out.in_flight == [[0, 0]]


def test_reuse_after_silent_local_delivery_never_completes_the_old_entry():
    s = Script(make_plan([M0], hops=False, end_at_queue=False))
    s("xmit", INNER, A, 98, cpu=0, tid=1)
    s("recv", "m0v0", A, 84, cpu=0, tid=2)      # delivered to the host, freed untraced
    s("recv", UPLINK, B, 60, cpu=0, tid=2)      # the CPU moves on to another packet
    t0, t1 = egress(s, A, 84, cpu=1, tid=5)      # the address again, same length
    out = correlate(s)
    assert out.reports == [Report(0, EGRESS, 1, t0, t1 - t0, 84, 1, (None, 100, None, None, 200))]
    assert counts(out, 0, "egress", "crossed", "reports", "local") == (2, 1, 1)


def test_reuse_by_the_host_before_the_cpu_moved_on_is_not_paired():
    # the old packet still waits for its (synchronous) uplink step; the host sends a packet
    # of the same length from that address on another CPU: not the same call chain
    s = Script(make_plan([M0], hops=False, end_at_queue=False))
    s("xmit", INNER, A, 98, cpu=0, tid=1)
    s("recv", "m0v0", A, 84, cpu=0, tid=2)
    s("queue", UPLINK, A, 98, cpu=1, tid=5)
    s("xmit", UPLINK, A, 98, cpu=1, tid=5)
    out = correlate(s)
    assert out.reports == []
    assert counts(out, 0, "egress", "crossed", "reports", "rejected") == (1, 0, 1)


def test_stale_host_bound_ingress_entry_is_not_matched_by_host_to_container_packet():
    s = Script(make_plan([M0], hops=False, end_at_queue=False))
    s("recv", UPLINK, A, 84, cpu=0, tid=1)      # for the host; cpu 0 then stays idle
    s("xmit", "m0v0", A, 98, cpu=1, tid=5)      # the host sends into the container, same size
    s("recv", INNER, A, 84, cpu=2, tid=6)
    out = correlate(s)
    assert out.reports == []
    assert counts(out, 0, "ingress", "crossed", "local", "reports") == (1, 1, 0)
    assert out.glob["superseded"] == 1
    assert out.in_flight == [[0, 0]]


@pytest.mark.parametrize("hops", [False, True], ids=["boundary", "hops"])
def test_containers_sharing_eth0_are_told_apart_by_their_veth(hops):
    plan = make_plan([M0, M1], hops=hops, end_at_queue=False)
    assert plan.inner_slots() == [0, 0]
    s = Script(plan)
    # container 1 sends A while container 0 sends B on another CPU, interleaved
    s("xmit", INNER, A, 114, cpu=0, tid=1)
    s("xmit", INNER, B, 98, cpu=1, tid=3)
    if hops:
        s("rx", "m1v0", A, 100, cpu=0, tid=1)
        s("rx", "m0v0", B, 84, cpu=1, tid=3)
    s("recv", "m1v0", A, 100, cpu=0, tid=2)
    s("recv", "m0v0", B, 84, cpu=1, tid=4)
    if hops:
        s("recv", BRIDGE, B, 84, cpu=1, tid=4)
        s("recv", BRIDGE, A, 100, cpu=0, tid=2)
    s("queue", UPLINK, B, 98, cpu=1, tid=4)
    s("queue", UPLINK, A, 114, cpu=0, tid=2)
    s("xmit", UPLINK, A, 114, cpu=0, tid=2)
    s("xmit", UPLINK, B, 98, cpu=1, tid=4)
    ingress(s, C, 200, veth="m1v0", bridge=BRIDGE, cpu=2, tid=8)
    out = correlate(s)
    assert [(r.container, r.dir, r.len) for r in out.reports] == \
        [(1, EGRESS, 100), (0, EGRESS, 84), (1, INGRESS, 200)]
    assert counts(out, 0, "egress", "crossed", "reports") == (1, 1)
    assert counts(out, 1, "egress", "crossed", "reports") == (1, 1)
    assert counts(out, 1, "ingress", "crossed", "reports") == (1, 1)
    assert counts(out, 0, "ingress", "crossed") == (0,)


@pytest.mark.parametrize("hops", [False, True], ids=["boundary", "hops"])
def test_unmonitored_container_is_never_reported(hops):
    plan = make_plan([M0, U], hops=hops, end_at_queue=False)
    k = Kernel(plan)
    assert not k.visible(RECV, "u2v0") and not k.visible(XMIT, "u2v0")
    s = Script(plan)
    # U sends: its eth0 passes the filter, its veth does not
    s("xmit", INNER, A, 98, cpu=0, tid=1)
    if hops:
        s("recv", BRIDGE, A, 84, cpu=1, tid=2)
    s("queue", UPLINK, A, 98, cpu=1, tid=2)
    s("xmit", UPLINK, A, 98, cpu=1, tid=2)
    # U receives, same length as everything else
    s("recv", UPLINK, B, 84, cpu=2, tid=3)
    if hops:
        s("xmit", BRIDGE, B, 98, cpu=2, tid=3)
        s("rx", INNER, B, 84, cpu=2, tid=3)
    s("recv", INNER, B, 84, cpu=3, tid=4)
    out = correlate(s)
    assert out.reports == []
    assert out.counts == [{d: dict.fromkeys(COUNTERS, 0) for d in DIRS}]
    assert out.in_flight == [[0, 0]]


def test_kfree_skb_midway_counts_dropped():
    s = Script(make_plan([M0], hops=True, end_at_queue=False))
    s("xmit", INNER, A, 98, cpu=0, tid=1)
    s("rx", "m0v0", A, 84, cpu=0, tid=1)
    s("free", None, A, 0, cpu=0, tid=1)        # backlog full
    s("recv", UPLINK, B, 84, cpu=1, tid=2)
    s("xmit", BRIDGE, B, 98, cpu=1, tid=2)
    s("xmit", "m0v0", B, 98, cpu=1, tid=2)
    s("free", None, C, 0, cpu=1, tid=2)        # another packet's free inside the chain
    s("rx", INNER, B, 84, cpu=1, tid=2)
    s("free", None, B, 0, cpu=3, tid=4)        # dropped in the container's backlog
    out = correlate(s)
    assert out.reports == []
    assert counts(out, 0, "egress", "crossed", "dropped") == (1, 1)
    assert counts(out, 0, "ingress", "crossed", "dropped", "rejected") == (1, 1, 0)
    assert out.glob["frees"] == 3


def test_arp_parked_egress_is_reported_with_its_full_latency():
    s = Script(make_plan([M0], hops=False, end_at_queue=False))
    s("xmit", INNER, A, 98, cpu=0, tid=1, at=1000)
    s("recv", "m0v0", A, 84, cpu=0, tid=2, at=1500)
    s("queue", UPLINK, R, 42, cpu=0, tid=2, at=1600)    # the neighbour sends an ARP request
    s("xmit", UPLINK, R, 42, proto=ARP, cpu=0, tid=2, at=1700)
    s("recv", UPLINK, D, 28, cpu=1, tid=3, at=40_000)   # the reply, for the host
    s("queue", UPLINK, A, 98, cpu=1, tid=3, at=41_000)   # the parked packet leaves
    s("xmit", UPLINK, A, 98, cpu=1, tid=3, at=41_500)
    out = correlate(s)
    assert out.reports == [Report(0, EGRESS, 1, 1000, 40_500, 84, 1, (None, 500, None, None, 40_000))]
    assert out.glob["parked"] == 1
    assert out.glob["unclaimed"] == 1


def test_an_arp_request_from_another_thread_does_not_park_the_packet():
    s = Script(make_plan([M0], hops=False, end_at_queue=False))
    s("xmit", INNER, A, 98, cpu=0, tid=1, at=1000)
    s("recv", "m0v0", A, 84, cpu=0, tid=2, at=1500)
    s("queue", UPLINK, R, 42, cpu=0, tid=3, at=1600)    # not A's call chain
    s("queue", UPLINK, A, 98, cpu=1, tid=4, at=41_000)
    s("xmit", UPLINK, A, 98, cpu=1, tid=4, at=41_500)
    out = correlate(s)
    assert out.reports == []
    assert out.glob["parked"] == 0
    assert counts(out, 0, "egress", "crossed", "local") == (1, 1)


def test_arp_parked_ingress_is_reported_with_its_full_latency():
    s = Script(make_plan([M0], hops=True, end_at_queue=False))
    s("recv", UPLINK, A, 84, cpu=0, tid=1, at=1000)
    s("xmit", BRIDGE, R, 42, proto=ARP, cpu=0, tid=1, at=1100)   # who has the container?
    s("xmit", "m0v0", R, 42, proto=ARP, cpu=0, tid=1, at=1150)
    s("rx", INNER, R, 28, cpu=0, tid=1, at=1200)
    s("rx", "m0v0", Q, 28, proto=ARP, cpu=1, tid=4, at=29_000)   # the container answers
    s("recv", "m0v0", Q, 28, cpu=2, tid=5, at=29_800)            # its backlog, elsewhere
    s("xmit", BRIDGE, A, 98, cpu=2, tid=5, at=30_000)            # resolved: sent on
    s("xmit", "m0v0", A, 98, cpu=2, tid=5, at=30_100)
    s("rx", INNER, A, 84, cpu=2, tid=5, at=30_200)
    s("recv", INNER, A, 84, cpu=3, tid=6, at=31_000)
    out = correlate(s)
    assert out.reports == [Report(0, INGRESS, 1, 1000, 30_000, 84, 3, (None, 29_000, 29_100, 29_200))]
    assert out.glob["parked"] == 1


@pytest.mark.parametrize("answered", [False, True], ids=["unanswered", "answered-elsewhere"])
def test_a_parked_packet_leaves_only_in_its_answers_chain(answered):
    # A packet for the host, then the neighbour timer's probe into a container in the same
    # thread and context (back to back softirqs): taken as the packet asking.  The host's
    # next packet into the container reuses the freed address; without an answer, or away
    # from its chain, it is not the parked packet leaving the queue.
    s = Script(make_plan([M0], hops=False, end_at_queue=False))
    s("recv", UPLINK, A, 84, cpu=0, tid=1, flags=0x10, at=1000)        # for the host
    s("xmit", "m0v0", R, 42, proto=ARP, cpu=0, tid=1, flags=0x10, at=1200)   # the timer's probe
    if answered:
        s("recv", "m0v0", Q, 28, cpu=1, tid=4, flags=0x10, at=9_000)   # its answer, on CPU 1
    s("xmit", "m0v0", A, 98, cpu=0, tid=7, at=20_000)                  # the host's own packet
    s("recv", INNER, A, 84, cpu=0, tid=8, at=20_500)
    out = correlate(s)
    assert out.reports == []
    assert out.glob["parked"] == 1


def test_only_the_newest_of_a_batchs_chains_asks_for_the_neighbour():
    # Two receives of one batch; the request comes in the second packet's chain: the first
    # one's chain ended (it was for the host), and the host's next packet into the container
    # from its address must not be taken for it
    s = Script(make_plan([M0], hops=False, end_at_queue=False))
    s("recv", UPLINK, A, 84, cpu=0, tid=1, at=1000)                   # for the host
    s("recv", UPLINK, B, 84, cpu=0, tid=1, at=1100)                   # the same batch
    s("xmit", "m0v0", R, 42, proto=ARP, cpu=0, tid=1, at=1200)        # who has the container?
    s("xmit", "m0v0", A, 98, cpu=1, tid=5, at=20_000)                 # A's address, the host's packet
    s("recv", INNER, A, 84, cpu=1, tid=6, at=20_500)
    s("recv", "m0v0", Q, 28, cpu=2, tid=7, at=29_900)                 # the container answers
    s("xmit", "m0v0", B, 98, cpu=2, tid=7, at=30_000)                 # resolved: B is sent on
    s("recv", INNER, B, 84, cpu=3, tid=8, at=31_000)
    out = correlate(s)
    assert out.reports == [Report(0, INGRESS, 1, 1100, 29_900, 84, 3, (None, None, 28_900, None))]
    assert out.glob["parked"] == 1
    assert counts(out, 0, "ingress", "crossed", "reports", "local") == (2, 1, 1)



@pytest.mark.parametrize("false_len", [72, ARP_PAD_L3], ids=["tcp-ack-sized", "padded"])
def test_a_receive_of_an_answers_size_first_does_not_hide_the_answer(false_len):
    # The uplink receives a 72-byte TCP ACK (or any padded 46-byte frame) in another chain
    # before the neighbour's answer: the packet that asked still leaves in the answer's
    s = Script(queued_plan())
    ta = first_hop(s, "m0v0", A, 84, cpu=1, tid=10)
    s("queue", UPLINK, R, ARP_L3 + ETH_HLEN, cpu=1, tid=10)      # A's chain asks
    s("recv", UPLINK, D, false_len, cpu=0, tid=30, dt=5_000)      # not the answer
    s("recv", UPLINK, Q, ARP_L3, cpu=1, tid=24, dt=30_000)        # the answer
    t1 = s("queue", UPLINK, A, 98, cpu=1, tid=24)
    out = correlate(s)
    assert [(r.container, r.t0, r.t0 + r.latency) for r in out.reports] == [(0, ta, t1)]


def test_a_padded_arp_reply_on_the_uplink_is_an_answer():
    s = Script(queued_plan())
    ta = first_hop(s, "m0v0", A, 84, cpu=1, tid=10)
    s("queue", UPLINK, R, ARP_L3 + ETH_HLEN, cpu=1, tid=10)
    s("recv", UPLINK, Q, ARP_PAD_L3, cpu=0, tid=24, dt=30_000)    # 60-byte frame from a NIC
    t1 = s("queue", UPLINK, A, 98, cpu=0, tid=24)
    out = correlate(s)
    assert [(r.container, r.t0, r.t0 + r.latency) for r in out.reports] == [(0, ta, t1)]


def test_two_containers_waiting_for_their_own_answers_are_both_reported():
    # Two peers' first packets into two new containers: two resolutions at once, answered
    # in turn, each flushed in its own answer's chain
    s = Script(make_plan([M0, M1], hops=False, end_at_queue=False))
    s("recv", UPLINK, A, 84, cpu=0, tid=1, flags=0x10, at=1000)
    s("xmit", "m0v0", R, 42, proto=ARP, cpu=0, tid=1, flags=0x10, at=1200)
    s("recv", UPLINK, B, 84, cpu=1, tid=2, flags=0x10, at=1300)
    s("xmit", "m1v0", C, 42, proto=ARP, cpu=1, tid=2, flags=0x10, at=1500)
    s("recv", "m0v0", Q, 28, cpu=0, tid=3, flags=0x10, at=20_000)     # container 0 answers
    s("xmit", "m0v0", A, 98, cpu=0, tid=3, flags=0x10, at=20_200)
    s("recv", "m1v0", D, 28, cpu=1, tid=4, flags=0x10, at=21_000)     # container 1 answers
    s("xmit", "m1v0", B, 98, cpu=1, tid=4, flags=0x10, at=21_200)
    s("recv", INNER, A, 84, cpu=0, tid=5, at=22_000)
    s("recv", INNER, B, 84, cpu=1, tid=6, at=23_000)
    out = correlate(s)
    assert sorted((r.container, r.t0) for r in out.reports) == [(0, 1000), (1, 1300)]


def test_a_containers_answer_flushes_only_packets_to_that_container():
    # B's chain ends (it was for the host) while A waits for container 0: taken as queued.
    # In the chain of container 0's answer, the host's own packet to container 1 at B's
    # address is not B leaving the queue.
    s = Script(make_plan([M0, M1], hops=False, end_at_queue=False))
    s("recv", UPLINK, A, 84, cpu=0, tid=1, flags=0x10, at=1000)
    s("xmit", "m0v0", R, 42, proto=ARP, cpu=0, tid=1, flags=0x10, at=1200)   # A asks
    s("recv", UPLINK, B, 84, cpu=1, tid=2, flags=0x10, at=2000)               # for the host
    s("recv", UPLINK, C, 52, cpu=1, tid=3, at=2500)                           # B's chain ended
    s("recv", "m0v0", Q, 28, cpu=0, tid=5, flags=0x10, at=20_000)            # container 0 answers
    s("xmit", "m0v0", A, 98, cpu=0, tid=5, flags=0x10, at=20_200)
    s("xmit", "m1v0", B, 98, cpu=0, tid=5, flags=0x10, at=20_400)             # the host's, to 1
    s("recv", INNER, A, 84, cpu=0, tid=6, at=21_000)
    s("recv", INNER, B, 84, cpu=1, tid=7, at=21_500)
    out = correlate(s)
    assert [(r.container, r.t0) for r in out.reports] == [(0, 1000)]

def test_a_parked_packet_does_not_leave_long_after_the_answer():
    # the queue is flushed right in the answer's chain: the same thread 2 ms later is not it
    s = Script(queued_plan())
    first_hop(s, "m0v0", A, 84, cpu=1, tid=10)
    s("queue", UPLINK, R, ARP_L3 + ETH_HLEN, cpu=1, tid=10)
    s("recv", UPLINK, Q, ARP_L3, cpu=1, tid=24, dt=30_000)
    s("queue", UPLINK, A, 98, cpu=1, tid=24, dt=2_000_000)
    out = correlate(s)
    assert out.reports == []

def test_an_event_after_max_age_expires_the_entry():
    age = 10_000
    s = Script(make_plan([M0], hops=False, end_at_queue=False))
    t0, t1 = egress(s, A, 84, tid=1)
    assert t1 - t0 < age
    s("xmit", INNER, B, 98, at=100_000)
    s("recv", "m0v0", B, 84, tid=2, at=100_500)
    s("queue", UPLINK, B, 98, tid=2, at=100_600)
    s("xmit", UPLINK, B, 98, tid=2, at=100_000 + age + 1)     # 1 ns too late
    s("xmit", INNER, C, 98, at=200_000)
    s("recv", "m0v0", C, 84, tid=2, at=200_500)
    s("queue", UPLINK, C, 98, tid=2, at=200_600)
    s("xmit", UPLINK, C, 98, tid=2, at=200_000 + age)         # just in time
    out = correlate(s, max_age=age)
    assert [(r.t0, r.latency) for r in out.reports] == [(t0, t1 - t0), (200_000, age)]
    assert counts(out, 0, "egress", "crossed", "reports", "expired") == (3, 2, 1)


def test_entries_older_than_max_age_expire_at_finish():
    age = 10_000
    s = Script(make_plan([M0], hops=False, end_at_queue=False))
    s("xmit", INNER, A, 98, at=1000)
    s("recv", "m0v0", A, 84, cpu=1, tid=2, at=1500)      # cpu 1 then stays idle
    s("recv", UPLINK, B, 84, cpu=2, tid=3, at=50_000)
    s("xmit", "m0v0", B, 98, cpu=2, tid=3, at=50_100)     # B still in the container's backlog
    out = correlate(s, max_age=age)
    assert counts(out, 0, "egress", "crossed", "expired") == (1, 1)
    assert out.in_flight == [[0, 1]]


def test_container_to_container_counts_local_on_both_sides():
    s = Script(make_plan([M0, M1], hops=True, end_at_queue=False))
    s("xmit", INNER, A, 98, cpu=0, tid=1)
    s("rx", "m0v0", A, 84, cpu=0, tid=1)
    s("recv", "m0v0", A, 84, cpu=0, tid=2)
    s("xmit", "m1v0", A, 98, cpu=0, tid=2)      # the bridge forwards it to container 1
    s("rx", INNER, A, 84, cpu=0, tid=2)
    s("recv", INNER, A, 84, cpu=1, tid=3)
    out = correlate(s)
    assert out.reports == []
    assert counts(out, 0, "egress", "crossed", "local") == (1, 1)
    assert counts(out, 1, "ingress", "crossed", "local") == (1, 1)
    assert counts(out, 0, "ingress", "crossed") == counts(out, 1, "egress", "crossed") == (0,)
    assert out.in_flight == [[0, 0], [0, 0]]


def test_skb_zero_and_other_frees_do_not_break_a_call_chain():
    s = Script(make_plan([M0], hops=False, end_at_queue=False))
    s("xmit", INNER, A, 98, at=1000)
    s("recv", "m0v0", A, 84, tid=2, at=1500)
    s("recv", UPLINK, 0, 60, tid=2, at=1510)       # skb 0: ignored
    s("free", None, B, 0, tid=2, at=1520)          # some other packet freed on the way
    s("queue", UPLINK, A, 98, tid=2, at=1600)
    s("xmit", UPLINK, A, 98, tid=2, at=1700)
    out = correlate(s)
    assert [(r.t0, r.latency) for r in out.reports] == [(1000, 700)]
    assert out.glob["ignored"] == 1


def test_a_duplicated_event_ends_the_packet():
    s = Script(make_plan([M0], hops=False, end_at_queue=False))
    s("xmit", INNER, A, 98)
    s("recv", "m0v0", A, 84, tid=2)
    s("recv", "m0v0", A, 84, tid=2)                # once more: not a next step
    s("queue", UPLINK, A, 98, tid=2)
    s("xmit", UPLINK, A, 98, tid=2)
    out = correlate(s)
    assert out.reports == []
    assert counts(out, 0, "egress", "crossed", "rejected", "orphans") == (2, 1, 1)


def test_an_address_reused_with_another_length_is_not_paired():
    # Container 0's packet vanishes untraced from its backlog; the host then sends a packet
    # with the same address into an unmonitored container, whose inner device is eth0 too.
    plan = make_plan([M0, U], hops=False, end_at_queue=False)
    s = Script(plan)
    s("recv", UPLINK, A, 84, cpu=0, tid=1)
    s("xmit", "m0v0", A, 98, cpu=0, tid=1)
    s("recv", UPLINK, B, 60, cpu=0, tid=1)       # cpu 0 moves on
    s("recv", INNER, A, 100, cpu=1, tid=2)       # (xmit u2v0 is filtered out)
    out = correlate(s)
    assert out.reports == []
    assert counts(out, 0, "ingress", "crossed", "rejected") == (1, 1)


def test_an_ingress_entry_the_table_gave_up_makes_an_orphan_not_host_traffic():
    plan = make_plan([M0], hops=False, end_at_queue=False)
    s = Script(plan)
    s("recv", UPLINK, A, 84, cpu=0, tid=1)
    s("recv", UPLINK, B, 84, cpu=1, tid=2)
    s("recv", UPLINK, C, 84, cpu=2, tid=3)       # a table of 2: A, the oldest, must go
    s("xmit", "m0v0", A, 98, cpu=0, tid=1)
    s("recv", INNER, A, 84, cpu=3, tid=4)
    corr = plan.correlator(plan.probes(), table_size=2, ncpu=NCPU)
    corr.feed_bytes(pack(s.events))
    out = cython_outcome(corr)
    assert out.reports == []
    assert counts(out, 0, "ingress", "crossed", "orphans", "local") == (1, 1, 0)
    assert out.glob["evicted"] == 1
    assert out.identity_holds()
    # the reference never gives an entry up: there, A is reported
    assert [r.t0 for r in run_reference(plan, s.events, max_age=10**9).reports] == [1100]


def test_reports_beyond_the_buffer_wait_for_take_reports():
    # a report buffer of 4: consume() stops every 4 reports; feed_bytes spills and goes on
    plan = make_plan([M0], hops=False, end_at_queue=False)
    s = Script(plan)
    n = 1500
    for i in range(n):
        egress(s, A if i % 2 else B, 84 + i % 7, cpu=i % 3, tid=1)
    corr = plan.correlator(plan.probes(), table_size=64, ncpu=NCPU, report_cap=4)
    assert corr.feed_bytes(pack(s.events)) == len(s.events)
    assert corr.finish() == [[0, 0]]
    reports = list(unpack(corr.take_reports()))
    assert [r.seq for r in reports] == list(range(1, n + 1))
    assert [r.len for r in reports] == [84 + i % 7 for i in range(n)]
    assert run_reference(plan, s.events, max_age=1_000_000_000).reports == reports
    assert corr.take_reports() == b""


# -- batch boundaries -------------------------------------------------------------------------


@pytest.mark.parametrize("end", ["cpu-moves-on", "kfree"])
def test_counters_do_not_depend_on_batch_boundaries(end):
    age = 10_000
    s = Script(make_plan([M0], hops=False, end_at_queue=False))
    s("xmit", INNER, A, 98, cpu=0, tid=1, at=1000)
    s("recv", "m0v0", A, 84, cpu=0, tid=2, at=1500)   # delivered locally (or about to drop)
    s("recv", UPLINK, B, 60, cpu=1, tid=3, at=20_000)  # another CPU: the clock passes A's age
    if end == "kfree":
        s("free", None, A, 0, cpu=0, tid=2, at=20_100)
    else:
        s("recv", UPLINK, C, 60, cpu=0, tid=2, at=20_100)   # cpu 0 moves on
    ref = run_reference(s.plan, s.events, max_age=age)
    whole = run_cython(s.plan, s.events, max_age=age, table_size=64)
    assert whole.counts == ref.counts
    # The clock passed A's age before anything ended A: expired, however the events are batched
    # (the sweep after a batch and the per-event rules apply the same test).
    name = "local" if end == "cpu-moves-on" else "dropped"
    assert counts(whole, 0, "egress", name, "expired") == (0, 1)
    split = run_cython(s.plan, s.events, max_age=age, table_size=64, chunks=[3])
    assert split.counts == whole.counts


# -- call chains: batches, interrupt context ------------------------------------------------


SOFTIRQ, BH_OFF = 0x10, 0x80


def test_a_nic_batch_receives_all_before_forwarding_any():
    # GRO lists: netif_receive_skb fires for every packet of a batch before any is routed
    s = Script(make_plan([M0], hops=False, end_at_queue=False))
    for skb in (A, B, C):
        s("recv", UPLINK, skb, 84, cpu=0, tid=5, flags=SOFTIRQ)
    s("xmit", "m0v0", A, 98, cpu=0, tid=5, flags=SOFTIRQ | BH_OFF)
    s("xmit", "m0v0", C, 98, cpu=0, tid=5, flags=SOFTIRQ | BH_OFF)      # B was for the host
    s("recv", INNER, A, 84, cpu=1, tid=9)
    s("recv", INNER, C, 84, cpu=1, tid=9)
    out = correlate(s)
    assert [(r.dir, r.len) for r in out.reports] == [(INGRESS, 84), (INGRESS, 84)]
    assert counts(out, 0, "ingress", "crossed", "reports", "local") == (2, 2, 0)
    assert out.glob["unclaimed"] == 1


def test_a_batchs_routing_decisions_are_timed_for_none_of_its_packets():
    # GRO lists: every packet is received, then each is routed (one may be demuxed early,
    # and an earlier one may have left the table), then each forwarded: whose decision is
    # whose cannot be told, so none is timed, even when one packet alone is pending
    s = Script(make_plan([M0], hops=True, end_at_queue=False))
    s("recv", UPLINK, A, 84, cpu=0, tid=5, flags=SOFTIRQ)
    s("recv", UPLINK, B, 84, cpu=0, tid=5, flags=SOFTIRQ)
    s("route", BRIDGE, 0, 0, cpu=0, tid=5, flags=SOFTIRQ)
    s("route", BRIDGE, 0, 0, cpu=0, tid=5, flags=SOFTIRQ)
    s("xmit", BRIDGE, A, 98, cpu=0, tid=5, flags=SOFTIRQ)
    s("xmit", "m0v0", A, 98, cpu=0, tid=5, flags=SOFTIRQ)
    s("rx", INNER, A, 84, cpu=0, tid=5, flags=SOFTIRQ)
    s("xmit", BRIDGE, B, 98, cpu=0, tid=5, flags=SOFTIRQ)
    s("xmit", "m0v0", B, 98, cpu=0, tid=5, flags=SOFTIRQ)
    s("rx", INNER, B, 84, cpu=0, tid=5, flags=SOFTIRQ)
    s("recv", INNER, A, 84, cpu=1, tid=9)
    s("recv", INNER, B, 84, cpu=1, tid=9)
    # the next packet alone again: its decision is its own
    s("recv", UPLINK, C, 84, cpu=0, tid=5, flags=SOFTIRQ)
    t = s("route", BRIDGE, 0, 0, cpu=0, tid=5, flags=SOFTIRQ)
    s("xmit", BRIDGE, C, 98, cpu=0, tid=5, flags=SOFTIRQ)
    s("xmit", "m0v0", C, 98, cpu=0, tid=5, flags=SOFTIRQ)
    s("rx", INNER, C, 84, cpu=0, tid=5, flags=SOFTIRQ)
    s("recv", INNER, C, 84, cpu=1, tid=9)
    out = correlate(s)
    routes = [r.hops[INGRESS_HOPS.index("route")] for r in out.reports]
    assert len(out.reports) == 3 and routes[:2] == [None, None] and routes[2] is not None
    assert out.reports[2].t0 + routes[2] == t
    assert out.glob["route_unclaimed"] == 2


def test_a_routing_decision_of_another_context_or_class_times_nothing():
    s = Script(make_plan([M0], hops=True, end_at_queue=False))
    s("recv", UPLINK, A, 84, cpu=0, tid=5, flags=SOFTIRQ)
    s("route", BRIDGE, 0, 0, cpu=0, tid=6, flags=SOFTIRQ)      # another thread
    s("route", BRIDGE, 0, 0, cpu=0, tid=5, flags=0)            # another context
    s("route", BRIDGE, 0, 0, cpu=1, tid=5, flags=SOFTIRQ)      # another CPU
    s("route", UPLINK, 0, 0, cpu=0, tid=5, flags=SOFTIRQ, role="fwd")   # a route out: not ingress's
    s("xmit", BRIDGE, A, 98, cpu=0, tid=5, flags=SOFTIRQ)
    s("xmit", "m0v0", A, 98, cpu=0, tid=5, flags=SOFTIRQ)
    s("recv", INNER, A, 84, cpu=1, tid=9)
    out = correlate(s)
    assert [r.hops[INGRESS_HOPS.index("route")] for r in out.reports] == [None]
    assert out.glob["route_unclaimed"] == 4


def test_the_hosts_own_route_lookups_do_not_pass_the_filter():
    k = Kernel(make_plan([M0], hops=True, end_at_queue=False))
    assert not k.visible(TP["route"], UPLINK, "out")         # an output lookup: input loopback
    assert not k.visible(TP["route"], UPLINK)                # a reply to the host, in on the uplink
    assert k.visible(TP["route"], UPLINK, "fwd") and k.visible(TP["route"], BRIDGE)
    assert not Kernel(make_plan([M0], hops=False, end_at_queue=False)).visible(TP["route"], BRIDGE)


def test_softirq_work_on_top_of_a_proxy_is_not_the_proxys_own_send():
    # A host-bound packet is received in a softirq that interrupted proxy P (same tid); P then
    # sends the same size into the container from task context, reusing the address.
    s = Script(make_plan([M0], hops=False, end_at_queue=False))
    s("recv", UPLINK, A, 84, cpu=0, tid=42, flags=SOFTIRQ)
    s("xmit", "m0v0", A, 98, cpu=0, tid=42, flags=BH_OFF, dt=80_000)
    s("recv", INNER, A, 84, cpu=1, tid=9)
    out = correlate(s)
    assert out.reports == []
    assert counts(out, 0, "ingress", "crossed", "local") == (1, 1)


def test_a_call_chain_does_not_span_a_long_gap():
    s = Script(make_plan([M0], hops=False, end_at_queue=False))
    s("recv", UPLINK, A, 84, cpu=0, tid=5, flags=SOFTIRQ)
    s("xmit", "m0v0", A, 98, cpu=0, tid=5, flags=SOFTIRQ, dt=30_000_000)   # 30 ms later
    s("recv", INNER, A, 84, cpu=1, tid=9)
    assert correlate(s).reports == []


def test_finish_expires_every_old_entry():
    s = Script(make_plan([M0], hops=False, end_at_queue=False))
    for i in range(300):
        s("recv", UPLINK, 0xFFFF888100000000 + i * 256, 84, cpu=i % 2, tid=5)
        s("xmit", "m0v0", 0xFFFF888100000000 + i * 256, 98, cpu=i % 2, tid=5)
    s("recv", UPLINK, B, 60, cpu=3, tid=1, dt=10_000_000)      # the clock passes their age
    out = correlate(s, max_age=1_000_000)
    assert out.in_flight == [[0, 0]]
    assert counts(out, 0, "ingress", "crossed", "expired") == (300, 300)


# -- reconfiguring between two events (a service adds and removes containers) -----------------


def run_split(plan: Plan, events, cut: int, *, max_age: int, reset=(), then: Plan | None = None) -> Outcome:
    corr = plan.correlator(plan.probes(), table_size=BIG_TABLE, max_age_ns=max_age, ncpu=NCPU)
    corr.feed_bytes(pack(events[:cut]))
    before = list(unpack(corr.take_reports()))
    after = then or plan
    classes, owner = after.device_classes()
    corr.reconfigure(classes, owner, after.inner_slots(), reset)
    corr.feed_bytes(pack(events[cut:]))
    out = cython_outcome(corr)
    out.reports = before + out.reports
    out.before = len(before)
    return out


@settings(MAIN, max_examples=60)
@given(streams(), st.floats(0, 1))
def test_reconfiguring_to_the_same_plan_changes_nothing(stream, where):
    w = stream.world
    cut = int(where * len(stream.events))
    plain = run_cython(w.plan, stream.events, max_age=w.max_age)
    split = run_split(w.plan, stream.events, cut, max_age=w.max_age)
    assert split.reports == plain.reports
    assert (split.counts, split.in_flight, split.glob, split.used) == \
        (plain.counts, plain.in_flight, plain.glob, plain.used)


@settings(MAIN, max_examples=60)
@given(streams(), st.floats(0, 1))
def test_resetting_a_container_leaves_the_others_alone(stream, where):
    """Container 0 starts afresh at the cut: the others' reports and counters are those of
    an uninterrupted run; its own reports are a subset of that run's, numbered from 1."""
    w = stream.world
    cut = int(where * len(stream.events))
    plain = run_cython(w.plan, stream.events, max_age=w.max_age)
    split = run_split(w.plan, stream.events, cut, max_age=w.max_age, reset=[0])
    assert_made_by([r for r in split.reports if r.container], [r for r in plain.reports if r.container],
                   seq=True)
    assert split.counts[1:] == plain.counts[1:]
    mine = [r for r in split.reports if r.container == 0]
    theirs = {without_seq(r) for r in plain.reports if r.container == 0}
    assert {without_seq(r) for r in mine} <= theirs
    mine = [r for r in split.reports[split.before:] if r.container == 0]
    for d in (EGRESS, INGRESS):
        assert [r.seq for r in mine if r.dir == d] == list(range(1, 1 + sum(r.dir == d for r in mine)))
    assert split.identity_holds(), (split.counts, split.in_flight)


def test_rebased_plan_keeps_slots_and_refills_the_freed_one():
    first = make_plan([M0], hops=False, end_at_queue=False)
    second = Plan([None, ContainerPath("ns1", INNER, "m1v0", BRIDGE)], UPLINK).rebased(first)
    assert first.devices == [INNER, "m0v0", BRIDGE, UPLINK]
    assert second.devices == [INNER, "m1v0", BRIDGE, UPLINK]
    third = Plan([ContainerPath("ns0", INNER, "m0v0", BRIDGE), second.containers[1]],
                 UPLINK).rebased(second)
    assert third.devices == [INNER, "m1v0", BRIDGE, UPLINK, "m0v0"]
    assert third.inner_slots() == [0, 0]
    assert second.inner_slots() == [-1, 0]


def test_a_packet_in_flight_when_its_container_is_dropped_is_forgotten():
    """m0v0's slot passes to m1v0 while a packet of container 0 is between the veth and the
    uplink: it is not reported, neither for 0 (reset) nor for 1 (never crossed its veth)."""
    before = make_plan([M0], hops=False, end_at_queue=False)
    after = Plan([None, ContainerPath("ns1", INNER, "m1v0", BRIDGE)], UPLINK).rebased(before)
    s = Script(before)
    egress(s, A, 84)                                  # reported before the change
    s("xmit", INNER, B, 98, cpu=0, tid=1)
    s("recv", "m0v0", B, 84, cpu=0, tid=2)
    cut = len(s.events)
    s("queue", UPLINK, B, 98, cpu=0, tid=2)
    s("xmit", UPLINK, B, 98, cpu=0, tid=2)
    corr = before.correlator(before.probes(), table_size=BIG_TABLE, max_age_ns=10**9, ncpu=NCPU)
    corr.feed_bytes(pack(s.events[:cut]))
    assert len(list(unpack(corr.take_reports()))) == 1
    classes, owner = after.device_classes()
    assert corr.reconfigure(classes, owner, after.inner_slots(), [0]) == 1
    corr.feed_bytes(pack(s.events[cut:]))
    out = cython_outcome(corr)
    assert out.reports == []
    assert out.counts[0]["egress"]["crossed"] == 0 and out.counts[1]["egress"]["crossed"] == 0
    assert out.identity_holds()


def test_reconfigure_refuses_to_shrink():
    plan = make_plan([M0, M1], hops=False, end_at_queue=False)
    corr = plan.correlator(plan.probes(), ncpu=NCPU)
    small = make_plan([M0], hops=False, end_at_queue=False)
    classes, owner = small.device_classes()
    with pytest.raises(ValueError, match="never shrink"):
        corr.reconfigure(classes, owner, small.inner_slots())


# -- packets queued behind a neighbour resolution ----------------------------------------------
# Modelled on a capture (two containers' first pings while the uplink's next hop is being
# asked for): only the first packet's call chain sends the ARP request; the second one's
# chain just ends, in the same neighbour queue; the answer's softirq sends both, in order.

IP6 = 0x86DD
ND_L3 = _correlate.ND_L3


def queued_plan():
    return make_plan([M0, M1], hops=False, end_at_queue=True, start_at_veth=True)


def first_hop(s: Script, veth, skb, L, *, proto=IP, cpu, tid, dt=100):
    """A container's packet into the host, through the bridge, up to routing."""
    t0 = s("rx", veth, skb, L, proto=proto, cpu=cpu, tid=tid, dt=dt)
    s("recv", veth, skb, L, cpu=cpu, tid=tid)
    return t0


def test_a_packet_queued_behind_another_ones_arp_request_is_reported():
    s = Script(queued_plan())
    ta = first_hop(s, "m0v0", A, 84, cpu=1, tid=10)
    s("queue", UPLINK, R, ARP_L3 + ETH_HLEN, cpu=1, tid=10)      # A's chain asks
    tb = first_hop(s, "m1v0", B, 84, cpu=1, tid=11)               # B's chain just ends
    s("queue", UPLINK, C, ARP_L3 + ETH_HLEN, cpu=1, tid=12, dt=50_000)   # the timer asks again
    s("recv", UPLINK, Q, ARP_L3, cpu=1, tid=24, dt=50_000)        # the answer
    t1 = s("queue", UPLINK, A, 98, cpu=1, tid=24)                 # the queue, flushed in order
    t2 = s("queue", UPLINK, B, 98, cpu=1, tid=24)
    out = correlate(s)
    assert [(r.container, r.seq, r.t0, r.latency, r.cpu) for r in out.reports] == [
        (0, 1, ta, t1 - ta, 1), (1, 1, tb, t2 - tb, 1)]
    assert out.glob["parked"] == 2
    assert counts(out, 1, "egress", "crossed", "local", "rejected") == (1, 0, 0)


def test_a_queued_packet_whose_cpu_did_nothing_else_leaves_with_the_flush():
    # B's chain ends on CPU 0, and the next event there is its own flush: it was never
    # seen to end, yet it left with the answer's chain
    s = Script(queued_plan())
    ta = first_hop(s, "m0v0", A, 84, cpu=1, tid=10)
    s("queue", UPLINK, R, ARP_L3 + ETH_HLEN, cpu=1, tid=10)
    tb = first_hop(s, "m1v0", B, 84, cpu=0, tid=11)
    s("recv", UPLINK, Q, ARP_L3, cpu=0, tid=24, dt=50_000)
    t1 = s("queue", UPLINK, A, 98, cpu=0, tid=24)
    t2 = s("queue", UPLINK, B, 98, cpu=0, tid=24)
    out = correlate(s)
    assert [(r.container, r.t0, r.latency) for r in out.reports] == [(0, ta, t1 - ta), (1, tb, t2 - tb)]
    assert out.glob["parked"] == 2


def test_a_chain_that_ends_outside_a_resolution_stays_local():
    s = Script(queued_plan())
    first_hop(s, "m0v0", A, 84, cpu=1, tid=10)
    s("queue", UPLINK, R, ARP_L3 + ETH_HLEN, cpu=1, tid=10)
    s("recv", UPLINK, Q, ARP_L3, cpu=1, tid=24, dt=50_000)
    s("queue", UPLINK, A, 98, cpu=1, tid=24)
    first_hop(s, "m1v0", B, 84, cpu=1, tid=11, dt=50_000)    # after the answer: to the host
    s("recv", UPLINK, D, 84, cpu=1, tid=30, dt=1000)
    out = correlate(s)
    assert len(out.reports) == 1
    assert counts(out, 1, "egress", "crossed", "local") == (1, 1)
    assert out.glob["parked"] == 1


def test_a_queued_packet_leaves_only_in_the_answers_chain():
    # B's address shows up at the uplink in another thread's chain: not the flush, so
    # not B's packet leaving the queue
    s = Script(queued_plan())
    first_hop(s, "m0v0", A, 84, cpu=1, tid=10)
    s("queue", UPLINK, R, ARP_L3 + ETH_HLEN, cpu=1, tid=10)
    first_hop(s, "m1v0", B, 84, cpu=1, tid=11)
    s("recv", UPLINK, D, 84, cpu=0, tid=30, dt=1000)              # B's chain ended
    s("recv", UPLINK, Q, ARP_L3, cpu=1, tid=24, dt=50_000)
    s("queue", UPLINK, A, 98, cpu=1, tid=24)
    s("queue", UPLINK, B, 98, cpu=0, tid=31, dt=10)
    out = correlate(s)
    assert [r.container for r in out.reports] == [0]
    assert counts(out, 1, "egress", "crossed", "rejected") == (1, 1)


def test_ipv6_packets_wait_for_neighbour_discovery_like_ipv4_ones_for_arp():
    s = Script(queued_plan())
    ta = first_hop(s, "m0v0", A, 104, proto=IP6, cpu=1, tid=10)
    s("queue", UPLINK, R, ND_L3 + ETH_HLEN, cpu=1, tid=10)       # a neighbour solicitation
    tb = first_hop(s, "m1v0", B, 104, proto=IP6, cpu=1, tid=11)
    s("recv", UPLINK, D, 84, cpu=0, tid=30, dt=1000)
    s("recv", UPLINK, Q, ND_L3, cpu=1, tid=24, dt=50_000)         # the advertisement
    t1 = s("queue", UPLINK, A, 118, cpu=1, tid=24)
    t2 = s("queue", UPLINK, B, 118, cpu=1, tid=24)
    out = correlate(s)
    assert [(r.container, r.t0, r.latency) for r in out.reports] == [(0, ta, t1 - ta), (1, tb, t2 - tb)]
    assert out.glob["parked"] == 2


def test_an_ipv4_sized_solicitation_does_not_park_an_ipv6_packet():
    s = Script(queued_plan())
    first_hop(s, "m0v0", A, 104, proto=IP6, cpu=1, tid=10)
    s("queue", UPLINK, R, ARP_L3 + ETH_HLEN, cpu=1, tid=10)
    s("recv", UPLINK, Q, ND_L3, cpu=1, tid=24, dt=50_000)
    s("queue", UPLINK, A, 118, cpu=1, tid=24)
    out = correlate(s)
    assert out.reports == [] and out.glob["parked"] == 0
    assert counts(out, 0, "egress", "crossed", "local") == (1, 1)


# -- the socket segment -----------------------------------------------------------------------

SK = 0xFFFF8881_3A000800        # a socket of container 0
SOCKET_PLAN = dict(hops=False, end_at_queue=False, start_at_veth=True, socket=True)


def socket_egress(s: Script, skb, *, flags=0, call=True) -> tuple[int, int]:
    t_call = s("call", "m0v0", 0, 0, cpu=0, tid=7) if call else None
    t_rx = s("rx", "m0v0", skb, 84, cpu=0, tid=7, flags=flags)
    if call:
        s("return", "m0v0", 0, 0, cpu=0, tid=7)
    s("recv", "m0v0", skb, 84, cpu=1, tid=9, flags=SOFTIRQ)
    s("queue", UPLINK, skb, 98, cpu=1, tid=9, flags=SOFTIRQ)
    end = s("xmit", UPLINK, skb, 98, cpu=1, tid=9, flags=SOFTIRQ)
    return (t_call if call else t_rx), end


def socket_ingress(s: Script, skb, *, proto=1, sk=SK, L=84, **kw) -> int:
    t0 = s("recv", UPLINK, skb, L, cpu=1, tid=9, flags=SOFTIRQ, **kw)
    s("xmit", "m0v0", skb, L + ETH_HLEN, cpu=1, tid=9, flags=SOFTIRQ)
    s("recv", INNER, skb, L, cpu=1, tid=9, flags=SOFTIRQ)
    s("ready", None, sk, 0, proto=proto, cpu=1, tid=9, flags=SOFTIRQ)
    return t0


def test_socket_egress_starts_at_the_send_call_of_the_thread_that_hands_it_over():
    s = Script(make_plan([M0], **SOCKET_PLAN))
    t0, end = socket_egress(s, A)
    socket_egress(s, B, flags=SOFTIRQ)          # on that thread, but in a softirq: not its send
    socket_egress(s, C, call=False)             # no send call in progress (a retransmission)
    out = correlate(s)
    (r,) = out.reports
    assert (r.dir, r.t0, r.latency) == (EGRESS, t0, end - t0)
    assert r.hops[0] == 100                     # the container's own stack: call to veth
    assert counts(out, 0, "egress", "crossed", "reports", "unpaired") == (3, 1, 2)


def test_socket_ingress_ends_at_the_receive_call_that_takes_the_packet():
    s = Script(make_plan([M0], **SOCKET_PLAN))
    t0 = socket_ingress(s, A)
    s("recvmsg", "m0v0", SK, 84, proto=2, cpu=0, tid=7)                 # a peek: it stays queued
    s("recvmsg", "m0v0", SK, -11 & 0xFFFFFFFF, cpu=0, tid=7)            # EAGAIN
    end = s("recvmsg", "m0v0", SK, 84, cpu=0, tid=7)                    # raw socket: the IP packet
    out = correlate(s)
    (r,) = out.reports
    assert (r.dir, r.t0, r.latency, r.cpu) == (INGRESS, t0, end - t0, 0)
    assert r.hops[-1] == 200                    # the container's device received it
    assert counts(out, 0, "ingress", "reports", "unpaired") == (1, 0)


def test_socket_ingress_pairs_in_queue_order_and_by_the_payload_length():
    s = Script(make_plan([M0], **SOCKET_PLAN))
    socket_ingress(s, A)
    socket_ingress(s, B)
    socket_ingress(s, C, proto=6)                           # a stream's: not paired
    s("recvmsg", "m0v0", SK, 64, cpu=0, tid=7)              # an ICMP socket: without the IP header
    s("recvmsg", "m0v0", SK, 77, cpu=0, tid=7)              # no datagram of 84 bytes gives 77
    s("recvmsg", "m0v0", SK, 64, cpu=0, tid=7)              # nothing queued any more
    out = correlate(s)
    assert len(out.reports) == 1
    assert counts(out, 0, "ingress", "crossed", "reports", "unpaired") == (3, 1, 2)
    assert out.glob["recv_unpaired"] == 1


def test_a_packet_no_process_reads_is_unpaired_when_it_expires():
    s = Script(make_plan([M0], **SOCKET_PLAN))
    socket_ingress(s, A)
    s("recv", UPLINK, B, 84, cpu=1, tid=9, flags=SOFTIRQ, dt=50_000)     # time goes on
    out = correlate(s, max_age=20_000)
    assert out.reports == [] and counts(out, 0, "ingress", "unpaired") == (1,)
    assert out.glob["sock_unclaimed"] == 0


def test_data_ready_of_a_socket_with_no_packet_of_ours_pending_is_counted():
    s = Script(make_plan([M0], **SOCKET_PLAN))
    s("ready", None, SK + 0x40, 0, proto=17, cpu=0, tid=3)
    out = correlate(s)
    assert out.glob["sock_unclaimed"] == 1 and out.reports == []


def test_a_packet_we_cannot_tell_keeps_its_place_in_the_sockets_queue():
    # A's entry expired on its way (so its data_ready claims nothing), B is claimed: A's
    # receive takes A, not B, and B's the next
    s = Script(make_plan([M0], **SOCKET_PLAN))
    s("recv", UPLINK, A, 84, cpu=1, tid=9, flags=SOFTIRQ)
    s("xmit", "m0v0", A, 98, cpu=1, tid=9, flags=SOFTIRQ)
    s("recv", INNER, A, 84, cpu=1, tid=9, flags=SOFTIRQ, dt=50_000)     # A expired here
    s("ready", None, SK, 0, proto=1, cpu=1, tid=9, flags=SOFTIRQ)
    t0 = socket_ingress(s, B)
    s("recvmsg", "m0v0", SK, 64, cpu=0, tid=7)                          # takes A
    end = s("recvmsg", "m0v0", SK, 64, cpu=0, tid=7)                    # takes B
    out = correlate(s, max_age=20_000)
    assert [(r.t0, r.latency) for r in out.reports] == [(t0, end - t0)]
    assert out.glob["sock_unclaimed"] == 1 and out.glob["recv_unpaired"] == 1
    assert counts(out, 0, "ingress", "expired") == (1,)


def test_a_packet_the_container_received_for_no_socket_is_unpaired_when_its_address_returns():
    # no socket takes A (freed for want of one, which is not sampled); its address comes back
    # with the next packet on the same CPU
    s = Script(make_plan([M0], **SOCKET_PLAN))
    s("recv", UPLINK, A, 84, cpu=1, tid=9, flags=SOFTIRQ)
    s("xmit", "m0v0", A, 98, cpu=1, tid=9, flags=SOFTIRQ)
    s("recv", INNER, A, 84, cpu=1, tid=9, flags=SOFTIRQ)
    t0 = socket_ingress(s, A)
    end = s("recvmsg", "m0v0", SK, 64, cpu=0, tid=7)
    out = correlate(s)
    assert [(r.t0, r.latency) for r in out.reports] == [(t0, end - t0)]
    assert counts(out, 0, "ingress", "crossed", "reports", "unpaired", "rejected") == (2, 1, 1, 0)


def test_a_packet_no_datagram_socket_takes_is_unpaired_when_its_chain_ends_or_expires():
    # A (a TCP segment: its data_ready is not sampled) is followed by another event on its
    # CPU; B's CPU goes idle after it, and B expires
    s = Script(make_plan([M0], **SOCKET_PLAN))
    for skb, cpu in ((A, 1), (B, 0)):
        s("recv", UPLINK, skb, 84, cpu=cpu, tid=9, flags=SOFTIRQ)
        s("xmit", "m0v0", skb, 98, cpu=cpu, tid=9, flags=SOFTIRQ)
        s("recv", INNER, skb, 84, cpu=cpu, tid=9, flags=SOFTIRQ)
    s("rx", "m0v0", C, 52, cpu=1, tid=9, flags=SOFTIRQ)             # A's chain sends its ACK
    s("recv", UPLINK, D, 84, cpu=1, tid=9, flags=SOFTIRQ, dt=50_000)
    out = correlate(s, max_age=20_000)
    assert out.reports == []
    assert counts(out, 0, "ingress", "crossed", "unpaired", "expired") == (2, 2, 0)


def test_udp_and_ipv6_payloads_pair_by_what_follows_their_headers():
    s = Script(make_plan([M0], **SOCKET_PLAN))
    t = [socket_ingress(s, A, proto=17, L=128), socket_ingress(s, B, proto=58, sk=SK + 0x40, L=104),
         socket_ingress(s, C, proto=17, sk=SK + 0x80, L=148)]
    ends = [s("recvmsg", "m0v0", SK, 100, cpu=0, tid=7),                # UDP over IPv4: 20 + 8
            s("recvmsg", "m0v0", SK + 0x40, 64, cpu=0, tid=7),          # ICMPv6: 40
            s("recvmsg", "m0v0", SK + 0x80, 128, cpu=0, tid=7)]         # UDP: 20 is not 28
    out = correlate(s)
    assert [(r.t0, r.latency) for r in out.reports] == [(t[0], ends[0] - t[0]), (t[1], ends[1] - t[1])]
    assert counts(out, 0, "ingress", "reports", "unpaired") == (2, 1)


def test_a_receive_from_the_error_queue_takes_no_packet():
    s = Script(make_plan([M0], **SOCKET_PLAN))
    t0 = socket_ingress(s, A)
    s("recvmsg", "m0v0", SK, 84, proto=0x2000, cpu=0, tid=7)            # MSG_ERRQUEUE: an ICMP error
    end = s("recvmsg", "m0v0", SK, 64, cpu=0, tid=7)
    out = correlate(s)
    assert [(r.t0, r.latency) for r in out.reports] == [(t0, end - t0)]


def test_two_threads_sharing_a_send_call_slot_leave_the_first_ones_packet_unpaired():
    # the table of calls in progress is direct-mapped: thread 7 + CALLS takes thread 7's slot
    s = Script(make_plan([M0], **SOCKET_PLAN))
    s("call", "m0v0", 0, 0, cpu=0, tid=7)
    t0 = s("call", "m0v0", 0, 0, cpu=1, tid=7 + _correlate.CALLS)
    s("rx", "m0v0", A, 84, cpu=0, tid=7)
    s("rx", "m0v0", B, 84, cpu=1, tid=7 + _correlate.CALLS)
    for skb, cpu in ((A, 0), (B, 1)):
        s("recv", "m0v0", skb, 84, cpu=cpu, tid=9, flags=SOFTIRQ)
        s("queue", UPLINK, skb, 98, cpu=cpu, tid=9, flags=SOFTIRQ)
        s("xmit", UPLINK, skb, 98, cpu=cpu, tid=9, flags=SOFTIRQ)
    out = correlate(s)
    assert [r.t0 for r in out.reports] == [t0]
    assert counts(out, 0, "egress", "crossed", "reports", "unpaired") == (2, 1, 1)


def sockets_in_one_window(n: int, table_size: int) -> list[int]:
    """n socket addresses whose slots in the correlator's socket table start at one place."""
    mask = max(256, table_size // 16) - 1
    want, out, sk = None, [], SK
    while len(out) < n:
        i = (((sk >> 6) * 0x9E3779B97F4A7C15) % (1 << 64) >> 32) & mask
        want = i if want is None else want
        if i == want:
            out.append(sk)
        sk += 0x40
    return out


def test_a_socket_with_no_slot_counts_its_packet_as_evicted_until_a_slot_goes_stale():
    # 17 sockets whose probe windows coincide: the 17th finds no slot while the others are
    # in use; once they are older than max_age, the stalest slot is its, and the socket
    # that had it is unknown from then on.  (The reference model never runs out of sockets:
    # only the compiled correlator runs here.)
    socks = sockets_in_one_window(17, BIG_TABLE)
    s = Script(make_plan([M0], **SOCKET_PLAN))
    skbs = [0xFFFF8881_04000000 + 0x100 * k for k in range(20)]
    for k, sk in enumerate(socks):
        socket_ingress(s, skbs[k], sk=sk)
    socket_ingress(s, skbs[17], sk=socks[0], dt=50_000)         # socks[0] in use again
    t0 = socket_ingress(s, skbs[18], sk=socks[16])              # takes socks[1]'s stale slot
    end = s("recvmsg", "m0v0", socks[16], 64, cpu=0, tid=7)
    s("recvmsg", "m0v0", socks[1], 64, cpu=0, tid=7)            # a socket without a slot
    out = run_cython(s.plan, s.events, max_age=20_000)
    assert [(r.t0, r.latency) for r in out.reports] == [(t0, end - t0)]
    assert counts(out, 0, "ingress", "evicted") == (1,)         # the 17th socket's first packet
    assert out.glob["recv_unpaired"] == 1 and out.identity_holds()

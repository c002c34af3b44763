"""The flood model of mace.testing.kernel (the correlator benchmark's input), small: its
ring images decode, the correlator and the reference agree on them, and what they report
is what the model says completed (no privileges)."""

from __future__ import annotations

import pytest

from mace.capture._ring import Rings
from mace.correlate import _correlate
from mace.output.report import unpack
from mace.testing.kernel import SKB_BASE, build_images, model_plan
from mace.testing.reference import ReferenceCorrelator, ReferenceDecoder, merge
from mace.testing.synthetic import builtin_layout

PAGES = 16
MAX_AGE = 1_000_000_000


@pytest.fixture(scope="module")
def model():
    plan = model_plan()
    probes = plan.probes()
    images, info = build_images(plan, probes, pages=PAGES, seed=5, ncpu=2)
    return plan, probes, images, info


def cython_reports(plan, probes, images):
    rings = Rings(cpus=list(range(len(images))), ring_pages=PAGES, reorder_ns=0)
    for p in probes:
        rings.add_kind(**builtin_layout(p.tracepoint))
    rings.set_devices(plan.devices)
    for i, img in enumerate(images):
        rings.attach(i, img.buf)
    corr = plan.correlator(probes, max_age_ns=MAX_AGE, ncpu=len(images))
    n, parts = 0, []
    while True:
        n += rings.feed(corr, True)
        parts.append(corr.take_reports())
        if not rings.more:
            break
    corr.finish()
    parts.append(corr.take_reports())
    rings.close()
    return n, [(r.container, r.dir, r.seq, r.t0, r.latency, r.len, r.cpu) for r in unpack(b"".join(parts))]


def reference_reports(plan, probes, data):
    dec = ReferenceDecoder(kinds=[builtin_layout(p.tracepoint) for p in probes], devices=plan.devices)
    released, _ = merge([dec.decode(d, cpu)[0] for cpu, d in enumerate(data)])
    classes, owner = plan.device_classes()
    ref = ReferenceCorrelator([_correlate.TYPES.get(p.tracepoint, 0) for p in probes], classes, owner,
                              plan.inner_slots(), max_age_ns=MAX_AGE, hops=plan.hops,
                              bridge=bool(plan.bridges), end_at_queue=plan.end_at_queue,
                              veth_start=plan.start_at_veth)
    ref.feed(released)
    ref.finish()
    return [(r.container, r.dir, r.seq, r.t0, r.latency, r.len, r.cpu) for r in ref.reports]


def test_images_are_full_and_cut_at_one_instant(model):
    _plan, _probes, images, info = model
    assert len(images) == 2 == len(info["records_per_ring"])
    assert all(n > 100 for n in info["records_per_ring"])
    assert max(info["fill_per_ring"]) > 0.9
    assert info["skb_max_live"] <= info["skb_pool"] + info["skb_pool_grown"]
    assert set(info["events_by_tracepoint"]) <= {p.tracepoint for p in _probes}


def test_the_same_seed_gives_the_same_images():
    plan = model_plan()
    a, _ = build_images(plan, plan.probes(), pages=4, seed=3)
    b, _ = build_images(plan, plan.probes(), pages=4, seed=3)
    c, _ = build_images(plan, plan.probes(), pages=4, seed=4)
    assert [img.data() for img in a] == [img.data() for img in b] != [img.data() for img in c]


def test_correlator_and_reference_agree_and_match_the_model(model):
    plan, probes, images, info = model
    data = [img.data() for img in images]       # before the rings consume them
    n, reports = cython_reports(plan, probes, images)
    assert n == sum(info["records_per_ring"])
    assert reports == reference_reports(plan, probes, data)
    got = [sum(1 for r in reports if r[1] == d) for d in (0, 1)]
    want = info["expected_reports"]
    assert got == [want["egress"], want["ingress"]] and min(got) > 0
    assert {r[0] for r in reports} <= {0, 1}
    assert all(r[4] > 0 for r in reports)


def test_addresses_come_from_the_slab_like_pool():
    assert SKB_BASE % 0x100 == 0

"""The compiled formatter (mace.output._format, behind mace.output.sinks) against the Python
sinks it replaced (mace.testing.reference_sinks): byte for byte, on generated packed
reports and targets, every format, with and without hops (no privileges)."""

from __future__ import annotations

import asyncio
import io
import json
import struct
import types

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mace.correlate._correlate import HOP_SLOTS, HOPS
from mace.output import _format, clock, report, sinks
from mace.output.report import REPORT_FORMAT, REPORT_SIZE, Report, pack, unpack
from mace.plan import EGRESS_HOPS, INGRESS_HOPS
from mace.testing import reference_sinks

FORMATS = ("mace", "jsonl", "csv")
RECORD = struct.Struct(REPORT_FORMAT)
U16, U32, U64 = 2**16 - 1, 2**32 - 1, 2**64 - 1
NOW = 1_795_692_291_089_446_123 - 5_000_000_000        # a wall-clock offset of today's kind
EG, ING = HOP_SLOTS         # hop slots of an egress and an ingress report


def rec(t0, seq, lat, length, container, d, nhops, cpu, *hops) -> bytes:
    """One packed report; the hop slots not given are 0."""
    return RECORD.pack(t0, seq, lat, length, container, d, nhops, cpu, 0, *hops, *[0] * (HOPS - len(hops)))

SETTINGS = settings(max_examples=250, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- what is drawn --------------------------------------------------------------------------------

# labels and names as a user or a runtime may spell them: CSV's and JSON's special characters,
# non-ASCII, control characters
text = st.text(st.sampled_from('ab-_.:/ ,"\'\\\n\r\té€😀\x00\x7f') | st.characters(), max_size=12)
identity = st.one_of(
    st.none(),
    st.builds(lambda c: {"container": c}, text),
    st.builds(lambda c, r: {"container": c, "runtime": r}, text, st.sampled_from(["docker", "podman"])),
    st.builds(lambda c, p, n: {"container": c, "pod": p, "k8s_namespace": n}, text, text, text),
    st.just({"container": None}),
    st.just({}),
)
target = st.tuples(text, st.integers(0, U64), identity)
hop = st.one_of(st.just(0), st.integers(1, 1000), st.integers(1, U32))
# clock stamps: small, present-day, and near the top of 64 bits (where +offset overflows)
t0 = st.one_of(st.integers(0, U64), st.integers(0, 10**10), st.integers(U64 - 10**10, U64),
               st.integers(10**18, 2 * 10**18))
offset = st.one_of(st.just(NOW), st.just(0), st.integers(-(2**63), 2**63 - 1),
                   st.integers(-(10**12), 10**12))


@st.composite
def records(draw, ntargets: int, max_size: int = 40) -> bytes:
    """Packed reports as the correlator writes them (HOP_SLOTS: egress 5, ingress 4)."""
    out = []
    for _ in range(draw(st.integers(0, max_size))):
        d = draw(st.integers(0, 1))
        out.append(RECORD.pack(
            draw(t0), draw(st.one_of(st.integers(1, 100), st.integers(0, U64))),
            draw(st.one_of(st.integers(0, 10**6), st.integers(0, U32))), draw(st.integers(0, U32)),
            draw(st.integers(0, ntargets - 1)), d, HOP_SLOTS[d], draw(st.integers(0, U16)), 0,
            *draw(st.lists(hop, min_size=HOPS, max_size=HOPS))))
    return b"".join(out)


def both(fmt, targets, hops=False, offset=NOW):
    """A compiled sink and a reference sink, each writing into a StringIO."""
    labels, inodes, containers = (list(x) for x in zip(*targets, strict=True)) if targets else ([], [], [])
    made = []
    for mod in (sinks, reference_sinks):
        out = io.StringIO()
        made.append((mod.make_sink(fmt, out, labels, inodes, hops=hops, wall_offset_ns=offset,
                                   containers=containers), out))
    return made


def same(fmt, targets, batches, hops=False, offset=NOW) -> str:
    (new, new_out), (ref, ref_out) = both(fmt, targets, hops, offset)
    for raw in batches:
        new.write_packed(raw)
        ref.write(list(unpack(raw)))
    assert new_out.getvalue() == ref_out.getvalue()
    assert new.written == ref.written == sum(len(b) for b in batches) // REPORT_SIZE
    return new_out.getvalue()


# -- byte for byte ----------------------------------------------------------------------------------

@SETTINGS
@given(st.data(), st.sampled_from(FORMATS), st.booleans(), st.lists(target, min_size=1, max_size=4),
       offset)
def test_every_format_is_the_references_byte_for_byte(data, fmt, hops, targets, off):
    batches = data.draw(st.lists(records(len(targets)), max_size=3))
    same(fmt, targets, batches, hops, off)


@settings(SETTINGS, max_examples=80)
@given(st.data(), st.sampled_from(FORMATS), st.booleans(), st.lists(target, min_size=1, max_size=3),
       st.lists(target, min_size=1, max_size=2))
def test_targets_added_later_are_the_references_too(data, fmt, hops, first, later):
    # a restarted target: a new container index, a MACE line still unlabelled with one target
    (new, new_out), (ref, ref_out) = both(fmt, first, hops)
    for t in later:
        new.add_target(*t)
        ref.add_target(*t)
    raw = data.draw(records(len(first) + len(later), max_size=60))
    new.write_packed(raw)
    ref.write(list(unpack(raw)))
    assert new_out.getvalue() == ref_out.getvalue()
    assert new.written == ref.written


@SETTINGS
@given(st.sampled_from(FORMATS), st.booleans(), t0, offset)
def test_ts_is_clock_wall_exactly_wherever_the_sum_falls(fmt, hops, t, off):
    # the sum may be negative or beyond 64 bits (Python's integers then, as clock.wall's)
    raw = rec(t, 1, 2, 3, 0, 0, EG, 0)
    text = same(fmt, [("web", 1, None)], [raw], hops, off)
    digits = 6 if fmt == "mace" else 9
    assert clock.wall(t + off, digits) in text


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("wall_ns", [0, 5, 999_999_999, 1_000_000_000, 9_999_999_999_999_999,
                                     1_552_589_043_999_999_600, 1_552_589_043_000_000_004,
                                     9_999_999_999_999_999_999, 10_000_000_000_000_000_000,
                                     U64 - 499, U64 - 500, U64])
def test_ts_at_the_edges_of_digits_and_rounding(fmt, wall_ns):
    # 1 to 11 digits of seconds (the reference's slice cuts the 11-digit ones), the carry of
    # the microsecond rounding into the seconds, and the rounding at the top of 64 bits
    record = rec(wall_ns, 1, 2, 3, 0, 1, ING, 0)
    same(fmt, [("web", 1, None)], [record], offset=0)
    # the same instants below zero and beyond 64 bits: Python's integers
    same(fmt, [("web", 1, None)], [record], offset=-(wall_ns % 2**63) - 1)
    same(fmt, [("web", 1, None)], [record], offset=2**63 - 1)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("hops", [False, True])
def test_extremes_of_every_field(fmt, hops):
    rows = [rec(U64 - NOW, U64, U32, U32, 1, 0, EG, U16, U32, 0, U32, 1, U32),
            rec(0, 0, 0, 0, 0, 1, ING, 0),
            rec(1, 1, 1, 1, 1, 1, ING, 1, 1, 10, 100, 0)]
    text = same(fmt, [("a", 0, None), ("b", U64, {"container": "c"})], [b"".join(rows)], hops)
    assert str(U64) in text and str(U32) in text


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("hops", [False, True])
def test_names_that_need_escaping_and_quoting(fmt, hops):
    names = ['we"b', "a,b", "line\nbreak", "cr\rx", "tab\t", "back\\slash", "ünïcødé", "😀",
             "", " spaced ", "\x00\x1f", "\udcff"]        # the last: an undecodable byte of argv
    targets = [(n, i, {"container": n, "pod": n[::-1], "k8s_namespace": "ns," + n})
               for i, n in enumerate(names)] + [(n, 100 + i, None) for i, n in enumerate(names)]
    raw = b"".join(rec(NOW + i, i + 1, 1000 + i, 84, i, i % 2, HOP_SLOTS[i % 2], i, 1, 0, 3, 4)
                   for i in range(len(targets)))
    same(fmt, targets, [raw], hops)


def test_one_target_mace_lines_ignore_the_index_as_the_reference_does():
    # the reference never looks a single target's label up: any index is written
    raw = rec(NOW, 1, 2, 3, 7, 0, EG, 0)
    assert same("mace", [("web", 1, None)], [raw]).startswith("[")


def test_several_targets_prefix_mace_lines_with_the_label():
    raw = b"".join(rec(NOW, 1, 2, 3, c, 0, EG, 0) for c in (1, 0))
    text = same("mace", [("web", 1, None), ("db", 2, None)], [raw])
    assert [line.split(" [")[0] for line in text.splitlines()] == ["db", "web"]


# -- what neither can write -------------------------------------------------------------------------

BAD = [
    ("a direction that is neither", {"d": 2}, False),
    ("a container no target has", {"container": 5}, False),
    (f"an egress report with {EG - 1} hops", {"nhops": EG - 1}, True),
    (f"an ingress report with {ING + 1} hops", {"d": 1, "nhops": ING + 1}, True),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("what, fields, hops", BAD, ids=[b[0] for b in BAD])
def test_a_record_the_reference_cannot_write_is_refused_whole(fmt, what, fields, hops):
    f = {"t0": NOW, "seq": 1, "lat": 2, "len": 3, "container": 0, "d": 0, "nhops": EG} | fields
    bad = rec(f["t0"], f["seq"], f["lat"], f["len"], f["container"], f["d"], f["nhops"], 0, 1, 2, 3, 4, 5)
    good = rec(NOW, 1, 2, 3, 0, 0, EG, 0)
    targets = [("web", 1, None), ("db", 2, None)]
    (new, out), (ref, ref_out) = both(fmt, targets, hops)
    try:
        ref.write(list(unpack(good + bad)))
    except (IndexError, ValueError):
        header = out.getvalue()
        with pytest.raises(ValueError, match="report 1"):
            new.write_packed(good + bad)
        assert out.getvalue() == header and new.written == 0      # nothing of the batch written
        return
    # MACE lines show no hops; CSV has room for the ingress report's extra hop (the columns
    # of both directions follow its own)
    assert (fmt, hops) in (("mace", True), ("csv", True)), what
    new.write_packed(good + bad)
    assert out.getvalue() == ref_out.getvalue()


def test_csv_ingress_may_carry_fewer_hops_json_lines_may_not():
    raw = rec(NOW, 1, 2, 3, 0, 1, 2, 0, 5, 6)
    assert same("csv", [("web", 1, None)], [raw], hops=True).splitlines()[1].endswith(",5,6" + "," * (ING - 2))
    with pytest.raises(ValueError, match="carries 2 hops"):
        sinks.make_sink("jsonl", io.StringIO(), ["web"], [1], hops=True).write_packed(raw)


def test_a_runtime_name_may_not_take_a_report_fields_key():
    with pytest.raises(ValueError, match="seq"):
        sinks.target_prefix("jsonl", "web", 1, {"container": "web", "seq": 3})
    sinks.target_prefix("jsonl", "web", 1, {"container": "web", "hops": 3})    # without --hops
    with pytest.raises(ValueError, match="hops"):
        sinks.target_prefix("jsonl", "web", 1, {"container": "web", "hops": 3}, hops=True)


# -- the formatter itself ----------------------------------------------------------------------------

def formatter(fmt="jsonl", hops=False, targets=(("web", 1, None),)):
    return sinks.formatter(fmt, NOW, hops, list(targets))


def test_format_appends_and_counts():
    raw = pack(Report(0, 0, 1, 5, 6, 7, 0, (1, 2, 3, 4, 5))) * 3
    out = bytearray(b"before\n")
    assert formatter().format(raw, out) == 3
    assert out.startswith(b"before\n") and out.count(b"\n") == 4
    assert formatter().format(b"", out) == 0 and out.count(b"\n") == 4


def test_format_takes_any_buffer_at_any_alignment():
    raw = pack(Report(0, 1, 9, 5, 6, 7, 0, (1, 2, 3, 4))) * 5
    want = bytearray()
    formatter().format(raw, want)
    for data in (bytearray(raw), memoryview(raw), memoryview(b"x" + raw)[1:], memoryview(b"xyz" + raw)[3:]):
        got = bytearray()
        formatter().format(data, got)
        assert got == want


def test_format_refuses_partial_records_and_unknown_targets():
    f = formatter()
    with pytest.raises(ValueError, match="whole reports"):
        f.format(b"\0" * (REPORT_SIZE + 1), bytearray())
    with pytest.raises(IndexError):
        f.format(b"\0" * REPORT_SIZE, bytearray(), 1)
    with pytest.raises(ValueError, match="unknown format"):
        _format.Formatter("xml", 0)
    with pytest.raises(ValueError, match="hop_names"):
        _format.Formatter("csv", 0, hop_names=((b"a",) * (HOPS + 1), ()))
    with pytest.raises(TypeError):
        f.format(b"", b"not a bytearray")


def test_a_forced_target_writes_every_report_as_its_own():
    # the service: one namespace's queue, whatever index the tracer gave its reports
    ident = {"container": "web", "runtime": "docker"}
    reports = [Report(c, c % 2, c + 1, NOW + c, 1000, 84, 0, (1, None, 3, 4, 5)[:HOP_SLOTS[c % 2]])
               for c in range(6)]
    out = bytearray()
    f = sinks.formatter("jsonl", NOW, True, [("netns:42", 42, ident)])
    f.format(b"".join(map(pack, reports)), out, 0)
    want = "".join(reference_sinks.jsonl_line(r, clock.wall(r.t0 + NOW), 42, "netns:42", True, ident)
                   for r in reports)
    assert out.decode() == want


def test_large_batches_and_long_prefixes_fit_their_room():
    label = "x" * 5000
    raw = b"".join(rec(NOW + i, U64 - i, U32, U32, i % 2, i % 2, HOP_SLOTS[i % 2], U16, *[U32] * HOPS)
                   for i in range(4000))
    for fmt in FORMATS:
        same(fmt, [(label, U64, {"container": label}), ("y", 0, None)], [raw], hops=True)


def test_the_constants_are_the_correlators():
    assert _format.REPORT_SIZE == REPORT_SIZE == 56
    assert _format.DIRECTIONS == report.DIRECTIONS
    assert set(_format.FORMATS) == set(FORMATS)
    assert sinks.HOP_NAMES == (EGRESS_HOPS, INGRESS_HOPS)


# -- the service's report lines ---------------------------------------------------------------------

@pytest.mark.parametrize("hops", [False, True])
@pytest.mark.parametrize("dropped", [0, 120])
def test_the_services_lines_are_the_old_ones(hops, dropped):
    from mace.service import protocol as P
    from mace.service.server import Service

    class Writer:
        def __init__(self):
            self.data = bytearray()

        def write(self, b):
            self.data += b

        async def drain(self):
            pass

    ident = {"container": 'we"b', "runtime": "podman"}
    ns = types.SimpleNamespace(label="podman:we\"b", inode=4026532281, identity=ident)
    service = types.SimpleNamespace(wall_offset=NOW, opts=types.SimpleNamespace(hops=hops, segment="device"))
    reports = [Report(3, i % 2, i + 1, 10**9 * i, 1000 + i, 84, i % 2, (0, 20, 30, 40, 50)[:HOP_SLOTS[i % 2]])
               for i in range(50)]
    raw = b"".join(map(pack, reports))
    w = Writer()
    asyncio.run(Service._write_items(service, ns, w, raw, dropped))
    # what _write_items wrote before the formatter was compiled (hop 0: not seen, null)
    old = "".join(reference_sinks.jsonl_line(r, clock.wall(r.t0 + NOW), ns.inode, ns.label, hops,
                                             ns.identity) for r in unpack(raw))
    if dropped:
        old = P.encode({"v": P.VERSION, "dropped": dropped}).decode() + old
    assert bytes(w.data) == old.encode()
    assert all(json.loads(line) for line in w.data.splitlines())

"""The three report formats (mace lines, JSON lines, CSV) written from constructed reports:
the exact text, the nine-digit `ts`, the hop columns with --hops (no privileges)."""

from __future__ import annotations

import csv
import io
import json
import re

import pytest

from mace.output.report import Report
from mace.output.sinks import FORMATS, make_sink
from mace.plan import EGRESS_HOPS, INGRESS_HOPS

T0 = 5_000_000_000                      # CLOCK_MONOTONIC ns of a report
WALL = 1_552_589_043_315_681_234        # what the wall clock said at T0
OFFSET = WALL - T0
HOP_COLUMNS = ["egress_veth_rx_ns", "egress_veth_backlog_ns", "egress_bridge_ns", "egress_route_ns",
               "egress_uplink_queue_ns", "ingress_route_ns", "ingress_bridge_ns", "ingress_veth_ns",
               "ingress_container_rx_ns"]
CSV_HEADER = ["ts", "netns", "target", "container", "pod", "k8s_namespace", "segment", "dir", "seq",
              "latency_ns", "len", "cpu"]


def report(container=0, d=0, seq=1, t0=T0, latency=80932, length=84, cpu=1, hops=()):
    return Report(container, d, seq, t0, latency, length, cpu, tuple(hops))


def write(fmt, reports, labels=("web",), inodes=(4026532281,), hops=False, containers=None,
          segment="device") -> str:
    out = io.StringIO()
    sink = make_sink(fmt, out, list(labels), list(inodes), hops=hops, wall_offset_ns=OFFSET,
                     containers=containers, segment=segment)
    sink.write(list(reports))
    sink.flush()
    return out.getvalue()


def test_the_three_formats_are_offered():
    assert set(FORMATS) == {"mace", "jsonl", "csv"}


# -- mace lines -------------------------------------------------------------------------------

def test_mace_line_is_the_kernel_modules_format():
    text = write("mace", [report(), report(d=1, seq=7, latency=12)])
    assert text == ("[1552589043.315681] (1) egress: 80932\n"
                    "[1552589043.315681] (7) ingress: 12\n")


@pytest.mark.parametrize("wall_ns,shown", [
    (1_552_589_043_315_681_499, "1552589043.315681"),      # rounded, not cut
    (1_552_589_043_315_681_500, "1552589043.315682"),
    (1_552_589_043_999_999_600, "1552589044.000000"),      # the carry reaches the seconds
    (1_552_589_043_000_000_004, "1552589043.000000"),
])
def test_mace_line_rounds_to_microseconds(wall_ns, shown):
    text = write("mace", [report(t0=wall_ns - OFFSET)])
    assert text == f"[{shown}] (1) egress: 80932\n"


def test_mace_lines_name_the_target_when_there_are_several():
    text = write("mace", [report(container=1), report(container=0, d=1)],
                 labels=("web", "db"), inodes=(1, 2))
    assert text.splitlines() == ["db [1552589043.315681] (1) egress: 80932",
                                 "web [1552589043.315681] (1) ingress: 80932"]


def test_mace_seq_beyond_32_bits_is_written_whole():
    assert "(4294967297)" in write("mace", [report(seq=(1 << 32) + 1)])


# -- JSON lines -------------------------------------------------------------------------------

def test_jsonl_fields_and_exact_nine_digit_ts():
    line = write("jsonl", [report(cpu=3)])
    # the text itself: a JSON encoder going through a double would lose the last digits
    assert line.startswith('{"ts":1552589043.315681234,'), line
    assert line.endswith("}\n") and line.count("\n") == 1
    obj = json.loads(line)
    assert obj == {"ts": obj["ts"], "netns": 4026532281, "target": "web", "container": None,
                   "segment": "device", "dir": "egress", "seq": 1, "latency_ns": 80932, "len": 84, "cpu": 3}


def test_lines_say_which_segment_they_measure():
    obj = json.loads(write("jsonl", [report(d=1, hops=(1, 2, 3, 4, 5))], hops=True, segment="socket"))
    assert obj["segment"] == "socket"
    assert list(obj["hops"]) == ["route", "bridge", "veth", "container rx", "container receive"]
    header, row = rows(write("csv", [report()], segment="socket"))
    assert dict(zip(header, row, strict=True))["segment"] == "socket"


def test_reports_name_the_runtimes_container_and_pod():
    obj = json.loads(write("jsonl", [report()], containers=[{"container": "web"}]))
    assert obj["container"] == "web" and "pod" not in obj
    pod = {"container": "app", "pod": "web-7d9", "k8s_namespace": "shop"}
    obj = json.loads(write("jsonl", [report()], containers=[pod]))
    assert (obj["container"], obj["pod"], obj["k8s_namespace"]) == ("app", "web-7d9", "shop")
    assert rows(write("csv", [report()], containers=[{"container": "web"}]))[1][3:6] == ["web", "", ""]
    # CSV has the pod's columns too, as JSON lines have its fields
    assert rows(write("csv", [report()], containers=[pod]))[1][3:8] == ["app", "web-7d9", "shop", "device",
                                                                        "egress"]


@pytest.mark.parametrize("wall_ns,shown", [
    (1_552_589_043_000_000_005, "1552589043.000000005"),   # leading zeros of the fraction kept
    (1_552_589_044_000_000_000, "1552589044.000000000"),
    (1_552_589_043_999_999_999, "1552589043.999999999"),
])
def test_jsonl_ts_keeps_every_nanosecond(wall_ns, shown):
    line = write("jsonl", [report(t0=wall_ns - OFFSET)])
    assert re.match(r'^\{"ts":(\d+\.\d{9}),', line)[1] == shown


def test_jsonl_has_no_hops_without_the_option():
    obj = json.loads(write("jsonl", [report(hops=(10, 20, 30, 40, 50))]))
    assert "hops" not in obj


def test_jsonl_hops_are_named_per_direction_and_none_is_null():
    text = write("jsonl", [report(hops=(10, None, 30, 35, 40)), report(d=1, hops=(4, 5, 6, None))],
                 hops=True)
    eg, ing = map(json.loads, text.splitlines())
    assert list(eg["hops"].items()) == list(zip(EGRESS_HOPS, [10, None, 30, 35, 40], strict=True))
    assert list(ing["hops"].items()) == list(zip(INGRESS_HOPS, [4, 5, 6, None], strict=True))
    assert '"veth backlog":null' in text.splitlines()[0]


def test_jsonl_target_and_netns_follow_the_container_index():
    text = write("jsonl", [report(container=1), report(container=0)], labels=("a", "b"),
                 inodes=(11, 22))
    assert [(o["target"], o["netns"]) for o in map(json.loads, text.splitlines())] == \
        [("b", 22), ("a", 11)]


# -- CSV --------------------------------------------------------------------------------------

def rows(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text)))


def test_csv_header_and_a_row():
    got = rows(write("csv", [report(seq=2, cpu=0)]))
    assert got == [CSV_HEADER,
                   ["1552589043.315681234", "4026532281", "web", "", "", "", "device", "egress", "2", "80932",
                    "84", "0"]]


def test_csv_header_only_when_nothing_was_written():
    assert rows(write("csv", [])) == [CSV_HEADER]
    assert rows(write("csv", [], hops=True)) == [CSV_HEADER + HOP_COLUMNS]


def test_csv_hop_columns_each_direction_in_its_own_and_none_empty():
    got = rows(write("csv", [report(hops=(1, 2, None, 3, 4)), report(d=1, hops=(6, 7, None, 9))],
                     hops=True))
    assert got[0] == CSV_HEADER + HOP_COLUMNS
    assert got[1][len(CSV_HEADER):] == ["1", "2", "", "3", "4", "", "", "", ""]
    assert got[2][len(CSV_HEADER):] == ["", "", "", "", "", "6", "7", "", "9"]
    assert all(len(r) == len(got[0]) for r in got)


def test_csv_without_hops_ignores_them():
    got = rows(write("csv", [report(hops=(1, 2, 3, 4, 5))]))
    assert len(got[1]) == len(CSV_HEADER)


def test_csv_ts_is_nine_digits():
    got = rows(write("csv", [report(t0=1_552_589_043_000_000_070 - OFFSET)]))
    assert got[1][0] == "1552589043.000000070"


# -- all formats ------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["mace", "jsonl", "csv"])
def test_each_format_writes_one_line_per_report(fmt):
    reports = [report(seq=i, d=i % 2, hops=(1, 2, 3, 4, 5)[:5 - i % 2]) for i in range(1, 6)]
    text = write(fmt, reports, hops=True)
    assert text.count("\n") == len(reports) + (fmt == "csv")

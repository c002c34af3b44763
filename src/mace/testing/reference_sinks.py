"""The report formats written in plain Python, one Report at a time: the reference the
compiled formatter (mace.output._format, behind mace.output.sinks) must match byte for byte.

These are the sinks mace shipped before the formatter was compiled, kept as they were:
tests (tests/unit/test_format.py) and benchmarks (benchmarks/format.py) compare the two on
generated reports.  They take lists of mace.output.report.Report, which a caller gets from
packed reports with report.unpack.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from typing import IO

from mace.output import clock
from mace.output.report import Report
from mace.output.sinks import NO_CONTAINER, hop_columns
from mace.plan import EGRESS_HOPS, hop_names


class Sink:
    """Writes reports for a list of targets (labels and namespace inodes, by container)."""

    def __init__(self, out: IO[str], labels: Sequence[str], inodes: Sequence[int], *,
                 hops: bool = False, wall_offset_ns: int | None = None,
                 containers: Sequence[dict | None] | None = None, segment: str = "device"):
        self.out = out
        self.segment = segment
        self.labels = list(labels)
        self.inodes = list(inodes)
        self.containers = list(containers) if containers is not None else [None] * len(self.labels)
        self.many = len(self.labels) > 1
        self.hops = hops
        self.offset = wall_offset_ns if wall_offset_ns is not None else clock.wall_offset_ns()
        self.written = 0

    def add_target(self, label: str, inode: int, container: dict | None = None) -> None:
        self.labels.append(label)
        self.inodes.append(inode)
        self.containers.append(container)

    def wall(self, r: Report, digits: int = 9) -> str:
        return clock.wall(r.t0 + self.offset, digits)

    def write(self, reports: list[Report]) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        self.out.flush()


class MaceSink(Sink):
    def write(self, reports: list[Report]) -> None:
        w = self.out.write
        for r in reports:
            prefix = f"{self.labels[r.container]} " if self.many else ""
            w(f"{prefix}[{self.wall(r, 6)}] ({r.seq}) {r.direction}: {r.latency}\n")
        self.written += len(reports)


def jsonl_line(r: Report, ts: str, netns: int, target: str, hops: bool,
               container: dict | None = None, segment: str = "device") -> str:
    """One report as a JSON line; `ts` is Sink.wall(r), written as a number with all nine
    digits exact (a JSON encoder would go through a double)."""
    obj = {"netns": netns, "target": target, **(NO_CONTAINER | (container or {})),
           "segment": segment, "dir": r.direction, "seq": r.seq, "latency_ns": r.latency,
           "len": r.len, "cpu": r.cpu}
    if hops:
        obj["hops"] = dict(zip(hop_names(segment)[r.dir], r.hops, strict=True))
    return '{"ts":' + ts + "," + json.dumps(obj, separators=(",", ":"))[1:] + "\n"


class JsonlSink(Sink):
    def write(self, reports: list[Report]) -> None:
        w = self.out.write
        for r in reports:
            w(jsonl_line(r, self.wall(r), self.inodes[r.container], self.labels[r.container],
                         self.hops, self.containers[r.container], self.segment))
        self.written += len(reports)


class CsvSink(Sink):
    COLUMNS = ["ts", "netns", "target", "container", "pod", "k8s_namespace", "segment", "dir", "seq",
               "latency_ns", "len", "cpu"]

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.csv = csv.writer(self.out, lineterminator="\n")
        self.csv.writerow(self.COLUMNS + (hop_columns(self.segment) if self.hops else []))

    def write(self, reports: list[Report]) -> None:
        ncols = len(hop_columns(self.segment))
        for r in reports:
            named = self.containers[r.container]
            row = [self.wall(r), self.inodes[r.container], self.labels[r.container],
                   *[(named or {}).get(k) for k in ("container", "pod", "k8s_namespace")],
                   self.segment, r.direction, r.seq, r.latency, r.len, r.cpu]
            if self.hops:
                hops = [""] * ncols
                base = 0 if r.dir == 0 else len(EGRESS_HOPS)
                for i, h in enumerate(r.hops):
                    hops[base + i] = "" if h is None else h
                row += hops
            self.csv.writerow(row)
        self.written += len(reports)


def make_sink(fmt: str, out: IO[str], labels, inodes, **kw) -> Sink:
    return {"mace": MaceSink, "jsonl": JsonlSink, "csv": CsvSink}[fmt](out, labels, inodes, **kw)

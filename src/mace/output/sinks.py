"""Where reports go: the original MACE line format, JSON lines, or CSV.

    mace   [1552589043.315681] (1) egress: 80932      (prefixed with the target with several)
    jsonl  {"ts": 1552589043.315681, "netns": 4026532281, "target": "web", "container": "web",
            "dir": "egress", "seq": 1, "latency_ns": 80932, "len": 84, "cpu": 1, "hops": {...}}
    csv    ts,netns,target,container,dir,seq,latency_ns,len,cpu[,hop columns]

`container` is the runtime's name for a target given as docker:, podman:, containerd: or
pod: (null, or an empty CSV cell, for a PID or a namespace); a pod's reports also carry
`pod` and `k8s_namespace`.

`ts` is the wall-clock time the packet entered the measured segment (egress: it left the
container's device; ingress: the host's uplink received it).  Hops (with --hops) give, for
each intermediate step, the ns after `ts` at which the packet reached it.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from typing import IO

from mace.defaults import DIRECTIONS, FORMATS  # noqa: F401 - FORMATS: where sinks are chosen
from mace.output import clock
from mace.output.report import Report
from mace.plan import EGRESS_HOPS, INGRESS_HOPS

HOP_NAMES = (EGRESS_HOPS, INGRESS_HOPS)


def hop_columns() -> list[str]:
    return [f"{d}_{h.replace(' ', '_')}_ns" for d, names in zip(DIRECTIONS, HOP_NAMES, strict=True)
            for h in names]


class Sink:
    """Writes reports for a list of targets (labels and namespace inodes, by container)."""

    def __init__(self, out: IO[str], labels: Sequence[str], inodes: Sequence[int], *,
                 hops: bool = False, wall_offset_ns: int | None = None,
                 containers: Sequence[dict | None] | None = None):
        self.out = out
        self.labels = list(labels)
        self.inodes = list(inodes)
        # per target: {"container": name, and "pod", "k8s_namespace" for a pod} or None
        self.containers = list(containers) if containers is not None else [None] * len(self.labels)
        # MACE lines name the target when several were asked for (not when one restarted)
        self.many = len(self.labels) > 1
        self.hops = hops
        # CLOCK_MONOTONIC -> wall clock, taken once: the reports keep their spacing
        self.offset = wall_offset_ns if wall_offset_ns is not None else clock.wall_offset_ns()
        self.written = 0

    def add_target(self, label: str, inode: int, container: dict | None = None) -> None:
        """A target traced from now on, at the next container index (a restarted one)."""
        self.labels.append(label)
        self.inodes.append(inode)
        self.containers.append(container)

    def wall(self, r: Report, digits: int = 9) -> str:
        """When `r` entered the segment, in seconds since the epoch (see clock.wall)."""
        return clock.wall(r.t0 + self.offset, digits)

    def write(self, reports: list[Report]) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        self.out.flush()


class MaceSink(Sink):
    """The original MACE kernel module's /dev/mace lines."""

    def write(self, reports: list[Report]) -> None:
        w = self.out.write
        for r in reports:
            prefix = f"{self.labels[r.container]} " if self.many else ""
            w(f"{prefix}[{self.wall(r, 6)}] ({r.seq}) {r.direction}: {r.latency}\n")
        self.written += len(reports)


NO_CONTAINER = {"container": None}      # a PID's or a namespace's reports: no runtime named them


def jsonl_line(r: Report, ts: str, netns: int, target: str, hops: bool,
               container: dict | None = None) -> str:
    """One report as a JSON line; `ts` is Sink.wall(r), written as a number with all nine
    digits exact (a JSON encoder would go through a double)."""
    obj = {"netns": netns, "target": target, **(NO_CONTAINER | (container or {})),
           "dir": r.direction, "seq": r.seq, "latency_ns": r.latency, "len": r.len, "cpu": r.cpu}
    if hops:
        obj["hops"] = dict(zip(HOP_NAMES[r.dir], r.hops, strict=True))
    return '{"ts":' + ts + "," + json.dumps(obj, separators=(",", ":"))[1:] + "\n"


class JsonlSink(Sink):
    def write(self, reports: list[Report]) -> None:
        w = self.out.write
        for r in reports:
            w(jsonl_line(r, self.wall(r), self.inodes[r.container], self.labels[r.container],
                         self.hops, self.containers[r.container]))
        self.written += len(reports)


class CsvSink(Sink):
    COLUMNS = ["ts", "netns", "target", "container", "dir", "seq", "latency_ns", "len", "cpu"]

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.csv = csv.writer(self.out, lineterminator="\n")
        self.csv.writerow(self.COLUMNS + (hop_columns() if self.hops else []))

    def write(self, reports: list[Report]) -> None:
        ncols = len(hop_columns())
        for r in reports:
            named = self.containers[r.container]
            row = [self.wall(r), self.inodes[r.container], self.labels[r.container],
                   named["container"] if named else "", r.direction, r.seq, r.latency, r.len, r.cpu]
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

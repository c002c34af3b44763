"""Where reports go: the original MACE line format, JSON lines, or CSV.

    mace   [1552589043.315681] (1) egress: 80932      (prefixed with the target with several)
    jsonl  {"ts": 1552589043.315681, "netns": 4026532281, "target": "web", "container": "web",
            "segment": "device", "dir": "egress", "seq": 1, "latency_ns": 80932, "len": 84,
            "cpu": 1, "hops": {...}}
    csv    ts,netns,target,container,pod,k8s_namespace,segment,dir,seq,latency_ns,len,cpu[,hops]

`container` is the runtime's name for a target given as docker:, podman:, containerd: or
pod: (null, or an empty CSV cell, for a PID or a namespace); a pod's reports also carry
`pod` and `k8s_namespace` (CSV has their columns always, empty but for a pod).

`segment` is what the latency measures: "device" (the container's device or host-side veth
to the uplink and back) or "socket" (MACE's: its process's send call to the uplink's
transmit, and the uplink's receive to the receive call).  `ts` is the wall-clock time the
packet entered the measured segment (egress: it left the container's device, or its process
called send; ingress: the host's uplink received it).  Hops (with --hops) give, for
each intermediate step, the ns after `ts` at which the packet reached it.

The lines are made in compiled code (mace.output._format) from the packed reports, with
what each target adds to them (JSON-escaped, CSV-quoted) made once, here, by target_prefix:
no Python object per report.  The Python sinks they replace are kept as the reference,
mace.testing.reference_sinks, and the two agree byte for byte.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from typing import IO

from mace.defaults import DIRECTIONS, FORMATS  # noqa: F401 - FORMATS: where sinks are chosen
from mace.output import _format, clock
from mace.output.report import Report, pack
from mace.plan import hop_names

HOP_NAMES = hop_names("device")
NO_CONTAINER = {"container": None}      # a PID's or a namespace's reports: no runtime named them
# JSON keys a report's own values take, after its target's: a runtime name may not take them
REPORT_KEYS = ("dir", "seq", "latency_ns", "len", "cpu")
# Labels and container names are text: any str survives the trip through bytes and back
ENCODING, ERRORS = "utf-8", "surrogatepass"


def hop_columns(segment: str = "device") -> list[str]:
    return [f"{d}_{h.replace(' ', '_')}_ns" for d, names in zip(DIRECTIONS, hop_names(segment), strict=True)
            for h in names]


def csv_names(container: dict | None) -> list[str]:
    """A target's container, pod and k8s_namespace cells (empty where there is none)."""
    return [(container or {}).get(k) or "" for k in ("container", "pod", "k8s_namespace")]


def target_prefix(fmt: str, label: str, inode: int, container: dict | None = None, *,
                  hops: bool = False, segment: str = "device") -> bytes:
    """What every line of a target's reports carries, for the compiled formatter: the label
    and a space (MACE lines, with several targets); `"netns":..,"target":..,"container":..,
    "segment":..` JSON-escaped (JSON lines); `,netns,target,container,pod,k8s_namespace,
    segment` quoted as the csv module quotes them (CSV)."""
    if fmt == "mace":
        return f"{label} ".encode(ENCODING, ERRORS)
    if fmt == "jsonl":
        obj = {"netns": inode, "target": label, **(NO_CONTAINER | (container or {}))}
        clash = set(obj) & {*REPORT_KEYS, "segment", *(("hops",) if hops else ())}
        if clash:
            raise ValueError(f"target {label}: {', '.join(sorted(clash))} is a report field, "
                             "not a name of the target")
        obj["segment"] = segment
        return json.dumps(obj, separators=(",", ":"))[1:-1].encode()
    if fmt == "csv":
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow([inode, label, *csv_names(container), segment])
        return ("," + buf.getvalue()[:-1]).encode(ENCODING, ERRORS)
    raise ValueError(f"unknown format {fmt!r}")


def formatter(fmt: str, wall_offset_ns: int, hops: bool = False,
              targets: Sequence[tuple[str, int, dict | None]] = (), segment: str = "device") -> _format.Formatter:
    """A compiled formatter for `fmt` with `targets` (label, inode, container) added.

    Example (the service, one namespace's queue)::

        f = formatter("jsonl", offset, hops, [(ns.label, ns.inode, ns.identity)])
        f.format(packed, out, 0)            # every report is target 0's
    """
    keys = tuple(tuple(json.dumps(h).encode() + b":" for h in names) for names in hop_names(segment))
    f = _format.Formatter(fmt, wall_offset_ns, hops=hops, hop_names=keys)
    for label, inode, container in targets:
        f.add_target(target_prefix(fmt, label, inode, container, hops=hops, segment=segment))
    return f


class Sink:
    """Writes reports for a list of targets (labels and namespace inodes, by container)."""

    FORMAT = ""

    def __init__(self, out: IO[str], labels: Sequence[str], inodes: Sequence[int], *,
                 hops: bool = False, wall_offset_ns: int | None = None,
                 containers: Sequence[dict | None] | None = None, segment: str = "device"):
        self.out = out
        self.segment = segment
        self.labels = list(labels)
        self.inodes = list(inodes)
        # per target: {"container": name, and "pod", "k8s_namespace" for a pod} or None
        self.containers = list(containers) if containers is not None else [None] * len(self.labels)
        if not len(self.labels) == len(self.inodes) == len(self.containers):
            raise ValueError("a label, an inode and a container (or None) for each target")
        # MACE lines name the target when several were asked for (not when one restarted)
        self.many = len(self.labels) > 1
        self.hops = hops
        # CLOCK_MONOTONIC -> wall clock, taken once: the reports keep their spacing
        self.offset = wall_offset_ns if wall_offset_ns is not None else clock.wall_offset_ns()
        self.written = 0
        # the target of every report, or -1: each report's container index's
        self.formatter, self.target = self._formatter()

    def _formatter(self) -> tuple[_format.Formatter, int]:
        return formatter(self.FORMAT, self.offset, self.hops,
                         zip(self.labels, self.inodes, self.containers, strict=True), self.segment), -1

    def add_target(self, label: str, inode: int, container: dict | None = None) -> None:
        """A target traced from now on, at the next container index (a restarted one)."""
        self.labels.append(label)
        self.inodes.append(inode)
        self.containers.append(container)
        self.formatter.add_target(target_prefix(self.FORMAT, label, inode, container, hops=self.hops,
                                                segment=self.segment))

    def wall(self, r: Report, digits: int = 9) -> str:
        """When `r` entered the segment, in seconds since the epoch (see clock.wall)."""
        return clock.wall(r.t0 + self.offset, digits)

    def write(self, reports: list[Report]) -> None:
        """Reports as Report tuples (a library caller's): packed, then as write_packed."""
        self.write_packed(b"".join(map(pack, reports)))

    def write_packed(self, data) -> None:
        """Packed reports (REPORT_FORMAT each, as Tracer.poll(raw=True) gives them): a line
        each.  A report no line can be made of raises ValueError, and nothing is written."""
        text = bytearray()
        self.written += self.formatter.format(data, text, self.target)
        if text:
            self.out.write(text.decode(ENCODING, ERRORS))

    def flush(self) -> None:
        self.out.flush()


class MaceSink(Sink):
    """The original MACE kernel module's /dev/mace lines."""

    FORMAT = "mace"

    def _formatter(self) -> tuple[_format.Formatter, int]:
        if self.many:
            return super()._formatter()
        # one target's lines carry no label, whatever their index (a restart adds one)
        f = formatter(self.FORMAT, self.offset)
        return f, f.add_target(b"")

    def add_target(self, label: str, inode: int, container: dict | None = None) -> None:
        if self.many:
            return super().add_target(label, inode, container)
        self.labels.append(label)
        self.inodes.append(inode)
        self.containers.append(container)


class JsonlSink(Sink):
    FORMAT = "jsonl"


class CsvSink(Sink):
    FORMAT = "csv"
    COLUMNS = ["ts", "netns", "target", "container", "pod", "k8s_namespace", "segment", "dir", "seq",
               "latency_ns", "len", "cpu"]

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        csv.writer(self.out, lineterminator="\n").writerow(
            self.COLUMNS + (hop_columns(self.segment) if self.hops else []))


def make_sink(fmt: str, out: IO[str], labels, inodes, **kw) -> Sink:
    return {"mace": MaceSink, "jsonl": JsonlSink, "csv": CsvSink}[fmt](out, labels, inodes, **kw)

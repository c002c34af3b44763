"""Other tracers on the tracepoints mace opens: found at start, named in a warning and the summary.

They matter in two ways (see KERNEL-NOTES, "What one sample costs here"):

- a tracepoint BPF program that returns 0 suppresses every perf sample of that tracepoint on
  that CPU (`perf_trace_run_bpf_submit`), silently: packets go missing without any counter;
- whatever runs on a tracepoint before mace's sample is written (a BPF program, another
  perf event, ftrace) costs time inside mace's segments.

BPF programs are found through `BPF_TASK_FD_QUERY` on every process's perf-event and BPF-link
file descriptors, which names the tracepoint.  A perf event without a program (`perf record`,
another mace) tells nothing of its tracepoint from outside, so it is reported as such.  ftrace
is found in tracefs (`events/<system>/<name>/enable`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from dataclasses import dataclass, replace

BPF_TASK_FD_QUERY = 20
SYS_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351}
FD_TYPES = {0: "raw tracepoint", 1: "tracepoint", 2: "kprobe", 3: "kretprobe", 4: "uprobe",
            5: "uretprobe"}


class _TaskFdQuery(ctypes.Structure):
    _fields_ = [("pid", ctypes.c_uint32), ("fd", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("buf_len", ctypes.c_uint32), ("buf", ctypes.c_uint64),
                ("prog_id", ctypes.c_uint32), ("fd_type", ctypes.c_uint32),
                ("probe_offset", ctypes.c_uint64), ("probe_addr", ctypes.c_uint64)]


@dataclass(frozen=True)
class OtherTracer:
    """One user of a tracepoint (or of perf events) besides this mace."""

    pid: int | None         # None for ftrace, which belongs to no process
    command: str
    kind: str               # "bpf tracepoint", "bpf raw tracepoint", "perf", "ftrace"
    tracepoint: str | None  # system:name where known
    events: int = 1         # file descriptors (or ftrace instances) of this kind
    suppresses: bool = False  # may silently suppress mace's samples (tracepoint BPF programs)

    def describe(self) -> str:
        who = "ftrace" if self.pid is None else f"PID {self.pid} ({self.command})"
        if self.kind == "perf":
            return (f"{who} holds {self.events} perf event(s) whose tracepoints cannot be seen "
                    f"from outside; if they sample the same tracepoints, their cost is inside "
                    f"mace's segments")
        what = f"a {self.kind} program on {self.tracepoint}" if self.kind.startswith("bpf") \
            else f"{self.tracepoint} enabled"
        tail = (": it can suppress mace's samples of that tracepoint, and its cost is inside "
                "mace's segments") if self.suppresses else ": its cost is inside mace's segments"
        return f"{who} has {what}{tail}"

    def as_dict(self) -> dict:
        return {"pid": self.pid, "command": self.command, "kind": self.kind,
                "tracepoint": self.tracepoint, "events": self.events, "suppresses": self.suppresses}


class _Bpf:
    def __init__(self):
        self.nr = SYS_BPF.get(platform.machine())
        self.libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.libc.syscall.restype = ctypes.c_long
        self.buf = ctypes.create_string_buffer(256)

    def query(self, pid: int, fd: int) -> tuple[str, str] | None:
        """(fd type, name) of the BPF program attached to `fd` of `pid`, None if none."""
        if self.nr is None:
            return None
        attr = _TaskFdQuery(pid=pid, fd=fd, buf_len=len(self.buf),
                            buf=ctypes.addressof(self.buf))
        rc = self.libc.syscall(self.nr, BPF_TASK_FD_QUERY, ctypes.byref(attr), ctypes.sizeof(attr))
        if rc != 0:
            # ENOENT: a perf event without a program; ENOTSUPP (524): another kind of link;
            # EPERM: not root; the process or fd may also have gone meanwhile
            return None
        return FD_TYPES.get(attr.fd_type, f"type {attr.fd_type}"), self.buf.value.decode(errors="replace")


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _tracer_fds(pid: int):
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return
    for name in names:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if link in ("anon_inode:[perf_event]", "anon_inode:bpf-link"):
            yield int(name), link


def find(tracepoints: list[str], *, own_pid: int | None = None, ftrace: bool = True,
         enable_files: dict[str, str | None] | None = None) -> list[OtherTracer]:
    """Other users of `tracepoints` (system:name) on this host, and processes holding perf
    events whose tracepoints cannot be told.  Needs root (CAP_SYS_ADMIN) to see BPF programs;
    without it, processes are reported as perf users only.  `enable_files`: the tracefs
    files of enable_paths() if the caller has read them already (tracefs.read_formats_with)."""
    own_pid = os.getpid() if own_pid is None else own_pid
    by_name = {tp.partition(":")[2]: tp for tp in tracepoints}
    bpf = _Bpf()
    found: list[OtherTracer] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == own_pid:
            continue
        pid = int(entry)
        plain = 0
        progs: dict[tuple[str, str], int] = {}
        for fd, link in _tracer_fds(pid):
            got = bpf.query(pid, fd)
            if got is None:
                plain += link == "anon_inode:[perf_event]"
                continue
            fd_type, name = got
            if fd_type in ("tracepoint", "raw tracepoint") and name in by_name:
                progs[(fd_type, by_name[name])] = progs.get((fd_type, by_name[name]), 0) + 1
        comm = _comm(pid)
        for (fd_type, tp), n in sorted(progs.items()):
            found.append(OtherTracer(pid, comm, f"bpf {fd_type}", tp, n,
                                     suppresses=fd_type == "tracepoint"))
        if plain and not progs:     # a BPF tracer's own helper events are not news
            found.append(OtherTracer(pid, comm, "perf", None, plain))
    if ftrace:
        found += _ftrace_users(tracepoints, enable_files)
    return found


def as_seen_by(found: list[OtherTracer], opened) -> list[OtherTracer]:
    """`found` for a capture that opened the tracepoints `opened`: a BPF program on one it did
    not open (netif_rx_entry, which a plan from the inner device without hops leaves off)
    suppresses nothing of mace's; its cost may still lie inside the segments."""
    opened = set(opened)
    return [replace(t, suppresses=False) if t.suppresses and t.tracepoint not in opened else t
            for t in found]


def enable_paths(tracepoints: list[str]) -> list[str]:
    """The tracefs files that say whether ftrace records `tracepoints`."""
    return ["events/{}/{}/enable".format(*tp.split(":", 1)) for tp in tracepoints]


def _ftrace_users(tracepoints: list[str], files: dict[str, str | None] | None = None) -> list[OtherTracer]:
    from mace.capture.tracefs import read_tracefs
    from mace.errors import MaceError
    paths = dict(zip(tracepoints, enable_paths(tracepoints), strict=True))
    if files is None:
        try:
            files = read_tracefs(list(paths.values()))
        except (MaceError, OSError):
            return []
    # "1", or "0*"/"1*" when only some instances enable it (the star: soft-disabled/mixed)
    return [OtherTracer(None, "ftrace", "ftrace", tp)
            for tp, path in paths.items() if (files.get(path) or "0").strip().lstrip("0*")]


def warn_lines(found: list[OtherTracer]) -> list[str]:
    """One stderr line per other tracer, most harmful first."""
    order = sorted(found, key=lambda t: (not t.suppresses, t.kind == "perf", t.pid or 0))
    return [f"mace: warning: {t.describe()}" for t in order]


__all__ = ["OtherTracer", "as_seen_by", "find", "warn_lines"]

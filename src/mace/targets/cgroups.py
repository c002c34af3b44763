"""The cgroup a container's processes run in: what binds the socket segment's events (its
send and receive calls) to that container alone.

perf binds an event to a directory of the hierarchy that holds the perf_event controller
(PERF_FLAG_PID_CGROUP), and counts the tasks of that cgroup and of every cgroup below it.
That hierarchy is cgroup v2 wherever perf_event is not mounted on a v1 hierarchy of its own
(a hybrid host may still do that): both are handled.

A container's processes need not share one cgroup (a Kubernetes pod: a cgroup per container
under the pod's, the sandbox's among them), so the cgroup bound is the deepest one that holds
them all.  It must be the container's own: one that also holds mace or the host's init (the
root, a session, a slice) would bind the events to the host's processes too, and is refused.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass

from mace.errors import NoOwnCgroup

PROC = "/proc"


@dataclass(frozen=True)
class Hierarchy:
    """The cgroup hierarchy perf binds events in: its /proc/PID/cgroup id and mount point."""

    hid: str            # "0" for cgroup v2
    root: str


def v2_root(proc: str = PROC) -> str | None:
    """Where the cgroup v2 hierarchy is mounted here, or None."""
    return _mount(proc, lambda fstype, options: fstype == "cgroup2")


def _mount(proc: str, match) -> str | None:
    try:
        with open(f"{proc}/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fstype, _, rest = right.partition(" ")
                if match(fstype, rest.rstrip("\n").split(" ")[-1].split(",")):
                    return left.split()[4]
    except OSError:
        pass
    return None


def perf_hierarchy(proc: str = PROC) -> Hierarchy | None:
    """The hierarchy that holds perf_event here (v1 if a v1 mount has it, else v2), or None
    when it is not mounted."""
    hid = "0"
    try:
        with open(f"{proc}/cgroups") as f:
            for line in f:
                cols = line.split()
                if cols and cols[0] == "perf_event" and len(cols) > 1 and cols[1] != "0":
                    hid = cols[1]
    except OSError:
        pass
    if hid == "0":
        root = v2_root(proc)
    else:
        root = _mount(proc, lambda fstype, options: fstype == "cgroup" and "perf_event" in options)
    return Hierarchy(hid, root) if root else None


def path_in(h: Hierarchy, pid: int | str, proc: str = PROC) -> str | None:
    """A process's cgroup in hierarchy `h` ("/docker/<id>"), or None."""
    try:
        with open(f"{proc}/{pid}/cgroup") as f:
            for line in f:
                hid, _, rest = line.rstrip("\n").partition(":")
                controllers, _, path = rest.partition(":")
                if hid == h.hid and (hid != "0" or controllers == ""):
                    return path
    except OSError:
        pass
    return None


def pids_in_netns(inode: int, proc: str = PROC) -> list[int]:
    """The processes whose network namespace is `inode`."""
    return [int(d) for d in os.listdir(proc) if d.isdigit() and _netns(proc, d) == inode]


def common(paths: Iterable[str]) -> str:
    """The deepest cgroup that holds every one of `paths`."""
    parts = [p.strip("/").split("/") if p.strip("/") else [] for p in paths]
    out = []
    for names in zip(*parts, strict=False):      # (as deep as the shallowest)
        if len(set(names)) > 1:
            break
        out.append(names[0])
    return "/" + "/".join(out)


def own_cgroup(label: str, pids: Iterable[int], proc: str = PROC) -> str:
    """The directory of the cgroup that holds all of a container's processes (`pids`), in
    the hierarchy perf binds events in.  Refused, with the reason, when there is none of the
    container's own: no process (a namespace with nothing in it), or a cgroup that also
    holds mace or the host's init."""
    h = perf_hierarchy(proc)
    if h is None:
        raise NoOwnCgroup(f"{label}: this host has no cgroup hierarchy with perf_event mounted",
                          hint="mount cgroup v2 (mount -t cgroup2 none /sys/fs/cgroup/unified), or use "
                               "the device segment")
    pids = set(pids)
    paths = {path_in(h, p, proc) for p in pids} - {None}
    if not paths:
        raise NoOwnCgroup(f"{label}: no process runs in its network namespace, so it has no cgroup",
                          hint="start the container's processes first, or use the device segment")
    outside = sorted(p for p in paths if p.startswith("/.."))
    if outside:
        # /proc/PID/cgroup is relative to the reader's cgroup namespace (a container's own,
        # by default on cgroup v2): mace cannot name that cgroup in its mount
        raise NoOwnCgroup(f"{label}: its cgroup {outside[0]} lies outside mace's cgroup namespace",
                          hint="run mace in the host's cgroup namespace (docker run --cgroupns=host, "
                               "nsenter -t 1 -C), or use the device segment")
    path = common(paths)
    for who, pid in (("mace", "self"), ("the host's init", 1)):
        theirs = path_in(h, pid, proc)
        if theirs is not None and _within(theirs, path):
            spread = f" (the one holding {', '.join(sorted(paths)[:3])})" if len(paths) > 1 else ""
            raise NoOwnCgroup(f"{label}: its processes run in the cgroup {path}{spread}, which also "
                              f"holds {who}, not one of their own",
                              hint="the socket segment follows a container's processes by their cgroup: "
                                   "start them in one (a container runtime does), or use the device segment")
    other = _outsider(h, path, pids, proc)
    if other is not None:
        raise NoOwnCgroup(f"{label}: its processes' cgroup {path} also holds PID {other[0]} ({other[1]}), "
                          "which is not in its network namespace",
                          hint="every process in that cgroup would be sampled: give the container a cgroup "
                               "of its own (containers sharing one network namespace share none), or use "
                               "the device segment")
    return os.path.join(h.root, path.lstrip("/"))


def _within(cgroup: str, path: str) -> bool:
    """Whether `cgroup` is `path` or below it."""
    return path == "/" or posixpath.commonpath([path, cgroup]) == path


def _netns(proc: str, pid) -> int | None:
    try:
        return os.stat(f"{proc}/{pid}/ns/net").st_ino
    except OSError:
        return None


def _outsider(h: Hierarchy, path: str, pids: set, proc: str) -> tuple[int, str] | None:
    """A process in `path` or below it that is not one of `pids` (PID, command), or None:
    two containers sharing a network namespace (`--network container:X`) bind their common
    ancestor, a slice of the host's services."""
    nets = {_netns(proc, p) for p in pids} - {None}
    for d in os.listdir(proc):
        if not d.isdigit() or int(d) in pids:
            continue
        theirs = path_in(h, d, proc)
        # (one the container started since its processes were listed is in their namespace)
        if theirs is not None and _within(theirs, path) and _netns(proc, d) not in nets:
            try:
                with open(f"{proc}/{d}/comm") as f:
                    comm = f.read().strip()
            except OSError:
                comm = "?"
            return int(d), comm
    return None

"""Tracepoints as perf events: what to open, with which in-kernel filters, on which CPUs.

`Capture` is the Python face of the capture engine.  It reads the tracepoints' layouts from
tracefs, opens every tracepoint on every online CPU with `perf_event_open` (one ring per
CPU, the other tracepoints of that CPU redirected into it), and hands decoded, time-ordered
events either to a Cython `EventSink` (the correlator) or, for small tools, to Python.

Example::

    from mace.capture.perf import Capture, Probe

    probes = [Probe("net:net_dev_start_xmit", devices=("eth0",)),
              Probe("net:netif_receive_skb", devices=("eth0",))]
    with Capture(probes) as cap:
        cap.start()
        cap.wait(100)
        for ev in cap.read():
            print(ev.ts, cap.probes[ev.kind].tracepoint, cap.devices[ev.dev], hex(ev.skb))
"""

from __future__ import annotations

import errno
import os
import re
import resource
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from mace.capture import _ring
from mace.capture.tracefs import EventFormat, read_formats
from mace.errors import (
    MaceError,
    NoOwnCgroup,
    PermissionProblem,
    ResourceError,
    TracepointMissing,
    UsageError,
)

DEV_NONE = _ring.DEV_NONE
DEV_OTHER = _ring.DEV_OTHER
FILTER_MAX = 4000       # the kernel copies at most a page of filter text (strndup_user)
GLOB_CHARS = "*?[\\"     # what makes `~` a pattern rather than a name
MAX_RING_PAGES = 65536
RING_BUDGET_PAGES = 16384      # 64 MiB of rings in all by default ...
RING_MAX_DEFAULT_PAGES = 2048  # ... and at most 8 MiB per CPU


def default_ring_pages(ncpus: int) -> int:
    """Pages per CPU ring when not chosen: with 8 MiB a reader that other work on the same
    CPUs holds off for ~200 ms at half a million events a second loses nothing (measured:
    benchmarks/throughput.py); many-CPU hosts share a 64 MiB budget."""
    pages = max(256, RING_BUDGET_PAGES // max(ncpus, 1))
    return min(RING_MAX_DEFAULT_PAGES, 1 << (pages.bit_length() - 1))
TRACEPOINT_RE = re.compile(r"^[A-Za-z0-9_]+:[A-Za-z0-9_]+$")
# what the kernel's dev_valid_name accepts, minus quotes (they would end the filter string)
DEVICE_RE = re.compile(r"^[^\s/:\"'\\]{1,15}$")


@dataclass(frozen=True)
class Probe:
    """A tracepoint to open, optionally filtered in the kernel by device name.

    The kernel takes at most a page of filter text per perf event, about 160 device names,
    so a probe may be several perf events of its tracepoint (see `filters`), with disjoint
    filters: each hit passes at most one of them and is sampled once.  The decoder tells the
    device of a sample by the name in its record, never by the event that wrote it."""

    tracepoint: str                      # "net:net_dev_start_xmit"
    devices: tuple[str, ...] = ()        # keep only events on these devices; () keeps all
    condition: str | None = None         # extra ftrace filter, ANDed with the device filter
    # Also keep every device whose name starts with one of these (`name ~ "P*"`): one
    # comparison in the kernel instead of one per device, at the price of sampling devices
    # that share the prefix and are not in `devices` (they decode as DEV_OTHER).  No prefix
    # may start another: the filters stay disjoint.
    prefixes: tuple[str, ...] = ()
    # More predicates ORed with the device ones, each whole and parenthesized where it
    # combines several (fib:fib_table_lookup's forward lookups: a device and the input),
    # and the devices they may pass (what `passes` knows of them)
    extra_terms: tuple[str, ...] = ()
    extra_devices: tuple[str, ...] = ()
    # Bound to these cgroups (v2 directories): sampled only while a process of one of them
    # runs on the CPU (perf_event_open with PERF_FLAG_PID_CGROUP), an event per cgroup
    cgroups: tuple[str, ...] = ()

    def __post_init__(self):
        for p in self.prefixes:
            if not p or not DEVICE_RE.match(p) or any(c in GLOB_CHARS for c in p):
                raise ValueError(f"{p!r} is not a device name prefix")
        for p in self.prefixes:
            if any(q != p and q.startswith(p) for q in self.prefixes):
                raise ValueError(f"device name prefixes overlap: {p!r} starts another")

    def terms(self) -> list[str]:
        """The predicates ORed together: a glob per prefix, then each device that no prefix
        covers (each is a separate comparison for every hit of the tracepoint)."""
        return ([*self.extra_terms] + [f'name ~ "{p}*"' for p in self.prefixes]
                + [f'name == "{d}"' for d in dict.fromkeys(self.devices) if not self.covered(d)])

    def covered(self, device: str) -> bool:
        return any(device.startswith(p) for p in self.prefixes)

    def passes(self, device: str) -> bool:
        """Whether the filter may let a hit on `device` through (without one, every hit)."""
        if not self.terms():
            return True
        return device in self.devices or device in self.extra_devices or self.covered(device)

    def filter_text(self) -> str | None:
        """The whole filter as one expression (what ftrace's `filter` file would take),
        whatever its length; `filters()` is what the perf events get."""
        return self._text(self.terms())

    def filters(self, limit: int = FILTER_MAX) -> list[str | None]:
        """The filter of each perf event this probe opens: each at most `limit` characters,
        each term in exactly one (so the events' filters pass disjoint sets of devices), in
        the order of `terms()`; [None] for no filter at all."""
        terms = self.terms()
        if not terms:
            return [self._text([])]
        out: list[str | None] = []
        chunk: list[str] = []
        for t in terms:
            if chunk and len(self._text([*chunk, t])) > limit:
                out.append(self._text(chunk))
                chunk = []
            chunk.append(t)
        out.append(self._text(chunk))
        for text in out:
            if len(text) > limit:
                raise UsageError(f"a filter of {self.tracepoint} is {len(text)} bytes, the kernel "
                                 f"takes {limit}", hint="use a shorter condition")
        return out

    def _text(self, terms: list[str]) -> str | None:
        parts = []
        if terms:
            parts.append(" || ".join(terms))
        if self.condition:
            parts.append(self.condition)
        if not parts:
            return None
        return " && ".join(f"({p})" for p in parts) if len(parts) > 1 else parts[0]


class Event(NamedTuple):
    """A decoded event, as Python sees it (the hot loop never builds these)."""

    ts: int
    skb: int
    len: int
    tid: int
    cpu: int
    kind: int
    flags: int
    dev: int
    proto: int


def check_tracepoint_name(tp: str) -> None:
    if not TRACEPOINT_RE.match(tp):
        raise UsageError(f"{tp!r} is not a tracepoint name",
                         hint="write SYSTEM:EVENT, e.g. net:netif_receive_skb")


def online_cpus() -> list[int]:
    """CPU numbers from /sys/devices/system/cpu/online ("0-3,6")."""
    try:
        text = open("/sys/devices/system/cpu/online").read().strip()
    except OSError:
        return list(range(os.cpu_count() or 1))
    cpus: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


INLINE_NAMES = {"fib:fib_table_lookup"}       # their `name` is a char array in the record
KEYLESS_SYSTEMS = {"fib", "syscalls", "raw_syscalls"}      # tracepoints without an skb
# Which fields the decoder reads as an event's key, length and protocol, where they are not
# skbaddr, len and protocol: the socket events are keyed by their socket, a receive's
# length is what it returned, and its flags ride in the protocol's place
FIELD_NAMES = {
    "sock:sk_data_ready": {"key": "skaddr"},
    "sock:sock_recv_length": {"key": "sk", "len": "ret", "proto": "flags"},
}


def field_names(qualified: str) -> dict[str, str | None]:
    """The fields an event's key, len and proto come from (see FIELD_NAMES); a system call
    has none of them (its `len`, a sendto's, is the caller's buffer)."""
    if qualified.partition(":")[0] in ("syscalls", "raw_syscalls"):
        return {"key": None, "len": None, "proto": None}
    return {"key": "skbaddr", "len": "len", "proto": "protocol", **FIELD_NAMES.get(qualified, {})}


def kind_layout(fmt: EventFormat) -> dict:
    """Offsets `Rings.add_kind` needs, checked against what the decoder reads."""
    names = field_names(fmt.qualified)

    def off(name: str, size: int, required: bool = True, narrow: bool = False) -> int:
        f = fmt.fields.get(name)
        if f is None:
            if required:
                fmt.field(name)          # raises TracepointMissing naming the field
            return -1
        # `narrow`: read the low bytes of a wider field (a receive's int flags, little-endian)
        if f.size != size and not (f.data_loc and size == 4) and not (narrow and f.size > size):
            raise TracepointMissing(
                f"field {name} of {fmt.qualified} is {f.size} bytes, mace reads {size}",
                hint="this kernel's tracepoint layout is not supported; please report it")
        return f.offset

    # a device name is a __data_loc string, except in fib:fib_table_lookup (the route's
    # device, a char array in place)
    name_field = fmt.fields.get("name")
    name_size = 0
    if name_field is not None and not name_field.data_loc:
        if fmt.qualified not in INLINE_NAMES or "char" not in name_field.ctype or not 0 < name_field.size <= 64:
            raise TracepointMissing(f"field name of {fmt.qualified} is not a __data_loc string",
                                    hint="this kernel's tracepoint layout is not supported; please report it")
        name_size = name_field.size
    # packet events are keyed by skb; a routing decision or a system call times a call chain
    skb = off(names["key"], 8, required=fmt.system not in KEYLESS_SYSTEMS) if names["key"] else -1
    length = off(names["len"], 4, required=False) if names["len"] else -1
    name = off("name", name_size or 4, required=False)
    proto = off(names["proto"], 2, required=False, narrow=names["proto"] != "protocol") if names["proto"] else -1
    return dict(tp_id=fmt.id, skb_off=skb, len_off=length, name_off=name, proto_off=proto,
                min_raw=fmt.size, name_size=name_size)


def _translate(err: OSError, what: str) -> MaceError:
    """One place that turns errno into advice.  `_ring` raises OSError(errno, strerror,
    operation): the operation ("perf_event_open", "mmap", "SET_OUTPUT", "SET_FILTER",
    "ENABLE", ...) is in `filename`, so this switches on it and on errno, not on text."""
    op, code = err.filename, err.errno
    if op == "mmap" and code in (errno.ENOMEM, errno.EPERM):
        # without CAP_IPC_LOCK the rings count against perf_event_mlock_kb
        return ResourceError("the kernel refused to map the perf rings",
                             hint="use fewer --ring-pages or raise /proc/sys/kernel/perf_event_mlock_kb")
    if op == "SET_FILTER" and code == errno.EINVAL:
        return MaceError(f"the kernel rejected an event filter ({what})",
                         hint="a device name may contain characters the filter syntax refuses")
    if code in (errno.EACCES, errno.EPERM):
        return PermissionProblem(f"not permitted to open tracepoints as perf events ({what})",
                                 hint="run as root, or grant CAP_PERFMON and CAP_SYS_ADMIN")
    if code in (errno.EMFILE, errno.ENFILE):
        return ResourceError("out of file descriptors opening perf events",
                             hint="raise the limit (ulimit -n) or trace fewer CPUs")
    if op == "perf_event_open" and code in (errno.ENOENT, errno.ENODEV):
        return TracepointMissing(f"the kernel cannot open {what}",
                                 hint="this kernel lacks the tracepoint or perf support (CONFIG_PERF_EVENTS)")
    name = errno.errorcode.get(code or 0, str(code))
    return MaceError(f"{what}: {op or 'a perf call'} failed with {name}: {err.strerror or os.strerror(code or 0)}")


def _open_cgroups(paths) -> dict[str, int]:
    """A directory fd of each cgroup, for perf_event_open (the caller closes them)."""
    out: dict[str, int] = {}
    try:
        for cg in dict.fromkeys(paths):
            try:
                out[cg] = os.open(cg, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as e:
                raise NoOwnCgroup(f"cannot open the container's cgroup {cg}: {e.strerror}",
                                  hint="the socket segment follows a container's own cgroup; "
                                       "is it still running?") from e
    except BaseException:
        for fd in out.values():
            os.close(fd)
        raise
    return out


def _fd_room(more: int) -> None:
    """Raise the soft limit on open files, within the hard one, so that `more` perf events
    fit besides what is open: a host with many CPUs and containers needs thousands (twice
    that while Tracer.update hands over), past the customary soft limit of 1024, which
    only select() ever needed (mace waits with epoll)."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        in_use = len(os.listdir("/proc/self/fd"))
    except (OSError, ValueError):
        return
    need = in_use + more + 64
    if soft != resource.RLIM_INFINITY and soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(hard, max(need, 2 * soft))
        if new > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            except (OSError, ValueError):
                pass            # perf_event_open then fails with EMFILE, which says what to do


class Capture:
    """Per-CPU perf rings for a list of probes; a context manager that releases everything.

    probes: what to open.  devices: names to resolve into slots, in slot order (None: an
    unused slot; names the probes filter on are added).  cpus: CPU numbers (default: all online).  ring_pages: data pages per ring,
    a power of two (default: default_ring_pages()).  watermark: bytes before the kernel wakes us (0: a quarter ring).
    reorder_us: how long an event waits for earlier events of other CPUs.
    """

    def __init__(self, probes: Sequence[Probe], devices: Sequence[str] = (), *,
                 cpus: Sequence[int] | None = None, ring_pages: int | None = None, watermark: int = 0,
                 reorder_us: int = 2000):
        if not probes:
            raise UsageError("nothing to trace: no probes")
        self.cpus = list(cpus) if cpus is not None else online_cpus()
        if ring_pages is None:
            ring_pages = default_ring_pages(len(self.cpus))
        if ring_pages <= 0 or ring_pages & (ring_pages - 1) or ring_pages > MAX_RING_PAGES:
            raise UsageError(f"ring size of {ring_pages} pages is invalid",
                             hint=f"use a power of two from 1 to {MAX_RING_PAGES}, e.g. 256")
        self.probes = list(probes)
        tps = [p.tracepoint for p in self.probes]
        for tp in tps:
            check_tracepoint_name(tp)
            if tps.count(tp) > 1:
                raise UsageError(f"tracepoint {tp} is listed twice",
                                 hint="give each tracepoint once, with all its devices")
        # slot = position; None keeps a slot unused (see Plan.rebased)
        names: list[str | None] = []
        for d in (*devices, *(d for p in probes for d in p.devices)):
            if d is None or d not in names:
                names.append(d)
        for name in names:
            if name is not None and not DEVICE_RE.match(name):
                raise UsageError(f"{name!r} is not a network device name",
                                 hint="device names are 1 to 15 characters, without spaces, '/', ':' or quotes")
        self.devices = names
        # per probe, the filter of each of its perf events (one event per filter and CPU)
        self.filters = [p.filters() for p in self.probes]
        self.ring_pages = ring_pages
        self.watermark = watermark
        self.reorder_us = reorder_us
        self.formats: dict[str, EventFormat] = {}
        self.rings: _ring.Rings | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def open(self, formats: dict[str, EventFormat] | None = None) -> Capture:
        """Open every event (disabled).  `formats`, if given, saves reading tracefs again."""
        self.formats = formats or read_formats([p.tracepoint for p in self.probes])
        for p in self.probes:
            if (p.devices or p.prefixes) and "name" not in self.formats[p.tracepoint].fields:
                raise UsageError(f"tracepoint {p.tracepoint} has no device name to filter on",
                                 hint="open it without devices")
        rings = _ring.Rings(self.cpus, ring_pages=self.ring_pages, watermark=self.watermark,
                            reorder_ns=self.reorder_us * 1000)
        self.rings = rings
        try:
            for p in self.probes:
                rings.add_kind(**kind_layout(self.formats[p.tracepoint]))
            rings.set_devices(self.devices)
            cgroups = _open_cgroups(c for p in self.probes for c in p.cgroups)
            try:
                _fd_room(self.events_per_cpu * len(self.cpus))
                # the unbound events first: each ring's leader is one of them (cgroup-bound
                # events only write into its buffer: they follow no group)
                order = sorted(range(len(self.probes)), key=lambda k: bool(self.probes[k].cgroups))
                for kind in order:
                    p = self.probes[kind]
                    for text in self.filters[kind]:
                        for cg in (p.cgroups or (None,)):
                            for ring in range(len(self.cpus)):
                                try:
                                    rings.open_event(kind, ring, text, p.tracepoint,
                                                     cgroup_fd=cgroups[cg] if cg else -1)
                                except OSError as e:
                                    if cg and e.errno == errno.EBADF:
                                        raise NoOwnCgroup(
                                            f"{p.tracepoint}: perf cannot bind an event to the cgroup {cg}",
                                            hint="it is not in the hierarchy that holds perf_event "
                                                 "(/proc/cgroups); use the device segment") from e
                                    raise _translate(e, p.tracepoint) from e
            finally:        # an event keeps its cgroup; the directory fd is not needed
                for fd in cgroups.values():
                    os.close(fd)
        except BaseException:
            self.close()
            raise
        return self

    @property
    def events_per_cpu(self) -> int:
        """Perf events opened on each CPU: one per filter (and cgroup) of each probe."""
        return sum(len(f) * max(1, len(p.cgroups)) for f, p in zip(self.filters, self.probes, strict=True))

    def start(self) -> None:
        try:
            self._need().enable()
        except OSError as e:
            raise _translate(e, "enabling the events") from e

    def stop(self) -> None:
        if self.rings is not None:
            self.rings.disable()

    def close(self) -> None:
        """Disable, unmap and close everything.  Idempotent."""
        if self.rings is not None:
            self.rings.close()

    def __enter__(self) -> Capture:
        if self.rings is None:
            self.open()
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def _need(self) -> _ring.Rings:
        if self.rings is None:
            raise RuntimeError("capture is not open")
        return self.rings

    # -- reading -----------------------------------------------------------------------------

    def wait(self, timeout_ms: int) -> int:
        """Block (GIL released) until a ring passes its watermark or the timeout."""
        return self._need().wait(timeout_ms)

    def wakeup(self) -> None:
        self._need().wakeup()

    def read(self, final: bool = False) -> list[Event]:
        """Drain every ring; return the events that are safe to order (all when `final`)."""
        rings = self._need()
        out: list[Event] = []
        while True:
            rings.drain(final)
            out.extend(Event(*t) for t in rings.batch())
            if not rings.more:
                return out

    def feed(self, sink: _ring.EventSink, final: bool = False) -> int:
        """Drain every ring into a Cython sink without the GIL; returns events fed."""
        return self._need().feed(sink, final)

    def stats(self) -> dict:
        """events (decoded), lost, errors, ... summed over CPUs; readable at any time."""
        if self.rings is None:
            return {}
        s = self.rings.stats()
        s["events"] = s["samples"]
        return s

    def kernel_dropped(self) -> dict[str, int]:
        """Per tracepoint, the hits the kernel counted but never wrote as samples, beyond
        what it reported as lost (ring full).  Exact once stopped and drained.

        Some kernels drop tracepoint samples silently (e.g. in interrupt context in some
        states); mace would otherwise under-report without knowing it."""
        counts = self._need().kind_counts()
        lost = self.stats()["lost"]
        missing = {p.tracepoint: max(0, hits - samples)
                   for p, (hits, samples) in zip(self.probes, counts, strict=True)}
        total = sum(missing.values())
        if total <= lost:
            return {}
        # LOST records do not say which event they were: charge them proportionally
        scale = (total - lost) / total
        return {tp: round(n * scale) for tp, n in missing.items() if round(n * scale)}

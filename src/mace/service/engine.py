"""The engine of `mace serve`: one thread that owns the tracer, the plan and the map from
container index to namespace.

It runs every enable, disable and status request in turn, between polls (Tracer.follow),
and attributes each batch of reports before the plan can change under it (Tracer.update
returns the previous plan's reports), so a report never reaches another namespace even
when its index is reused.  Namespaces whose veth went away are disabled by the same loop.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import functools
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from mace.capture import others
from mace.defaults import DIRECTIONS, PRESENCE_EVERY
from mace.errors import MaceError
from mace.output.report import REPORT_SIZE, Histogram, coverage, split
from mace.output.sinks import NO_CONTAINER
from mace.plan import ContainerPath, Plan
from mace.service import protocol as P
from mace.service.queue import Namespace
from mace.targets.netns import (
    HostViews,
    Target,
    candidate_namespaces,
    describe_path,
    discover,
    host_links,
    path_of,
    present,
)
from mace.tracer import Tracer

if TYPE_CHECKING:
    from mace.service.server import Options



NAME_TIMEOUT = 0.5           # s per runtime request when naming a namespace's container

class Engine(threading.Thread):
    """Runs requests that touch the tracer, in order, between polls; hands each batch of
    reports to the event loop already attributed to its namespace."""

    def __init__(self, opts: Options, deliver: Callable, closed: Callable,
                 loop: asyncio.AbstractEventLoop, save: Callable,
                 log: Callable[[str], None] | None = None):
        super().__init__(name="mace-engine", daemon=True)
        self.opts = opts
        self._log = log or (lambda line: None)      # called from this thread
        self._deliver = deliver
        self._closed = closed
        self.loop = loop
        self._save = save
        self.commands: queue.Queue = queue.Queue()
        self.tracer: Tracer | None = None
        self.slots: list[Namespace | None] = []
        self.enabled: dict[int, Namespace] = {}     # read by the loop, changed here only
        self.host: tuple[str, int] | None = None    # host namespace path and inode
        # the uplinks traced: those named (--uplink), else every one discovery finds for the
        # first namespace, kept while any is traced
        self.uplinks: tuple[str, ...] = tuple(opts.uplinks)
        self.stopping = False
        self.error: BaseException | None = None
        self._host: tuple[str, int] | None = None      # from the latest discovery
        self._uplinks: tuple[str, ...] = ()
        self._not_containers: set[int] = set()         # namespaces --all found no veth in
        self._excluded: set[int] = set()               # turned off by their own `mace off`
        self._full = False
        # what scrapes show beyond the live tracer (mace.service.metrics), with --metrics
        self.book = None
        if opts.metrics is not None:
            from mace.service.metrics import GRACE, Book
            self.book = Book(grace=GRACE if opts.metrics_grace is None else opts.metrics_grace,
                             limit=opts.max_namespaces)

    # -- requests from the loop -----------------------------------------------------------

    def call(self, fn: Callable, *args) -> asyncio.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if self.stopping or not self.is_alive():
            fut.set_exception(P.ProtocolError(P.STOPPING, "the service is stopping",
                                              hint="try again once it is back"))
            return asyncio.wrap_future(fut, loop=self.loop)
        self.commands.put((fn, args, fut))
        if self.tracer is not None:
            self.tracer.interrupt()
        return asyncio.wrap_future(fut, loop=self.loop)

    def call_blocking(self, fn: Callable, *args, timeout: float):
        """call() for another thread than the event loop's (a scrape); waits for the result."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if self.stopping or not self.is_alive():
            raise P.ProtocolError(P.STOPPING, "the service is stopping")
        self.commands.put((fn, args, fut))
        if self.tracer is not None:
            self.tracer.interrupt()
        return fut.result(timeout)

    def run(self) -> None:
        try:
            while True:
                self._run_commands()
                if self.stopping:
                    self._refuse_queued()
                    return
                tracer = self.tracer
                if tracer is not None:
                    # requests run between polls; following ends when one replaces or stops
                    # the tracer, or when the last namespace is gone
                    tracer.follow(functools.partial(self._between_polls, tracer), self._dispatch,
                                  presence=self._present, on_gone=self._gone,
                                  check_every=PRESENCE_EVERY, timeout_ms=200, raw=True)
                    continue
                try:
                    fn, args, fut = self.commands.get(timeout=PRESENCE_EVERY)
                except queue.Empty:
                    pass
                else:
                    self._run_one(fn, args, fut)
        except BaseException as e:      # noqa: BLE001 - the loop stops the service on it
            self.error = e
            self.stopping = True
            try:
                self._stop_tracer()
            except BaseException:       # noqa: BLE001 - it failed already; release what we can
                pass
            self._refuse_queued()
            self.loop.call_soon_threadsafe(self._closed, None, "engine failed")

    def _refuse_queued(self) -> None:
        while True:
            try:
                _, _, fut = self.commands.get_nowait()
            except queue.Empty:
                return
            if fut.set_running_or_notify_cancel():
                fut.set_exception(P.ProtocolError(P.STOPPING, "the service is stopping",
                                                  hint="try again once it is back"))

    def _between_polls(self, tracer: Tracer) -> bool:
        """Run the requests waiting; True when `tracer` is no longer the one to follow."""
        self._run_commands()
        return self.stopping or self.tracer is not tracer

    def _run_commands(self) -> None:
        while True:
            try:
                fn, args, fut = self.commands.get_nowait()
            except queue.Empty:
                return
            self._run_one(fn, args, fut)

    def _run_one(self, fn, args, fut) -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn(*args))
        except BaseException as e:      # noqa: BLE001 - the caller's request fails, we go on
            fut.set_exception(e)

    def _dispatch(self, chunks: list[bytes]) -> None:
        # (namespaces traced for the metrics alone queue nothing: no work per report)
        if not chunks or not any(s is not None and s.keep for s in self.slots):
            return
        batch = [(self.slots[i], raw) for i, raw in split(chunks).items()
                 if i < len(self.slots) and self.slots[i] is not None and self.slots[i].keep]
        if batch:
            self.loop.call_soon_threadsafe(self._deliver, batch)

    # -- enabling and disabling -----------------------------------------------------------

    def enable(self, inode: int, ns_path: str, pid: int | None, *, auto: bool = False,
               identity: dict | None = None) -> tuple[Namespace, bool]:
        """Discover the namespace's path to the host and trace it.  (ns, was enabled)
        auto: traced for the service itself (--all, --netns), its reports queued only once
        a client enables it too."""
        if not auto:
            self._excluded.discard(inode)
        ns = self.find(inode)
        if ns is not None:
            if not auto and not ns.keep:
                ns.keep = True          # a client wants the reports of a namespace --all traces
                self._save()
                return ns, False
            return ns, True
        self._room()
        ns = self._namespace(inode, ns_path, pid)
        ns.auto, ns.keep = auto, not auto
        self._add([ns], self._host, self._uplinks)
        ns.identity = identity if identity is not None else self._runtime_name(inode)
        return ns, False

    def enable_auto(self) -> list[str]:
        """--all: trace every namespace with a veth into this one that is not traced yet, in
        one update.  Lines for the log."""
        own = os.stat("/proc/self/ns/net").st_ino
        found, out = [], []
        # one pass reads the host's links and routes once, not once per namespace (500
        # containers: the host's dumps per namespace made the start quadratic)
        with HostViews() as hosts:
            for path, inode in candidate_namespaces():
                if inode == own or inode in self.enabled or inode in self._not_containers:
                    continue
                if inode in self._excluded:
                    continue
                if len(self.enabled) + len(found) >= self.opts.max_namespaces:
                    if not self._full:
                        out.append(f"not tracing more than {self.opts.max_namespaces} namespaces "
                                   "(--max-namespaces)")
                    self._full = True
                    break
                try:
                    ns = self._namespace(inode, path, None, hosts)
                except P.ProtocolError:
                    self._not_containers.add(inode)     # no veth here (yet): asked again on a link event
                    continue
                ns.auto, ns.keep = True, False
                found.append(ns)
        if found:
            self._add(found, self._host, self._uplinks)
            for ns in found:
                ns.identity = self._runtime_name(ns.inode)
                out.append(f"netns {ns.inode} traced ({ns.identity['container'] if ns.identity else 'no runtime names it'}): "
                           f"{describe_path(ns.path, self.uplink)}")
        return out

    def links_changed(self) -> None:
        """A link came or went on the host (the watcher, in this thread): look again."""
        self._not_containers.clear()
        for line in self.enable_auto():
            self._log(f"mace: {line}")

    def call_soon(self, fn: Callable, *args) -> None:
        """Run fn in this thread between polls; nobody waits for it (the watcher)."""
        if not self.stopping:
            self.commands.put((fn, args, concurrent.futures.Future()))
            if self.tracer is not None:
                self.tracer.interrupt()

    def _namespace(self, inode: int, ns_path: str, pid: int | None,
                   hosts: HostViews | None = None) -> Namespace:
        # discovery of one namespace's path to the host, checked to be this service's host
        try:
            topo = discover([Target(f"netns:{inode}", ns_path, inode, pid)], uplink=self.uplinks or None,
                            hosts=hosts)
        except MaceError as e:
            raise P.ProtocolError(P.TOPOLOGY, str(e), e.hint or "") from None
        c = topo.containers[0].main
        own = os.stat("/proc/self/ns/net")
        host = os.stat(topo.host_ns)
        if (host.st_dev, host.st_ino) != (own.st_dev, own.st_ino):
            # the devices mace filters on must be the host's own: a namespace built by its
            # user could otherwise name its veth after another container's
            raise P.ProtocolError(P.TOPOLOGY, "this namespace's veth leads to another namespace "
                                              "than the service's",
                                  hint="run `mace serve` in the host namespace the containers' veths are in")
        try:
            path = path_of(topo.containers[0], self.opts.segment)
        except MaceError as e:          # the socket segment: no cgroup of its own
            raise P.ProtocolError(P.TOPOLOGY, str(e), e.hint or "") from None
        ns = Namespace(inode, path, c.veth_index, self.opts.queue_size, pid=pid)
        self._host, self._uplinks = (topo.host_ns, topo.host_ns_inode), topo.uplinks
        return ns

    def _runtime_name(self, inode: int) -> dict | None:
        # clients are known by their namespace: ask the runtimes which container that is,
        # briefly (this runs between polls)
        from mace.targets.runtimes import name_of_netns
        return name_of_netns(inode, self.opts.runtime_socket, timeout=NAME_TIMEOUT)

    def restore(self, saved: dict) -> list[str]:
        """Re-enable namespaces a previous service saved, if their veth is still the same
        interface.  Returns a line per namespace for the log."""
        out = []
        # (a state saved before uplinks were repeatable has one, as "uplink")
        uplinks = tuple(saved.get("uplinks") or ([saved["uplink"]] if saved.get("uplink") else []))
        if not uplinks:
            return ["not resuming: the saved state names no uplink"]
        if self.uplinks and uplinks != self.uplinks:
            return [f"not resuming: the saved state traced {'|'.join(uplinks)}, this service {self.uplink}"]
        present = host_links("/proc/self/ns/net")
        if present is None:
            return ["not resuming: cannot list the host's links"]
        for item in saved.get("namespaces", []):
            if not isinstance(item, dict) or not {"inode", "inner", "veth", "veth_index"} <= set(item):
                out.append("a malformed saved namespace was skipped")
                continue
            if (item["veth"], item["veth_index"]) not in present:
                lost = len(base64.b64decode(item.get("unread", ""))) // REPORT_SIZE
                out.append(f"netns {item['inode']}: gone since the last run; "
                           f"{lost} unread reports discarded")
                continue
            if self.opts.segment == "socket" and not item.get("cgroup"):
                out.append(f"netns {item['inode']}: not resumed: saved by a service that measured the "
                           "device segment (no cgroup); `mace on` in it enables it again")
                continue
            ns = Namespace(item["inode"], ContainerPath(f"netns:{item['inode']}", item["inner"],
                                                        item["veth"], item.get("bridge"),
                                                        item.get("cgroup")),
                           item["veth_index"], self.opts.queue_size, pid=item.get("pid"),
                           since=item.get("since"))
            ns.push(base64.b64decode(item.get("unread", "")))
            ns.identity = self._runtime_name(item["inode"])
            ns.received = 0
            ns.dropped = item.get("dropped", 0)
            try:
                self._room()
                self._add([ns], ("/proc/self/ns/net", os.stat("/proc/self/ns/net").st_ino), uplinks)
            except (P.ProtocolError, MaceError) as e:
                out.append(f"netns {ns.inode}: cannot resume: {e}")
                continue
            out.append(f"netns {ns.inode}: resumed ({describe_path(ns.path, '|'.join(uplinks))}), "
                       f"{ns.queued} unread reports kept")
        return out

    def _room(self) -> None:
        if len(self.enabled) >= self.opts.max_namespaces:
            raise P.ProtocolError(P.BUSY, f"the service already traces {len(self.enabled)} namespaces",
                                  hint="its --max-namespaces limit; ask the host's administrator")

    @property
    def uplink(self) -> str | None:
        """The uplinks as paths name them (`eth0|eth1`); None while none is known."""
        return "|".join(self.uplinks) or None

    def _plan(self, containers: list, uplinks: tuple[str, ...]) -> Plan:
        # the veths' peers are in the service's own namespace, so are the uplinks
        try:
            indexes = tuple(socket.if_nametoindex(u) for u in uplinks)
        except OSError:     # gone meanwhile: the route filter then passes more lookups
            indexes = ()
        return Plan(containers, uplinks[0], hops=self.opts.hops, end_at_queue=self.opts.end_at_queue,
                    start_at_veth=self.opts.start_at_veth, extra_uplinks=uplinks[1:],
                    uplink_indexes=indexes, segment=self.opts.segment)

    def _add(self, new: list[Namespace], host: tuple[str, int], uplinks: tuple[str, ...]) -> None:
        # free indexes first, then new ones; one plan for all
        slots = list(self.slots)
        for ns in new:
            index = slots.index(None) if None in slots else len(slots)
            if index == len(slots):
                slots.append(None)
            slots[index] = ns
            ns.index = index
        containers = [s.path if s else None for s in slots]
        try:
            plan = self._plan(containers, uplinks)
        except ValueError as e:     # a path the plan cannot trace: refused, the service goes on
            raise P.ProtocolError(P.FAILED, f"cannot trace: {e}", hint="see the service's log") from None
        try:
            if self.tracer is None:
                tracer = Tracer(plan, table_size=self.opts.table_size,
                                max_age_ns=self.opts.max_age_ns, ring_pages=self.opts.ring_pages)
                tracer.open(bridge=True)
                if self.book is not None:
                    from mace.service.metrics import BOUNDS_NS
                    tracer.correlator.enable_buckets(BOUNDS_NS, hops=self.opts.hops)
                try:
                    tracer.start()
                except BaseException:
                    tracer.close()
                    raise
                self.tracer = tracer
                for line in others.warn_lines(tracer.other_tracers):
                    self._log(line)
            else:
                self._dispatch(self.tracer.update(plan, raw=True))
        except MaceError as e:
            raise P.ProtocolError(P.FAILED, str(e), e.hint or "") from None
        except OSError as e:
            raise P.ProtocolError(P.FAILED, f"cannot trace: {e.strerror or e}",
                                  hint="see the service's log") from None
        self.host, self.uplinks = host, uplinks
        self.slots = slots
        for ns in new:
            self.enabled[ns.inode] = ns
        self._save()

    def disable(self, ns: Namespace, reason: str) -> None:
        """Stop tracing `ns`; its queue is freed (the loop learns why)."""
        if self.enabled.get(ns.inode) is not ns:
            return
        if ns.auto and reason == "mace off":
            self._excluded.add(ns.inode)    # its own choice: --all leaves it alone from now on
        containers = [s.path if s is not None and s is not ns else None for s in self.slots]
        try:
            if any(containers):
                plan = self._plan(containers, self.uplinks)
                self._dispatch(self.tracer.update(plan, raw=True, on_reset=self._retire_indexes))
            else:
                self._stop_tracer()        # the last one: no perf event stays open
                self.host, self.uplinks = None, tuple(self.opts.uplinks)
        finally:
            self.slots[ns.index] = None
            del self.enabled[ns.inode]
            self.loop.call_soon_threadsafe(self._closed, ns, reason)
            self._save()

    def _stop_tracer(self) -> None:
        tracer, self.tracer = self.tracer, None
        if tracer is None:
            return
        try:
            self._dispatch(tracer.stop(raw=True))
            if self.book is not None:
                for ns in self.slots:
                    if ns is not None:
                        self._retire_series(ns, tracer)
                self.book.close_tracer(tracer.stats())
        finally:
            tracer.close()

    # -- metrics --------------------------------------------------------------------------

    def _retire_series(self, ns: Namespace, tracer: Tracer) -> None:
        # a namespace's last counters, before its index can be reused
        if self.book is None:
            return
        from mace.service.metrics import labels_of, series_of
        with tracer.hold():
            self.book.retire(series_of(tracer, ns.index, labels_of(ns.label, ns.identity)))

    def _retire_indexes(self, indexes: list[int]) -> None:
        # Tracer.update's on_reset: it holds the correlator still already
        if self.book is None:
            return
        from mace.service.metrics import labels_of, series_of
        for i in indexes:
            ns = self.slots[i] if i < len(self.slots) else None
            if ns is not None:
                self.book.retire(series_of(self.tracer, i, labels_of(ns.label, ns.identity)))

    def metrics_snapshot(self):
        """What a scrape shows (mace.service.metrics.Snapshot); runs in this thread."""
        from mace.service.metrics import labels_of, series_of
        tracer = self.tracer
        if tracer is None:
            return self.book.snapshot([], None)
        with tracer.hold():
            counters = tracer.correlator.counters()
            live = [series_of(tracer, ns.index, labels_of(ns.label, ns.identity), counters)
                    for ns in self.enabled.values()]
            return self.book.snapshot(live, tracer)

    def shutdown(self) -> None:
        """Stop tracing (the last reports go to their queues) and end the thread."""
        self._stop_tracer()
        self.stopping = True

    def find(self, inode: int) -> Namespace | None:
        """The enabled namespace with this inode, if its veth is still the same interface:
        a namespace's inode is reused once it is gone, by then its veth is gone too."""
        ns = self.enabled.get(inode)
        if ns is None or self.host is None:
            return ns
        there = present(self.host[0], [(ns.path.veth, ns.veth_index)])
        if there is not None and not there[0]:
            self.disable(ns, "namespace gone")
            return None
        return ns

    # -- status ---------------------------------------------------------------------------

    def status(self, inode: int) -> dict:
        ns = self.find(inode)
        if ns is None or self.tracer is None:
            return {"state": "disabled"}
        stats = self.tracer.stats()
        counts = stats["containers"][ns.index]
        out = {"state": "enabled", "path": describe_path(ns.path, self.uplink),
               "since": round(ns.since, 3), **(NO_CONTAINER | (ns.identity or {}))}
        for d, name in enumerate(DIRECTIONS):
            k = counts[name]
            h = Histogram(self.tracer.correlator.histogram(ns.index, d))
            out[name] = {"reports": k["reports"], "crossed": k["crossed"],
                         "coverage": coverage(k), "p50_ns": h.percentile(50),
                         "p99_ns": h.percentile(99), "max_ns": k["max_ns"],
                         "missed": {m: k[m] for m in ("orphans", "expired", "evicted", "rejected")},
                         "local": k["local"], "dropped": k["dropped"]}
        out["lost"] = stats["rings"]["lost"]      # ring overflows, for all namespaces alike
        return out

    # -- namespaces that went away --------------------------------------------------------

    def _present(self) -> list[bool | None] | None:
        """By container index: is its namespace's veth still the same interface."""
        if self.host is None:
            return None
        return present(self.host[0], [None if s is None else (s.path.veth, s.veth_index)
                                      for s in self.slots])

    def _gone(self, index: int, left: int) -> None:
        ns = self.slots[index]
        if ns is not None:
            self.disable(ns, "namespace gone")


class LinkWatcher(threading.Thread):
    """--all: tells the engine when links come and go in the host namespace (netlink link
    events, a burst taken as one), and every RESCAN_EVERY s in case an event was lost."""

    DEBOUNCE = 0.1          # s: a container's veth is created, moved and renamed in a burst
    RESCAN_EVERY = 30.0

    def __init__(self, engine: Engine):
        super().__init__(name="mace-links", daemon=True)
        self.engine = engine
        self._halt = threading.Event()

    def run(self) -> None:
        import select

        from pyroute2 import IPRoute
        from pyroute2.netlink.rtnl import RTMGRP_LINK

        # (made in this thread: pyroute2's sockets run an event loop of their own, which
        # cannot start inside the service's)
        self.ipr = IPRoute()
        self.ipr.bind(groups=RTMGRP_LINK)
        last = time.monotonic()
        try:
            while not self._halt.is_set() and not self.engine.stopping:
                ready, _, _ = select.select([self.ipr.fileno()], [], [], 0.5)
                if ready:
                    self._drain()
                    time.sleep(self.DEBOUNCE)
                    self._drain()
                elif time.monotonic() - last < self.RESCAN_EVERY:
                    continue
                last = time.monotonic()
                self.engine.call_soon(self.engine.links_changed)
        finally:
            self.ipr.close()

    def _drain(self) -> None:
        import select
        while select.select([self.ipr.fileno()], [], [], 0)[0]:
            try:
                self.ipr.get()
            except OSError:         # ENOBUFS: events lost; the rescan that follows finds all
                pass

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)

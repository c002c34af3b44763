"""Plan -> perf capture -> correlator -> reports: the one place with the poll loop.

Example::

    plan = Plan([ContainerPath("c0", "eth0", "vethab12", "br0")], uplink="eth1")
    with Tracer(plan) as tr:
        tr.start()
        while running:
            for report in tr.poll(100):
                print(report)
        tail = tr.stop()
        print(tr.stats())
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

from mace.capture import others
from mace.capture.perf import Capture
from mace.capture.tracefs import read_formats_with
from mace.defaults import DEFAULT_MAX_AGE_NS, DEFAULT_TABLE_SIZE, DIRECTIONS, PRESENCE_EVERY
from mace.output.report import Report, unpack
from mace.plan import Plan, tracepoints


def _cut_time() -> int:
    """The handover instant of update() (CLOCK_MONOTONIC, the rings' clock); a seam for tests."""
    return time.monotonic_ns()


class Tracer:
    """Traces the containers of a plan; a context manager that releases everything.

    table_size: correlation table entries (a power of two; 64 bytes each).
    max_age_ns: a packet not through the segment after this long is given up.
    ring_pages, watermark, reorder_us: see mace.capture.perf.Capture.
    """

    def __init__(self, plan: Plan, *, table_size: int = DEFAULT_TABLE_SIZE,
                 max_age_ns: int = DEFAULT_MAX_AGE_NS, ring_pages: int | None = None,
                 watermark: int = 0, reorder_us: int = 2000, cpus: Iterable[int] | None = None):
        self.plan = plan
        self.table_size = table_size
        self.max_age_ns = max_age_ns
        self._capture_kw = dict(cpus=cpus, ring_pages=ring_pages, watermark=watermark,
                                reorder_us=reorder_us)
        self.capture: Capture | None = None
        self.formats: dict = {}
        self.correlator = None
        self._lock = threading.Lock()       # one thread at a time feeds the correlator
        self._retired = {"rings": {}, "kernel_dropped": 0}   # captures update() replaced
        self.updates = 0
        self.in_flight: list[list[int]] | None = None
        self.started_at: float | None = None
        self.stopped_at: float | None = None
        self.other_tracers: list[others.OtherTracer] = []   # found by open()

    def open(self, *, bridge: bool | None = None) -> Tracer:
        """Open the events (disabled), and find the other tracers of the same tracepoints
        (`other_tracers`, see mace.capture.others).  bridge: see Plan.correlator."""
        tps = tracepoints(self.plan.hops, self.plan.socket)
        # one read of tracefs (a private mount, a child process, when it is not mounted)
        # for the layouts and for whether ftrace records the same tracepoints
        formats, enable = read_formats_with(tps, others.enable_paths(tps))
        self.formats = formats
        self.capture = Capture(self.plan.probes(formats), self.plan.devices, **self._capture_kw)
        cap = self.capture.open(formats)
        try:
            self.correlator = self.plan.correlator(
                cap.probes, table_size=self.table_size, max_age_ns=self.max_age_ns,
                ncpu=max(cap.cpus) + 1, bridge=bridge)
            try:
                self.other_tracers = others.as_seen_by(others.find(tps, enable_files=enable),
                                                       (p.tracepoint for p in cap.probes))
            except OSError:     # /proc unreadable: a warning the less, not a reason to stop
                self.other_tracers = []
        except BaseException:
            cap.close()
            raise
        return self

    def __enter__(self) -> Tracer:
        return self.open()

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def close(self) -> None:
        self._join()
        if self.capture is not None:
            self.capture.close()

    def start(self) -> None:
        """Enable the events and start the drain thread: it empties the rings into the
        correlator (without the GIL) however long the caller takes over each batch of
        reports, so a slow consumer delays reports instead of losing records."""
        self._reports: deque[bytes] = deque()
        self._ready = threading.Event()
        self._halt = threading.Event()
        self._error: BaseException | None = None
        self.capture.start()
        self.started_at = time.monotonic()
        self._thread = threading.Thread(target=self._drain_loop, name="mace-drain", daemon=True)
        self._thread.start()

    def _drain_loop(self) -> None:
        try:
            while not self._halt.is_set():
                cap = self.capture
                try:
                    cap.wait(50)
                except ValueError:
                    if cap is self.capture:
                        raise
                    continue                # update() replaced and closed it meanwhile
                with self._lock:
                    self._pull(final=False)
        except BaseException as e:      # noqa: BLE001 - handed to the caller's next poll
            self._error = e
            self._ready.set()

    def _pull(self, final: bool, capture: Capture | None = None) -> None:
        # Callers hold self._lock, or the drain thread is not running.
        capture = capture or self.capture
        while True:
            capture.feed(self.correlator, final)
            raw = self.correlator.take_reports()
            if raw:
                self._reports.append(raw)
                self._ready.set()
            if not capture.rings.more:
                return

    def _take(self, raw: bool = False) -> list:
        out: list = []
        while self._reports:
            chunk = self._reports.popleft()
            if raw:
                out.append(chunk)
            else:
                out.extend(unpack(chunk))
        return out

    def poll(self, timeout_ms: int = 100, *, raw: bool = False) -> list:
        """The reports correlated since the last call, waiting up to timeout_ms for some.
        With `raw`, chunks of packed reports (mace.output.report.REPORT_SIZE bytes each) instead
        of Report tuples: what a caller that only stores them needs."""
        self._ready.wait(timeout_ms / 1000)
        self._ready.clear()
        if self._error is not None:
            raise self._error
        return self._take(raw)

    def _join(self) -> None:
        thread = getattr(self, "_thread", None)
        if thread is not None and thread.is_alive():
            self._halt.set()
            self.capture.wakeup()
            thread.join()

    def update(self, plan: Plan, *, raw: bool = False,
               on_reset: Callable[[list[int]], None] | None = None) -> list:
        """Trace another set of containers from now on, without a gap or a duplicate.

        A perf event's filter cannot be changed once set, so a new capture with the new
        filters is opened and enabled first; the old one is then stopped and drained up to
        the moment the new one ran on every CPU, and the correlator switches to the new
        plan between the last old event and the first new one.  Containers keep their
        index, counters and packets in flight when their index holds the same container;
        an index whose container changed starts afresh.  `self.plan` becomes the plan as
        traced (its device slots rebased on the previous plan's).

        `on_reset(indexes)` hears of the containers about to start afresh once their last
        events are correlated, while the correlator still holds their counters.

        Returns the reports of the previous plan not yet polled (as poll() would, `raw`
        too): whatever poll() returns afterwards belongs to the new plan, so a caller that
        maps container indexes to something of its own can switch its map in between."""
        if not plan.same_shape(self.plan):
            raise ValueError("update() changes containers only, not the uplink, hops or end point")
        plan = plan.rebased(self.plan)
        new = Capture(plan.probes(self.formats), plan.devices, **self._capture_kw)
        if [p.tracepoint for p in new.probes] != [p.tracepoint for p in self.capture.probes]:
            raise ValueError("update() cannot change the tracepoints")
        reset = [i for i, c in enumerate(self.plan.containers)
                 if c is not None and (i >= len(plan.containers) or plan.containers[i] != c)]
        classes, owner = plan.device_classes()
        inner = plan.inner_slots()
        new.open(self.formats)
        old = self.capture
        # The drain thread releases old events up to `now - reorder` (at once when a stage
        # fills): it must not run between taking the cut and telling the old rings about it,
        # or it hands the correlator old events stamped after the cut, which the new capture
        # then delivers again.  So the whole switch holds the lock.
        with self._lock:
            try:
                new.start()
                # Anything stamped from here on happened with the new events enabled
                # everywhere: the old capture delivers what came before, the new one the
                # rest, each event once.
                cut = _cut_time()
            except BaseException:
                new.close()             # nothing changed: the old capture goes on
                raise
            try:
                old.rings.cut_at(cut)
                old.stop()
                self._pull(final=True, capture=old)
                # A hit both captures recorded is stamped twice, a sample apart: the new
                # capture learns which of the hits stamped near the cut the old one delivered.
                new.rings.start_at(cut, old.rings.twin_log(), _traced(old, new))
                if on_reset is not None and reset:
                    on_reset(reset)
                self.correlator.reconfigure(classes, owner, inner, reset)
                self.capture, self.plan = new, plan
                previous = self._take(raw)
            except BaseException as e:
                # The old capture is cut and stopped and the correlator may not match the
                # new one: fail for good (the next poll raises) rather than misattribute.
                self.capture = new
                self._error = e
                raise
            finally:
                try:
                    self._retire(old)
                finally:
                    old.close()     # wakes the drain thread if it waits on it
        self.updates += 1
        return previous

    def hold(self):
        """A context in which the drain thread does not feed the correlator: counters read
        inside it belong to one moment (a scrape reads many)."""
        return self._lock

    @property
    def kernel_dropped_retired(self) -> int:
        """Samples the kernel dropped in the captures update() retired: exact, unlike a
        running capture's count, which includes samples not read yet."""
        return self._retired["kernel_dropped"]

    def interrupt(self) -> None:
        """Make a poll() waiting in another thread return now."""
        self._ready.set()

    def _retire(self, cap: Capture) -> None:
        for k, v in cap.stats().items():
            self._retired["rings"][k] = self._retired["rings"].get(k, 0) + v
        self._retired["kernel_dropped"] += sum(cap.kernel_dropped().values())

    def stop(self, *, raw: bool = False) -> list:
        """Stop the events, correlate what is left, and settle the counters."""
        self._join()
        self.capture.stop()
        self.stopped_at = time.monotonic()
        self._pull(final=True)
        self.in_flight = self.correlator.finish()
        if self._error is not None:
            raise self._error
        return self._take(raw)

    def follow(self, until: Callable[[], bool] | None = None,
               on_reports: Callable[[list], bool | None] | None = None, *,
               presence: Callable[[], list[bool | None] | None] | None = None,
               on_gone: Callable[[int, int], None] | None = None,
               check_every: float = PRESENCE_EVERY, timeout_ms: int = 50, raw: bool = False) -> str:
        """Poll until `until()` is true, handing every batch (as poll() returns it, `raw`
        too; empty ones as well, so a live view can redraw) to `on_reports`, which returns
        True to stop (a count reached).  Every `check_every` s, `presence()` tells which
        containers are still there (by index: True, False once gone, None for an unused
        index; None instead of a list when it cannot tell); `on_gone(index, left)` hears of
        each that went, once, and following ends when none is left.  Returns why it ended:
        "until", "done" or "gone".

        Example::

            tracer.follow(until=lambda: stop.requested, on_reports=sink.write,
                          presence=topo.present, on_gone=lambda i, left: print(i, "gone"))
        """
        return follow(lambda ms: self.poll(ms, raw=raw), until, on_reports, presence=presence,
                      on_gone=on_gone, check_every=check_every, timeout_ms=timeout_ms)

    def run(self, until: Callable[[], bool], on_reports: Callable[[list[Report]], None] | None = None,
            timeout_ms: int = 50) -> None:
        """Poll until `until()` is true, handing each non-empty batch of reports to
        `on_reports` (follow() without presence checks)."""
        def hand(reports: list) -> None:
            if reports and on_reports:
                on_reports(reports)
        self.follow(until, hand, timeout_ms=timeout_ms)

    def stats(self) -> dict:
        """Ring counters, global correlator counters, and per container and direction the
        packet counters (with in_flight once stopped)."""
        c = self.correlator.counters()
        per = c["containers"]
        for i, entry in enumerate(per):
            for d, name in enumerate(DIRECTIONS):
                entry[name]["in_flight"] = self.in_flight[i][d] if self.in_flight else 0
        rings = self.capture.stats()
        for k, v in self._retired["rings"].items():
            rings[k] = rings.get(k, 0) + v
        rings["updates"] = self.updates
        if self.stopped_at is not None:
            rings["kernel_dropped"] = (sum(self.capture.kernel_dropped().values())
                                       + self._retired["kernel_dropped"])
        return {"rings": rings, "correlator": c["global"], "containers": per}


def _traced(old: Capture, new: Capture) -> list[list[int] | None]:
    """Per kind of `new`, the device slots of `new` that `old`'s filter passed (None: all)."""
    slot = {n: i for i, n in enumerate(new.devices) if n is not None}
    return [None if not p.devices else [slot[n] for n in p.devices if n in slot]
            for p in old.probes]


def follow(poll: Callable[[int], list], until: Callable[[], bool] | None = None,
           on_batch: Callable[[list], bool | None] | None = None, *,
           presence: Callable[[], list[bool | None] | None] | None = None,
           on_gone: Callable[[int, int], None] | None = None,
           check_every: float = PRESENCE_EVERY, timeout_ms: int = 50) -> str:
    """The one poll-then-check-presence loop (see Tracer.follow): `poll(timeout_ms)` gives
    each batch, whatever it holds (reports, or decoded events for `mace events`)."""
    next_check = time.monotonic() + check_every
    reported: set[int] = set()
    while until is None or not until():
        batch = poll(timeout_ms)
        if on_batch is not None and on_batch(batch):
            return "done"
        if presence is None or time.monotonic() < next_check:
            continue
        next_check = time.monotonic() + check_every
        now = presence()
        if now is None:
            continue                    # the host could not be asked: nothing changed
        left = sum(1 for there in now if there)
        for i, there in enumerate(now):
            if there is False and i not in reported:
                reported.add(i)
                if on_gone is not None:
                    on_gone(i, left)
            elif there is not False:
                reported.discard(i)     # an index in use again is a new container
        if not left:
            return "gone"
    return "until"

"""Following runtime targets across restarts.

A container that restarts (`docker restart web`) gets a new network namespace, hence a new
veth: the old one is gone, and tracing it by that veth would end.  A target named through
its runtime (`docker:web`) is asked for again instead, every presence check, and once it
runs in a new namespace it is traced again, at a new container index: each incarnation
keeps its own counters (the summary shows `web`, then `web (2)`).  A stopped container is
waited for until the trace ends (--duration, --count, a signal); a removed one is not.  Targets named by PID or
namespace are not followed: a PID or a namespace does not come back.

Example::

    restarts = Restarts(topo)
    if restarts.gone(i):                 # its veth went away: wait for it
        ...
    for old, new in restarts.check():    # back in a new namespace
        tracer.update(restarts.plan(hops=False, end_at_queue=True, start_at_veth=True))
"""

from __future__ import annotations

from mace.errors import ContainerNotFound, MaceError
from mace.plan import ContainerPath, Plan
from mace.targets.netns import Target, Topology, discover, path_of
from mace.targets.runtimes import reresolve

# s an Engine API request may take while a container is waited for: the lookup runs in the
# poll loop, and a daemon that hangs must not hold up the other containers' events
LOOKUP_TIMEOUT = 0.5


class Restarts:
    """The gone runtime targets of a topology, and their new incarnations."""

    def __init__(self, topo: Topology, plan: Plan | None = None):
        self.topo = topo
        # index -> how plans name it: one index is one incarnation, so its path (with the
        # cgroup the socket segment found for it) is looked up once
        self.paths: dict[int, ContainerPath] = dict(enumerate(plan.containers)) if plan else {}
        self.waiting: dict[int, Target] = {}     # container index -> the target as last seen
        self.over: set[int] = set()              # indexes no longer traced
        self.incarnation = [1] * len(topo.containers)
        # index -> (counters, histograms) an incarnation had when its index was reset
        self.final: dict[int, tuple[dict, list[list[int]]]] = {}

    def gone(self, i: int) -> bool:
        """Container i's veth is gone; True if it is waited for (a runtime target)."""
        self.over.add(i)
        target = self.topo.containers[i].target
        if target.runtime is None:
            return False
        self.waiting[i] = target
        return True

    def check(self) -> list[tuple[int, int]]:
        """Ask the runtime for every waiting target; (old index, new index) of each that
        runs again in a new namespace, now part of the topology."""
        back = []
        for i, target in list(self.waiting.items()):
            try:
                new = reresolve(target, timeout=LOOKUP_TIMEOUT)
                # a new namespace may get the freed one's inode number: the PID tells
                if new is None or (new.pid, new.inode) == (target.pid, target.inode):
                    continue
                # its veth may not be up yet: then ask again at the next check
                found = discover([new], self.topo.uplink)
            except ContainerNotFound:
                del self.waiting[i]             # removed, not stopped: it will not come back
                continue
            except MaceError:
                continue
            if found.host_ns_inode != self.topo.host_ns_inode:
                continue                        # back on another host namespace: not ours
            self.topo.containers.append(found.containers[0])
            self.incarnation.append(self.incarnation[i] + 1)
            del self.waiting[i]
            back.append((i, len(self.topo.containers) - 1))
        return back

    def keep_counters(self, correlator, indexes: list[int]) -> None:
        """Tracer.update's on_reset: the last counters and latency histograms of the
        incarnations whose index starts afresh (no longer traced), for the summary."""
        per = correlator.counters()["containers"]
        for i in indexes:
            self.final[i] = (per[i], [correlator.histogram(i, d) for d in (0, 1)])

    def summarised(self, tracer):
        """`tracer` as the summary reads it (mace.output.summary.build): an incarnation no
        longer traced shows the counters it ended with, not its reset index's zeros."""
        return _Kept(tracer, self.final) if self.final else tracer

    def present(self, now: list[bool | None] | None) -> list[bool | None] | None:
        """Tracer.follow's presence list: a waited-for index counts as there (following goes
        on), an index no longer traced as unused."""
        if now is None:
            return None
        return [True if i in self.waiting else (None if i in self.over else there)
                for i, there in enumerate(now)]

    def plan(self, *, hops: bool, end_at_queue: bool, start_at_veth: bool,
             segment: str = "device") -> Plan:
        """The topology's plan with the indexes no longer traced left unused."""
        for i, c in enumerate(self.topo.containers):
            if i not in self.over and i not in self.paths:
                self.paths[i] = path_of(c, segment)
        paths: list[ContainerPath | None] = [
            None if i in self.over else self.paths[i] for i in range(len(self.topo.containers))]
        return Plan(paths, self.topo.uplink, hops=hops, end_at_queue=end_at_queue,
                    start_at_veth=start_at_veth, extra_uplinks=self.topo.extra_uplinks,
                    uplink_indexes=self.topo.uplink_indexes, segment=segment)

    def label(self, i: int) -> str:
        """How the summary names index i: `web`, then `web (2)` for its next incarnation."""
        name = self.topo.containers[i].target.label
        return name if self.incarnation[i] == 1 else f"{name} ({self.incarnation[i]})"


class _Kept:
    """A stopped Tracer with the counters and histograms of some indexes as they were kept
    (Restarts.keep_counters); everything else is the tracer's own."""

    def __init__(self, tracer, final: dict[int, tuple[dict, list[list[int]]]]):
        self._tracer, self._final = tracer, final
        self.correlator = _KeptCorrelator(tracer.correlator, final)

    def __getattr__(self, name):
        return getattr(self._tracer, name)

    def stats(self) -> dict:
        stats = self._tracer.stats()
        for i, (counters, _) in self._final.items():
            stats["containers"][i] = {d: {**k, "in_flight": 0} for d, k in counters.items()}
        return stats


class _KeptCorrelator:
    def __init__(self, correlator, final: dict[int, tuple[dict, list[list[int]]]]):
        self._correlator, self._final = correlator, final

    def __getattr__(self, name):
        return getattr(self._correlator, name)

    def histogram(self, container: int, direction: int) -> list[int]:
        if container in self._final:
            return self._final[container][1][direction]
        return self._correlator.histogram(container, direction)

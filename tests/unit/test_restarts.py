"""Following runtime targets across restarts (mace.targets.restarts), with the runtime and
discovery replaced by fakes (no privileges)."""

from __future__ import annotations

from mace.targets import restarts as mod
from mace.targets.netns import Container, Target, Topology, VethLink
from mace.targets.restarts import Restarts

HOST = 4026531840


def container(name, pid, inode, veth, runtime="docker") -> Container:
    t = Target(f"docker:{name}" if runtime else str(pid), f"/proc/{pid}/ns/net", inode, pid,
               name=name if runtime else None, runtime=runtime)
    link = VethLink("eth0", 2, "/proc/1/ns/net", HOST, veth, 10 + pid % 100, "docker0", True)
    return Container(t, [link])


def topology(*cs) -> Topology:
    return Topology(list(cs), "/proc/1/ns/net", HOST, "eth1", 3)


def test_a_runtime_target_is_waited_for_and_traced_again_at_a_new_index(monkeypatch):
    topo = topology(container("web", 100, 7001, "vethaaa"), container(None, 200, 7002, "vethbbb", runtime=None))
    r = Restarts(topo)
    assert not r.gone(1)                        # a PID does not come back
    assert r.gone(0)
    back = container("web", 300, 7001, "vethccc")    # the freed inode number, reused
    monkeypatch.setattr(mod, "reresolve", lambda t, timeout=None: back.target)
    monkeypatch.setattr(mod, "discover", lambda targets, uplink: topology(back))
    assert r.check() == [(0, 2)]
    assert topo.containers[2] is back and not r.waiting
    assert r.present([False, False, True]) == [None, None, True]
    plan = r.plan(hops=False, end_at_queue=True, start_at_veth=True)
    assert plan.containers[:2] == [None, None] and plan.containers[2].veth == "vethccc"
    assert [r.label(i) for i in (0, 2)] == ["web", "web (2)"]


def test_while_waiting_the_target_counts_as_there_and_nothing_changes(monkeypatch):
    topo = topology(container("web", 100, 7001, "vethaaa"))
    r = Restarts(topo)
    r.gone(0)
    same = topo.containers[0].target             # still the old process: not restarted yet
    for answer in (None, same):
        monkeypatch.setattr(mod, "reresolve", lambda t, timeout=None, a=answer: a)
        assert r.check() == []
    assert r.present([False]) == [True]          # following goes on
    assert r.present(None) is None               # the host could not be asked


def test_a_runtime_that_cannot_be_asked_now_is_asked_again_later(monkeypatch):
    from mace.errors import RuntimeUnavailable
    topo = topology(container("web", 100, 7001, "vethaaa"))
    r = Restarts(topo)
    r.gone(0)

    def down(t, timeout=None):
        raise RuntimeUnavailable("no docker socket at /run/docker.sock")
    monkeypatch.setattr(mod, "reresolve", down)
    assert r.check() == [] and 0 in r.waiting


def test_a_removed_container_is_no_longer_waited_for(monkeypatch):
    from mace.errors import ContainerNotFound
    topo = topology(container("web", 100, 7001, "vethaaa"))
    r = Restarts(topo)
    r.gone(0)

    def removed(t, timeout=None):
        raise ContainerNotFound("no docker container named 'web'")
    monkeypatch.setattr(mod, "reresolve", removed)
    assert r.check() == [] and not r.waiting and r.present([False]) == [None]


class FakeCorrelator:
    """Counters and histograms by container index, as the compiled correlator gives them."""

    def __init__(self, reports: list[int]):
        self.reports = reports

    def counters(self) -> dict:
        return {"containers": [{d: {"reports": n} for d in ("egress", "ingress")} for n in self.reports]}

    def histogram(self, container: int, direction: int) -> list[int]:
        return [self.reports[container], direction]


class FakeTracer:
    def __init__(self, correlator: FakeCorrelator):
        self.correlator, self.plan = correlator, "the plan"

    def stats(self) -> dict:
        per = self.correlator.counters()["containers"]
        for entry in per:
            for k in entry.values():
                k["in_flight"] = 1
        return {"rings": {}, "containers": per}


def test_an_incarnation_keeps_its_counters_for_the_summary_once_its_index_resets():
    r = Restarts(topology(container("web", 100, 7001, "vethaaa"), container("db", 101, 7002, "vethbbb")))
    tracer = FakeTracer(FakeCorrelator([5, 7]))
    assert r.summarised(tracer) is tracer           # nothing reset: the tracer as it is
    r.keep_counters(tracer.correlator, [0])         # Tracer.update's on_reset, then the reset
    tracer.correlator.reports = [0, 7, 6]           # (and a new incarnation at index 2)
    seen = r.summarised(tracer)
    per = seen.stats()["containers"]
    assert [k["egress"]["reports"] for k in per] == [5, 7, 6]
    assert per[0]["egress"]["in_flight"] == 0 and per[1]["egress"]["in_flight"] == 1
    assert [seen.correlator.histogram(i, 1) for i in range(3)] == [[5, 1], [7, 1], [6, 1]]
    assert seen.plan == "the plan"                  # everything else is the tracer's

"""The cgroup the socket segment binds a container's calls to (mace.targets.cgroups), on
/proc trees written by the test: cgroup v2, perf_event on a v1 hierarchy, a pod's containers
in cgroups of their own, and the cgroups that are refused."""

from __future__ import annotations

import pytest

from mace.errors import NoOwnCgroup
from mace.targets import cgroups

V2_MOUNT = "41 31 0:38 / /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw,nsdelegate\n"
V1_MOUNT = "35 31 0:32 / /sys/fs/cgroup/perf_event rw,relatime - cgroup cgroup rw,perf_event\n"


def proc(tmp_path, *, perf_hierarchy="0", mounts=V2_MOUNT, procs: dict) -> str:
    """A /proc with /proc/cgroups, self/mountinfo and PID/cgroup for `procs` (pid -> lines)."""
    root = tmp_path / "proc"
    root.mkdir()
    (root / "cgroups").write_text("#subsys_name\thierarchy\tnum_cgroups\tenabled\n"
                                  f"cpu\t0\t1\t1\nperf_event\t{perf_hierarchy}\t1\t1\n")
    for pid, lines in procs.items():
        (root / str(pid)).mkdir()
        (root / str(pid) / "cgroup").write_text("".join(f"{x}\n" for x in lines))
    (root / "self").mkdir(exist_ok=True)
    (root / "self" / "mountinfo").write_text(mounts)
    return str(root)


HOST = {"self": ["0::/system.slice/mace.service"], 1: ["0::/init.scope"]}


def test_a_docker_container_is_bound_to_its_own_cgroup(tmp_path):
    p = proc(tmp_path, procs={**HOST, 10: ["0::/system.slice/docker-ab12.scope"],
                              11: ["0::/system.slice/docker-ab12.scope"]})
    assert cgroups.own_cgroup("docker:web", [10, 11], proc=p) == "/sys/fs/cgroup/system.slice/docker-ab12.scope"


def test_a_pods_containers_are_bound_by_the_pods_cgroup(tmp_path):
    # the sandbox (pause) and two containers, each in a cgroup of its own below the pod's
    pod = "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod7f.slice"
    p = proc(tmp_path, procs={**HOST, 20: [f"0::{pod}/cri-containerd-pause.scope"],
                              21: [f"0::{pod}/cri-containerd-web.scope"],
                              22: [f"0::{pod}/cri-containerd-sidecar.scope"]})
    assert cgroups.own_cgroup("pod:shop/web", [20, 21, 22], proc=p) == "/sys/fs/cgroup" + pod


def test_perf_event_on_a_v1_hierarchy_binds_there(tmp_path):
    p = proc(tmp_path, perf_hierarchy="7", mounts=V2_MOUNT + V1_MOUNT,
             procs={"self": ["7:perf_event:/", "0::/user.slice"], 1: ["7:perf_event:/", "0::/init.scope"],
                    10: ["7:perf_event:/docker/ab12", "0::/system.slice/docker-ab12.scope"]})
    assert cgroups.perf_hierarchy(p) == cgroups.Hierarchy("7", "/sys/fs/cgroup/perf_event")
    assert cgroups.own_cgroup("docker:web", [10], proc=p) == "/sys/fs/cgroup/perf_event/docker/ab12"


@pytest.mark.parametrize("paths, holds", [
    (["/"], "mace"),                                        # the root
    (["/system.slice/mace.service"], "mace"),               # mace's own
    (["/a/x", "/b/y"], "mace"),                             # spread: only the root holds both
    (["/init.scope"], "the host's init"),
    (["/system.slice/docker-ab12.scope", "/system.slice/cron.service"], "mace"),   # a slice
])
def test_a_cgroup_that_also_holds_mace_or_init_is_refused(tmp_path, paths, holds):
    p = proc(tmp_path, procs={**HOST, **{30 + i: [f"0::{x}"] for i, x in enumerate(paths)}})
    with pytest.raises(NoOwnCgroup, match=f"holds {holds}"):
        cgroups.own_cgroup("netns:1", [30 + i for i in range(len(paths))], proc=p)


def test_a_cgroup_that_holds_processes_of_another_namespace_is_refused(tmp_path):
    # two containers sharing one network namespace (--network container:X) have only the
    # host's slice in common, where the host's services run too
    p = proc(tmp_path, procs={"self": ["0::/user.slice/session-1.scope"], 1: ["0::/init.scope"],
                              10: ["0::/system.slice/docker-ab12.scope"], 11: ["0::/system.slice/docker-cd34.scope"],
                              12: ["0::/system.slice/cron.service"]})
    (tmp_path / "proc" / "12" / "comm").write_text("cron\n")
    with pytest.raises(NoOwnCgroup, match=r"cgroup /system.slice also holds PID 12 \(cron\), which is not in"):
        cgroups.own_cgroup("docker:web", [10, 11], proc=p)
    # a process of the container itself is no outsider
    assert cgroups.own_cgroup("docker:web", [10, 11, 12], proc=p) == "/sys/fs/cgroup/system.slice"


def test_a_cgroup_outside_maces_cgroup_namespace_is_refused(tmp_path):
    # mace in a container of its own cgroup namespace (a DaemonSet's default on cgroup v2)
    p = proc(tmp_path, procs={**HOST, 10: ["0::/../../kubepods.slice/pod7f/cri-containerd-web.scope"]})
    with pytest.raises(NoOwnCgroup, match=r"lies outside mace's cgroup namespace"):
        cgroups.own_cgroup("pod:shop/web", [10], proc=p)


def test_no_process_or_no_hierarchy_is_refused(tmp_path):
    p = proc(tmp_path, procs=HOST)
    with pytest.raises(NoOwnCgroup, match="no process runs"):
        cgroups.own_cgroup("netns:1", [99], proc=p)
    (tmp_path / "proc" / "self" / "mountinfo").write_text("")
    with pytest.raises(NoOwnCgroup, match="no cgroup hierarchy with perf_event"):
        cgroups.own_cgroup("netns:1", [1], proc=p)


def test_the_common_cgroup_is_the_deepest_holding_all():
    assert cgroups.common(["/a/b/c", "/a/b/d/e"]) == "/a/b"
    assert cgroups.common(["/a/b"]) == "/a/b"
    assert cgroups.common(["/ab", "/a"]) == "/"
    assert cgroups.common(["/"]) == "/"

"""`mace trace --netns docker:NAME` and `podman:NAME` against real runtimes: a private
dockerd and a private Podman API service (tests/system/runtimes.py), containers from a
busybox image made on the spot, pinging a peer the test creates, and mace resolving each
container by name (or ID prefix) through the runtime's API socket."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
from helpers import one_line_error
from runtimes import (
    DISCOVERY,
    DOCKER_BRIDGE,
    DOCKER_USER_BRIDGE,
    PODMAN_BRIDGE,
    UPLINK,
    Session,
    Trace,
    links,
    names_container,
    resolve_peer,
    trace_once,
)

from mace.errors import ContainerNotFound, ContainerNotRunning, NoContainerNetwork, RuntimeUnavailable

N = 5                   # pings per container
ECHO_LEN = 84           # busybox ping's default 56 bytes, plus the IPv4 and ICMP headers
WAIT = 20


@pytest.fixture(scope="module")
def runtime_session():
    """The runtimes of this module, started when a test first needs one; after its last test
    (not at the end of the whole run: the other system tests run without them) everything
    they and the tests made is removed, and checked to be gone."""
    session = Session()
    yield session
    left = session.teardown()
    assert not left, f"left behind by the runtime tests: {left}"


@pytest.fixture
def docker(_gate_system, runtime_session):
    rt = runtime_session.runtime("docker")
    yield rt
    rt.remove_containers()


@pytest.fixture
def podman(_gate_system, runtime_session):
    rt = runtime_session.runtime("podman")
    yield rt
    rt.remove_containers()


@pytest.fixture
def mace():
    """Start `mace trace` runs that are killed if a test leaves one running."""
    started: list[Trace] = []

    def start(*args) -> Trace:
        t = Trace(*args)
        started.append(t)
        return t

    yield start
    for t in started:
        t.kill()


def common(rt) -> tuple[str, ...]:
    return ("--runtime-socket", rt.socket, "--uplink", UPLINK)


def discovered(lines: list[str]) -> dict[int, tuple[str, str | None, str]]:
    """Discovery lines as {netns inode: (host-side veth, bridge, uplink)}."""
    out = {}
    for line in lines:
        m = DISCOVERY.match(line)
        assert m, line
        out[int(m[1])] = (m[4], m[5], m[6])
    return out


def count(reports: list[dict], name: str, direction: str, *, after: float = 0,
          before: float = float("inf")) -> int:
    """Reports of container `name` in `direction` whose packets entered in (after, before)."""
    return sum(1 for r in reports if names_container(r, name) and r["dir"] == direction
               and after < r["ts"] < before)


def assert_complete(reports: list[dict], name: str, netns: int, n: int = N) -> None:
    """n egress and n ingress reports for container `name`, all from namespace netns, each
    an echo request or reply."""
    mine = [r for r in reports if names_container(r, name)]
    assert {r["netns"] for r in mine} == {netns}, (name, netns, mine)
    for d in ("egress", "ingress"):
        got = [r for r in mine if r["dir"] == d]
        assert len(got) == n, (name, d, len(got), mine)
        assert all(r["len"] == ECHO_LEN and r["latency_ns"] > 0 for r in got), got


def wait_reports(t: Trace, pred, what: str, timeout: float = WAIT) -> None:
    def ok(lines):
        return pred(t.reports())

    if not t.outs.wait(ok, timeout, t.proc, step=0.1):
        pytest.fail(f"no {what} within {timeout} s (exit {t.proc.poll()}):\n"
                    + "\n".join(t.outs.lines) + "\n" + t.text())


# -- Docker ---------------------------------------------------------------------------------

def test_docker_containers_by_name_on_two_networks(docker, mace):
    """Two containers on the default bridge and one on a user-defined network, traced by
    name at once while each pings the peer: every report names its container, and each
    container has all its echo requests and replies."""
    net = docker.network()
    names = ["c1", "c2", "c3"]
    docker.container("c1")
    docker.container("c2")
    docker.container("c3", "--network", net)
    inodes = {c: docker.sandbox(c) for c in names}
    resolve_peer()
    t = mace(*[a for c in names for a in ("--netns", f"docker:{c}")], *common(docker),
             "--count", 2 * 3 * N, "--duration", 60, "-f", "jsonl")
    paths = discovered(t.ready(3))
    assert set(paths) == set(inodes.values()), (paths, inodes)
    for c, bridge in (("c1", DOCKER_BRIDGE), ("c2", DOCKER_BRIDGE), ("c3", DOCKER_USER_BRIDGE)):
        assert paths[inodes[c]][1:] == (bridge, UPLINK), (c, paths)
    procs = [(c, docker.popen_ping(c, N)) for c in names]
    for c, p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0 and f"{N} packets received" in out, (c, out)
    assert t.finish(WAIT) == 0, t.text()
    reports = t.reports()
    assert len(reports) == 2 * 3 * N, reports
    assert all(sum(names_container(r, c) for c in names) == 1 for r in reports), reports
    for c in names:
        assert_complete(reports, c, inodes[c])


def test_docker_container_by_id_prefix(docker, mace):
    cid = docker.container("byid")
    inode = docker.sandbox("byid")
    resolve_peer()
    t = mace("--netns", f"docker:{cid[:12]}", *common(docker), "--count", 2 * N, "--duration", 60,
             "-f", "jsonl")
    assert set(discovered(t.ready(1))) == {inode}
    docker.exec_ping("byid", N)
    assert t.finish(WAIT) == 0, t.text()
    reports = t.reports()
    assert len(reports) == 2 * N and {r["netns"] for r in reports} == {inode}, reports
    # named by the container's name, not by the id prefix it was asked by
    assert all(names_container(r, "byid") for r in reports), reports


def test_docker_container_stopped_mid_trace(docker, mace):
    """One of two traced containers stops: mace says so and goes on with the other."""
    docker.container("s1")
    docker.container("s2")
    inodes = {c: docker.sandbox(c) for c in ("s1", "s2")}
    resolve_peer()
    t = mace("--netns", "docker:s1", "--netns", "docker:s2", *common(docker),
             "--count", 4 * N, "--duration", 90, "-f", "jsonl")
    t.ready(2)
    docker.exec_ping("s1", N)
    wait_reports(t, lambda rs: count(rs, "s1", "egress") == N and count(rs, "s1", "ingress") == N,
                 "reports of s1's pings")
    docker("stop", "-t", "0", "s1")
    t.wait_err(r"(?i)\bs1\b.*\bstop|\bstop.*\bs1\b", timeout=WAIT)
    assert t.proc.poll() is None, "mace ended when one of two containers stopped:\n" + t.text()
    docker.exec_ping("s2", N)
    assert t.finish(WAIT) == 0, t.text()
    reports = t.reports()
    assert_complete(reports, "s1", inodes["s1"])
    assert_complete(reports, "s2", inodes["s2"])


def test_docker_host_network_container_is_refused(docker):
    docker.container("hostnet", "--network", "host")
    r = trace_once("--netns", "docker:hostnet", *common(docker))
    one_line_error(r, NoContainerNetwork.exit_code, r"docker container 'hostnet' uses the host's network")


def test_docker_no_such_container_suggests_the_near_match(docker):
    docker.container("probe-a")
    r = trace_once("--netns", "docker:prob-a", *common(docker))
    line = one_line_error(r, ContainerNotFound.exit_code, r"\bdocker\b.*'prob-a'")
    assert re.search(r"did you mean .*probe-a", line), line


def test_docker_container_not_running(docker):
    docker.container("idle", start=False)
    r = trace_once("--netns", "docker:idle", *common(docker))
    one_line_error(r, ContainerNotRunning.exit_code, r"'idle' is not running")


def test_runtime_socket_missing(tmp_path, _gate_system):
    sock = tmp_path / "no-docker.sock"
    r = trace_once("--netns", "docker:web", "--runtime-socket", sock, "--uplink", "lo")
    one_line_error(r, RuntimeUnavailable.exit_code, rf"\bdocker\b.*{re.escape(str(sock))}")


def test_docker_restart_is_followed(docker, mace):
    """Traced by name, a container that restarts (a new network namespace, a new veth) is
    followed: reports from both incarnations.  They are told apart by time, not by netns: the
    kernel reuses a freed namespace's inode number, and the new namespace often gets it."""
    name = "restarts"
    docker.container(name)
    first_pid, first_ns = docker.pid(name), docker.sandbox(name)
    resolve_peer()
    t = mace("--netns", f"docker:{name}", *common(docker), "--duration", 120, "-f", "jsonl")
    t.ready(1)
    docker.exec_ping(name, N)
    wait_reports(t, lambda rs: count(rs, name, "egress") == N and count(rs, name, "ingress") == N,
                 "reports of the first incarnation")
    restart = time.time()
    docker("restart", "-t", "0", name)
    assert docker.pid(name) != first_pid
    second_ns = docker.sandbox(name)
    # mace learns of the restart by its presence check: single pings until it reports one
    # of the new incarnation's packets, then N that must all be there
    deadline = time.monotonic() + 30
    while count(t.reports(), name, "ingress", after=restart) == 0:
        assert t.proc.poll() is None, "mace ended when the container restarted:\n" + t.text()
        assert time.monotonic() < deadline, "no report from the restarted container:\n" + t.text()
        docker.exec_ping(name, 1)
        time.sleep(0.3)
    warm = {d: count(t.reports(), name, d, after=restart) for d in ("egress", "ingress")}
    docker.exec_ping(name, N)
    wait_reports(t, lambda rs: all(count(rs, name, d, after=restart) >= warm[d] + N for d in warm),
                 "reports of the second incarnation")
    t.proc.send_signal(signal.SIGINT)
    assert t.finish(WAIT) == 0, t.text()
    reports = t.reports()
    assert {r["netns"] for r in reports if r["ts"] < restart} == {first_ns}, reports
    assert {r["netns"] for r in reports if r["ts"] > restart} == {second_ns}, reports
    for d in ("egress", "ingress"):
        assert count(reports, name, d, before=restart) == N, (d, reports)
        assert count(reports, name, d, after=restart) == warm[d] + N, (d, reports)


# -- Podman ---------------------------------------------------------------------------------

def test_podman_container_by_name(podman, mace):
    podman.container("p1")
    inode = podman.sandbox("p1")
    resolve_peer()
    t = mace("--netns", "podman:p1", *common(podman), "--count", 2 * N, "--duration", 60,
             "-f", "jsonl")
    paths = discovered(t.ready(1))
    assert set(paths) == {inode} and paths[inode][1:] == (PODMAN_BRIDGE, UPLINK), paths
    podman.exec_ping("p1", N)
    assert t.finish(WAIT) == 0, t.text()
    reports = t.reports()
    assert len(reports) == 2 * N, reports
    assert_complete(reports, "p1", inode)


def test_podman_host_network_container_is_refused(podman):
    podman.container("ph", "--network", "host")
    r = trace_once("--netns", "podman:ph", *common(podman))
    one_line_error(r, NoContainerNetwork.exit_code, r"podman container 'ph' uses the host's network")


def test_the_runtimes_made_no_default_bridge(docker):
    """A guard on the isolation: the private daemon uses the bridge made for it and made no
    docker0 (nor Podman a podman0) that would outlive the run or clash with a real one."""
    present = links()
    assert DOCKER_BRIDGE in present, sorted(present)
    assert "docker0" not in present and "podman0" not in present, sorted(present)


def test_the_service_names_a_docker_containers_namespace(docker, tmp_path):
    """`mace serve` knows its clients by their namespace only: it asks the runtime which
    container that is, and `status` (and the reports) name it."""
    import json
    import subprocess
    import sys

    name = "served"
    docker.container(name)
    sock = str(tmp_path / "mace.sock")
    serve = subprocess.Popen([sys.executable, "-m", "mace", "serve", "--socket", sock, "--state-dir",
                              str(tmp_path / "state"), "--runtime-socket", docker.socket, "--uplink", UPLINK],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            assert serve.poll() is None and time.monotonic() < deadline, serve.stderr.read()
            time.sleep(0.1)
        inside = ["nsenter", f"--net=/proc/{docker.pid(name)}/ns/net", "--",
                  sys.executable, "-m", "mace"]
        on = subprocess.run([*inside, "on", "--socket", sock], capture_output=True, text=True, timeout=30)
        assert on.returncode == 0 and f"docker container {name}" in on.stdout, on
        st = subprocess.run([*inside, "status", "--json", "--socket", sock], capture_output=True,
                            text=True, timeout=30)
        reply = json.loads(st.stdout)
        assert (reply["state"], reply["container"], reply["runtime"]) == ("enabled", name, "docker"), reply
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=30)


def test_containerd_task_by_namespace_and_id(docker, mace):
    """`containerd:NAMESPACE/ID` through a real containerd: the one the test's dockerd runs,
    whose containers are tasks in its `moby` namespace (with ctr, as for any containerd)."""
    cid = docker.container("ctd")
    inode = docker.sandbox("ctd")
    sock = os.path.join(docker.root, "exec", "containerd", "containerd.sock")
    assert os.path.exists(sock), f"dockerd's containerd listens elsewhere: {os.listdir(os.path.dirname(sock))}"
    resolve_peer()
    t = mace("--netns", f"containerd:moby/{cid}", "--runtime-socket", sock, "--uplink", UPLINK,
             "--count", 2 * N, "--duration", 60, "-f", "jsonl")
    assert set(discovered(t.ready(1))) == {inode}
    docker.exec_ping("ctd", N)
    assert t.finish(WAIT) == 0, t.text()
    reports = t.reports()
    assert len(reports) == 2 * N and {r["netns"] for r in reports} == {inode}, reports
    # containerd names a container by its id only
    assert all(names_container(r, cid) for r in reports), reports
    # a task that is not there: one line, its exit status
    r = trace_once("--netns", "containerd:moby/nosuchtask", "--runtime-socket", sock, "--uplink", UPLINK)
    one_line_error(r, ContainerNotFound.exit_code, r"nosuchtask")

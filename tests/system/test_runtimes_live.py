"""`mace trace --netns docker:NAME` and `podman:NAME` against real runtimes: a private
dockerd and a private Podman API service (tests/system/runtimes.py), containers from a
busybox image made on the spot, pinging a peer the test creates, and mace resolving each
container by name (or ID prefix) through the runtime's API socket."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest
from helpers import one_line_error, summary_rows
from runtimes import (
    DISCOVERY,
    DOCKER_BRIDGE,
    DOCKER_USER_BRIDGE,
    PODMAN_BRIDGE,
    UPLINK,
    Session,
    Trace,
    busybox_ping,
    links,
    names_container,
    resolve_peer,
    run,
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


# -- the cases of every runtime --------------------------------------------------------------

def traced_by_name(rt, mace, traced: dict[str, str], untraced: tuple[str, ...] = ()) -> None:
    """Containers traced by name at once (`traced`: name -> the bridge its veth is on) while
    each pings the peer, and the `untraced` ones too: every report names its container, each
    traced container has all its echo requests and replies, and no report is of another."""
    names = [*traced, *untraced]
    inodes = {c: rt.sandbox(c) for c in names}
    resolve_peer()
    t = mace(*[a for c in traced for a in ("--netns", f"{rt.name}:{c}")], *common(rt),
             "--count", 2 * len(traced) * N, "--duration", 60, "-f", "jsonl")
    paths = discovered(t.ready(len(traced)))
    assert set(paths) == {inodes[c] for c in traced}, (paths, inodes)
    for c, bridge in traced.items():
        assert paths[inodes[c]][1:] == (bridge, UPLINK), (c, paths)
    procs = [(c, rt.popen_ping(c, N)) for c in names]
    for c, p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0 and f"{N} packets received" in out, (c, out)
    # (--count ends it once the traced ones' reports are all there: the untraced pinged
    # meanwhile, and a report of theirs would have taken one of those places)
    assert t.finish(WAIT) == 0, t.text()
    reports = t.reports()
    assert len(reports) == 2 * len(traced) * N, reports
    assert all(sum(names_container(r, c) for c in traced) == 1 for r in reports), reports
    assert not {r["netns"] for r in reports} & {inodes[c] for c in untraced}, reports
    for c in traced:
        assert_complete(reports, c, inodes[c])


def stopped_mid_trace(rt, mace, a: str, b: str) -> None:
    """One of two traced containers (a) stops: mace says so and goes on with the other."""
    rt.container(a)
    rt.container(b)
    inodes = {c: rt.sandbox(c) for c in (a, b)}
    resolve_peer()
    t = mace("--netns", f"{rt.name}:{a}", "--netns", f"{rt.name}:{b}", *common(rt),
             "--count", 4 * N, "--duration", 90, "-f", "jsonl")
    t.ready(2)
    rt.exec_ping(a, N)
    wait_reports(t, lambda rs: count(rs, a, "egress") == N and count(rs, a, "ingress") == N,
                 f"reports of {a}'s pings")
    rt("stop", "-t", "0", a)
    t.wait_err(rf"(?i)\b{a}\b.*\bstop|\bstop.*\b{a}\b", timeout=WAIT)
    assert t.proc.poll() is None, "mace ended when one of two containers stopped:\n" + t.text()
    rt.exec_ping(b, N)
    assert t.finish(WAIT) == 0, t.text()
    reports = t.reports()
    assert_complete(reports, a, inodes[a])
    assert_complete(reports, b, inodes[b])


def restart_is_followed(rt, mace, tmp_path) -> None:
    """Traced by name, a container that restarts (a new network namespace, a new veth) is
    followed: mace says it runs again, reports come from both incarnations, and the summary
    (text and JSON) keeps their counts apart, `NAME` and `NAME (2)`.  Reports are told apart
    by time, not by netns: the kernel reuses a freed namespace's inode number, and the new
    namespace often gets it."""
    name = "restarts"
    rt.container(name)
    first_pid, first_ns = rt.pid(name), rt.sandbox(name)
    resolve_peer()
    summary_json = tmp_path / "summary.json"
    t = mace("--netns", f"{rt.name}:{name}", *common(rt), "--duration", 120, "-f", "jsonl",
             "--summary-json", summary_json)
    t.ready(1)
    rt.exec_ping(name, N)
    wait_reports(t, lambda rs: count(rs, name, "egress") == N and count(rs, name, "ingress") == N,
                 "reports of the first incarnation")
    restart = time.time()
    rt("restart", "-t", "0", name)
    assert rt.pid(name) != first_pid
    second_ns = rt.sandbox(name)
    # mace learns of the restart by its presence check, and says so once the new
    # incarnation is traced: its pings start then (see README Limits: a runtime that gives
    # the new veth the old one's name has the packets before that counted as the old one's)
    (again,) = t.wait_err(r"runs again", timeout=30)
    assert t.proc.poll() is None, "mace ended when the container restarted:\n" + t.text()
    assert re.fullmatch(rf"mace: {name} runs again, in a new network namespace: netns {second_ns} "
                        rf"\({rt.name} {name}, .*\): .*; traced as {re.escape(name)} \(2\)", again), again
    rt.exec_ping(name, N)
    wait_reports(t, lambda rs: all(count(rs, name, d, after=restart) >= N for d in ("egress", "ingress")),
                 "reports of the second incarnation")
    t.proc.send_signal(signal.SIGINT)
    assert t.finish(WAIT) == 0, t.text()
    reports = t.reports()
    assert {r["netns"] for r in reports if r["ts"] < restart} == {first_ns}, reports
    assert {r["netns"] for r in reports if r["ts"] > restart} == {second_ns}, reports
    want = {name: {"egress": N, "ingress": N}, f"{name} (2)": {"egress": N, "ingress": N}}
    for d in ("egress", "ingress"):
        assert count(reports, name, d, before=restart) == N, (d, reports)
        assert count(reports, name, d, after=restart) == N, (d, reports)
    # the summary: a row per incarnation and direction, each with its own count
    assert summary_rows(t.errs.lines) == [(n, d, k) for n, ks in want.items() for d, k in ks.items()], t.text()
    rows = json.loads(summary_json.read_text())["containers"]
    assert [(r["target"], r["netns"]) for r in rows] == [(name, first_ns), (f"{name} (2)", second_ns)], rows
    assert {r["target"]: {d: r[d]["count"] for d in ("egress", "ingress")} for r in rows} == want, rows


def socket_segment_by_name(rt, mace) -> None:
    """--segment socket on a container named by its runtime: the runtime's own cgroup of the
    container is found, and a ping the runtime execs in it (which joins that cgroup) gives a
    report per echo each way, from its send call and to its receive call; a ping from the
    host's cgroup into the same network namespace is not sampled."""
    name = "sock"
    rt.container(name)
    inode = rt.sandbox(name)
    resolve_peer()
    rt.exec_ping(name, 1)           # the container's gateway resolved (README: Limits)
    t = mace("--netns", f"{rt.name}:{name}", *common(rt), "--segment", "socket",
             "--count", 2 * N, "--duration", 60, "-f", "jsonl")
    assert set(discovered(t.ready(1))) == {inode}
    # first a ping in its network namespace from the host's cgroup: its packets cross the
    # veth, its calls are no container process's (had they been reported, --count would
    # end the trace before the container's pings are all in)
    host = run(["nsenter", "-t", str(rt.pid(name)), "-n", *busybox_ping(3, "0.05")], check=False, timeout=30)
    assert host.returncode == 0, host.stdout + host.stderr
    rt.exec_ping(name, N)
    assert t.finish(WAIT) == 0, t.text()
    reports = t.reports()
    assert {r["segment"] for r in reports} == {"socket"}, reports
    assert_complete(reports, name, inode)


# -- Docker ---------------------------------------------------------------------------------

def test_docker_containers_by_name_on_two_networks(docker, mace):
    """Two containers on the default bridge and one on a user-defined network, traced by
    name at once while each pings the peer: every report names its container, and each
    container has all its echo requests and replies."""
    net = docker.network()
    docker.container("c1")
    docker.container("c2")
    docker.container("c3", "--network", net)
    traced_by_name(docker, mace, {"c1": DOCKER_BRIDGE, "c2": DOCKER_BRIDGE, "c3": DOCKER_USER_BRIDGE})


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


def test_docker_container_by_name_with_the_socket_segment(docker, mace):
    socket_segment_by_name(docker, mace)


def test_docker_container_stopped_mid_trace(docker, mace):
    stopped_mid_trace(docker, mace, "s1", "s2")


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


def test_docker_restart_is_followed(docker, mace, tmp_path):
    restart_is_followed(docker, mace, tmp_path)


# -- Podman ---------------------------------------------------------------------------------

def test_podman_containers_by_name(podman, mace):
    """Two containers traced by name, a third pinging beside them untraced: each traced one
    gets exactly its own reports, the third none."""
    for c in ("p1", "p2", "p3"):
        podman.container(c)
    traced_by_name(podman, mace, {"p1": PODMAN_BRIDGE, "p2": PODMAN_BRIDGE}, untraced=("p3",))


def test_podman_container_by_name_with_the_socket_segment(podman, mace):
    socket_segment_by_name(podman, mace)


def test_podman_container_stopped_mid_trace(podman, mace):
    stopped_mid_trace(podman, mace, "ps1", "ps2")


def test_podman_restart_is_followed(podman, mace, tmp_path):
    restart_is_followed(podman, mace, tmp_path)


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

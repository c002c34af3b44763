"""Targets named through a container runtime (mace.targets.runtimes), without root: a fake
Engine API on a Unix socket for docker and podman, canned ctr and crictl output for containerd
and pods.  The container's process is this test's own: its namespace can be opened unprivileged."""

from __future__ import annotations

import errno
import http.server
import json
import os
import re
import shutil
import socket
import socketserver
import subprocess
import tempfile
import threading

import pytest

import mace
from mace import cli
from mace.errors import (
    EXIT_CODES,
    ContainerNotFound,
    ContainerNotRunning,
    NoContainerNetwork,
    ResourceError,
    RuntimeUnavailable,
    TargetNotFound,
    UsageError,
)
from mace.targets import netns, runtimes
from mace.targets.netns import Container, Target, Topology, VethLink
from mace.targets.runtimes import Socket, reresolve, resolve, runtime_of, socket_for

PID = os.getpid()
OWN_NS = f"/proc/{PID}/ns/net"
WEB_ID = "3fa1b2c3d4e5" + "0" * 52
DB_ID = "abcd1234ef56" + "1" * 52
ABBA_ID = "abba00000000" + "2" * 52


def container(name, cid, *, running=True, pid=PID, mode="bridge", status=None, sandbox="", labels=None):
    """A container as `docker inspect` shows it (the fields mace reads, and a few more)."""
    return {"Id": cid, "Name": f"/{name}", "Created": "2026-12-04T03:00:00Z",
            "State": {"Status": status or ("running" if running else "exited"), "Running": running,
                      "Paused": False, "Restarting": False, "Pid": pid if running else 0, "ExitCode": 0},
            "HostConfig": {"NetworkMode": mode},
            "Config": {"Labels": labels or {}},
            "NetworkSettings": {"SandboxKey": sandbox, "Networks": {}}}


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):     # the client address of an AF_UNIX peer is ''
        pass

    def _send(self, status, body, headers=()):
        raw = json.dumps(body).encode() if not isinstance(body, bytes) else body
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self):   # noqa: N802 - http.server's name
        fake = self.server.fake
        fake.requests.append(self.path)
        if self.path == "/_ping":
            return self._send(200, b"OK", [("API-Version", fake.api_version)] if fake.api_version else [])
        m = re.fullmatch(r"/v(1\.\d+)(/.*)", self.path)
        if not m:
            return self._send(404, {"message": "page not found"})
        version, rest = m.groups()
        if fake.min_version and int(version.split(".")[1]) < int(fake.min_version.split(".")[1]):
            return self._send(400, {"message": f"client version {version} is too old. Minimum supported "
                                               f"API version is {fake.min_version}"})
        if rest == "/containers/json?all=1":
            if fake.list_status != 200:
                return self._send(fake.list_status, {"message": "daemon is sad"})
            return self._send(200, [{"Id": c["Id"], "Names": [c["Name"]], "State": c["State"]["Status"]}
                                    for c in fake.containers])
        m = re.fullmatch(r"/containers/([^/]+)/json", rest)
        if m:
            found = [c for c in fake.containers if c["Id"] == m.group(1)]
            if found:
                return self._send(200, found[0])
            return self._send(404, {"message": f"No such container: {m.group(1)}"})
        return self._send(404, {"message": "page not found"})


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class FakeEngine:
    """The Engine API's /_ping, container list and inspect, with canned containers."""

    def __init__(self, path, containers, api_version="1.45", min_version=None):
        self.path, self.containers = path, list(containers)
        self.api_version, self.min_version = api_version, min_version
        self.list_status = 200
        self.requests: list[str] = []
        self.server = _Server(path, _Handler)
        self.server.fake = self
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def sockdir():
    # a short directory: a Unix socket's path is at most 107 bytes
    d = tempfile.mkdtemp(prefix="mace-rtu-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def engine(sockdir, monkeypatch):
    """A fake docker with web (running), db (running), old (exited); no DOCKER_HOST."""
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    monkeypatch.delenv("CONTAINER_HOST", raising=False)
    fakes = []

    def start(containers=None, name="docker.sock", **kw):
        if containers is None:
            containers = [container("web", WEB_ID), container("db", DB_ID),
                          container("old", ABBA_ID, running=False)]
        fake = FakeEngine(os.path.join(sockdir, name), containers, **kw)
        fakes.append(fake)
        return fake

    yield start
    for f in fakes:
        f.close()


# -- docker and podman: finding the container --------------------------------------------

def test_a_name_gives_the_containers_process_namespace_and_its_names(engine):
    fake = engine()
    t = resolve("docker:web", fake.path)
    assert (t.spec, t.path, t.pid, t.inode) == ("docker:web", OWN_NS, PID, os.stat(OWN_NS).st_ino)
    assert (t.name, t.runtime, t.container_id, t.runtime_socket) == ("web", "docker", WEB_ID, fake.path)
    assert (t.pod, t.k8s_namespace, t.shares) == (None, None, None)
    assert t.label == "web"


def test_netns_resolve_and_the_library_face_dispatch_runtime_specs(engine):
    fake = engine()
    assert netns.resolve(" docker:web ", runtime_socket=fake.path).container_id == WEB_ID
    assert mace.resolve("docker:db", fake.path).label == "db"


def test_podman_speaks_the_same_api_and_names_itself(engine):
    fake = engine(name="podman.sock")
    t = resolve("podman:web", fake.path)
    assert (t.runtime, t.label) == ("podman", "web")
    with pytest.raises(ContainerNotFound, match=r"^no podman container named 'wbe'$") as e:
        resolve("podman:wbe", fake.path)
    assert e.value.hint == "did you mean web?"


@pytest.mark.parametrize("ref", [WEB_ID, WEB_ID[:12], "3f", "/web"])
def test_a_full_id_an_id_prefix_or_docker_s_slashed_name(engine, ref):
    assert resolve(f"docker:{ref}", engine().path).name == "web"


def test_a_name_wins_over_an_id_prefix_as_in_docker(engine):
    fake = engine([container("abba", WEB_ID), container("other", ABBA_ID)])
    assert resolve("docker:abba", fake.path).container_id == WEB_ID


def test_an_ambiguous_prefix_names_the_candidates(engine):
    fake = engine([container("web", "ab" + "0" * 62), container("db", "ab" + "1" * 62)])
    with pytest.raises(ContainerNotFound, match="id prefix 'ab' is ambiguous: 2 containers") as e:
        resolve("docker:ab", fake.path)
    assert "ab0000000000 (web)" in e.value.hint and "ab1111111111 (db)" in e.value.hint


def test_an_unknown_name_suggests_the_near_ones(engine):
    fake = engine()
    with pytest.raises(ContainerNotFound) as e:
        resolve("docker:wbe", fake.path)
    assert e.value.oneline() == "no docker container named 'wbe' (did you mean web?)"
    with pytest.raises(ContainerNotFound) as e:
        resolve("docker:zzzzzz", fake.path)
    assert e.value.hint == "`docker ps -a` lists the containers"


def test_a_mistyped_id_prefix_suggests_the_id(engine):
    with pytest.raises(ContainerNotFound, match="with id or name '3fa2'") as e:
        resolve("docker:3fa2", engine().path)
    assert e.value.hint == f"did you mean {WEB_ID[:12]}?"


def test_no_containers_at_all(engine):
    with pytest.raises(ContainerNotFound) as e:
        resolve("docker:web", engine([]).path)
    assert e.value.hint == "docker has no containers"


def test_a_stopped_container_is_not_running(engine):
    fake = engine()
    with pytest.raises(ContainerNotRunning) as e:
        resolve("docker:old", fake.path)
    assert e.value.oneline() == ("docker container 'old' is not running (exited) "
                                 "(start it, or trace it by PID once it runs)")
    fake.containers.append(container("new", "c" * 64, running=False, status="created"))
    with pytest.raises(ContainerNotRunning, match=r"\(created\)$"):
        resolve("docker:new", fake.path)


def test_host_and_none_networks_have_nothing_to_measure(engine):
    fake = engine([container("h", WEB_ID, mode="host"), container("n", DB_ID, mode="none")])
    with pytest.raises(NoContainerNetwork) as e:
        resolve("docker:h", fake.path)
    assert e.value.oneline().startswith("docker container 'h' uses the host's network: there is no "
                                        "container network to measure (it shares the host's devices")
    with pytest.raises(NoContainerNetwork) as e:
        resolve("docker:n", fake.path)
    assert str(e.value) == "docker container 'n' has no network (--network none): nothing leaves it"


@pytest.mark.parametrize("other", ["db", DB_ID])
def test_a_container_in_another_s_network_shares_its_namespace(engine, other):
    fake = engine([container("web", WEB_ID, mode=f"container:{other}"),
                   container("db", DB_ID, sandbox="/proc/self/ns/net")])
    t = resolve("docker:web", fake.path)
    assert (t.name, t.shares, t.container_id, t.path) == ("web", "db", WEB_ID, OWN_NS)


def test_sharing_the_network_of_a_host_network_container(engine):
    fake = engine([container("web", WEB_ID, mode="container:db"), container("db", DB_ID, mode="host")])
    with pytest.raises(NoContainerNetwork, match="'web' uses the host's network \\(it shares the network "
                                                 "of 'db'\\)"):
        resolve("docker:web", fake.path)


def test_sharing_the_network_of_a_container_docker_no_longer_lists(engine):
    fake = engine([container("web", WEB_ID, mode="container:" + "9" * 64)])
    assert resolve("docker:web", fake.path).shares == "9" * 12


def test_the_pid_s_namespace_else_the_runtime_s_sandbox_file(engine):
    gone = _free_pid()
    fake = engine([container("web", WEB_ID, pid=gone, sandbox="/proc/self/ns/net"),
                   container("db", DB_ID, pid=gone)])
    t = resolve("docker:web", fake.path)
    assert t.path == "/proc/self/ns/net" and t.inode == os.stat(OWN_NS).st_ino
    with pytest.raises(TargetNotFound, match=f"runs as PID {gone}, which mace's PID namespace does not have"):
        resolve("docker:db", fake.path)


def _free_pid() -> int:
    pid = 4_000_000
    while os.path.exists(f"/proc/{pid}"):
        pid += 1
    return pid


def test_kubernetes_labels_give_pod_and_namespace(engine):
    labels = {"io.kubernetes.pod.name": "shop-7d9", "io.kubernetes.pod.namespace": "prod"}
    t = resolve("docker:web", engine([container("web", WEB_ID, labels=labels)]).path)
    assert (t.pod, t.k8s_namespace) == ("shop-7d9", "prod")


# -- docker and podman: the API version ---------------------------------------------------

def test_the_daemon_s_own_api_version_is_spoken(engine):
    # Docker 29 refuses clients below 1.44: a pinned v1.41 would fail there
    fake = engine(api_version="1.52", min_version="1.44")
    assert resolve("docker:web", fake.path).name == "web"
    assert fake.requests[0] == "/_ping"
    assert all(r.startswith("/v1.52/") for r in fake.requests[1:]), fake.requests


def test_without_a_version_from_ping_1_41_is_spoken(engine):
    fake = engine(api_version=None)
    assert resolve("docker:web", fake.path).name == "web"
    assert all(r.startswith("/v1.41/") for r in fake.requests[1:]), fake.requests


def test_a_daemon_that_fails_to_list_is_unavailable(engine):
    fake = engine()
    fake.list_status = 500
    with pytest.raises(RuntimeUnavailable, match=r"refused to list its containers: 500 daemon is sad"):
        resolve("docker:web", fake.path)


# -- docker and podman: the socket --------------------------------------------------------

def test_a_missing_socket_names_the_path_and_how_to_point_elsewhere(sockdir):
    path = os.path.join(sockdir, "nothing.sock")
    with pytest.raises(RuntimeUnavailable) as e:
        resolve("docker:web", path)
    assert str(e.value) == f"no docker socket at {path} (--runtime-socket)"
    assert e.value.hint.startswith("start dockerd, or point mace at its socket: --runtime-socket PATH")
    assert "DOCKER_HOST=unix:///PATH" in e.value.hint


def test_missing_default_sockets_are_all_named(sockdir, monkeypatch):
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    a, b = os.path.join(sockdir, "a.sock"), os.path.join(sockdir, "b.sock")
    monkeypatch.setitem(runtimes.DEFAULT_SOCKETS, "docker", (a, b))
    with pytest.raises(RuntimeUnavailable, match=f"^no docker socket at {a} or {b}$"):
        resolve("docker:web")


def test_the_first_default_socket_that_exists_is_used(engine, sockdir, monkeypatch):
    fake = engine()
    monkeypatch.setitem(runtimes.DEFAULT_SOCKETS, "docker", (os.path.join(sockdir, "none.sock"), fake.path))
    t = resolve("docker:web")
    assert t.runtime_socket == fake.path


def test_docker_host_is_used_and_named_in_errors(engine, sockdir, monkeypatch):
    fake = engine()
    monkeypatch.setenv("DOCKER_HOST", f"unix://{fake.path}")
    assert resolve("docker:web").runtime_socket == fake.path
    missing = os.path.join(sockdir, "x.sock")
    monkeypatch.setenv("DOCKER_HOST", f"unix://{missing}")
    with pytest.raises(RuntimeUnavailable, match=re.escape(f"no docker socket at {missing} (DOCKER_HOST)")):
        resolve("docker:web")
    # --runtime-socket wins over DOCKER_HOST
    assert resolve("docker:web", fake.path).runtime_socket == fake.path


def test_a_refused_connection(sockdir):
    path = os.path.join(sockdir, "dead.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)                # bound, never listening: what a crashed daemon leaves
    try:
        with pytest.raises(RuntimeUnavailable, match=re.escape(f"docker refused the connection on {path} "
                                                               "(--runtime-socket): nothing listens there")):
            resolve("docker:web", path)
    finally:
        s.close()


def test_permission_denied_on_the_socket(engine, monkeypatch):
    fake = engine()

    def denied(path, timeout):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(runtimes, "_connect_unix", denied)
    with pytest.raises(RuntimeUnavailable) as e:
        resolve("docker:web", fake.path)
    assert str(e.value) == f"permission denied on docker's socket {fake.path} (--runtime-socket)"
    assert e.value.hint.startswith("run mace as root") and "--runtime-socket PATH" in e.value.hint


@pytest.mark.skipif(os.geteuid() == 0, reason="root connects whatever the socket's mode")
def test_permission_denied_by_the_socket_s_mode(engine):
    fake = engine()
    os.chmod(fake.path, 0)
    with pytest.raises(RuntimeUnavailable, match="permission denied"):
        resolve("docker:web", fake.path)


def test_a_daemon_that_does_not_answer(sockdir, monkeypatch):
    path = os.path.join(sockdir, "mute.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.listen(1)                 # accepted by the kernel, never answered
    monkeypatch.setattr(runtimes, "TIMEOUT", 0.2)
    try:
        with pytest.raises(RuntimeUnavailable, match="did not answer within 0.2 s on "):
            resolve("docker:web", path)
    finally:
        s.close()


@pytest.mark.parametrize("value, path", [("unix:///run/d.sock", "/run/d.sock"),
                                         ("unix://relative.sock", "relative.sock")])
def test_docker_host_unix_urls(value, path):
    assert socket_for("docker", env={"DOCKER_HOST": value}) == Socket(path, "DOCKER_HOST")


@pytest.mark.parametrize("value", ["tcp://10.0.0.1:2375", "ssh://me@host", "fd://"])
def test_docker_host_that_is_not_a_unix_socket_is_a_usage_error(value):
    with pytest.raises(UsageError) as e:
        socket_for("docker", env={"DOCKER_HOST": value})
    assert str(e.value) == (f"DOCKER_HOST={value} is not a Unix socket: mace talks to docker over "
                            "unix:///PATH only")
    assert e.value.hint == "unset DOCKER_HOST or give --runtime-socket PATH"


def test_docker_host_that_is_a_bare_path_says_how_to_write_it():
    with pytest.raises(UsageError) as e:
        socket_for("docker", env={"DOCKER_HOST": "/run/docker.sock"})
    assert e.value.oneline() == ("DOCKER_HOST=/run/docker.sock is not a URL: docker takes unix:///PATH there "
                                 "(DOCKER_HOST=unix:///run/docker.sock)")


def test_an_empty_unix_url_is_a_usage_error():
    with pytest.raises(UsageError, match="DOCKER_HOST names no socket path"):
        socket_for("docker", env={"DOCKER_HOST": "unix://"})


def test_container_host_for_podman_and_its_defaults(sockdir):
    assert socket_for("podman", env={"CONTAINER_HOST": "unix:///p.sock"}) == \
        Socket("/p.sock", "CONTAINER_HOST")
    with pytest.raises(UsageError, match="CONTAINER_HOST=ssh://"):
        socket_for("podman", env={"CONTAINER_HOST": "ssh://core@vm/run/podman/podman.sock"})
    # the environment of the other runtime does not count
    assert socket_for("podman", "/x.sock", env={"DOCKER_HOST": "tcp://h:1"}) == \
        Socket("/x.sock", "--runtime-socket")
    xdg = os.path.join(sockdir, "xdg")
    os.makedirs(os.path.join(xdg, "podman"))
    user = os.path.join(xdg, "podman", "podman.sock")
    open(user, "w").close()
    if not os.path.exists("/run/podman/podman.sock"):
        assert socket_for("podman", env={"XDG_RUNTIME_DIR": xdg}) == Socket(user)


def test_runtime_socket_takes_a_path_or_a_unix_url():
    assert socket_for("docker", "unix:///a.sock", env={}).path == "/a.sock"
    assert socket_for("docker", "/a.sock", env={}).path == "/a.sock"
    with pytest.raises(UsageError, match="--runtime-socket tcp://h:1 is not a Unix socket"):
        socket_for("docker", "tcp://h:1", env={})


def test_containerd_and_cri_take_plain_paths_from_their_variables():
    assert socket_for("containerd", env={"CONTAINERD_ADDRESS": "/c.sock"}) == \
        Socket("/c.sock", "CONTAINERD_ADDRESS")
    assert socket_for("pod", env={"CONTAINER_RUNTIME_ENDPOINT": "unix:///k.sock"}).path == "/k.sock"


# -- specs --------------------------------------------------------------------------------

def test_runtime_of():
    assert [runtime_of(s) for s in ("docker:web", "podman:1", "containerd:k8s.io/x", "pod:a/b/c")] == \
        ["docker", "podman", "containerd", "pod"]
    assert [runtime_of(s) for s in ("1234", "web", "/run/netns/c1", "netns:4026")] == [None] * 4


@pytest.mark.parametrize("spec", ["docker:", "podman: ", "pod:", "containerd:"])
def test_a_runtime_without_a_container_is_a_usage_error(spec):
    with pytest.raises(UsageError, match="names no container"):
        resolve(spec)


@pytest.mark.parametrize("spec", ["pod:a/b/c/d", "pod:a//c", "containerd:a/b/c", "containerd:ns/"])
def test_malformed_containerd_and_pod_specs(spec, monkeypatch):
    monkeypatch.setattr(runtimes, "socket_for", lambda runtime, explicit=None: Socket("/nowhere.sock"))
    with pytest.raises(UsageError, match="is not"):
        resolve(spec)


def test_old_forms_keep_their_label():
    t = Target("1234", "/proc/1234/ns/net", 7, 1234)
    assert t.label == "1234" and t.runtime is None and t.name is None


def test_describe_names_the_runtime_and_the_container_shared_with():
    t = Target("docker:web", OWN_NS, 42, PID, name="web", runtime="docker", shares="db")
    link = VethLink("eth0", 2, "/proc/1/ns/net", 1, "veth1", 5, "docker0", True)
    topo = Topology([Container(t, [link])], "/proc/1/ns/net", 1, "eth1", 3)
    assert topo.describe() == [f"netns 42 (docker web, pid {PID}, shared with db): "
                               "eth0 ⇄ veth1 → docker0 → eth1"]
    assert topo.plan().containers[0].label == "web"


# -- reresolve ----------------------------------------------------------------------------

def test_reresolve_follows_a_restart_and_says_none_while_stopped(engine):
    fake = engine()
    t = resolve("docker:web", fake.path)
    fake.containers[0] = container("web", WEB_ID, running=False)
    assert reresolve(t) is None
    # the restarted container: a process of ours (not the parent, which is init when the
    # suite runs detached, and init's namespace is the host's)
    child = subprocess.Popen(["sleep", "30"])
    try:
        fake.containers[0] = container("web", WEB_ID, pid=child.pid)
        again = reresolve(t)
    finally:
        child.kill()
        child.wait()
    assert (again.pid, again.path, again.spec, again.runtime_socket) == (child.pid, f"/proc/{child.pid}/ns/net",
                                                                        t.spec, fake.path)
    fake.containers.clear()
    with pytest.raises(ContainerNotFound):              # removed: it will not come back
        reresolve(t)
    fake.close()
    with pytest.raises(RuntimeUnavailable):             # the daemon is down: not "stopped"
        reresolve(t)


def test_reresolve_uses_the_socket_it_was_found_on(engine, monkeypatch):
    fake = engine()
    monkeypatch.setenv("DOCKER_HOST", f"unix://{fake.path}")
    t = resolve("docker:web")
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    assert reresolve(t).container_id == WEB_ID


def test_reresolve_of_a_pid_target():
    t = netns.resolve(str(PID))
    assert reresolve(t) == t
    gone = Target(str(_free_pid()), "/proc/x/ns/net", 1, 1)
    assert reresolve(gone) is None


# -- containerd (ctr) ---------------------------------------------------------------------

TASKS = """TASK      PID      STATUS
web       {pid}    RUNNING
halted    0        STOPPED
"""


class FakeTools:
    """Canned ctr/crictl output by argument list; records the calls."""

    def __init__(self, answers):
        self.answers, self.calls = answers, []

    def __call__(self, tool, argv, runtime, sock):
        self.calls.append((tool, *argv))
        for key, out in self.answers.items():
            if tuple(argv[-len(key):]) == key:
                return out if isinstance(out, str) else json.dumps(out)
        raise AssertionError(f"unexpected {tool} {argv}")


@pytest.fixture
def tools(monkeypatch):
    def install(answers, *, host_inode=-1):
        fake = FakeTools(answers)
        monkeypatch.setattr(runtimes, "_run", fake)
        monkeypatch.setattr(runtimes, "_host_inode", lambda: host_inode)
        return fake
    return install


def _ctr_answers(namespace="default", containers="web\nhalted\nidle\n", namespaces="default\nk8s.io\n",
                 k8s="moved\n"):
    return {("--namespace", namespace, "tasks", "ls"): TASKS.format(pid=PID),
            ("--namespace", namespace, "containers", "ls", "-q"): containers,
            ("--namespace", namespace, "namespaces", "ls", "-q"): namespaces,
            ("--namespace", "k8s.io", "containers", "ls", "-q"): k8s}


def test_containerd_task_gives_pid_and_namespace(tools):
    fake = tools(_ctr_answers())
    t = resolve("containerd:web", "/run/c.sock")
    assert (t.path, t.pid, t.name, t.runtime, t.container_id) == (OWN_NS, PID, "web", "containerd", "web")
    assert t.runtime_socket == "/run/c.sock" and t.label == "web"
    assert fake.calls[0] == ("ctr", "--address", "/run/c.sock", "--namespace", "default", "tasks", "ls")


def test_containerd_namespace_in_the_spec(tools):
    fake = tools(_ctr_answers(namespace="k8s.io"))
    assert resolve("containerd:k8s.io/web", "/run/c.sock").pid == PID
    assert fake.calls[0][4] == "k8s.io"


def test_containerd_stopped_task_and_container_without_task(tools):
    tools(_ctr_answers())
    with pytest.raises(ContainerNotRunning,
                       match=r"^containerd container 'halted' is not running \(stopped\)$"):
        resolve("containerd:halted", "/run/c.sock")
    with pytest.raises(ContainerNotRunning, match=r"'idle' is not running \(no task\)"):
        resolve("containerd:idle", "/run/c.sock")


def test_containerd_container_in_another_namespace(tools):
    tools(_ctr_answers())
    with pytest.raises(ContainerNotFound) as e:
        resolve("containerd:moved", "/run/c.sock")
    assert str(e.value) == "no containerd container 'moved' in namespace 'default'"
    assert e.value.hint == "it is in namespace 'k8s.io': containerd:k8s.io/moved"


def test_containerd_near_matches_and_none(tools):
    tools(_ctr_answers())
    with pytest.raises(ContainerNotFound) as e:
        resolve("containerd:wbe", "/run/c.sock")
    assert e.value.hint == "did you mean web?"
    with pytest.raises(ContainerNotFound) as e:
        resolve("containerd:zzzzzz", "/run/c.sock")
    assert "k8s.io" in e.value.hint and "ctr --namespace default containers ls" in e.value.hint


def test_containerd_container_on_the_host_network(tools):
    tools(_ctr_answers(), host_inode=os.stat(OWN_NS).st_ino)
    with pytest.raises(NoContainerNetwork, match="containerd container 'web' uses the host's network"):
        resolve("containerd:web", "/run/c.sock")


def test_tools_that_are_missing_name_their_package(monkeypatch, sockdir):
    monkeypatch.setattr(runtimes.shutil, "which", lambda name: None)
    with pytest.raises(ResourceError) as e:
        resolve("containerd:web", "/run/c.sock")
    assert str(e.value) == "ctr not found" and "containerd" in e.value.hint
    with pytest.raises(ResourceError) as e:
        resolve("pod:web", "/run/c.sock")
    assert str(e.value) == "crictl not found" and "cri-tools" in e.value.hint


def _fake_tool(directory, name, stderr, rc=1):
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write(f"#!/bin/sh\necho '{stderr}' >&2\nexit {rc}\n")
    os.chmod(path, 0o755)


def test_tool_failures_are_one_line_runtime_errors(sockdir, monkeypatch):
    sock = os.path.join(sockdir, "c.sock")
    open(sock, "w").close()
    _fake_tool(sockdir, "ctr", 'ctr: failed to dial "x": connect: permission denied')
    _fake_tool(sockdir, "crictl",
               'level=fatal msg="validate service connection: rpc error: code = Unavailable"')
    monkeypatch.setenv("PATH", sockdir + os.pathsep + os.environ.get("PATH", ""))
    with pytest.raises(RuntimeUnavailable, match=f"^permission denied on containerd's socket {sock}"):
        resolve("containerd:web", sock)
    with pytest.raises(RuntimeUnavailable, match='^crictl failed: level=fatal msg="validate service'):
        resolve("pod:web", sock)


def test_a_missing_containerd_socket_is_reported_before_ctr_runs(sockdir, monkeypatch):
    _fake_tool(sockdir, "ctr", "should not run")
    monkeypatch.setenv("PATH", sockdir)
    path = os.path.join(sockdir, "none.sock")
    with pytest.raises(RuntimeUnavailable, match=f"^no containerd socket at {path} \\(--runtime-socket\\)$"):
        resolve("containerd:web", path)


# -- pods (crictl) --------------------------------------------------------------------------
# Shapes as `crictl pods -o json`, `crictl inspectp -o json` and `crictl ps -o json` print them
# with containerd (not captured live here: no CRI runtime on this machine).

SANDBOX = "5c1e" + "a" * 60


def _pod(name="web", namespace="default", state="SANDBOX_READY", sid=SANDBOX, attempt=0):
    return {"id": sid,
            "metadata": {"name": name, "uid": "0d1c-uid", "namespace": namespace, "attempt": attempt},
            "state": state, "createdAt": "1764817200000000000",
            "labels": {"io.kubernetes.pod.name": name, "io.kubernetes.pod.namespace": namespace},
            "annotations": {}, "runtimeHandler": ""}


def _inspectp(network="POD", path="/proc/self/ns/net", pid=PID):
    namespaces = [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]
    if network != "NODE":
        namespaces.append({"type": "network", "path": path})
    return {"status": {"id": SANDBOX, "metadata": {"name": "web", "namespace": "default"},
                       "state": "SANDBOX_READY", "network": {"ip": "10.244.0.7", "additionalIps": []},
                       "linux": {"namespaces": {"options": {
                           "network": network, "pid": "CONTAINER", "ipc": "POD", "targetId": "",
                           "userNsOptions": None}}}},
            "info": {"pid": pid, "processStatus": "running", "netNamespaceClosed": False,
                     "image": "registry.k8s.io/pause:3.9", "runtimeHandler": "",
                     "runtimeType": "io.containerd.runc.v2",
                     "runtimeSpec": {"ociVersion": "1.1.0", "linux": {"namespaces": namespaces}}}}


def _ps(*containers):
    return {"containers": [{"id": cid, "podSandboxId": SANDBOX, "metadata": {"name": name, "attempt": 0},
                            "image": {"image": "nginx"}, "imageRef": "sha256:1", "state": state,
                            "createdAt": "1764817200000000000", "labels": {}, "annotations": {}}
                           for name, cid, state in containers]}


def _pod_answers(pods=None, inspectp=None, ps=None, all_pods=None):
    pods = [_pod()] if pods is None else pods
    return {("pods", "--name", "web", "--namespace", "default", "-o", "json"): {"items": pods},
            ("pods", "--name", "nginx", "--namespace", "shop", "-o", "json"): {"items": pods},
            ("inspectp", "-o", "json", SANDBOX): inspectp or _inspectp(),
            ("ps", "-a", "--pod", SANDBOX, "-o", "json"): ps or _ps(("app", "c1" * 32, "CONTAINER_RUNNING"),
                                                                   ("init", "c2" * 32, "CONTAINER_EXITED")),
            ("pods", "-o", "json"): {"items": all_pods or []}}


def test_a_pod_s_sandbox_namespace(tools):
    fake = tools(_pod_answers())
    t = resolve("pod:web", "/run/containerd/containerd.sock")
    assert (t.path, t.pid, t.name, t.pod, t.k8s_namespace) == \
        ("/proc/self/ns/net", PID, "web", "web", "default")
    assert (t.runtime, t.container_id, t.label) == ("cri", SANDBOX, "web")
    assert fake.calls[0][:3] == ("crictl", "--runtime-endpoint", "unix:///run/containerd/containerd.sock")


def test_a_pod_s_container(tools):
    tools(_pod_answers())
    t = resolve("pod:default/web/app", "/run/k.sock")
    assert (t.name, t.pod, t.container_id, t.label) == ("app", "web", "c1" * 32, "app")
    with pytest.raises(ContainerNotRunning,
                       match=r"container 'init' of pod 'default/web' is not running \(exited\)"):
        resolve("pod:default/web/init", "/run/k.sock")
    with pytest.raises(ContainerNotFound) as e:
        resolve("pod:default/web/ap", "/run/k.sock")
    assert e.value.oneline() == "pod 'default/web' has no container named 'ap' (did you mean app?)"


def test_the_newest_ready_sandbox_of_a_pod(tools):
    old = _pod(state="SANDBOX_NOTREADY", sid="old", attempt=0)
    tools(_pod_answers(pods=[old, _pod(attempt=1)]))
    assert resolve("pod:web", "/run/k.sock").container_id == SANDBOX


def test_a_pod_not_ready(tools):
    tools(_pod_answers(pods=[_pod(state="SANDBOX_NOTREADY")]))
    with pytest.raises(ContainerNotRunning, match=r"^pod 'default/web' is not running \(notready\)$"):
        resolve("pod:web", "/run/k.sock")


def test_a_host_network_pod(tools):
    tools(_pod_answers(inspectp=_inspectp(network="NODE")))
    with pytest.raises(NoContainerNetwork,
                       match=r"pod 'default/web' uses the host's network \(hostNetwork\)"):
        resolve("pod:web", "/run/k.sock")


def test_a_pod_whose_netns_path_is_not_visible_falls_back_to_its_pid(tools):
    tools(_pod_answers(inspectp=_inspectp(path="/var/run/netns/cni-not-here")))
    assert resolve("pod:web", "/run/k.sock").path == OWN_NS
    tools(_pod_answers(inspectp=_inspectp(path="/var/run/netns/cni-not-here", pid=0)))
    with pytest.raises(TargetNotFound, match="neither a network namespace nor a PID"):
        resolve("pod:web", "/run/k.sock")


def test_a_pod_on_the_host_s_namespace_is_refused_even_without_node_mode(tools):
    tools(_pod_answers(), host_inode=os.stat(OWN_NS).st_ino)
    with pytest.raises(NoContainerNetwork):
        resolve("pod:web", "/run/k.sock")


def test_a_pod_in_another_namespace_or_near_by(tools):
    tools(_pod_answers(pods=[], all_pods=[_pod("nginx", "default"), _pod("nginx-2", "shop")]))
    with pytest.raises(ContainerNotFound) as e:
        resolve("pod:shop/nginx", "/run/k.sock")
    assert e.value.oneline() == "no pod 'shop/nginx' (it is in namespace 'default': pod:default/nginx)"
    tools(_pod_answers(pods=[], all_pods=[_pod("webb", "default")]))
    with pytest.raises(ContainerNotFound) as e:
        resolve("pod:web", "/run/k.sock")
    assert e.value.hint == "did you mean webb?"


# -- the command line ----------------------------------------------------------------------

def _main(argv, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_check_privileges", lambda: None)
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_trace_reports_each_runtime_error_in_one_line_with_its_status(engine, sockdir, capsys, monkeypatch):
    fake = engine([container("web", WEB_ID), container("old", ABBA_ID, running=False),
                   container("h", DB_ID, mode="host")])
    cases = [("docker:wbe", fake.path, "ContainerNotFound",
              "no docker container named 'wbe' \\(did you mean web\\?\\)"),
             ("docker:old", fake.path, "ContainerNotRunning", "'old' is not running \\(exited\\)"),
             ("docker:h", fake.path, "NoContainerNetwork", "uses the host's network"),
             ("docker:web", os.path.join(sockdir, "no.sock"), "RuntimeUnavailable", "no docker socket at")]
    for spec, sock, kind, message in cases:
        rc, out, err = _main(["trace", "--netns", spec, "--runtime-socket", sock], capsys, monkeypatch)
        assert rc == EXIT_CODES[kind], (spec, err)
        assert out == "" and len(err.splitlines()) == 1 and err.startswith("mace: error: "), err
        assert re.search(message, err), err


def test_trace_refuses_one_runtime_socket_for_two_runtimes(capsys, monkeypatch):
    rc, _, err = _main(["trace", "--netns", "docker:web", "--netns", "podman:db", "--runtime-socket", "/s"],
                       capsys, monkeypatch)
    assert rc == EXIT_CODES["UsageError"] and "docker and podman" in err


def test_trace_with_a_tcp_docker_host_is_a_usage_error(capsys, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "tcp://198.18.0.1:2375")
    rc, _, err = _main(["trace", "--netns", "docker:web"], capsys, monkeypatch)
    assert rc == EXIT_CODES["UsageError"] and "DOCKER_HOST=tcp://198.18.0.1:2375 is not a Unix socket" in err


def test_serve_takes_a_runtime_socket():
    a = cli.build_parser().parse_args(["serve", "--runtime-socket", "/run/podman/podman.sock"])
    assert a.runtime_socket == "/run/podman/podman.sock"
    assert cli.build_parser().parse_args(["trace", "--netns", "docker:web"]).runtime_socket is None


def test_new_exit_codes_follow_the_old_ones():
    assert [EXIT_CODES[k] for k in ("RuntimeUnavailable", "ContainerNotFound", "ContainerNotRunning",
                                    "NoContainerNetwork")] == [12, 13, 14, 15]
    sub = next(a for a in cli.build_parser()._actions if a.choices and "trace" in a.choices).choices
    text = sub["trace"].format_help()
    for code in (12, 13, 14, 15):
        assert re.search(rf"^ +{code} +\S", text, re.M)


def test_the_service_can_name_the_container_of_a_namespace(engine):
    from mace.targets.runtimes import name_of_netns
    fake = engine([container("old", ABBA_ID, running=False), container("web", WEB_ID)])
    assert name_of_netns(os.stat(OWN_NS).st_ino, fake.path) == {"container": "web", "runtime": "docker"}
    assert name_of_netns(1, fake.path) is None                    # no container runs there
    fake.close()
    assert name_of_netns(os.stat(OWN_NS).st_ino, fake.path) is None   # no runtime: no name, no error


def test_the_service_names_a_pod_by_its_sandbox_namespace(tools, monkeypatch):
    """--all and the service's clients are known by namespace: the ready sandbox holding
    it names the pod, and each sandbox is inspected once."""
    monkeypatch.setattr(runtimes.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(runtimes, "_SANDBOX_INODES", {})
    answers = _pod_answers()
    answers[("pods", "--state", "ready", "-o", "json")] = {"items": [_pod(name="web", namespace="shop")]}
    fake = tools(answers)
    own = os.stat(OWN_NS).st_ino
    named = {"container": "web", "runtime": "cri", "pod": "web", "k8s_namespace": "shop"}
    assert runtimes._pod_of_netns(own, "/run/k.sock") == named
    assert runtimes._pod_of_netns(own + 1, "/run/k.sock") is None
    assert sum(1 for c in fake.calls if "inspectp" in c) == 1

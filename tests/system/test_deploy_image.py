"""deploy/Containerfile, built and run by a private dockerd (tests/system/runtimes.py), from
base images made here, never pulled: two Debian bookworm root file systems (mmdebstrap
from Debian's mirror) imported with `docker import`, one with gcc and Python's headers for
the build stage, a slim one for the image.  The build reaches PyPI and Debian's mirror with
the host's network (`docker build --network host`), and the bases carry the host's CA
bundle, so pip and apt trust what the host trusts.

Then, in the image: `mace --version`; `mace demo` (its own namespaces, inside the
container); and the agent as deploy/kubernetes/daemonset.yaml runs it (host network and
PIDs, exactly the manifest's capabilities, a read-only root, a read-only /run holding the
runtime's socket and the service's writable socket directory) serving a busybox container
whose `mace on` and `mace read` come from the image as an unprivileged user sharing that
container's network, with /healthz answering the probes and /metrics counting the packets
under the container's Docker name; and each of the manifest's capabilities is shown to be
needed, by the failure that dropping it causes.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from runtimes import IN_CI, PREFIX, UPLINK, Session, busybox_ping, need, ping_ok, resolve_peer

from mace import __version__

REPO = Path(__file__).resolve().parents[2]
CONTAINERFILE = REPO / "deploy" / "Containerfile"
DAEMONSET = REPO / "deploy" / "kubernetes" / "daemonset.yaml"
SUITE, MIRROR = "bookworm", "http://deb.debian.org/debian"      # Python 3.11, as the project's
BUILD_PACKAGES = ("ca-certificates", "python3", "python3-venv", "python3-dev", "gcc", "libc6-dev")
RUN_PACKAGES = ("ca-certificates", "python3", "python3-venv")
# as the slim images do: no manuals, docs or translations
SLIM = ("path-exclude=/usr/share/man/*", "path-exclude=/usr/share/doc/*",
        "path-include=/usr/share/doc/*/copyright", "path-exclude=/usr/share/locale/*",
        "path-exclude=/usr/share/info/*")
HOST_CA = "/etc/ssl/certs/ca-certificates.crt"
IMAGE = f"{PREFIX}-mace:test"
BASE_TIMEOUT = 600          # s for one root file system (measured: 40 s)
BUILD_TIMEOUT = 900         # s for the image (measured: 40 s)
N = 5                       # pings through the agent
# what `mace demo` needs of a container: its testbed makes namespaces, veths and NAT rules
# and writes their sysctls (/proc/sys is read-only in a container unless unmasked), pings,
# and traces.  --privileged would do, where the daemon may grant every capability (this
# machine's root lacks CAP_SYS_RESOURCE).
DEMO_OPTS = ("--cap-drop", "ALL", *(a for c in ("SYS_ADMIN", "NET_ADMIN", "NET_RAW", "IPC_LOCK")
                                    for a in ("--cap-add", c)),
             "--security-opt", "systempaths=unconfined")
# what dropping each of the manifest's capabilities breaks: (where, exit status, message)
WITHOUT = {
    "SYS_ADMIN": ("serve", 3, r"needs to enter network namespaces"),
    "SYS_PTRACE": ("on", 11, r"cannot find the caller's namespace: Permission denied"),
    "IPC_LOCK": ("on", 11, r"refused to map the perf rings"),
}


def _gate() -> None:
    """The system tests' gate (conftest), for the module-scoped fixtures that run before it."""
    from conftest import _system_blocker

    reason = _system_blocker()
    if reason:
        if IN_CI:
            pytest.fail(f"CI=true but {reason}", pytrace=False)
        pytest.skip(reason)


def _timed(what: str, step):
    t0 = time.monotonic()
    value = step()
    print(f"\n{what}: {time.monotonic() - t0:.1f} s")
    return value


@pytest.fixture(scope="module")
def docker():
    """The private dockerd, for this module's image, bases and containers; everything is
    removed after the module and checked to be gone."""
    _gate()
    need("mmdebstrap")
    session = Session()
    try:
        yield session.runtime("docker")
    finally:
        left = session.teardown()
        assert not left, f"left behind by the image tests: {left}"


@pytest.fixture
def rt(docker):
    yield docker
    docker.remove_containers()


def _rootfs(dest: str, packages: tuple[str, ...]) -> str:
    """A Debian root file system as a tar, with the host's CA bundle."""
    argv = [need("mmdebstrap"), "--variant=apt", "--quiet", f"--include={','.join(packages)}",
            *(f"--dpkgopt={o}" for o in SLIM)]
    if os.path.exists(HOST_CA):
        argv.append(f"--customize-hook=upload {HOST_CA} {HOST_CA}")
    r = subprocess.run([*argv, SUITE, dest, MIRROR], capture_output=True, text=True,
                       timeout=BASE_TIMEOUT, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"mmdebstrap exited {r.returncode}:\n{r.stderr[-3000:]}"
    return dest


@pytest.fixture(scope="module")
def bases(docker) -> dict[str, str]:
    """The build arguments naming the two local bases (made at once, in parallel)."""
    def make():
        with ThreadPoolExecutor(2) as pool:
            jobs = {name: pool.submit(_rootfs, os.path.join(docker.root, f"{name}.tar"), packages)
                    for name, packages in (("build-base", BUILD_PACKAGES), ("base", RUN_PACKAGES))}
            tars = {name: job.result() for name, job in jobs.items()}
        for name, tar in tars.items():
            docker("import", tar, f"{PREFIX}-{name}:latest", timeout=300)
            os.unlink(tar)
        return {"BUILD_BASE": f"{PREFIX}-build-base", "BASE": f"{PREFIX}-base"}

    return _timed("two Debian bases (mmdebstrap, docker import)", make)


@pytest.fixture(scope="module")
def image(docker, bases) -> str:
    def build():
        argv = [*docker.cli(), "build", "--network", "host", "-f", str(CONTAINERFILE), "-t", IMAGE,
                *(a for k, v in bases.items() for a in ("--build-arg", f"{k}={v}")), str(REPO)]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=BUILD_TIMEOUT,
                           env=docker.env(), stdin=subprocess.DEVNULL)
        assert r.returncode == 0, f"docker build exited {r.returncode}:\n{(r.stdout + r.stderr)[-5000:]}"

    _timed("docker build", build)
    size = int(docker("image", "inspect", "-f", "{{.Size}}", IMAGE).stdout)
    print(f"image size: {size / 1e6:.0f} MB")
    return IMAGE


def in_image(docker, *args, opts=(), timeout=120) -> subprocess.CompletedProcess:
    return docker("run", "--rm", *opts, IMAGE, *args, check=False, timeout=timeout)


# -- the image ------------------------------------------------------------------------------

def test_version(docker, image):
    r = in_image(docker, "--version")
    assert (r.returncode, r.stdout) == (0, f"mace {__version__}\n"), r.stderr


def test_contents(docker, image):
    """What mace runs besides itself is there, the build's tools are not, and the compiled
    modules are the optimised build."""
    script = ("for t in ping nft nsenter sh; do command -v $t >/dev/null || echo missing $t; done; "
              "for t in gcc cc ip /opt/mace/bin/pip; do command -v $t >/dev/null && echo present $t; done; "
              "python3 -c 'from mace.capture import _ring; from mace.correlate import _correlate; "
              "print(\"debug\", _ring.DEBUG)'")
    r = in_image(docker, "-c", script, opts=("--entrypoint", "sh"))
    assert (r.returncode, r.stdout) == (0, "debug False\n"), r.stdout + r.stderr


def test_demo(docker, image):
    """`mace demo` in the image: its own testbed inside the container, pings, the table."""
    r = _timed("mace demo in the image", lambda: in_image(docker, "demo", opts=DEMO_OPTS, timeout=180))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "corrected RTT" in r.stdout and "native RTT (host)" in r.stdout, r.stdout
    matched = re.search(r"(\d+) of (\d+) probes matched", r.stdout)
    assert matched and int(matched.group(1)) > 0, r.stdout


# -- the agent as the DaemonSet runs it --------------------------------------------------------

def manifest_agent() -> tuple[list[str], list[str]]:
    """The DaemonSet container's capabilities (added; all others dropped) and arguments."""
    import yaml

    docs = [d for d in yaml.safe_load_all(DAEMONSET.read_text()) if d]
    ds = next(d for d in docs if d["kind"] == "DaemonSet")
    c = ds["spec"]["template"]["spec"]["containers"][0]
    caps = c["securityContext"]["capabilities"]
    assert caps["drop"] == ["ALL"], caps
    return list(caps["add"]), list(c["args"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        assert r.status == 200
        return r.read().decode()


def _scrape(port: int) -> str:
    return _get(port, "/metrics")


class Agent:
    """`mace serve` in the image with the manifest's arguments (--all: every container of
    the host) and options, but on loopback and with the test's uplink.  The memlock limit is
    pinned (8 MiB, systemd's default) so that the rings' need of CAP_IPC_LOCK does not
    depend on the daemon's.  The node's /run, which the manifest mounts read-only, is a
    directory of the test's with the private dockerd's socket at /run/docker.sock (not the
    test machine's /run), and the service's socket directory, writable, in it."""

    def __init__(self, rt, tmp: Path, caps: list[str]):
        self.rt, self.caps = rt, caps
        self.run, self.state = tmp / "run", tmp / "var-lib-mace"
        self.socket_dir = self.run / "mace"
        self.run.mkdir(mode=0o755)
        self.socket_dir.mkdir(mode=0o755)
        (self.run / "docker.sock").touch()    # where the daemon's socket is mounted
        self.state.mkdir(mode=0o755)         # as the kubelet makes a hostPath directory
        self.port = _free_port()
        self.name = f"{PREFIX}-agent"

    def args(self) -> list[str]:
        args = manifest_agent()[1]
        i = args.index("--metrics")
        args[i + 1] = f"127.0.0.1:{self.port}"      # never every address of the test host
        return [*args, "--uplink", UPLINK]

    def start(self) -> None:
        opts = ["--network", "host", "--pid", "host", "--read-only", "--ulimit", "memlock=8388608",
                "--cap-drop", "ALL",
                *(a for c in self.caps for a in ("--cap-add", c)),
                "-v", f"{self.run}:/run:ro", "-v", f"{self.rt.socket}:/run/docker.sock:ro",
                "-v", f"{self.socket_dir}:/run/mace", "-v", f"{self.state}:/var/lib/mace"]
        self.rt("run", "-d", "--name", self.name, *opts, IMAGE, *self.args())
        self.rt.made.append(self.name)

    def wait_ready(self, timeout: float = 30) -> None:
        """Until /healthz answers ok, as the probes ask; fails if the agent exits."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                assert _get(self.port, "/healthz") == "ok\n"
                return
            except OSError:         # refused while it starts, 503 until its engine runs
                pass
            state = self.rt("inspect", "-f", "{{.State.Running}} {{.State.ExitCode}}", self.name).stdout.split()
            assert state[0] == "true", f"the agent exited {state[1]}:\n{self.logs()}"
            assert time.monotonic() < deadline, f"no /healthz within {timeout} s:\n{self.logs()}"
            time.sleep(0.2)

    def exit_code(self, timeout: float = 30) -> int:
        return int(self.rt("wait", self.name, timeout=timeout).stdout.strip())

    def logs(self) -> str:
        r = self.rt("logs", self.name, check=False)
        return r.stdout + r.stderr

    def client(self, box: str, *args) -> subprocess.CompletedProcess:
        """mace's client from the image, as an unprivileged user in `box`'s network
        namespace, with the socket's directory read-only, as a pod mounts it."""
        opts = ("--network", f"container:{box}", "--user", "1000:1000", "--cap-drop", "ALL",
                "-v", f"{self.socket_dir}:/run/mace:ro")
        return self.rt("run", "--rm", *opts, IMAGE, *args, check=False, timeout=60)


def _series(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}(?:\{{(.*)\}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


def test_agent_with_the_manifests_capabilities(rt, image, tmp_path):
    """The DaemonSet's agent, with exactly its capabilities, traces a container of the host
    (--all), names it through the runtime's socket in the read-only /run, and /metrics
    counts its packets under that name; the container asks for its own reports as an
    unprivileged user, through the socket's directory, and reads them."""
    caps, _ = manifest_agent()
    agent = Agent(rt, tmp_path, caps)
    box = f"{PREFIX}-box"
    rt.container(box)
    inode = rt.sandbox(box)
    resolve_peer()
    agent.start()
    agent.wait_ready()

    def reported() -> dict[str, float]:
        text = _scrape(agent.port)
        return {d: _series(text, "mace_packets_total", container=box, direction=d,
                           outcome="reported") for d in ("egress", "ingress")}

    deadline = time.monotonic() + 30        # until --all has found the container
    while True:
        ping_ok(rt("exec", box, *busybox_ping(N), check=False, timeout=30), N)
        got = reported()
        if min(got.values()) >= N:
            break
        assert time.monotonic() < deadline, (got, agent.logs())
    assert _series(_scrape(agent.port), "mace_containers_traced") >= 1
    # named by Docker, asked through the socket on the read-only mount
    assert re.search(rf"^mace: netns {inode} traced \({re.escape(box)}\): ", agent.logs(), re.M), agent.logs()
    assert f'container="netns:{inode}"' not in _scrape(agent.port)

    on = agent.client(box, "on")
    assert on.returncode == 0, on.stdout + on.stderr + agent.logs()
    ping_ok(rt("exec", box, *busybox_ping(N), check=False, timeout=30), N)
    reports, deadline = [], time.monotonic() + 15
    while len(reports) < 2 * N and time.monotonic() < deadline:
        r = agent.client(box, "read", "--format", "jsonl")
        assert r.returncode == 0, r.stdout + r.stderr
        reports += [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    assert len(reports) >= 2 * N, (reports, agent.logs())
    assert {r["netns"] for r in reports} == {inode}
    rt("stop", "-t", "20", agent.name, timeout=40)
    assert agent.exit_code() == 0, agent.logs()
    state = agent.state / "state"         # the manifest's --state-dir, under the hostPath
    assert state.is_dir() and (state.stat().st_mode & 0o777) == 0o700 and any(state.iterdir()), agent.logs()


@pytest.mark.parametrize("dropped", manifest_agent()[0])
def test_each_capability_is_needed(rt, image, tmp_path, dropped):
    """Without any one of the manifest's capabilities the agent fails, as WITHOUT says."""
    assert dropped in WITHOUT, f"{dropped}: say in WITHOUT what fails without it"
    where, code, message = WITHOUT[dropped]
    caps, _ = manifest_agent()
    agent = Agent(rt, tmp_path, [c for c in caps if c != dropped])
    agent.start()
    if where == "serve":
        assert agent.exit_code() == code, agent.logs()
        assert re.search(message, agent.logs()), agent.logs()
        return
    agent.wait_ready()
    box = f"{PREFIX}-box"
    rt.container(box)
    r = agent.client(box, where)
    assert r.returncode == code, r.stdout + r.stderr
    assert re.search(message, r.stderr), r.stderr

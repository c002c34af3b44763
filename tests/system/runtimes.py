"""Real container runtimes for the system tests: a private dockerd and a private Podman API
service, started once for a test module, a busybox image made from the local busybox-static
binary (never a registry), and a peer for the containers to ping.

Isolation.  Everything carries a per-run prefix `mr<pytest's pid>` (interface names stay
under 15 characters) and lives under one directory, /tmp/mace-rt-<pid>-<random>:

- dockerd gets its own data root, exec root, pidfile, socket and config file.  Its
  containerd is the one it starts itself (state under the exec root).  Its default bridge is
  one made here, `mr<pid>-br` with 198.19.200.1/24 (`--bridge`), so a machine's own docker0 is
  neither used nor touched; its address pool is 198.19.208.0/20, the user-defined network of
  a test 198.19.216.0/24 on bridge `mr<pid>-n1`; its containers' cgroups are under
  `mr<pid>-docker`.
- Podman gets its own storage root, run root, tmp dir and network config directory through a
  private containers.conf (CONTAINERS_CONF), storage.conf and registries.conf (no registry);
  its containers use a network made here, `mr<pid>-pn` on bridge `mr<pid>-pb`,
  198.19.224.0/24 (the default network's subnet and pool are moved into 198.19.228.0/22
  too, in case anything touches them), cgroups under `mr<pid>-podman`.
- The peer is a veth pair: `mr<pid>-up` in the host namespace (198.19.240.1/30: the uplink
  mace is told to use) and its other end in a namespace `mr<pid>-peer` (198.19.240.2/30,
  with routes back to the runtimes' subnets).  Pings go to 198.19.240.2 only.

The runtimes change the host's own namespace (iptables rules and chains, FORWARD's policy,
ip_forward, a few default paths such as /etc/docker/key.json): a snapshot taken before, and
saved in the run's directory, says what to undo.  Two runs at once would route the same
subnets through two bridges, so a run refuses to start beside a live one.

Teardown (also when a test fails): containers are removed through their runtime, the
daemons are stopped by PID (SIGTERM, then SIGKILL), then purge() kills by PID any process
whose command line names the run's directory (containerd, shims, conmon) or that sits in
the run's cgroups (a container left over), detaches mounts under the directory, removes the
cgroups, bridges, veth and peer namespace; the snapshot is then restored (rules, chains and
tables added since deleted, policies and ip_forward put back, paths the runtimes made
removed), and the directory removed.  `leftovers()` lists whatever is still there; the
teardown fails if anything is.  A run killed outright (SIGKILL) is undone the same way by
the next one (remove_stale), through its runtimes if they still answer.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field

import pytest
from helpers import Lines, finish

IN_CI = os.environ.get("CI", "").lower() == "true"
PREFIX = f"mr{os.getpid()}"
STALE_RE = re.compile(r"^mr(\d+)-")
DIR_RE = re.compile(r"^mace-rt-(\d+)-[a-z0-9_]+$")

PEER_NS = f"{PREFIX}-peer"
UPLINK = f"{PREFIX}-up"             # host side of the veth to the peer: mace's --uplink
PEER_DEV = f"{PREFIX}-pe"
PEER_IP = "198.19.240.2"
UPLINK_NET = ("198.19.240.1/30", "198.19.240.2/30")
DOCKER_BRIDGE = f"{PREFIX}-br"
DOCKER_BRIDGE_IP = "198.19.200.1/24"
DOCKER_POOL = "198.19.208.0/20"
DOCKER_USER_SUBNET = "198.19.216.0/24"
DOCKER_USER_BRIDGE = f"{PREFIX}-n1"
PODMAN_NET = f"{PREFIX}-pn"
PODMAN_BRIDGE = f"{PREFIX}-pb"
PODMAN_SUBNET = "198.19.224.0/24"
PODMAN_DEFAULT_SUBNET = "198.19.228.0/24"
PODMAN_POOL = "198.19.232.0/22"
ROUTES_BACK = ("198.19.200.0/24", DOCKER_POOL, PODMAN_SUBNET, PODMAN_DEFAULT_SUBNET, PODMAN_POOL)
# bridges a runtime would make by default: if one exists, it is not ours to use or delete
FOREIGN_BRIDGES = ("docker0", "podman0")

# the parent cgroups of the containers (left empty by the runtimes; removed after the run)
DOCKER_CGROUP = f"{PREFIX}-docker"
PODMAN_CGROUP = f"{PREFIX}-podman"
CGROUP_ROOT = "/sys/fs/cgroup"
IMAGE = f"{PREFIX}-busybox"
HOST_STATE = "host-state.json"      # in the run's directory: the host as it was before
LIFETIME = "600"                    # s a test container lives at most (sleep is its PID 1)
START_TIMEOUT = 60
CMD_TIMEOUT = 60
WAIT = 15


# -- small tools ----------------------------------------------------------------------------

def run(argv, *, check=True, timeout=CMD_TIMEOUT, env=None, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                       stdin=subprocess.DEVNULL, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{shlex.join(map(str, argv))} exited {r.returncode}:\n{r.stdout}{r.stderr}")
    return r


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if IN_CI:
            pytest.fail(f"{tool} is not installed (.ci/run installs it)", pytrace=False)
        pytest.skip(f"needs {tool}")
    return path


def _is_static(path: str) -> bool:
    """Whether an ELF executable has no program interpreter (PT_INTERP), so that it runs in
    an image holding nothing else."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:
            return False
        phoff = int.from_bytes(head[32:40], "little")
        phentsize = int.from_bytes(head[54:56], "little")
        phnum = int.from_bytes(head[56:58], "little")
        for i in range(phnum):
            f.seek(phoff + i * phentsize)
            if int.from_bytes(f.read(4), "little") == 3:
                return False
    return True


def static_busybox() -> str:
    for path in ("/bin/busybox", "/usr/bin/busybox"):
        if os.path.exists(path) and _is_static(path):
            return path
    if IN_CI:
        pytest.fail("no statically linked busybox (.ci/run installs busybox-static)", pytrace=False)
    pytest.skip("needs a statically linked busybox (Debian package busybox-static)")


def rootfs_tar(dest: str, busybox: str) -> str:
    """A root file system holding busybox and the applets the tests use."""
    path = os.path.join(dest, "rootfs.tar")
    with tarfile.open(path, "w") as tar:
        for d in ("bin", "dev", "etc", "proc", "sys", "tmp"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        tar.add(busybox, "bin/busybox")
        for applet in ("sh", "sleep", "ping", "ip", "cat"):
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(info)
        for name, text in (("etc/passwd", "root:x:0:0:root:/:/bin/sh\n"), ("etc/group", "root:x:0:\n")):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def links() -> dict[str, dict]:
    return {link["ifname"]: link for link in json.loads(run(["ip", "-j", "link", "show"]).stdout)}


def netns_names() -> list[str]:
    out = run(["ip", "-j", "netns", "list"], check=False).stdout.strip()
    return [n["name"] for n in json.loads(out)] if out else []


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace").replace("\0", " ").strip()
    except OSError:
        return ""


def processes_naming(text: str) -> list[tuple[int, str]]:
    """(pid, command line) of every process whose command line contains `text`."""
    me = os.getpid()
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != me:
            cmd = _cmdline(pid)
            if text in cmd:
                found.append((int(pid), cmd))
    return found


def kill_contained(pattern: re.Pattern) -> list[int]:
    """SIGKILL every process whose cgroup path (any hierarchy) matches `pattern`: what
    remains of containers whose runtime is gone or failed to remove them."""
    killed = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cgroup") as f:
                paths = [line.rstrip("\n").split(":", 2)[-1] for line in f]
        except OSError:
            continue
        if any(pattern.search(p) for p in paths):
            try:
                os.kill(int(pid), signal.SIGKILL)
                killed.append(int(pid))
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 5
    while any(_state(pid) != "Z" for pid in killed) and time.monotonic() < deadline:
        time.sleep(0.05)
    return killed


def stop_pid(pid: int, timeout: float = 30) -> None:
    """SIGTERM, wait, then SIGKILL one process that is not our child (by PID only)."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if _state(pid) == "Z":
                return
            time.sleep(0.1)


def stop_child(proc: subprocess.Popen | None, timeout: float = 30) -> None:
    """SIGTERM, wait, then SIGKILL a process we started."""
    if proc is None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            pass


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def mounts_under(path: str) -> list[str]:
    path = os.path.realpath(path)
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == path or point.startswith(path + "/"):
                out.append(point)
    return out


def unmount_under(path: str) -> None:
    for point in sorted(set(mounts_under(path)), key=len, reverse=True):
        run(["umount", "-l", point], check=False)


def delete_link(name: str) -> None:
    if name in links():
        run(["ip", "link", "del", name], check=False)


def cgroups(pattern: re.Pattern) -> list[str]:
    """Top-level cgroups whose names match, in every hierarchy (v1 controllers, v2)."""
    tops = [CGROUP_ROOT] + [os.path.join(CGROUP_ROOT, d) for d in _listdir(CGROUP_ROOT)]
    found = []
    for top in filter(_is_cgroup, tops):
        found += [os.path.join(top, name) for name in _listdir(top)
                  if pattern.match(name) and os.path.isdir(os.path.join(top, name))]
    return found


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _is_cgroup(path: str) -> bool:
    return os.path.exists(os.path.join(path, "cgroup.procs"))


def remove_cgroup(path: str) -> None:
    """rmdir a cgroup and its children, deepest first (the kernel refuses one in use)."""
    for top, dirs, _files in os.walk(path, topdown=False):
        for d in dirs:
            _rmdir(os.path.join(top, d))
    _rmdir(path)


def _rmdir(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass


# -- host state the runtimes change ---------------------------------------------------------

IPTABLES = ("iptables", "ip6tables")
# where dockerd, containerd, podman and netavark put things of their own when not told
# otherwise (dockerd 20.10 writes /etc/docker/key.json whatever its roots): removed after the
# session if the session made them
RUNTIME_PATHS = ("/etc/docker/key.json", "/etc/docker", "/run/docker", "/var/lib/docker", "/run/containerd",
                 "/var/lib/containerd", "/run/containers", "/var/lib/containers", "/run/libpod",
                 "/etc/containers/networks", "/var/lib/cni", "/run/cni")


BUILTIN_CHAINS = {"INPUT", "OUTPUT", "FORWARD", "PREROUTING", "POSTROUTING"}


@dataclass
class Rules:
    """One of iptables-save's views: rule lines (`TABLE|-A ...`), user chains, tables and the
    built-in chains' policies.  Read only: iptables-save creates no table, listing may."""

    rules: set[str] = field(default_factory=set)
    chains: set[tuple[str, str]] = field(default_factory=set)
    tables: set[str] = field(default_factory=set)
    policies: dict[tuple[str, str], str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"rules": sorted(self.rules), "chains": sorted(self.chains), "tables": sorted(self.tables),
                "policies": [[t, c, p] for (t, c), p in sorted(self.policies.items())]}

    @classmethod
    def from_json(cls, d: dict) -> Rules:
        return cls(set(d["rules"]), {tuple(c) for c in d["chains"]}, set(d["tables"]),
                   {(t, c): p for t, c, p in d["policies"]})

    @classmethod
    def read(cls, tool: str) -> Rules:
        got = cls()
        if shutil.which(f"{tool}-save") is None:
            return got
        table = ""
        for line in run([f"{tool}-save"], check=False).stdout.splitlines():
            if line.startswith("*"):
                table = line[1:]
                got.tables.add(table)
            elif line.startswith(":"):
                chain, policy = line[1:].split()[:2]
                if chain in BUILTIN_CHAINS:
                    got.policies[(table, chain)] = policy
                else:
                    got.chains.add((table, chain))
            elif line.startswith("-A "):
                got.rules.add(f"{table}|{line}")
        return got


def _nft_backend(tool: str) -> bool:
    return "nf_tables" in run([tool, "-V"], check=False).stdout


@dataclass
class HostState:
    """What the runtimes change in the host's namespace, as it was before they started."""

    ip_forward: str
    paths: set[str] = field(default_factory=set)
    rules: dict[str, Rules] = field(default_factory=dict)

    @classmethod
    def take(cls) -> HostState:
        with open("/proc/sys/net/ipv4/ip_forward") as f:
            state = cls(f.read().strip(), {p for p in RUNTIME_PATHS if os.path.lexists(p)})
        state.rules = {tool: Rules.read(tool) for tool in IPTABLES}
        return state

    def restore(self) -> None:
        """Delete the rules, chains and tables added since; put back the built-in chains'
        policies (dockerd sets FORWARD's to DROP), ip_forward, and the runtimes' paths."""
        for tool in IPTABLES:
            if shutil.which(tool) is None:
                continue
            old, new = self.rules[tool], Rules.read(tool)
            # every added rule, then the added chains (no longer referenced) emptied and deleted
            for entry in sorted(new.rules - old.rules):
                table, rule = entry.split("|", 1)
                run([tool, "-t", table, "-D", *shlex.split(rule)[1:]], check=False)
            for table, chain in sorted(new.chains - old.chains):
                run([tool, "-t", table, "-F", chain], check=False)
            for table, chain in sorted(new.chains - old.chains):
                run([tool, "-t", table, "-X", chain], check=False)
            for (table, chain), policy in old.policies.items():
                if new.policies.get((table, chain), policy) != policy:
                    run([tool, "-t", table, "-P", chain, policy], check=False)
            if _nft_backend(tool):
                family = "ip" if tool == "iptables" else "ip6"
                left = Rules.read(tool)
                for table in sorted(left.tables - old.tables):
                    if not any(r.startswith(f"{table}|") for r in left.rules):
                        run(["nft", "delete", "table", family, table], check=False)
        with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
            f.write(self.ip_forward)
        for path in self.new_paths():
            unmount_under(path)
            if os.path.isdir(path) and not os.path.islink(path):
                if not mounts_under(path):
                    shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)

    def save(self, path: str) -> None:
        """Kept in the run's directory, so that a run killed outright can be undone by the next."""
        with open(path, "w") as f:
            json.dump({"ip_forward": self.ip_forward, "paths": sorted(self.paths),
                       "rules": {tool: r.to_json() for tool, r in self.rules.items()}}, f)

    @classmethod
    def load(cls, path: str) -> HostState | None:
        try:
            with open(path) as f:
                d = json.load(f)
        except (OSError, ValueError):
            return None
        return cls(d["ip_forward"], set(d["paths"]),
                   {tool: Rules.from_json(r) for tool, r in d["rules"].items()})

    def new_paths(self) -> list[str]:
        return [p for p in RUNTIME_PATHS if os.path.lexists(p) and p not in self.paths]

    def changes(self) -> list[str]:
        out = [f"{p} made" for p in self.new_paths()]
        with open("/proc/sys/net/ipv4/ip_forward") as f:
            if f.read().strip() != self.ip_forward:
                out.append("net.ipv4.ip_forward changed")
        for tool in IPTABLES:
            old, new = self.rules[tool], Rules.read(tool)
            out += [f"{tool} rule added: {r}" for r in sorted(new.rules - old.rules)]
            out += [f"{tool} chain added: {t} {c}" for t, c in sorted(new.chains - old.chains)]
            out += [f"{tool} table added: {t}" for t in sorted(new.tables - old.tables)]
            out += [f"{tool} {t} {c} policy changed to {p}" for (t, c), p in sorted(new.policies.items())
                    if old.policies.get((t, c), p) != p]
        return out


# -- the peer -------------------------------------------------------------------------------

def make_peer() -> None:
    """The veth pair to the peer namespace; what the containers ping."""
    run(["ip", "netns", "add", PEER_NS])
    run(["ip", "link", "add", UPLINK, "type", "veth", "peer", "name", PEER_DEV, "netns", PEER_NS])
    for dev, ns in ((UPLINK, None), (PEER_DEV, PEER_NS)):
        # no IPv6 chatter (router solicitations, DAD) on the measured uplink
        pre = ["ip", "netns", "exec", ns] if ns else []
        run([*pre, "sysctl", "-q", "-w", f"net.ipv6.conf.{dev}.disable_ipv6=1"], check=False)
    run(["ip", "addr", "add", UPLINK_NET[0], "dev", UPLINK])
    run(["ip", "link", "set", UPLINK, "up"])
    inside = ["ip", "-n", PEER_NS]
    run([*inside, "addr", "add", UPLINK_NET[1], "dev", PEER_DEV])
    run([*inside, "link", "set", PEER_DEV, "up"])
    run([*inside, "link", "set", "lo", "up"])
    for net in ROUTES_BACK:
        run([*inside, "route", "add", net, "via", UPLINK_NET[0].split("/")[0]])


def remove_peer() -> None:
    delete_link(UPLINK)
    if PEER_NS in netns_names():
        run(["ip", "netns", "del", PEER_NS], check=False)


def resolve_peer() -> None:
    """Resolve the peer's address on the uplink before containers ping at once: the first
    packets of several containers waiting behind one ARP resolution are another test's
    subject (see helpers.resolve_peer)."""
    r = run(["ping", "-n", "-q", "-c", "1", "-W", "2", PEER_IP], check=False, timeout=10)
    assert r.returncode == 0, r.stdout + r.stderr


# -- the runtimes ---------------------------------------------------------------------------

def busybox_ping(n: int, interval: str = "0.2") -> list[str]:
    return ["ping", "-q", "-c", str(n), "-i", interval, "-W", "2", PEER_IP]


def ping_ok(r, n: int) -> None:
    """busybox ping's summary: all n answered."""
    out = r.stdout if isinstance(r.stdout, str) else ""
    assert r.returncode == 0 and f"{n} packets received" in out, (r.returncode, out, r.stderr)


class Runtime:
    """A private runtime: its CLI with the environment that keeps it private, the containers
    it made (removed at the end of each test), the socket mace is to ask."""

    name = ""
    cgroup = ""                       # the parent cgroup of its containers
    rm = ("rm", "-f")                 # remove a container at once (sleep ignores SIGTERM as PID 1)

    def __init__(self, root: str):
        self.root = root
        self.socket = ""
        self.made: list[str] = []
        self.networks: list[str] = []

    def cli(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def __call__(self, *args, check=True, timeout=CMD_TIMEOUT) -> subprocess.CompletedProcess:
        return run([*self.cli(), *map(str, args)], check=check, timeout=timeout, env=self.env())

    def container(self, name: str, *opts, start=True) -> str:
        """A container from the busybox image that sleeps; returns its ID."""
        verb = "run" if start else "create"
        own = self.always() + ([] if "--network" in opts else self.run_opts())
        cid = self(verb, *(["-d"] if start else []), "--name", name, "--cap-add", "NET_RAW", "--pull=never",
                   *own, *opts, IMAGE, "sleep", LIFETIME).stdout.strip().splitlines()[-1]
        self.made.append(name)
        return cid

    def run_opts(self) -> list[str]:
        """Options of every container that names no network of its own."""
        return []

    def always(self) -> list[str]:
        """Options of every container."""
        return []

    def pid(self, name: str) -> int:
        return int(self("inspect", "-f", "{{.State.Pid}}", name).stdout.strip() or 0)

    def sandbox(self, name: str) -> int:
        """The inode of the container's network namespace (what reports call netns)."""
        return os.stat(f"/proc/{self.pid(name)}/ns/net").st_ino

    def exec_ping(self, name: str, n: int, interval: str = "0.2") -> subprocess.CompletedProcess:
        r = self("exec", name, *busybox_ping(n, interval), check=False, timeout=30 + n)
        ping_ok(r, n)
        return r

    def popen_ping(self, name: str, n: int, interval: str = "0.2") -> subprocess.Popen:
        return subprocess.Popen([*self.cli(), "exec", name, *busybox_ping(n, interval)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=self.env())

    def remove_containers(self) -> None:
        for name in reversed(self.made):
            self(*self.rm, name, check=False)
        self.made.clear()
        for net in self.networks:
            self("network", "rm", net, check=False)
        self.networks.clear()
        self.kill_strays()

    def kill_strays(self) -> None:
        """Container processes that outlived their removal (found by their cgroup)."""
        kill_contained(re.compile(rf"/{re.escape(self.cgroup)}(/|$)"))



class Docker(Runtime):
    name = "docker"
    cgroup = DOCKER_CGROUP

    def __init__(self, root: str):
        super().__init__(root)
        self.dockerd = need("dockerd")
        # the CLI of the daemon's own package (Debian's: /usr/bin), not another one earlier on PATH
        own = [p for p in (os.path.join(os.path.dirname(self.dockerd), "docker"), "/usr/bin/docker")
               if os.path.exists(p)]
        self.docker = own[0] if own else need("docker")
        self.socket = os.path.join(root, "docker.sock")
        self.proc: subprocess.Popen | None = None
        self.log = os.path.join(root, "dockerd.log")

    def cli(self) -> list[str]:
        return [self.docker, "-H", f"unix://{self.socket}"]

    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_CONFIG": os.path.join(self.root, "cli")}

    def start(self, busybox: str) -> None:
        present = links()
        for br in FOREIGN_BRIDGES[:1]:
            if br in present:
                pytest.fail(f"this machine already has {br}: another Docker daemon's bridge; "
                            "these tests run their own daemon and touch no other", pytrace=False)
        run(["ip", "link", "add", DOCKER_BRIDGE, "type", "bridge"])
        run(["ip", "addr", "add", DOCKER_BRIDGE_IP, "dev", DOCKER_BRIDGE])
        run(["ip", "link", "set", DOCKER_BRIDGE, "up"])
        config = os.path.join(self.root, "daemon.json")
        with open(config, "w") as f:
            json.dump({"log-level": "warn", "live-restore": False, "cgroup-parent": f"/{DOCKER_CGROUP}"}, f)
        argv = [self.dockerd, "--data-root", os.path.join(self.root, "data"),
                "--exec-root", os.path.join(self.root, "exec"),
                "--pidfile", os.path.join(self.root, "docker.pid"),
                "-H", f"unix://{self.socket}", "--bridge", DOCKER_BRIDGE,
                "--default-address-pool", f"base={DOCKER_POOL},size=24",
                "--config-file", config]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         env=self.env(), start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while self("version", check=False, timeout=10).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"dockerd did not start (exit {self.proc.poll()}):\n{_tail(self.log)}",
                            pytrace=False)
            time.sleep(0.2)
        tar = rootfs_tar(self.root, busybox)
        self("import", "--change", 'CMD ["/bin/sleep", "600"]', tar, f"{IMAGE}:latest")

    def network(self) -> str:
        """The user-defined network of this run (its bridge named by us)."""
        self("network", "create", "--subnet", DOCKER_USER_SUBNET,
             "-o", f"com.docker.network.bridge.name={DOCKER_USER_BRIDGE}", f"{PREFIX}-net")
        self.networks.append(f"{PREFIX}-net")
        return f"{PREFIX}-net"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            ids = self("ps", "-aq", check=False, timeout=20).stdout.split()
            if ids:
                self("rm", "-f", *ids, check=False)
            for net in self("network", "ls", "-q", "--filter", "type=custom", check=False,
                            timeout=20).stdout.split():
                self("network", "rm", net, check=False)
        stop_child(self.proc)
        self.kill_strays()
        delete_link(DOCKER_USER_BRIDGE)
        delete_link(DOCKER_BRIDGE)


class Podman(Runtime):
    name = "podman"
    cgroup = PODMAN_CGROUP
    rm = ("rm", "-f", "-t", "0")

    def __init__(self, root: str):
        super().__init__(root)
        self.podman = need("podman")
        self.socket = os.path.join(root, "podman.sock")
        self.proc: subprocess.Popen | None = None
        self.log = os.path.join(root, "podman-service.log")
        self.conf = os.path.join(root, "containers.conf")
        self.storage_conf = os.path.join(root, "storage.conf")
        self.registries = os.path.join(root, "registries.conf")

    def cli(self) -> list[str]:
        return [self.podman, "--root", os.path.join(self.root, "proot"),
                "--runroot", os.path.join(self.root, "prun")]

    def env(self) -> dict[str, str]:
        return {**os.environ, "CONTAINERS_CONF": self.conf,
                "CONTAINERS_STORAGE_CONF": self.storage_conf,
                "CONTAINERS_REGISTRIES_CONF": self.registries}

    def run_opts(self) -> list[str]:
        return ["--network", PODMAN_NET]

    def always(self) -> list[str]:
        return ["--cgroup-parent", f"/{PODMAN_CGROUP}"]

    def write_config(self) -> None:
        for d in ("pnet", "ptmp"):
            os.makedirs(os.path.join(self.root, d), exist_ok=True)
        with open(self.conf, "w") as f:
            # podman raises root's containers' open files and processes to its maxima, which
            # a sandbox without CAP_SYS_RESOURCE cannot grant (runc then fails): low limits
            # instead, which any sandbox can (sleep and a ping need a handful)
            ulimits = '"nofile=1024:1024", "nproc=1024:1024"'
            f.write(f"""[containers]
log_driver = "k8s-file"
default_ulimits = [{ulimits}]

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "{self.root}/ptmp"

[network]
network_backend = "netavark"
network_config_dir = "{self.root}/pnet"
default_subnet = "{PODMAN_DEFAULT_SUBNET}"
default_subnet_pools = [{{"base" = "{PODMAN_POOL}", "size" = 24}}]
""")
        with open(self.storage_conf, "w") as f:
            f.write(f"""[storage]
driver = "overlay"
graphroot = "{self.root}/proot"
runroot = "{self.root}/prun"
""")
        with open(self.registries, "w") as f:
            f.write("unqualified-search-registries = []\n")

    def start(self, busybox: str) -> None:
        if FOREIGN_BRIDGES[1] in links():
            pytest.fail(f"this machine already has {FOREIGN_BRIDGES[1]}: another Podman's bridge",
                        pytrace=False)
        self.write_config()
        self("network", "create", "--disable-dns", "--subnet", PODMAN_SUBNET, PODMAN_NET)
        self.name_bridge()
        self("import", rootfs_tar(self.root, busybox), f"localhost/{IMAGE}:latest")
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([*self.cli(), "system", "service", "--time=0",
                                          f"unix://{self.socket}"],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         env=self.env(), start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while not _answers(self.socket, "/_ping"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"podman system service did not start (exit {self.proc.poll()}):\n"
                            + _tail(self.log), pytrace=False)
            time.sleep(0.2)

    def name_bridge(self) -> None:
        """Give the network's bridge this run's name (podman 4.3 has no --interface-name; its
        network file has the field), before any container or the service reads the file."""
        path = os.path.join(self.root, "pnet", f"{PODMAN_NET}.json")
        with open(path) as f:
            config = json.load(f)
        config["network_interface"] = PODMAN_BRIDGE
        with open(path, "w") as f:
            json.dump(config, f, indent=5)
        got = json.loads(self("network", "inspect", PODMAN_NET).stdout)[0]
        assert got.get("network_interface") == PODMAN_BRIDGE, got

    def stop(self) -> None:
        try:
            ids = self("ps", "-aq", check=False, timeout=30).stdout.split()
            if ids:
                self(*self.rm, *ids, check=False)
            self("network", "rm", "-f", PODMAN_NET, check=False)
        finally:
            stop_child(self.proc)
            self.kill_strays()
            delete_link(PODMAN_BRIDGE)


def _tail(path: str, n: int = 30) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def _answers(sock: str, path: str) -> bool:
    """Whether an HTTP server on Unix socket `sock` answers GET `path` with 200."""
    import socket

    if not os.path.exists(sock):
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            s.connect(sock)
            s.sendall(f"GET {path} HTTP/1.0\r\nHost: d\r\n\r\n".encode())
            status = s.recv(64).split(b"\r\n", 1)[0].split()
            return len(status) >= 2 and status[0].startswith(b"HTTP/1.") and status[1] == b"200"
    except OSError:
        return False


# -- the session ----------------------------------------------------------------------------

class Session:
    """One test module's runtimes, peer and directory; started lazily, torn down once."""

    def __init__(self):
        self.root = ""
        self.host: HostState | None = None
        self.busybox = ""
        self.runtimes: dict[str, Runtime] = {}
        self.broken: dict[str, str] = {}
        self.prepared = False

    def prepare(self) -> None:
        if self.prepared:
            return
        self._once("setup", self._prepare)
        self.prepared = True

    def _prepare(self) -> None:
        for tool in ("ip", "ping", "umount"):
            need(tool)
        self.busybox = static_busybox()
        remove_stale()
        live = sorted({m.group(1) for m in map(STALE_RE.match, links()) if m} - {str(os.getpid())})
        if live:
            pytest.fail(f"another run of the runtime tests (pid {', '.join(live)}) is going on: its "
                        "daemons use the same addresses; run one at a time", pytrace=False)
        self.host = HostState.take()
        self.root = tempfile.mkdtemp(prefix=f"mace-rt-{os.getpid()}-", dir="/tmp")
        os.chmod(self.root, 0o711)
        self.host.save(os.path.join(self.root, HOST_STATE))
        make_peer()

    def runtime(self, kind: str) -> Runtime:
        self.prepare()
        if kind not in self.runtimes:
            rt = Docker(self.root) if kind == "docker" else Podman(self.root)
            self.runtimes[kind] = rt        # from here on, the teardown stops it
            self._once(kind, lambda: rt.start(self.busybox))
        if kind in self.broken:
            pytest.fail(self.broken[kind], pytrace=False)
        return self.runtimes[kind]

    def _once(self, what: str, step) -> None:
        """Run a setup step once: a step that failed fails every test that needs it, with its
        first message, instead of being retried on a half-made session."""
        if what in self.broken:
            pytest.fail(self.broken[what], pytrace=False)
        try:
            step()
        except BaseException as e:      # noqa: B036 - pytest.fail and skip are BaseExceptions
            if isinstance(e, pytest.skip.Exception):
                raise
            self.broken[what] = f"{what} failed earlier in this session: {e}"
            raise

    def teardown(self) -> list[str]:
        if not self.root:
            return []
        for rt in reversed(list(self.runtimes.values())):
            try:
                rt.stop()
            except Exception as e:      # noqa: BLE001 - the rest of the teardown must run
                print(f"stopping {rt.name}: {e}", file=sys.stderr)
        purge(self.root, PREFIX, keep_dir=True)
        if self.host is not None:
            self.host.restore()
        left = leftovers(self.root, self.host)
        if not mounts_under(self.root):
            shutil.rmtree(self.root, ignore_errors=True)
        return left


def purge(root: str, prefix: str, keep_dir: bool = False) -> None:
    """Remove what is left of one run (its directory `root`, its names `prefix`-*) once its
    runtimes are stopped or dead: processes that name the directory (daemons, containerd,
    shims, conmon), processes in the run's cgroups (containers), mounts, cgroups, links,
    namespaces, and the directory itself unless `keep_dir`."""
    for pid, _cmd in processes_naming(root):
        stop_pid(pid, 5)
    kill_contained(re.compile(rf"/{re.escape(prefix)}-(docker|podman)(/|$)"))
    unmount_under(root)
    for path in cgroups(re.compile(rf"^{re.escape(prefix)}-")):
        remove_cgroup(path)
    for name in links():
        if name.startswith(f"{prefix}-"):
            delete_link(name)
    for name in netns_names():
        if name.startswith(f"{prefix}-"):
            run(["ip", "netns", "del", name], check=False)
    if not keep_dir and not mounts_under(root):
        shutil.rmtree(root, ignore_errors=True)


def leftovers(root: str, host: HostState | None) -> list[str]:
    """Whatever of this run is still there."""
    out = [f"link {n}" for n in links() if n.startswith(f"{PREFIX}-")]
    out += [f"netns {n}" for n in netns_names() if n.startswith(f"{PREFIX}-")]
    out += [f"cgroup {p}" for p in cgroups(re.compile(rf"^{PREFIX}-"))]
    out += [f"process {pid}: {cmd}" for pid, cmd in processes_naming(root)] if root else []
    out += [f"mount {m}" for m in mounts_under(root)] if root else []
    if host is not None:
        out += host.changes()
    return out


def remove_stale() -> list[str]:
    """Remove what runs killed outright (SIGKILL) left, recognised by a creating PID that is
    gone: containers through their runtime where it still answers, then purge()."""

    def dead(pid: str) -> bool:
        return not os.path.exists(f"/proc/{pid}")

    runs = {}
    for entry in os.listdir("/tmp"):
        m = DIR_RE.match(entry)
        if m and dead(m.group(1)):
            runs[m.group(1)] = os.path.join("/tmp", entry)
    for name in list(links()) + netns_names() + [os.path.basename(p) for p in cgroups(STALE_RE)]:
        m = STALE_RE.match(name)
        if m and dead(m.group(1)):
            runs.setdefault(m.group(1), "")
    for pid, root in runs.items():
        host = None
        if root:
            host = HostState.load(os.path.join(root, HOST_STATE))
            _remove_containers_of(root)
        # a run without a directory left only names: its root matches no process or mount
        purge(root or f"/nonexistent/mace-rt-{pid}", f"mr{pid}")
        if host is not None:
            host.restore()
    return [root or f"mr{pid}-*" for pid, root in runs.items()]


def _remove_containers_of(root: str) -> None:
    """A dead run's containers, removed by its runtimes if they still answer, so that they
    release what they hold (netns files, veths, mounts)."""
    if shutil.which("dockerd") and _answers(os.path.join(root, "docker.sock"), "/_ping"):
        d = Docker(root)
        ids = d("ps", "-aq", check=False, timeout=20).stdout.split()
        if ids:
            d(*d.rm, *ids, check=False)
    if shutil.which("podman") and os.path.exists(os.path.join(root, "containers.conf")):
        Podman(root)("rm", "-a", "-f", "-t", "0", check=False)


# -- running mace ---------------------------------------------------------------------------

DISCOVERY = re.compile(r"^netns (\d+) \((.+)\): (\S+) ⇄ (\S+)(?: → (\S+))? → (\S+)$")


class Trace:
    """`mace trace` running, its stdout and stderr read as they come."""

    def __init__(self, *args):
        self.argv = [sys.executable, "-m", "mace", "trace", *map(str, args)]
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, encoding="utf-8", errors="replace")
        self.errs = Lines(self.proc.stderr)
        self.outs = Lines(self.proc.stdout, self.errs.cond)

    def text(self) -> str:
        return "\n".join(self.errs.lines)

    def wait_err(self, pattern: str, count: int = 1, timeout: float = WAIT) -> list[str]:
        pat = re.compile(pattern)

        def hits(lines):
            found = [line for line in lines if pat.search(line)]
            return found if len(found) >= count else None

        found = self.errs.wait(hits, timeout, self.proc, step=0.1)
        if not found:
            pytest.fail(f"no {count} × {pattern!r} on stderr within {timeout} s "
                        f"(exit {self.proc.poll()}):\n{self.text()}")
        return found

    def ready(self, targets: int) -> list[str]:
        """The discovery lines: once they are out, every packet is traced."""
        lines = self.wait_err(DISCOVERY.pattern, targets, timeout=30)
        time.sleep(0.5)
        return lines

    def finish(self, timeout: float = WAIT) -> int:
        rc = finish(self.proc, timeout, lambda: f"{shlex.join(self.argv)} did not end within "
                                                f"{timeout} s; stderr:\n{self.text()}")
        self.errs.join(5)
        self.outs.join(5)
        return rc

    def reports(self) -> list[dict]:
        return [json.loads(line) for line in self.outs.lines if line.strip()]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def trace_once(*args, timeout: float = 60) -> subprocess.CompletedProcess:
    """mace trace run to completion (the bad-input cases)."""
    argv = [sys.executable, "-m", "mace", "trace", *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def names_container(report: dict, name: str) -> bool:
    """Whether a JSONL report is labelled with container `name`: its `container` field where
    there is one, else its target (`docker:NAME`)."""
    if "container" in report:
        return report["container"].lstrip("/") == name
    return re.search(rf"(^|[:/]){re.escape(name)}$", report["target"]) is not None

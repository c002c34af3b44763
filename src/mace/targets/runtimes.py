"""Targets named through a container runtime: `docker:NAME|ID`, `podman:NAME|ID`,
`containerd:[NAMESPACE/]ID` and `pod:[NAMESPACE/]NAME[/CONTAINER]`.

The runtime is asked whether the container runs and for a process of it; the Target is that
process's /proc/PID/ns/net, as for a PID, with the runtime's name for it (`label` is "web")
and the spec and socket that `reresolve` needs to find it again once a restart has given it
another namespace.

- docker, podman: the Engine API (podman's Docker-compatible one) over its Unix socket:
  `--runtime-socket`, else $DOCKER_HOST (docker) or $CONTAINER_HOST (podman) as unix:///PATH,
  else /run/docker.sock, /var/run/docker.sock (docker) or /run/podman/podman.sock,
  $XDG_RUNTIME_DIR/podman/podman.sock (podman).  A name, a full id or a unique id prefix.
- containerd: `ctr --address SOCKET --namespace NS tasks ls`; NS is "default" unless given
  (Kubernetes' is "k8s.io"); the socket is `--runtime-socket`, else $CONTAINERD_ADDRESS, else
  /run/containerd/containerd.sock.
- pod: a Kubernetes pod through the node's CRI with `crictl` (`pods`, `inspectp`, `ps`); NS is
  "default" unless given (two parts are NAMESPACE/NAME); the socket is `--runtime-socket`, else
  $CONTAINER_RUNTIME_ENDPOINT, else containerd's, CRI-O's or cri-dockerd's.

The Engine API client is the standard library's http.client on an AF_UNIX socket, some forty
lines, rather than the docker SDK and its dependency tree (requests, urllib3, ...) for three GETs.

Example::

    t = resolve("docker:web")
    t.label, t.pid, t.path        # ('web', 4242, '/proc/4242/ns/net')
    ...                           # the container restarts
    t = reresolve(t)              # its new namespace, or None while it is down
"""

from __future__ import annotations

import difflib
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from mace.errors import (
    ContainerNotFound,
    ContainerNotRunning,
    MaceError,
    NoContainerNetwork,
    ResourceError,
    RuntimeUnavailable,
    TargetNotFound,
    UsageError,
)
from mace.targets import netns
from mace.targets.netns import RUNTIME_PREFIXES, Target, _is_netns

TIMEOUT = 5.0               # s for one Engine API request: a daemon that hangs is unavailable
TOOL_TIMEOUT = 15.0         # s for one ctr or crictl command
DEFAULT_API = "1.41"        # Docker 20.10's, podman's compat API's; spoken if /_ping does not say
ENV = {"docker": "DOCKER_HOST", "podman": "CONTAINER_HOST", "containerd": "CONTAINERD_ADDRESS",
       "pod": "CONTAINER_RUNTIME_ENDPOINT"}
DEFAULT_SOCKETS = {
    "docker": ("/run/docker.sock", "/var/run/docker.sock"),
    "podman": ("/run/podman/podman.sock",),            # then $XDG_RUNTIME_DIR's
    "containerd": ("/run/containerd/containerd.sock",),
    "pod": ("/run/containerd/containerd.sock", "/run/crio/crio.sock", "/var/run/cri-dockerd.sock"),
}
START = {"docker": "start dockerd",
         "podman": "start podman's API with `systemctl start podman.socket`",
         "containerd": "start containerd",
         "pod": "start the node's CRI runtime, containerd or CRI-O"}
TOOLS = {"ctr": "install containerd, whose package ships ctr",
         "crictl": "install crictl, from the cri-tools package"}
NOT_RUNNING_HINT = "start it, or trace it by PID once it runs"
HOST_NET_HINT = "it shares the host's devices; mace measures what a container's own network adds"
MAX_SHARE_DEPTH = 8         # container:A whose A is container:B ...: docker forbids loops, be sure
MAX_OTHER_NAMESPACES = 8    # containerd namespaces searched for a container not found in its own


def runtime_of(spec: str) -> str | None:
    """The runtime a spec names ("docker" for `docker:web`), None for a PID, name or path."""
    prefix = spec.strip().partition(":")[0]
    return prefix if prefix in RUNTIME_PREFIXES else None


def resolve(spec: str, runtime_socket: str | None = None, *, timeout: float | None = None) -> Target:
    """The Target of a `docker:`, `podman:`, `containerd:` or `pod:` spec, asking the runtime
    on `runtime_socket` (else its environment variable, else its usual sockets); `timeout`:
    seconds an Engine API request may take (default TIMEOUT)."""
    spec = spec.strip()
    runtime, _, ref = spec.partition(":")
    if runtime not in RUNTIME_PREFIXES:
        raise UsageError(f"{spec!r} names no container runtime",
                         hint="docker:NAME, podman:NAME, containerd:[NS/]ID or pod:[NS/]NAME[/CONTAINER]")
    ref = ref.strip()
    if not ref:
        raise UsageError(f"{spec!r} names no container", hint=f"e.g. {runtime}:web")
    sock = socket_for(runtime, runtime_socket)
    if runtime in ("docker", "podman"):
        return _engine_target(spec, runtime, ref, sock, timeout)
    if runtime == "containerd":
        return _containerd_target(spec, ref, sock)
    return _pod_target(spec, ref, sock)


def reresolve(target: Target, *, timeout: float | None = None) -> Target | None:
    """The target found again, as its spec names it now: after a restart, the container's
    new namespace.  None if it is not running now (or, for a PID, name or path, gone).
    A runtime that cannot be asked raises (RuntimeUnavailable): that is not "stopped"; nor
    is a container the runtime no longer has (ContainerNotFound: removed)."""
    try:
        if target.runtime is None:
            return netns.resolve(target.spec)
        return resolve(target.spec, target.runtime_socket, timeout=timeout)
    except (ContainerNotRunning, TargetNotFound):
        return None


# -- which socket --------------------------------------------------------------------------

@dataclass(frozen=True)
class Socket:
    """A runtime's socket and where mace got it from, for the messages."""

    path: str
    source: str | None = None       # "--runtime-socket", "DOCKER_HOST", ...; None: a default

    def __str__(self) -> str:
        return f"{self.path} ({self.source})" if self.source else self.path


def socket_for(runtime: str, explicit: str | None = None, env: Mapping[str, str] | None = None) -> Socket:
    """Where to ask `runtime`: `explicit` (--runtime-socket), else its environment variable,
    else the first of its usual sockets that exists."""
    env = os.environ if env is None else env
    if explicit:
        return Socket(_unix_path(explicit, "--runtime-socket", runtime, bare=True), "--runtime-socket")
    var = ENV[runtime]
    value = env.get(var, "").strip()
    if value:
        # ctr and crictl take a plain path there too; docker and podman do not
        return Socket(_unix_path(value, var, runtime, bare=runtime in ("containerd", "pod")), var)
    candidates = list(DEFAULT_SOCKETS[runtime])
    if runtime == "podman" and env.get("XDG_RUNTIME_DIR"):
        candidates.append(os.path.join(env["XDG_RUNTIME_DIR"], "podman", "podman.sock"))
    for path in candidates:
        if os.path.exists(path):
            return Socket(path)
    raise RuntimeUnavailable(f"no {_what(runtime)} socket at {' or '.join(candidates)}",
                             hint=f"{START[runtime]}, or {_pointer(runtime)}")


def _unix_path(value: str, source: str, runtime: str, bare: bool) -> str:
    if value.startswith("unix://"):
        path = value[len("unix://"):]
    elif bare and "://" not in value:
        path = value
    elif "://" not in value:
        raise UsageError(f"{source}={value} is not a URL: {runtime} takes unix:///PATH there",
                         hint=f"{source}=unix://{value}")
    else:
        explicit = source.startswith("--")
        raise UsageError(f"{source}{' ' if explicit else '='}{value} is not a Unix socket: mace talks to "
                         f"{_what(runtime)} over unix:///PATH only",
                         hint="give a socket's path" if explicit else
                         f"unset {ENV[runtime]} or give --runtime-socket PATH")
    if not path:
        raise UsageError(f"{source} names no socket path", hint="e.g. unix:///run/docker.sock")
    return path


def _what(runtime: str) -> str:
    return "CRI" if runtime == "pod" else runtime


def _pointer(runtime: str) -> str:
    example = "unix:///PATH" if runtime in ("docker", "podman") else "PATH"
    return f"point mace at its socket: --runtime-socket PATH or {ENV[runtime]}={example}"


def _unavailable(runtime: str, sock: Socket, e: OSError, timeout: float) -> RuntimeUnavailable:
    what = _what(runtime)
    if isinstance(e, PermissionError):
        return RuntimeUnavailable(f"permission denied on {what}'s socket {sock}",
                                  hint=f"run mace as root, or {_pointer(runtime)}")
    if isinstance(e, FileNotFoundError):
        msg = f"no {what} socket at {sock}"
    elif isinstance(e, ConnectionRefusedError):
        msg = f"{what} refused the connection on {sock}: nothing listens there"
    elif isinstance(e, TimeoutError):
        msg = f"{what} did not answer within {timeout:g} s on {sock}"
    else:
        msg = f"cannot talk to {what} on {sock}: {e.strerror or e}"
    return RuntimeUnavailable(msg, hint=f"{START[runtime]}, or {_pointer(runtime)}")


# -- the Engine API (docker, podman) -------------------------------------------------------

def _connect_unix(path: str, timeout: float) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect(path)
    except BaseException:
        s.close()
        raise
    return s


class _UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over an AF_UNIX socket: the Engine API's transport."""

    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = _connect_unix(self.unix_path, self.timeout)


class EngineAPI:
    """The GETs of the Docker Engine API (and of podman's copy) that mace needs."""

    def __init__(self, runtime: str, sock: Socket, timeout: float | None = None):
        self.runtime, self.sock = runtime, sock
        self.timeout = TIMEOUT if timeout is None else timeout
        self._version: str | None = None

    def _request(self, path: str) -> tuple[int, http.client.HTTPMessage, bytes]:
        conn = _UnixHTTPConnection(self.sock.path, self.timeout)
        try:
            conn.request("GET", path, headers={"Accept": "application/json"})
            resp = conn.getresponse()
            return resp.status, resp.headers, resp.read()
        except OSError as e:
            raise _unavailable(self.runtime, self.sock, e, self.timeout) from None
        except http.client.HTTPException as e:
            raise RuntimeUnavailable(f"{self.runtime} on {self.sock} answered with something not HTTP "
                                     f"({type(e).__name__})", hint=self._other()) from None
        finally:
            conn.close()

    def version(self) -> str:
        """The API version to speak: the daemon's own, from /_ping.  A pinned old one would
        be refused by a newer daemon (Docker 29 refuses anything below 1.44), and the fields
        mace reads have not moved since 1.24."""
        if self._version is None:
            status, headers, _ = self._request("/_ping")
            v = headers.get("API-Version", "")
            self._version = v if status == 200 and re.fullmatch(r"1\.\d+", v) else DEFAULT_API
        return self._version

    def get(self, path: str) -> tuple[int, object]:
        status, _, body = self._request(f"/v{self.version()}{path}")
        try:
            return status, json.loads(body) if body else None
        except ValueError:
            raise RuntimeUnavailable(f"{self.runtime} on {self.sock} answered {path} with something not JSON",
                                     hint=self._other()) from None

    def _refused(self, what: str, status: int, data) -> RuntimeUnavailable:
        message = data.get("message") if isinstance(data, dict) else None
        return RuntimeUnavailable(f"{self.runtime} on {self.sock} refused to {what}: {status}"
                                  + (f" {message}" if message else ""),
                                  hint=f"`{self.runtime} info` and the daemon's log may say why")

    def _other(self) -> str:
        return f"is it {self.runtime}'s socket? If not, {_pointer(self.runtime)}"

    def containers(self) -> list[dict]:
        """Every container, running or not (`docker ps -a`)."""
        status, data = self.get("/containers/json?all=1")
        if status != 200 or not isinstance(data, list):
            raise self._refused("list its containers", status, data)
        return [c for c in data if isinstance(c, dict) and c.get("Id")]

    def inspect(self, container_id: str) -> dict | None:
        """`docker inspect ID`; None if there is no such container (any more)."""
        status, data = self.get(f"/containers/{container_id}/json")
        if status == 404:
            return None
        if status != 200 or not isinstance(data, dict):
            raise self._refused(f"inspect {container_id[:12]}", status, data)
        return data


def name_of_netns(inode: int, runtime_socket: str | None = None, *,
                  timeout: float = 1.0) -> dict | None:
    """Which Docker or Podman container, or which Kubernetes pod (through the node's CRI,
    with crictl), runs in the network namespace `inode`, if one does: {"container": name,
    "runtime": ...} (and "pod", "k8s_namespace"), as mace.output.sinks names reports.  For
    the service, whose clients (and --all's containers) are known by their namespace alone.
    Runtimes that are not there or do not answer are skipped: a name is a courtesy, never a
    reason to refuse."""
    pod = _pod_of_netns(inode, runtime_socket)
    if pod is not None:
        return pod
    for runtime in ("docker", "podman"):
        try:
            api = EngineAPI(runtime, socket_for(runtime, runtime_socket), timeout)
            for c in api.containers():
                if isinstance(c.get("State"), str) and c["State"] != "running":
                    continue
                info = api.inspect(c["Id"]) or {}
                pid = (info.get("State") or {}).get("Pid")
                try:
                    if pid and os.stat(f"/proc/{pid}/ns/net").st_ino == inode:
                        return {"container": _name(info), "runtime": runtime}
                except OSError:
                    continue
        except MaceError:
            continue
    return None


def _names(c: dict) -> list[str]:
    return [n.lstrip("/") for n in c.get("Names") or [] if isinstance(n, str)]


def _short(c: dict) -> str:
    names = _names(c)
    return f"{c['Id'][:12]} ({names[0]})" if names else c["Id"][:12]


def _looks_like_id(ref: str) -> bool:
    return re.fullmatch(r"[0-9a-f]{4,64}", ref) is not None


def pick(runtime: str, ref: str, listing: list[dict]) -> dict:
    """The listed container `ref` names, as docker picks: a full id, else a name, else the one
    container whose id starts with it."""
    for c in listing:
        if c["Id"] == ref:
            return c
    for c in listing:
        if ref in _names(c):
            return c
    hits = [c for c in listing if c["Id"].startswith(ref)]
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise ContainerNotFound(f"{runtime} container id prefix {ref!r} is ambiguous: {len(hits)} containers "
                                "start with it",
                                hint="give more of the id, or a name: "
                                     + ", ".join(_short(c) for c in hits[:4]))
    what = "with id or name" if _looks_like_id(ref) else "named"
    raise ContainerNotFound(f"no {runtime} container {what} {ref!r}", hint=_near(runtime, ref, listing))


def _near(runtime: str, ref: str, listing: list[dict]) -> str:
    """"did you mean web?" from the names, and from the ids if `ref` looks like one."""
    choices = {n: n for c in listing for n in _names(c)}
    if _looks_like_id(ref):
        # a mistyped prefix is compared with the ids cut to its length, shown as docker ps shows them
        for c in listing:
            choices.setdefault(c["Id"][:len(ref)], c["Id"][:12])
    close = difflib.get_close_matches(ref, list(choices), n=3, cutoff=0.6)
    if close:
        return "did you mean " + " or ".join(dict.fromkeys(choices[m] for m in close)) + "?"
    if not listing:
        return f"{runtime} has no containers"
    return f"`{runtime} ps -a` lists the containers"


def _mode(info: dict) -> str:
    return str((info.get("HostConfig") or {}).get("NetworkMode") or "")


def _name(info: dict) -> str:
    return str(info.get("Name") or info.get("Id", "")[:12]).lstrip("/")


def _engine_target(spec: str, runtime: str, ref: str, sock: Socket, timeout: float | None = None) -> Target:
    api = EngineAPI(runtime, sock, timeout)
    listing = api.containers()
    ref = ref.lstrip("/")                   # docker's own spelling of names: /web
    info = api.inspect(pick(runtime, ref, listing)["Id"])
    if info is None:                        # removed between the two requests
        raise ContainerNotFound(f"no {runtime} container named {ref!r} (any more)",
                                hint=f"`{runtime} ps -a` lists the containers")
    name = _name(info)
    what = f"{runtime} container {name!r}"
    state = info.get("State") or {}
    pid = state.get("Pid") or 0
    if not state.get("Running") or pid <= 0:
        status = state.get("Status") or ("restarting" if state.get("Restarting") else "stopped")
        raise ContainerNotRunning(f"{what} is not running ({status})", hint=NOT_RUNNING_HINT)
    owner = _network_owner(api, listing, info)
    shares = _name(owner) if owner is not None and owner is not info else None
    mode = _mode(owner if owner is not None else info)
    via = f" (it shares the network of {shares!r})" if shares else ""
    if mode == "host":
        raise NoContainerNetwork(f"{what} uses the host's network{via}: there is no container network to "
                                 "measure", hint=HOST_NET_HINT)
    if mode == "none":
        raise NoContainerNetwork(f"{what} has no network (--network none){via}: nothing leaves it",
                                 hint=f"connect it to a network to measure it: {runtime} network connect "
                                      f"NET {name}")
    if shares is None and mode.startswith("container:"):
        shares = mode.partition(":")[2][:12]     # a container the runtime no longer lists
    key = ((owner or info).get("NetworkSettings") or {}).get("SandboxKey") or None
    path, inode = _netns_path(what, pid, key)
    labels = (info.get("Config") or {}).get("Labels") or {}
    return Target(spec, path, inode, pid, name=name, runtime=runtime,
                  container_id=info.get("Id"), pod=labels.get("io.kubernetes.pod.name"),
                  k8s_namespace=labels.get("io.kubernetes.pod.namespace"), runtime_socket=sock.path,
                  shares=shares)


def _network_owner(api: EngineAPI, listing: list[dict], info: dict) -> dict | None:
    """The container whose network namespace `info` uses: itself, or with --network
    container:OTHER, OTHER (followed further if OTHER shares one too).  None if OTHER is gone."""
    for _ in range(MAX_SHARE_DEPTH):
        mode = _mode(info)
        if not mode.startswith("container:"):
            return info
        try:
            other = pick(api.runtime, mode.partition(":")[2], listing)
        except ContainerNotFound:
            return None
        info = api.inspect(other["Id"])
        if info is None:
            return None
    return info


def _netns_path(what: str, pid: int, sandbox_key: str | None) -> tuple[str, int]:
    """(path, inode) of the runtime's PID's /proc/PID/ns/net, or of the runtime's own namespace
    file where that PID cannot be (mace in another PID namespace than the runtime's)."""
    proc = f"/proc/{pid}/ns/net"
    key = sandbox_key if sandbox_key and _is_netns(sandbox_key) else None
    if _is_netns(proc):
        inode = _inode(proc, what)
        if key is not None and _inode(key, what) != inode:
            # our PID `pid` is another process: the runtime's PIDs are not ours
            return key, _inode(key, what)
        return proc, inode
    if key is not None:
        return key, _inode(key, what)
    if not os.path.exists(f"/proc/{pid}"):
        raise TargetNotFound(f"{what} runs as PID {pid}, which mace's PID namespace does not have",
                             hint="run mace in the host's PID namespace (e.g. docker run --pid=host)")
    raise TargetNotFound(f"cannot open the network namespace of {what} (PID {pid})", hint="run as root")


def _inode(path: str, what: str) -> int:
    try:
        return os.stat(path).st_ino
    except OSError:         # it stopped while we looked
        raise TargetNotFound(f"{what} stopped while mace looked it up", hint=NOT_RUNNING_HINT) from None


def _host_inode() -> int:
    return os.stat("/proc/self/ns/net").st_ino


def _not_host(inode: int, what: str) -> int:
    """NoContainerNetwork if the namespace is the host's (mace's own)."""
    if inode == _host_inode():
        raise NoContainerNetwork(f"{what} uses the host's network: there is no container network to measure",
                                 hint=HOST_NET_HINT)
    return inode


# -- ctr and crictl ------------------------------------------------------------------------

def _run(tool: str, argv: list[str], runtime: str, sock: Socket) -> str:
    """A ctr or crictl command's output; its failures as mace errors."""
    exe = shutil.which(tool)
    if exe is None:
        raise ResourceError(f"{tool} not found", hint=TOOLS[tool])
    if not os.path.exists(sock.path):       # else ctr waits out its dial timeout to say so
        raise _unavailable(runtime, sock, FileNotFoundError(), TOOL_TIMEOUT)
    try:
        r = subprocess.run([exe, *argv], capture_output=True, text=True, timeout=TOOL_TIMEOUT,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise _unavailable(runtime, sock, TimeoutError(), TOOL_TIMEOUT) from None
    except OSError as e:
        raise ResourceError(f"cannot run {exe}: {e.strerror}", hint=TOOLS[tool]) from None
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1].strip()
        if "permission denied" in last.lower():
            raise _unavailable(runtime, sock, PermissionError(), TOOL_TIMEOUT)
        raise RuntimeUnavailable(f"{tool} failed: {last}", hint=f"{START[runtime]}, or {_pointer(runtime)}")
    return r.stdout


def _ctr(sock: Socket, namespace: str, *args: str) -> str:
    return _run("ctr", ["--address", sock.path, "--namespace", namespace, *args], "containerd", sock)


def parse_ctr_tasks(text: str) -> dict[str, tuple[int, str]]:
    """`ctr tasks ls` as {task id: (pid, status)}."""
    tasks = {}
    for line in text.splitlines()[1:]:      # TASK PID STATUS
        fields = line.split()
        if len(fields) >= 3 and fields[1].isdigit():
            tasks[fields[0]] = (int(fields[1]), fields[2])
    return tasks


def _containerd_target(spec: str, ref: str, sock: Socket) -> Target:
    namespace, _, cid = ref.rpartition("/")
    namespace = namespace or "default"
    if not cid or "/" in namespace:
        raise UsageError(f"{spec!r} is not containerd:[NAMESPACE/]ID", hint="e.g. containerd:k8s.io/3fa1b2c3")
    what = f"containerd container {cid!r}"
    tasks = parse_ctr_tasks(_ctr(sock, namespace, "tasks", "ls"))
    if cid not in tasks:
        _containerd_missing(sock, namespace, cid, what)
    pid, status = tasks[cid]
    if status not in ("RUNNING", "PAUSED") or pid <= 0:
        raise ContainerNotRunning(f"{what} is not running ({status.lower()})", hint=NOT_RUNNING_HINT)
    path, inode = _netns_path(what, pid, None)
    return Target(spec, path, _not_host(inode, what), pid, name=cid, runtime="containerd", container_id=cid,
                  runtime_socket=sock.path)


def _containerd_missing(sock: Socket, namespace: str, cid: str, what: str):
    """Raise the error for a container without a task: stopped, in another namespace, unknown."""
    ids = _ctr(sock, namespace, "containers", "ls", "-q").split()
    if cid in ids:
        raise ContainerNotRunning(f"{what} is not running (no task)", hint=NOT_RUNNING_HINT)
    others = [n for n in _ctr(sock, namespace, "namespaces", "ls", "-q").split() if n != namespace]
    for other in others[:MAX_OTHER_NAMESPACES]:
        if cid in _ctr(sock, other, "containers", "ls", "-q").split():
            raise ContainerNotFound(f"no {what} in namespace {namespace!r}",
                                    hint=f"it is in namespace {other!r}: containerd:{other}/{cid}")
    close = difflib.get_close_matches(cid, ids, n=3, cutoff=0.6)
    raise ContainerNotFound(f"no {what} in namespace {namespace!r}",
                            hint=f"did you mean {' or '.join(close)}?" if close else
                            f"`ctr --namespace {namespace} containers ls` lists them; Kubernetes' namespace "
                            "is k8s.io")


def _crictl(sock: Socket, *args: str):
    out = _run("crictl", ["--runtime-endpoint", f"unix://{sock.path}", *args], "pod", sock)
    try:
        return json.loads(out)
    except ValueError:
        raise RuntimeUnavailable(f"crictl {args[0]} printed something not JSON",
                                 hint="mace reads crictl's -o json output; is crictl a current one?"
                                 ) from None


def _meta(item: dict) -> dict:
    return item.get("metadata") or {}


def _pod_target(spec: str, ref: str, sock: Socket) -> Target:
    parts = ref.split("/")
    if len(parts) > 3 or not all(parts):
        raise UsageError(f"{spec!r} is not pod:[NAMESPACE/]NAME[/CONTAINER]",
                         hint="e.g. pod:web, pod:shop/web, pod:shop/web/nginx")
    if len(parts) == 1:
        namespace, name, container = "default", parts[0], None
    else:
        namespace, name, container = parts[0], parts[1], parts[2] if len(parts) == 3 else None
    what = f"pod '{namespace}/{name}'"
    found = _crictl(sock, "pods", "--name", name, "--namespace", namespace, "-o", "json")
    pods = [p for p in found.get("items") or []
            if _meta(p).get("name") == name and _meta(p).get("namespace") == namespace]
    if not pods:
        _pod_missing(sock, namespace, name, what)
    ready = [p for p in pods if p.get("state") == "SANDBOX_READY"]
    if not ready:
        state = str(pods[0].get("state", "not ready")).removeprefix("SANDBOX_").lower()
        raise ContainerNotRunning(f"{what} is not running ({state})",
                                  hint="wait until `kubectl get pod` shows it running, or trace it by PID "
                                       "once it runs")
    sandbox = max(ready, key=lambda p: (_meta(p).get("attempt") or 0, str(p.get("createdAt", ""))))
    path, inode, pid = sandbox_netns(_crictl(sock, "inspectp", "-o", "json", sandbox["id"]), what)
    _not_host(inode, what)
    label, cid = name, sandbox["id"]
    if container is not None:
        cid = _pod_container(sock, sandbox["id"], container, what)
        label = container
    return Target(spec, path, inode, pid, name=label, runtime="cri", container_id=cid, pod=name,
                  k8s_namespace=namespace, runtime_socket=sock.path)


# sandbox id -> its network namespace's inode (None: host network or not found); a
# sandbox keeps its namespace for life, so `crictl inspectp` runs once per sandbox
_SANDBOX_INODES: dict[str, int | None] = {}


def _pod_of_netns(inode: int, runtime_socket: str | None) -> dict | None:
    """The ready pod sandbox whose network namespace is `inode`, named as pod: targets are."""
    if shutil.which("crictl") is None:
        return None
    try:
        sock = socket_for("pod", runtime_socket)
        pods = _crictl(sock, "pods", "--state", "ready", "-o", "json").get("items") or []
        for p in pods:
            sid = p.get("id")
            if not sid:
                continue
            if sid not in _SANDBOX_INODES:
                try:
                    _SANDBOX_INODES[sid] = sandbox_netns(_crictl(sock, "inspectp", "-o", "json", sid),
                                                         f"pod sandbox {sid[:12]}")[1]
                except MaceError:
                    _SANDBOX_INODES[sid] = None
            if _SANDBOX_INODES[sid] == inode:
                name, namespace = _meta(p).get("name"), _meta(p).get("namespace")
                return {"container": name, "runtime": "cri", "pod": name, "k8s_namespace": namespace}
    except MaceError:
        return None
    return None


def sandbox_netns(inspected: dict, what: str) -> tuple[str, int, int | None]:
    """(namespace file, its inode, PID) of a pod sandbox from `crictl inspectp -o json`: the network
    namespace path of its runtime spec if it can be opened from here, else its PID's."""
    status = inspected.get("status") or {}
    options = ((status.get("linux") or {}).get("namespaces") or {}).get("options") or {}
    if options.get("network") in ("NODE", 2):
        raise NoContainerNetwork(f"{what} uses the host's network (hostNetwork): there is no container "
                                 "network to measure", hint=HOST_NET_HINT)
    info = inspected.get("info") or {}
    pid = info.get("pid") if isinstance(info.get("pid"), int) and info.get("pid") > 0 else None
    spec_ns = (((info.get("runtimeSpec") or {}).get("linux") or {}).get("namespaces")) or []
    path = next((n.get("path") for n in spec_ns if n.get("type") == "network" and n.get("path")), None)
    if path and _is_netns(path):
        return path, _inode(path, what), pid
    if pid is not None:
        return (*_netns_path(what, pid, None), pid)
    raise TargetNotFound(f"crictl shows neither a network namespace nor a PID of {what}",
                         hint="trace it by PID or by its netns path (crictl inspectp POD)")


def _pod_missing(sock: Socket, namespace: str, name: str, what: str):
    pods = _crictl(sock, "pods", "-o", "json").get("items") or []
    elsewhere = sorted({_meta(p).get("namespace") for p in pods if _meta(p).get("name") == name} - {None})
    if elsewhere:
        raise ContainerNotFound(f"no {what}", hint=f"it is in namespace {elsewhere[0]!r}: "
                                                   f"pod:{elsewhere[0]}/{name}")
    names = sorted({_meta(p).get("name") for p in pods if _meta(p).get("namespace") == namespace} - {None})
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    raise ContainerNotFound(f"no {what}", hint=f"did you mean {' or '.join(close)}?" if close else
                            f"`crictl pods --namespace {namespace}` lists them")


def _pod_container(sock: Socket, sandbox_id: str, container: str, what: str) -> str:
    """The id of the running container `container` of the pod sandbox."""
    listed = _crictl(sock, "ps", "-a", "--pod", sandbox_id, "-o", "json").get("containers") or []
    mine = [c for c in listed if _meta(c).get("name") == container]
    if not mine:
        names = sorted({_meta(c).get("name") for c in listed} - {None})
        close = difflib.get_close_matches(container, names, n=3, cutoff=0.6)
        raise ContainerNotFound(f"{what} has no container named {container!r}",
                                hint=f"did you mean {' or '.join(close)}?" if close else
                                f"its containers: {', '.join(names) or 'none'}")
    running = [c for c in mine if c.get("state") == "CONTAINER_RUNNING"]
    if not running:
        state = str(mine[0].get("state", "not running")).removeprefix("CONTAINER_").lower()
        raise ContainerNotRunning(f"container {container!r} of {what} is not running ({state})",
                                  hint=NOT_RUNNING_HINT)
    return running[0]["id"]

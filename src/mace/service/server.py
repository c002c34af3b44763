"""`mace serve`: containers enable and read their own latencies, as with the original MACE's
/sys/class/mace/on and /dev/mace, through a Unix socket on the host.

One tracer serves every enabled network namespace.  A caller is known by the socket's peer
(SO_PEERPIDFD, else SO_PEERCRED), and its network namespace is the one that process is in
as the host sees it: no request names a namespace, so a client can enable, disable and read
only its own.  See mace.service.protocol for the wire format.

Threads, and who owns what:

- the event loop (asyncio) owns the connections and each namespace's report queue;
- the engine thread owns the tracer, the plan and the map from container index to
  namespace.  It runs every enable, disable and status request in turn, between polls,
  and attributes each batch of reports before the plan can change under it
  (Tracer.update returns the previous plan's reports), so a report never reaches another
  namespace even when its index is reused;
- the tracer's own drain thread empties the perf rings whatever the two others do.

A queue holds at most `queue_size` reports; a reader that falls behind loses the oldest and
is told how many.  Writers wait on their own connection only: a stuck client never stalls
the tracer or another client.

State (the enabled namespaces, and at a clean stop their unread reports) is kept in a
root-only directory (not the socket's, which containers mount), so a restarted service
resumes measuring the namespaces that still exist.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import hashlib
import tempfile
import errno
import fcntl
import json
import os
import queue
import resource
import secrets
import select
import signal
import socket
import stat
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable

from pyroute2 import IPRoute

from mace.service import protocol as P
from mace._version import __version__
from mace.errors import MaceError, ResourceError, UsageError
from mace.targets.netns import Target, discover
from mace.plan import ContainerPath, Plan
from mace.output.report import REPORT_SIZE, Histogram, coverage, split, unpack
from mace.output.sinks import Sink, jsonl_line
from mace.tracer import DEFAULT_MAX_AGE_NS, DEFAULT_TABLE_SIZE, Tracer

SO_PEERPIDFD = 77                   # Linux 6.5
PIDFD_GET_NET_NAMESPACE = 0xFF04    # _IO(PIDFS_IOCTL_MAGIC, 4), Linux 6.11
DEFAULT_QUEUE = 65536
DEFAULT_MAX_NAMESPACES = 128       # the kernel takes a page of filter text: ~150 veth names
DEFAULT_MAX_CLIENTS = 1024
DEFAULT_STATE_DIR = "/var/lib/mace"   # root's only: never the directory containers mount
PRESENCE_EVERY = 1.0                # s between checks that enabled namespaces still exist
SEND_BATCH = 1024                   # reports per write before waiting for the client
REQUEST_TIMEOUT = 60.0              # s a connection may take to send a complete request
STOP_FLUSH = 2.0                    # s followers get to take their last reports at a stop


@dataclass
class Options:
    uplink: str | None = None
    hops: bool = False
    end_at_queue: bool = False
    table_size: int = DEFAULT_TABLE_SIZE
    max_age_ns: int = DEFAULT_MAX_AGE_NS
    ring_pages: int | None = None
    queue_size: int = DEFAULT_QUEUE
    max_namespaces: int = DEFAULT_MAX_NAMESPACES
    max_clients: int = DEFAULT_MAX_CLIENTS
    mode: int = 0o666
    state_dir: str = DEFAULT_STATE_DIR


class Namespace:
    """An enabled network namespace: its path through the host and its report queue.

    The queue is a ring of the correlator's packed reports (REPORT_SIZE bytes each, its
    memory bounded by `size` and taken only as reports arrive).  Reports are numbered from
    0 as they arrive; `base` is the number of the oldest still held, so a reader's cursor
    below it means reports were dropped."""

    def __init__(self, inode: int, path: ContainerPath, veth_index: int, size: int, *,
                 pid: int | None, since: float | None = None):
        self.inode = inode
        self.path = path
        self.veth_index = veth_index
        self.pid = pid
        self.since = since if since is not None else time.time()
        self.index = -1                     # container index in the tracer's plan (engine)
        self.size = size
        self.ring = bytearray()             # grows to size * REPORT_SIZE, then wraps
        self.base = 0
        self.end = 0
        self.read_at = 0                    # what `read` without --follow returns next
        self.dropped = 0
        self.received = 0
        self.closed: str | None = None      # why it was disabled
        self.discarded = 0                  # unread reports freed when it was disabled
        self.waiters: set[asyncio.Event] = set()

    @property
    def label(self) -> str:
        return f"netns:{self.inode}"

    @property
    def queued(self) -> int:
        return self.end - self.base

    def describe(self, uplink: str) -> str:
        p = self.path
        return " → ".join([f"{p.inner} ⇄ {p.veth}"] + ([p.bridge] if p.bridge else []) + [uplink])

    def push(self, raw: bytes) -> None:
        """Append packed reports; beyond `size`, the oldest go."""
        R, size = REPORT_SIZE, self.size
        n = len(raw) // R
        self.received += n
        if n > size:
            raw = raw[(n - size) * R:]
            self.end += n - size
            n = size
        if self.end + n <= size and len(self.ring) == self.end * R:
            self.ring += raw                    # still filling for the first time
        else:
            if len(self.ring) < size * R:
                self.ring += bytes(size * R - len(self.ring))
            done = 0
            while done < n:
                pos = (self.end + done) % size
                k = min(n - done, size - pos)
                self.ring[pos * R:(pos + k) * R] = raw[done * R:(done + k) * R]
                done += k
        self.end += n
        if self.end - self.base > size:
            self.dropped += self.end - size - self.base
            self.base = self.end - size
        for w in self.waiters:
            w.set()

    def take(self, cursor: int, limit: int) -> tuple[int, bytes, int]:
        """(dropped, packed reports, new cursor) from `cursor` on, at most `limit`."""
        R, size = REPORT_SIZE, self.size
        dropped = max(0, self.base - cursor)
        cursor += dropped
        n = max(0, min(limit, self.end - cursor))
        out = bytearray()
        while len(out) < n * R:
            pos = (cursor + len(out) // R) % size
            k = min(n - len(out) // R, size - pos)
            out += self.ring[pos * R:(pos + k) * R]
        return dropped, bytes(out), cursor + n

    def close(self, reason: str) -> None:
        self.closed = reason
        self.discarded = max(0, self.end - max(self.read_at, self.base))
        self.ring = bytearray()
        self.base = self.end
        for w in self.waiters:
            w.set()

    def saved(self, queue: bool = True) -> dict:
        """What a restarted service needs to resume it (with `queue`, its unread reports)."""
        out = {"inode": self.inode, "inner": self.path.inner, "veth": self.path.veth,
               "veth_index": self.veth_index, "bridge": self.path.bridge, "since": self.since,
               "pid": self.pid}
        if queue:
            _, unread, _ = self.take(self.read_at, self.size)
            out.update(unread=base64.b64encode(unread).decode(), dropped=self.dropped)
        return out


def _lines(sink: Sink, raw: bytes, ns: Namespace) -> str:
    return "".join(jsonl_line(r, sink.wall(r), ns.inode, ns.label, sink.hops) for r in unpack(raw))


# -- who is calling ---------------------------------------------------------------------------


class Peer:
    """The process at the other end of a connection, held by a pidfd so that its PID cannot
    be recycled under us."""

    def __init__(self, sock: socket.socket):
        cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        self.pid, self.uid, _ = struct.unpack("3i", cred)
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4)
            self.pidfd = struct.unpack("i", raw)[0]
        except OSError as e:
            if e.errno != errno.ENOPROTOOPT:
                # the peer is gone (its PID may already name another process)
                raise P.ProtocolError(P.IDENTITY, "the connecting process has already exited",
                                      hint="keep the process alive while it talks to the service") from None
            # kernels before 6.5: the PID may have been reused between connect() and here
            try:
                self.pidfd = os.pidfd_open(self.pid)
            except OSError:
                raise P.ProtocolError(P.IDENTITY, "the connecting process has already exited",
                                      hint="keep the process alive while it talks to the service") from None

    def netns(self) -> int:
        """An fd of the peer's network namespace as of now (the caller closes it)."""
        try:
            return fcntl.ioctl(self.pidfd, PIDFD_GET_NET_NAMESPACE)
        except OSError as e:
            if e.errno == errno.ESRCH:
                raise P.ProtocolError(P.IDENTITY, "the connecting process has exited",
                                      hint="keep the process alive while it talks to the service") from None
            if e.errno not in (errno.ENOTTY, errno.EINVAL):
                raise P.ProtocolError(P.IDENTITY, f"cannot find the caller's namespace: {e.strerror}",
                                      hint="the service must run as root on the host") from None
        # kernels before 6.11: through /proc, then make sure the PID is still that process
        fd = os.open(f"/proc/{self.pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        if select.select([self.pidfd], [], [], 0)[0]:
            os.close(fd)
            raise P.ProtocolError(P.IDENTITY, "the connecting process has exited",
                                  hint="keep the process alive while it talks to the service")
        return fd

    def close(self) -> None:
        os.close(self.pidfd)


# -- the engine: the tracer and everything that changes its plan ------------------------------


class Engine(threading.Thread):
    """Runs requests that touch the tracer, in order, between polls; hands each batch of
    reports to the event loop already attributed to its namespace."""

    def __init__(self, opts: Options, deliver: Callable, closed: Callable,
                 loop: asyncio.AbstractEventLoop, save: Callable):
        super().__init__(name="mace-engine", daemon=True)
        self.opts = opts
        self._deliver = deliver
        self._closed = closed
        self.loop = loop
        self._save = save
        self.commands: queue.Queue = queue.Queue()
        self.tracer: Tracer | None = None
        self.slots: list[Namespace | None] = []
        self.enabled: dict[int, Namespace] = {}     # read by the loop, changed here only
        self.host: tuple[str, int] | None = None    # host namespace path and inode
        self.uplink: str | None = opts.uplink
        self.stopping = False
        self.error: BaseException | None = None
        self._checked = time.monotonic()

    # -- requests from the loop -----------------------------------------------------------

    def call(self, fn: Callable, *args) -> "asyncio.Future":
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if self.stopping or not self.is_alive():
            fut.set_exception(P.ProtocolError(P.STOPPING, "the service is stopping",
                                              hint="try again once it is back"))
            return asyncio.wrap_future(fut, loop=self.loop)
        self.commands.put((fn, args, fut))
        if self.tracer is not None:
            self.tracer.interrupt()
        return asyncio.wrap_future(fut, loop=self.loop)

    def run(self) -> None:
        try:
            while True:
                self._run_commands()
                if self.stopping:
                    self._refuse_queued()
                    return
                if self.tracer is not None:
                    self._dispatch(self.tracer.poll(200, raw=True))
                else:
                    try:
                        fn, args, fut = self.commands.get(timeout=PRESENCE_EVERY)
                    except queue.Empty:
                        pass
                    else:
                        self._run_one(fn, args, fut)
                if time.monotonic() - self._checked >= PRESENCE_EVERY:
                    self._checked = time.monotonic()
                    self._check_present()
        except BaseException as e:      # noqa: BLE001 - the loop stops the service on it
            self.error = e
            self.stopping = True
            try:
                self._stop_tracer()
            except BaseException:       # noqa: BLE001 - it failed already; release what we can
                pass
            self._refuse_queued()
            self.loop.call_soon_threadsafe(self._closed, None, "engine failed")

    def _refuse_queued(self) -> None:
        while True:
            try:
                _, _, fut = self.commands.get_nowait()
            except queue.Empty:
                return
            if fut.set_running_or_notify_cancel():
                fut.set_exception(P.ProtocolError(P.STOPPING, "the service is stopping",
                                                  hint="try again once it is back"))

    def _run_commands(self) -> None:
        while True:
            try:
                fn, args, fut = self.commands.get_nowait()
            except queue.Empty:
                return
            self._run_one(fn, args, fut)

    def _run_one(self, fn, args, fut) -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn(*args))
        except BaseException as e:      # noqa: BLE001 - the caller's request fails, we go on
            fut.set_exception(e)

    def _dispatch(self, chunks: list[bytes]) -> None:
        if not chunks:
            return
        batch = [(self.slots[i], raw) for i, raw in split(chunks).items()
                 if i < len(self.slots) and self.slots[i] is not None]
        if batch:
            self.loop.call_soon_threadsafe(self._deliver, batch)

    # -- enabling and disabling -----------------------------------------------------------

    def enable(self, inode: int, ns_path: str, pid: int | None) -> tuple[Namespace, bool]:
        """Discover the namespace's path to the host and trace it.  (ns, was enabled)"""
        if self.find(inode) is not None:
            return self.enabled[inode], True
        self._room()
        try:
            topo = discover([Target(f"netns:{inode}", ns_path, inode, pid)], uplink=self.uplink)
        except MaceError as e:
            raise P.ProtocolError(P.TOPOLOGY, str(e), e.hint or "") from None
        c = topo.containers[0].main
        own = os.stat("/proc/self/ns/net")
        host = os.stat(topo.host_ns)
        if (host.st_dev, host.st_ino) != (own.st_dev, own.st_ino):
            # the devices mace filters on must be the host's own: a namespace built by its
            # user could otherwise name its veth after another container's
            raise P.ProtocolError(P.TOPOLOGY, "this namespace's veth leads to another namespace "
                                              "than the service's",
                                  hint="run `mace serve` in the host namespace the containers' veths are in")
        if self.uplink is not None and topo.uplink != self.uplink:
            raise P.ProtocolError(P.TOPOLOGY, f"this namespace leaves through {topo.uplink}, the "
                                              f"service traces {self.uplink}",
                                  hint="start the service with --uplink to choose")
        ns = Namespace(inode, ContainerPath(f"netns:{inode}", c.inner, c.veth, c.bridge),
                       c.veth_index, self.opts.queue_size, pid=pid)
        self._add(ns, (topo.host_ns, topo.host_ns_inode), topo.uplink)
        return ns, False

    def restore(self, saved: dict) -> list[str]:
        """Re-enable namespaces a previous service saved, if their veth is still the same
        interface.  Returns a line per namespace for the log."""
        out = []
        uplink = saved.get("uplink")
        if self.uplink is not None and uplink != self.uplink:
            return [f"not resuming: the saved state traced {uplink}, this service {self.uplink}"]
        present = self._host_links("/proc/self/ns/net")
        if present is None:
            return ["not resuming: cannot list the host's links"]
        for item in saved.get("namespaces", []):
            if not isinstance(item, dict) or not {"inode", "inner", "veth", "veth_index"} <= set(item):
                out.append("a malformed saved namespace was skipped")
                continue
            if (item["veth"], item["veth_index"]) not in present:
                lost = len(base64.b64decode(item.get("unread", ""))) // REPORT_SIZE
                out.append(f"netns {item['inode']}: gone since the last run; "
                           f"{lost} unread reports discarded")
                continue
            ns = Namespace(item["inode"], ContainerPath(f"netns:{item['inode']}", item["inner"],
                                                        item["veth"], item.get("bridge")),
                           item["veth_index"], self.opts.queue_size, pid=item.get("pid"),
                           since=item.get("since"))
            ns.push(base64.b64decode(item.get("unread", "")))
            ns.received = 0
            ns.dropped = item.get("dropped", 0)
            try:
                self._room()
                self._add(ns, ("/proc/self/ns/net", os.stat("/proc/self/ns/net").st_ino), uplink)
            except (P.ProtocolError, MaceError) as e:
                out.append(f"netns {ns.inode}: cannot resume: {e}")
                continue
            out.append(f"netns {ns.inode}: resumed ({ns.describe(uplink)}), "
                       f"{ns.queued} unread reports kept")
        return out

    def _room(self) -> None:
        if len(self.enabled) >= self.opts.max_namespaces:
            raise P.ProtocolError(P.BUSY, f"the service already traces {len(self.enabled)} namespaces",
                                  hint="its --max-namespaces limit; ask the host's administrator")

    def _add(self, ns: Namespace, host: tuple[str, int], uplink: str) -> None:
        index = self.slots.index(None) if None in self.slots else len(self.slots)
        containers = [s.path if s else None for s in self.slots] + [None] * (index + 1 - len(self.slots))
        containers[index] = ns.path
        plan = Plan(containers, uplink, hops=self.opts.hops, end_at_queue=self.opts.end_at_queue)
        try:
            if self.tracer is None:
                tracer = Tracer(plan, table_size=self.opts.table_size,
                                max_age_ns=self.opts.max_age_ns, ring_pages=self.opts.ring_pages)
                tracer.open(bridge=True)
                try:
                    tracer.start()
                except BaseException:
                    tracer.close()
                    raise
                self.tracer = tracer
            else:
                self._dispatch(self.tracer.update(plan, raw=True))
        except MaceError as e:
            raise P.ProtocolError(P.FAILED, str(e), e.hint or "") from None
        except OSError as e:
            raise P.ProtocolError(P.FAILED, f"cannot trace: {e.strerror or e}",
                                  hint="see the service's log") from None
        self.host, self.uplink = host, uplink
        if index == len(self.slots):
            self.slots.append(None)
        self.slots[index] = ns
        ns.index = index
        self.enabled[ns.inode] = ns
        self._save()

    def disable(self, ns: Namespace, reason: str) -> None:
        """Stop tracing `ns`; its queue is freed (the loop learns why)."""
        if self.enabled.get(ns.inode) is not ns:
            return
        containers = [s.path if s is not None and s is not ns else None for s in self.slots]
        try:
            if any(containers):
                plan = Plan(containers, self.uplink, hops=self.opts.hops,
                            end_at_queue=self.opts.end_at_queue)
                self._dispatch(self.tracer.update(plan, raw=True))
            else:
                self._stop_tracer()        # the last one: no perf event stays open
                self.host, self.uplink = None, self.opts.uplink
        finally:
            self.slots[ns.index] = None
            del self.enabled[ns.inode]
            self.loop.call_soon_threadsafe(self._closed, ns, reason)
            self._save()

    def _stop_tracer(self) -> None:
        tracer, self.tracer = self.tracer, None
        if tracer is None:
            return
        try:
            self._dispatch(tracer.stop(raw=True))
        finally:
            tracer.close()

    def shutdown(self) -> None:
        """Stop tracing (the last reports go to their queues) and end the thread."""
        self._stop_tracer()
        self.stopping = True

    def find(self, inode: int) -> Namespace | None:
        """The enabled namespace with this inode, if its veth is still the same interface:
        a namespace's inode is reused once it is gone, by then its veth is gone too."""
        ns = self.enabled.get(inode)
        if ns is None or self.host is None:
            return ns
        links = self._host_links(self.host[0])
        if links is not None and (ns.path.veth, ns.veth_index) not in links:
            self.disable(ns, "namespace gone")
            return None
        return ns

    # -- status ---------------------------------------------------------------------------

    def status(self, inode: int) -> dict:
        ns = self.find(inode)
        if ns is None or self.tracer is None:
            return {"state": "disabled"}
        stats = self.tracer.stats()
        counts = stats["containers"][ns.index]
        out = {"state": "enabled", "path": ns.describe(self.uplink),
               "since": round(ns.since, 3)}
        for d, name in enumerate(("egress", "ingress")):
            k = counts[name]
            h = Histogram(self.tracer.correlator.histogram(ns.index, d))
            out[name] = {"reports": k["reports"], "crossed": k["crossed"],
                         "coverage": coverage(k), "p50_ns": h.percentile(50),
                         "p99_ns": h.percentile(99), "max_ns": k["max_ns"],
                         "missed": {m: k[m] for m in ("orphans", "expired", "evicted", "rejected")}}
        out["lost"] = stats["rings"]["lost"]      # ring overflows, for all namespaces alike
        return out

    # -- namespaces that went away --------------------------------------------------------

    def _host_links(self, host_ns: str) -> set[tuple[str, int]] | None:
        try:
            # our own namespace (the usual case) without pyroute2's fork into another
            own = os.stat(host_ns).st_ino == os.stat("/proc/self/ns/net").st_ino
            with (IPRoute() if own else IPRoute(netns=host_ns, flags=0)) as ipr:
                return {(l.get("ifname"), l.get("index")) for l in ipr.get_links()}
        except Exception:       # noqa: BLE001 - a transient netlink failure is not a stop
            return None

    def _check_present(self) -> None:
        if not self.enabled or self.host is None:
            return
        links = self._host_links(self.host[0])
        if links is None:
            return
        for ns in list(self.enabled.values()):
            if (ns.path.veth, ns.veth_index) not in links:
                self.disable(ns, "namespace gone")


# -- the service ------------------------------------------------------------------------------


class Service:
    """`mace serve`: the socket, the connections, the queues."""

    def __init__(self, path: str, opts: Options, log: Callable[[str], None] = print):
        self.path = path
        # one state file per socket path, in a directory no container sees
        key = hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:16]
        self.state_path = os.path.join(opts.state_dir, f"serve-{key}.json")
        self.opts = opts
        self.log = log
        self.conns: set[asyncio.StreamWriter] = set()
        self.sink = Sink(None, [], [], hops=opts.hops)       # its wall clock and options
        self.engine: Engine | None = None
        self.instance = secrets.token_hex(8)
        self._stop: asyncio.Event | None = None
        self._stopping = False
        self._sock: socket.socket | None = None
        self._sock_ino: int | None = None

    # -- socket ---------------------------------------------------------------------------

    def bind(self) -> None:
        """Create the socket safely: a root-owned directory no one else can write to, no
        other live service on the path, then the mode clients need."""
        d = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(d, mode=0o755, exist_ok=True)
            st = os.lstat(d)
        except OSError as e:
            raise UsageError(f"cannot create {d}: {e.strerror}", hint="choose another --socket") from None
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            raise UsageError(f"{d} is not a directory", hint="choose another --socket")
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise UsageError(f"{d} may be written by others, who could replace the socket",
                             hint=f"chmod go-w {d}, or choose another --socket")
        if os.path.lexists(self.path):
            if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
                raise UsageError(f"{self.path} exists and is not a socket",
                                 hint="remove it or choose another --socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(self.path)
            except OSError:
                os.unlink(self.path)            # left by a service that died
            else:
                raise ResourceError(f"a service already listens on {self.path}",
                                    hint="stop it first, or choose another --socket")
            finally:
                probe.close()
        self._state_dir()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(self.path)
        except OSError as e:
            sock.close()
            raise UsageError(f"cannot bind {self.path}: {e.strerror}", hint="choose another --socket") from None
        finally:
            os.umask(old)
        os.chmod(self.path, self.opts.mode)
        sock.listen(128)
        sock.setblocking(False)
        self._sock = sock
        self._sock_ino = os.stat(self.path).st_ino

    def _state_dir(self) -> None:
        d = self.opts.state_dir
        try:
            os.makedirs(d, mode=0o700, exist_ok=True)
            st = os.lstat(d)
        except OSError as e:
            raise UsageError(f"cannot create the state directory {d}: {e.strerror}",
                             hint="choose another --state-dir") from None
        if (stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode)
                or st.st_uid != os.geteuid() or st.st_mode & 0o077):
            raise UsageError(f"the state directory {d} is not a directory only its owner can use",
                             hint=f"chmod 700 {d}, or choose another --state-dir")

    def _unbind(self) -> None:
        if self._sock is not None:
            self._sock.close()
        try:
            if self._sock_ino is not None and os.stat(self.path).st_ino == self._sock_ino:
                os.unlink(self.path)
        except OSError:
            pass

    # -- state across restarts ------------------------------------------------------------

    def _load_state(self) -> dict:
        try:
            with open(self.state_path) as f:
                state = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            self.log(f"mace: ignoring unreadable state {self.state_path}: {e}")
            return {}
        return state if state.get("v") == P.VERSION else {}

    def save_state(self, queues: bool = False) -> None:
        """The enabled namespaces (and with `queues`, their unread reports); atomically,
        readable by root only: reports are the containers' business."""
        engine = self.engine
        if engine is None:
            return
        items = [ns.saved(queue=queues) for ns in list(engine.enabled.values())]
        state = {"v": P.VERSION, "uplink": engine.uplink, "namespaces": items}
        try:
            fd, tmp = tempfile.mkstemp(dir=self.opts.state_dir, prefix=".serve-")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(state, f)
                os.replace(tmp, self.state_path)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as e:
            self.log(f"mace: cannot save state to {self.state_path}: {e.strerror}")

    # -- running --------------------------------------------------------------------------

    async def serve(self, ready: Callable[[], None] | None = None) -> int:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        saved = self._load_state()
        self.engine = Engine(self.opts, self._deliver, self._closed, loop,
                             lambda: self.save_state(queues=False))
        self.engine.start()
        # Not loop.add_signal_handler: its wakeup fd is shared with the children pyroute2
        # forks (and stops with SIGTERM), whose signals would then stop the service.
        owner = os.getpid()

        def on_signal(signum, frame):
            if os.getpid() != owner:
                os._exit(128 + signum)
            loop.call_soon_threadsafe(self._stop.set)

        old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        server = None
        try:
            if saved:
                for line in await self.engine.call(self.engine.restore, saved):
                    self.log(f"mace: {line}")
            server = await asyncio.start_unix_server(self._client, sock=self._sock,
                                                     limit=P.MAX_REQUEST + 1)
            self.log(f"mace: serving on {self.path} (protocol {P.VERSION}, mace {__version__})")
            if ready:
                ready()
            await self._stop.wait()
            self.log("mace: stopping")
        finally:
            if server is not None:
                server.close()
            await self._shutdown()
            for sig, handler in old.items():
                signal.signal(sig, handler)
        if self.engine.error is not None:
            raise self.engine.error
        return 0

    async def _shutdown(self) -> None:
        engine = self.engine
        self._stopping = True               # no new request reaches the engine
        if engine.is_alive():
            try:
                await engine.call(engine.shutdown)
            except BaseException as e:      # noqa: BLE001 - still release the rest
                self.log(f"mace: while stopping the tracer: {e}")
            await asyncio.to_thread(engine.join)
        # followers take what is left, then learn why it ends
        for ns in list(engine.enabled.values()):
            for w in ns.waiters:
                w.set()
        deadline = time.monotonic() + STOP_FLUSH
        while any(ns.waiters for ns in engine.enabled.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self.save_state(queues=True)
        for w in list(self.conns):
            w.close()
        self._unbind()

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    # -- from the engine ------------------------------------------------------------------

    def _deliver(self, batch) -> None:
        for ns, reports in batch:
            if ns.closed is None:
                ns.push(reports)

    def _closed(self, ns: Namespace | None, reason: str) -> None:
        if ns is None:                      # the engine died: nothing can be served
            self.log(f"mace: {reason}: {self.engine.error!r}")
            self._stop.set()
            return
        ns.close(reason)
        note = f"; {ns.discarded} unread reports discarded" if ns.discarded else ""
        self.log(f"mace: netns {ns.inode} disabled: {reason}{note}")

    # -- clients --------------------------------------------------------------------------

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = None
        self.conns.add(writer)
        try:
            if len(self.conns) > self.opts.max_clients:
                raise P.ProtocolError(P.BUSY, f"the service has {self.opts.max_clients} clients",
                                      hint="try again later")
            peer = Peer(writer.get_extra_info("socket"))
            while True:
                line = await self._request_line(reader)
                if line is None:
                    return
                req = P.parse_request(line)
                if not await self._handle(req, peer, reader, writer):
                    return
        except P.ProtocolError as e:
            await self._send(writer, e.reply())
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception as e:      # noqa: BLE001 - one request failed, the service goes on
            self.log(f"mace: request failed: {e!r}")
            await self._send(writer, P.ProtocolError(P.FAILED, f"the service failed: {e}",
                                                     hint="see the service's log").reply())
        finally:
            if peer is not None:
                peer.close()
            self.conns.discard(writer)
            writer.close()

    async def _request_line(self, reader: asyncio.StreamReader) -> bytes | None:
        try:
            return await asyncio.wait_for(reader.readuntil(b"\n"), REQUEST_TIMEOUT)
        except asyncio.IncompleteReadError as e:
            return e.partial or None        # a last request without a newline still counts
        except asyncio.LimitOverrunError:
            raise P.ProtocolError(P.TOO_LONG, f"request of more than {P.MAX_REQUEST} bytes",
                                  hint="a request is one short JSON object per line") from None
        except asyncio.TimeoutError:
            raise P.ProtocolError(P.BAD_REQUEST, f"no complete request in {REQUEST_TIMEOUT:.0f} s",
                                  hint="end each request with a newline") from None

    async def _send(self, writer: asyncio.StreamWriter, msg: dict) -> None:
        try:
            writer.write(P.encode(msg))
            await writer.drain()
        except (ConnectionError, RuntimeError):
            pass

    def _whose(self, peer: Peer) -> int:
        fd = peer.netns()
        try:
            return os.fstat(fd).st_ino
        finally:
            os.close(fd)

    async def _handle(self, req: dict, peer: Peer, reader, writer) -> bool:
        """Answer one request; False when the connection is done."""
        op = req["op"]
        base = {"v": P.VERSION, "ok": True, "op": op}
        if self._stopping:
            raise P.ProtocolError(P.STOPPING, "the service is stopping", hint="try again once it is back")
        if op == "on":
            fd = peer.netns()
            try:
                inode = os.fstat(fd).st_ino
                ns, already = await self.engine.call(
                    self.engine.enable, inode, f"/proc/{os.getpid()}/fd/{fd}", peer.pid)
            finally:
                os.close(fd)
            await self._send(writer, {**base, "netns": inode, "state": "enabled", "already": already,
                                      "path": ns.describe(self.engine.uplink),
                                      "queue_size": ns.size})
            return True
        inode = self._whose(peer)
        ns = await self.engine.call(self.engine.find, inode)
        if op == "off":
            if ns is None:
                await self._send(writer, {**base, "netns": inode, "state": "disabled", "already": True})
                return True
            await self.engine.call(self.engine.disable, ns, "mace off")
            await self._send(writer, {**base, "netns": inode, "state": "disabled", "already": False,
                                      "discarded": ns.discarded})
            return True
        if op == "status":
            st = await self.engine.call(self.engine.status, inode)
            reply = {**base, "netns": inode, **st,
                     "service": {"version": __version__, "protocol": P.VERSION,
                                 "instance": self.instance}}
            if ns is not None and st["state"] == "enabled":
                reply["queue"] = {"unread": max(0, ns.end - max(ns.read_at, ns.base)),
                                  "size": ns.size, "dropped": ns.dropped}
            await self._send(writer, reply)
            return True
        # read
        if ns is None:
            raise P.ProtocolError(P.NOT_ENABLED, "measurement is not enabled for this network namespace",
                                  hint="run `mace on` in it first")
        follow = req.get("follow", False)
        await self._send(writer, {**base, "netns": inode, "follow": follow})
        if follow:
            await self._follow(ns, reader, writer)
            return False
        await self._read(ns, writer)
        return True

    async def _write_items(self, ns: Namespace, writer, raw: bytes, dropped: int) -> None:
        text = _lines(self.sink, raw, ns)
        if dropped:
            text = P.encode({"v": P.VERSION, "dropped": dropped}).decode() + text
        writer.write(text.encode())
        await writer.drain()

    async def _read(self, ns: Namespace, writer) -> None:
        """What arrived since the last read, then the end line."""
        cursor, end = ns.read_at, ns.end
        sent = lost = 0
        ns.read_at = end
        while cursor < end and ns.closed is None:
            dropped, raw, cursor = ns.take(cursor, min(SEND_BATCH, end - cursor))
            if cursor > end:        # the queue overflowed meanwhile: stop at the snapshot
                raw = raw[:max(0, len(raw) - (cursor - end) * REPORT_SIZE)]
                cursor = end
            if not raw and not dropped:
                break
            await self._write_items(ns, writer, raw, dropped)
            sent += len(raw) // REPORT_SIZE
            lost += dropped
        await self._send(writer, {"v": P.VERSION, "end": True, "reason": "read",
                                  "reports": sent, "dropped": lost})

    async def _follow(self, ns: Namespace, reader, writer) -> None:
        """Stream until the namespace is disabled, the service stops or the client leaves."""
        wake = asyncio.Event()
        ns.waiters.add(wake)
        left = asyncio.ensure_future(reader.read(1))     # any byte or EOF ends the stream
        cursor = ns.read_at
        sent = lost = 0
        reason = None
        try:
            while True:
                if ns.closed is not None:
                    reason = ns.closed
                    break
                dropped, raw, cursor = ns.take(cursor, SEND_BATCH)
                if raw or dropped:
                    ns.read_at = max(ns.read_at, cursor)
                    await self._write_items(ns, writer, raw, dropped)
                    sent += len(raw) // REPORT_SIZE
                    lost += dropped
                    continue
                if self._stopping:
                    reason = "service stopping"
                    break
                wake.clear()
                waiter = asyncio.ensure_future(wake.wait())
                try:
                    done, _ = await asyncio.wait({waiter, left}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                if left in done:
                    return
        except ConnectionError:
            return
        finally:
            ns.waiters.discard(wake)
            left.cancel()
            if left.done() and not left.cancelled():
                left.exception()            # a reset connection: nothing to report
        await self._send(writer, {"v": P.VERSION, "end": True, "reason": reason,
                                  "reports": sent, "dropped": lost})


def serve(path: str, opts: Options, log: Callable[[str], None] = print) -> int:
    # every connection holds a socket and a pidfd; every enable opens perf events
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    service = Service(path, opts, log)
    service.bind()
    try:
        return asyncio.run(service.serve())
    finally:
        service._unbind()

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
resumes measuring the namespaces that still exist.  Unread reports are kept packed: the
state names their format, and reports saved in another one are dropped, not misread.

The jobs, by module: mace.service.queue (a namespace's report queue), mace.service.identity
(who is calling), mace.service.engine (the thread around the tracer), this one (the socket,
the connections, the saved state).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import json
import os
import resource
import secrets
import signal
import socket
import stat
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

from mace._version import __version__
from mace.defaults import (
    DEFAULT_MAX_AGE_NS,
    DEFAULT_MAX_CLIENTS,
    DEFAULT_MAX_NAMESPACES,
    DEFAULT_QUEUE,
    DEFAULT_STATE_DIR,
    DEFAULT_TABLE_SIZE,
)
from mace.errors import ResourceError, TopologyError, UsageError
from mace.output.clock import wall_offset_ns
from mace.output.report import REPORT_SIZE
from mace.output.sinks import NO_CONTAINER, formatter
from mace.service import protocol as P
from mace.service.engine import Engine, LinkWatcher
from mace.service.identity import Peer, netns_inode
from mace.service.queue import Namespace
from mace.targets.netns import describe_path

SEND_BATCH = 1024                   # reports per write before waiting for the client
REQUEST_TIMEOUT = 60.0              # s a connection may take to send a complete request
STOP_FLUSH = 2.0                    # s followers get to take their last reports at a stop
SCRAPE_TIMEOUT = 5.0                # s a scrape waits for the engine's snapshot
HEALTH_TIMEOUT = 3.0                # s /healthz waits for the engine to answer (probes give 5)


@dataclass
class Options:
    uplinks: tuple[str, ...] = ()      # --uplink (repeatable); none: every one discovery finds
    hops: bool = False
    end_at_queue: bool = True
    start_at_veth: bool = True
    table_size: int = DEFAULT_TABLE_SIZE
    max_age_ns: int = DEFAULT_MAX_AGE_NS
    ring_pages: int | None = None
    queue_size: int = DEFAULT_QUEUE
    max_namespaces: int = DEFAULT_MAX_NAMESPACES
    max_clients: int = DEFAULT_MAX_CLIENTS
    mode: int = 0o666
    state_dir: str = DEFAULT_STATE_DIR
    runtime_socket: str | None = None   # where runtime-named targets are asked (mace.targets.runtimes)
    metrics: tuple[str, int] | None = None  # (address, port) of the Prometheus endpoint
    metrics_grace: float | None = None  # s a gone container's series stay; None: $MACE_METRICS_GRACE or 120
    all: bool = False                   # trace every container on the host, as they come and go
    segment: str = "device"             # what is measured (mace.plan.Plan.segment)
    targets: tuple = ()                 # mace.targets.netns.Target, traced from the start


def _report_format() -> tuple[str, int]:
    """The packed report's struct format and size, as the saved state records them."""
    from mace.output.report import REPORT_FORMAT

    return REPORT_FORMAT, REPORT_SIZE


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
        self.wall_offset = wall_offset_ns()     # the reports' CLOCK_MONOTONIC on the wall clock
        self.engine: Engine | None = None
        self.instance = secrets.token_hex(8)
        self._stop: asyncio.Event | None = None
        self._stopping = False
        self._sock: socket.socket | None = None
        self._sock_ino: int | None = None
        self._metrics = None
        self._watcher = None

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

    def bind_metrics(self) -> None:
        """Listen for scrapes (at once: a port in use fails the start, not the first scrape)."""
        if self.opts.metrics is None:
            return
        from mace.service.metrics import Collector, Endpoint, grace_from_env

        if self.opts.metrics_grace is None:
            self.opts.metrics_grace = grace_from_env()

        def snapshot():
            engine = self.engine
            if engine is None or self._stopping:
                return None
            return engine.call_blocking(engine.metrics_snapshot, timeout=SCRAPE_TIMEOUT)

        self._metrics = Endpoint(*self.opts.metrics,
                                 Collector(snapshot, self.opts.hops, self.opts.end_at_queue,
                                           self.opts.segment),
                                 health=self.health)
        self.log(f"mace: metrics on {self._metrics.url}")

    def health(self) -> tuple[bool, str]:
        """For /healthz (probes): is the engine there and answering between its polls.  No
        snapshot is taken, so a probe costs next to nothing and serves no series."""
        engine = self.engine
        if self._stopping:
            return False, "stopping"
        if engine is None:
            return False, "starting"
        if not engine.is_alive():
            return False, "the engine stopped"
        try:
            engine.call_blocking(lambda: None, timeout=HEALTH_TIMEOUT)
        except P.ProtocolError:
            return False, "stopping"
        except TimeoutError:
            return False, f"the engine did not answer within {HEALTH_TIMEOUT:g} s"
        return True, "ok"

    def _unbind(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
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
        if state.get("v") != P.VERSION:
            return {}
        self._drop_foreign_reports(state)
        return state

    def _drop_foreign_reports(self, state: dict) -> None:
        """Unread reports saved in another format (another mace) would be misread: they go,
        counted as dropped, with one line in the log."""
        fmt, size = _report_format()
        if state.get("report_format") == fmt:
            return
        # a state from before formats were recorded says nothing of its size: count by ours
        old_size = state.get("report_size") or size
        n = 0
        for item in state.get("namespaces", []):
            if not isinstance(item, dict) or not item.get("unread"):
                continue
            try:
                k = len(base64.b64decode(item["unread"])) // old_size
            except (ValueError, TypeError):
                k = 0
            item["unread"] = ""
            item["dropped"] = item.get("dropped", 0) + k
            n += k
        if n:
            self.log(f"mace: warning: {n} unread reports saved in another report format "
                     f"({state.get('report_format') or 'unrecorded'}) were dropped")

    def save_state(self, queues: bool = False) -> None:
        """The enabled namespaces (and with `queues`, their unread reports); atomically,
        readable by root only: reports are the containers' business."""
        engine = self.engine
        if engine is None:
            return
        # namespaces traced for --all or --netns are found again at the next start
        items = [ns.saved(queue=queues) for ns in list(engine.enabled.values()) if ns.keep]
        fmt, size = _report_format()
        state = {"v": P.VERSION, "report_format": fmt, "report_size": size, "uplinks": list(engine.uplinks),
                 "namespaces": items}
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
        # other tracers are found when a tracer opens (the first namespace enabled or resumed)
        self.engine = Engine(self.opts, self._deliver, self._closed, loop,
                             lambda: self.save_state(queues=False),
                             log=lambda line: loop.call_soon_threadsafe(self.log, line))
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
            await self._start_targets()
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

    async def _start_targets(self) -> None:
        """--netns targets, then with --all every container there is and a watcher for more."""
        engine = self.engine
        for t in self.opts.targets:
            try:
                ns, _ = await engine.call(functools.partial(engine.enable, auto=True, identity=t.identity()),
                                          t.inode, t.path, t.pid)
            except P.ProtocolError as e:
                raise TopologyError(f"{t.spec}: {e}", hint=e.hint or None) from None
            self.log(f"mace: {t.spec} traced: {describe_path(ns.path, engine.uplink)}")
        if self.opts.all:
            for line in await engine.call(engine.enable_auto):
                self.log(f"mace: {line}")
            self._watcher = LinkWatcher(engine)
            self._watcher.start()

    async def _shutdown(self) -> None:
        engine = self.engine
        self._stopping = True               # no new request reaches the engine
        if self._watcher is not None:
            await asyncio.to_thread(self._watcher.stop)
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
        except TimeoutError:
            raise P.ProtocolError(P.BAD_REQUEST, f"no complete request in {REQUEST_TIMEOUT:.0f} s",
                                  hint="end each request with a newline") from None

    async def _send(self, writer: asyncio.StreamWriter, msg: dict) -> None:
        try:
            writer.write(P.encode(msg))
            await writer.drain()
        except (ConnectionError, RuntimeError):
            pass

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
                                      "path": describe_path(ns.path, self.engine.uplink),
                                      "queue_size": ns.size, **(NO_CONTAINER | (ns.identity or {}))})
            return True
        inode = netns_inode(peer)
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
        if ns is None or not ns.keep:
            # (one --all traces queues nothing until asked)
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
        out = bytearray(P.encode({"v": P.VERSION, "dropped": dropped}) if dropped else b"")
        # the lines are made in compiled code, the namespace's own fields once per batch;
        # every report in its queue is its own (target 0), whatever the tracer's index
        formatter("jsonl", self.wall_offset, self.opts.hops,
                  [(ns.label, ns.inode, ns.identity)], self.opts.segment).format(raw, out, 0)
        writer.write(out)
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
        service.bind_metrics()
        return asyncio.run(service.serve())
    finally:
        service._unbind()

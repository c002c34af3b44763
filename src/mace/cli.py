"""Command line: `mace <command> ...`.  Errors are one line with a hint and a distinct exit
status (see mace.errors); a closed output pipe ends quietly."""

from __future__ import annotations

import argparse
import json
import os
import signal
import stat
import subprocess
import sys
import time
from contextlib import ExitStack

from mace._version import __version__
from mace.defaults import (
    DEFAULT_MAX_AGE_NS,
    DEFAULT_MAX_CLIENTS,
    DEFAULT_MAX_NAMESPACES,
    DEFAULT_QUEUE,
    DEFAULT_SOCKET,
    DEFAULT_STATE_DIR,
    DEFAULT_TABLE_SIZE,
    DIRECTIONS,
    FORMATS,
    PRESENCE_EVERY,
    SEGMENTS,
    SOCKET_ENV,
)
from mace.errors import MaceError, PermissionProblem, UsageError, exit_status_text

# Only the standard library and mace's light modules at the top: `mace on|off|status|read`
# run inside containers; each command imports the engine it needs (see tests/unit/test_import_light.py).

NET_EVENTS = ("net:net_dev_queue", "net:net_dev_start_xmit", "net:net_dev_xmit",
              "net:netif_rx", "net:netif_receive_skb")

EXAMPLES = """\
examples:
  mace demo                                 container ping: raw, mace's expense, corrected, native
  mace trace --netns 1234                   per-packet expense of the container of PID 1234
  mace trace --netns web --netns db -f jsonl -o lat.jsonl --duration 60
  mace trace --netns /run/netns/c1 --hops --format csv | head
  mace events --demo                        decoded kernel events of 3 pings through a throwaway testbed
  mace serve                                on the host: let containers measure themselves
  mace on; mace read --follow               in a container whose /run/mace holds the socket

""" + exit_status_text()

SERVE_EPILOG = """Containers reach the service through its socket, bind-mounted into them:
  docker run -v /run/mace:/run/mace:ro ...   (then `mace on`, `mace read` inside)
A caller can enable, disable and read only its own network namespace: the service takes it
from the socket's peer, never from the request.

For Prometheus, every traced container's latency histograms and packet counts:
  mace serve --metrics 9464              http://127.0.0.1:9464/metrics
  mace serve --metrics 0.0.0.0:9464      scraped from other hosts

""" + exit_status_text(["UsageError", "PermissionProblem", "ResourceError"],
                       done="stopped by SIGTERM/SIGINT")

CLIENT_EPILOG = f"""The service (`mace serve`, on the host) finds the caller's network namespace itself; no
privileges are needed here.  Socket: --socket, else ${SOCKET_ENV}, else {DEFAULT_SOCKET}.

""" + exit_status_text(["UsageError", "TargetNotFound", "TopologyError", "ServiceUnreachable",
                        "ServiceRefused"])

TRACE_EPILOG = """\
TARGET is a PID of any process in the container, a namespace name (`ip netns list`), a
path to a namespace file (/proc/PID/ns/net, /run/netns/NAME, a runtime's netns path), or a
container as its runtime names it:
  docker:NAME|ID  podman:NAME|ID  containerd:[NAMESPACE/]ID  pod:[NAMESPACE/]NAME[/CONTAINER]
The runtime is asked on --runtime-socket, else $DOCKER_HOST (docker:), $CONTAINER_HOST
(podman:), $CONTAINERD_ADDRESS (containerd:, with ctr), $CONTAINER_RUNTIME_ENDPOINT (pod:,
with crictl), else on its usual socket (/run/docker.sock, /run/podman/podman.sock, ...).

Each report is the time one packet spent between the container's device and the host's
uplink: egress from netif_rx on the container's host-side veth to net_dev_queue on the
uplink (where the host's own traffic joins it), ingress from netif_receive_skb on the
uplink to netif_receive_skb on the container's device.  With --segment socket, MACE's
segment: egress from the send call of a container's process to the uplink's driver,
ingress from the uplink to the receive call that takes the datagram (UDP, ICMP, raw).

examples:
  mace trace --netns docker:web                       live view of one Docker container
  mace trace --netns docker:web --netns podman:db -f jsonl -o lat.jsonl --duration 60
  mace trace --netns 1234 --count 100 -f csv          the container of PID 1234, 100 reports
  mace trace --netns pod:shop/web-7d9 --hops          a Kubernetes pod, and where the time goes
  mace trace --netns docker:web --uplink eth1 --summary-json sum.json -q
  mace trace --netns /run/netns/c1 --end-at-xmit        to the uplink's driver (MACE's end)
  mace trace --netns docker:web --segment socket      from the send call to the wire and back

""" + exit_status_text(["UsageError", "PermissionProblem", "TracefsError", "TracepointMissing",
                        "TargetNotFound", "TopologyError", "UplinkMissing", "ResourceError",
                        "RuntimeUnavailable", "ContainerNotFound", "ContainerNotRunning",
                        "NoContainerNetwork", "NoOwnCgroup"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mace", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Per-packet latency that container network isolation adds, from kernel tracepoints.")
    p.add_argument("--version", action="version", version=f"mace {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    tr = sub.add_parser("trace", help="report the latency each packet spends in the container's "
                                      "network path", epilog=TRACE_EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    tr.add_argument("--netns", action="append", required=True, metavar="TARGET",
                    help="container to trace (PID, namespace name or path, docker:NAME, podman:NAME, "
                         "containerd:[NS/]ID, pod:[NS/]NAME[/CONTAINER]); repeatable")
    _runtime_socket_option(tr)
    tr.add_argument("--duration", type=float, metavar="SEC", help="stop after SEC seconds")
    tr.add_argument("--count", type=int, metavar="N", help="stop after N reports (all targets, both directions)")
    tr.add_argument("-f", "--format", choices=FORMATS, help="report format (default: mace, or the live view on a terminal)")
    tr.add_argument("-o", "--output", metavar="FILE", help="write reports to FILE instead of stdout")
    tr.add_argument("--summary-json", metavar="FILE", help="also write the summary as JSON to FILE")
    _tracer_options(tr)
    view = tr.add_mutually_exclusive_group()
    view.add_argument("--tui", dest="tui", action="store_true", default=None, help="live view")
    view.add_argument("--no-tui", dest="tui", action="store_false", help="stream reports even on a terminal")
    tr.add_argument("-q", "--quiet", action="store_true", help="no discovery lines, no summary")
    tr.set_defaults(func=cmd_trace)

    dm = sub.add_parser("demo", help="measure and correct a container's ping RTT on a throwaway testbed",
                        epilog="Builds network namespaces (198.18.0.0/15 only), removes them after.")
    dm.add_argument("--count", type=int, default=200, metavar="N", help="pings (default 200)")
    dm.add_argument("--interval", type=float, default=0.02, metavar="SEC",
                    help="seconds between pings (default 0.02)")
    dm.add_argument("--co-located", type=int, default=0, metavar="K", dest="colocated",
                    help="containers flooding the same target meanwhile (default 0)")
    dm.add_argument("--segment", choices=SEGMENTS, default="device",
                    help="device (default): correct to the host's native RTT; socket: MACE's, "
                         "correct to the RTT on the wire, which a capture on the uplink gives "
                         "(needs tcpdump)")
    dm.set_defaults(func=cmd_demo)

    ev = sub.add_parser("events", help="print decoded tracepoint events (the capture engine, raw)",
                        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    ev.add_argument("-d", "--device", action="append", default=[], metavar="DEV",
                    help="keep only events on this device (in-kernel filter); repeatable")
    ev.add_argument("-t", "--tracepoint", action="append", default=[], metavar="SYS:NAME",
                    help=f"tracepoint to open; repeatable (default: {', '.join(NET_EVENTS)})")
    ev.add_argument("--duration", type=float, metavar="SEC", help="stop after SEC seconds")
    ev.add_argument("--count", type=int, metavar="N", help="stop after N events")
    ev.add_argument("--ring-pages", type=int, default=64, metavar="N",
                    help="data pages per CPU ring, a power of two (default 64)")
    ev.add_argument("--demo", action="store_true",
                    help="build a throwaway testbed, ping through it and show its events")
    ev.set_defaults(func=cmd_events)

    sv = sub.add_parser("serve", help="on the host: let containers enable and read their own latencies",
                        epilog=SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sv.add_argument("--socket", metavar="PATH",
                    help=f"where to listen (default ${SOCKET_ENV}, else {DEFAULT_SOCKET})")
    sv.add_argument("--socket-mode", metavar="OCTAL", default="666",
                    help="permissions of the socket (default 666: any container user may connect)")
    sv.add_argument("--state-dir", metavar="DIR", default=DEFAULT_STATE_DIR,
                    help=f"root-only directory for the state kept across restarts (default {DEFAULT_STATE_DIR})")
    sv.add_argument("--queue", type=int, default=DEFAULT_QUEUE, metavar="N",
                    help=f"reports kept per namespace for its readers (default {DEFAULT_QUEUE}); "
                         "a reader that falls behind loses the oldest and is told how many")
    sv.add_argument("--max-namespaces", type=int, default=DEFAULT_MAX_NAMESPACES, metavar="N",
                    help=f"namespaces enabled at once (default {DEFAULT_MAX_NAMESPACES})")
    sv.add_argument("--max-clients", type=int, default=DEFAULT_MAX_CLIENTS, metavar="N",
                    help=f"connections at once (default {DEFAULT_MAX_CLIENTS})")
    sv.add_argument("--all", action="store_true",
                    help="trace every container on the host (every veth whose peer is in another "
                         "namespace), following them as they come and go")
    sv.add_argument("--netns", action="append", default=[], metavar="TARGET",
                    help="trace this container from the start, as `mace trace --netns` takes it "
                         "(repeatable); its reports go to the metrics, and to its clients once "
                         "one runs `mace on`")
    sv.add_argument("--metrics", metavar="[ADDR:]PORT",
                    help="serve Prometheus metrics at http://ADDR:PORT/metrics (address 127.0.0.1 "
                         "unless given; [::] form for IPv6)")
    _runtime_socket_option(sv, "containers named by their runtime")
    _tracer_options(sv)
    sv.set_defaults(func=cmd_serve)

    for op, text in (("on", "enable measurement for this container's network namespace"),
                     ("off", "disable it (unread reports are discarded)"),
                     ("status", "is it enabled, and how is measurement going"),
                     ("read", "print the reports collected since the last read (--follow: stream)")):
        c = sub.add_parser(op, help=text, description=text.capitalize() + ".", epilog=CLIENT_EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        c.add_argument("--socket", metavar="PATH", help="the service's socket")
        if op == "read":
            c.add_argument("--follow", action="store_true", help="keep streaming new reports")
            c.add_argument("-f", "--format", choices=("mace", "jsonl"), default="mace",
                           help="mace: [sec.usec] (seq) dir: ns lines, like /dev/mace; jsonl: "
                                "as `mace trace --format jsonl` (default mace)")
        if op == "status":
            c.add_argument("--json", action="store_true", help="the service's reply as JSON")
        c.set_defaults(func=cmd_client, op=op)
    # for _unknown: a mistyped option is answered with its subcommand's usage
    p._mace_commands = dict(sub.choices)
    return p


def _runtime_socket_option(p: argparse.ArgumentParser, text: str = "docker:, podman:, containerd: and pod: "
                                                                  "targets") -> None:
    p.add_argument("--runtime-socket", metavar="PATH",
                   help=f"the container runtime's socket for {text} (default: $DOCKER_HOST, "
                        "$CONTAINER_HOST, ..., else the runtime's usual one)")


def _tracer_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--uplink", metavar="DEV", action="append",
                   help="a device the containers' traffic leaves the host by; repeatable (default: "
                        "every device of a default route, in any routing table, and overlays)")
    p.add_argument("--table-size", type=int, default=DEFAULT_TABLE_SIZE, metavar="N",
                   help=f"correlation table entries, a power of two; 64 bytes each (default {DEFAULT_TABLE_SIZE})")
    p.add_argument("--ring-pages", type=int, metavar="N",
                   help="perf ring data pages per CPU, a power of two (default: 2048 = 8 MiB, "
                        "fewer on hosts with more than 8 CPUs: 64 MiB in all)")
    p.add_argument("--max-age", type=float, default=DEFAULT_MAX_AGE_NS / 1e6, metavar="MS",
                   help="give up on a packet not through after MS milliseconds (default 1000, at most 4000)")
    p.add_argument("--hops", action="store_true",
                   help="also trace the bridge and the veth backlog, and report each hop")
    p.add_argument("--segment", choices=SEGMENTS, default="device",
                   help="what is measured: device (default) the container's added path, its veth to "
                        "the uplink and back (corrected RTT ~ the host's); socket, MACE's, its "
                        "process's send call to the uplink's transmit and the uplink to its receive "
                        "call (corrected RTT ~ the wire's; needs the container's own cgroup)")
    end = p.add_mutually_exclusive_group()
    end.add_argument("--end-at-queue", dest="end_at_queue", action="store_true", default=None,
                     help="end egress where the packet enters the uplink's qdisc (net_dev_queue), "
                          "which native traffic waits in too (the device segment's default)")
    end.add_argument("--end-at-xmit", dest="end_at_queue", action="store_false",
                     help="end egress at the uplink driver (net_dev_start_xmit), MACE's end: the "
                          "uplink's qdisc wait is then part of the expense (the socket segment's "
                          "default: where a capture on the uplink sees the packet)")
    p.add_argument("--start-at-inner", action="store_true",
                   help="start egress at the container's own device, not at its host-side veth "
                        "(veths with XDP or GRO skip netif_rx; costs a sample per transmit of "
                        "every container with the same device name)")


def _check_positive(name: str, value, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise UsageError(f"{name} must be positive, not {value}")


def _check_power_of_two(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high or value & (value - 1):
        raise UsageError(f"{name} {value} is not a power of two from {low} to {high}",
                         hint=f"e.g. {name} {1 << (min(max(value, low), high).bit_length() - 1)}")


CAP_SYS_ADMIN, CAP_PERFMON = 21, 38


def _check_privileges() -> None:
    """mace enters namespaces (CAP_SYS_ADMIN) and opens tracepoints (CAP_PERFMON)."""
    try:
        caps = next(int(line.split()[1], 16) for line in open("/proc/self/status")
                    if line.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError):
        caps = -1 if os.geteuid() == 0 else 0
    if not caps >> CAP_SYS_ADMIN & 1:
        raise PermissionProblem("mace needs to enter network namespaces and open kernel tracepoints",
                                hint="run it as root (sudo mace ...), or grant CAP_SYS_ADMIN, CAP_SYS_PTRACE and CAP_IPC_LOCK")


class _Stop:
    """SIGINT/SIGTERM end the run cleanly: set a flag and wake the waiting loop."""

    def __init__(self, wake=None):
        self.requested = False
        self.wake = wake

    def __call__(self, signum, frame):
        self.requested = True
        if self.wake is not None:
            self.wake()

    def install(self, stack: ExitStack) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            old = signal.signal(sig, self)
            stack.callback(signal.signal, sig, old)


def _check_tracer_options(args) -> None:
    if args.end_at_queue is None:       # each segment's own end (see --end-at-xmit)
        args.end_at_queue = args.segment != "socket"
    if args.segment == "socket" and args.start_at_inner:
        raise UsageError("--start-at-inner and --segment socket: the socket segment starts at the "
                         "container's send call, and finds its packets at the host-side veth",
                         hint="leave --start-at-inner out")
    _check_power_of_two("--table-size", args.table_size, 2, 1 << 26)
    if args.ring_pages is not None:
        _check_power_of_two("--ring-pages", args.ring_pages, 1, 65536)
    if not 0 < args.max_age <= 4000:
        raise UsageError(f"--max-age {args.max_age} must be between 0 and 4000 ms")


def cmd_serve(args) -> int:
    from mace.service.protocol import socket_path
    from mace.service.server import Options, serve

    _check_tracer_options(args)
    for name, value in (("--queue", args.queue), ("--max-namespaces", args.max_namespaces),
                        ("--max-clients", args.max_clients)):
        if value < 1:
            raise UsageError(f"{name} must be at least 1, not {value}")
    try:
        mode = int(args.socket_mode, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise UsageError(f"--socket-mode {args.socket_mode!r} is not an octal mode",
                         hint="e.g. 666 (anyone), 660 (owner and group)")
    metrics = None
    if args.metrics is not None:
        from mace.service.metrics import parse_address
        metrics = parse_address(args.metrics)
    _check_privileges()
    from mace.targets.netns import resolve
    targets = tuple(resolve(spec, args.runtime_socket) for spec in args.netns)
    opts = Options(uplinks=tuple(args.uplink or ()), hops=args.hops, end_at_queue=args.end_at_queue,
                   start_at_veth=not args.start_at_inner, segment=args.segment,
                   table_size=args.table_size, max_age_ns=int(args.max_age * 1e6),
                   ring_pages=args.ring_pages, queue_size=args.queue,
                   max_namespaces=args.max_namespaces, max_clients=args.max_clients, mode=mode,
                   state_dir=args.state_dir, runtime_socket=args.runtime_socket, metrics=metrics,
                   all=args.all, targets=targets)
    return serve(socket_path(args.socket), opts, log=lambda line: print(line, file=sys.stderr, flush=True))


def cmd_client(args) -> int:
    from mace.service.client import Connection, read

    with Connection(args.socket) as conn:
        if args.op == "read":
            end = read(conn, follow=args.follow, fmt=args.format, out=sys.stdout)
            if end.get("reason") not in ("read", None):
                print(f"mace: measurement ended: {end['reason']}", file=sys.stderr)
            return 0
        reply = conn.request(args.op)
    if args.op == "status" and args.json:
        print(json.dumps(reply, indent=2))
        return 0
    for line in _client_lines(reply):
        print(line)
    return 0


def _client_lines(reply: dict) -> list[str]:
    ns = f"netns {reply['netns']}"
    if reply.get("container"):          # the runtime's name, when the service found one
        ns = f"{reply.get('runtime', '')} container {reply['container']} ({ns})".lstrip()
    if reply["op"] == "on":
        again = "already " if reply["already"] else ""
        return [f"mace: {again}enabled for {ns}: {reply['path']}",
                f"mace: `mace read` prints the reports; the service keeps the last {reply['queue_size']}"]
    if reply["op"] == "off":
        if reply["already"]:
            return [f"mace: {ns} was not enabled"]
        lost = reply.get("discarded", 0)
        return [f"mace: disabled for {ns}" + (f"; {lost} unread reports discarded" if lost else "")]
    if reply["state"] != "enabled":
        return [f"mace: not enabled for {ns} (`mace on` enables it)"]
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(reply["since"]))
    q = reply["queue"]
    out = [f"mace: enabled for {ns} since {since}: {reply['path']}",
           f"  queue: {q['unread']} unread of {q['size']}, {q['dropped']} dropped"]
    for d in DIRECTIONS:
        k = reply[d]
        cov = "-" if k["coverage"] is None else f"{100 * k['coverage']:.1f}%"
        p50 = "-" if k["p50_ns"] is None else f"{k['p50_ns'] / 1000:.1f} µs"
        p99 = "-" if k["p99_ns"] is None else f"{k['p99_ns'] / 1000:.1f} µs"
        out.append(f"  {d:8}{k['reports']:>9} reports  coverage {cov:>6}  p50 {p50:>10}  p99 {p99:>10}")
    if reply.get("lost"):
        out.append(f"  {reply['lost']} events lost in the host's perf rings (all namespaces)")
    return out


HINT_AFTER = 5          # egress packets crossed with no report before mace says why


def cmd_trace(args) -> int:
    from mace.capture import others
    from mace.output.report import REPORT_SIZE, unpack
    from mace.output.sinks import make_sink
    from mace.output.summary import Tally, build, format_text, uplink_hint
    from mace.targets.netns import discover, resolve
    from mace.targets.restarts import Restarts
    from mace.targets.runtimes import runtime_of
    from mace.tracer import Tracer

    _check_positive("--duration", args.duration)
    _check_positive("--count", args.count)
    _check_tracer_options(args)
    named = sorted({runtime_of(spec) for spec in args.netns} - {None})
    if args.runtime_socket and len(named) > 1:
        raise UsageError("--runtime-socket is one runtime's socket, and the targets name "
                         + " and ".join(named),
                         hint="give the others' sockets by DOCKER_HOST, CONTAINER_HOST, ...")
    _check_privileges()
    err = sys.stderr
    targets = [resolve(spec, args.runtime_socket) for spec in args.netns]
    topo = discover(targets, args.uplink)
    plan = topo.plan(hops=args.hops, end_at_queue=args.end_at_queue,
                     start_at_veth=not args.start_at_inner, segment=args.segment)
    labels = [t.label for t in targets]
    inodes = [t.inode for t in targets]
    out = sys.stdout
    use_tui = args.tui if args.tui is not None else (args.format is None and args.output is None
                                                       and out.isatty() and _have_tui())
    if use_tui and not _have_tui():
        raise UsageError("the live view is not available in this build", hint="use --no-tui")
    with ExitStack() as stack:
        stop = _Stop()
        stop.install(stack)
        # files are opened before tracing starts: a bad path must not cost the run
        if args.output:
            out = stack.enter_context(_open_for_writing(args.output, "--output"))
        summary_file = (stack.enter_context(_open_for_writing(args.summary_json, "--summary-json"))
                        if args.summary_json else None)
        tracer = stack.enter_context(Tracer(plan, table_size=args.table_size,
                                            max_age_ns=int(args.max_age * 1e6),
                                            ring_pages=args.ring_pages))
        stop.wake = tracer.capture.wakeup
        for f in (out if args.output else None, summary_file):
            if f is not None and stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                f.seek(0)               # the tracer is ready: now the old contents go
                f.truncate()
        sink = make_sink(args.format or "mace", out, labels, inodes, hops=args.hops,
                         containers=[t.identity() for t in targets], segment=plan.segment)
        live = None
        if use_tui:
            from mace.output.live import LiveView
            live = stack.enter_context(LiveView(tracer, labels, plan))
        tracer.start()
        if not args.quiet:
            warnings = others.warn_lines(tracer.other_tracers)
            if live is None:
                # after start: once these lines are out, every packet is traced
                for line in topo.describe() + warnings:
                    print(line, file=err, flush=True)
            else:
                for line in warnings:
                    live.message(line)
        deadline = time.monotonic() + args.duration if args.duration else None
        taken = 0
        # what was written differs from what was made only with --count; hops need the tally
        tally = (Tally(len(labels), args.hops, plan.end_at_queue, plan.segment)
                 if args.hops or args.count else None)
        stopped: dict[int, float] = {}
        # the live view keeps a fixed set of rows: there, a restarted target is not followed
        restarts = Restarts(topo, plan) if live is None else None

        def emit(chunks) -> bool:
            """Hand packed reports on (the sink formats them in compiled code); True once
            --count is reached."""
            nonlocal taken
            raw = b"".join(chunks)
            if args.count is not None:
                raw = raw[:(args.count - taken) * REPORT_SIZE]
            taken += len(raw) // REPORT_SIZE
            # only the tally and the live view take Report tuples
            reports = list(unpack(raw)) if tally is not None or live is not None else None
            if tally is not None:
                tally.add(reports)
            if live is not None:
                live.add(reports)
            else:
                sink.write_packed(raw)
            return args.count is not None and taken >= args.count

        def show(reports) -> bool:
            if emit(reports):
                return True
            if live is None:
                sink.flush()
            else:
                live.refresh()
            return False

        def until() -> bool:
            return (stop.requested or (deadline is not None and time.monotonic() >= deadline)
                    or (live is not None and live.quit))

        def say(msg: str) -> None:
            if live is not None:
                live.message(msg)
            else:
                print(msg, file=err, flush=True)

        def went(i: int, then: str) -> None:
            # container i's veth is gone: when, for the summary, and whether it is waited for
            if tracer.started_at is not None:
                stopped[i] = time.monotonic() - tracer.started_at
            if restarts is not None:
                restarts.gone(i)
            say(f"mace: {labels[i]} stopped (its veth {topo.containers[i].main.veth} is gone); {then}")

        def gone(i: int, left: int) -> None:
            went(i, f"{left} target(s) left")

        hinted: set[int] = set()

        def hint() -> None:
            # a wrong uplink gives no report at all: say so once, while it runs
            for i, k in enumerate(tracer.stats()["containers"]):
                e = k["egress"]
                if i not in hinted and e["crossed"] >= HINT_AFTER and not e["reports"] and e["local"]:
                    hinted.add(i)
                    say(f"mace: {labels[i]}: {e['crossed']} packets crossed its veth, "
                        + uplink_hint(tracer.plan.uplinks, topo.other_routes))

        def presence():
            hint()
            now = topo.present()
            if restarts is None or now is None:
                return now
            for i, there in enumerate(now):
                # a runtime's container is waited for, before following could end for want
                # of targets: it counts as there until it runs again
                if there is False and i not in restarts.over and topo.containers[i].target.runtime:
                    went(i, "waiting for it to run again")
            back = restarts.check()
            if not back:
                return restarts.present(now)
            # every target back is in the topology now: one update traces them all, and
            # its reports may be of any of them, so each is known before they are handed on
            for _old, new in back:
                t = topo.containers[new].target
                labels.append(t.label)
                inodes.append(t.inode)
                sink.add_target(t.label, t.inode, t.identity())
                if tally is not None:
                    tally.grow()
            plan = restarts.plan(hops=args.hops, end_at_queue=args.end_at_queue,
                                 start_at_veth=not args.start_at_inner, segment=args.segment)
            # the incarnations gone keep their counters for the summary: their indexes reset
            if emit(tracer.update(plan, raw=True, on_reset=lambda gone: restarts.keep_counters(
                    tracer.correlator, gone))):
                stop.requested = True           # --count reached: end at the next check
            for _old, new in back:
                # once this is out, the new incarnation's packets are traced
                say(f"mace: {topo.containers[new].target.label} runs again, in a new network "
                    f"namespace: {topo.describe()[new]}; traced as {restarts.label(new)}")
            return restarts.present(topo.present())

        try:
            tracer.follow(until, show, presence=presence, on_gone=gone, check_every=PRESENCE_EVERY,
                          timeout_ms=100 if live is None else 50, raw=True)
        finally:
            # Every way out (a stop, the last target gone, a closed pipe): what the kernel
            # already gave us is correlated and written, then the counts are settled.
            tail = tracer.stop(raw=True)
            try:
                if args.count is None or taken < args.count:
                    emit(tail)
                if live is None:
                    sink.flush()
            except BrokenPipeError:
                pass
            if live is not None:
                live.close()
                if not args.quiet:
                    for line in topo.describe() + live.messages:
                        print(line, file=err)
            names = ([restarts.label(i) for i in range(len(labels))] if restarts is not None
                     else labels)
            summary = build(restarts.summarised(tracer) if restarts is not None else tracer, names,
                            inodes, tally, stopped, topo.other_routes)
            if summary_file is not None:
                json.dump(summary, summary_file, indent=2)
                summary_file.write("\n")
                summary_file.flush()
            if not args.quiet:
                try:
                    print(format_text(summary), file=err)
                except BrokenPipeError:
                    pass
    return 0


def _open_for_writing(path: str, option: str):
    """Opened early, so a bad path fails before tracing, but in append mode: a failure
    before tracing starts must not wipe an existing file (truncated once it runs)."""
    try:
        return open(path, "a")
    except OSError as e:
        raise UsageError(f"cannot write {path} ({option}): {e.strerror}",
                         hint="give a path in a directory you can write to") from None


def _have_tui() -> bool:
    try:
        import mace.output.live  # noqa: F401
    except ImportError:
        return False
    return True


def cmd_demo(args) -> int:
    from mace import demo

    _check_positive("--count", args.count)
    _check_positive("--interval", args.interval)
    _check_positive("--co-located", args.colocated, allow_zero=True)
    if args.interval < 0.002:
        raise UsageError("--interval below 0.002 s would flood", hint="use 0.002 or more")
    if args.colocated > 64:
        raise UsageError("--co-located is limited to 64 containers")
    _check_privileges()
    return demo.main(args.count, args.interval, args.colocated, segment=args.segment)


def cmd_events(args) -> int:
    from mace.capture.perf import Capture, Probe, check_tracepoint_name
    from mace.capture.tracefs import read_formats
    from mace.output.clock import wall, wall_offset_ns
    from mace.testing.testbed import Testbed
    from mace.tracer import follow

    _check_positive("--duration", args.duration)
    _check_positive("--count", args.count)
    tracepoints = args.tracepoint or list(NET_EVENTS)
    for tp in tracepoints:
        check_tracepoint_name(tp)
    devices = list(args.device)
    with ExitStack() as stack:
        stop = _Stop()
        stop.install(stack)
        tb = None
        if args.demo:
            tb = stack.enter_context(Testbed(containers_n=1))
            c = tb.containers[0]
            devices = devices or [c.inner, c.veth, tb.bridge, tb.uplink]
        formats = read_formats(tracepoints)
        probes = [Probe(tp, devices=tuple(devices) if "name" in formats[tp].fields else ())
                  for tp in tracepoints]
        cap = Capture(probes, devices, ring_pages=args.ring_pages)
        stack.enter_context(cap.open(formats))
        stop.wake = cap.wakeup
        offset = wall_offset_ns()
        names = [p.tracepoint for p in probes]
        out = sys.stdout
        cap.start()
        pinger = None
        if tb is not None:      # the testbed reaps it
            pinger = tb.popen(tb.containers[0].ns, ["ping", "-c", "3", "-i", "0.2", tb.peer_ip],
                              stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + args.duration if args.duration else None
        shown = 0

        def poll(timeout_ms: int) -> list:
            cap.wait(timeout_ms)
            return cap.read()

        def show(events) -> bool:
            """Print events; True once --count is reached."""
            nonlocal shown
            for ev in events[:args.count - shown] if args.count else events:
                dev = cap.devices[ev.dev] if ev.dev >= 0 else "-"
                out.write(f"{wall(ev.ts + offset, 6)} cpu{ev.cpu} tid {ev.tid:<7d} "
                          f"{names[ev.kind]:<22s} {dev:<10s} skb={ev.skb:#x} len={ev.len}\n")
                shown += 1
            out.flush()
            return bool(args.count) and shown >= args.count

        def until() -> bool:
            return (stop.requested or (deadline is not None and time.monotonic() >= deadline)
                    or (pinger is not None and pinger.poll() is not None))

        if follow(poll, until, show, timeout_ms=100) == "until":
            show(cap.read(final=True))      # what the kernel already gave us
        cap.stop()
        s = cap.stats()
        dropped = sum(cap.kernel_dropped().values())
        print(f"mace: {s['events']} events, {s['lost']} lost, {s['errors']} malformed"
              + (f", {dropped} dropped by the kernel without notice" if dropped else ""),
              file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        _unknown(parser, args, extra)
    if not args.command:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args)
    except MaceError as e:
        print(f"mace: error: {e.oneline()}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:
        # the reader went away (mace ... | head): not an error; keep Python from
        # complaining again while flushing stdout at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def _unknown(parser: argparse.ArgumentParser, args, extra: list[str]) -> None:
    """A mistyped option: the subcommand's usage (not the top-level one) and the nearest
    option it has.  Exits 2, as argparse does."""
    import difflib
    sub = parser._mace_commands.get(args.command) if args.command else None
    where = sub or parser
    options = [o for a in where._actions for o in a.option_strings if o.startswith("--")]
    word = extra[0].split("=", 1)[0]
    near = difflib.get_close_matches(word, options, n=1, cutoff=0.75) if word.startswith("-") else []
    where.error(f"unrecognized argument {extra[0]}" + (f" (did you mean {near[0]}?)" if near else ""))


def run() -> None:
    """Console-script entry point."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)

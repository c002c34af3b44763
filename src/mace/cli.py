"""Command line: `mace <command> ...`.  Errors are one line with a hint and a distinct exit
status (see mace.errors); a closed output pipe ends quietly."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack

from mace import __version__
from mace.errors import MaceError, UsageError

NET_EVENTS = ("net:net_dev_queue", "net:net_dev_start_xmit", "net:net_dev_xmit",
              "net:netif_rx", "net:netif_receive_skb")

EXAMPLES = """\
examples:
  mace events --demo                        decoded kernel events of 3 pings through a throwaway testbed
  mace events -d eth0 -d br0 --duration 5  every net event on eth0 and br0 for 5 s
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mace", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Per-packet latency that container network isolation adds, from kernel tracepoints.")
    p.add_argument("--version", action="version", version=f"mace {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

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
    return p


def _check_positive(name: str, value, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise UsageError(f"{name} must be positive, not {value}")


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


def cmd_events(args) -> int:
    from mace.perf import Capture, Probe, check_tracepoint_name
    from mace.testbed import Testbed
    from mace.tracefs import read_formats

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
        offset = time.time_ns() - time.monotonic_ns()
        names = [p.tracepoint for p in probes]
        out = sys.stdout
        cap.start()
        pinger = None
        if tb is not None:      # the testbed reaps it
            pinger = tb.popen(tb.containers[0].ns, ["ping", "-c", "3", "-i", "0.2", tb.peer_ip],
                              stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + args.duration if args.duration else None
        shown = 0
        while True:
            final = (stop.requested
                     or (deadline is not None and time.monotonic() >= deadline)
                     or (pinger is not None and pinger.poll() is not None))
            if not final:
                cap.wait(100)
            for ev in cap.read(final=final):
                dev = cap.devices[ev.dev] if ev.dev >= 0 else "-"
                out.write(f"{(ev.ts + offset) / 1e9:.6f} cpu{ev.cpu} tid {ev.tid:<7d} "
                          f"{names[ev.kind]:<22s} {dev:<10s} skb={ev.skb:#x} len={ev.len}\n")
                shown += 1
                if args.count and shown >= args.count:
                    final = True
                    break
            out.flush()
            if final:
                break
        cap.stop()
        s = cap.stats()
        dropped = sum(cap.kernel_dropped().values())
        print(f"mace: {s['events']} events, {s['lost']} lost, {s['errors']} malformed"
              + (f", {dropped} dropped by the kernel without notice" if dropped else ""),
              file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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


def run() -> None:
    """Console-script entry point."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)

"""Helpers the system tests share: pings from a testbed's containers, a trace while they run,
output read as it comes from a running command, busy CPUs, and the one-line error check.  Plain functions, imported
as `from helpers import ...` (tests/ is on sys.path through tests/conftest.py)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
import time

import pytest

WAIT = 15                   # longest anything may take that should be quick


def inode_of(tb, c) -> int:
    """The network namespace inode of testbed container c (what reports call netns)."""
    return os.stat(tb.ns_path(c.ns)).st_ino


def ping_argv(tb, n: int, *, size: int = 56, interval: str = "0.1") -> list[str]:
    return ["ping", "-n", "-q", "-c", str(n), "-i", interval, "-s", str(size), tb.peer_ip]


def ping(tb, c, n: int, *, size: int = 56, interval: str = "0.1") -> tuple[float, float]:
    """n pings from container c, all answered; returns the wall-clock window they took."""
    t0 = time.time()
    r = tb.run(c.ns, ping_argv(tb, n, size=size, interval=interval), timeout=30)
    t1 = time.time()
    assert r.returncode == 0 and f" {n} received" in r.stdout, r.stdout + r.stderr
    return t0, t1


def pings(tb, plan, *, interval: str = "0.1") -> tuple[float, float]:
    """Concurrent pings, plan [(container, count)] or [(container, count, size)], all
    answered; returns the wall-clock window they took."""
    t0 = time.time()
    procs = []
    for c, n, *size in plan:
        argv = ping_argv(tb, n, size=size[0] if size else 56, interval=interval)
        procs.append((tb.popen(c.ns, argv, stdout=subprocess.PIPE, text=True), c, n))
    for p, c, n in procs:
        out, _ = p.communicate(timeout=30)
        assert p.returncode == 0 and f" {n} received" in out, (c.ns, out)
    return t0, time.time()


def one_line_error(r, code: int, message: str) -> str:
    """r (a CompletedProcess) failed with `code` and one line `mace: error: ...` matching
    `message` on stderr, nothing on stdout, no traceback; returns that line."""
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("mace: error: ") and re.search(message, lines[0]), lines[0]
    assert "Traceback" not in r.stderr
    assert r.stdout == ""
    return lines[0]


def wait_for(pred, timeout=WAIT, what="condition"):
    """Poll pred until true; `what` (a string, or a function giving one) names it."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        assert time.monotonic() < deadline, f"no {what() if callable(what) else what} within {timeout} s"
        time.sleep(0.05)


class Lines:
    """The lines of a running command's stream, read by a thread as they come, so that a
    test can wait for one and still get everything.  `cond` guards `lines`; it may be
    shared by several streams of one command."""

    def __init__(self, stream, cond: threading.Condition | None = None):
        self.lines: list[str] = []
        self.cond = cond or threading.Condition()
        self.thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self.thread.start()

    def _pump(self, stream):
        for line in stream:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    @property
    def open(self) -> bool:
        """Whether more lines may come."""
        return self.thread.is_alive()

    def text(self) -> str:
        with self.cond:
            return "\n".join(self.lines)

    def wait(self, pred, timeout: float, proc: subprocess.Popen, step: float = 0.05):
        """Wait until pred(lines) is true: its value; None once the command ended without it
        or `timeout` passed."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                value = pred(self.lines)
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0 or (proc.poll() is not None and not self.open):
                    return None
                self.cond.wait(min(left, step))

    def join(self, timeout: float = 5) -> None:
        self.thread.join(timeout)


def finish(proc: subprocess.Popen, timeout: float, what) -> int:
    """Wait for proc to end by itself; kills it and fails the test if it does not.
    `what`: a function giving the failure message."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(what())


def resolve_peer(tb) -> None:
    """Resolve the peer's address on the uplink before a test's containers start at once.

    The first packets of several containers that wait behind one ARP resolution are what
    test_first_packets_of_two_containers_behind_one_arp (test_service_live) is about; a test
    about something else does not depend on that case when its pings happen to coincide."""
    r = tb.run(tb.host_ns, ["ping", "-n", "-q", "-c", "1", "-W", "2", tb.peer_ip], timeout=10)
    assert r.returncode == 0, r.stderr


def need_tool(tool: str) -> str:
    """The path of `tool`; a test without it fails in CI (.ci/run installs it), skips elsewhere."""
    import os
    import shutil

    import pytest
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{tool} is not installed (.ci/run installs it)")
        pytest.skip(f"needs {tool}")
    return path


@contextlib.contextmanager
def busy_cpus(seconds: float):
    """One bounded busy loop per CPU (no traffic), stopped by PID on the way out."""
    spin = f"import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end: pass"
    procs = [subprocess.Popen(["taskset", "-c", str(cpu), sys.executable, "-c", spin])
             for cpu in sorted(os.sched_getaffinity(0))]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def with_tracefs(argv: list[str]) -> list[str]:
    """argv run in a mount namespace of its own with tracefs at /sys/kernel/tracing, where
    bpftrace and perf look tracepoints up: a fresh machine has it unmounted, and a mount of
    the test's own would outlive a failed test.  unshare and sh exec, so the PID is argv's."""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || true; exec "$@"', "sh", *argv]


SUMMARY_ROW = re.compile(r"^(\S.*?)\s+(egress|ingress)\s+(\d+)\s")


def summary_rows(err: list[str]) -> list[tuple[str, str, int]]:
    """The rows of mace trace's text summary (target, direction, count), from its stderr
    lines; checks that the lines under the table are what they should be."""
    heads = [i for i, line in enumerate(err) if line.startswith("target ") and " dir " in line]
    assert len(heads) == 1, "\n".join(err)
    rows = []
    for line in err[heads[0] + 1:]:
        m = SUMMARY_ROW.match(line)
        if not m:
            break
        rows.append((m[1].rstrip(), m[2], int(m[3])))
    # under the table: a line per shortfall explained and per target stopped, then the totals
    rest = err[heads[0] + 1 + len(rows):]
    totals = [i for i, line in enumerate(rest)
              if re.match(r"^\d+ events in [\d.]+ s; lost \(ring full\) \d+", line)]
    assert totals and all(":" in line for line in rest[:totals[0]]), "\n".join(err)
    return rows


def trace_while(plan, start, *, settle: float = 0.02, **kw):
    """Trace `plan` while the processes `start()` returns run (each must exit 0); returns
    (reports, stats, procs), stats with the samples read per tracepoint ("samples")."""
    from mace.tracer import Tracer
    reports = []
    with Tracer(plan, **kw) as tr:
        tr.start()
        procs = start()
        deadline = time.monotonic() + 120
        tr.run(until=lambda: all(p.poll() is not None for p in procs) or time.monotonic() > deadline,
               on_reports=reports.extend)
        time.sleep(settle)          # the last replies' backlog processing
        reports += tr.stop()
        stats = tr.stats()
        stats["samples"] = {p.tracepoint: n for p, (_, n) in
                            zip(tr.capture.probes, tr.capture.rings.kind_counts(), strict=True)}
    for p in procs:
        assert p.wait(timeout=5) == 0, p.args
    return reports, stats, procs

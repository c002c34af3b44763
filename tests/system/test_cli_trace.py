"""`mace trace` end to end: the command as a subprocess, real packets through testbeds, and its
output (reports, discovery lines, summary, exit status) parsed back."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
from helpers import Lines, busy_cpus, finish, inode_of, ping_argv, pings, resolve_peer, summary_rows
from helpers import one_line_error as check_one_line_error
from helpers import ping as _ping
from pyroute2 import netns

N = 5                       # pings per run (at -i 0.1)
SETTLE = 0.6                # the discovery line is printed before the tracer starts
RING = ("--ring-pages", "1024")     # headroom against bursts of other tests' eth0 traffic
WAIT = 15                   # longest a run may take to end once it should

DISCOVERY = re.compile(r"^netns (\d+) \((.+)\): (\S+) ⇄ (\S+)(?: → (\S+))? → (\S+)$")
MACE_LINE = r"\[\d+\.\d{6}\] \(\d+\) (egress|ingress): \d+"
MACE_RE = re.compile(rf"^{MACE_LINE}$")
MACE_PARSE = re.compile(r"^(?:(?P<target>\S+) )?\[(?P<ts>\d+\.\d{6})\] \((?P<seq>\d+)\) "
                        r"(?P<dir>egress|ingress): (?P<lat>\d+)$")
JSONL_KEYS = {"ts", "netns", "target", "container", "segment", "dir", "seq", "latency_ns", "len", "cpu"}
CSV_HEADER = ["ts", "netns", "target", "container", "pod", "k8s_namespace", "segment", "dir", "seq", "latency_ns",
              "len", "cpu"]
EGRESS_HOPS = ("veth rx", "veth backlog", "bridge", "route", "uplink queue")
INGRESS_HOPS = ("route", "bridge", "veth", "container rx")
HOP_COLUMNS = ["egress_veth_rx_ns", "egress_veth_backlog_ns", "egress_bridge_ns", "egress_route_ns",
               "egress_uplink_queue_ns", "ingress_route_ns", "ingress_bridge_ns", "ingress_veth_ns",
               "ingress_container_rx_ns"]
ECHO_LEN = 20 + 8       # IPv4 + ICMP headers: a report's len is this plus ping's -s


# -- running mace ---------------------------------------------------------------------------

_LAUNCHED: list[Proc] = []


def mace_argv(*args) -> list[str]:
    return [sys.executable, "-m", "mace", "trace", *map(str, args)]


class Proc:
    """A running command (mace, or a wrapper around it) whose stdout and stderr are read by
    threads as they come, so that a test can wait for a line and still get everything."""

    def __init__(self, argv, *, mace=None, stdout=subprocess.PIPE):
        self.argv = list(argv)
        self.mace = list(mace or argv)          # mace's own command line, for the leftover check
        self.t_start = time.time()
        self.t_end = None
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=stdout,
                                     stderr=subprocess.PIPE, encoding="utf-8", errors="replace")
        _LAUNCHED.append(self)
        self.streams = [Lines(self.proc.stderr)]
        if self.proc.stdout is not None:
            self.streams.append(Lines(self.proc.stdout, self.streams[0].cond))
        self.err = self.streams[0].lines
        self.out = self.streams[1].lines if len(self.streams) > 1 else []

    def text(self) -> str:
        return "\n".join(self.err)

    def wait_err(self, pattern, count=1, timeout=WAIT) -> list[str]:
        """Wait until `count` stderr lines match `pattern`; return them."""
        pat = re.compile(pattern)

        def hits(lines):
            found = [line for line in lines if pat.search(line)]
            return found if len(found) >= count else None

        found = self.streams[0].wait(hits, timeout, self.proc, step=0.1)
        if found:
            return found
        if self.proc.poll() is not None and not self.streams[0].open:
            pytest.fail(f"exited {self.proc.returncode} before {pattern!r} on stderr:\n" + self.text())
        pytest.fail(f"no {pattern!r} on stderr within {timeout} s:\n" + self.text())

    def ready(self, targets=1) -> list[str]:
        """Wait for the discovery lines, then for the tracer to start (it does right after)."""
        lines = self.wait_err(DISCOVERY.pattern, targets)
        time.sleep(SETTLE)
        return lines

    def finish(self, timeout=WAIT) -> int:
        """Wait for the command to end by itself; fails (and kills it) if it does not."""
        rc = finish(self.proc, timeout, lambda: f"{shlex.join(self.argv)} did not end within "
                                                f"{timeout} s; stderr:\n" + self.text())
        for lines in self.streams:
            lines.join(5)
        self.t_end = time.time()
        return rc

    def stop(self, sig=signal.SIGINT, timeout=WAIT) -> int:
        self.proc.send_signal(sig)
        return self.finish(timeout)


def mace(*args, **kw) -> Proc:
    return Proc(mace_argv(*args), **kw)


def mace_once(*args, prefix=(), timeout=30) -> subprocess.CompletedProcess:
    """Run mace to completion (the bad-input cases)."""
    argv = mace_argv(*args)
    p = Proc([*prefix, *argv], mace=argv)
    rc = p.finish(timeout)
    return subprocess.CompletedProcess(p.argv, rc, "\n".join(p.out), "\n".join(p.err))


def _processes_running(argvs) -> list[str]:
    wanted = {"\0".join(a) for a in argvs}
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace").rstrip("\0")
        except OSError:
            continue
        if cmd in wanted:
            found.append(f"{pid}: {cmd.replace(chr(0), ' ')}")
    return found


@pytest.fixture(autouse=True)
def _nothing_left_behind():
    """After each test (and after its testbeds are torn down: autouse fixtures are set up
    first, so torn down last): no mace process and no namespace of this run remain."""
    yield
    launched = list(_LAUNCHED)
    _LAUNCHED.clear()
    stragglers = []
    for p in launched:
        if p.proc.poll() is None:
            stragglers.append(shlex.join(p.argv))
            p.proc.kill()
            p.proc.wait()
    time.sleep(0.05)
    still = _processes_running([p.mace for p in launched])
    ours = f"mace-tb-{os.getpid()}-"
    namespaces = [n for n in netns.listnetns() if n.startswith(ours)]
    assert not stragglers, f"still running after the test: {stragglers}"
    assert not still, f"mace processes left: {still}"
    assert not namespaces, f"namespaces left: {namespaces}"


# -- traffic and the testbed ----------------------------------------------------------------

def ping(tb, c, n=N, size=56) -> tuple[float, float]:
    """n pings from container c (every 0.1 s), all answered; the wall-clock window."""
    return _ping(tb, c, n, size=size)


def wait_in_namespace(pid: int, timeout=5) -> None:
    """nsenter enters the namespace, then execs: wait until the PID is in it."""
    own = os.stat("/proc/self/ns/net").st_ino
    deadline = time.monotonic() + timeout
    while os.stat(f"/proc/{pid}/ns/net").st_ino == own:
        assert time.monotonic() < deadline, f"PID {pid} never entered its namespace"
        time.sleep(0.01)


def forget_namespace(tb, ns: str) -> None:
    """Remove a container's namespace as a stopping container would lose it."""
    netns.remove(ns)
    tb._made.remove(ns)


# -- parsing the output ---------------------------------------------------------------------

def parse(fmt: str, lines: list[str], labels: list[str], *, hops=False) -> list[dict]:
    """Reports as dicts (target, ts, seq, dir, latency, and len/netns/cpu/hops where the format
    has them), checking each line's syntax on the way."""
    many = len(labels) > 1
    out = []
    if fmt == "mace":
        for line in lines:
            if many:
                label, _, rest = line.partition(" ")
                assert label in labels, line
                assert MACE_RE.match(rest), line
            else:
                label = labels[0]
                assert MACE_RE.match(line), line
            m = MACE_PARSE.match(line)
            out.append({"target": label, "ts": float(m["ts"]), "seq": int(m["seq"]),
                        "dir": m["dir"], "latency": int(m["lat"])})
    elif fmt == "jsonl":
        for line in lines:
            obj = json.loads(line)
            assert set(obj) == JSONL_KEYS | ({"hops"} if hops else set()), obj
            assert isinstance(obj["ts"], float) and isinstance(obj["cpu"], int), obj
            assert obj["segment"] == "device", obj
            r = {"target": obj["target"], "ts": obj["ts"], "seq": obj["seq"], "dir": obj["dir"],
                 "latency": obj["latency_ns"], "len": obj["len"], "netns": obj["netns"],
                 "cpu": obj["cpu"]}
            if hops:
                names = EGRESS_HOPS if obj["dir"] == "egress" else INGRESS_HOPS
                assert list(obj["hops"]) == list(names), obj
                r["hops"] = list(obj["hops"].values())
            out.append(r)
    else:
        rows = list(csv.reader(io.StringIO("\n".join(lines) + "\n")))
        assert rows[0] == CSV_HEADER + (HOP_COLUMNS if hops else []), rows[0]
        for row in rows[1:]:
            assert len(row) == len(rows[0]), row
            assert re.fullmatch(r"\d+\.\d{9}", row[0]), row
            cell = dict(zip(rows[0], row, strict=True))
            # a namespace, not a runtime's container (nor a pod)
            assert cell["container"] == cell["pod"] == cell["k8s_namespace"] == "", row
            assert cell["segment"] == "device", row
            r = {"ts": float(cell["ts"]), "netns": int(cell["netns"]), "target": cell["target"],
                 "dir": cell["dir"], "seq": int(cell["seq"]), "latency": int(cell["latency_ns"]),
                 "len": int(cell["len"]), "cpu": int(cell["cpu"])}
            if hops:
                first = len(CSV_HEADER)
                eg, ing = row[first:first + len(EGRESS_HOPS)], row[first + len(EGRESS_HOPS):]
                mine, other = (eg, ing) if r["dir"] == "egress" else (ing, eg)
                assert other == [""] * len(other), row        # the other direction's columns
                r["hops"] = [int(h) if h else None for h in mine]
            out.append(r)
    for r in out:
        assert r["dir"] in ("egress", "ingress"), r
    return out


def check_reports(reports, label, n, window, *, size=56, inode=None, hops=False):
    """Exactly n reports each way for `label`, seq 1..n, latencies > 0, ts inside `window`."""
    mine = [r for r in reports if r["target"] == label]
    for d in ("egress", "ingress"):
        rs = [r for r in mine if r["dir"] == d]
        assert [r["seq"] for r in rs] == list(range(1, n + 1)), (label, d, rs)
        for r in rs:
            assert r["latency"] > 0, r
            assert window[0] <= r["ts"] <= window[1], (r, window)
            if "len" in r:
                assert r["len"] == ECHO_LEN + size, r
            if "netns" in r and inode is not None:
                assert r["netns"] == inode, r
            if "cpu" in r:
                assert 0 <= r["cpu"] < os.cpu_count(), r
            if hops:
                # by default egress runs from the veth to the uplink's queue: neither the
                # first hop (inner xmit -> veth) nor the uplink queue hop is timed; the
                # routing decision is, both ways
                timed = r["hops"][1:4] if r["dir"] == "egress" else r["hops"]
                assert r["dir"] == "ingress" or r["hops"][0] is r["hops"][4] is None, r
                assert None not in timed, r
                assert timed == sorted(timed), r
                assert all(0 < h <= r["latency"] for h in timed), r
            else:
                assert "hops" not in r
    assert len(mine) == 2 * n


def check_summary(err, counts: list[tuple[str, int, int]]):
    """The table has a line per target and direction, in order, with these counts."""
    want = [(label, d, k) for label, eg, ing in counts
            for d, k in (("egress", eg), ("ingress", ing))]
    assert summary_rows(err) == want


def check_discovery(line, tb, c, who, inode):
    m = DISCOVERY.match(line)
    assert m, line
    assert m.groups() == (str(inode), who, c.inner, c.veth, tb.bridge, tb.uplink), line


# -- targets --------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["name", "pid", "run-path", "proc-path"])
def test_each_target_form_gives_n_reports_each_way(testbed, form):
    tb, c = testbed, testbed.containers[0]
    inode = inode_of(tb, c)
    if form in ("pid", "proc-path"):
        pid = tb.popen(c.ns, ["sleep", "30"]).pid      # the testbed kills it
        wait_in_namespace(pid)
        spec = str(pid) if form == "pid" else f"/proc/{pid}/ns/net"
    else:
        spec = c.ns if form == "name" else tb.ns_path(c.ns)
    run = mace("--netns", spec, "-f", "jsonl", "--count", 2 * N, *RING)
    (line,) = run.ready()
    window = ping(tb, c)
    assert run.finish() == 0, run.text()
    check_discovery(line, tb, c, f"pid {spec}" if form == "pid" else spec, inode)
    check_reports(parse("jsonl", run.out, [spec]), spec, N, window, inode=inode)
    check_summary(run.err, [(spec, N, N)])


# -- formats --------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,hops", [("mace", False), ("jsonl", False), ("jsonl", True),
                                      ("csv", False), ("csv", True)],
                         ids=["mace", "jsonl", "jsonl-hops", "csv", "csv-hops"])
def test_each_format_parses_back(testbed, fmt, hops):
    tb, c = testbed, testbed.containers[0]
    size = 120
    run = mace("--netns", c.ns, "-f", fmt, "--count", 2 * N, *RING, *(["--hops"] if hops else []))
    run.ready()
    ping_window = ping(tb, c, size=size)
    assert run.finish() == 0, run.text()
    reports = parse(fmt, run.out, [c.ns], hops=hops)
    check_reports(reports, c.ns, N, (run.t_start, run.t_end), size=size, inode=inode_of(tb, c),
                  hops=hops)
    # each packet entered the segment while ping ran (the wall clock is the same clock)
    assert all(ping_window[0] - 0.05 <= r["ts"] <= ping_window[1] + 0.05 for r in reports)


# -- several targets ------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["mace", "jsonl"])
def test_several_targets_each_report_attributed_and_others_ignored(testbed_factory, fmt):
    tb = testbed_factory(containers_n=3)
    c0, c1, c2 = tb.containers
    counts, sizes = (4, 6, 5), (100, 200, 300)      # c2 pings too, but is not traced
    resolve_peer(tb)
    run = mace("--netns", c0.ns, "--netns", c1.ns, "-f", fmt, *RING)
    lines = run.ready(2)
    window = pings(tb, list(zip(tb.containers, counts, sizes, strict=True)))
    time.sleep(0.3)
    assert run.stop(signal.SIGINT) == 0, run.text()
    for line, c in zip(lines, (c0, c1), strict=True):
        check_discovery(line, tb, c, c.ns, inode_of(tb, c))
    reports = parse(fmt, run.out, [c0.ns, c1.ns])
    for i, c in enumerate((c0, c1)):
        check_reports(reports, c.ns, counts[i], (window[0], run.t_end), size=sizes[i],
                      inode=inode_of(tb, c))
    assert {r["target"] for r in reports} == {c0.ns, c1.ns}
    assert len(reports) == 2 * (counts[0] + counts[1])
    check_summary(run.err, [(c0.ns, counts[0], counts[0]), (c1.ns, counts[1], counts[1])])
    assert not any(c2.ns in line or c2.veth in line for line in run.err + run.out)


def test_summary_rows_tell_path_targets_apart(testbed_factory):
    tb = testbed_factory(containers_n=2)
    c0, c1 = tb.containers
    specs = [tb.ns_path(c0.ns), tb.ns_path(c1.ns)]
    run = mace("--netns", specs[0], "--netns", specs[1], "--count", 2 * (2 + 3), *RING)
    run.ready(2)
    ping(tb, c0, 2)
    ping(tb, c1, 3)
    assert run.finish() == 0, run.text()
    rows = summary_rows(run.err)
    assert [(d, k) for _, d, k in rows] == [("egress", 2), ("ingress", 2), ("egress", 3), ("ingress", 3)]
    assert rows[0][0] == rows[1][0] and rows[2][0] == rows[3][0]
    assert rows[0][0] != rows[2][0], f"both targets' rows read {rows[0][0]!r}"


# -- how a run ends -------------------------------------------------------------------------

def test_count_stops_by_itself_after_exactly_n_reports(testbed):
    tb, c = testbed, testbed.containers[0]
    run = mace("--netns", c.ns, "--count", 6, *RING)
    run.ready()
    ping(tb, c)                             # 10 reports' worth of packets
    assert run.finish() == 0, run.text()
    assert len(run.out) == 6 and all(MACE_RE.match(line) for line in run.out), run.out
    reports = parse("mace", run.out, [c.ns])
    assert [(r["seq"], r["dir"]) for r in reports] == [(s, d) for s in (1, 2, 3)
                                                       for d in ("egress", "ingress")]
    check_summary(run.err, [(c.ns, 3, 3)])


def test_duration_stops_by_itself(testbed):
    tb, c = testbed, testbed.containers[0]
    duration = 2.0
    run = mace("--netns", c.ns, "--duration", duration, *RING)
    run.wait_err(DISCOVERY.pattern)
    t_ready = time.monotonic()
    time.sleep(SETTLE)
    window = ping(tb, c)
    assert run.finish(timeout=duration + 5) == 0, run.text()
    took = time.monotonic() - t_ready
    assert duration - 0.1 <= took <= duration + 2, took
    check_reports(parse("mace", run.out, [c.ns]), c.ns, N, window)
    check_summary(run.err, [(c.ns, N, N)])


@pytest.mark.parametrize("sig,to_file", [(signal.SIGINT, False), (signal.SIGTERM, True)],
                         ids=["SIGINT-stdout", "SIGTERM-output-file"])
def test_signal_ends_cleanly_with_reports_and_summary(testbed, tmp_path, sig, to_file):
    tb, c = testbed, testbed.containers[0]
    out_file, summary_file = tmp_path / "reports.jsonl", tmp_path / "summary.json"
    run = mace("--netns", c.ns, "-f", "jsonl", "--summary-json", summary_file, *RING,
               *(["--output", out_file] if to_file else []))
    run.ready()
    window = ping(tb, c)
    time.sleep(0.2)
    assert run.stop(sig) == 0, run.text()
    assert "Traceback" not in run.text()
    if to_file:
        assert run.out == []
        lines = out_file.read_text().splitlines()
    else:
        lines = run.out
    inode = inode_of(tb, c)
    check_reports(parse("jsonl", lines, [c.ns]), c.ns, N, (window[0], run.t_end), inode=inode)
    check_summary(run.err, [(c.ns, N, N)])
    summary = json.loads(summary_file.read_text())
    (entry,) = summary["containers"]
    assert entry["target"] == c.ns and entry["netns"] == inode
    for d in ("egress", "ingress"):
        assert entry[d]["count"] == N, entry
        assert 0 < entry[d]["min_ns"] <= entry[d]["p50_ns"] <= entry[d]["max_ns"], entry
    assert 0 < summary["duration_s"] < run.t_end - run.t_start


def test_closed_pipe_ends_quietly_with_status_0(testbed):
    tb, c = testbed, testbed.containers[0]
    argv = mace_argv("--netns", c.ns, "--duration", 30, *RING)
    script = f'{shlex.join(argv)} | head -n 2; echo "mace-status=${{PIPESTATUS[0]}}" >&2'
    run = Proc(["bash", "-c", script], mace=argv)
    run.ready()
    t0 = time.monotonic()
    pinger = tb.popen(c.ns, ping_argv(tb, 20), stdout=subprocess.DEVNULL)    # keeps mace writing
    assert run.finish(timeout=WAIT) == 0, run.text()
    assert time.monotonic() - t0 < 10, "mace did not notice that head had gone"
    pinger.wait(timeout=10)
    assert len(run.out) == 2 and all(MACE_RE.match(line) for line in run.out), run.out
    assert run.err[-1] == "mace-status=0", run.text()
    assert "Traceback" not in run.text() and "Error" not in run.text(), run.text()
    assert summary_rows(run.err)             # still settles and prints its summary


def test_quiet_prints_no_discovery_and_no_summary(testbed, tmp_path):
    tb, c = testbed, testbed.containers[0]
    out_file = tmp_path / "out.csv"
    run = mace("--netns", c.ns, "-q", "--count", 2 * N, "-f", "csv", "-o", out_file, *RING)
    time.sleep(1.5)                             # nothing to wait for on stderr
    assert run.proc.poll() is None, run.text()
    window = ping(tb, c)
    assert run.finish() == 0
    assert run.err == [] and run.out == []
    check_reports(parse("csv", out_file.read_text().splitlines(), [c.ns]), c.ns, N,
                  (window[0], run.t_end), inode=inode_of(tb, c))


def test_smoke_timeout_sigint(testbed):
    tb, c = testbed, testbed.containers[0]
    argv = mace_argv("--netns", c.ns)
    run = Proc(["timeout", "--preserve-status", "-s", "INT", "3", *argv], mace=argv)
    run.ready()
    ping(tb, c, 3)
    assert run.finish(timeout=10) == 0, run.text()
    assert all(MACE_RE.match(line) for line in run.out) and len(run.out) == 6, run.out
    check_summary(run.err, [(c.ns, 3, 3)])


# -- containers that stop -------------------------------------------------------------------

def test_a_container_stops_while_traced(testbed_factory):
    tb = testbed_factory(containers_n=2)
    c0, c1 = tb.containers
    inodes = [inode_of(tb, c) for c in (c0, c1)]
    run = mace("--netns", c0.ns, "--netns", c1.ns, "-f", "jsonl", *RING)
    run.ready(2)
    t0, _ = ping(tb, c0, 3)
    ping(tb, c1, 4)
    forget_namespace(tb, c1.ns)
    (stopped,) = run.wait_err(r"stopped \(its veth", timeout=10)
    assert c1.ns in stopped and c1.veth in stopped and "1 target(s) left" in stopped, stopped
    assert run.proc.poll() is None, run.text()
    ping(tb, c0, 4)                         # the other container is still traced
    time.sleep(0.2)
    assert run.stop(signal.SIGINT) == 0, run.text()
    reports = parse("jsonl", run.out, [c0.ns, c1.ns])
    check_reports(reports, c0.ns, 7, (t0, run.t_end), inode=inodes[0])
    check_reports(reports, c1.ns, 4, (t0, run.t_end), inode=inodes[1])
    check_summary(run.err, [(c0.ns, 7, 7), (c1.ns, 4, 4)])
    assert any(re.match(rf"{re.escape(c1.ns)}: stopped [\d.]+ s after the start", line)
               for line in run.err), run.text()
    assert "Traceback" not in run.text()

    # with its only target gone, mace ends by itself
    run = mace("--netns", c0.ns, *RING)
    run.ready()
    window = ping(tb, c0, 3)
    forget_namespace(tb, c0.ns)
    assert run.finish(timeout=WAIT) == 0, run.text()
    assert run.t_end - window[1] < 10
    (stopped,) = run.wait_err(r"stopped \(its veth")
    assert c0.ns in stopped and "0 target(s) left" in stopped, stopped
    check_reports(parse("mace", run.out, [c0.ns]), c0.ns, 3, window)
    check_summary(run.err, [(c0.ns, 3, 3)])


# -- bad input ------------------------------------------------------------------------------

def _gone_pid() -> str:
    p = subprocess.Popen(["true"])
    p.wait()
    assert not os.path.exists(f"/proc/{p.pid}")
    return str(p.pid)


BAD = [
    ("pid-not-found", lambda tb: ["--netns", _gone_pid()], 6, r"no process with PID \d+"),
    ("name-not-a-namespace", lambda tb: ["--netns", f"mace-tb-{os.getpid()}-nosuch"], 6,
     r"no network namespace named"),
    ("path-not-a-namespace", lambda tb: ["--netns", "/etc/hostname"], 6,
     r"/etc/hostname is not a network namespace"),
    ("host-namespace", lambda tb: ["--netns", "/proc/self/ns/net"], 7, r"own network namespace"),
    ("uplink-missing", lambda tb: ["--netns", tb.containers[0].ns, "--uplink", "nope0"], 8,
     r"no device 'nope0'"),
    ("table-size", lambda tb: ["--netns", tb.containers[0].ns, "--table-size", "3"], 2,
     r"--table-size 3 is not a power of two"),
    ("ring-pages", lambda tb: ["--netns", tb.containers[0].ns, "--ring-pages", "0"], 2,
     r"--ring-pages 0 is not a power of two"),
    ("duration", lambda tb: ["--netns", tb.containers[0].ns, "--duration", "-1"], 2,
     r"--duration must be positive"),
]


@pytest.mark.parametrize("args,code,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_one_line_and_its_exit_status(testbed, args, code, message):
    check_one_line_error(mace_once(*args(testbed)), code, message)


def test_namespace_without_veth(testbed):
    name = f"mace-tb-{os.getpid()}-{secrets.token_hex(3)[:5]}-noveth"
    netns.create(name)
    try:
        r = mace_once("--netns", name)
    finally:
        netns.remove(name)
    check_one_line_error(r, 7, rf"{name} has no veth")


def test_summary_json_that_cannot_be_written(testbed, tmp_path):
    path = tmp_path / "no-such-dir" / "summary.json"
    r = mace_once("--netns", testbed.containers[0].ns, "--duration", "0.5", "-q",
                  "--summary-json", path)
    # as with an --output that cannot be written: a usage error, on one line
    check_one_line_error(r, 2, re.escape(str(path)))


def test_not_root(testbed):
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux)")
    # nobody, with only CAP_DAC_READ_SEARCH so that it can reach the interpreter wherever
    # it is installed (e.g. under a 0700 /root): no CAP_SYS_ADMIN, no CAP_PERFMON
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
              "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
    r = mace_once("--netns", testbed.containers[0].ns, prefix=nobody)
    check_one_line_error(r, 3, r"\broot\b")


# -- uplinks ----------------------------------------------------------------------------------

def _spare_device(tb) -> str:
    """A device of the host namespace that carries no container traffic (a veth pair whose
    other end is in the same namespace), with a route of its own."""
    name = f"{tb.uplink[:-2]}sp"
    for argv in (["ip", "link", "add", name, "type", "veth", "peer", "name", f"{name}2"],
                 ["ip", "link", "set", name, "up"], ["ip", "link", "set", f"{name}2", "up"],
                 ["ip", "route", "add", "198.18.250.0/24", "dev", name]):
        r = tb.run(tb.host_ns, argv)
        assert r.returncode == 0, r
    return name


def test_a_wrong_uplink_is_named_at_run_time_and_in_the_summary(testbed):
    tb, c = testbed, testbed.containers[0]
    spare = _spare_device(tb)
    run = mace("--netns", c.ns, "--uplink", spare, "-f", "jsonl", "--duration", 20)
    run.ready()
    ping(tb, c, 8)
    # while it runs, once: the packets left by a device it does not trace, which it names
    (line,) = run.wait_err(r"packets crossed its veth, none reached", timeout=10)
    assert spare in line and f"the host also routes by {tb.uplink}" in line and "--uplink" in line, line
    assert run.stop() == 0, run.text()
    assert not run.out                                   # no report: nothing reached the uplink
    summary = [line for line in run.err if line.startswith(f"{c.ns} egress: none reached {spare}")]
    assert summary and tb.uplink in summary[0], run.text()


def test_uplink_is_repeatable_and_each_is_traced(testbed):
    tb, c = testbed, testbed.containers[0]
    spare = _spare_device(tb)
    run = mace("--netns", c.ns, "--uplink", spare, "--uplink", tb.uplink, "-f", "jsonl", "--count", 6)
    (line,) = run.ready()
    assert f"→ {spare}|{tb.uplink}" in line, line
    ping(tb, c, 3)
    assert run.finish() == 0, run.text()
    reports = parse("jsonl", run.out, [c.ns])
    check_reports(reports, c.ns, 3, (0, run.t_end))
    assert not any("none reached" in line for line in run.err), run.text()


# -- IPv6 -----------------------------------------------------------------------------------

ECHO6_LEN = 40 + 8      # IPv6 + ICMPv6 headers


def test_a_dual_stack_containers_ipv6_pings_are_reported_like_ipv4_ones(testbed_factory):
    """IPv4 pings, then IPv6 pings from one dual-stack container: every one is reported each
    way, in order, with its length, the first of each family too.  The testbed is new, so
    those first packets wait for ARP and for neighbour discovery, in the container and on the
    uplink.  CPUs are kept busy, as in the service's ARP test: on an idle CPU this kernel
    drops softirq samples (README Limits), which is not what this test is about."""
    tb = testbed_factory(containers_n=1, ipv6=True)
    c = tb.containers[0]
    n = N
    run = mace("--netns", c.ns, "-f", "jsonl", *RING)
    run.ready()
    with busy_cpus(seconds=30):
        t0 = time.time()
        for family, peer in (("-4", tb.peer_ip), ("-6", tb.peer_ip6)):
            r = tb.run(c.ns, ["ping", family, "-n", "-q", "-c", str(n), "-i", "0.1", peer], timeout=30)
            assert r.returncode == 0 and f" {n} received" in r.stdout, r.stdout + r.stderr
        window = (t0, time.time())
        time.sleep(SETTLE)
        assert run.stop() == 0, run.text()
    reports = parse("jsonl", run.out, [c.ns])
    for d in ("egress", "ingress"):
        rs = [r for r in reports if r["dir"] == d]
        assert [(r["seq"], r["len"]) for r in rs] == \
            [(k, ECHO_LEN + 56) for k in range(1, n + 1)] + \
            [(k, ECHO6_LEN + 56) for k in range(n + 1, 2 * n + 1)], (d, [(r["seq"], r["len"]) for r in rs], run.text())
        assert all(r["latency"] > 0 and window[0] <= r["ts"] <= window[1] for r in rs), rs
    check_summary(run.err, [(c.ns, 2 * n, 2 * n)])

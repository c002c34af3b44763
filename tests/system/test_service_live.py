"""`mace serve` and `mace on|off|status|read` end to end: the service as a subprocess in a
testbed's host namespace, unprivileged clients in its containers, real pings, and what
comes back over the socket (and what the service holds open) checked exactly."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time

import pytest
from helpers import WAIT, Lines, busy_cpus, finish, inode_of, one_line_error, wait_for
from helpers import ping as _ping
from helpers import pings as _pings
from pyroute2 import netns

# a client inside a container: uid 0 (the test tree is root's), but no capability at all
NOPRIV = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs", "--"]
SETTLE = 0.4            # reports go through a 2 ms reorder window and a 200 ms poll
REPORT_KEYS = {"ts", "netns", "target", "container", "segment", "dir", "seq", "latency_ns", "len", "cpu"}
ECHO_LEN = 20 + 8 + 56  # IPv4 + ICMP headers + ping's default payload
MACE_LINE = re.compile(r"^\[(\d+)\.(\d{6})\] \((\d+)\) (egress|ingress): (\d+)$")
PERF = "anon_inode:[perf_event]"

# A raw protocol client, run inside a container without privileges.  argv: socket path,
# then a JSON spec {"sessions": [...], "workers": N}.  Each session is one connection:
#   send      text sent (latin-1, so any byte), `times` times, then `then`
#   mode      "reply" (default): read lines until `stop` ("end": an end line, "one": one
#             line, "eof": the service closes);  "close": connect and close at once;
#             "stuck": read the first line, then nothing until the file `until` exists;
#             "stream": read until EOF, sending one byte (which ends a follow) once the
#             file `until` exists or `poke_after` seconds have passed
#   half      shut the socket down for writing after sending
#   emit      print each line as it comes (with the time) as well
# and it prints one JSON object per session: its lines, how the connection ended
# ("eof", "reset", "end", "one", "timeout", ...) and any error while sending.
CLIENT = r'''
import json, os, socket, sys, threading, time
from concurrent.futures import ThreadPoolExecutor

path, spec = sys.argv[1], json.loads(sys.argv[2])
lock = threading.Lock()


def emit(obj):
    with lock:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


def session(i, case):
    res = {"i": i, "tag": case.get("tag"), "lines": [], "closed": None, "send_error": None}
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect(path)
    except OSError as e:
        res["closed"] = "connect: " + type(e).__name__
        return res
    try:
        mode = case.get("mode", "reply")
        if mode == "close":
            res["closed"] = "by us"
            return res
        data = (case.get("send", "") * case.get("times", 1) + case.get("then", "")).encode("latin-1")
        try:
            s.sendall(data)
            if case.get("half"):
                s.shutdown(socket.SHUT_WR)
        except OSError as e:
            res["send_error"] = type(e).__name__
        until = case.get("until")
        poke_at = time.monotonic() + case["poke_after"] if "poke_after" in case else None
        deadline = time.monotonic() + case.get("timeout", 20)
        stop = case.get("stop", "eof")
        poked = False
        buf = b""
        s.settimeout(0.05)
        while True:
            if mode == "stuck" and res["lines"]:
                while not os.path.exists(until) and time.monotonic() < deadline:
                    time.sleep(0.02)
                res["closed"] = "by us"
                return res
            if mode == "stream" and not poked and (
                    (until and os.path.exists(until)) or (poke_at and time.monotonic() >= poke_at)):
                s.sendall(b"x")
                poked = True
            if time.monotonic() > deadline:
                res["closed"] = "timeout"
                return res
            try:
                chunk = s.recv(1 << 16 if mode != "stuck" else 1)
            except socket.timeout:
                continue
            except ConnectionResetError:
                res["closed"] = "reset"
                return res
            if not chunk:
                res["closed"] = "eof"
                return res
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                text = line.decode("utf-8", "replace")
                res["lines"].append(text)
                if case.get("emit"):
                    emit({"i": i, "t": time.time(), "line": text})
                if mode == "reply" and stop == "one":
                    res["closed"] = "one"
                    return res
                if mode == "reply" and stop == "end" and text.startswith('{"v":') \
                        and json.loads(text).get("end"):
                    res["closed"] = "end"
                    return res
    finally:
        s.close()


def run(i, case):
    try:
        res = session(i, case)
    except Exception as e:
        res = {"i": i, "tag": case.get("tag"), "lines": [], "closed": "error: " + repr(e)}
    emit({"done": True, **res})


sessions = spec["sessions"]
with ThreadPoolExecutor(max_workers=spec.get("workers", 1)) as pool:
    for i, case in enumerate(sessions):
        pool.submit(run, i, case)
'''


# -- the service ------------------------------------------------------------------------------

class Service:
    """`mace serve` in the testbed's host namespace, its stderr read as it comes."""

    def __init__(self, tb, sock: str, *extra):
        self.tb, self.sock = tb, sock
        self.state_dir = state_dir_of(sock)
        self.argv = serve_argv(sock, *extra)
        self.proc = tb.popen(tb.host_ns, self.argv, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.pid = self.proc.pid        # nsenter execs: the service itself
        self.pump = Lines(self.proc.stderr)
        self.log = self.pump.lines

    def text(self) -> str:
        return self.pump.text()

    def wait_log(self, pattern: str, timeout: float = WAIT) -> str:
        pat = re.compile(pattern)
        line = self.pump.wait(lambda log: next((x for x in log if pat.search(x)), None), timeout,
                              self.proc)
        if line is not None:
            return line
        if self.proc.poll() is not None and not self.pump.open:
            pytest.fail(f"the service exited {self.proc.returncode} before logging "
                        f"{pattern!r}:\n" + self.text())
        pytest.fail(f"the service did not log {pattern!r} in {timeout} s:\n" + self.text())

    def ready(self) -> Service:
        deadline = time.monotonic() + WAIT
        while not os.path.exists(self.sock):
            assert self.proc.poll() is None, f"the service exited {self.proc.returncode}:\n{self.text()}"
            assert time.monotonic() < deadline, f"no socket after {WAIT} s:\n{self.text()}"
            time.sleep(0.02)
        # the signal handlers are in place once it says so
        self.wait_log(r"^mace: serving on " + re.escape(self.sock) + r" \(protocol 1, ")
        assert stat.S_ISSOCK(os.lstat(self.sock).st_mode)
        return self

    def stop(self, sig=signal.SIGTERM, timeout: float = WAIT) -> int:
        self.proc.send_signal(sig)
        rc = finish(self.proc, timeout,
                    lambda: f"the service did not stop within {timeout} s of signal {sig}:\n" + self.text())
        self.pump.join(5)
        return rc

    def fds(self) -> list[str]:
        out = []
        d = f"/proc/{self.pid}/fd"
        for name in os.listdir(d):
            try:
                out.append(os.readlink(f"{d}/{name}"))
            except FileNotFoundError:
                pass
        return out

    def perf_fds(self) -> int:
        return sum(1 for target in self.fds() if target == PERF)

    def connections(self) -> int:
        """Connections open now: each holds a pidfd of its peer."""
        return sum(1 for target in self.fds() if target == "anon_inode:[pidfd]")

    def settled_fds(self, samples: int = 5) -> int:
        """The fewest fds over a few samples: netlink sockets come and go every second."""
        counts = []
        for _ in range(samples):
            counts.append(len(self.fds()))
            time.sleep(0.1)
        return min(counts)


def run_dir(tmp_path, name: str = "run") -> str:
    d = tmp_path / name
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    return str(d / "mace.sock")


def state_dir_of(sock: str) -> str:
    """The test's own state directory (the service makes it), beside the socket's."""
    return os.path.join(os.path.dirname(os.path.dirname(sock)), "state")


def serve_argv(sock: str, *extra) -> list[str]:
    return [sys.executable, "-m", "mace", "serve", "--socket", sock,
            "--state-dir", state_dir_of(sock), *map(str, extra)]


def saved_state(sock: str) -> dict:
    """The one state file in the state directory, checked to be root's only."""
    d = state_dir_of(sock)
    st = os.lstat(d)
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and not st.st_mode & 0o077, oct(st.st_mode)
    files = os.listdir(d)
    assert len(files) == 1, files           # no temporary file left behind
    path = os.path.join(d, files[0])
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
    with open(path) as f:
        return json.load(f)


def warm(tb) -> None:
    """One ping from each container in turn, before anything is measured: every ARP entry
    on the way is then resolved.  (Two containers' first packets waiting together for the
    host's ARP lose an egress report: see the last test.)"""
    for c in tb.containers:
        r = tb.run(c.ns, ["ping", "-n", "-q", "-c", "1", "-W", "5", tb.peer_ip], timeout=30)
        assert r.returncode == 0, r.stdout + r.stderr


def make_bed(testbed_factory, tmp_path, n=2):
    tb = testbed_factory(containers_n=n)
    warm(tb)
    sock = run_dir(tmp_path)
    (tmp_path / "client.py").write_text(CLIENT)
    return tb, sock


@pytest.fixture
def bed(testbed_factory, tmp_path):
    """A testbed with two containers and a socket path of this test's own."""
    return make_bed(testbed_factory, tmp_path)


# -- clients ----------------------------------------------------------------------------------

def mace_client(tb, c, sock, *args, timeout=30) -> subprocess.CompletedProcess:
    """`mace <args>` inside container c, without privileges."""
    return tb.run(c.ns, [*NOPRIV, sys.executable, "-m", "mace", *args, "--socket", sock],
                  timeout=timeout)


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    return r


def raw_argv(tmp_path, sock, sessions, workers=1) -> list[str]:
    spec = json.dumps({"sessions": sessions, "workers": workers})
    return [*NOPRIV, sys.executable, str(tmp_path / "client.py"), sock, spec]


def raw(tb, c, tmp_path, sock, sessions, workers=1, timeout=60) -> list[dict]:
    """Run raw protocol sessions from container c; their results, in the order given."""
    r = tb.run(c.ns, raw_argv(tmp_path, sock, sessions, workers), timeout=timeout)
    assert r.returncode == 0 and not r.stderr, (r.returncode, r.stderr)
    return collect(r.stdout, len(sessions))


def collect(stdout: str, n: int) -> list[dict]:
    done = sorted((m for m in map(json.loads, stdout.splitlines()) if m.get("done")),
                  key=lambda m: m["i"])
    assert [m["i"] for m in done] == list(range(n)), stdout[-2000:]
    return done


def req(**fields) -> str:
    return json.dumps({"v": 1, **fields}) + "\n"


def control(line: str) -> dict | None:
    """A control message (it carries "v"), or None for a report line."""
    if line.startswith('{"v":'):
        return json.loads(line)
    obj = json.loads(line)
    assert "v" not in obj, line
    return None


def reports_of(lines) -> list[dict]:
    return [json.loads(line) for line in lines if not line.startswith('{"v":')]


def check_reports(reports, inode, n, *, first=1, window=None, context=None, segment="device"):
    """Exactly n reports each way, all of namespace `inode`, seq first..first+n-1."""
    for r in reports:
        assert set(r) == REPORT_KEYS and r["segment"] == segment, r
        assert r["netns"] == inode and r["target"] == f"netns:{inode}", (inode, r)
        assert r["latency_ns"] > 0 and r["len"] == ECHO_LEN, r
        assert 0 <= r["cpu"] < os.cpu_count(), r
        if window is not None:
            assert window[0] - 0.01 <= r["ts"] <= window[1] + 0.01, (r, window)
    seqs = {d: [r["seq"] for r in reports if r["dir"] == d] for d in ("egress", "ingress")}
    want = list(range(first, first + n))
    for d in seqs:
        assert seqs[d] == want, (inode, d, {k: ("missing", sorted(set(want) - set(v)),
                                               "extra", [s for s in v if s not in want])
                                            for k, v in seqs.items()}, context and context())
    assert len(reports) == 2 * n


def ping(tb, c, n, interval="0.02") -> tuple[float, float]:
    return _ping(tb, c, n, interval=interval)


def pings(tb, plan) -> tuple[float, float]:
    """Concurrent pings every 0.02 s, plan [(container, count)]: all answered."""
    return _pings(tb, plan, interval="0.02")


def enable(tb, c, sock) -> str:
    r = ok(mace_client(tb, c, sock, "on"))
    inode = inode_of(tb, c)
    assert r.stdout.splitlines()[0] == (f"mace: enabled for netns {inode}: "
                                        f"{c.inner} ⇄ {c.veth} → {tb.bridge} → {tb.uplink}"), r.stdout
    return r.stdout


def status_json(tb, c, sock) -> dict:
    return json.loads(ok(mace_client(tb, c, sock, "status", "--json")).stdout)


class Background:
    """A command in a container whose stdout lines are read as they come."""

    def __init__(self, tb, c, argv):
        self.proc = tb.popen(c.ns, argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        self.pump = Lines(self.proc.stdout)
        self.out = self.pump.lines
        self.err = ""

    def wait_lines(self, pred, timeout=WAIT, what="lines"):
        with self.pump.cond:
            if self.pump.wait(lambda out: pred(out) or None, timeout, self.proc):
                return list(self.out)
        err = self.proc.stderr.read() if self.proc.poll() is not None else ""
        pytest.fail(f"no {what} within {timeout} s: rc {self.proc.poll()}, out {self.out[-5:]}, err {err}")

    def finish(self, timeout=WAIT) -> int:
        rc = finish(self.proc, timeout, lambda: f"{self.proc.args} did not end within {timeout} s")
        self.pump.join(5)
        self.err = self.proc.stderr.read()
        return rc


# -- the tests --------------------------------------------------------------------------------

def test_each_container_reads_exactly_its_own_reports(bed, tmp_path):
    tb, sock = bed
    a, b = tb.containers
    ia, ib = inode_of(tb, a), inode_of(tb, b)
    svc = Service(tb, sock).ready()
    assert stat.S_IMODE(os.lstat(sock).st_mode) == 0o666

    # the client really has no privilege
    caps = tb.run(a.ns, [*NOPRIV, "grep", "^CapEff:", "/proc/self/status"]).stdout
    assert caps.split() == ["CapEff:", "0000000000000000"], caps

    enable(tb, a, sock)
    enable(tb, b, sock)
    again = ok(mace_client(tb, a, sock, "on")).stdout
    assert again.startswith(f"mace: already enabled for netns {ia}: "), again

    window = pings(tb, [(a, 20), (b, 7)])
    time.sleep(SETTLE)

    # A, over the raw protocol: header, its 40 reports, the end line
    (s,) = raw(tb, a, tmp_path, sock, [{"send": req(op="read"), "stop": "end"}])
    assert s["closed"] == "end", s
    assert json.loads(s["lines"][0]) == {"v": 1, "ok": True, "op": "read", "netns": ia, "follow": False}
    assert all(control(line) is None for line in s["lines"][1:-1])
    check_reports(reports_of(s["lines"][1:-1]), ia, 20, window=window)
    assert json.loads(s["lines"][-1]) == {"v": 1, "end": True, "reason": "read", "reports": 40, "dropped": 0}

    # B, with the command: its own 7 each way, nothing of A's
    rb = ok(mace_client(tb, b, sock, "read", "-f", "jsonl"))
    assert rb.stderr == ""
    check_reports([json.loads(line) for line in rb.stdout.splitlines()], ib, 7, window=window)

    # read again without traffic: nothing
    (s,) = raw(tb, a, tmp_path, sock, [{"send": req(op="read"), "stop": "end"}])
    assert [json.loads(line) for line in s["lines"]] == [
        {"v": 1, "ok": True, "op": "read", "netns": ia, "follow": False},
        {"v": 1, "end": True, "reason": "read", "reports": 0, "dropped": 0}]
    r = ok(mace_client(tb, b, sock, "read"))
    assert (r.stdout, r.stderr) == ("", "")

    # /dev/mace's own format; numbering goes on from the first read
    t0 = time.time()
    ping(tb, a, 3)
    time.sleep(SETTLE)
    r = ok(mace_client(tb, a, sock, "read", "-f", "mace"))
    lines = r.stdout.splitlines()
    assert len(lines) == 6, r.stdout
    got = []
    for line in lines:
        m = MACE_LINE.match(line)
        assert m, line
        assert t0 - 0.01 <= int(m[1]) + int(m[2]) / 1e6 <= time.time(), line
        assert int(m[5]) > 0, line
        got.append((m[4], int(m[3])))
    for d in ("egress", "ingress"):
        assert [seq for dd, seq in got if dd == d] == [21, 22, 23], got

    st = status_json(tb, a, sock)
    assert st["state"] == "enabled" and st["netns"] == ia
    assert st["queue"] == {"unread": 0, "size": 65536, "dropped": 0}
    assert st["egress"]["reports"] == st["ingress"]["reports"] == 23, st
    assert st["egress"]["coverage"] == st["ingress"]["coverage"] == 1.0, st

    assert svc.stop() == 0, svc.text()
    assert not os.path.lexists(sock)


def test_crafted_requests_are_refused_and_change_nothing(bed, tmp_path):
    tb, sock = bed
    a, b = tb.containers
    ia, ib = inode_of(tb, a), inode_of(tb, b)
    svc = Service(tb, sock).ready()
    enable(tb, a, sock)
    enable(tb, b, sock)
    window = pings(tb, [(a, 5), (b, 3)])
    time.sleep(SETTLE)
    in_b = tb.popen(b.ns, ["sleep", "60"])
    try:
        wait_for(lambda: os.stat(f"/proc/{in_b.pid}/ns/net").st_ino == ib, what="sleep in B")
        cases = [
            (req(op="read", netns=ib), "bad-request", "unknown field 'netns'"),
            (req(op="read", pid=in_b.pid), "bad-request", "unknown field 'pid'"),
            (req(op="on", netns=ib), "bad-request", "unknown field 'netns'"),
            (req(op="read", follow=True, target=f"netns:{ib}"), "bad-request", "unknown field 'target'"),
            ('{"v":2,"op":"read"}\n', "bad-request", "protocol version 2 is not supported"),
            ('{"op":"on"}\n', "bad-request", "protocol version None is not supported"),
            (req(op="nsenter"), "bad-request", "unknown op 'nsenter'"),
            (req(op="status", follow=True), "bad-request", "follow is a boolean of read requests"),
            (req(op="read", follow="yes"), "bad-request", "follow is a boolean of read requests"),
            ("\x00\xff\xfe garbage \x80\x81\n", "bad-request", "request is not JSON"),
            ("not json at all\n", "bad-request", "request is not JSON"),
            ("[1, 2, 3]\n", "bad-request", "request is not a JSON object"),
            ("null\n", "bad-request", "request is not a JSON object"),
            ('"read"\n', "bad-request", "request is not a JSON object"),
            ("x" * 5000 + "\n", "too-long", "request of more than 4096 bytes"),
        ]
        sessions = [{"send": data} for data, _, _ in cases]
        # a 1 MiB line, and one that never ends
        sessions.append({"send": "{" + " " * 1023, "times": 1024, "then": "}\n"})
        sessions.append({"send": "x", "times": 1 << 20})
        cases += [(None, "too-long", "request of more than 4096 bytes")] * 2
        results = raw(tb, a, tmp_path, sock, sessions)
    finally:
        in_b.kill()
        in_b.wait()
    for (data, code, message), s in zip(cases, results, strict=True):
        assert s["closed"] in ("eof", "reset"), (data and data[:80], s)
        assert len(s["lines"]) == 1, (data and data[:80], s)
        reply = json.loads(s["lines"][0])
        assert set(reply) == {"v", "ok", "code", "error", "hint"}, reply
        assert (reply["v"], reply["ok"], reply["code"]) == (1, False, code), (data and data[:80], reply)
        assert reply["error"] == message, reply
        assert reply["hint"], reply

    # padding is not a crime: a valid request under the limit is answered
    (s,) = raw(tb, a, tmp_path, sock, [{"send": req(op="status")[:-1] + " " * 3000 + "\n",
                                        "stop": "one"}])
    assert json.loads(s["lines"][0])["netns"] == ia, s

    # the service still serves, A reads only its own, B's queue was not touched
    (s,) = raw(tb, a, tmp_path, sock, [{"send": req(op="read"), "stop": "end"}])
    assert json.loads(s["lines"][-1]) == {"v": 1, "end": True, "reason": "read", "reports": 10, "dropped": 0}
    check_reports(reports_of(s["lines"][1:-1]), ia, 5, window=window)
    rb = ok(mace_client(tb, b, sock, "read", "-f", "jsonl"))
    check_reports([json.loads(line) for line in rb.stdout.splitlines()], ib, 3, window=window)
    assert svc.proc.poll() is None
    assert "Traceback" not in svc.text(), svc.text()
    assert svc.stop() == 0, svc.text()


def test_never_enabled_namespace(bed, tmp_path):
    tb, sock = bed
    a, b = tb.containers
    ib = inode_of(tb, b)
    svc = Service(tb, sock).ready()
    enable(tb, a, sock)         # another namespace's being enabled changes nothing for B
    ping(tb, a, 3)
    ping(tb, b, 3)
    time.sleep(SETTLE)

    one_line_error(mace_client(tb, b, sock, "read"), 6,
                   r"^mace: error: measurement is not enabled for this network namespace "
                   r"\(run `mace on` in it first\)$")
    one_line_error(mace_client(tb, b, sock, "read", "--follow"), 6, "is not enabled")
    r = ok(mace_client(tb, b, sock, "status"))
    assert r.stdout == f"mace: not enabled for netns {ib} (`mace on` enables it)\n", r.stdout
    st = status_json(tb, b, sock)
    assert (st["state"], st["netns"]) == ("disabled", ib) and "queue" not in st, st
    r = ok(mace_client(tb, b, sock, "off"))
    assert r.stdout == f"mace: netns {ib} was not enabled\n", r.stdout
    (s,) = raw(tb, b, tmp_path, sock, [{"send": req(op="read")}])
    assert s["closed"] in ("eof", "reset") and len(s["lines"]) == 1, s
    reply = json.loads(s["lines"][0])
    assert (reply["ok"], reply["code"]) == (False, "not-enabled"), reply
    # B's traffic went nowhere: A has exactly its own 3
    ia = inode_of(tb, a)
    ra = ok(mace_client(tb, a, sock, "read", "-f", "jsonl"))
    check_reports([json.loads(line) for line in ra.stdout.splitlines()], ia, 3)

    # A turned off with reports unread: they are discarded, and A is as B now
    ping(tb, a, 2)
    time.sleep(SETTLE)
    r = ok(mace_client(tb, a, sock, "off"))
    assert r.stdout == f"mace: disabled for netns {ia}; 4 unread reports discarded\n", r.stdout
    svc.wait_log(rf"^mace: netns {ia} disabled: mace off; 4 unread reports discarded$", timeout=3)
    assert svc.perf_fds() == 0          # it was the only one enabled
    one_line_error(mace_client(tb, a, sock, "read"), 6, "is not enabled")
    # on again: a fresh start, numbered from 1
    enable(tb, a, sock)
    assert ok(mace_client(tb, a, sock, "read")).stdout == ""
    ping(tb, a, 2)
    time.sleep(SETTLE)
    ra = ok(mace_client(tb, a, sock, "read", "-f", "jsonl"))
    check_reports([json.loads(line) for line in ra.stdout.splitlines()], ia, 2)
    assert svc.stop() == 0, svc.text()


def test_many_clients_lose_nothing_and_leak_nothing(bed, tmp_path):
    tb, sock = bed
    a, b = tb.containers
    ia, ib = inode_of(tb, a), inode_of(tb, b)
    svc = Service(tb, sock).ready()
    enable(tb, a, sock)
    enable(tb, b, sock)
    time.sleep(1.2)                 # a presence check has run: its netlink socket is gone
    baseline = svc.settled_fds()
    perf = svc.perf_fds()
    assert perf > 0

    kinds = [
        {"tag": "status", "send": req(op="status"), "stop": "one"},
        {"tag": "read", "send": req(op="read"), "stop": "end"},
        {"tag": "close", "mode": "close"},
        {"tag": "status+read", "send": req(op="status") + req(op="read"), "stop": "end"},
        {"tag": "partial", "send": '{"v":1,', "half": True},
        {"tag": "follow", "send": req(op="read", follow=True), "mode": "stream", "poke_after": 0.3},
        {"tag": "read", "send": req(op="read"), "stop": "end"},
    ]
    na, nb = 300, 50
    ping_a = tb.popen(a.ns, ["ping", "-n", "-q", "-c", str(na), "-i", "0.01", tb.peer_ip],
                      stdout=subprocess.PIPE, text=True)
    ping_b = tb.popen(b.ns, ["ping", "-n", "-q", "-c", str(nb), "-i", "0.05", tb.peer_ip],
                      stdout=subprocess.PIPE, text=True)
    plan = [(a, 35), (a, 35), (b, 30)]
    storms = []
    for c, n in plan:
        sessions = [dict(kinds[(i + len(storms)) % len(kinds)]) for i in range(n)]
        p = tb.popen(c.ns, raw_argv(tmp_path, sock, sessions, workers=6),
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        storms.append((c, sessions, p))
    results = {a.ns: [], b.ns: []}
    for c, sessions, p in storms:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0 and not err, err
        results[c.ns] += collect(out, len(sessions))
    for p, n in ((ping_a, na), (ping_b, nb)):
        out, _ = p.communicate(timeout=30)
        assert p.returncode == 0 and f" {n} received" in out, out
    assert sum(len(s) for _, s, _ in storms) == 100
    time.sleep(SETTLE)
    final = raw(tb, a, tmp_path, sock, [{"send": req(op="read"), "stop": "end"}]) + \
        raw(tb, b, tmp_path, sock, [{"send": req(op="read"), "stop": "end"}])
    results[a.ns].append(final[0])
    results[b.ns].append(final[1])

    for c, inode, n in ((a, ia, na), (b, ib, nb)):
        reads, everything = [], []
        for s in results[c.ns]:
            tag = s["tag"]
            ctl = [control(line) for line in s["lines"]]
            ctl = [m for m in ctl if m is not None]
            got = reports_of(s["lines"])
            if tag == "close":
                assert s["lines"] == [], s
            elif tag == "partial":
                assert s["closed"] == "eof" and [m["code"] for m in ctl] == ["bad-request"], s
            elif tag == "status":
                assert s["closed"] == "one" and ctl[0]["state"] == "enabled" and ctl[0]["netns"] == inode, s
            elif tag == "follow":
                # ended by our byte: no end line, the connection closed after what was sent;
                # a follower sees every report from where it started, none twice
                assert s["closed"] == "eof", s
                assert ctl == [{"v": 1, "ok": True, "op": "read", "netns": inode, "follow": True}], s
                for d in ("egress", "ingress"):
                    seqs = [r["seq"] for r in got if r["dir"] == d]
                    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))) if seqs else True, seqs
            else:       # read, status+read, the final read
                assert s["closed"] == "end", s
                assert ctl[-1]["end"] and ctl[-1]["reason"] == "read" and ctl[-1]["dropped"] == 0, s
                assert ctl[-1]["reports"] == len(got), s
                reads += got
            assert not any(m.get("dropped") and not m.get("end") for m in ctl), s
            everything += got
        # reads never hand out a report twice (followers each see the stream from where
        # they start, so what they got may also be in a read that ran meanwhile) ...
        keys = [(r["dir"], r["seq"]) for r in reads]
        assert len(keys) == len(set(keys)), sorted(k for k in keys if keys.count(k) > 1)
        # ... and between them every ping is there, of this namespace only
        unique = {}
        for r in everything:
            assert unique.setdefault((r["dir"], r["seq"]), r) == r, r
        check_reports(sorted(unique.values(), key=lambda r: (r["dir"], r["seq"])), inode, n)

    # every connection is closed again: the fds are back to the baseline
    wait_for(lambda: svc.settled_fds(3) <= baseline, timeout=5,
             what=lambda: f"fd count back to {baseline} (now {len(svc.fds())}: {sorted(svc.fds())})")
    assert svc.perf_fds() == perf
    assert svc.stop() == 0, svc.text()


def test_stuck_reader_stalls_nobody_and_drops_are_told(bed, tmp_path):
    tb, sock = bed
    a, b = tb.containers
    ia, ib = inode_of(tb, a), inode_of(tb, b)
    queue = 1024
    svc = Service(tb, sock, "--queue", queue).ready()
    enable(tb, a, sock)
    enable(tb, b, sock)
    release = str(tmp_path / "release")
    stop_good = str(tmp_path / "stop-good")

    stuck = Background(tb, a, raw_argv(tmp_path, sock, [
        {"send": req(op="read", follow=True), "mode": "stuck", "until": release, "emit": True,
         "timeout": 60}]))
    header = stuck.wait_lines(lambda out: out, what="header of the stuck follower")
    assert json.loads(json.loads(header[0])["line"]) == {"v": 1, "ok": True, "op": "read",
                                                         "netns": ia, "follow": True}
    good = Background(tb, a, raw_argv(tmp_path, sock, [
        {"send": req(op="read", follow=True), "mode": "stream", "until": stop_good, "emit": True,
         "timeout": 60}]))
    good.wait_lines(lambda out: out, what="header of the second follower")

    # A pings fast, then floods (root in the container for both) while B pings a little.
    # Fast pings come in small batches that the stuck follower is handed in full until its
    # socket is full (some 300 KB); a flood comes all at once and overflows the queue.
    ping_b = tb.popen(b.ns, ["ping", "-n", "-q", "-c", "7", "-i", "0.2", tb.peer_ip],
                      stdout=subprocess.PIPE, text=True)
    r = tb.run(a.ns, ["ping", "-n", "-q", "-c", "3000", "-i", "0.0005", tb.peer_ip], timeout=60)
    assert r.returncode == 0 and " 3000 received" in r.stdout, r.stdout + r.stderr
    r = tb.run(a.ns, ["ping", "-n", "-q", "-f", "-c", "2000", tb.peer_ip], timeout=60)
    flood_end = time.time()
    assert r.returncode == 0 and " 2000 received" in r.stdout, r.stdout + r.stderr
    out, _ = ping_b.communicate(timeout=30)
    assert ping_b.returncode == 0 and " 7 received" in out, out

    # B's reads are unaffected
    rb = ok(mace_client(tb, b, sock, "read", "-f", "jsonl"))
    check_reports([json.loads(line) for line in rb.stdout.splitlines()], ib, 7,
                  context=lambda: status_json(tb, b, sock))

    # the second follower has the flood's last reports, promptly
    st1 = status_json(tb, a, sock)
    last_seq = {d: st1[d]["reports"] for d in ("egress", "ingress")}
    made1 = sum(last_seq.values())
    assert min(last_seq.values()) >= 4950, st1     # the pings' reports, nearly all

    def has_last(out):
        last = {}
        for m in map(json.loads, out):
            if "line" in m and not m["line"].startswith('{"v":'):
                r = json.loads(m["line"])
                if r["seq"] == last_seq[r["dir"]]:
                    last[r["dir"]] = m["t"]
        return len(last) == 2 and last
    last = good.wait_lines(has_last, timeout=10, what=f"the flood's last reports {last_seq}")
    when = max(has_last(last).values())
    assert when - flood_end < 3, when - flood_end

    # the second follower: every report either received or counted as dropped
    open(stop_good, "w").close()
    assert good.finish() == 0, good.err
    assert not good.err
    session = json.loads(good.out[-1])
    assert session["done"] and session["closed"] == "eof", session
    msgs = [json.loads(m)["line"] for m in good.out[:-1]]
    ctl = [control(line) for line in msgs]
    ctl = [m for m in ctl if m is not None]
    got = reports_of(msgs)
    dropped = sum(m["dropped"] for m in ctl if "dropped" in m)
    assert ctl[0] == {"v": 1, "ok": True, "op": "read", "netns": ia, "follow": True}
    assert all(set(m) == {"v", "dropped"} and m["dropped"] > 0 for m in ctl[1:]), ctl
    assert len(got) + dropped == made1, (len(got), dropped, made1)
    for d in ("egress", "ingress"):
        seqs = [r["seq"] for r in got if r["dir"] == d]
        assert seqs == sorted(set(seqs)) and seqs[-1] == last_seq[d], seqs[-10:]
    assert all(r["netns"] == ia for r in got)

    # a reader that falls behind: `mace read` says how many it lost
    r = tb.run(a.ns, ["ping", "-n", "-q", "-f", "-c", "1500", tb.peer_ip], timeout=60)
    assert r.returncode == 0 and " 1500 received" in r.stdout, r.stdout
    time.sleep(SETTLE)
    st2 = status_json(tb, a, sock)
    made2 = st2["egress"]["reports"] + st2["ingress"]["reports"] - made1
    assert st2["queue"] == {"unread": queue, "size": queue, "dropped": st2["queue"]["dropped"]}, st2
    r = ok(mace_client(tb, a, sock, "read", "-f", "jsonl"))
    got = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(got) == queue, r.stdout
    assert r.stderr == (f"mace: {made2 - queue} reports dropped: the service's queue for this "
                        "namespace was full (read more often, or ask for a larger --queue)\n"), r.stderr
    assert all(r["netns"] == ia for r in got)
    for d in ("egress", "ingress"):         # the newest are kept
        assert max(r["seq"] for r in got if r["dir"] == d) == st2[d]["reports"], (d, st2)

    # the stuck one was never served, nor did it hold anyone up; now it lets go
    assert stuck.proc.poll() is None and len(stuck.out) == 1
    open(release, "w").close()
    assert stuck.finish() == 0, stuck.err
    assert svc.stop() == 0, svc.text()


def test_namespace_gone_is_disabled_and_perf_closed(testbed_factory, tmp_path):
    tb, sock = make_bed(testbed_factory, tmp_path, 3)
    a, b, c = tb.containers
    ia, ib, ic = (inode_of(tb, x) for x in tb.containers)
    svc = Service(tb, sock).ready()
    for x in tb.containers:
        enable(tb, x, sock)
    assert svc.perf_fds() > 0

    # two followers in A, both there before any report (each starts where reads are)
    follow_cli = Background(tb, a, [*NOPRIV, sys.executable, "-m", "mace", "read", "--follow",
                                    "-f", "jsonl", "--socket", sock])
    wait_for(lambda: svc.connections() == 1, what="mace read --follow connected")
    follow_raw = Background(tb, a, raw_argv(tmp_path, sock, [
        {"send": req(op="read", follow=True), "mode": "stream", "emit": True, "timeout": 30}]))
    follow_raw.wait_lines(lambda out: out, what="follower's header")
    pings(tb, [(a, 5), (b, 4)])
    follow_raw.wait_lines(lambda out: len(out) == 11, what="A's 10 reports")
    follow_cli.wait_lines(lambda out: len(out) == 10, what="A's 10 reports (mace read --follow)")

    # A's veth goes: A is disabled within a few seconds, its followers are told why
    t0 = time.monotonic()
    ok(tb.run(tb.host_ns, ["ip", "link", "del", a.veth]))
    svc.wait_log(rf"^mace: netns {ia} disabled: namespace gone$", timeout=3)
    assert time.monotonic() - t0 < 3
    assert follow_raw.finish() == 0
    msgs = [json.loads(m) for m in follow_raw.out]
    assert msgs[-1]["done"] and msgs[-1]["closed"] == "eof", msgs[-1]
    assert json.loads(msgs[-2]["line"]) == {"v": 1, "end": True, "reason": "namespace gone",
                                            "reports": 10, "dropped": 0}
    check_reports(reports_of(m["line"] for m in msgs[1:-2]), ia, 5)
    assert follow_cli.finish() == 0, follow_cli.err
    assert follow_cli.err == "mace: measurement ended: namespace gone\n", follow_cli.err
    check_reports([json.loads(line) for line in follow_cli.out], ia, 5)
    r = ok(mace_client(tb, a, sock, "status"))
    assert r.stdout == f"mace: not enabled for netns {ia} (`mace on` enables it)\n", r.stdout
    one_line_error(mace_client(tb, a, sock, "read"), 6, "is not enabled")
    one_line_error(mace_client(tb, a, sock, "on"), 7,
                   rf"^mace: error: netns:{ia} has no veth to another namespace")

    # B did not notice
    assert svc.perf_fds() > 0
    window = pings(tb, [(b, 3)])
    time.sleep(SETTLE)
    rb = ok(mace_client(tb, b, sock, "read", "-f", "jsonl"))
    got = [json.loads(line) for line in rb.stdout.splitlines()]
    check_reports(got[:8], ib, 4)
    check_reports(got[8:], ib, 3, first=5, window=window)
    follow_b = Background(tb, b, raw_argv(tmp_path, sock, [
        {"send": req(op="read", follow=True), "mode": "stream", "emit": True, "timeout": 30}]))
    follow_b.wait_lines(lambda out: out, what="B follower's header")
    ping(tb, b, 2)
    follow_b.wait_lines(lambda out: len(out) == 5, what="B's 4 reports")
    r = ok(mace_client(tb, b, sock, "off"))
    assert r.stdout == f"mace: disabled for netns {ib}\n", r.stdout
    svc.wait_log(rf"^mace: netns {ib} disabled: mace off$", timeout=3)
    assert follow_b.finish() == 0
    msgs = [json.loads(m) for m in follow_b.out]
    assert msgs[-1]["done"] and msgs[-1]["closed"] == "eof", msgs[-1]
    assert json.loads(msgs[-2]["line"]) == {"v": 1, "end": True, "reason": "mace off",
                                            "reports": 4, "dropped": 0}
    check_reports(reports_of(m["line"] for m in msgs[1:-2]), ib, 2, first=8)
    assert svc.perf_fds() > 0           # C is still enabled

    # C's whole namespace goes, with unread reports: the last one, so no perf event stays open
    ping(tb, c, 2)
    time.sleep(SETTLE)
    netns.remove(c.ns)
    tb._made.remove(c.ns)
    svc.wait_log(rf"^mace: netns {ic} disabled: namespace gone; 4 unread reports discarded$", timeout=5)
    wait_for(lambda: svc.perf_fds() == 0, timeout=3, what="perf fds closed")
    assert svc.proc.poll() is None
    assert svc.stop() == 0, svc.text()
    assert not os.path.lexists(sock)


def test_restart_keeps_enabled_namespaces_and_unread_reports(bed, tmp_path):
    tb, sock = bed
    a, b = tb.containers
    ia, ib = inode_of(tb, a), inode_of(tb, b)
    svc = Service(tb, sock).ready()
    enable(tb, a, sock)
    enable(tb, b, sock)
    since = status_json(tb, a, sock)["since"]
    window = pings(tb, [(a, 20), (b, 7)])
    time.sleep(SETTLE)
    assert svc.perf_fds() > 0

    assert svc.stop(signal.SIGTERM) == 0, svc.text()
    assert svc.log[-1] == "mace: stopping", svc.text()
    assert not os.path.lexists(sock)
    assert os.listdir(os.path.dirname(sock)) == []      # nothing left where containers look
    saved = saved_state(sock)
    assert sorted(n["inode"] for n in saved["namespaces"]) == sorted([ia, ib]), saved

    svc2 = Service(tb, sock).ready()
    svc2.wait_log(rf"^mace: netns {ia}: resumed \(eth0 ⇄ {a.veth} → {tb.bridge} → {tb.uplink}\), "
                  r"40 unread reports kept$", timeout=1)
    svc2.wait_log(rf"^mace: netns {ib}: resumed \(.*\), 14 unread reports kept$", timeout=1)
    assert svc2.perf_fds() > 0
    sa, sb = status_json(tb, a, sock), status_json(tb, b, sock)
    assert (sa["state"], sb["state"]) == ("enabled", "enabled")
    assert sa["since"] == since
    assert (sa["queue"]["unread"], sb["queue"]["unread"]) == (40, 14), (sa, sb)

    ra = ok(mace_client(tb, a, sock, "read", "-f", "jsonl"))
    check_reports([json.loads(line) for line in ra.stdout.splitlines()], ia, 20, window=window)
    rb = ok(mace_client(tb, b, sock, "read", "-f", "jsonl"))
    check_reports([json.loads(line) for line in rb.stdout.splitlines()], ib, 7, window=window)

    # still measured: new pings, numbered afresh by the new tracer
    window = pings(tb, [(a, 5), (b, 2)])
    time.sleep(SETTLE)
    ra = ok(mace_client(tb, a, sock, "read", "-f", "jsonl"))
    check_reports([json.loads(line) for line in ra.stdout.splitlines()], ia, 5, window=window)
    rb = ok(mace_client(tb, b, sock, "read", "-f", "jsonl"))
    check_reports([json.loads(line) for line in rb.stdout.splitlines()], ib, 2, window=window)

    # A's veth goes while no service runs: the next one does not resume A, does resume B
    ping(tb, a, 3)
    time.sleep(SETTLE)
    assert svc2.stop() == 0, svc2.text()
    ok(tb.run(tb.host_ns, ["ip", "link", "del", a.veth]))
    svc3 = Service(tb, sock).ready()
    svc3.wait_log(rf"^mace: netns {ia}: gone since the last run; 6 unread reports discarded$", timeout=1)
    svc3.wait_log(rf"^mace: netns {ib}: resumed \(.*\), 0 unread reports kept$", timeout=1)
    assert status_json(tb, a, sock)["state"] == "disabled"
    assert status_json(tb, b, sock)["state"] == "enabled"
    assert svc3.stop() == 0, svc3.text()

    # the state of a device-segment service names no cgroups: a socket-segment one starts
    # anyway, without B, and says why
    svc4 = Service(tb, sock, "--segment", "socket").ready()
    svc4.wait_log(rf"^mace: netns {ib}: not resumed: saved by a service that measured the device "
                  r"segment \(no cgroup\); `mace on` in it enables it again$", timeout=1)
    assert status_json(tb, b, sock)["state"] == "disabled"
    assert svc4.stop() == 0, svc4.text()


def test_sigint_stops_cleanly_and_followers_are_told(bed, tmp_path):
    tb, sock = bed
    a, _ = tb.containers
    ia = inode_of(tb, a)
    svc = Service(tb, sock).ready()
    enable(tb, a, sock)
    follower = Background(tb, a, [*NOPRIV, sys.executable, "-m", "mace", "read", "--follow",
                                  "--socket", sock])
    ping(tb, a, 3)
    follower.wait_lines(lambda out: len(out) == 6, what="3 pings' reports")
    assert svc.stop(signal.SIGINT) == 0, svc.text()
    assert not os.path.lexists(sock)
    assert "Traceback" not in svc.text() and "KeyboardInterrupt" not in svc.text(), svc.text()
    assert follower.finish() == 0, follower.err
    assert follower.err == "mace: measurement ended: service stopping\n", follower.err
    assert all(MACE_LINE.match(line) for line in follower.out), follower.out
    assert [n["inode"] for n in saved_state(sock)["namespaces"]] == [ia]
    # nobody there any more
    one_line_error(mace_client(tb, a, sock, "status"), 10,
                   rf"^mace: error: cannot reach the mace service at {re.escape(sock)}: ")


def test_second_service_on_the_same_socket_is_refused(bed, tmp_path):
    tb, sock = bed
    a, b = tb.containers
    svc = Service(tb, sock).ready()
    enable(tb, a, sock)
    ino = os.stat(sock).st_ino

    r = tb.run(tb.host_ns, serve_argv(sock), timeout=30)
    one_line_error(r, 9, rf"^mace: error: a service already listens on {re.escape(sock)} "
                         r"\(stop it first, or choose another --socket\)$")
    assert os.stat(sock).st_ino == ino
    # the first one still serves, as before
    ping(tb, a, 2)
    time.sleep(SETTLE)
    ra = ok(mace_client(tb, a, sock, "read", "-f", "jsonl"))
    check_reports([json.loads(line) for line in ra.stdout.splitlines()], inode_of(tb, a), 2)
    enable(tb, b, sock)
    assert svc.proc.poll() is None

    # a directory others may write to (and so replace the socket in) is refused
    loose = tmp_path / "loose"
    loose.mkdir()
    os.chmod(loose, 0o777)
    r = tb.run(tb.host_ns, serve_argv(str(loose / "m.sock")), timeout=30)
    one_line_error(r, 2, rf"^mace: error: {re.escape(str(loose))} may be written by others, ")
    assert os.listdir(loose) == []

    # a service that died leaves its socket: the next one takes over, with what was enabled
    svc.proc.kill()
    svc.proc.wait()
    assert os.path.lexists(sock)
    svc2 = Service(tb, sock).ready()
    assert status_json(tb, a, sock)["state"] == "enabled"
    assert status_json(tb, b, sock)["state"] == "enabled"
    assert svc2.stop() == 0, svc2.text()


def test_odd_requests_under_the_size_limit_are_refused_too(bed, tmp_path):
    """Requests under the size limit that are not what they seem get a refusal like any
    other bad request, and the service logs no traceback: nesting deep enough for json to
    raise RecursionError (not a ValueError), and `"v": true` (which == 1 in Python)."""
    tb, sock = bed
    a, _ = tb.containers
    svc = Service(tb, sock).ready()
    cases = {
        "nested array": "[" * 2000 + "]" * 2000 + "\n",
        "nested field": '{"v":1,"op":"status","x":' + "[" * 1500 + "]" * 1500 + "}\n",
        "v true": '{"v":true,"op":"status"}\n',
    }
    for data in cases.values():
        assert len(data.encode()) <= 4096
    results = raw(tb, a, tmp_path, sock, [{"send": data, "stop": "one", "timeout": 5}
                                          for data in cases.values()])
    got = {}
    for name, s in zip(cases, results, strict=True):
        replies = [json.loads(line) for line in s["lines"]]
        got[name] = [(r.get("ok"), r.get("code")) for r in replies] or s["closed"]
    r = ok(mace_client(tb, a, sock, "status"))      # still serving
    assert r.stdout.startswith("mace: not enabled for netns ")
    assert svc.stop() == 0, svc.text()
    assert got == {name: [(False, "bad-request")] for name in cases}, got
    assert "Traceback" not in svc.text(), svc.text()


def test_first_packets_of_two_containers_behind_one_arp(bed, tmp_path):
    """Two containers' packets that wait together in the host's neighbour queue for the
    uplink's next hop to answer ARP are still one packet each to report: the one whose
    call chain asked the neighbour, and the one queued behind it.  The peer answers only
    after 0.1 s, so that both packets surely wait.

    The CPUs are kept busy meanwhile: on this kernel, samples taken in softirq on an idle
    CPU (the ARP timer's retries, the answer, the queue's flush) are counted by perf but
    often never written (README Limits: 10-20 of ~40 per run idle, none busy), and this
    test is about the correlator, not about that."""
    tb, sock = bed
    a, b = tb.containers
    ia, ib = inode_of(tb, a), inode_of(tb, b)
    svc = Service(tb, sock).ready()
    enable(tb, a, sock)
    enable(tb, b, sock)
    # ask every 50 ms, 20 times: the answer after 0.1 s comes well before the host gives up
    tb.sysctl(tb.host_ns, f"net/ipv4/neigh/{tb.uplink}/retrans_time_ms", "50")
    tb.sysctl(tb.host_ns, f"net/ipv4/neigh/{tb.uplink}/mcast_solicit", "20")
    rounds = 3
    with busy_cpus(seconds=30):
        for _ in range(rounds):
            ok(tb.run(tb.host_ns, ["ip", "neigh", "del", tb.peer_ip, "dev", tb.uplink]))
            ok(tb.run(tb.peer_ns, ["ip", "link", "set", "dev", tb.peer_dev, "arp", "off"]))
            procs = [tb.popen(c.ns, ["ping", "-n", "-q", "-c", "1", "-W", "5", tb.peer_ip],
                              stdout=subprocess.PIPE, text=True) for c in (a, b)]
            time.sleep(0.1)
            ok(tb.run(tb.peer_ns, ["ip", "link", "set", "dev", tb.peer_dev, "arp", "on"]))
            for p in procs:
                out, _ = p.communicate(timeout=30)
                assert p.returncode == 0 and " 1 received" in out, out
        time.sleep(SETTLE)
    counters = {x: {d: (st[d]["reports"], st[d]["crossed"], st[d]["missed"]) for d in ("egress", "ingress")}
                for x, st in (("A", status_json(tb, a, sock)), ("B", status_json(tb, b, sock)))}
    ra = ok(mace_client(tb, a, sock, "read", "-f", "jsonl"))
    rb = ok(mace_client(tb, b, sock, "read", "-f", "jsonl"))
    assert svc.stop() == 0, svc.text()
    got = {x: [(r["dir"], r["seq"], r["netns"]) for r in map(json.loads, out.stdout.splitlines())]
           for x, out in (("A", ra), ("B", rb))}
    want = {x: [(d, k, inode) for k in range(1, rounds + 1) for d in ("egress", "ingress")]
            for x, inode in (("A", ia), ("B", ib))}
    assert {x: sorted(v) for x, v in got.items()} == {x: sorted(v) for x, v in want.items()}, \
        f"status counters (reports, crossed, missed): {counters}"


def test_the_socket_segment_through_the_service(testbed_factory, tmp_path):
    """`mace serve --segment socket`: a container measures itself from its ping's send call to
    the uplink's driver and back to its receive call; one without a cgroup of its own is
    refused with the reason, and nothing of it is traced."""
    tb = testbed_factory(containers_n=2, cgroups=True)
    warm(tb)
    sock = run_dir(tmp_path)
    a, b = tb.containers
    ia = inode_of(tb, a)
    svc = Service(tb, sock, "--segment", "socket").ready()
    enable(tb, a, sock)
    # b's processes (a sleep, the client) run in the host's cgroup (the test's, the
    # service's): b has none of its own
    in_b = ["nsenter", f"--net={tb.ns_path(b.ns)}", "--"]
    alone = subprocess.Popen([*in_b, "sleep", "60"])
    try:
        r = subprocess.run([*in_b, *NOPRIV, sys.executable, "-m", "mace", "on", "--socket", sock],
                           capture_output=True, text=True, timeout=30)
    finally:
        alone.kill()
        alone.wait()
    one_line_error(r, 7, "cgroup")
    assert status_json(tb, a, sock)["state"] == "enabled"
    t0 = time.time()
    ok(tb.run(a.ns, ["ping", "-n", "-q", "-U", "-c", "10", "-i", "0.02", tb.peer_ip], timeout=30))
    time.sleep(SETTLE)
    rd = ok(mace_client(tb, a, sock, "read", "-f", "jsonl"))
    check_reports([json.loads(line) for line in rd.stdout.splitlines()], ia, 10,
                  window=(t0, time.time()), segment="socket")
    st = status_json(tb, a, sock)
    assert st["egress"]["reports"] == st["ingress"]["reports"] == 10, st
    assert svc.stop() == 0, svc.text()

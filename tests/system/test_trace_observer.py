"""`mace trace` tells what observing costs and who else traces the same tracepoints: the
observer's numbers in --summary-json and the text summary, and a bpftrace script started by
the test named (by PID) in a warning at start and in the summary."""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import time

import pytest
from helpers import Lines, finish, need_tool, ping, with_tracefs

from mace.capture import others
from mace.plan import tracepoints
from mace.targets.netns import discover, resolve
from mace.testing.testbed import interrupt

N = 10                      # pings per run
RING = ("--ring-pages", "1024")     # headroom against other tests' eth0 traffic
WAIT = 15
DISCOVERY = re.compile(r"^netns \d+ \(.+\): \S+ ⇄ ")
OBSERVER = re.compile(r"^observer: ([\d.]+) events per reported packet, (\d+) samples/s unreported, "
                      r"own cost ≈ ([\d.]+) µs egress / ([\d.]+) µs ingress \(estimate\)$")


class Mace:
    """`python -m mace trace ...` with its stderr read as it comes; killed if left running."""

    def __init__(self, *args):
        self.proc = subprocess.Popen([sys.executable, "-m", "mace", "trace", *map(str, args)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, encoding="utf-8", errors="replace")
        self.err = Lines(self.proc.stderr)

    def wait_for(self, pattern: re.Pattern) -> None:
        if not self.err.wait(lambda lines: any(pattern.search(x) for x in lines), WAIT, self.proc):
            pytest.fail(f"no {pattern.pattern!r} on stderr:\n{self.err.text()}")

    def finish(self) -> int:
        rc = finish(self.proc, WAIT, lambda: "mace did not end; stderr:\n" + self.err.text())
        self.err.join()
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def run_mace():
    started: list[Mace] = []

    def start(*args) -> Mace:
        m = Mace(*args)
        started.append(m)
        return m

    yield start
    for m in started:
        m.kill()


def test_summary_gives_the_observers_cost(testbed, run_mace, tmp_path):
    tb, c = testbed, testbed.containers[0]
    path = tmp_path / "summary.json"
    m = run_mace("--netns", c.ns, "--no-tui", "-f", "jsonl", "--summary-json", path, *RING)
    m.wait_for(DISCOVERY)
    time.sleep(0.6)                 # the discovery line comes just before tracing starts
    ping(tb, c, N)
    time.sleep(0.2)
    m.proc.send_signal(signal.SIGINT)
    assert m.finish() == 0, m.err.text()
    s = json.loads(path.read_text())
    (entry,) = s["containers"]
    reports = {d: entry[d]["count"] for d in ("egress", "ingress")}
    assert reports == {"egress": N, "ingress": N}, m.err.text()

    obs = s["observer"]
    plan = discover([resolve(tb.ns_path(c.ns))]).plan()
    spp = plan.samples_per_packet()
    assert obs["samples_per_packet"] == spp
    assert spp["egress"] >= 3 and spp["ingress"] >= 3
    # every report's chain was sampled: at least its events per report, on average
    assert obs["events_per_report"] >= sum(spp.values()) / 2, obs
    assert obs["events_per_report"] == pytest.approx(s["events"] / (2 * N), abs=1e-3)
    chains = sum(reports[d] * spp[d] for d in spp)
    rate = obs["unreported_samples_per_s"]
    assert rate >= 0 and math.isfinite(rate)
    # the summary's duration is rounded to the millisecond
    assert rate * s["duration_s"] == pytest.approx(max(0, s["events"] - chains), rel=0.01, abs=2)
    cost = obs["own_cost_ns_estimate"]
    basis = cost["basis"]
    assert basis["samples_inside"] == {d: spp[d] - 1 for d in spp}
    for d in ("egress", "ingress"):
        assert cost[d] == (basis["samples_inside"][d] * basis["sample_ns"]
                           + basis["filtered_hits_inside"][d] * basis["filtered_hit_ns"]
                           + basis["filter_walk_inside_ns"][d])
        # a few samples of about a microsecond each: well below the expense it is part of
        assert 1000 <= cost[d] <= 10_000, cost
    assert isinstance(s["other_tracers"], list)

    lines = [x for x in m.err.lines if x.startswith("observer:")]
    assert len(lines) == 1, m.err.text()
    got = OBSERVER.match(lines[0])
    assert got, lines[0]
    assert float(got[1]) == pytest.approx(obs["events_per_report"], abs=0.06)
    assert (float(got[3]), float(got[4])) == (round(cost["egress"] / 1000, 1),
                                              round(cost["ingress"] / 1000, 1))


def test_a_bpftrace_script_on_a_traced_tracepoint_is_named_at_start_and_in_the_summary(
        testbed, run_mace, tmp_path):
    bpftrace = need_tool("bpftrace")
    c = testbed.containers[0]
    path = tmp_path / "summary.json"
    bt = subprocess.Popen(with_tracefs([bpftrace, "-e", "tracepoint:net:net_dev_start_xmit { @n = count(); }"]),
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not [t for t in others.find(tracepoints(False), ftrace=False) if t.pid == bt.pid]:
            assert bt.poll() is None, f"bpftrace exited with {bt.returncode}"
            assert time.monotonic() < deadline, "bpftrace did not attach within 20 s"
            time.sleep(0.1)
        # its program returns 0: it may suppress mace's xmit samples, so no traffic is needed
        m = run_mace("--netns", c.ns, "--no-tui", "--duration", 1, "--summary-json", path, *RING)
        assert m.finish() == 0, m.err.text()
    finally:
        interrupt(bt, 10)
    err = m.err.lines
    who = f"PID {bt.pid} (bpftrace)"
    warned = [i for i, x in enumerate(err) if x.startswith("mace: warning: ") and who in x]
    assert len(warned) == 1, "\n".join(err)
    line = err[warned[0]]
    assert "net:net_dev_start_xmit" in line and "suppress" in line, line
    # right after the discovery line, before the summary
    discovery = [i for i, x in enumerate(err) if DISCOVERY.search(x)]
    head = [i for i, x in enumerate(err) if x.startswith("target ")]
    assert discovery and head and discovery[0] < warned[0] < head[0], "\n".join(err)
    # between them only discovery's own notes (the uplinks it chose) and other warnings
    assert all(x.startswith(("mace: warning: ", "uplink: ", "uplinks: ", "note: "))
               for x in err[discovery[-1] + 1:warned[0]]), err
    # and again in the text summary, and in the JSON
    assert [x for x in err[head[0]:] if x.startswith("warning: ") and who in x], "\n".join(err)
    listed = [t for t in json.loads(path.read_text())["other_tracers"] if t["pid"] == bt.pid]
    assert listed == [{"pid": bt.pid, "command": "bpftrace", "kind": "bpf tracepoint",
                       "tracepoint": "net:net_dev_start_xmit", "events": listed[0]["events"],
                       "suppresses": True}], listed

"""Other tracers on mace's tracepoints, started by the test: a bpftrace script (a tracepoint BPF
program, which can suppress mace's samples) and `perf record` (plain perf events)."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time

import pytest
from helpers import need_tool, with_tracefs

from mace.capture import others
from mace.plan import tracepoints


def _wait_for(pred, what: str, limit: float = 20.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_a_bpftrace_program_on_a_traced_tracepoint_is_found_by_its_pid():
    bpftrace = need_tool("bpftrace")
    proc = subprocess.Popen(with_tracefs([bpftrace, "-e", "tracepoint:net:net_dev_start_xmit { @n = count(); }"]),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def mine():
            return [t for t in others.find(tracepoints(False), ftrace=False) if t.pid == proc.pid]
        found = _wait_for(mine, "bpftrace to attach")
        assert found == [others.OtherTracer(proc.pid, "bpftrace", "bpf tracepoint",
                                            "net:net_dev_start_xmit", found[0].events,
                                            suppresses=True)]
        assert "suppress" in others.warn_lines(found)[0]
    finally:
        _stop(proc)
    assert not [t for t in others.find(tracepoints(False), ftrace=False) if t.pid == proc.pid]


def test_perf_record_is_reported_as_a_perf_user():
    perf = need_tool("perf")
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(with_tracefs([perf, "record", "-q", "-e", "net:netif_receive_skb", "-a",
                                               "-o", os.path.join(tmp, "perf.data"), "--", "sleep", "30"]),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            def mine():
                return [t for t in others.find(tracepoints(False), ftrace=False) if t.pid == proc.pid]
            found = _wait_for(mine, "perf record to open its events")
            assert [(t.kind, t.tracepoint) for t in found] == [("perf", None)]
            assert found[0].events >= 1
        finally:
            _stop(proc)

"""Other tracers: how they are described and ordered, and ftrace found in tracefs (no root)."""

from __future__ import annotations

import mace.capture.tracefs
from mace.capture import others
from mace.capture.others import OtherTracer


def test_a_suppressing_bpf_program_is_named_first_with_its_pid_and_tracepoint():
    found = [OtherTracer(7, "perf", "perf", None, 6),
             OtherTracer(None, "ftrace", "ftrace", "net:netif_receive_skb"),
             OtherTracer(42, "bpftrace", "bpf tracepoint", "net:net_dev_start_xmit", suppresses=True)]
    lines = others.warn_lines(found)
    assert lines[0].startswith("mace: warning: PID 42 (bpftrace) has a bpf tracepoint program on "
                               "net:net_dev_start_xmit")
    assert "suppress" in lines[0]
    assert "ftrace has net:netif_receive_skb enabled" in lines[1]
    assert "PID 7 (perf) holds 6 perf event(s)" in lines[2]
    assert all("\n" not in line for line in lines)


def test_as_dict_is_what_the_summary_records():
    t = OtherTracer(42, "bpftrace", "bpf tracepoint", "net:net_dev_start_xmit", suppresses=True)
    assert t.as_dict() == {"pid": 42, "command": "bpftrace", "kind": "bpf tracepoint",
                           "tracepoint": "net:net_dev_start_xmit", "events": 1, "suppresses": True}


def test_ftrace_enable_states(monkeypatch):
    states = {"net:a": "1\n", "net:b": "0\n", "net:c": "0*\n", "net:d": "1*\n", "net:e": None}
    monkeypatch.setattr(mace.capture.tracefs, "read_tracefs",
                        lambda paths: {p: states["net:" + p.split("/")[2]] for p in paths})
    got = others._ftrace_users(list(states))
    assert [t.tracepoint for t in got] == ["net:a", "net:d"]


def test_a_bpf_program_on_a_tracepoint_the_capture_did_not_open_suppresses_nothing():
    # a program on a tracepoint the plan did not open costs, but hides nothing
    xmit = OtherTracer(42, "bpftrace", "bpf tracepoint", "net:net_dev_start_xmit", suppresses=True)
    queue = OtherTracer(43, "bpftrace", "bpf tracepoint", "net:net_dev_queue", suppresses=True)
    seen = others.as_seen_by([xmit, queue], ["net:net_dev_queue", "net:netif_receive_skb"])
    assert [t.suppresses for t in seen] == [False, True]
    assert "suppress" not in others.warn_lines(seen[:1])[0]
    assert others.as_seen_by([xmit], ["net:net_dev_start_xmit"]) == [xmit]

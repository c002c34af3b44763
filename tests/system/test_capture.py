"""The capture engine on the real kernel: real packets through a testbed, exact event counts."""

from __future__ import annotations

import os
import re
import resource
import time
from collections import Counter

import pytest

from mace.capture.perf import Capture, Probe, online_cpus
from mace.capture.tracefs import _mounted_tracefs, read_formats
from mace.errors import MaceError, TracepointMissing

PAYLOAD = 177         # an unusual ping size: no other traffic on the machine matches it
ECHO_L3 = 20 + 8 + PAYLOAD
N = 20


def perf_fds() -> set[str]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            if "perf_event" in os.readlink(f"/proc/self/fd/{fd}"):
                out.add(fd)
        except OSError:
            pass
    return out


def perf_maps() -> int:
    with open("/proc/self/maps") as f:
        return sum("perf_event" in line for line in f)


def ping(tb, ns, count=N, interval="0.02", extra=()):
    r = tb.run(ns, ["ping", "-n", "-c", str(count), "-i", interval, "-s", str(PAYLOAD), *extra,
                    tb.peer_ip], timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def drain_all(cap):
    events = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        cap.wait(50)
        batch = cap.read()
        events += batch
        if not batch and not cap.stats()["pending"]:
            break
    return events + cap.read(final=True)


def test_tracefs_lookup_leaves_mounts_as_found():
    before = open("/proc/self/mounts").read().count(" tracefs ")
    was_mounted = _mounted_tracefs() is not None
    formats = read_formats(["net:net_dev_start_xmit", "net:netif_receive_skb"])
    assert formats["net:netif_receive_skb"].fields["name"].data_loc
    assert formats["net:net_dev_start_xmit"].id != formats["net:netif_receive_skb"].id
    assert open("/proc/self/mounts").read().count(" tracefs ") == before
    assert (_mounted_tracefs() is not None) == was_mounted


def test_exact_per_device_counts_for_n_pings(testbed):
    tb = testbed
    c = tb.containers[0]
    names = (c.inner, c.veth, tb.bridge, tb.uplink)
    # a ping size of our own, so that no other traffic on any eth0 can match
    probes = [
        Probe("net:net_dev_start_xmit", devices=names,
              condition=f"protocol == 2048 && len == {ECHO_L3 + 14}"),
        Probe("net:netif_receive_skb", devices=names, condition=f"len == {ECHO_L3}"),
        Probe("net:netif_rx", devices=names, condition=f"len == {ECHO_L3}"),
    ]
    fds_before = perf_fds()
    t_before = time.monotonic_ns()
    with Capture(probes) as cap:
        assert len(perf_fds() - fds_before) == len(probes) * len(online_cpus())
        cap.start()
        ping(tb, c.ns)
        events = drain_all(cap)
        cap.stop()
        stats = cap.stats()
        devices = cap.devices
    t_after = time.monotonic_ns()

    got = Counter((probes[e.kind].tracepoint.split(":")[1], devices[e.dev]) for e in events)
    # The bridge's IGMP reports are IPv4 too: the length conditions keep only the echoes.
    assert got == {
        ("net_dev_start_xmit", c.inner): N,       # requests out of the container
        ("net_dev_start_xmit", c.veth): N,        # replies into the container
        ("net_dev_start_xmit", tb.bridge): N,
        ("net_dev_start_xmit", tb.uplink): N,     # requests out of the host
        ("netif_receive_skb", c.inner): N,
        ("netif_receive_skb", c.veth): N,
        ("netif_receive_skb", tb.bridge): N,
        ("netif_receive_skb", tb.uplink): N,
        ("netif_rx", c.inner): N,
        ("netif_rx", c.veth): N,
        ("netif_rx", tb.uplink): N,
    }
    assert stats["lost"] == 0 and stats["errors"] == 0 and stats["unknown"] == 0
    ts = [e.ts for e in events]
    assert ts == sorted(ts), "merged stream is not in timestamp order"
    assert t_before <= ts[0] and ts[-1] <= t_after, "timestamps are not CLOCK_MONOTONIC"
    assert all(e.len in (ECHO_L3, ECHO_L3 + 14) for e in events)
    assert len({e.skb for e in events}) > 1
    assert perf_fds() == fds_before and perf_maps() == 0


def test_all_cpus_merged_in_time_order(testbed):
    tb = testbed
    c = tb.containers[0]
    cpus = online_cpus()
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    probes = [Probe("net:net_dev_start_xmit", devices=(c.veth, tb.uplink)),
              Probe("net:netif_receive_skb", devices=(c.veth, tb.uplink))]
    with Capture(probes, reorder_us=500) as cap:
        cap.start()
        procs = [tb.popen(c.ns, ["taskset", "-c", str(cpu), "ping", "-n", "-q", "-c", "200",
                                 "-i", "0.005", tb.peer_ip]) for cpu in cpus[:2]]
        events = []
        while any(p.poll() is None for p in procs):
            cap.wait(20)
            events += cap.read()
        for p in procs:
            assert p.wait(timeout=30) == 0
        events += drain_all(cap)
        stats = cap.stats()
    assert {e.cpu for e in events} >= set(cpus[:2])
    ts = [e.ts for e in events]
    assert ts == sorted(ts)
    assert stats["late"] == 0 and stats["lost"] == 0


def test_idle_wait_uses_no_cpu_and_wakes_by_watermark_not_per_event(testbed):
    tb = testbed
    c = tb.containers[0]
    probe = Probe("net:netif_receive_skb", devices=(c.veth,), condition=f"len == {ECHO_L3}")
    with Capture([probe], ring_pages=64) as cap:
        cap.start()
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.0:
            cap.wait(200)
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        used = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
        assert used < 0.1, f"idle tracer used {used:.3f} s of CPU in 1 s"

        # 10 events are far below a quarter of a 64-page ring: no wakeup, only timeouts.
        pinger = tb.popen(c.ns, ["ping", "-n", "-q", "-c", "10", "-i", "0.05", "-s", str(PAYLOAD),
                                 tb.peer_ip])
        woken = 0
        while pinger.poll() is None:
            woken += cap.wait(100) > 0
        assert woken == 0, "the reader was woken for a handful of events"
        assert len(cap.read(final=True)) == 10


def test_everything_released_after_an_exception(testbed):
    c = testbed.containers[0]
    fds_before = perf_fds()
    with pytest.raises(RuntimeError):
        with Capture([Probe("net:netif_receive_skb", devices=(c.veth,))]) as cap:
            cap.start()
            assert perf_fds() - fds_before
            raise RuntimeError("boom")
    assert perf_fds() == fds_before and perf_maps() == 0
    cap.close()   # idempotent


def test_missing_tracepoint_and_bad_filter_fail_cleanly():
    fds_before = perf_fds()
    with pytest.raises(TracepointMissing, match="no tracepoint net:no_such_event"):
        Capture([Probe("net:no_such_event")]).open()
    with pytest.raises(MaceError, match="rejected an event filter"):
        Capture([Probe("net:netif_rx", condition="nosuchfield == 1")]).open()
    assert perf_fds() == fds_before and perf_maps() == 0


def test_mace_events_demo_cli(capsys):
    from mace.cli import main

    assert main(["events", "--demo"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    # other traffic on any `eth0` of the machine may join in: only the format is fixed
    assert re.search(r"\d+ events, \d+ lost, 0 malformed", err)
    assert any("net:net_dev_start_xmit" in line for line in lines)
    assert len(lines) >= 3 * 6

"""The socket segment on the real kernel (`--segment socket`, MACE's own): from a container
process's send call to the uplink's transmit, and from the uplink's receive to the receive
call that takes the packet; the calls are sampled for the traced containers' cgroups only."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

from helpers import one_line_error, resolve_peer, trace_while

from mace.output.report import coverage
from mace.plan import ContainerPath, Plan

N = 40
UDP_PORT = 7007
# an echo server for the peer: each datagram back to its sender, until killed
ECHO = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", int(sys.argv[1])))
    print("ready", flush=True)
    while True:
        data, peer = s.recvfrom(2048)
        s.sendto(data, peer)
""")
# a client: n requests from `threads` threads (each its own socket), each waiting for its echo
CLIENT = textwrap.dedent("""
    import socket, sys, threading
    host, port, n, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    def worker(k):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(5)
        for i in range(k):
            s.sendto(b"x" * 100, (host, port))
            s.recvfrom(2048)
    ts = [threading.Thread(target=worker, args=(n // threads,)) for _ in range(threads)]
    [t.start() for t in ts]
    [t.join() for t in ts]
""")


def socket_plan(tb, indices, **kw) -> Plan:
    cs = [tb.containers[i] for i in indices]
    return Plan([ContainerPath(c.ns, c.inner, c.veth, tb.bridge, c.cgroup) for c in cs], tb.uplink,
                end_at_queue=False, segment="socket", **kw)


def traced(plan, start, **kw):
    reports, stats, _ = trace_while(plan, start, settle=0.05, **kw)
    return reports, stats, stats.pop("samples")


def resolve_gateway(tb, containers) -> None:
    """Resolve each container's gateway before tracing: a packet that waits for its
    neighbour inside the container leaves after its send call returned, unpaired (README,
    Limits), and its test is test_a_packet_behind_its_containers_arp_is_unpaired."""
    for c in containers:
        r = tb.run(c.ns, ["ping", "-n", "-q", "-c", "1", "-W", "2", tb.peer_ip], timeout=10)
        assert r.returncode == 0, r.stderr


def by(reports, container, direction):
    return sorted((r for r in reports if r.container == container and r.dir == direction), key=lambda r: r.seq)


def test_n_pings_give_n_socket_reports_each_way_for_two_containers_and_none_for_a_third(testbed_factory):
    tb = testbed_factory(containers_n=3, masquerade=True, cgroups=True)
    resolve_peer(tb)
    resolve_gateway(tb, tb.containers)
    ping = ["ping", "-n", "-q", "-U", "-c", str(N), "-i", "0.02", tb.peer_ip]
    reports, stats, samples = traced(socket_plan(tb, [0, 1]),
                                     lambda: [tb.popen(c.ns, ping, stdout=subprocess.DEVNULL)
                                              for c in tb.containers])
    for c in (0, 1):
        for d in (0, 1):
            rs = by(reports, c, d)
            assert [r.seq for r in rs] == list(range(1, N + 1)), (c, d, rs[:3])
            # from the call: the container's own stack is egress's first hop; the socket's
            # receive ends ingress after the container's device (its last hop)
            assert all(r.len == 84 and 0 < r.latency < 1_000_000 for r in rs)
            assert all(r.hops[0] for r in rs) if d == 0 else all(r.hops[-1] for r in rs)
        k = stats["containers"][c]
        for d in ("egress", "ingress"):
            assert k[d]["reports"] == N and k[d]["unpaired"] == 0 and coverage(k[d]) == 1.0, (c, d, k[d])
    assert stats["rings"]["lost"] == 0
    # the third container's ping made as many calls: none of them was sampled (the events are
    # bound to the traced containers' cgroups), and its packets were not reported
    assert 2 * N <= samples["syscalls:sys_enter_sendto"] <= 2 * N + 4, samples
    assert samples["syscalls:sys_enter_sendto"] == samples["syscalls:sys_exit_sendto"]
    # one receive a reply: ping's next one, which finds its socket empty, is left out in the kernel
    assert 2 * N <= samples["sock:sock_recv_length"] <= 2 * N + 4, samples


def test_a_pings_spinning_empty_receives_are_not_sampled(testbed_factory):
    # at an interval of a few ms iputils' ping spins between probes on non-blocking receives
    # that find nothing (hundreds a probe): the filter keeps only receives that took a datagram
    tb = testbed_factory(containers_n=1, masquerade=True, cgroups=True)
    resolve_peer(tb)
    resolve_gateway(tb, tb.containers)
    ping = ["ping", "-n", "-q", "-U", "-c", str(N), "-i", "0.004", tb.peer_ip]
    reports, stats, samples = traced(socket_plan(tb, [0]),
                                     lambda: [tb.popen(tb.containers[0].ns, ping, stdout=subprocess.DEVNULL)])
    assert [r.seq for r in by(reports, 0, 1)] == list(range(1, N + 1))
    assert stats["containers"][0]["ingress"]["unpaired"] == 0
    assert N <= samples["sock:sock_recv_length"] <= N + 2, samples


def test_a_packet_behind_its_containers_arp_is_unpaired(testbed_factory):
    # the container's first packet waits for its gateway's address: the ARP reply's softirq
    # hands it to the veth after the send call returned, so no call is its start
    tb = testbed_factory(containers_n=1, masquerade=True, cgroups=True)
    resolve_peer(tb)
    ping = ["ping", "-n", "-q", "-U", "-c", "5", "-i", "0.05", tb.peer_ip]
    reports, stats, _ = traced(socket_plan(tb, [0]),
                               lambda: [tb.popen(tb.containers[0].ns, ping, stdout=subprocess.DEVNULL)])
    k = stats["containers"][0]
    assert [r.seq for r in by(reports, 0, 0)] == [1, 2, 3, 4] and k["egress"]["unpaired"] == 1, k["egress"]
    assert coverage(k["egress"]) == 1.0
    assert len(by(reports, 0, 1)) == 5 and k["ingress"]["unpaired"] == 0, k["ingress"]


def test_udp_requests_and_replies_from_a_thread_pool(testbed_factory):
    tb = testbed_factory(containers_n=1, masquerade=False, cgroups=True)
    resolve_peer(tb)
    resolve_gateway(tb, tb.containers)
    echo = tb.popen(tb.peer_ns, [sys.executable, "-c", ECHO, str(UDP_PORT)], stdout=subprocess.PIPE, text=True)
    assert echo.stdout.readline().strip() == "ready"
    try:
        n, threads = 4 * N, 4
        reports, stats, _ = traced(socket_plan(tb, [0]), lambda: [tb.popen(
            tb.containers[0].ns, [sys.executable, "-c", CLIENT, tb.peer_ip, str(UDP_PORT), str(n), str(threads)])])
    finally:
        echo.kill()
    k = stats["containers"][0]
    for d, name in ((0, "egress"), (1, "ingress")):
        rs = by(reports, 0, d)
        # every datagram from whichever thread sent it, every echo to whichever read it
        assert len(rs) == n == k[name]["reports"], (name, k[name])
        assert all(r.len == 20 + 8 + 100 for r in rs)
        assert k[name]["unpaired"] == 0 and coverage(k[name]) == 1.0, k[name]


def test_datagrams_queued_while_the_reader_sleeps_pair_with_their_own_receives(testbed_factory):
    # the peer sends 30 same-sized datagrams 5 ms apart while the container's reader sleeps;
    # then it drains them.  Ground truth from both ends on the one monotonic clock: each
    # report starts when its datagram was sent (plus the wire) and ends as its receive returns
    tb = testbed_factory(containers_n=1, masquerade=False, cgroups=True)
    resolve_peer(tb)
    c, n = tb.containers[0], 30
    reader = textwrap.dedent(f"""
        import socket, time
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", {UDP_PORT}))
        print("ready", flush=True)
        time.sleep(0.5)
        for _ in range({n}):
            data = s.recv(2048)
            print(int(data.decode()), time.monotonic_ns(), flush=True)
    """)
    sender = textwrap.dedent(f"""
        import socket, time
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for k in range({n}):
            print(k, time.monotonic_ns(), flush=True)
            s.sendto(b"%04d" % k, ("{c.ip}", {UDP_PORT}))
            time.sleep(0.005)
    """)
    box = tb.popen(c.ns, [sys.executable, "-c", reader], stdout=subprocess.PIPE, text=True)
    assert box.stdout.readline().strip() == "ready"
    peer = []

    def start():
        peer.append(tb.popen(tb.peer_ns, [sys.executable, "-c", sender], stdout=subprocess.PIPE, text=True))
        return [box, peer[0]]

    reports, stats, _ = traced(socket_plan(tb, [0]), start)
    sent = dict(map(int, line.split()) for line in peer[0].stdout.read().splitlines())
    read = [tuple(map(int, line.split())) for line in box.stdout.read().splitlines()]
    assert [k for k, _ in read] == list(range(n))
    rs = by(reports, 0, 1)
    assert len(rs) == n and stats["containers"][0]["ingress"]["unpaired"] == 0, stats["containers"][0]
    for r, (k, returned) in zip(rs, read, strict=True):
        assert 0 < r.t0 - sent[k] < 2_000_000, (k, r, sent[k])          # its own datagram
        assert 0 < returned - (r.t0 + r.latency) < 2_000_000, (k, r, returned)   # its own receive
    # the first half waited for the sleeping reader (the sends took 150 ms of its 500)
    assert all(r.latency > 300_000_000 for r in rs[:n // 2]), [r.latency for r in rs]


def test_a_receiver_that_exits_leaves_its_packets_unpaired_not_missed(testbed_factory):
    # a UDP receiver in the container reads 5 datagrams and exits; the peer keeps sending
    tb = testbed_factory(containers_n=1, masquerade=False, cgroups=True)
    resolve_peer(tb)
    c = tb.containers[0]
    receiver = textwrap.dedent(f"""
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", {UDP_PORT}))
        print("ready", flush=True)
        for _ in range(5):
            s.recvfrom(2048)
    """)
    sender = textwrap.dedent(f"""
        import socket, time
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(20):
            s.sendto(b"y" * 50, ("{c.ip}", {UDP_PORT}))
            time.sleep(0.02)
    """)
    box = tb.popen(c.ns, [sys.executable, "-c", receiver], stdout=subprocess.PIPE, text=True)
    assert box.stdout.readline().strip() == "ready"

    def start():
        return [box, tb.popen(tb.peer_ns, [sys.executable, "-c", sender])]

    reports, stats, _ = traced(socket_plan(tb, [0]), start)
    k = stats["containers"][0]["ingress"]
    assert len(by(reports, 0, 1)) == k["reports"] == 5, k
    # the other 15 reached the container and no socket took them (its port closed): the last
    # one's chain is still open when tracing stops
    assert k["unpaired"] + k["in_flight"] == 15 and k["in_flight"] <= 1, str(dict(k))
    assert coverage(k) == 1.0 and k["rejected"] == 0, str(dict(k))


def test_a_container_whose_processes_are_in_cgroups_below_its_own_is_bound_by_that_one(testbed_factory):
    # as a pod: each process in a cgroup of its own below the container's; the socket
    # segment finds the one above them all, and both processes' calls are sampled
    from mace.targets.netns import discover, resolve
    tb = testbed_factory(containers_n=1, masquerade=True, cgroups=True)
    resolve_peer(tb)
    c = tb.containers[0]
    resolve_gateway(tb, [c])
    subs = [os.path.join(c.cgroup, name) for name in ("sandbox", "app")]
    for d in subs:
        os.mkdir(d)

    def in_sub(d, argv, **kw):
        return tb.popen(tb.host_ns, ["nsenter", f"--net={tb.ns_path(c.ns)}", "--", "sh", "-c",
                                     'echo $$ > "$0/cgroup.procs" && exec "$@"', d, *argv], **kw)

    holders = [in_sub(d, ["sleep", "60"]) for d in subs]
    try:
        deadline = time.monotonic() + 5
        while any(not open(os.path.join(d, "cgroup.procs")).read().strip() for d in subs):
            assert time.monotonic() < deadline, "the sleeps did not join their cgroups"
            time.sleep(0.01)
        plan = discover([resolve(tb.ns_path(c.ns))]).plan(segment="socket", end_at_queue=False)
        assert plan.containers[0].cgroup == c.cgroup
        ping = ["ping", "-n", "-q", "-U", "-c", "10", "-i", "0.02", tb.peer_ip]
        reports, stats, _ = traced(plan, lambda: [in_sub(d, ping, stdout=subprocess.DEVNULL) for d in subs])
    finally:
        for p in holders:
            p.kill()
            p.wait()
    k = stats["containers"][0]
    assert len(by(reports, 0, 0)) == len(by(reports, 0, 1)) == 20, k
    assert k["egress"]["unpaired"] == k["ingress"]["unpaired"] == 0, k


def test_a_container_without_a_cgroup_of_its_own_is_refused(testbed):
    tb, c = testbed, testbed.containers[0]
    sleeper = tb.popen(c.ns, ["sleep", "30"])
    try:
        r = subprocess.run([sys.executable, "-m", "mace", "trace", "--segment", "socket",
                            "--netns", str(sleeper.pid), "--duration", "1"],
                           capture_output=True, text=True, timeout=30)
    finally:
        sleeper.kill()
    one_line_error(r, 16, "cgroup")


def test_mace_demo_with_the_socket_segment_prints_the_wire_rtt():
    r = subprocess.run([sys.executable, "-m", "mace", "demo", "--segment", "socket", "--count", "30",
                        "--interval", "0.02"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "socket segment" in r.stdout and "wire RTT (uplink capture)" in r.stdout, r.stdout
    assert "30 of 30 probes matched" in r.stdout, r.stdout

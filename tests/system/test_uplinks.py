"""Uplink discovery with real devices: a testbed's host namespace given policy routing, a
second NIC or an overlay, and `mace trace` (and `mace serve`) left to find the uplinks
themselves.  Every device is made inside the testbed's namespaces (named with its tag,
addressed in 198.18.0.0/15) and goes with them."""

from __future__ import annotations

import json
import re
import time

from helpers import inode_of, resolve_peer, wait_for
from test_cli_trace import _nothing_left_behind, check_reports, mace, parse  # noqa: F401 - a fixture
from test_service_live import Service, mace_client, ok, run_dir

N = 5
SECOND_NET = ("198.19.1.1", "198.19.1.2")       # host and peer ends of the second NIC
OVERLAY_NET = ("198.19.3.1", "198.19.3.2")      # host and peer ends of the vxlan
VNI = "4242"
TABLE = "100"
UPLINKS = re.compile(r"^uplinks?: (.*?)(?: \(choose with --uplink DEV, repeatable\))?$")


def sh(tb, ns: str, *commands: str) -> None:
    """`ip` commands (one per string) in namespace `ns`, each of which must succeed."""
    for command in commands:
        r = tb.run(ns, ["ip", *command.split()])
        assert r.returncode == 0, (command, r.stderr)


def ping_from(tb, c, addr: str, n: int = N) -> tuple[float, float]:
    t0 = time.time()
    r = tb.run(c.ns, ["ping", "-n", "-q", "-c", str(n), "-i", "0.1", addr], timeout=30)
    assert r.returncode == 0 and f" {n} received" in r.stdout, r.stdout + r.stderr
    return t0, time.time()


def listed(err: list[str]) -> dict[str, str]:
    """The uplinks discovery chose, as its `uplinks:` line gives them: {device: why}."""
    lines = [m[1] for m in map(UPLINKS.match, err) if m]
    assert len(lines) == 1, "\n".join(err)
    return dict(re.findall(r"(\S+) \(([^)]*)\)(?:, |$)", lines[0]))


def second_nic(tb, c) -> str:
    """A second NIC: a veth pair from the host to the peer namespace, 198.19.1.0/24, with a
    default route of its own (behind the first's: a higher metric).  The peer answers
    container `c` by it, so that c's pings to the peer's second address go out and come
    back through it.  Returns the host's end."""
    dev, far = f"m{tb.tag}u2", f"m{tb.tag}p2"
    sh(tb, tb.host_ns, f"link add {dev} type veth peer name {far} netns {tb.peer_ns}",
       f"addr add {SECOND_NET[0]}/24 dev {dev}", f"link set {dev} up",
       f"route add default via {SECOND_NET[1]} dev {dev} metric 100")
    sh(tb, tb.peer_ns, f"addr add {SECOND_NET[1]}/24 dev {far}", f"link set {far} up",
       f"route add {c.ip}/32 via {SECOND_NET[0]} dev {far}")
    return dev


# -- trace ----------------------------------------------------------------------------------

def test_policy_routing_default_route_in_another_table(testbed):
    """No default route in the main table: the containers' traffic takes one in table 100,
    chosen by an `ip rule`.  Discovery names the device and the table, and every ping is
    reported."""
    tb, c = testbed, testbed.containers[0]
    sh(tb, tb.host_ns, "route del default",
       f"route add default via {tb.peer_ip} dev {tb.uplink} table {TABLE}",
       f"rule add from {tb.host_net} lookup {TABLE} pref 1000")
    resolve_peer(tb)
    run = mace("--netns", c.ns, "-f", "jsonl", "--count", 2 * N, "--duration", 30)
    run.ready()
    assert listed(run.err) == {tb.uplink: f"default route in table {TABLE}"}, run.text()
    window = ping_from(tb, c, tb.peer_ip)
    assert run.finish() == 0, run.text()
    check_reports(parse("jsonl", run.out, [c.ns]), c.ns, N, (window[0], run.t_end), inode=inode_of(tb, c))


def test_a_second_nic_is_traced_beside_the_first(testbed_factory):
    """Two default routes by two devices: both are listed and traced, and pings that leave
    and come back by the second are reported as those by the first are."""
    tb = testbed_factory(containers_n=2)
    a, b = tb.containers
    dev = second_nic(tb, b)
    resolve_peer(tb)
    run = mace("--netns", a.ns, "--netns", b.ns, "-f", "jsonl", "--count", 4 * N, "--duration", 30)
    (la, lb) = run.ready(2)
    assert listed(run.err) == {tb.uplink: "default route", dev: "default route"}, run.text()
    assert la.endswith(f"→ {tb.uplink}|{dev}") and lb.endswith(f"→ {tb.uplink}|{dev}"), (la, lb)
    ping_from(tb, a, tb.peer_ip)
    ping_from(tb, b, SECOND_NET[1])
    assert run.finish() == 0, run.text()
    reports = parse("jsonl", run.out, [a.ns, b.ns])
    check_reports(reports, a.ns, N, (run.t_start, run.t_end), inode=inode_of(tb, a))
    check_reports(reports, b.ns, N, (run.t_start, run.t_end), inode=inode_of(tb, b))
    assert not any("none reached" in line for line in run.err), run.text()


def test_an_overlay_with_a_route_is_an_uplink(testbed):
    """A vxlan device with a route is listed as vxlan beside the default route's device, and
    pings through it are reported both ways: out at the overlay device's queue (where the
    packet leaves for another host), in from its receive (the packet decapsulated)."""
    tb, c = testbed, testbed.containers[0]
    vx, pvx = f"m{tb.tag}vx", f"m{tb.tag}pv"
    sh(tb, tb.host_ns, f"link add {vx} type vxlan id {VNI} local {tb.host_ip} remote {tb.peer_ip} "
                       f"dstport 4789 dev {tb.uplink}",
       f"addr add {OVERLAY_NET[0]}/24 dev {vx}", f"link set {vx} up")
    sh(tb, tb.peer_ns, f"link add {pvx} type vxlan id {VNI} local {tb.peer_ip} remote {tb.host_ip} "
                       f"dstport 4789 dev {tb.peer_dev}",
       f"addr add {OVERLAY_NET[1]}/24 dev {pvx}", f"link set {pvx} up",
       f"route add {c.ip}/32 via {OVERLAY_NET[0]} dev {pvx}")
    resolve_peer(tb)
    run = mace("--netns", c.ns, "-f", "jsonl", "--count", 2 * N, "--duration", 30)
    (line,) = run.ready()
    assert listed(run.err) == {tb.uplink: "default route", vx: "vxlan"}, run.text()
    assert line.endswith(f"→ {tb.uplink}|{vx}"), line
    window = ping_from(tb, c, OVERLAY_NET[1])
    assert run.finish() == 0, run.text()
    check_reports(parse("jsonl", run.out, [c.ns]), c.ns, N, (window[0], run.t_end), inode=inode_of(tb, c))


# -- serve ----------------------------------------------------------------------------------

def read_until(tb, c, sock: str, n: int) -> list[dict]:
    """`mace read` in container c until n reports have come."""
    reports = []

    def enough():
        got = ok(mace_client(tb, c, sock, "read", "-f", "jsonl")).stdout.splitlines()
        reports.extend(json.loads(line) for line in got)
        return len(reports) >= n

    wait_for(enough, what=f"{n} reports")
    return reports


def test_serve_traces_every_uplink_and_uplink_is_repeatable(testbed_factory, tmp_path):
    """`mace serve` traces both uplinks discovery finds, as trace does; `--uplink` given
    twice names both.  A container whose pings leave by the second gets every report."""
    tb = testbed_factory(containers_n=1)
    c = tb.containers[0]
    dev = second_nic(tb, c)
    resolve_peer(tb)
    for name, extra, path in (("found", (), f"{tb.uplink}|{dev}"),
                              ("named", ("--uplink", dev, "--uplink", tb.uplink), f"{dev}|{tb.uplink}")):
        sock = run_dir(tmp_path, name)
        svc = Service(tb, sock, *extra).ready()
        try:
            on = ok(mace_client(tb, c, sock, "on"))
            assert on.stdout.splitlines()[0].endswith(f"→ {path}"), on.stdout
            ping_from(tb, c, SECOND_NET[1])
            reports = read_until(tb, c, sock, 2 * N)
            status = json.loads(ok(mace_client(tb, c, sock, "status", "--json")).stdout)
        finally:
            assert svc.stop() == 0, svc.text()
        for d in ("egress", "ingress"):
            assert [r["seq"] for r in reports if r["dir"] == d] == list(range(1, N + 1)), (name, reports)
        assert status["path"].endswith(f"→ {path}") and status["egress"]["reports"] == N, status

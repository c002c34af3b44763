"""The testbed's topologies with real packets: the routed (Calico-style) layout, a peer whose
device is an eth0 too, and `mace trace` through each of them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
from helpers import Lines, finish, inode_of
from pyroute2 import IPRoute, netns

from mace.targets.netns import discover, resolve
from mace.testing import testbed as testbed_module

WAIT = 15
SETTLE = 0.6                # the discovery line is printed before the tracer starts
RING = ("--ring-pages", "1024")     # headroom against other tests' eth0 traffic
DISCOVERY = re.compile(r"^netns (\d+) \((.+)\): (\S+) ⇄ (\S+)(?: → (\S+))? → (\S+)$")
PINGS = 3


def ping3(tb, c) -> subprocess.CompletedProcess:
    r = tb.run(c.ns, ["ping", "-n", "-c", str(PINGS), "-i", "0.2", "-W", "2", tb.peer_ip], timeout=20)
    assert r.returncode == 0 and f" {PINGS} received" in r.stdout, r.stdout + r.stderr
    return r


def host_link_kinds(tb) -> dict[str, str | None]:
    with IPRoute(netns=tb.host_ns, flags=0) as host:
        return {l.get("ifname"): l.get(("linkinfo", "kind")) for l in host.get_links()}


# -- the layouts ----------------------------------------------------------------------------

def test_bridge_stays_the_default(testbed):
    tb = testbed
    assert tb.topology == "bridge"
    assert tb.bridge == f"m{tb.tag}br" and tb.peer_dev == f"m{tb.tag}pe"
    assert host_link_kinds(tb)[tb.bridge] == "bridge"
    assert tb.gateway == "198.18.0.1"


def test_unknown_topology_is_refused():
    with pytest.raises(ValueError, match="topology"):
        testbed_module.Testbed(topology="mesh")


@pytest.mark.parametrize("masquerade", [False, True], ids=["routed", "routed-masquerade"])
def test_routed_container_reaches_the_peer_without_a_bridge(testbed_factory, masquerade):
    tb = testbed_factory(containers_n=2, masquerade=masquerade, topology="routed")
    assert tb.bridge is None and tb.gateway == "198.18.0.1"
    kinds = host_link_kinds(tb)
    assert "bridge" not in kinds.values(), kinds
    for c in tb.containers:
        ping3(tb, c)
        # a /32 and an onlink default route to an address no namespace has
        addrs = tb.run(c.ns, ["ip", "-4", "-o", "addr", "show", "dev", c.inner], check=True).stdout
        assert f"inet {c.ip}/32 " in addrs, addrs
        route = tb.run(c.ns, ["ip", "-4", "route", "show", "default"], check=True).stdout
        assert f"via {tb.gateway} dev {c.inner}" in route and "onlink" in route, route
        topo = discover([resolve(tb.ns_path(c.ns))])
        (link,) = topo.containers[0].links
        assert (link.inner, link.veth, link.bridge) == (c.inner, c.veth, None)
        assert topo.uplink == tb.uplink
    for ns in tb.namespaces:
        r = tb.run(ns, ["ip", "-4", "-o", "addr", "show"], check=True)
        assert f" {tb.gateway}/" not in r.stdout, (ns, r.stdout)


def test_peer_dev_eth0_lives_in_the_peer_namespace(testbed_factory):
    tb = testbed_factory(peer_dev="eth0", masquerade=True)
    assert tb.peer_dev == "eth0"
    assert "eth0" not in host_link_kinds(tb)
    with IPRoute(netns=tb.peer_ns, flags=0) as peer:
        assert peer.link_lookup(ifname="eth0")
    ping3(tb, tb.containers[0])


def test_routed_teardown_leaves_nothing(testbed_factory):
    tb = testbed_factory(topology="routed", peer_dev="eth0")
    made = tb.namespaces
    tb.teardown()
    assert not set(made) & set(netns.listnetns())


# -- mace through them ----------------------------------------------------------------------

def trace_pings(tb) -> tuple[list[dict], str, str]:
    """`mace trace --count 6 -f jsonl` on container 0 while it pings the peer 3 times: the
    reports, the discovery line and all of stderr."""
    c = tb.containers[0]
    spec = tb.ns_path(c.ns)
    proc = subprocess.Popen([sys.executable, "-m", "mace", "trace", "--netns", spec,
                             "--count", str(2 * PINGS), "-f", "jsonl", *RING],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, encoding="utf-8", errors="replace")
    try:
        err = Lines(proc.stderr)
        out = Lines(proc.stdout, err.cond)
        line = err.wait(lambda ls: next((x for x in ls if DISCOVERY.match(x)), None), WAIT, proc)
        if line is None:
            pytest.fail("no discovery line on stderr:\n" + err.text())
        time.sleep(SETTLE)
        ping3(tb, c)
        rc = finish(proc, WAIT, lambda: f"mace did not end after {2 * PINGS} reports; stdout:\n"
                                        f"{out.text()}\nstderr:\n{err.text()}")
        err.join()
        out.join()
        assert rc == 0, err.text()
        return [json.loads(x) for x in out.lines], line, err.text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("kw", [
    {"topology": "routed", "masquerade": True, "peer_dev": "eth0"},
    {"topology": "bridge", "masquerade": True, "peer_dev": "eth0"},
], ids=["routed-masquerade-peer-eth0", "bridge-masquerade-peer-eth0"])
def test_trace_reports_each_ping_once_each_way(testbed_factory, kw):
    tb = testbed_factory(**kw)
    c = tb.containers[0]
    reports, line, err = trace_pings(tb)
    m = DISCOVERY.match(line)
    assert m.groups()[2:] == (c.inner, c.veth, tb.bridge, tb.uplink), line
    for d in ("egress", "ingress"):
        mine = [r for r in reports if r["dir"] == d]
        assert [r["seq"] for r in mine] == list(range(1, PINGS + 1)), (d, reports, err)
        assert all(r["latency_ns"] > 0 and r["netns"] == inode_of(tb, c) for r in mine), mine
    assert len(reports) == 2 * PINGS, reports

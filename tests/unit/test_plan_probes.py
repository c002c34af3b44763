"""The tracepoints a Plan opens and the exact in-kernel filter text of each, for given
containers, uplink and options, with the tracepoint formats captured in
mace/testing/formats (no tracefs, no privileges)."""

from __future__ import annotations

import random
import re
from importlib import resources

import pytest

from mace.capture.tracefs import parse_format
from mace.correlate import _correlate
from mace.plan import FREE, QUEUE, RECV, ROUTE, RX, XMIT, ContainerPath, Plan, tracepoints

FORMATS_DIR = resources.files("mace.testing").joinpath("formats")


def captured(qualified: str):
    system, _, name = qualified.partition(":")
    return parse_format(FORMATS_DIR.joinpath(f"{system}_{name}.format").read_text(), system)


FORMATS = {tp: captured(tp) for tp in (XMIT, RECV, QUEUE, FREE, RX, ROUTE)}
NO_SOCKET = FORMATS[FREE].symbol("reason", "NO_SOCKET")


def names(*devs) -> str:
    return " || ".join(f'name == "{d}"' for d in devs)


def filters(plan: Plan, formats=FORMATS) -> dict[str, str | None]:
    probes = plan.probes(formats)
    assert len({p.tracepoint for p in probes}) == len(probes)
    return {p.tracepoint: p.filter_text() for p in probes}


WEB = ContainerPath("web", "eth0", "veth1a", "br0")
DB = ContainerPath("db", "eth0", "veth2b", "br0")
SOLO = ContainerPath("solo", "ens1", "vsolo", None)


def Inner(*args, end_at_queue=False, **kw) -> Plan:
    """The original plan: egress from the container's inner device (start_at_veth=False) to
    the uplink's driver, unless end_at_queue is asked for."""
    return Plan(*args, start_at_veth=False, end_at_queue=end_at_queue, **kw)


def test_the_captured_kernel_names_no_socket():
    assert isinstance(NO_SOCKET, int)


def test_one_container_behind_a_bridge():
    assert filters(Inner([WEB], "up0")) == {
        XMIT: names("eth0", "veth1a", "up0"),
        RECV: names("up0", "veth1a", "eth0"),
        QUEUE: names("up0"),
        FREE: f"reason != {NO_SOCKET}",
    }


def test_probes_come_in_kind_order():
    assert [p.tracepoint for p in Inner([WEB], "up0").probes(FORMATS)] == [XMIT, RECV, QUEUE, FREE]
    assert [p.tracepoint for p in Inner([WEB], "up0", hops=True).probes(FORMATS)] == \
        [XMIT, RECV, QUEUE, FREE, RX, ROUTE]
    assert tracepoints(False) == [XMIT, RECV, QUEUE, FREE, RX]
    assert tracepoints(True) == [XMIT, RECV, QUEUE, FREE, RX, ROUTE]


def test_hops_add_the_bridge_and_the_backlog():
    assert filters(Inner([WEB], "up0", hops=True)) == {
        XMIT: names("eth0", "veth1a", "br0", "up0"),
        RECV: names("up0", "veth1a", "eth0", "br0"),
        QUEUE: names("up0"),
        FREE: f"reason != {NO_SOCKET}",
        RX: names("veth1a", "eth0"),
        # the forward lookup to the uplink (not an output one: input loopback), a route to the bridge
        ROUTE: '(((name == "up0") && iif != 1) || name == "br0") && (err == 0)',
    }


def test_the_route_filter_leaves_the_hosts_own_lookups_out_by_their_input():
    plan = Plan([WEB, SOLO], "up0", hops=True, extra_uplinks=("wg0",), uplink_indexes=(7, 9))
    assert filters(plan)[ROUTE] == ('(((name == "up0" || name == "wg0") && iif != 1 && iif != 7 && iif != 9)'
                                    ' || name == "br0" || name == "vsolo") && (err == 0)')
    assert plan.rebased(plan).uplink_indexes == (7, 9)
    assert ROUTE not in filters(Plan([WEB], "up0"))


def test_end_at_queue_leaves_the_uplink_out_of_xmit():
    f = filters(Inner([WEB], "up0", end_at_queue=True))
    assert f[XMIT] == names("eth0", "veth1a")
    assert f[RECV] == names("up0", "veth1a", "eth0")
    assert f[QUEUE] == names("up0")


def test_containers_sharing_an_inner_name_and_a_bridge_name_each_device_once():
    f = filters(Inner([WEB, DB], "up0", hops=True))
    assert f[XMIT] == names("eth0", "veth1a", "veth2b", "br0", "up0")
    assert f[RECV] == names("up0", "veth1a", "veth2b", "eth0", "br0")
    assert f[RX] == names("veth1a", "veth2b", "eth0")


def test_without_a_bridge_and_with_other_inner_names():
    f = filters(Inner([WEB, SOLO], "enp3s0", hops=True))
    assert f[XMIT] == names("eth0", "ens1", "veth1a", "vsolo", "br0", "enp3s0")
    assert f[RECV] == names("enp3s0", "veth1a", "vsolo", "eth0", "ens1", "br0")
    assert f[RX] == names("veth1a", "vsolo", "eth0", "ens1")


def test_unused_indexes_are_not_traced():
    f = filters(Inner([None, SOLO, None], "up0"))
    assert f[XMIT] == names("ens1", "vsolo", "up0")
    assert f[RECV] == names("up0", "vsolo", "ens1")


def test_kfree_skb_is_unfiltered_without_formats():
    f = filters(Inner([WEB], "up0"), formats=None)
    assert f[FREE] is None
    assert f[XMIT] == names("eth0", "veth1a", "up0")


def test_kfree_skb_is_unfiltered_when_the_kernel_has_no_no_socket_reason():
    # an older kernel's kfree_skb has no `reason` field
    old = parse_format("""name: kfree_skb
ID: 1500
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:void * location;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned short protocol;\toffset:24;\tsize:2;\tsigned:0;

print fmt: "skbaddr=%p protocol=%u location=%p", REC->skbaddr, REC->protocol, REC->location
""", "skb")
    assert filters(Inner([WEB], "up0"), formats={FREE: old})[FREE] is None


def test_filter_text_joins_devices_and_condition():
    from mace.capture.perf import Probe
    assert Probe(XMIT).filter_text() is None
    assert Probe(XMIT, devices=("a",)).filter_text() == 'name == "a"'
    assert Probe(XMIT, devices=("a", "b"), condition="len > 100").filter_text() == \
        '(name == "a" || name == "b") && (len > 100)'
    assert Probe(FREE, condition="reason != 3").filter_text() == "reason != 3"


def test_every_filtered_field_is_in_the_captured_format():
    for p in Inner([WEB, DB], "up0", hops=True).probes(FORMATS):
        if p.devices:
            assert "name" in FORMATS[p.tracepoint].fields, p.tracepoint
    assert "reason" in FORMATS[FREE].fields
    assert {"iif", "err", "name"} <= set(FORMATS[ROUTE].fields)


def test_the_socket_segment_samples_datagram_receives_of_the_containers_cgroups_only():
    web, db = (ContainerPath(c.label, c.inner, c.veth, c.bridge, f"/cg/{c.label}") for c in (WEB, DB))
    probes = {p.tracepoint: p for p in Plan([web, db], "up0", segment="socket").probes(FORMATS)}
    recv, ready = probes["sock:sock_recv_length"], probes["sock:sk_data_ready"]
    assert recv.cgroups == ("/cg/web", "/cg/db") and not ready.cgroups
    # a stream's data_ready and receives (and unix or netlink sockets') are never sampled
    datagrams = "(family == 2 || family == 10) && protocol != 6 && protocol != 132 && protocol != 262"
    assert ready.filter_text() == datagrams
    # nor a receive that took none (EAGAIN of a spinning ping), peeked, or read the error queue
    assert recv.filter_text() == f"{datagrams} && ret >= 0 && !(flags & 8194)"
    fields = {tp: set(captured(tp).fields) for tp in ("sock:sock_recv_length", "sock:sk_data_ready")}
    assert all({"family", "protocol"} <= f for f in fields.values())
    assert all(p.cgroups == recv.cgroups for tp, p in probes.items() if tp.startswith("syscalls:"))


@pytest.mark.parametrize("bad", [
    dict(containers=[], uplink="up0"),
    dict(containers=[None], uplink="up0"),
    dict(containers=[WEB, ContainerPath("x", "eth1", "veth1a")], uplink="up0"),
    dict(containers=[WEB], uplink="veth1a"),
])
def test_plans_that_cannot_be_traced_are_refused(bad):
    with pytest.raises(ValueError):
        Plan(bad["containers"], bad["uplink"])


def test_by_default_egress_runs_from_the_veth_to_the_uplink_queue():
    # no inner xmit is sampled (another container's egress never passes the filter), and
    # the uplink's driver neither: the segment ends where native traffic joins the path
    assert filters(Plan([WEB, DB], "up0")) == {
        XMIT: names("veth1a", "veth2b"),
        RECV: names("up0", "veth1a", "veth2b", "eth0"),
        QUEUE: names("up0"),
        FREE: f"reason != {NO_SOCKET}",
        RX: names("veth1a", "veth2b"),
    }
    assert filters(Plan([WEB], "up0", hops=True))[RX] == names("veth1a", "eth0")
    assert filters(Plan([WEB], "up0", hops=True))[XMIT] == names("veth1a", "br0")
    assert filters(Plan([WEB], "up0", end_at_queue=False))[XMIT] == names("veth1a", "up0")


def test_the_start_is_part_of_a_plans_shape():
    assert not Plan([WEB], "up0").same_shape(Inner([WEB], "up0"))
    assert Plan([WEB], "up0").rebased(Plan([DB], "up0")).start_at_veth


def test_every_uplink_is_traced_and_read_as_one():
    p = Plan([WEB], "up0", extra_uplinks=("wg0", "up0", "wg0"))
    assert p.uplinks == ("up0", "wg0")                   # once each, the named one first
    f = filters(p)
    assert f[QUEUE] == names("up0", "wg0") and f[RECV] == names("up0", "wg0", "veth1a", "eth0")
    assert filters(Plan([WEB], "up0", end_at_queue=False, extra_uplinks=("wg0",)))[XMIT] == \
        names("veth1a", "up0", "wg0")
    classes, _ = p.device_classes()
    uplink = _correlate.CLASSES["uplink"]
    assert [bool(c & uplink) for c in classes] == [n in ("up0", "wg0") for n in p.devices]
    assert not p.same_shape(Plan([WEB], "up0"))
    assert p.rebased(Plan([DB], "up0", extra_uplinks=("wg0",))).uplinks == ("up0", "wg0")
    with pytest.raises(ValueError):
        Plan([WEB], "up0", extra_uplinks=("veth1a",))


# -- many containers: filters split over events, veths by a prefix they share ----------------

from mace.capture.perf import FILTER_MAX, Capture, Probe  # noqa: E402
from mace.plan import GLOB_FROM, veth_prefixes  # noqa: E402

TERM = re.compile(r'name (==|~) "([^"]*)"')


def passes(text: str | None, dev: str) -> bool:
    """Whether a filter of Probe.filters() passes a hit on `dev`, as the kernel reads it: an
    OR of `name == "x"` and `name ~ "p*"` (a condition on other fields is taken to hold)."""
    if text is None:
        return True
    names = text.split(") && (")[0].lstrip("(") if ") && (" in text else text
    return any(dev == v if op == "==" else dev.startswith(v.rstrip("*"))
               for op, v in TERM.findall(names))


def docker(n: int, seed: int = 1) -> list[ContainerPath]:
    """n containers as Docker names them: eth0 inside, veth<7 hex> on the host, docker0."""
    rng = random.Random(seed)
    veths = set()
    while len(veths) < n:
        veths.add(f"veth{rng.getrandbits(28):07x}")
    return [ContainerPath(f"c{i}", "eth0", v, "docker0") for i, v in enumerate(sorted(veths))]


def unlike(n: int) -> list[ContainerPath]:
    """n containers whose veths share no beginning (no prefix can stand for them)."""
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return [ContainerPath(f"c{i}", "eth0",
                          f"{alphabet[i % 36]}{alphabet[i // 36 % 36]}{alphabet[i // 1296]}xvth{i:04d}", "br0")
            for i in range(n)]


def check_events(probe: Probe, others=()) -> list[str | None]:
    """The probe's filters fit the kernel's page, and together pass each of its devices
    through exactly one event and no other device of the plan through any."""
    texts = probe.filters()
    assert all(t is None or len(t) <= FILTER_MAX for t in texts), [len(t or "") for t in texts]
    for dev in probe.devices:
        assert sum(passes(t, dev) for t in texts) == 1, (probe.tracepoint, dev)
    for dev in others:
        assert not any(passes(t, dev) for t in texts), (probe.tracepoint, dev)
    return texts


@pytest.mark.parametrize("hops", [False, True])
@pytest.mark.parametrize("start_at_veth", [True, False])
def test_500_docker_containers_are_filtered_by_their_veth_prefix(hops, start_at_veth):
    plan = Plan(docker(500), "ens5", hops=hops, start_at_veth=start_at_veth)
    known = [d for d in plan.devices if d]
    for p in plan.probes(FORMATS):
        others = [d for d in known if d not in p.devices and d not in p.extra_devices]
        texts = check_events(p, others)
        if any(d.startswith("veth") for d in p.devices):
            assert p.prefixes == ("veth",) and len(texts) == 1, (p.tracepoint, texts)
            assert texts[0].startswith('name ~ "veth*"')
        # the exact devices stay the probe's: the decoder's slots and a handover's idea of
        # what this capture traced (Tracer.update) are the names, not the glob
        assert len(p.devices) == len(set(p.devices))
    if RX in filters(plan):
        assert set(filters(plan)[RX].split(" || ")) == {'name ~ "veth*"', *(['name == "eth0"'] if hops else [])}


def test_500_containers_without_a_shared_prefix_are_split_over_events():
    plan = Plan(unlike(500), "ens5", hops=True)
    known = [d for d in plan.devices if d]
    for p in plan.probes(FORMATS):
        assert p.prefixes == ()
        texts = check_events(p, [d for d in known if d not in p.devices and d not in p.extra_devices])
        if len(p.devices) >= 500:
            # a page holds 160 names of 11 characters: 500 veths and a few more need 4 events
            assert len(texts) == 4, (p.tracepoint, [len(t) for t in texts])
            assert all(len(t) > FILTER_MAX - 30 for t in texts[:-1])     # each filled up first
    xmit = next(p for p in plan.probes(FORMATS) if p.tracepoint == XMIT)
    assert Capture(plan.probes(FORMATS), plan.devices, cpus=[0, 1]).events_per_cpu == \
        sum(len(p.filters()) for p in plan.probes(FORMATS)) == 4 * 3 + 2 + 1     # the route: one event
    # in the plan's order: each event a run of consecutive names
    joined = " || ".join(xmit.filters())
    assert joined == xmit.filter_text()


def test_split_filters_keep_their_condition_in_every_event():
    devs = tuple(f"dev{i:04d}" for i in range(400))
    p = Probe(RECV, devices=devs, condition="len > 100")
    texts = check_events(p)
    assert len(texts) == 3 and all(t.endswith(") && (len > 100)") and t.startswith("(") for t in texts)
    assert Probe(FREE, condition="reason != 3").filters() == ["reason != 3"]
    assert Probe(FREE).filters() == [None]


def test_the_same_containers_are_traced_the_same_way_below_and_above_the_glob_threshold():
    few, many = docker(GLOB_FROM - 1), docker(GLOB_FROM)
    assert all(p.prefixes == () for p in Plan(few, "ens5").probes(FORMATS))
    assert all(p.prefixes == ("veth",) for p in Plan(many, "ens5").probes(FORMATS) if p.tracepoint in (XMIT, RX))


def test_a_prefix_is_not_used_where_it_would_pass_a_device_the_probe_must_not_sample():
    # the uplink shares the veths' prefix: xmit (ending at the uplink's queue) does not
    # trace the uplink, so no glob there; receive traces it anyway, so the glob stays
    plan = Plan(docker(100), "vethup0")
    probes = {p.tracepoint: p for p in plan.probes(FORMATS)}
    assert probes[XMIT].prefixes == () and len(probes[XMIT].filters()) == 1      # 100 names fit a page
    assert probes[RECV].prefixes == ("veth",)
    assert not probes[RECV].terms().count('name == "vethup0"')      # covered by the glob
    check_events(probes[XMIT], ["vethup0", "docker0", "eth0"])
    check_events(probes[RECV], ["docker0"])
    # the bridge too: without hops xmit never samples it
    plan = Plan([ContainerPath(c.label, c.inner, c.veth, "vethbr") for c in docker(100)], "ens5")
    assert next(p for p in plan.probes(FORMATS) if p.tracepoint == XMIT).prefixes == ()


def test_veth_prefixes_group_by_beginning_and_take_the_longest_shared_prefix():
    tb = [f"m1a2b3v{i}" for i in range(40)]          # the testbed's veths
    cali = [f"cali{i:011x}" for i in range(33)]
    few = [f"lxc{i:05d}" for i in range(5)]
    assert veth_prefixes(tb + cali + few) == ("m1a2b3v", "cali" + "0" * 9)   # up to 0x20
    assert veth_prefixes(tb, exclude=["m1a2b3v-up"]) == ()
    assert veth_prefixes(tb, least=41) == ()
    # names a glob could not match literally stay exact
    assert veth_prefixes([f"v[th{i}" for i in range(40)]) == ()


def test_probe_prefixes_must_be_plain_and_disjoint():
    for bad in (("veth*",), ("",), ('ve"th',), ("veth", "vet"), ("a b",)):
        with pytest.raises(ValueError):
            Probe(XMIT, devices=("veth1",), prefixes=bad)
    p = Probe(XMIT, devices=("veth1", "vexh2", "eth0"), prefixes=("veth", "vex"))
    assert p.filter_text() == 'name ~ "veth*" || name ~ "vex*" || name == "eth0"'
    assert p.covered("veth1") and not p.covered("eth0")


def test_a_rebased_plan_of_many_containers_keeps_its_filters_exact_for_the_handover():
    plan = Plan(docker(300), "ens5")
    smaller = Plan([None, *plan.containers[1:]], "ens5").rebased(plan)
    for p in smaller.probes(FORMATS):
        check_events(p, ["ens5"] if p.tracepoint != RECV and p.tracepoint != QUEUE else [])
        if p.tracepoint == RX:
            # the first container's veth is out of the exact list (it decodes as DEV_OTHER,
            # though the glob still samples it)
            assert plan.containers[0].veth not in p.devices and len(p.devices) == 299

"""The tracepoints a Plan opens and the exact in-kernel filter text of each, for given
containers, uplink and options, with the tracepoint formats captured in
mace/testing/formats (no tracefs, no privileges)."""

from __future__ import annotations

from importlib import resources

import pytest

from mace.capture.tracefs import parse_format
from mace.correlate import _correlate
from mace.plan import FREE, QUEUE, RECV, RX, XMIT, ContainerPath, Plan, tracepoints

FORMATS_DIR = resources.files("mace.testing").joinpath("formats")


def captured(qualified: str):
    system, _, name = qualified.partition(":")
    return parse_format(FORMATS_DIR.joinpath(f"{system}_{name}.format").read_text(), system)


FORMATS = {tp: captured(tp) for tp in (XMIT, RECV, QUEUE, FREE, RX)}
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
        [XMIT, RECV, QUEUE, FREE, RX]
    assert tracepoints(False) == tracepoints(True) == [XMIT, RECV, QUEUE, FREE, RX]


def test_hops_add_the_bridge_and_the_backlog():
    assert filters(Inner([WEB], "up0", hops=True)) == {
        XMIT: names("eth0", "veth1a", "br0", "up0"),
        RECV: names("up0", "veth1a", "eth0", "br0"),
        QUEUE: names("up0"),
        FREE: f"reason != {NO_SOCKET}",
        RX: names("veth1a", "eth0"),
    }


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

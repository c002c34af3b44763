"""tracefs format parsing and the kernel layouts mace derives from it (no privileges)."""

from __future__ import annotations

import dataclasses
import itertools
from importlib import resources

import pytest

from mace.capture.perf import kind_layout
from mace.capture.tracefs import EventFormat, Field, parse_format
from mace.errors import MaceError, TracepointMissing
from mace.testing.synthetic import builtin_format

FORMAT_DIR = resources.files("mace.testing").joinpath("formats")
FORMAT_FILES = sorted(p.name for p in FORMAT_DIR.iterdir() if p.name.endswith(".format"))

COMMON = {
    "common_type": ("unsigned short", 0, 2, False),
    "common_flags": ("unsigned char", 2, 1, False),
    "common_preempt_count": ("unsigned char", 3, 1, False),
    "common_pid": ("int", 4, 4, True),
}

# file -> (system, name, id, {field: (offset, size, signed, data_loc)}, fixed size)
EXPECTED = {
    "net_napi_gro_receive_entry.format": ("net", "napi_gro_receive_entry", 2300, {
        "name": (8, 4, False, True), "napi_id": (12, 4, False, False),
        "skbaddr": (24, 8, False, False), "protocol": (38, 2, False, False),
        "len": (52, 4, False, False), "mac_header": (68, 4, True, False),
        "gso_type": (76, 2, False, False)}, 78),
    "net_net_dev_queue.format": ("net", "net_dev_queue", 2304, {
        "skbaddr": (8, 8, False, False), "len": (16, 4, False, False),
        "name": (20, 4, False, True)}, 24),
    "net_net_dev_start_xmit.format": ("net", "net_dev_start_xmit", 2307, {
        "name": (8, 4, False, True), "queue_mapping": (12, 2, False, False),
        "skbaddr": (16, 8, False, False), "vlan_tagged": (24, 1, False, False),
        "protocol": (30, 2, False, False), "len": (36, 4, False, False),
        "network_offset": (44, 4, True, False), "transport_offset": (52, 4, True, False),
        "gso_type": (62, 2, False, False)}, 64),
    "net_net_dev_xmit.format": ("net", "net_dev_xmit", 2306, {
        "skbaddr": (8, 8, False, False), "len": (16, 4, False, False),
        "rc": (20, 4, True, False), "name": (24, 4, False, True)}, 28),
    "net_netif_receive_skb.format": ("net", "netif_receive_skb", 2303, {
        "skbaddr": (8, 8, False, False), "len": (16, 4, False, False),
        "name": (20, 4, False, True)}, 24),
    "net_netif_receive_skb_entry.format": ("net", "netif_receive_skb_entry", 2299, {
        "name": (8, 4, False, True), "skbaddr": (24, 8, False, False),
        "protocol": (38, 2, False, False), "len": (52, 4, False, False)}, 78),
    "net_netif_rx.format": ("net", "netif_rx", 2302, {
        "skbaddr": (8, 8, False, False), "len": (16, 4, False, False),
        "name": (20, 4, False, True)}, 24),
    "net_netif_rx_entry.format": ("net", "netif_rx_entry", 2297, {
        "name": (8, 4, False, True), "skbaddr": (24, 8, False, False),
        "protocol": (38, 2, False, False), "len": (52, 4, False, False)}, 78),
    "skb_consume_skb.format": ("skb", "consume_skb", 2309, {
        "skbaddr": (8, 8, False, False), "location": (16, 8, False, False)}, 24),
    "skb_kfree_skb.format": ("skb", "kfree_skb", 2310, {
        "skbaddr": (8, 8, False, False), "location": (16, 8, False, False),
        "rx_sk": (24, 8, False, False), "protocol": (32, 2, False, False),
        "reason": (36, 4, False, False)}, 40),
    "skb_skb_copy_datagram_iovec.format": ("skb", "skb_copy_datagram_iovec", 2308, {
        "skbaddr": (8, 8, False, False), "len": (16, 4, True, False)}, 20),
    "fib_fib_table_lookup.format": ("fib", "fib_table_lookup", 2264, {
        "tb_id": (8, 4, False, False), "err": (12, 4, True, False), "oif": (16, 4, True, False),
        "iif": (20, 4, True, False), "name": (60, 16, False, False)}, 76),
    # the socket segment's: a socket's queue and receives, the send calls
    "sock_sk_data_ready.format": ("sock", "sk_data_ready", 2285, {
        "skaddr": (8, 8, False, False), "family": (16, 2, False, False), "protocol": (18, 2, False, False),
        "ip": (24, 8, False, False)}, 32),
    "sock_sock_recv_length.format": ("sock", "sock_recv_length", 2283, {
        "sk": (8, 8, False, False), "family": (16, 2, False, False), "protocol": (18, 2, False, False),
        "ret": (20, 4, True, False), "flags": (24, 4, True, False)}, 28),
    **{f"syscalls_sys_enter_{c}.format": ("syscalls", f"sys_enter_{c}", tp, {
        "__syscall_nr": (8, 4, True, False), "fd": (16, 8, False, False)}, size)
       for c, tp, size in (("sendmmsg", 2212, 48), ("sendmsg", 2214, 40), ("sendto", 2224, 64),
                           ("write", 840, 40), ("writev", 832, 40))},
    **{f"syscalls_sys_exit_{c}.format": ("syscalls", f"sys_exit_{c}", tp, {
        "__syscall_nr": (8, 4, True, False), "ret": (16, 8, True, False)}, 24)
       for c, tp in (("sendmmsg", 2211), ("sendmsg", 2213), ("sendto", 2223), ("write", 839),
                     ("writev", 831))},
}


def _parse_file(fname: str) -> EventFormat:
    system = EXPECTED[fname][0]
    return parse_format(FORMAT_DIR.joinpath(fname).read_text(), system)


def test_every_captured_format_is_covered():
    assert FORMAT_FILES == sorted(EXPECTED)


@pytest.mark.parametrize("fname", FORMAT_FILES)
def test_parse_captured_format(fname):
    system, name, ev_id, fields, size = EXPECTED[fname]
    fmt = _parse_file(fname)
    assert (fmt.system, fmt.name, fmt.id) == (system, name, ev_id)
    assert fmt.qualified == f"{system}:{name}"
    assert fmt.size == size
    for fname_, (ctype, off, sz, signed) in COMMON.items():
        f = fmt.fields[fname_]
        assert (f.ctype, f.offset, f.size, f.signed, f.data_loc) == (ctype, off, sz, signed, False)
    for fname_, (off, sz, signed, data_loc) in fields.items():
        f = fmt.fields[fname_]
        assert f.name == fname_
        assert (f.offset, f.size, f.signed, f.data_loc) == (off, sz, signed, data_loc), fname_
    # every field lies inside the fixed part, and no two fields overlap
    spans = sorted((f.offset, f.offset + f.size) for f in fmt.fields.values())
    for (_, a1), (b0, _) in itertools.pairwise(spans):
        assert a1 <= b0
    assert spans[-1][1] == fmt.size
    # the file name and builtin_format agree with the parse
    assert builtin_format(fmt.qualified) == fmt


@pytest.mark.parametrize("fname", FORMAT_FILES)
def test_name_field_is_a_data_loc_string(fname):
    fmt = _parse_file(fname)
    if fname.startswith(("skb_", "sock_", "syscalls_")):
        assert "name" not in fmt.fields
        return
    name = fmt.fields["name"]
    if fname.startswith("fib_"):       # the one exception: the route's device, in place
        assert not name.data_loc and name.ctype == "char" and name.size == 16
        return
    assert name.data_loc and name.is_string
    assert name.ctype == "char[]"
    assert name.size == 4 and not name.signed
    # no other field of the captured formats is a __data_loc
    assert [f.name for f in fmt.fields.values() if f.data_loc] == ["name"]


def test_field_ctypes():
    fmt = builtin_format("net:net_dev_start_xmit")
    assert fmt.fields["skbaddr"].ctype == "const void *"
    assert fmt.fields["protocol"].ctype == "u16"
    assert fmt.fields["len"].ctype == "unsigned int"
    assert not fmt.fields["len"].is_string
    kfree = builtin_format("skb:kfree_skb")
    assert kfree.fields["reason"].ctype == "enum skb_drop_reason"
    assert kfree.fields["skbaddr"].ctype == "void *"


SYNTH = """name: fake_event
ID: 4242
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:char name[16];\toffset:8;\tsize:16;\tsigned:0;
\tfield:const void * skbaddr;\toffset:24;\tsize:8;\tsigned:0;
\tfield:u8 mac[ETH_ALEN];\toffset:32;\tsize:6;\tsigned:0;
\tfield:__data_loc u8[] data;\toffset:40;\tsize:4;\tsigned:0;
\tfield:s16 delta;\toffset:44;\tsize:2;\tsigned:1;

print fmt: "name=%s", REC->name
"""


def test_array_fields():
    fmt = parse_format(SYNTH, "fake")
    assert (fmt.system, fmt.name, fmt.id) == ("fake", "fake_event", 4242)
    name = fmt.fields["name"]
    assert (name.ctype, name.offset, name.size, name.signed, name.data_loc) == ("char", 8, 16, False, False)
    assert not name.is_string
    mac = fmt.fields["mac"]
    assert (mac.ctype, mac.offset, mac.size, mac.data_loc) == ("u8", 32, 6, False)
    data = fmt.fields["data"]
    assert (data.ctype, data.offset, data.size, data.data_loc) == ("u8[]", 40, 4, True)
    assert not data.is_string           # a __data_loc, but not of chars
    assert fmt.fields["delta"].signed
    assert fmt.size == 46
    assert set(fmt.fields) == {*COMMON, "name", "skbaddr", "mac", "data", "delta"}


def test_field_lines_with_spaces_and_tabs():
    text = ("name: x\nID: 7\nformat:\n"
            "  field:unsigned long   ptr ;  offset:8;   size:8;  signed:0;\n"
            "\tfield:int *p;\toffset:16;\tsize:8;\tsigned:0;\n")
    fmt = parse_format(text)
    assert fmt.fields["ptr"].offset == 8 and fmt.fields["ptr"].ctype == "unsigned long"
    assert fmt.fields["p"].ctype == "int *" and fmt.fields["p"].size == 8


def test_no_fields_means_header_only_size():
    fmt = parse_format("name: bare\nID: 1\nformat:\n")
    assert fmt.fields == {} and fmt.size == 8 and fmt.id == 1


@pytest.mark.parametrize("text", [
    "",
    "format:\n\tfield:int x;\toffset:8;\tsize:4;\tsigned:1;\n",
    "name: foo\nformat:\n",                 # no ID
    "ID: 12\nformat:\n",                    # no name
    "name: foo\nID: twelve\n",              # ID not a number
    "name: foo\nID:\n",
    "this is not a format file\n",
])
def test_malformed_input_raises_value_error(text):
    with pytest.raises(ValueError):
        parse_format(text, "net")


def test_garbage_field_lines_are_ignored():
    text = "name: foo\nID: 3\nformat:\n\tfield:int x;\toffset:eight;\tsize:4;\tsigned:1;\n"
    assert parse_format(text).fields == {}


# -- kind_layout -------------------------------------------------------------------------------

LAYOUTS = {
    "net:net_dev_start_xmit": dict(tp_id=2307, skb_off=16, len_off=36, name_off=8, proto_off=30, min_raw=64),
    "net:netif_receive_skb": dict(tp_id=2303, skb_off=8, len_off=16, name_off=20, proto_off=-1, min_raw=24),
    "net:netif_rx": dict(tp_id=2302, skb_off=8, len_off=16, name_off=20, proto_off=-1, min_raw=24),
    "net:net_dev_queue": dict(tp_id=2304, skb_off=8, len_off=16, name_off=20, proto_off=-1, min_raw=24),
    "net:net_dev_xmit": dict(tp_id=2306, skb_off=8, len_off=16, name_off=24, proto_off=-1, min_raw=28),
    "net:netif_receive_skb_entry": dict(tp_id=2299, skb_off=24, len_off=52, name_off=8, proto_off=38, min_raw=78),
    "net:netif_rx_entry": dict(tp_id=2297, skb_off=24, len_off=52, name_off=8, proto_off=38, min_raw=78),
    "net:napi_gro_receive_entry": dict(tp_id=2300, skb_off=24, len_off=52, name_off=8, proto_off=38, min_raw=78),
    "skb:kfree_skb": dict(tp_id=2310, skb_off=8, len_off=-1, name_off=-1, proto_off=32, min_raw=40),
    "skb:consume_skb": dict(tp_id=2309, skb_off=8, len_off=-1, name_off=-1, proto_off=-1, min_raw=24),
    "skb:skb_copy_datagram_iovec": dict(tp_id=2308, skb_off=8, len_off=16, name_off=-1, proto_off=-1, min_raw=20),
}
for _layout in LAYOUTS.values():
    _layout["name_size"] = 0
# the routing decision: no skb, the route's device a char array in place
LAYOUTS["fib:fib_table_lookup"] = dict(tp_id=2264, skb_off=-1, len_off=-1, name_off=60, proto_off=-1,
                                       min_raw=76, name_size=16)
# a socket's events are keyed by it; a receive's length is what it returned, its flags (the low
# 16 bits of an int) ride where a protocol would
LAYOUTS["sock:sk_data_ready"] = dict(tp_id=2285, skb_off=8, len_off=-1, name_off=-1, proto_off=18,
                                     min_raw=32, name_size=0)
LAYOUTS["sock:sock_recv_length"] = dict(tp_id=2283, skb_off=8, len_off=20, name_off=-1, proto_off=24,
                                        min_raw=28, name_size=0)
# a system call: none of them (a sendto's len is its caller's buffer)
for _sys, _tp, _size in (("enter_sendmmsg", 2212, 48), ("enter_sendmsg", 2214, 40), ("enter_sendto", 2224, 64),
                         ("enter_write", 840, 40), ("enter_writev", 832, 40), ("exit_sendmmsg", 2211, 24),
                         ("exit_sendmsg", 2213, 24), ("exit_sendto", 2223, 24), ("exit_write", 839, 24),
                         ("exit_writev", 831, 24)):
    LAYOUTS[f"syscalls:sys_{_sys}"] = dict(tp_id=_tp, skb_off=-1, len_off=-1, name_off=-1, proto_off=-1,
                                          min_raw=_size, name_size=0)


def test_layouts_cover_every_captured_format():
    assert sorted(f"{s}:{n}" for s, n, *_ in EXPECTED.values()) == sorted(LAYOUTS)


@pytest.mark.parametrize("tp", sorted(LAYOUTS))
def test_kind_layout(tp):
    assert kind_layout(builtin_format(tp)) == LAYOUTS[tp]


def test_kind_layout_is_accepted_by_rings():
    from mace.capture._ring import Rings
    rings = Rings(cpus=[0], ring_pages=1, reorder_ns=0)
    kinds = [rings.add_kind(**LAYOUTS[tp]) for tp in sorted(LAYOUTS)]
    assert kinds == list(range(len(LAYOUTS)))
    with pytest.raises(ValueError):
        rings.add_kind(**LAYOUTS["net:netif_rx"])       # same tracepoint id twice
    rings.close()


def _fmt(*fields: str, name: str = "ev", ev_id: int = 99) -> EventFormat:
    lines = [f"name: {name}", f"ID: {ev_id}", "format:",
             "\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;",
             "\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;",
             "\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;",
             "\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;", ""]
    lines += [f"\t{f}" for f in fields]
    return parse_format("\n".join(lines) + "\n", "test")


def test_missing_skbaddr_raises_tracepoint_missing():
    fmt = _fmt("field:unsigned int len;\toffset:8;\tsize:4;\tsigned:0;")
    with pytest.raises(TracepointMissing) as exc:
        kind_layout(fmt)
    assert "skbaddr" in str(exc.value) and "test:ev" in str(exc.value)
    assert exc.value.hint
    assert isinstance(exc.value, MaceError) and exc.value.exit_code == 5


def test_field_lookup_of_missing_field_raises_tracepoint_missing():
    fmt = builtin_format("skb:consume_skb")
    assert fmt.field("skbaddr") == fmt.fields["skbaddr"]
    with pytest.raises(TracepointMissing, match="name"):
        fmt.field("name")


def test_optional_fields_may_be_missing():
    fmt = _fmt("field:void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;")
    assert kind_layout(fmt) == dict(tp_id=99, skb_off=8, len_off=-1, name_off=-1, proto_off=-1, min_raw=16,
                                    name_size=0)


@pytest.mark.parametrize("fields", [
    # skbaddr of the wrong size (a 32-bit kernel)
    ("field:void * skbaddr;\toffset:8;\tsize:4;\tsigned:0;",),
    # len of the wrong size
    ("field:void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;",
     "field:unsigned long len;\toffset:16;\tsize:8;\tsigned:0;"),
    # protocol of the wrong size
    ("field:void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;",
     "field:u32 protocol;\toffset:16;\tsize:4;\tsigned:0;"),
    # name as a fixed char array (older kernels): not a __data_loc
    ("field:void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;",
     "field:char name[16];\toffset:16;\tsize:16;\tsigned:0;"),
    # name of the right size but not a __data_loc
    ("field:void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;",
     "field:unsigned int name;\toffset:16;\tsize:4;\tsigned:0;"),
])
def test_unsupported_layouts_raise_tracepoint_missing(fields):
    with pytest.raises(TracepointMissing):
        kind_layout(_fmt(*fields))


def test_field_dataclass_is_frozen():
    f = Field("x", "int", 8, 4, True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.offset = 12  # type: ignore[misc]

"""The pcap reader on files built here: both timestamp precisions and byte orders, the link
types tcpdump writes, and the records a cross-check must not misread."""

from __future__ import annotations

import socket
import struct
import time

import pytest

from mace.testing import pcap


def icmp_ip(typ: int, ident: int, seq: int, src="198.18.0.10", dst="198.19.0.2", frag=0) -> bytes:
    icmp = struct.pack("!BBHHH", typ, 0, 0, ident, seq) + b"x" * 56
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 1, frag, 64, socket.IPPROTO_ICMP, 0,
                       socket.inet_aton(src), socket.inet_aton(dst)) + icmp


def udp_ip() -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 1, 0, 64, socket.IPPROTO_UDP, 0,
                       socket.inet_aton("198.18.0.10"), socket.inet_aton("198.19.0.2")) + bytes(8)


def ether(ip: bytes, vlan: bool = False) -> bytes:
    head = b"\x02" * 6 + b"\x04" * 6
    if vlan:
        head += struct.pack("!HH", 0x8100, 7)
    return head + struct.pack("!H", 0x0800) + ip


def build(frames, *, nano=True, order="<", linktype=pcap.LINKTYPE_ETHERNET, cut=0) -> bytes:
    """frames: [(ts_ns, bytes)]; cut: bytes to drop from the end (a torn last record)."""
    magic = pcap.MAGIC_NS if nano else pcap.MAGIC_US
    out = struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, 262144, linktype)
    for ts, f in frames:
        sub = ts % 1_000_000_000 if nano else ts % 1_000_000_000 // 1000
        out += struct.pack(order + "IIII", ts // 1_000_000_000, sub, len(f), len(f)) + f
    return out[:len(out) - cut] if cut else out


T = 1_733_270_000_123_456_789


@pytest.mark.parametrize("order", ["<", ">"])
def test_nanosecond_file_gives_every_echo_with_its_stamp(order):
    data = build([(T, ether(icmp_ip(8, 77, 1))), (T + 1500, ether(udp_ip())),
                  (T + 40_001, ether(icmp_ip(0, 77, 1, "198.19.0.2", "198.18.0.10")))], order=order)
    found = pcap.echoes(data)
    assert [(e.ts, e.type, e.id, e.seq) for e in found] == [(T, 8, 77, 1), (T + 40_001, 0, 77, 1)]
    assert (found[0].src, found[0].dst, found[0].length) == ("198.18.0.10", "198.19.0.2", 84)


def test_microsecond_file_is_scaled_to_ns():
    found = pcap.echoes(build([(T, ether(icmp_ip(8, 1, 9)))], nano=False))
    assert found[0].ts == T // 1000 * 1000


@pytest.mark.parametrize("linktype, wrap", [
    (pcap.LINKTYPE_RAW, lambda ip: ip),
    (pcap.LINKTYPE_LINUX_SLL, lambda ip: bytes(14) + struct.pack("!H", 0x0800) + ip),
    (pcap.LINKTYPE_LINUX_SLL2, lambda ip: struct.pack("!H", 0x0800) + bytes(18) + ip),
    (pcap.LINKTYPE_ETHERNET, lambda ip: ether(ip, vlan=True)),
], ids=["raw", "sll", "sll2", "vlan"])
def test_link_types(linktype, wrap):
    found = pcap.echoes(build([(T, wrap(icmp_ip(8, 3, 4)))], linktype=linktype))
    assert [(e.type, e.seq) for e in found] == [(8, 4)]


def test_torn_last_record_and_later_fragments_are_left_out(tmp_path):
    frames = [(T, ether(icmp_ip(8, 1, 1))), (T + 1, ether(icmp_ip(8, 1, 2, frag=10))),
              (T + 2, ether(icmp_ip(8, 1, 3)))]
    path = tmp_path / "x.pcap"
    path.write_bytes(build(frames, cut=5))
    assert [e.seq for e in pcap.echoes(path)] == [1]         # read from a path, too


def test_not_a_pcap_is_an_error():
    with pytest.raises(ValueError, match="magic"):
        pcap.echoes(b"\x0a\x0d\x0d\x0a" + bytes(40))          # pcapng
    with pytest.raises(ValueError, match="link type"):
        pcap.echoes(build([(T, b"1234")], linktype=147))


def test_by_seq_matches_across_a_rewritten_identifier_and_keeps_the_first():
    # the uplink's copy after masquerade: other source, maybe another id, same sequence
    inner = pcap.echoes(build([(T, ether(icmp_ip(8, 77, 5)))]))
    outer = pcap.echoes(build([(T + 9, ether(icmp_ip(8, 1024, 5, "198.19.0.1"))),
                               (T + 99, ether(icmp_ip(8, 1024, 5, "198.19.0.1"))),
                               (T + 20, ether(icmp_ip(0, 1024, 5, "198.19.0.2", "198.19.0.1")))]))
    a, b = pcap.by_seq(inner, pcap.ECHO_REQUEST), pcap.by_seq(outer, pcap.ECHO_REQUEST)
    assert a.keys() == b.keys() == {5}
    assert b[5].ts == T + 9
    assert pcap.by_seq(outer, pcap.ECHO_REPLY)[5].ts == T + 20


def test_realtime_offset_is_realtime_minus_monotonic():
    off = pcap.realtime_offset()
    now = time.clock_gettime_ns(time.CLOCK_REALTIME) - time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    assert abs(now - off) < 1_000_000

"""The service's pieces that need no privileges: request validation, the report queue,
the client's formatting, who is calling, and the socket's safety checks."""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import types

import pytest

from mace.correlate import _correlate
from mace.errors import ResourceError, UsageError
from mace.output.report import REPORT_SIZE, unpack
from mace.plan import ContainerPath
from mace.service import protocol as P
from mace.service.client import mace_line
from mace.service.identity import Peer
from mace.service.queue import Namespace
from mace.service.server import Options, Service

# -- requests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("req", [
    {"v": 1, "op": "on"}, {"v": 1, "op": "off"}, {"v": 1, "op": "status"},
    {"v": 1, "op": "read"}, {"v": 1, "op": "read", "follow": True},
])
def test_valid_requests_pass(req):
    assert P.parse_request(json.dumps(req).encode()) == req


@pytest.mark.parametrize("line, code, words", [
    (b'{"v":1,"op":"read","netns":4026531840}', P.BAD_REQUEST, "unknown field 'netns'"),
    (b'{"v":1,"op":"read","pid":1}', P.BAD_REQUEST, "unknown field 'pid'"),
    (b'{"v":2,"op":"read"}', P.BAD_REQUEST, "version 2"),
    (b'{"op":"on"}', P.BAD_REQUEST, "version None"),
    (b'{"v":1,"op":"delete"}', P.BAD_REQUEST, "unknown op"),
    (b'{"v":1,"op":"on","follow":true}', P.BAD_REQUEST, "follow"),
    (b'{"v":1,"op":"read","follow":"yes"}', P.BAD_REQUEST, "follow"),
    (b'[1,2]', P.BAD_REQUEST, "not a JSON object"),
    (b'\xff\xfe garbage', P.BAD_REQUEST, "not JSON"),
    (b'{"v":1,"op":"on"' + b" " * P.MAX_REQUEST + b"}", P.TOO_LONG, "more than"),
])
def test_bad_requests_are_refused_with_a_code_and_a_hint(line, code, words):
    with pytest.raises(P.ProtocolError) as e:
        P.parse_request(line)
    assert e.value.code == code and words in str(e.value)
    reply = e.value.reply()
    assert reply["v"] == P.VERSION and reply["ok"] is False and reply["hint"]


def test_control_messages_start_with_v_and_reports_never_do():
    assert P.encode({"v": 1, "dropped": 3}).startswith(b'{"v":')
    with pytest.raises(P.ProtocolError) as e:
        P.parse_request(b"{}")
    assert P.encode(e.value.reply()).startswith(b'{"v":')


# -- the queue --------------------------------------------------------------------------------


def ns(size=4) -> Namespace:
    return Namespace(4026532000, ContainerPath("x", "eth0", "veth0", "br0"), 7, size, pid=1)


_R = struct.Struct(_correlate.REPORT_FORMAT)


def recs(*seqs) -> bytes:
    """Packed reports (egress, container 3) with these sequence numbers."""
    return b"".join(_R.pack(1000 * q, q, 500 + q, 84, 3, 0, 5, 0, 0, *[0] * _correlate.HOPS) for q in seqs)


def seqs(raw: bytes) -> list[int]:
    return [r.seq for r in unpack(raw)]


def test_queue_drops_the_oldest_and_a_lagging_cursor_learns_how_many():
    q = ns(4)
    q.push(recs(1, 2, 3))
    assert len(q.ring) == 3 * REPORT_SIZE           # memory taken as reports arrive
    d, raw, cur = q.take(0, 10)
    assert (d, seqs(raw), cur) == (0, [1, 2, 3], 3)
    q.push(recs(4, 5, 6, 7, 8))                     # 8 in all, 4 kept: 5..8, wrapped
    assert (q.base, q.end, q.dropped, len(q.ring)) == (4, 8, 4, 4 * REPORT_SIZE)
    d, raw, cur = q.take(3, 10)
    assert (d, seqs(raw), cur) == (1, [5, 6, 7, 8], 8)
    d, raw, cur = q.take(0, 2)
    assert (d, seqs(raw), cur) == (4, [5, 6], 6)
    assert q.take(8, 10) == (0, b"", 8)


def test_queue_keeps_order_across_many_wraps():
    q = ns(5)
    n = 0
    for k in (1, 3, 4, 2, 7, 5, 1):
        q.push(recs(*range(n + 1, n + k + 1)))
        n += k
    d, raw, cur = q.take(q.base, 99)
    assert seqs(raw) == list(range(n - 4, n + 1)) and cur == n and q.dropped == n - 5


def test_a_batch_larger_than_the_queue_keeps_its_newest():
    q = ns(3)
    q.push(recs(*range(1, 8)))
    assert seqs(q.take(0, 9)[1]) == [5, 6, 7]
    assert (q.base, q.dropped, q.received) == (4, 4, 7)


def test_closing_counts_what_no_one_read_and_frees_the_queue():
    q = ns(8)
    q.push(recs(1, 2, 3, 4, 5))
    q.read_at = 2
    q.close("mace off")
    assert (q.closed, q.discarded, len(q.ring)) == ("mace off", 3, 0)


def test_saved_unread_reports_come_back_intact():
    q = ns(4)
    q.push(recs(1, 2, 3, 4, 5, 6))
    for read_at, unread in ((3, [4, 5, 6]), (1, [3, 4, 5, 6])):     # numbered from 0
        q.read_at = read_at
        back = ns(4)
        back.push(base64.b64decode(q.saved()["unread"]))
        assert seqs(back.take(0, 9)[1]) == unread


# -- the client -------------------------------------------------------------------------------


def test_mace_lines_round_to_the_microsecond_from_exact_nanoseconds():
    line = b'{"ts":1795697607.625201500,"netns":1,"target":"t","dir":"egress","seq":7,"latency_ns":31627,"len":84,"cpu":0}\n'
    assert mace_line(line) == "[1795697607.625202] (7) egress: 31627\n"
    line = b'{"ts":1795697607.999999600,"netns":1,"target":"t","dir":"ingress","seq":1,"latency_ns":5,"len":84,"cpu":0}\n'
    assert mace_line(line) == "[1795697608.000000] (1) ingress: 5\n"


# -- who is calling ---------------------------------------------------------------------------


def test_the_peer_is_known_by_its_process_and_namespace():
    a, b = socket.socketpair()
    with a, b:
        peer = Peer(a)
        try:
            assert peer.pid == os.getpid()
            fd = peer.netns()
            try:
                assert os.fstat(fd).st_ino == os.stat("/proc/self/ns/net").st_ino
            finally:
                os.close(fd)
        finally:
            peer.close()


# -- the socket -------------------------------------------------------------------------------


def service_in(d, name="mace.sock") -> Service:
    return Service(str(d / name), Options(mode=0o666, state_dir=str(d.parent / "state")),
                   log=lambda line: None)


def test_bind_makes_a_socket_anyone_may_connect_to_and_unbind_removes_it(tmp_path):
    d = tmp_path / "run"
    s = service_in(d)
    s.bind()
    try:
        assert oct(os.stat(s.path).st_mode & 0o777) == oct(0o666)
        assert os.stat(d).st_mode & 0o777 == 0o755
    finally:
        s._unbind()
    assert not os.path.exists(s.path)


def test_bind_refuses_a_directory_others_may_write(tmp_path):
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, 0o777)
    with pytest.raises(UsageError, match="written by others"):
        service_in(d).bind()


def test_bind_refuses_a_path_that_is_not_a_socket(tmp_path):
    d = tmp_path / "run"
    d.mkdir(mode=0o755)
    (d / "mace.sock").write_text("precious")
    with pytest.raises(UsageError, match="not a socket"):
        service_in(d).bind()
    assert (d / "mace.sock").read_text() == "precious"


def test_bind_replaces_a_stale_socket_but_not_a_live_one(tmp_path):
    d = tmp_path / "run"
    d.mkdir(mode=0o755)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(d / "mace.sock"))
    stale.close()                            # the file stays, no one listens
    first = service_in(d)
    first.bind()
    try:
        with pytest.raises(ResourceError, match="already listens"):
            service_in(d).bind()
        assert os.path.exists(first.path)
    finally:
        first._unbind()


def test_bind_refuses_a_state_directory_others_may_use(tmp_path):
    d = tmp_path / "run"
    (tmp_path / "state").mkdir(mode=0o755)
    os.chmod(tmp_path / "state", 0o755)
    with pytest.raises(UsageError, match="only its owner"):
        service_in(d).bind()
    assert not (d / "mace.sock").exists()


# -- state across restarts --------------------------------------------------------------------


def _item(unread: bytes, dropped: int = 0) -> dict:
    return {"inode": 4026532000, "inner": "eth0", "veth": "veth0", "veth_index": 7, "bridge": "br0",
            "since": 1.0, "pid": None, "unread": base64.b64encode(unread).decode(), "dropped": dropped}


def _service(tmp_path, lines: list) -> Service:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    return Service(str(tmp_path / "run" / "mace.sock"), Options(state_dir=str(state)), log=lines.append)


def test_saved_state_records_the_report_format_and_keeps_reports_of_that_format(tmp_path):
    lines = []
    s = _service(tmp_path, lines)
    q = ns(4)
    q.push(recs(1, 2, 3))
    q.read_at = 1
    s.engine = types.SimpleNamespace(enabled={q.inode: q}, uplinks=("eth1",))
    s.save_state(queues=True)
    with open(s.state_path) as f:
        saved = json.load(f)
    assert (saved["report_format"], saved["report_size"]) == (_correlate.REPORT_FORMAT, REPORT_SIZE)
    item = s._load_state()["namespaces"][0]
    assert seqs(base64.b64decode(item["unread"])) == [2, 3] and item["dropped"] == 0
    assert lines == []


@pytest.mark.parametrize("layout", [{"report_format": "=QIHHII", "report_size": 24}, {}])
def test_unread_reports_of_another_format_are_dropped_with_a_warning_not_misread(tmp_path, layout):
    lines = []
    s = _service(tmp_path, lines)
    size = layout.get("report_size", REPORT_SIZE)     # a state from before formats were recorded
    state = {"v": P.VERSION, **layout, "uplink": "eth1",
             "namespaces": [_item(bytes(3 * size), dropped=2), _item(b"")]}
    with open(s.state_path, "w") as f:
        json.dump(state, f)
    items = s._load_state()["namespaces"]
    assert [(i["unread"], i["dropped"]) for i in items] == [("", 5), ("", 0)]
    assert len(lines) == 1 and "warning" in lines[0] and "3 unread reports" in lines[0]
    assert "\n" not in lines[0]

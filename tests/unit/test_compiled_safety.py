"""Memory safety, error contracts and the Python face of the compiled core (no privileges)."""

from __future__ import annotations

import ast
import errno
import struct
import threading
from pathlib import Path

import pytest

from mace.capture import _ring, perf
from mace.capture._ring import Rings
from mace.correlate import _correlate
from mace.errors import MaceError, PermissionProblem, ResourceError, TracepointMissing
from mace.output import _format, report
from mace.output.report import REPORT_SIZE, Report, split, unpack
from mace.testing import reference
from mace.testing.synthetic import NetEvent, RingImage, builtin_layout

XMIT = "net:net_dev_start_xmit"


def make_rings(cpus=(0,), pages=1, **kw) -> Rings:
    rings = Rings(cpus=list(cpus), ring_pages=pages, reorder_ns=0, **kw)
    rings.add_kind(**builtin_layout(XMIT))
    rings.set_devices(["eth0"])
    return rings


def xmit(ts: int, cpu: int = 0) -> bytes:
    return NetEvent(XMIT, ts, cpu=cpu, skb=0x1000 + ts, len=98, dev="eth0", protocol=0x0800).encode()


# -- the borrowed ring image -----------------------------------------------------------------


def test_an_attached_image_cannot_be_resized_under_the_rings():
    rings = make_rings()
    img = RingImage(1)
    rings.attach(0, img.buf)
    with pytest.raises(BufferError):
        img.buf.extend(b"\0" * 4096)        # would move the memory the rings read
    with pytest.raises(BufferError):
        del img.buf[-8:]
    img.write(xmit(10))
    assert rings.drain(final=True) == 1


def test_closing_the_rings_lets_go_of_the_image():
    rings = make_rings()
    img = RingImage(1)
    rings.attach(0, img.buf)
    rings.close()
    img.buf.extend(b"\0" * 8)               # released: no longer exported


def test_a_failed_attach_keeps_nothing():
    rings = make_rings()
    small = bytearray(512)
    with pytest.raises(ValueError):
        rings.attach(0, small)
    small.extend(b"\0")
    img = RingImage(1)
    rings.attach(0, img.buf)                # the ring is still free


def test_dropping_the_rings_lets_go_of_the_image():
    img = RingImage(1)
    rings = make_rings()
    rings.attach(0, img.buf)
    del rings
    img.buf.extend(b"\0" * 8)


# -- strided input -----------------------------------------------------------------------------


def correlator() -> _correlate.Correlator:
    return _correlate.Correlator([1], [1], [-1], [0], table_size=64, ncpu=4)


def test_feed_bytes_refuses_strided_memory():
    packed = struct.pack(_ring.RECORD_FORMAT, 1, 0x1000, 98, 1, 0, 0, 0, 0, 0x0800) * 4
    c = correlator()
    with pytest.raises((ValueError, BufferError)):
        c.feed_bytes(memoryview(packed)[::-1])
    with pytest.raises((ValueError, BufferError)):
        c.feed_bytes(memoryview(packed)[::2])
    assert c.counters()["global"]["events"] == 0
    assert c.feed_bytes(memoryview(packed)) == 4


# -- sizes and concurrency ----------------------------------------------------------------


@pytest.mark.parametrize("cpus, stage_cap", [((0,), 1 << 59), ((0, 1), 1 << 58), ((0, 1, 2), (1 << 64) // 96 + 1)])
def test_a_stage_size_that_overflows_is_refused(cpus, stage_cap):
    with pytest.raises((OverflowError, MemoryError)):
        Rings(cpus=list(cpus), ring_pages=1, reorder_ns=0, stage_cap=stage_cap)


def test_a_huge_stage_is_a_memory_error_not_a_crash():
    with pytest.raises((OverflowError, MemoryError)):
        Rings(cpus=[0], ring_pages=1, reorder_ns=0, stage_cap=1 << 52)


@pytest.mark.parametrize("report_cap", [1 << 60, (1 << 64) // 56 + 1])
def test_a_report_buffer_size_that_overflows_is_refused(report_cap):
    with pytest.raises((OverflowError, MemoryError)):
        _correlate.Correlator([1], [1], [-1], [0], table_size=64, ncpu=4, report_cap=report_cap)


def full_rings(nrings: int, pages: int) -> tuple[Rings, int]:
    """Rings whose images are full of samples: one drain takes a while without the GIL."""
    rings = make_rings(cpus=range(nrings), pages=pages)
    total = 0
    for i in range(nrings):
        img = RingImage(pages)
        rec = xmit(1000 + i, cpu=i)
        count = img.size // len(rec)
        data = rec * count
        img.buf[4096:4096 + len(data)] = data
        struct.pack_into("<Q", img.buf, 1024, len(data))       # data_head
        rings.attach(i, img.buf)
        total += count
    return rings, total


@pytest.mark.parametrize("how", ["drain", "feed"])
def test_two_threads_draining_the_same_rings_is_an_error_not_a_race(how):
    rings, total = full_rings(4, 1024)
    barrier = threading.Barrier(2)
    got: list[int] = []
    refused: list[str] = []

    def worker():
        barrier.wait()
        for _ in range(3000):
            try:
                if how == "drain":
                    got.append(rings.drain(final=True))
                else:
                    got.append(rings.feed(_ring.EventSink(), final=True))
            except RuntimeError as e:
                refused.append(str(e))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert refused, "the second thread was let in"
    assert all("another thread" in m for m in refused)
    assert sum(got) == total
    assert rings.stats()["samples"] == total


def test_set_devices_while_draining_is_refused():
    rings, _ = full_rings(2, 1024)
    started = threading.Event()
    errors: list[Exception] = []

    def drainer():
        started.set()
        for _ in range(50):
            rings.drain(final=True)

    t = threading.Thread(target=drainer)
    t.start()
    started.wait()
    for _ in range(20000):
        try:
            rings.set_devices(["eth0"])
        except RuntimeError as e:
            errors.append(e)
            break
    t.join()
    assert errors


# -- errors by operation ------------------------------------------------------------------


def test_ring_errors_name_the_operation():
    rings = Rings(cpus=[0], ring_pages=1, reorder_ns=0)
    rings.add_kind(tp_id=65000, skb_off=8, len_off=-1, name_off=-1, proto_off=-1, min_raw=16)
    with pytest.raises(OSError) as info:
        rings.open_event(0, 0, None, "test:missing")
    assert info.value.filename == "perf_event_open"
    assert info.value.errno and info.value.strerror
    assert "test:missing" in info.value.strerror


def test_translate_switches_on_the_operation_not_the_text():
    # the message mentions mmap, but perf_event_open is what failed
    e = perf._translate(OSError(errno.EPERM, "not allowed (mmap of rings)", "perf_event_open"), XMIT)
    assert isinstance(e, PermissionProblem)
    e = perf._translate(OSError(errno.ENOMEM, "Cannot allocate memory", "mmap"), XMIT)
    assert isinstance(e, ResourceError)
    e = perf._translate(OSError(errno.EPERM, "Operation not permitted", "mmap"), XMIT)
    assert isinstance(e, ResourceError)
    e = perf._translate(OSError(errno.EINVAL, "Invalid argument", "SET_FILTER"), XMIT)
    assert "filter" in str(e)
    e = perf._translate(OSError(errno.EINVAL, "bad FILTER", "perf_event_open"), XMIT)
    assert "filter" not in str(e)
    e = perf._translate(OSError(errno.ENOENT, "No such file or directory", "perf_event_open"), XMIT)
    assert isinstance(e, TracepointMissing)
    e = perf._translate(OSError(errno.EMFILE, "Too many open files", "perf_event_open"), XMIT)
    assert isinstance(e, ResourceError)


def test_translate_fallback_keeps_operation_and_errno():
    e = perf._translate(OSError(errno.EBUSY, "Device or resource busy", "SET_OUTPUT"), XMIT)
    assert type(e) is MaceError
    msg = str(e)
    assert "SET_OUTPUT" in msg and "EBUSY" in msg and XMIT in msg


# -- 64-bit sequence numbers --------------------------------------------------------------


def test_report_record_layout():
    fmt = struct.Struct(_correlate.REPORT_FORMAT)
    assert fmt.size == REPORT_SIZE == _correlate.REPORT_SIZE == 56
    assert report.REPORT_FORMAT == _correlate.REPORT_FORMAT
    r = Report(513, 1, (1 << 40) + 7, 123456789012, 4000, 84, 3, (11, None, 33))
    raw = report.pack(r)
    assert len(raw) == 56
    t0, seq, lat, length, cont, d, nhops, cpu, pad, *hops = fmt.unpack(raw)
    assert (t0, seq, lat, length, cont, d, nhops, cpu, pad) == (123456789012, (1 << 40) + 7, 4000, 84, 513, 1, 3, 3, 0)
    assert hops == [11, 0, 33, 0, 0, 0]
    assert list(unpack(raw)) == [r]
    assert raw[16:16 + 4] == struct.pack("=I", 4000)      # natural alignment: no hidden padding
    assert struct.unpack_from("=H", raw, 24)[0] == 513


def test_split_reads_the_container_field():
    a = Report(2, 0, 1 << 33, 1, 2, 3, 0, (None,) * 4)
    b = Report(5, 1, 1, 1, 2, 3, 0, (None,) * 3)
    groups = split([report.pack(a) + report.pack(b) + report.pack(a)])
    assert sorted(groups) == [2, 5]
    assert list(unpack(bytes(groups[2]))) == [a, a]
    assert list(unpack(bytes(groups[5]))) == [b]


def test_sequence_numbers_continue_past_32_bits():
    # egress from the inner device (slot 0) over the veth (1) to the uplink (2)
    c = _correlate.Correlator([1, 2, 4], [1, 2, 8], [-1, 0, -1], [0], table_size=64, ncpu=4)
    c._set_seq(0, 0, (1 << 32) - 2)
    ev = struct.Struct(_ring.RECORD_FORMAT)
    for i in range(3):
        skb = 0x10000 + 64 * i
        t = 1000 * (i + 1)
        c.feed_bytes(ev.pack(t, skb, 98, 7, 0, 0, 0, 0, 0x0800)          # xmit inner
                     + ev.pack(t + 10, skb, 84, 8, 1, 1, 0, 1, 0x0800)   # receive veth
                     + ev.pack(t + 20, skb, 98, 8, 1, 2, 0, 2, 0x0800)   # queue uplink
                     + ev.pack(t + 30, skb, 98, 8, 1, 0, 0, 2, 0x0800))  # xmit uplink
    assert [r.seq for r in unpack(c.take_reports())] == [(1 << 32) - 1, 1 << 32, (1 << 32) + 1]


# -- constants shared with the reference model ------------------------------------------------


def test_reference_takes_its_constants_from_the_compiled_module():
    for name in ("PQ", "CTX_BITS", "SYNC_MAX_NS", "ETH_HLEN", "ARP_L3", "HOPS"):
        assert getattr(reference, name) == getattr(_correlate, name), name
    assert reference.DEV_NONE == _ring.DEV_NONE and reference.DEV_OTHER == _ring.DEV_OTHER
    assert {"net:net_dev_start_xmit": reference.T_XMIT, "net:netif_receive_skb": reference.T_RECV,
            "net:netif_rx": reference.T_RX, "net:netif_rx_entry": reference.T_RX,
            "net:net_dev_queue": reference.T_QUEUE,
            "skb:kfree_skb": reference.T_FREE, "fib:fib_table_lookup": reference.T_ROUTE,
            **{f"syscalls:sys_enter_{c}": reference.T_CALL for c in _correlate.SEND_CALLS},
            **{f"syscalls:sys_exit_{c}": reference.T_RETURN for c in _correlate.SEND_CALLS},
            "sock:sk_data_ready": reference.T_READY, "sock:sock_recv_length": reference.T_RECEIVED} == _correlate.TYPES
    assert {"inner": reference.C_INNER, "veth": reference.C_VETH, "bridge": reference.C_BRIDGE,
            "uplink": reference.C_UPLINK} == _correlate.CLASSES


# -- type stubs ---------------------------------------------------------------------------------


def stub_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return {n for n in names if not n.startswith("_")}


@pytest.mark.parametrize("module", [_ring, _correlate, _format])
def test_stubs_list_what_the_compiled_module_offers(module):
    stub = Path(module.__file__).parent / (module.__name__.rsplit(".", 1)[1] + ".pyi")
    src_stub = Path(__file__).parents[2] / "src" / Path(*module.__name__.split(".")[:-1]) / stub.name
    path = stub if stub.exists() else src_stub
    assert path.exists(), f"no stub for {module.__name__}"
    public = {n for n in dir(module) if not n.startswith("_")}
    assert stub_names(path) == public


@pytest.mark.parametrize("module, cls", [(_ring, "Rings"), (_correlate, "Correlator"),
                                         (_format, "Formatter")])
def test_stub_methods_match_the_class(module, cls):
    stub = Path(module.__file__).parent / (module.__name__.rsplit(".", 1)[1] + ".pyi")
    tree = ast.parse(stub.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    declared = {n.name for n in node.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")}
    actual = {n for n in dir(getattr(module, cls)) if not n.startswith("_")}
    assert declared == actual


def test_the_package_is_marked_typed():
    import mace
    assert (Path(mace.__file__).parent / "py.typed").exists()


def test_debug_flag_is_exposed():
    assert isinstance(_ring.DEBUG, bool) and isinstance(_correlate.DEBUG, bool)
    assert _ring.DEBUG == _correlate.DEBUG == _format.DEBUG

"""Output: how fast reports become lines, and how fast the service delivers them.

- formatting: packed reports (as the correlator hands them on) made into MACE lines, JSON
  lines and CSV rows, with and without hops, by the compiled formatter
  (mace.output._format) and by the Python sinks it replaced (mace.testing.reference_sinks,
  which must agree byte for byte: checked here on every run).  Reports per second of one
  thread's CPU time (time.thread_time), best and median of the repetitions.  Also the whole
  `mace trace` sink (Sink.write_packed into a text stream: the formatting, the decode to
  str and the write).  Target: >= 1 M reports/s per core.
- delivery: a real `mace serve`, one container enabled, a `--follow` reader (a process in
  the container reading its socket) counting JSON lines.  First live, the container
  flooding while the reader follows; then a backlog: the container floods with no reader
  until the queue holds a few hundred thousand reports, and the reader then drains it, which
  measures what the service delivers when traffic is not the limit.  Delivered reports/s,
  drops, the service's CPU share and its CPU per delivered report.  Target: >= 200 k
  reports/s delivered to a follower.
"""

from __future__ import annotations

import io
import json
import os
import random
import statistics
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from benchmarks.common import pyplot, save

FORMATS = ("mace", "jsonl", "csv")
TARGET_FORMAT = 1e6
TARGET_DELIVERY = 200e3

# a fast reader: chunks, newlines counted in C; the service's own lines ({"v":...}: the
# header, a drop notice, the end) are few and parsed one by one
READER = textwrap.dedent("""
    import json, socket, sys, time
    s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
    s.sendall(b'{"v":1,"op":"read","follow":true}\\n')
    s.settimeout(float(sys.argv[3]))
    end = time.monotonic() + float(sys.argv[2])
    n = dropped = control = 0; first = last = None; tail = b""
    while time.monotonic() < end:
        try:
            chunk = s.recv(1 << 20)
        except (socket.timeout, OSError):
            break
        if not chunk:
            break
        now = time.monotonic()
        data = tail + chunk
        cut = data.rfind(b"\\n") + 1
        body, tail = data[:cut], data[cut:]
        lines = body.count(b"\\n")
        if b'{"v":' in body:
            for line in body.splitlines():
                if line.startswith(b'{"v":'):
                    control += 1
                    dropped += json.loads(line).get("dropped", 0) if b'"end"' not in line else 0
        n += lines
        if lines:
            first = first or now
            last = now
    print(json.dumps({"reports": n - control, "dropped": dropped,
                      "seconds": (last - first) if first and last else 0}))
""")


# -- formatting ---------------------------------------------------------------------------------

def _reports(n: int, hops: bool, seed: int = 7) -> bytes:
    """n packed reports of two containers, alternating directions, values as a run has them."""
    from mace.correlate._correlate import HOPS
    from mace.output.report import REPORT_FORMAT
    from mace.output.sinks import HOP_NAMES
    rec = struct.Struct(REPORT_FORMAT)
    rnd = random.Random(seed)
    t0 = 5_000_000_000_000         # 5000 s of uptime
    out = bytearray(n * rec.size)
    seq = [[0, 0], [0, 0]]
    for i in range(n):
        c, d = (i >> 1) & 1, i & 1
        seq[c][d] += 1
        t0 += rnd.randrange(2_000, 40_000)
        lat = rnd.randrange(8_000, 200_000)
        nh = len(HOP_NAMES[d]) if hops else 0
        hop = sorted(rnd.randrange(1, lat) for _ in range(nh)) + [0] * (HOPS - nh)
        rec.pack_into(out, i * rec.size, t0, seq[c][d], lat, 84 if d == 0 else 98, c, d, nh,
                      rnd.randrange(2), 0, *hop)
    return bytes(out)


TARGETS = [("web", 4026532281, {"container": "web"}), ("db", 4026532399, None)]


def _compiled(fmt: str, hops: bool, offset: int):
    from mace.output.sinks import formatter
    return formatter(fmt, offset, hops, TARGETS)


def _reference_text(fmt: str, hops: bool, offset: int, raw: bytes) -> str:
    from mace.output.report import unpack
    from mace.testing import reference_sinks
    buf = io.StringIO()
    sink = reference_sinks.make_sink(fmt, buf, [t[0] for t in TARGETS], [t[1] for t in TARGETS],
                                     hops=hops, wall_offset_ns=offset, containers=[t[2] for t in TARGETS])
    start = buf.tell()
    sink.write(list(unpack(raw)))
    return buf.getvalue()[start:]


def _timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.thread_time()
        fn()
        out.append(time.thread_time() - t)
    return out


def _formatting(quick: bool) -> list[dict]:
    from mace.output.report import REPORT_SIZE, unpack
    from mace.output.sinks import make_sink
    from mace.testing import reference_sinks

    n, n_ref, reps = (100_000, 10_000, 3) if quick else (1_000_000, 50_000, 7)
    offset = 1_760_000_000_000_000_000 - 5_000_000_000_000
    rows = []
    for hops in (False, True):
        raw = _reports(n, hops)
        for fmt in FORMATS:
            f = _compiled(fmt, hops, offset)
            out = bytearray()
            f.format(raw[:n_ref * REPORT_SIZE], out)
            identical = out.decode() == _reference_text(fmt, hops, offset, raw[:n_ref * REPORT_SIZE])

            def compiled(f=f, raw=raw):
                f.format(raw, bytearray())

            def sink_path(fmt=fmt, hops=hops, raw=raw):
                s = make_sink(fmt, io.StringIO(), [t[0] for t in TARGETS], [t[1] for t in TARGETS],
                              hops=hops, wall_offset_ns=offset, containers=[t[2] for t in TARGETS])
                s.write_packed(raw)

            small = raw[:n_ref * REPORT_SIZE]

            def reference(fmt=fmt, hops=hops, small=small):
                s = reference_sinks.make_sink(fmt, io.StringIO(), [t[0] for t in TARGETS],
                                              [t[1] for t in TARGETS], hops=hops, wall_offset_ns=offset,
                                              containers=[t[2] for t in TARGETS])
                s.write(list(unpack(small)))

            tc, ts, tr = _timed(compiled, reps), _timed(sink_path, reps), _timed(reference, max(3, reps // 2))
            line = len(out) / n_ref
            rows.append({"format": fmt, "hops": hops, "reports": n, "identical": identical,
                         "bytes_per_line": round(line, 1),
                         "compiled_per_s": round(n / min(tc)), "compiled_per_s_median": round(n / statistics.median(tc)),
                         "sink_per_s": round(n / min(ts)), "sink_per_s_median": round(n / statistics.median(ts)),
                         "reference_per_s": round(n_ref / min(tr)),
                         "reference_per_s_median": round(n_ref / statistics.median(tr))})
            rows[-1]["ratio"] = round(rows[-1]["compiled_per_s_median"] / rows[-1]["reference_per_s_median"], 1)
    return rows


# -- delivery -------------------------------------------------------------------------------------

def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _floods(tb, c, seconds: float, k: int):
    return [tb.popen(c.ns, ["ping", "-n", "-q", "-f", "-l", "8", "-w", str(int(seconds)), tb.peer_ip],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(k)]


def _status(tb, c, sock: str) -> dict:
    st = tb.run(c.ns, [sys.executable, "-m", "mace", "status", "--json", "--socket", sock], timeout=30)
    return json.loads(st.stdout)


def _delivery(tb, tmp: Path, quick: bool) -> dict:
    sock = str(tmp / "mace.sock")
    queue = 1 << 20
    srv = tb.popen(tb.host_ns, [sys.executable, "-m", "mace", "serve", "--socket", sock,
                                "--queue", str(queue)],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    live_s, fill_s = (2.0, 2.0) if quick else (6.0, 6.0)
    try:
        for _ in range(200):
            if os.path.exists(sock):
                break
            time.sleep(0.05)
        a = tb.containers[0]
        r = tb.run(a.ns, [sys.executable, "-m", "mace", "on", "--socket", sock], timeout=30)
        assert r.returncode == 0, r.stderr
        # live: the reader follows while the container floods
        reader = tb.popen(a.ns, [sys.executable, "-c", READER, sock, str(live_s + 3), "1.0"],
                          stdout=subprocess.PIPE, text=True)
        time.sleep(0.3)
        cpu0, t0 = _cpu_seconds(srv.pid), time.monotonic()
        for p in _floods(tb, a, live_s, 2):
            p.wait(live_s + 10)
        live_cpu = _cpu_seconds(srv.pid) - cpu0
        live_wall = time.monotonic() - t0
        live = json.loads(reader.communicate(timeout=live_s + 15)[0])
        live.update(service_cpu_share=round(live_cpu / live_wall, 3),
                    reports_per_s=round(live["reports"] / live["seconds"]) if live["seconds"] else 0)
        # backlog: flood with no reader, then drain it
        before = _status(tb, a, sock)["queue"]["unread"]
        for p in _floods(tb, a, fill_s, 2):
            p.wait(fill_s + 10)
        time.sleep(0.5)
        queued = _status(tb, a, sock)["queue"]["unread"] - before
        cpu0 = _cpu_seconds(srv.pid)
        reader = tb.popen(a.ns, [sys.executable, "-c", READER, sock, "60", "0.5"],
                          stdout=subprocess.PIPE, text=True)
        drain = json.loads(reader.communicate(timeout=90)[0])
        drain_cpu = _cpu_seconds(srv.pid) - cpu0
    finally:
        srv.terminate()
        srv.wait(20)
    rate = drain["reports"] / drain["seconds"] if drain["seconds"] else 0
    drain.update(queued=queued, reports_per_s=round(rate),
                 service_cpu_us_per_report=round(1e6 * drain_cpu / drain["reports"], 2) if drain["reports"] else None)
    return {"live": live, "backlog": drain, "queue": queue}


def run(quick: bool) -> dict:
    from mace.testing.testbed import Testbed

    rows = _formatting(quick)
    with Testbed(containers_n=1) as tb, tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)
        tb.run(tb.containers[0].ns, ["ping", "-n", "-c", "2", "-i", "0.2", tb.peer_ip], timeout=10)
        delivery = _delivery(tb, Path(tmp), quick)
    return {"formatting": rows, "delivery": delivery,
            "slowest_compiled_per_s": min(r["compiled_per_s_median"] for r in rows),
            "all_identical": all(r["identical"] for r in rows)}


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.4), gridspec_kw={"width_ratios": [2, 1]})
    rows = result["formatting"]
    names = [f"{r['format']}{' +hops' if r['hops'] else ''}" for r in rows]
    x = range(len(rows))
    for k, (key, label) in enumerate((("compiled_per_s_median", "compiled formatter"),
                                      ("sink_per_s_median", "mace trace sink (format + decode + write)"),
                                      ("reference_per_s_median", "Python reference"))):
        a1.bar([i + 0.27 * k for i in x], [r[key] / 1e6 for r in rows], width=0.27, label=label)
    a1.axhline(TARGET_FORMAT / 1e6, color="k", ls="--", lw=1, label="target 1 M/s")
    a1.set_xticks([i + 0.27 for i in x])
    a1.set_xticklabels(names)
    a1.set_ylabel("reports / s of one core's CPU (millions)")
    a1.set_yscale("log")
    a1.legend(fontsize=8)
    a1.set_title("formatting packed reports")
    d = result["delivery"]
    a2.bar([0, 1], [d["live"]["reports_per_s"] / 1e3, d["backlog"]["reports_per_s"] / 1e3],
           color=["tab:blue", "tab:green"])
    a2.axhline(TARGET_DELIVERY / 1e3, color="k", ls="--", lw=1)
    a2.set_xticks([0, 1])
    a2.set_xticklabels(["live (traffic-bound)", "backlog drained"])
    a2.set_ylabel("reports / s delivered to a --follow reader (thousands)")
    a2.set_title("mace serve → follower")
    save(fig, path)


def summary(result: dict) -> list[dict]:
    rows = []
    for r in result["formatting"]:
        name = f"{r['format']}{' with hops' if r['hops'] else ''}"
        rows.append({"metric": f"format {name}: compiled / trace sink / Python reference (reports/s, median)",
                     "value": f"{r['compiled_per_s_median'] / 1e6:.2f} M / {r['sink_per_s_median'] / 1e6:.2f} M / "
                              f"{r['reference_per_s_median'] / 1e3:.0f} k ({r['ratio']:.0f}x); "
                              f"{'identical' if r['identical'] else '**differ**'}",
                     "target": ">= 1 M/s, identical",
                     "met": r["compiled_per_s_median"] >= TARGET_FORMAT and r["identical"]})
    d = result["delivery"]
    rows.append({"metric": "delivered live to a follower, container flooding (reports/s, dropped, service CPU)",
                 "value": f"{d['live']['reports_per_s']:,} / {d['live']['dropped']} / "
                          f"{100 * d['live']['service_cpu_share']:.0f}%",
                 "target": "dropped 0", "met": d["live"]["dropped"] == 0})
    b = d["backlog"]
    rows.append({"metric": "backlog drained by a follower (reports/s; service CPU per report)",
                 "value": f"{b['reports_per_s']:,} of {b['queued']:,} queued; {b['service_cpu_us_per_report']} µs",
                 "target": ">= 200 k/s", "met": b["reports_per_s"] >= TARGET_DELIVERY})
    return rows


def notes(result: dict) -> list[str]:
    d = result["delivery"]
    return ["Formatting rates are per core of CPU time (time.thread_time), the compiled ones on "
            f"{result['formatting'][0]['reports']:,} generated reports of two targets, the reference on fewer; "
            "each run checks the compiled text against the reference's, byte for byte.",
            "Live delivery is bound by the traffic one container's two ping floods make on 2 vCPUs "
            "(the floods, the softirqs, the service and the reader share them); the backlog drain, "
            f"{d['backlog']['queued']:,} reports queued by the service (--queue {d['queue']:,}) before the "
            "reader connects, is the service's own delivery rate."]

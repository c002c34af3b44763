"""The correlator: hot-loop throughput on synthetic rings, and coverage vs table size, live.

1. Synthetic: two full perf ring images (one per CPU, 256 pages each) hold the event
   stream a kernel writes for a plan of two containers behind a bridge and an uplink:
   ping floods and UDP senders in both monitored containers and in an unmonitored one
   (whose `eth0` matches the same in-kernel filter), a rate-limited uplink qdisc that
   queues and drops, the peer's echo replies, unrelated `kfree_skb` drops, and skb
   addresses recycled LIFO per CPU from a pool of a few hundred, as the slab allocator
   does.  The stream comes from the flood model of mace.testing.kernel (a small
   discrete-event model of the kernel, shared with the tests): every call
   chain runs on one CPU without interruption (so synchronous steps are adjacent), every
   CPU's clock only moves forward, an address is reused only after its packet was freed,
   and both images are cut at the same instant (a consistent snapshot).
   `Rings.feed(correlator, final=True)` (decode + merge + correlate, one core, GIL
   released) is timed with the images restored byte for byte before each repetition; so
   is `Correlator.feed_bytes` on the already-decoded events (correlation alone).  The
   pure-Python `ReferenceDecoder` + `merge` + `ReferenceCorrelator` run on the same bytes
   for the speed ratio, and both must produce the same reports, which must also match
   what the model says completed.
2. Live: a Testbed(containers_n=3, masquerade=True) whose uplink is shaped by a token
   bucket, so packets queue there by the hundred.  Containers 0 and 1 are traced, all
   three flood (`ping -f -l 32` and a UDP sender each).  The same bounded load (UDP
   senders paced) runs once per table size, then the default table once more with the
   UDP senders unpaced: the highest rate the machine produces.  Per direction we record
   reports, coverage, evictions, and beside them the ring losses and the samples the
   kernel dropped without notice.
"""

from __future__ import annotations

import gc
import os
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from benchmarks.common import DIRECTIONS, fmt_rate, pyplot, rate_bars, save, wait_quiet

TARGET_RATE = 10e6
RING_PAGES = 256
SYN_CPUS = 2
ENTRY_BYTES = 64                    # mace.correlate._correlate.ENTRY_SIZE, checked at run time
LIVE_SIZES = [1 << k for k in (4, 6, 8, 10, 12, 14, 16)]
QUICK_SIZES = [1 << k for k in (4, 8, 16)]
UPLINK_KBIT = 20000                 # 20 Mbit/s token bucket: the UDP floods queue behind it
LIVE_RING_PAGES = 1024              # 4 MiB per CPU, so that ring overflow stays out of it
UDP_PORT = 5201
UDP_PAYLOAD = 1400
PING_PRELOAD = 32
UDP_PACED_RATE = 15_000             # datagrams/s per sender in the sweep (the link takes ~1,750)


# -- synthetic: the flood model of mace.testing.kernel in two ring images ----------------------


def _rings(bufs, layouts, devices):
    """Rings reading the ring images in `bufs` (one per CPU) instead of perf mmaps."""
    from mace.capture._ring import Rings
    rings = Rings(cpus=list(range(len(bufs))), ring_pages=RING_PAGES, reorder_ns=0)
    for k in layouts:
        rings.add_kind(**k)
    rings.set_devices(devices)
    for i, buf in enumerate(bufs):
        rings.attach(i, buf)
    return rings


def _feed_all(rings, corr) -> tuple[int, bytes]:
    """What Tracer.drain does, minus building Python objects: feed, take the reports."""
    n = 0
    parts = []
    while True:
        n += rings.feed(corr, True)
        parts.append(corr.take_reports())
        if not rings.more:
            return n, b"".join(parts)


def _report_tuples(raw: bytes) -> list[tuple]:
    # unpacked: the reports' padding bytes are not initialised, so bytes may differ
    from mace.output.report import unpack
    return [(r.container, r.dir, r.seq, r.t0, r.latency, r.len, r.cpu, r.hops) for r in unpack(raw)]


def _direction_counts(raw: bytes) -> list[int]:
    from mace.output.report import unpack
    out = [0, 0]
    for r in unpack(raw):
        out[r.dir] += 1
    return out


def synthetic(quick: bool) -> dict:
    from mace.capture._ring import EVENT_SIZE
    from mace.correlate import _correlate
    from mace.output.report import unpack
    from mace.testing.kernel import build_images, model_plan
    from mace.testing.reference import COUNTERS, ReferenceCorrelator, ReferenceDecoder, merge
    from mace.testing.synthetic import builtin_layout
    from mace.tracer import DEFAULT_MAX_AGE_NS, DEFAULT_TABLE_SIZE

    plan = model_plan()
    probes = plan.probes()
    layouts = [builtin_layout(p.tracepoint) for p in probes]
    t_build = time.monotonic()
    images, info = build_images(plan, probes, pages=RING_PAGES, ncpu=SYN_CPUS)
    build_s = time.monotonic() - t_build
    total = sum(info["records_per_ring"])
    reps = 25 if quick else 300
    originals = [bytes(img.buf) for img in images]
    rings = _rings([img.buf for img in images], layouts, plan.devices)
    views = [memoryview(img.buf) for img in images]   # also pins the buffers' size

    def restore():
        for v, o in zip(views, originals, strict=True):
            v[:] = o

    def correlator():
        return plan.correlator(probes, table_size=DEFAULT_TABLE_SIZE, max_age_ns=DEFAULT_MAX_AGE_NS,
                               ncpu=SYN_CPUS)

    busy = wait_quiet()
    gc_was = gc.isenabled()
    gc.disable()
    try:
        # 1. the whole pipeline: decode + merge + correlate
        full_times, full_cpu = [], []
        cy_raw = b""
        cy_counters = None
        for rep in range(reps + 1):
            restore()
            corr = correlator()
            c0 = time.thread_time()
            t0 = time.perf_counter()
            n, raw = _feed_all(rings, corr)
            dt = time.perf_counter() - t0
            dc = time.thread_time() - c0
            if n != total:
                raise RuntimeError(f"feed consumed {n} events, the rings hold {total}")
            if rep:
                full_times.append(dt)
                full_cpu.append(dc)
            if cy_raw and _report_tuples(raw) != _report_tuples(cy_raw):
                raise RuntimeError("two repetitions produced different reports")
            cy_raw = raw
        corr.finish()
        cy_counters = corr.counters()
        # 2. correlation alone, on the decoded and merged events
        restore()
        rings.drain(final=True)
        packed = rings.batch_bytes()
        if len(packed) != total * EVENT_SIZE:
            raise RuntimeError("one drain did not release every event")
        corr_times = []
        for rep in range(reps + 1):
            corr = correlator()
            t0 = time.perf_counter()
            corr.feed_bytes(packed)
            raw = corr.take_reports()
            dt = time.perf_counter() - t0
            if rep:
                corr_times.append(dt)
            if _report_tuples(raw) != _report_tuples(cy_raw):
                raise RuntimeError("feed_bytes and Rings.feed produced different reports")
    finally:
        restore()
        for v in views:
            v.release()
        rings.close()
        if gc_was:
            gc.enable()

    # 3. the pure-Python reference on the same bytes (unwrapping them is not timed)
    data = [img.data() for img in images]
    classes, owner = plan.device_classes()
    kinds = [_correlate.TYPES.get(p.tracepoint, 0) for p in probes]
    ref_times = []
    ref = None
    for _ in range(1 if quick else 3):
        t0 = time.perf_counter()
        dec = ReferenceDecoder(kinds=layouts, devices=plan.devices)
        released, _kept = merge([dec.decode(d, cpu)[0] for cpu, d in enumerate(data)])
        ref = ReferenceCorrelator(kinds, classes, owner, plan.inner_slots(),
                                  max_age_ns=DEFAULT_MAX_AGE_NS, hops=plan.hops,
                                  bridge=bool(plan.bridges), end_at_queue=plan.end_at_queue,
                                  veth_start=plan.start_at_veth, route=plan.route, socket=plan.socket)
        ref.feed(released)
        ref.finish()
        ref_times.append(time.perf_counter() - t0)
    cy_reports = [(r.container, r.dir, r.seq, r.t0, r.latency, r.len, r.cpu)
                  for r in unpack(cy_raw)]
    ref_reports = [(r.container, r.dir, r.seq, r.t0, r.latency, r.len, r.cpu) for r in ref.reports]
    cy_dirs = _direction_counts(cy_raw)
    ref_counts = [{d: dict(ref.count[c][i]) for i, d in enumerate(DIRECTIONS)}
                  for c in range(len(plan.containers))]
    cy_counts = [{d: {k: v for k, v in cy_counters["containers"][c][d].items()
                      if k in COUNTERS}
                  for d in DIRECTIONS} for c in range(len(plan.containers))]

    full_med = statistics.median(full_times)
    corr_med = statistics.median(corr_times)
    ref_med = statistics.median(ref_times)
    return {
        "ring_pages": RING_PAGES,
        "records": total,
        **info,
        "bytes": sum(img.head - img.tail for img in images),
        "devices": plan.devices,
        "tracepoints": [p.tracepoint for p in probes],
        "build_seconds": round(build_s, 2),
        "table_size": DEFAULT_TABLE_SIZE,
        "full": {
            "reps": len(full_times),
            "median_s": full_med,
            "min_s": min(full_times),
            "p90_s": sorted(full_times)[int(0.9 * (len(full_times) - 1))],
            "events_per_s": total / full_med,
            "best_events_per_s": total / min(full_times),
            "ns_per_event": full_med / total * 1e9,
            "cpu_median_s": statistics.median(full_cpu),
            "cpu_events_per_s": total / statistics.median(full_cpu),
        },
        "others_busy_before": busy,
        "correlate_only": {
            "reps": reps,
            "median_s": corr_med,
            "min_s": min(corr_times),
            "events_per_s": total / corr_med,
            "ns_per_event": corr_med / total * 1e9,
        },
        "reference": {
            "reps": len(ref_times),
            "median_s": ref_med,
            "events_per_s": total / ref_med,
            "reports": len(ref_reports),
        },
        "ratio": ref_med / full_med,
        "reports": {"egress": cy_dirs[0], "ingress": cy_dirs[1]},
        "same_count": len(cy_reports) == len(ref_reports),
        "identical": cy_reports == ref_reports and cy_counts == ref_counts,
        "matches_model": cy_dirs == [info["expected_reports"]["egress"],
                                     info["expected_reports"]["ingress"]],
        "counters": cy_counts,
        "global": cy_counters["global"],
    }


# -- live ------------------------------------------------------------------------------------

SINK = textwrap.dedent("""
    import socket, sys, time
    port, seconds = int(sys.argv[1]), float(sys.argv[2])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port)); s.settimeout(0.2)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try: s.recv(65536)
        except socket.timeout: pass
""")

SOURCE = textwrap.dedent("""
    import socket, sys, time
    host, port, seconds, count, size, rate = (sys.argv[1], int(sys.argv[2]), float(sys.argv[3]),
                                              int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6]))
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if rate < 0:                        # flood: never sleep on a full send buffer
        s.setblocking(False)
    data = b"x" * size
    burst = 16
    now = time.monotonic()
    end, due = now + seconds, now
    n = 0
    while n < count and now < end:
        for _ in range(burst):
            try:
                s.sendto(data, (host, port))
                n += 1
            except OSError:             # EAGAIN (send buffer full), ENOBUFS (qdisc full)
                pass
        now = time.monotonic()
        if rate > 0:                    # paced: bursts of 16 at the mean rate
            due += burst / rate
            if due > now:
                time.sleep(due - now)
                now = time.monotonic()
    print(n)
""")


def _sum_dir(stats: dict, direction: str, containers) -> dict:
    keys = ("crossed", "reports", "local", "dropped", "orphans", "expired", "evicted",
            "rejected", "in_flight")
    out = dict.fromkeys(keys, 0)
    for i in containers:
        for k in keys:
            out[k] += stats["containers"][i][direction].get(k, 0)
    return out


def _live_run(tb, plan, table_size: int, seconds: int, udp_count: int, ping_count: int,
              udp_rate: int) -> dict:
    """One bounded load under a Tracer with `table_size` entries.  udp_rate: datagrams/s per
    UDP sender; -1: as fast as it goes, on a non-blocking socket (a full send buffer does not
    put it to sleep)."""
    from mace.output.report import coverage
    from mace.tracer import Tracer

    sink = tb.popen(tb.peer_ns, [sys.executable, "-c", SINK, str(UDP_PORT), str(seconds + 4)])
    time.sleep(0.25)                # the sink binds before anything is sent
    nreports = [0, 0]

    def count(reports):
        for r in reports:
            nreports[r.dir] += 1

    procs = []
    with Tracer(plan, table_size=table_size, ring_pages=LIVE_RING_PAGES) as tr:
        tr.start()
        t0 = time.monotonic()
        for c in tb.containers:
            procs.append(tb.popen(c.ns, ["ping", "-n", "-q", "-f", "-l", str(PING_PRELOAD),
                                         "-c", str(ping_count), "-w", str(seconds),
                                         tb.peer_ip],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            procs.append(tb.popen(c.ns, [sys.executable, "-c", SOURCE, tb.peer_ip, str(UDP_PORT),
                                         str(seconds), str(udp_count), str(UDP_PAYLOAD),
                                         str(udp_rate)],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
        deadline = t0 + seconds + 5
        tr.run(until=lambda: all(p.poll() is not None for p in procs)
               or time.monotonic() > deadline, on_reports=count)
        load_s = time.monotonic() - t0
        for p in procs:
            if p.poll() is None:
                p.kill()
        # the shaped uplink still holds up to half a second of packets: let it drain
        settle = time.monotonic() + 0.7
        tr.run(until=lambda: time.monotonic() > settle, on_reports=count)
        count(tr.stop())
        stats = tr.stats()
        kernel_by_tp = tr.capture.kernel_dropped()
    udp_sent = 0
    for p in procs:
        out, _ = p.communicate(timeout=10)
        if out and out.strip().isdigit():
            udp_sent += int(out.strip())
    sink.terminate()                # its own time bound is only a backstop
    try:
        sink.wait(timeout=5)
    except subprocess.TimeoutExpired:
        sink.kill()
        sink.wait(timeout=5)
    traced = range(len(plan.containers))
    rings = stats["rings"]
    per_dir = {}
    for d in DIRECTIONS:
        k = _sum_dir(stats, d, traced)
        cov = coverage(k)
        per_dir[d] = {**k, "coverage": cov, "reports_seen": nreports[0 if d == "egress" else 1]}
    crossed = per_dir["egress"]["crossed"] + per_dir["ingress"]["crossed"]
    return {
        "table_size": table_size,
        "table_bytes": stats["correlator"]["table_bytes"],
        "udp_rate": udp_rate,
        "load_s": round(load_s, 3),
        "egress": per_dir["egress"],
        "ingress": per_dir["ingress"],
        "evicted_unattributed": stats["correlator"]["evicted"],
        "max_probe": stats["correlator"]["max_probe"],
        "events": rings.get("events", 0),
        "lost": rings.get("lost", 0),
        "kernel_dropped": rings.get("kernel_dropped", 0),
        "kernel_dropped_by_tracepoint": kernel_by_tp,
        "udp_sent": udp_sent,
        "crossed": crossed,
        "packets_per_s": crossed / load_s if load_s else 0.0,
        "events_per_s": rings.get("events", 0) / load_s if load_s else 0.0,
        "correlator": {k: stats["correlator"][k] for k in
                       ("events", "frees", "unclaimed", "foreign", "stale", "evicted",
                        "superseded", "inserts", "parked")},
    }


def _live_blocker() -> str | None:
    if os.geteuid() != 0:
        return "needs root (perf tracepoints, network namespaces)"
    for cmd, pkg in (("ping", "iputils-ping"), ("nft", "nftables"), ("nsenter", "util-linux")):
        if shutil.which(cmd) is None:
            return f"needs {cmd} ({pkg})"
    return None


def live(quick: bool) -> dict:
    """The sweep over table sizes with paced UDP senders (the same load every time), then
    the default table once more under unpaced floods: the highest rate this machine makes."""
    reason = _live_blocker()
    if reason:
        return {"skipped": reason}
    from mace.plan import ContainerPath, Plan
    from mace.testing.testbed import Testbed
    from mace.tracer import DEFAULT_TABLE_SIZE

    sizes = QUICK_SIZES if quick else LIVE_SIZES
    seconds = 2 if quick else 4        # whole seconds: ping -w takes an integer
    udp_count = 150_000 if quick else 400_000
    ping_count = 20_000 if quick else 50_000
    runs = []
    flood = None
    try:
        with Testbed(containers_n=3, masquerade=True, uplink_rate_kbit=UPLINK_KBIT) as tb:
            plan = Plan([ContainerPath(c.ns, c.inner, c.veth, tb.bridge)
                         for c in tb.containers[:2]], tb.uplink)
            # ARP, neighbour entries and the NAT's conntrack entries, outside the measurement
            for c in tb.containers:
                tb.run(c.ns, ["ping", "-n", "-c", "1", "-w", "2", tb.peer_ip], timeout=5)
            for size in sizes:
                runs.append(_live_run(tb, plan, size, seconds, udp_count, ping_count,
                                      UDP_PACED_RATE))
            flood = _live_run(tb, plan, DEFAULT_TABLE_SIZE, seconds, udp_count, ping_count, -1)
    except Exception as e:   # a broken testbed must not hide the synthetic numbers
        return {"error": f"{type(e).__name__}: {e}", "runs": runs, "flood": flood}
    return {"sizes": sizes, "seconds": seconds, "udp_count": udp_count, "ping_count": ping_count,
            "udp_paced_rate": UDP_PACED_RATE, "uplink_kbit": UPLINK_KBIT,
            "ring_pages": LIVE_RING_PAGES, "udp_payload": UDP_PAYLOAD,
            "ping_preload": PING_PRELOAD, "cpus": os.cpu_count(), "runs": runs, "flood": flood}


# -- harness interface -------------------------------------------------------------------------

def run(quick: bool) -> dict:
    from mace.correlate import _correlate
    from mace.tracer import DEFAULT_TABLE_SIZE
    if _correlate.ENTRY_SIZE != ENTRY_BYTES:
        raise RuntimeError(f"table entries are {_correlate.ENTRY_SIZE} bytes, not {ENTRY_BYTES}")
    return {"entry_bytes": _correlate.ENTRY_SIZE, "default_table_size": DEFAULT_TABLE_SIZE,
            "synthetic": synthetic(quick), "live": live(quick)}


def _mem(n: int) -> str:
    if n >= 1 << 20:
        return f"{n / 2**20:g} MiB"
    if n >= 1 << 10:
        return f"{n / 2**10:g} KiB"
    return f"{n} B"


def _pct(x) -> str:
    return "n/a" if x is None else f"{x * 100:.2f}%"


def _full(run_: dict) -> bool:
    """Strictly 100% in both directions (a direction without packets does not count), and
    nothing left in flight once the uplink's queue had drained: such a packet will never be
    reported either, though `coverage` does not count it."""
    covs = [run_[d]["coverage"] for d in DIRECTIONS]
    return (all(c in (1.0, None) for c in covs) and any(c is not None for c in covs)
            and _left(run_) == 0)


def _left(run_: dict) -> int:
    return run_["egress"]["in_flight"] + run_["ingress"]["in_flight"]


def _misses(run_: dict) -> int:
    return sum(run_[d][k] for d in DIRECTIONS
               for k in ("orphans", "expired", "evicted", "rejected"))


def _evicted(run_: dict) -> int:
    return run_["egress"]["evicted"] + run_["ingress"]["evicted"] + run_["evicted_unattributed"]


def _kernel_only(run_: dict) -> bool:
    """No entry was given up for room, and the kernel's silent drops (plus ring losses)
    suffice to explain every miss: each dropped sample can cost at most one report."""
    return (_evicted(run_) == 0
            and _misses(run_) + _left(run_) <= run_["kernel_dropped"] + run_["lost"])


def _table_coverage(run_: dict, d: str) -> float | None:
    """Coverage counting only what the table lost (entries evicted for room, and the
    orphans that follows); expiries and rejections are what a step never written causes."""
    k = run_[d]
    total = k["reports"] + k["evicted"] + k["orphans"]
    return k["reports"] / total if total else None


def _smallest(runs: list[dict], ok) -> dict | None:
    """The smallest size from which every larger size measured satisfies ok."""
    best = None
    for r in sorted(runs, key=lambda r: r["table_size"], reverse=True):
        if not ok(r):
            break
        best = r
    return best


def _findings(result: dict) -> dict:
    """What the live runs say: smallest table with 100%, the default's coverage."""
    lv = result.get("live", {})
    runs = [r for r in lv.get("runs", []) if "egress" in r]
    default = result.get("default_table_size", 1 << 16)
    out: dict = {"runs": runs, "flood": lv.get("flood")}
    if not runs:
        return out
    out["smallest"] = _smallest(runs, _full)
    out["smallest_clean"] = _smallest(runs, lambda r: _full(r) or _kernel_only(r))
    out["default"] = next((r for r in runs if r["table_size"] == default), None)
    rated = runs + ([out["flood"]] if out["flood"] else [])
    out["max_run"] = max(rated, key=lambda r: r["packets_per_s"])
    out["sweep_rates"] = (min(r["packets_per_s"] for r in runs),
                          max(r["packets_per_s"] for r in runs))
    return out


def _size_label(r: dict | None) -> str:
    if r is None:
        return "none of the sizes measured"
    return (f"2^{r['table_size'].bit_length() - 1} = {r['table_size']:,} entries "
            f"({_mem(r['table_bytes'])})")


def _coverage_text(r: dict) -> str:
    return (f"{_pct(r['egress']['coverage'])} / {_pct(r['ingress']['coverage'])} at "
            f"{r['packets_per_s']:,.0f} packets/s; {_misses(r):,} missed, {_evicted(r):,} "
            f"evicted, {_left(r):,} left in flight after the queue drained; kernel_dropped "
            f"{r['kernel_dropped']:,}, rings lost {r['lost']:,}")


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    syn = result["synthetic"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(14, 5.6), gridspec_kw={"width_ratios": [1.7, 1]})

    f = _findings(result)
    runs = sorted(f.get("runs", []), key=lambda r: r["table_size"])
    if runs:
        lv = result["live"]
        xs = [r["table_size"].bit_length() - 1 for r in runs]
        fl = f.get("flood")
        cov = [r[d]["coverage"] for r in runs + ([fl] if fl else []) for d in DIRECTIONS
               if r[d]["coverage"] is not None]
        lo = min(cov) * 100 if cov else 0.0
        ymin = max(0.0, lo - (100 - lo) * 0.3 - 2)
        ytop = 100 + (100 - ymin) * 0.12
        span = ytop - ymin
        for d, color, marker in (("egress", "tab:blue", "o"), ("ingress", "tab:orange", "s")):
            ys = [r[d]["coverage"] * 100 if r[d]["coverage"] is not None else float("nan")
                  for r in runs]
            a1.plot(xs, ys, marker=marker, color=color,
                    label=f"{d}, paced UDP ({lv['udp_paced_rate'] // 1000}k/s per sender)")
            for x, y in zip(xs, ys, strict=True):
                if y == y:
                    a1.annotate(f"{y:.2f}" if y < 100 else "100", (x, y), fontsize=7, color=color,
                                xytext=(-6, 7 if d == "egress" else -12),
                                textcoords="offset points", ha="right")
            own = [_table_coverage(r, d) for r in runs]
            a1.plot(xs, [y * 100 if y is not None else float("nan") for y in own], ls="--",
                    lw=1, color=color, alpha=0.55,
                    label=f"{d}, only the table's misses counted (evicted, orphans)")
            if fl and fl[d]["coverage"] is not None:
                y = fl[d]["coverage"] * 100
                x = xs[-1] + 1.3
                a1.plot([x], [y], marker="*", ms=13, color=color, ls="none",
                        label=f"{d}, unpaced flood (default table)")
                a1.annotate(f"{y:.2f}" if y < 100 else "100", (x, y), fontsize=7, color=color,
                            xytext=(7, 7 if d == "egress" else -12), textcoords="offset points")
        a1.set_ylim(ymin, ytop)
        a1.axhline(100, color="gray", lw=0.8, ls=":")
        for x, r in zip(xs, runs, strict=True):
            a1.text(x, ymin + span * 0.02,
                    f"{_mem(r['table_bytes'])}\nevicted {_evicted(r):,}\nleft {_left(r):,}"
                    f"\nkdrop {r['kernel_dropped']:,}" + (f"\nlost {r['lost']:,}" if r["lost"] else ""),
                    ha="center", va="bottom", fontsize=7, color="dimgray")
        if fl:
            a1.text(xs[-1] + 1.3, ymin + span * 0.02,
                    f"{_mem(fl['table_bytes'])}\n{fl['packets_per_s'] / 1e3:.0f}k pkt/s\n"
                    f"evicted {_evicted(fl):,}\nleft {_left(fl):,}\nkdrop {fl['kernel_dropped']:,}",
                    ha="center", va="bottom", fontsize=7, color="dimgray")
            a1.axvline(xs[-1] + 0.65, color="gray", lw=0.6)
        ticks = xs + ([xs[-1] + 1.3] if fl else [])
        a1.set_xticks(ticks)
        a1.set_xticklabels([f"$2^{{{x}}}$" for x in xs]
                           + ([f"$2^{{{fl['table_size'].bit_length() - 1}}}$\nflood"] if fl else []))
        a1.set_xlim(min(xs) - 0.8, max(ticks) + 0.8)
        a1.set_xlabel("correlation table entries (log2); below: table memory, entries evicted, "
                      "left in flight at stop, samples the kernel dropped", fontsize=8.5)
        a1.set_ylabel("coverage: reports / packets that should be reported (%)")
        lo_r, hi_r = f["sweep_rates"]
        a1.set_title(f"live: 3 containers flood (ping -f -l {lv['ping_preload']} + UDP) through a "
                     f"{lv['uplink_kbit'] // 1000} Mbit/s shaped uplink, 2 traced\n"
                     f"sweep {lo_r / 1e3:.1f}-{hi_r / 1e3:.1f}k packets/s crossing"
                     + (f"; unpaced flood {fl['packets_per_s'] / 1e3:.0f}k/s" if fl else ""),
                     fontsize=9.5)
        a1.legend(loc="center left", bbox_to_anchor=(0.0, 0.62), fontsize=7.2, framealpha=0.85)
        a1.grid(alpha=0.3)
    else:
        lv = result.get("live", {})
        a1.axis("off")
        a1.text(0.5, 0.5, "live run skipped:\n" + str(lv.get("skipped") or lv.get("error")),
                ha="center", va="center", wrap=True)

    names = ["Cython\nRings.feed\n(decode+merge\n+correlate)", "Cython\nfeed_bytes\n(correlate\nonly)",
             "pure Python\nreference"]
    vals = [syn["full"]["events_per_s"], syn["correlate_only"]["events_per_s"],
            syn["reference"]["events_per_s"]]
    rate_bars(a2, names, vals, ["tab:blue", "tab:cyan", "tab:gray"], TARGET_RATE, 5)
    a2.set_ylabel("events / s, one core (log)")
    a2.tick_params(axis="x", labelsize=8)
    a2.set_title(f"synthetic: 2 x {syn['ring_pages']}-page rings, {syn['records']:,} events\n"
                 f"full pipeline is {syn['ratio']:.0f}x the reference; "
                 f"reports {'identical' if syn['identical'] else 'DIFFER'}", fontsize=9.5)
    save(fig, path)


def summary(result: dict) -> list[dict]:
    syn = result["synthetic"]
    rate = syn["full"]["events_per_s"]
    entry = result.get("entry_bytes", ENTRY_BYTES)
    default = result.get("default_table_size", 1 << 16)
    rows = [
        {"metric": "events/s, full pipeline (decode + merge + correlate, Cython, one core, median)",
         "value": fmt_rate(rate), "target": ">= 10 M/s", "met": rate >= TARGET_RATE},
        {"metric": "events/s, correlation alone (Correlator.feed_bytes, median)",
         "value": fmt_rate(syn["correlate_only"]["events_per_s"]), "target": "", "met": None},
        {"metric": "full pipeline vs the pure-Python reference (decoder + merge + correlator)",
         "value": f"{syn['ratio']:.0f}x", "target": "", "met": None},
        {"metric": "Cython and reference reports (synthetic)",
         "value": f"{syn['reports']['egress'] + syn['reports']['ingress']:,} vs "
                  f"{syn['reference']['reports']:,}"
                  + (", identical" if syn["identical"] else ", DIFFERENT")
                  + (", = the model's completed packets" if syn["matches_model"]
                     else f", model expects {sum(syn['expected_reports'].values()):,}"),
         "target": "same count", "met": syn["same_count"]},
    ]
    mem_row = {"metric": "memory of the default table",
               "value": f"{_mem(default * entry)} ({default:,} entries x {entry} B)",
               "target": "", "met": None}
    f = _findings(result)
    lv = result.get("live", {})
    if not f.get("runs"):
        rows.append({"metric": "live coverage vs table size",
                     "value": "skipped: " + str(lv.get("skipped") or lv.get("error")),
                     "target": "", "met": None})
        return rows + [mem_row]
    fl, d = f.get("flood"), f.get("default")
    top = fl or d
    if top is not None:
        which = "unpaced flood" if top is fl else "paced sweep"
        rows.append({
            "metric": f"live coverage, default table ({default:,} entries), at the highest rate "
                      f"({which}), egress / ingress",
            "value": _coverage_text(top), "target": "100%", "met": _full(top)})
        rows.append({
            "metric": "  same run: misses (and packets left in flight) beyond what the kernel's "
                      "dropped samples explain",
            "value": "none" if _full(top) or _kernel_only(top) else
                     f"{_misses(top) + _left(top):,} misses or left, {_evicted(top):,} evictions, "
                     "only "
                     f"{top['kernel_dropped'] + top['lost']:,} samples dropped or lost",
            "target": "none", "met": _full(top) or _kernel_only(top)})
    if d is not None and d is not top:
        rows.append({"metric": "live coverage, default table, paced sweep, egress / ingress",
                     "value": _coverage_text(d), "target": "100%", "met": _full(d)})
    rows.append({
        "metric": "smallest table with 100% coverage and nothing left in flight (both "
                  "directions, and every larger size)",
        "value": _size_label(f.get("smallest")), "target": "", "met": None})
    rows.append({
        "metric": "smallest table with no evictions and no misses (or packets left in flight) "
                  "beyond the kernel's dropped samples (and every larger size)",
        "value": _size_label(f.get("smallest_clean")), "target": "", "met": None})
    rows.append(mem_row)
    lo_r, hi_r = f["sweep_rates"]
    rows.append({"metric": "packets/s crossing the traced containers' boundary (both directions)",
                 "value": f"sweep {lo_r:,.0f}-{hi_r:,.0f}"
                          + (f"; unpaced flood {fl['packets_per_s']:,.0f}" if fl else ""),
                 "target": "", "met": None})
    if lv.get("error"):
        rows.append({"metric": "live run", "value": f"incomplete: {lv['error']}", "target": "",
                     "met": False})
    return rows


def notes(result: dict) -> list[str]:
    syn = result["synthetic"]
    full, only, ref = syn["full"], syn["correlate_only"], syn["reference"]
    kinds = ", ".join(f"{tp} {n:,}" for tp, n in syn["events_by_tracepoint"].items())
    out = [
        f"Synthetic: 2 rings x {syn['ring_pages']} pages ({syn['fill_per_ring'][0] * 100:.1f}% and "
        f"{syn['fill_per_ring'][1] * 100:.1f}% full, {syn['records']:,} samples: {kinds}), "
        f"{syn['span_ms']} ms of a modelled kernel: ping -f -l {PING_PRELOAD} and a UDP sender in "
        "each of 3 containers (2 monitored, the third seen only through its `eth0` and the "
        "uplink), a shaped uplink that queued up to "
        f"{syn['qdisc_max_queued']} packets and dropped {syn['qdisc_drops']:,}, echo replies, "
        f"unrelated drops, and skb addresses recycled LIFO per CPU from a pool of "
        f"{syn['skb_pool']} (at most {syn['skb_max_live']} in use at once). Each call chain runs "
        "on one CPU uninterrupted (synchronous steps adjacent), CPU clocks only advance, both "
        "rings are cut at the same instant.",
        f"`Rings.feed(correlator, final=True)` + `take_reports()` timed alone ({full['reps']} "
        "repetitions after one warm-up; images restored byte for byte and a fresh correlator with "
        f"the default {syn['table_size']:,}-entry table before each): median "
        f"{full['median_s'] * 1e3:.2f} ms, {full['ns_per_event']:.1f} ns/event (fastest "
        f"repetition {fmt_rate(full['best_events_per_s'])}, p90 {full['p90_s'] * 1e3:.2f} ms). "
        f"`Correlator.feed_bytes` on the decoded, merged events: {only['ns_per_event']:.1f} "
        f"ns/event, so decode + merge cost ~{full['ns_per_event'] - only['ns_per_event']:.1f} "
        "ns/event. Images and table are warm in cache. Before timing, the benchmark waited "
        "(at most 2 s) for the other CPUs to go idle (busy share then "
        + ("?" if syn.get("others_busy_before") is None else
           f"{syn['others_busy_before'] * 100:.0f}%")
        + "); the thread's own CPU time gives "
        + (f"{fmt_rate(full['cpu_events_per_s'])}" if "cpu_events_per_s" in full else "?")
        + " for the full pipeline.",
        f"Reference: `ReferenceDecoder` + `merge` + `ReferenceCorrelator` on the unwrapped bytes, "
        f"{ref['reps']} repetition(s), median {ref['median_s'] * 1e3:.0f} ms. Reports: "
        f"{syn['reports']['egress']:,} egress + {syn['reports']['ingress']:,} ingress from Cython, "
        f"{ref['reports']:,} from the reference"
        + (" (identical reports and counters)" if syn["identical"] else " (they DIFFER)")
        + "; the model completed "
        f"{syn['expected_reports']['egress']:,} + {syn['expected_reports']['ingress']:,} "
        "monitored packets inside the window.",
    ]
    lv = result.get("live", {})
    if lv.get("skipped") or lv.get("error"):
        out.append(f"Live run not (fully) measured: {lv.get('skipped') or lv.get('error')}")
    if lv.get("runs") and "sizes" in lv:
        runs = lv["runs"] + ([lv["flood"]] if lv.get("flood") else [])
        out.append(
            f"Live: Testbed(containers_n=3, masquerade=True, uplink_rate_kbit={lv['uplink_kbit']}) "
            "(token bucket, 500 ms latency: the uplink queues hundreds of packets); Tracer over "
            f"containers 0 and 1 with {lv['ring_pages']}-page rings. Per table size, the same "
            f"bounded load: in each of the 3 containers `ping -f -l {lv['ping_preload']} -c "
            f"{lv['ping_count']:,} -w {lv['seconds']}` and a Python UDP sender "
            f"({lv['udp_payload']}-byte payloads, paced at {lv['udp_paced_rate']:,}/s, at most "
            f"{lv['udp_count']:,} datagrams or {lv['seconds']} s) to a sink in the peer; then "
            "0.7 s for the queue to drain before `Tracer.stop()`. Last, the default table once "
            "more with the UDP senders unpaced (non-blocking sockets, as fast as they go): the "
            "highest rate of the run. "
            "Coverage = `mace.output.report.coverage` of the counters summed over the two traced "
            "containers (packets dropped by the qdisc are not misses, nor are entries still in "
            "flight at stop; as the queue had drained by then, those are reported beside it as "
            "'left', and a \"100%\" target means coverage 100% with nothing left); packets/s = "
            "packets that crossed their boundary (both directions) / load time.")
        kd = [r["kernel_dropped"] for r in runs]
        by_tp: dict = {}
        for r in runs:
            for tp, n in (r.get("kernel_dropped_by_tracepoint") or {}).items():
                by_tp[tp] = by_tp.get(tp, 0) + n
        split = ", ".join(f"{tp} {n:,}" for tp, n in sorted(by_tp.items(), key=lambda t: -t[1]))
        clean = [r for r in runs if _evicted(r) == 0]
        lost_steps = {d: sum(r[d]["expired"] + r[d]["rejected"] + r[d]["in_flight"] for r in clean)
                      for d in DIRECTIONS}
        out.append(
            f"Samples the kernel dropped without a LOST record: {min(kd):,}-{max(kd):,} per run"
            + (f" (all runs: {split})" if split else "")
            + ". On this VM CPU 1 silently drops tracepoint samples taken in interrupt context "
            "while idle. In the runs without evictions the misses are expired or rejected "
            "entries, or entries left in flight, which is how an entry waiting for a step that "
            f"was never written ends: {lost_steps['egress']:,} egress, "
            f"{lost_steps['ingress']:,} ingress (an egress "
            "packet's last step, the uplink transmission, often comes from the qdisc watchdog "
            "timer, i.e. from interrupt context on a possibly idle CPU). Ring LOST "
            f"records {min(r['lost'] for r in runs):,}-{max(r['lost'] for r in runs):,}. Coverage "
            "shortfalls that coincide with kernel_dropped > 0 (and no evictions) are the "
            "kernel's, not the table's: a packet whose step was never written cannot be "
            "reported, and its entry then expires or is rejected when its address is reused.")
    return out

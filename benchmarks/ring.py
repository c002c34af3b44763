"""The capture hot loop: decode + cross-CPU merge throughput, and a live ping flood.

1. Synthetic: two full perf ring images (one per CPU) of realistic net events are drained
   by `Rings.drain(final=True)` (decode every sample, resolve device names, merge the CPUs
   into time order; GIL released, one core).  The images are restored byte for byte
   (head/tail included) before every repetition and only the drain is timed.  The same
   bytes go through the pure-Python `ReferenceDecoder` + `merge` for the speed ratio, and
   both outputs must be identical.
2. Live: a throwaway testbed, a `Capture` of four net tracepoints filtered to its devices,
   a reader thread looping `wait(50)` + `read()`, and a bounded `ping -f` from the
   container to the peer (plus a preloaded `ping -f -l 8`).  Reports events/s, lost
   events and the reader's own CPU time per million events.
"""

from __future__ import annotations

import gc
import os
import random
import re
import shutil
import statistics
import subprocess
import threading
import time
from pathlib import Path

from benchmarks.common import fmt_rate, pyplot, rate_bars, save

SYNTH_TRACEPOINTS = ["net:net_dev_start_xmit", "net:netif_receive_skb", "net:netif_rx",
                     "net:net_dev_queue", "skb:kfree_skb"]
LIVE_TRACEPOINTS = SYNTH_TRACEPOINTS[:4]
# Eight registered names (what a node with a few containers looks like), plus one that is
# not registered so that the DEV_OTHER path of the lookup is exercised too.
DEVICES = ["eth0", "m3f2a1v0", "m3f2a1v1", "m3f2a1br", "m3f2a1up", "lo", "docker0", "veth9c2e4d1"]
UNREGISTERED = "ens3"
RING_PAGES = 256
# (ping preload, reader mode, ring pages, gc off, role).  The primary runs drain into a
# Cython EventSink with feed(), as mace's correlator does.  The diagnostics show what a
# reader that builds a Python object per event (Capture.read()) costs and loses, with and
# without the garbage collector, and with 16 MiB rings instead of 1 MiB.
LIVE_RUNS = [(0, "feed", 256, False, "primary"), (8, "feed", 256, False, "primary"),
             (0, "read", 256, False, "diagnostic"), (0, "read", 256, True, "diagnostic"),
             (0, "read", 4096, False, "diagnostic")]
TARGET_RATE = 10e6
TARGET_RATIO = 50.0


# -- synthetic images --------------------------------------------------------------------------

def _paths() -> list[list[tuple[str, str]]]:
    """Hops a packet takes, as (tracepoint, device) lists, like the testbed's topology."""
    q, tx, rx, rcv = ("net:net_dev_queue", "net:net_dev_start_xmit", "net:netif_rx",
                      "net:netif_receive_skb")
    v0, v1, br, up = DEVICES[1:5]
    return [
        # container 0 -> bridge -> uplink
        [(q, "eth0"), (tx, "eth0"), (rx, v0), (rcv, v0), (rcv, br), (q, up), (tx, up)],
        # uplink -> bridge -> container 1
        [(rx, up), (rcv, up), (q, br), (tx, br), (q, v1), (tx, v1), (rx, "eth0"), (rcv, "eth0")],
        # container to container over the bridge
        [(q, "eth0"), (tx, "eth0"), (rx, v1), (rcv, v1), (q, v0), (tx, v0), (rcv, "eth0")],
        # loopback, docker bridge, a host veth and an unregistered NIC
        [(q, "lo"), (tx, "lo"), (rx, "lo"), (rcv, "lo")],
        [(rx, "veth9c2e4d1"), (rcv, "veth9c2e4d1"), (q, "docker0"), (tx, "docker0"),
         (q, UNREGISTERED), (tx, UNREGISTERED)],
        [(rx, UNREGISTERED), (rcv, UNREGISTERED), (q, "docker0"), (tx, "docker0")],
    ]


def _event_stream(rng: random.Random, cpu: int, mean_gap_ns: int = 300):
    """Endless (tracepoint, values, ts, tid, flags) for one CPU.  Timestamps advance by
    exponential gaps from a common origin (so the two CPUs interleave); about 2% are written
    out of order, as when an interrupt lands between a sample's clock read and its ring
    reservation."""
    paths = _paths()
    weights = [30, 30, 15, 10, 10, 5]
    clock = 1_000_000_000_000 + rng.randrange(100)
    skb_base = 0xFFFF8881_0000_0000 + (cpu << 28)
    nskb = 0
    while True:
        path = rng.choices(paths, weights)[0]
        skb = skb_base + (nskb % 4096) * 0x100
        nskb += 1
        length = rng.choice((84, 98, 98, 98, 1514, 66, 1448))
        proto = 0x0008  # htons(ETH_P_IP) as the kernel stores it
        tid = rng.choice((0, 0, 1234, 1235, 4242))
        hops = list(path)
        if rng.random() < 0.05:
            hops.append(("skb:kfree_skb", ""))
        for tp, dev in hops:
            clock += max(1, int(rng.expovariate(1 / mean_gap_ns)))
            ts = clock
            if rng.random() < 0.02:
                ts -= rng.randint(1, 3 * mean_gap_ns)   # local disorder
            yield tp, dev, skb, length, proto, ts, tid


def build_images(pages: int = RING_PAGES, seed: int = 7):
    """Two RingImages filled as full as the records allow; returns (images, samples per
    image, how many samples are older than one written before them in their ring)."""
    from mace.testing.synthetic import RingImage, builtin_format, net_values, raw_record, sample

    fmts = {tp: builtin_format(tp) for tp in SYNTH_TRACEPOINTS}
    images, counts, disorder = [], [], 0
    for cpu in range(2):
        rng = random.Random(seed * 100 + cpu)
        img = RingImage(pages)
        n = 0
        misses = 0
        newest = 0
        for tp, dev, skb, length, proto, ts, tid in _event_stream(rng, cpu):
            fmt = fmts[tp]
            values = net_values(fmt, skb, length, dev, proto)
            rec = sample(ts, cpu, tid, raw_record(fmt, values, flags=rng.choice((0, 1, 8))))
            if img.write(rec):
                n += 1
                disorder += ts < newest
                newest = max(newest, ts)
            else:
                misses += 1          # try a few more (smaller records may still fit)
                if misses > 16 or img.free() < 64:
                    break
        images.append(img)
        counts.append(n)
    return images, counts, disorder


def _layouts() -> list[dict]:
    from mace.capture.perf import kind_layout
    from mace.testing.synthetic import builtin_format
    return [kind_layout(builtin_format(tp)) for tp in SYNTH_TRACEPOINTS]


def _make_rings(images, layouts):
    from mace.capture._ring import Rings
    rings = Rings(cpus=list(range(len(images))), ring_pages=RING_PAGES, reorder_ns=0)
    for k in layouts:
        rings.add_kind(**k)
    rings.set_devices(DEVICES)
    for i, img in enumerate(images):
        rings.attach(i, img.buf)
    return rings


def _time_drain(images, layouts, reps: int, expect: int) -> tuple[list[float], object]:
    """Drain the images `reps` times (after one warm-up), restoring them before each."""
    rings = _make_rings(images, layouts)
    originals = [bytes(img.buf) for img in images]
    views = [memoryview(img.buf) for img in images]   # also pins the buffers' size
    times = []
    try:
        for rep in range(reps + 1):
            for v, o in zip(views, originals, strict=True):
                v[:] = o
            t0 = time.perf_counter()
            n = rings.drain(final=True)
            dt = time.perf_counter() - t0
            if n != expect or rings.more:
                raise RuntimeError(f"drain returned {n} events (more={rings.more}), "
                                   f"expected {expect}")
            if rep:
                times.append(dt)
        return times, rings
    finally:
        for v, o in zip(views, originals, strict=True):
            v[:] = o
        for v in views:
            v.release()


def synthetic(quick: bool) -> dict:
    from mace.testing.reference import ReferenceDecoder, merge

    t_build = time.monotonic()
    images, counts, disorder = build_images()
    build_s = time.monotonic() - t_build
    layouts = _layouts()
    total = sum(counts)
    nbytes = sum(img.head - img.tail for img in images)
    reps = 25 if quick else 300

    times, rings = _time_drain(images, layouts, reps, total)
    cy_batch = rings.batch()
    rings.close()
    cy_med = statistics.median(times)

    # sub-step: one ring alone (decode + stage, the merge degenerates into a memcpy)
    one_times, r1 = _time_drain(images[:1], layouts, reps, counts[0])
    r1.close()
    one_med = statistics.median(one_times)

    # the pure-Python reference on the same bytes (unwrapping them is not timed)
    ref = ReferenceDecoder(kinds=layouts, devices=DEVICES)
    data = [img.data() for img in images]
    ref_times = []
    released = []
    for _ in range(2 if quick else 5):
        t0 = time.perf_counter()
        per_ring = [ref.decode(d, cpu)[0] for cpu, d in enumerate(data)]
        released, _kept = merge(per_ring)
        ref_times.append(time.perf_counter() - t0)
    ref_med = statistics.median(ref_times)
    identical = [tuple(e) for e in released] == cy_batch
    devs = {}
    for e in cy_batch:
        devs[e[7]] = devs.get(e[7], 0) + 1
    return {
        "ring_pages": RING_PAGES,
        "records_per_ring": counts,
        "records": total,
        "bytes": nbytes,
        "fill": round(nbytes / (len(images) * RING_PAGES * 4096), 4),
        "devices": DEVICES,
        "device_hits": {str(k): v for k, v in sorted(devs.items())},
        "out_of_order": disorder,
        "build_seconds": round(build_s, 2),
        "cython": {
            "reps": reps,
            "median_s": cy_med,
            "min_s": min(times),
            "p90_s": sorted(times)[int(0.9 * (len(times) - 1))],
            "records_per_s": total / cy_med,
            "best_records_per_s": total / min(times),
            "bytes_per_s": nbytes / cy_med,
            "ns_per_record": cy_med / total * 1e9,
        },
        "cython_one_ring": {
            "reps": reps,
            "median_s": one_med,
            "records_per_s": counts[0] / one_med,
            "ns_per_record": one_med / counts[0] * 1e9,
        },
        "reference": {
            "reps": len(ref_times),
            "median_s": ref_med,
            "records_per_s": total / ref_med,
            "events": len(released),
        },
        "ratio": ref_med / cy_med,
        "same_count": len(released) == len(cy_batch) == total,
        "identical": identical,
    }


# -- live ----------------------------------------------------------------------------------------

def _ping_counts(text: str) -> tuple[int, int]:
    m = re.search(r"(\d+) packets transmitted, (\d+) (?:packets )?received", text)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _live_run(tb, devices: list[str], count: int, preload: int, deadline_s: int, *,
              mode: str = "read", ring_pages: int = 256, gc_off: bool = False) -> dict:
    """One ping flood under a capture.  mode "read": the reader builds Python events with
    `cap.read()`; "feed": it drains into a no-op Cython `EventSink` (the engine alone).
    gc_off: disable Python's cyclic garbage collector for the run."""
    from mace.capture._ring import EventSink
    from mace.capture.perf import Capture, Probe

    c = tb.containers[0]
    probes = [Probe(tp, devices=tuple(devices)) for tp in LIVE_TRACEPOINTS]
    argv = ["ping", "-f", "-q", "-c", str(count), "-s", "56", "-w", str(deadline_s)]
    if preload:
        argv[2:2] = ["-l", str(preload)]
    argv.append(tb.peer_ip)
    box: dict = {}
    with Capture(probes, devices, ring_pages=ring_pages) as cap:
        stop = threading.Event()
        sink = EventSink()

        def drain(final=False) -> int:
            if mode == "feed":
                return cap.feed(sink, final)
            return len(cap.read(final))

        def reader():
            c0 = time.thread_time()
            n = reads = 0
            try:
                while not stop.is_set():
                    cap.wait(50)
                    n += drain()
                    reads += 1
                n += drain(final=True)
            except BaseException as e:      # reported, not swallowed
                box["error"] = repr(e)
            box.update(events=n, reads=reads + 1, cpu_s=time.thread_time() - c0)

        th = threading.Thread(target=reader, name="mace-reader", daemon=True)
        gc_was = gc.isenabled()
        if gc_off:
            gc.collect()
            gc.disable()
        try:
            cap.start()
            th.start()
            t0 = time.monotonic()
            proc = tb.popen(c.ns, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                out, err = proc.communicate(timeout=deadline_s + 15)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            wall = time.monotonic() - t0
            cap.stop()
            stop.set()
            cap.wakeup()
            th.join(timeout=30)
        finally:
            if gc_was:
                gc.enable()
        s = cap.stats()
        kernel_dropped = sum(cap.kernel_dropped().values())
        per_cpu = [{"cpu": c["cpu"], "samples": c["samples"], "lost": c["lost"]}
                   for c in cap.rings.ring_stats()]
    sent, received = _ping_counts(out)
    events = box.get("events", 0)
    res = {
        "command": " ".join(argv[:-1] + ["<peer>"]),
        "preload": preload,
        "reader": mode,
        "ring_pages": ring_pages,
        "gc_off": gc_off,
        "ping_rc": proc.returncode,
        "sent": sent,
        "received": received,
        "wall_s": round(wall, 3),
        "pings_per_s": sent / wall if wall else 0.0,
        "events": events,
        "events_per_packet": events / sent if sent else 0.0,
        "events_per_s": events / wall if wall else 0.0,
        "lost": s.get("lost", 0),
        "kernel_dropped": kernel_dropped,
        "throttled": s.get("throttled", 0),
        "errors": s.get("errors", 0),
        "late": s.get("late", 0),
        "decoded": s.get("events", 0),
        "per_cpu": per_cpu,
        "reads": box.get("reads", 0),
        "reader_cpu_s": round(box.get("cpu_s", 0.0), 4),
        "reader_cpu_s_per_M": box.get("cpu_s", 0.0) / (events / 1e6) if events else None,
        "reader_cpu_share": box.get("cpu_s", 0.0) / wall if wall else 0.0,
    }
    if "error" in box:
        res["error"] = box["error"]
    if proc.returncode not in (0, None) and not sent:
        res["error"] = f"ping exited {proc.returncode}: {err.strip()[-200:]}"
    return res


def _live_blocker() -> str | None:
    if os.geteuid() != 0:
        return "needs root (perf tracepoints, network namespaces)"
    if shutil.which("ping") is None:
        return "needs ping (iputils-ping)"
    return None


def live(quick: bool) -> dict:
    reason = _live_blocker()
    if reason:
        return {"skipped": reason}
    from mace.testing.testbed import Testbed

    count = 20_000 if quick else 200_000
    deadline = 6 if quick else 40
    runs = []
    try:
        with Testbed(containers_n=1) as tb:
            c = tb.containers[0]
            devices = [c.inner, c.veth, tb.bridge, tb.uplink]
            # ARP and the neighbour entries are resolved outside the measurement
            tb.run(c.ns, ["ping", "-c", "1", "-w", "2", tb.peer_ip], timeout=5)
            for preload, mode, pages, gc_off, role in LIVE_RUNS:
                r = _live_run(tb, devices, count, preload, deadline, mode=mode,
                              ring_pages=pages, gc_off=gc_off)
                r["role"] = role
                runs.append(r)
    except Exception as e:   # a broken testbed must not hide the synthetic numbers
        return {"error": f"{type(e).__name__}: {e}", "runs": runs}
    return {"count": count, "deadline_s": deadline, "tracepoints": LIVE_TRACEPOINTS,
            "filtered_devices": ["container eth0", "container veth", "bridge", "uplink"],
            "ring_pages": 256, "cpus": os.cpu_count(), "runs": runs}


# -- harness interface ---------------------------------------------------------------------------

def run(quick: bool) -> dict:
    return {"synthetic": synthetic(quick), "live": live(quick)}


def _live_label(r: dict, sep: str = ", ") -> str:
    parts = ["ping -f -l 8" if r.get("preload") else "ping -f"]
    if r.get("reader") == "feed":
        parts.append("feed() to no-op sink")
    if r.get("gc_off"):
        parts.append("read() with gc off")
    if r.get("ring_pages", 256) != 256:
        parts.append(f"{r['ring_pages']}-page rings")
    return sep.join(parts)


def _short_label(r: dict) -> str:
    head = "ping -f -l 8" if r.get("preload") else "ping -f"
    if r.get("reader") == "feed":
        return head + "\nfeed() into\nno-op sink"
    if r.get("gc_off"):
        return head + "\nread(), gc off"
    if r.get("ring_pages", 256) != 256:
        return head + f"\nread(), {r['ring_pages']}-\npage rings"
    return head + "\nread()"


def _lost_pct(r: dict) -> float:
    total = r["events"] + r["lost"]
    return 100.0 * r["lost"] / total if total else 0.0


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    syn = result["synthetic"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1, 1.8]})

    names = ["Cython\n(Rings.drain)", "pure Python\n(reference)"]
    vals = [syn["cython"]["records_per_s"], syn["reference"]["records_per_s"]]
    rate_bars(a1, names, vals, ["tab:blue", "tab:gray"], TARGET_RATE, 4)
    a1.set_ylabel("records / s (log)")
    a1.set_title(f"decode + merge, 2 x {syn['ring_pages']}-page rings "
                 f"({syn['records']:,} records)\nCython is {syn['ratio']:.0f}x the reference",
                 fontsize=10)

    lv = result.get("live", {})
    runs = [r for r in lv.get("runs", []) if "events_per_s" in r]
    if runs:
        labels = [_short_label(r) for r in runs]
        x = range(len(runs))
        ev = [r["events_per_s"] / 1e3 for r in runs]
        colors = ["tab:green" if r.get("role") != "diagnostic" else "tab:olive" for r in runs]
        b2 = a2.bar(x, ev, color=colors, width=0.55, label="events/s")
        for b, r in zip(b2, runs, strict=True):
            cpu = r.get("reader_cpu_s_per_M")
            a2.text(b.get_x() + b.get_width() / 2, b.get_height() + max(ev) * 0.02,
                    f"{fmt_rate(r['events_per_s'])}\nlost {r['lost']:,}\n({_lost_pct(r):.2f}%)"
                    + (f"\n{cpu:.2f} CPU-s/M ev" if cpu is not None else ""),
                    ha="center", va="bottom", fontsize=7.5)
        a2.set_xticks(list(x))
        a2.set_xticklabels(labels, fontsize=8)
        a2.set_ylabel("events drained / s (thousands)")
        a2.set_ylim(0, max(ev) * 1.45)
        a3 = a2.twinx()
        lost = [r["lost"] for r in runs]
        a3.plot(list(x), lost, "o", color="tab:red", ms=8, label="lost")
        a3.set_ylabel("events lost", color="tab:red")
        a3.set_ylim(0, max(10, max(lost) * 3))     # markers stay inside the bars, below the text
        a3.tick_params(axis="y", colors="tab:red")
        h1, l1 = a2.get_legend_handles_labels()
        h3, l3 = a3.get_legend_handles_labels()
        a2.legend(h1 + h3, l1 + l3, loc="upper left", fontsize=8)
        a2.set_title(f"live: ping flood ({runs[0]['sent']:,} pings) through a testbed\n"
                     "reader thread = wait(50) + feed() to a Cython sink  (olive: read(), diagnostics)",
                     fontsize=10)
    else:
        a2.axis("off")
        a2.text(0.5, 0.5, "live run skipped:\n" + str(lv.get("skipped") or lv.get("error")),
                ha="center", va="center", wrap=True)
    save(fig, path)


def summary(result: dict) -> list[dict]:
    syn = result["synthetic"]
    rate = syn["cython"]["records_per_s"]
    rows = [
        {"metric": "decode + merge, records/s (Cython, 2 rings, median)",
         "value": fmt_rate(rate), "target": ">= 10 M/s", "met": rate >= TARGET_RATE},
        {"metric": "speedup over the pure-Python reference",
         "value": f"{syn['ratio']:.0f}x", "target": ">= 50x",
         "met": syn["ratio"] >= TARGET_RATIO and syn["same_count"]},
    ]
    lv = result.get("live", {})
    runs = [r for r in lv.get("runs", []) if "events_per_s" in r]
    if not runs:
        rows.append({"metric": "live ping flood", "value": "skipped: "
                     + str(lv.get("skipped") or lv.get("error")), "target": "", "met": None})
        return rows
    if lv.get("error"):
        rows.append({"metric": "live ping flood", "value": f"incomplete: {lv['error']}",
                     "target": "", "met": False})
    for r in runs:
        lab = _live_label(r)
        cpu = r.get("reader_cpu_s_per_M")
        cpu_s = "-" if cpu is None else f"{cpu:.2f} s"
        if r.get("role") == "diagnostic":
            rows.append({"metric": f"diagnostic: {lab}",
                         "value": f"{fmt_rate(r['events_per_s'])}, {r['lost']:,} lost, "
                                  f"{cpu_s} reader CPU per M events", "target": "", "met": None})
            continue
        rows += [
            {"metric": f"live events/s ({lab}, {r['sent']:,} pings)",
             "value": fmt_rate(r["events_per_s"]), "target": "", "met": None},
            {"metric": f"live events lost ({lab})",
             "value": f"{r['lost']:,} ({_lost_pct(r):.2f}% of events)",
             "target": "0", "met": r["lost"] == 0 and "error" not in r},
            {"metric": f"samples the kernel dropped without a LOST record ({lab})",
             "value": f"{r.get('kernel_dropped', 0):,}", "target": "0 (not mace's to fix)",
             "met": None},
            {"metric": f"reader CPU per M events ({lab})", "value": cpu_s,
             "target": "", "met": None},
        ]
    return rows


def notes(result: dict) -> list[str]:
    syn = result["synthetic"]
    cy, one, ref = syn["cython"], syn["cython_one_ring"], syn["reference"]
    out = [
        f"Synthetic: 2 rings x {syn['ring_pages']} pages, {syn['fill'] * 100:.1f}% full, "
        f"{syn['records']:,} samples of 5 tracepoints (4 net + skb:kfree_skb), "
        f"{len(syn['devices'])} registered device names plus one unknown, timestamps interleaved "
        f"across the rings with local disorder ({syn['out_of_order']:,} samples older than an "
        "earlier one in their ring).",
        f"`Rings.drain(final=True)` timed alone (images restored byte for byte before each of "
        f"{cy['reps']} repetitions, one warm-up): median {cy['median_s'] * 1e3:.2f} ms, "
        f"{cy['ns_per_record']:.1f} ns/record, {cy['bytes_per_s'] / 2**30:.2f} GiB/s of ring; "
        f"one ring alone (no heap merge) {one['ns_per_record']:.1f} ns/record. "
        f"The images are warm in cache, as a ring the kernel just wrote would be.",
        f"Reference: `ReferenceDecoder.decode` per ring + `merge`, {ref['reps']} repetitions "
        f"on the unwrapped bytes, median {ref['median_s'] * 1e3:.0f} ms; both produced "
        f"{ref['events']:,} events"
        + (" and identical batches." if syn["identical"] else " but the batches DIFFER."),
    ]
    lv = result.get("live", {})
    if lv.get("skipped") or lv.get("error"):
        out.append(f"Live run not (fully) measured: {lv.get('skipped') or lv.get('error')}")
    if lv.get("runs") and "tracepoints" in lv:
        r0 = lv["runs"][0]
        per_ping = (r0["events"] + r0["lost"]) / r0["sent"] if r0["sent"] else 0
        out.append(
            f"Live: Testbed(containers_n=1), Capture of {', '.join(lv['tracepoints'])} "
            f"filtered in the kernel to the container's eth0, its veth, the bridge and the uplink "
            f"(the name `eth0` also matches the peer's eth0), 256-page rings on {lv['cpus']} CPUs; "
            f"`ping -f [-l 8] -c {lv['count']:,} -s 56 -w {lv['deadline_s']}` from the container "
            f"to the peer, ~{per_ping:.0f} events per ping. events/s = events drained / wall time "
            "of the ping, so it is bounded by how fast ping runs under tracing on 2 CPUs; reader "
            "CPU is `time.thread_time()` of the thread looping `cap.wait(50)` + `cap.feed(sink)` "
            "(primary) or `cap.read()` (diagnostics).")
        ok = [r for r in lv["runs"] if r.get("events")]
        by = {(r.get("reader"), r.get("ring_pages"), bool(r.get("gc_off")), r.get("preload")): r
              for r in ok}
        rd, fd = by.get(("read", 256, False, 0)), by.get(("feed", 256, False, 0))
        ng, big = by.get(("read", 256, True, 0)), by.get(("read", 4096, False, 0))

        def ns(r):
            cpu = r.get("reader_cpu_s_per_M")
            return f"{cpu * 1e3:.0f} ns" if cpu else "?"

        if rd and fd:
            text = (f"Diagnostics (ping -f): the reader spends {ns(rd)} per event in `read()` "
                    f"({rd['lost']:,} lost), {ns(fd)} draining into a no-op Cython `EventSink` "
                    f"with `feed()` ({fd['lost']:,} lost)")
            if ng:
                text += (f", {ns(ng)} in `read()` with the garbage collector off "
                         f"({ng['lost']:,} lost)")
            if big:
                text += f"; `read()` with 4096-page (16 MiB) rings lost {big['lost']:,}"
            out.append(text + ".")
        shares = [max(c["samples"] for c in r["per_cpu"])
                  / max(1, sum(c["samples"] for c in r["per_cpu"])) for r in ok if r.get("per_cpu")]
        if shares and rd:
            cap_ev = 256 * 4096 // 80          # records are 72 or 112 bytes, ~80 on average
            slack_ms = cap_ev / max(1.0, rd["events_per_s"]) * 1e3
            lo, hi = min(shares) * 100, max(shares) * 100
            out.append(f"The busiest CPU's ring took {lo:.0f}-{hi:.0f}% of a run's events "
                       "(ping, the veth softirqs and the reply all run on the CPU ping runs on), "
                       f"and a 256-page ring holds ~{cap_ev // 1000}k events: ~{slack_ms:.0f} ms "
                       f"of slack for the reader at {fmt_rate(rd['events_per_s'])}.")
    return out

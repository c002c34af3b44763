"""Scale: one mace tracing every container of a host with hundreds of them.

A testbed of N containers (500; 40 in the quick run), each a network namespace whose veth
is on the host's bridge, all traced by one `mace.Tracer` with the plan `mace.discover`
makes for all of them, as `mace trace --netns ...` would.  A sample of them (16, the
first and the last among them) pings the peer while the others stay idle.  Two ways of
filtering the veths are run in turn on the same testbed and plan:

    prefix   mace's default past GLOB_FROM veths: the prefix they share (name ~ "m<tag>v*")
    names    every veth by its name, spread over as many perf events as the kernel's page
             of filter text needs (what mace did below the old cap of ~150)

Recorded for each: the time to open and enable the capture (perf events on every CPU),
memory, events/s, mace's CPU (the process: drain thread and the poll loop), each ping's
reports (in its own container, and nowhere else), coverage, and the expense mace reports:
the kernel evaluates a filter's names on every hit of the tracepoint, inside the measured
segments too, so a long list of names shows up in the latencies themselves.  Also the time
the testbed took to build and discovery to find N containers.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from benchmarks.common import DIRECTIONS, pyplot, save, wait_quiet

SENDERS = 16
NEW = 5             # containers added while serve --all runs, each followed
VARIANTS = ("prefix", "names")


def _params(quick: bool) -> dict:
    if quick:
        return {"containers": 40, "senders": 5, "pings": 10, "interval": "0.05"}
    return {"containers": 500, "senders": SENDERS, "pings": 50, "interval": "0.02"}


def _senders(n: int, k: int) -> list[int]:
    """k container indexes spread evenly over n, the first and the last among them."""
    k = min(k, n)
    return sorted({round(j * (n - 1) / (k - 1)) for j in range(k)}) if k > 1 else [0]


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _quantile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _trace(tb, plan, name: str, p: dict, senders: list[int]) -> dict:
    """Trace `plan` while the senders ping; the numbers of one variant."""
    import subprocess

    import mace.plan
    from mace.output.report import coverage
    from mace.tracer import Tracer

    saved = mace.plan.GLOB_FROM
    if name == "names":
        mace.plan.GLOB_FROM = 1 << 30           # no prefix stands for the veths
    try:
        rss0 = _rss_mib()
        t0 = time.monotonic()
        tr = Tracer(plan)
        tr.open()
        t1 = time.monotonic()
        try:
            tr.start()
            t2 = time.monotonic()
            rss1 = _rss_mib()
            cap = tr.capture
            out = {"variant": name, "glob_from": mace.plan.GLOB_FROM if name == "prefix" else None,
                   "prefixes": sorted({x for pr in cap.probes for x in pr.prefixes}),
                   "filters_per_tracepoint": {pr.tracepoint: len(f) for pr, f in zip(cap.probes, cap.filters,
                                                                                       strict=True)},
                   "events_per_cpu": cap.events_per_cpu, "cpus": len(cap.cpus),
                   "perf_events": cap.events_per_cpu * len(cap.cpus),
                   "open_s": round(t1 - t0, 4), "start_s": round(t2 - t1, 4),
                   "ring_mib": cap.ring_pages * 4096 * len(cap.cpus) / 2**20,
                   "table_mib": tr.table_size * 64 / 2**20,
                   "rss_mib_before": round(rss0, 1), "rss_mib_traced": round(rss1, 1)}
            reports: list = []
            cpu0 = os.times()
            w0 = time.monotonic()
            procs = [tb.popen(tb.containers[i].ns, ["ping", "-n", "-q", "-c", str(p["pings"]), "-i",
                                                    p["interval"], tb.peer_ip],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                     for i in senders]
            limit = w0 + p["pings"] * float(p["interval"]) + 30
            while any(q.poll() is None for q in procs) and time.monotonic() < limit:
                reports += tr.poll(50)
            answered = []
            for q in procs:
                if q.poll() is None:
                    q.kill()
                outp, _ = q.communicate()
                answered.append(f" {p['pings']} received" in outp)
            time.sleep(0.05)
            reports += tr.stop()
            wall = time.monotonic() - w0
            cpu1 = os.times()
            st = tr.stats()
        finally:
            tr.close()
    finally:
        mace.plan.GLOB_FROM = saved
    mine = set(senders)
    per = []
    lat: dict[str, list[float]] = {d: [] for d in DIRECTIONS}
    for i, ok in zip(senders, answered, strict=True):
        row = {"index": i, "answered": ok}
        for d, dname in enumerate(DIRECTIONS):
            got = [r for r in reports if r.container == i and r.dir == d]
            lat[dname] += [r.latency / 1000 for r in got]
            row[dname] = len(got)
            row[f"{dname}_coverage"] = coverage(st["containers"][i][dname])
        per.append(row)
    covs = [r[f"{d}_coverage"] for r in per for d in DIRECTIONS if r[f"{d}_coverage"] is not None]
    rings = st["rings"]
    out.update({
        "trace_s": round(wall, 3), "reports": len(reports),
        "expected_reports": len(senders) * p["pings"] * len(DIRECTIONS),
        "misattributed": sum(1 for r in reports if r.container not in mine),
        "all_answered": all(answered),
        "coverage_min": min(covs) if covs else None,
        "events": rings["events"], "events_per_s": rings["events"] / wall if wall else None,
        "lost": rings["lost"], "kernel_dropped": rings.get("kernel_dropped", 0),
        "mace_cpu_s": round((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system), 3),
        "rss_mib_after": round(_rss_mib(), 1), "per_sender": per,
        **{f"{d}_p50_us": _quantile(lat[d], 0.5) for d in DIRECTIONS},
        **{f"{d}_p99_us": _quantile(lat[d], 0.99) for d in DIRECTIONS},
    })
    out["mace_cpu_share"] = out["mace_cpu_s"] / wall if wall else None
    return out


def _serve_all(tb, n_new: int) -> dict:
    """`mace serve --all --metrics` in the testbed's host namespace: how long it takes to
    trace every container at start, then to follow each new one (a link event, discovery,
    a handover), and what a scrape of all their series costs."""
    import re
    import subprocess
    import sys
    import tempfile

    from prometheus_client.parser import text_string_to_metric_families

    addr = "127.0.0.1:9464"
    scrape = ("import sys, time, urllib.request\nt = time.monotonic()\n"
              f"b = urllib.request.urlopen('http://{addr}/metrics', timeout=30).read()\n"
              "print(time.monotonic() - t, file=sys.stderr)\nprint(b.decode())")
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)
        log_path = os.path.join(tmp, "serve.log")
        log = open(log_path, "w")
        t0 = time.monotonic()
        srv = tb.popen(tb.host_ns, [sys.executable, "-m", "mace", "serve", "--socket", f"{tmp}/s/mace.sock",
                                    "--state-dir", f"{tmp}/state", "--all", "--metrics", addr],
                       stdout=subprocess.DEVNULL, stderr=log)

        def traced() -> int:
            return len(re.findall(r"^mace: netns \d+ traced ", open(log_path).read(), re.M))

        def wait(count: int, limit: float) -> float:
            start = time.monotonic()
            while traced() < count:
                if srv.poll() is not None or time.monotonic() - start > limit:
                    raise RuntimeError(f"serve --all traced {traced()} of {count}:\n" + open(log_path).read()[-2000:])
                time.sleep(0.01)
            return time.monotonic()

        try:
            n = len(tb.containers)
            start_s = wait(n, 600) - t0
            rss = _rss_of(srv.pid)
            follow = []
            for k in range(n_new):
                t = time.monotonic()
                c = tb.add_container()
                follow.append(round(wait(n + k + 1, 60) - t, 3))
            tb.run(c.ns, ["ping", "-n", "-q", "-c", "5", "-i", "0.05", tb.peer_ip], timeout=30)
            time.sleep(0.5)
            r = tb.run(tb.host_ns, [sys.executable, "-c", scrape], timeout=60)
            counts = {}
            for fam in text_string_to_metric_families(r.stdout):
                for smp in fam.samples:
                    if smp.name == "mace_container_latency_seconds_count":
                        counts[smp.labels["container"]] = counts.get(smp.labels["container"], 0) + smp.value
            inode = os.stat(tb.ns_path(c.ns)).st_ino
        finally:
            srv.terminate()
            srv.wait(60)
            log.close()
    return {"start_s": round(start_s, 2), "follow_s": follow, "rss_mib": rss,
            "scrape_s": round(float(r.stderr.strip().splitlines()[-1]), 3), "scrape_bytes": len(r.stdout),
            "series": len(counts), "new_reports": counts.get(f"netns:{inode}", 0)}


def _rss_of(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def run(quick: bool) -> dict:
    if os.geteuid() != 0:
        return {"skipped": "needs root (network namespaces, perf tracepoint events)"}
    from mace.targets.netns import discover, resolve
    from mace.testing.testbed import Testbed

    p = _params(quick)
    senders = _senders(p["containers"], p["senders"])
    out = {**p, "sender_indexes": senders, "variants": []}
    wait_quiet(5.0)
    t0 = time.monotonic()
    with Testbed(containers_n=p["containers"], room=NEW) as tb:
        out["build_s"] = round(time.monotonic() - t0, 2)
        t1 = time.monotonic()
        plan = discover([resolve(tb.ns_path(c.ns)) for c in tb.containers]).plan()
        out["discover_s"] = round(time.monotonic() - t1, 2)
        out["devices"] = len([d for d in plan.devices if d])
        # the first packet of each container waits for ARP (the gateway, then the peer):
        # resolved once before any variant, so that both see the same path
        for i in senders:
            tb.run(tb.containers[i].ns, ["ping", "-n", "-q", "-c", "1", "-W", "2", tb.peer_ip], timeout=10)
        for name in VARIANTS:
            wait_quiet(2.0)
            out["variants"].append(_trace(tb, plan, name, p, senders))
        wait_quiet(2.0)
        out["serve_all"] = _serve_all(tb, 1 if quick else NEW)
        t2 = time.monotonic()
    out["teardown_s"] = round(time.monotonic() - t2, 2)
    return out


# -- harness interface ---------------------------------------------------------------------------

def _not_measured(result: dict) -> str | None:
    if result.get("skipped"):
        return f"skipped: {result['skipped']}"
    if not result.get("variants"):
        return "failed: no variant measured"
    return None


def _us(x) -> str:
    return "-" if x is None else f"{x:.1f} µs"


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    why = _not_measured(result)
    if why:
        fig, ax = plt.subplots(figsize=(8, 3))
        ax.axis("off")
        ax.text(0.5, 0.5, why, ha="center", va="center", wrap=True)
        save(fig, path)
        return
    vs = result["variants"]
    names = [v["variant"] for v in vs]
    colors = ["tab:blue" if n == "prefix" else "tab:orange" for n in names]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    n = result["containers"]
    fig.suptitle(f"{n} containers traced by one mace: veths by a shared prefix (mace's default) "
                 f"or each by its name; {len(result['sender_indexes'])} of them ping", fontsize=11)

    ax = axes[0][0]
    labels = ["testbed build", "discover", *(f"open+start ({v['variant']})" for v in vs)]
    vals = [result["build_s"], result["discover_s"], *(v["open_s"] + v["start_s"] for v in vs)]
    bars = ax.bar(labels, vals, color=["tab:gray", "tab:gray", *colors])
    for b, v in zip(bars, vals, strict=True):
        ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.2f} s", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("seconds")
    ax.set_title("setting up", fontsize=10)
    ax.tick_params(axis="x", labelsize=8)

    ax = axes[0][1]
    width = 0.38
    for k, v in enumerate(vs):
        xs = [j + (k - 0.5) * width for j in range(len(DIRECTIONS))]
        ys = [v[f"{d}_p50_us"] or 0 for d in DIRECTIONS]
        bb = ax.bar(xs, ys, width, color=colors[k], label=f"{v['variant']} ({v['events_per_cpu']} events/CPU)")
        for b, y in zip(bb, ys, strict=True):
            ax.text(b.get_x() + b.get_width() / 2, y, f"{y:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(DIRECTIONS)))
    ax.set_xticklabels([f"{d} p50" for d in DIRECTIONS])
    ax.set_ylabel("reported expense (µs)")
    ax.set_title("what mace reports: the filters' cost is inside the segments", fontsize=10)
    ax.legend(fontsize=8)

    ax = axes[1][0]
    bars = ax.bar(names, [v["events_per_s"] or 0 for v in vs], color=colors)
    for b, v in zip(bars, vs, strict=True):
        ax.text(b.get_x() + b.get_width() / 2, b.get_height(),
                f"{(v['events_per_s'] or 0):,.0f} ev/s\nmace CPU {100 * (v['mace_cpu_share'] or 0):.1f}%\n"
                f"RSS {v['rss_mib_traced']:.0f} MiB, lost {v['lost']}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("events drained per second")
    ax.set_ylim(0, max(v["events_per_s"] or 0 for v in vs) * 1.6 + 1)
    ax.set_title("events and mace's own cost", fontsize=10)

    ax = axes[1][1]
    for k, v in enumerate(vs):
        idx = [r["index"] for r in v["per_sender"]]
        for d, marker in zip(DIRECTIONS, ("o", "s"), strict=True):
            cov = [100 * (r[f"{d}_coverage"] or 0) for r in v["per_sender"]]
            ax.plot(idx, cov, marker, color=colors[k], alpha=0.7, label=f"{v['variant']} {d}")
    ax.set_xlabel("container index (senders)")
    ax.set_ylabel("coverage (%)")
    ax.set_ylim(0, 105)
    ax.set_title("coverage of each sender (reports in the right container)", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    save(fig, path)


def summary(result: dict) -> list[dict]:
    why = _not_measured(result)
    if why:
        return [{"metric": "scale", "value": why, "target": "", "met": None}]
    n = result["containers"]
    rows = [{"metric": f"testbed of {n} containers built / discovered",
             "value": f"{result['build_s']:.1f} s / {result['discover_s']:.1f} s", "target": "", "met": None}]
    sa = result.get("serve_all")
    if sa:
        rows += [
            {"metric": f"mace serve --all: all {n} traced after start / each new container followed in",
             "value": f"{sa['start_s']:.1f} s / {', '.join(f'{x:.2f}' for x in sa['follow_s'])} s",
             "target": "", "met": None},
            {"metric": f"mace serve --all: one scrape of {sa['series']} containers' series; service RSS",
             "value": f"{1e3 * sa['scrape_s']:.0f} ms, {sa['scrape_bytes'] / 1e6:.1f} MB; {sa['rss_mib']:.0f} MiB",
             "target": "", "met": None},
            {"metric": "mace serve --all: reports of the last container added (5 pings)",
             "value": f"{sa['new_reports']:.0f}", "target": "10", "met": sa["new_reports"] == 10},
        ]
    for v in result["variants"]:
        tag = f"{v['variant']} ({v['events_per_cpu']} events per CPU)"
        cov = v["coverage_min"]
        rows += [
            {"metric": f"{tag}: time to open and enable the capture",
             "value": f"{v['open_s'] + v['start_s']:.3f} s ({v['perf_events']} perf events)", "target": "", "met": None},
            {"metric": f"{tag}: reports, in the right container / expected",
             "value": f"{v['reports'] - v['misattributed']} / {v['expected_reports']}, misattributed "
                      f"{v['misattributed']}", "target": "all, none misattributed",
             "met": v["reports"] == v["expected_reports"] and v["misattributed"] == 0},
            {"metric": f"{tag}: lowest coverage of a sender",
             "value": "-" if cov is None else f"{100 * cov:.1f}%", "target": ">= 99%",
             "met": None if cov is None else cov >= 0.99},
            {"metric": f"{tag}: events/s, mace CPU, RSS",
             "value": f"{v['events_per_s']:,.0f}, {100 * v['mace_cpu_share']:.1f}%, {v['rss_mib_traced']:.0f} MiB",
             "target": "", "met": None},
            {"metric": f"{tag}: reported expense p50 egress / ingress",
             "value": f"{_us(v['egress_p50_us'])} / {_us(v['ingress_p50_us'])}", "target": "", "met": None},
        ]
    return rows


def notes(result: dict) -> list[str]:
    if _not_measured(result):
        return []
    vs = {v["variant"]: v for v in result["variants"]}
    out = [f"{result['containers']} containers (network namespaces, veths on one bridge, no NAT); "
           f"{len(result['sender_indexes'])} of them (indexes {result['sender_indexes'][0]}.."
           f"{result['sender_indexes'][-1]}) each ping the peer {result['pings']} times every "
           f"{result['interval']} s at once, the others are idle; one Tracer with the discovered plan of all "
           "of them, the two variants one after the other on the same testbed."]
    pre, nam = vs.get("prefix"), vs.get("names")
    if pre and nam and pre["egress_p50_us"] and nam["egress_p50_us"]:
        out.append(f"Naming every veth costs each hit of the tracepoint one comparison per name "
                   f"(benchmarks/sample_cost.py, name filters), inside the segments too: the reported "
                   f"egress median is {nam['egress_p50_us']:.1f} µs with names against "
                   f"{pre['egress_p50_us']:.1f} µs with the prefix, ingress "
                   f"{nam['ingress_p50_us']:.1f} against {pre['ingress_p50_us']:.1f} µs.")
    out.append("mace CPU is the process's user+system time while the pings ran (drain thread, "
               "correlator, the poll loop); the kernel's filter work is charged to the senders, not to it.")
    return out

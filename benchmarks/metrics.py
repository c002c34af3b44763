"""Metrics: what `mace serve --metrics` adds to the service's CPU.

`mace serve --all` traces two containers that ping-flood the peer at once (the highest
packet rate this testbed makes), with and without `--metrics`, in interleaved rounds
whose order alternates; with metrics, a scraper fetches /metrics every second (Prometheus'
default is a minute: this is 60 times as often).  The service's CPU over each flood window
is read from /proc, and each scrape's duration and size are kept.  Target: < 2 % of a CPU
added.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from benchmarks.common import pyplot, save

METRICS = "127.0.0.1:9464"
SCRAPER = textwrap.dedent(f"""
    import json, sys, time, urllib.request
    end = time.monotonic() + float(sys.argv[1])
    out = []
    while time.monotonic() < end:
        t = time.monotonic()
        body = urllib.request.urlopen("http://{METRICS}/metrics", timeout=5).read()
        out.append((time.monotonic() - t, len(body)))
        time.sleep(max(0, 1 - (time.monotonic() - t)))
    time.sleep(0.5)
    last = urllib.request.urlopen("http://{METRICS}/metrics", timeout=5).read().decode()
    print(json.dumps({{"scrapes": out, "last": last}}))
""")


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _totals(text: str) -> dict:
    # what the last scrape counted: reports, events read, ring losses
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if smp.name in ("mace_container_latency_seconds_count", "mace_events_total",
                            "mace_ring_lost_total", "mace_kernel_dropped_total"):
                out[smp.name] = out.get(smp.name, 0) + int(smp.value)
    return out


def _round(tb, tmp: Path, metrics: bool, seconds: float) -> dict:
    sock = str(tmp / f"r{time.monotonic_ns()}" / "mace.sock")
    os.makedirs(os.path.dirname(sock), mode=0o755)
    argv = [sys.executable, "-m", "mace", "serve", "--socket", sock, "--state-dir", str(tmp / "state"),
            "--all", *(["--metrics", METRICS] if metrics else [])]
    log = open(tmp / "serve.log", "w+")
    srv = tb.popen(tb.host_ns, argv, stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while log.seek(0) is not None and log.read().count(" traced ") < len(tb.containers):
            assert srv.poll() is None and time.monotonic() < deadline, open(tmp / "serve.log").read()
            time.sleep(0.05)
        scraper = (tb.popen(tb.host_ns, [sys.executable, "-c", SCRAPER, str(seconds)],
                            stdout=subprocess.PIPE, text=True) if metrics else None)
        cpu0, t0 = _cpu_seconds(srv.pid), time.monotonic()
        floods = [tb.popen(c.ns, ["ping", "-n", "-q", "-f", "-w", str(int(seconds)), tb.peer_ip],
                           stdout=subprocess.PIPE, text=True) for c in tb.containers]
        sent = 0
        for f in floods:
            out = f.communicate(timeout=seconds + 15)[0]
            sent += int(next(line for line in out.splitlines() if "transmitted" in line).split()[0])
        cpu = (_cpu_seconds(srv.pid) - cpu0) / (time.monotonic() - t0)
        got = json.loads(scraper.communicate(timeout=30)[0]) if scraper else {"scrapes": [], "last": ""}
        scrapes, totals = got["scrapes"], _totals(got["last"])
    finally:
        srv.terminate()
        srv.wait(30)
        log.close()
    return {"metrics": metrics, "cpu_share": round(cpu, 4), "pings_per_s": round(sent / seconds),
            "scrape_ms": [round(1e3 * d, 2) for d, _ in scrapes],
            "scrape_bytes": scrapes[-1][1] if scrapes else None, **totals}


def run(quick: bool) -> dict:
    from mace.testing.testbed import Testbed

    rounds, seconds = (1, 2.0) if quick else (10, 5.0)
    out = []
    with Testbed(containers_n=2) as tb, tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)
        for c in tb.containers:
            tb.run(c.ns, ["ping", "-n", "-c", "2", "-i", "0.2", tb.peer_ip], timeout=10)
        for r in range(rounds):
            for metrics in ((False, True) if r % 2 == 0 else (True, False)):
                out.append(_round(tb, Path(tmp), metrics, seconds))
    off = [x["cpu_share"] for x in out if not x["metrics"]]
    on = [x["cpu_share"] for x in out if x["metrics"]]
    # paired by round: the two configurations of one round ran back to back
    diffs = [b - a for a, b in zip(off, on, strict=True)]
    return {"rounds": out, "seconds": seconds,
            "cpu_off_median": statistics.median(off), "cpu_on_median": statistics.median(on),
            "added_median": statistics.median(diffs), "added_min": min(diffs), "added_max": max(diffs),
            "scrape_ms_median": statistics.median([m for x in out for m in x["scrape_ms"]] or [0])}


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    rows = result["rounds"]
    for metrics, color in ((False, "tab:gray"), (True, "tab:blue")):
        ys = [100 * x["cpu_share"] for x in rows if x["metrics"] == metrics]
        ax.plot(range(1, len(ys) + 1), ys, "o-", color=color,
                label="--metrics, scraped every 1 s" if metrics else "without --metrics")
    ax.set_xlabel("round")
    ax.set_ylabel("mace serve CPU (% of one CPU)")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.set_title(f"two containers flooding, added median {100 * result['added_median']:+.1f} %")
    save(fig, path)


def summary(result: dict) -> list[dict]:
    rows = result["rounds"]
    return [
        {"metric": "service CPU during two floods, without / with --metrics (median of rounds)",
         "value": f"{100 * result['cpu_off_median']:.1f}% / {100 * result['cpu_on_median']:.1f}% of one CPU "
                  f"at {statistics.median(x['pings_per_s'] for x in rows):,} pings/s",
         "target": "", "met": None},
        {"metric": "CPU --metrics adds, paired by round (median [min, max])",
         "value": f"{100 * result['added_median']:+.2f}% [{100 * result['added_min']:+.2f}, "
                  f"{100 * result['added_max']:+.2f}]",
         "target": "< 2% of one CPU", "met": result["added_median"] < 0.02},
        {"metric": "one scrape (two containers), median",
         "value": f"{result['scrape_ms_median']:.1f} ms, "
                  f"{next((x['scrape_bytes'] for x in rows if x['scrape_bytes']), 0):,} bytes",
         "target": "", "met": None},
    ]


def notes(result: dict) -> list[str]:
    return ["`mace serve --all` with two containers ping-flooding at once; rounds alternate which "
            "configuration runs first.  The correlator counts every report into the exported "
            "buckets itself in both configurations only when --metrics is given; a scrape asks the "
            "engine thread for a snapshot between two polls.  Scraped every second here."]

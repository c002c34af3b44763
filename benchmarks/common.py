"""Shared plumbing: machine description, result files, plots, and RESULTS.md."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "kernel": platform.release(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def write_result(name: str, data: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    data = {"name": name, "machine": machine(), **data}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


def load_results() -> dict[str, dict]:
    out = {}
    for p in sorted(RESULTS.glob("*.json")):
        try:
            out[p.stem] = json.loads(p.read_text())
        except ValueError:
            continue
    return out


def pyplot():
    """matplotlib with a file-only backend (the `bench` extra)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, path) -> None:
    """Write a benchmark's figure and free it."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def timed(fn, *args, repeat: int = 5, **kw):
    """Run fn `repeat` times; returns (median seconds, last result)."""
    times = []
    result = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn(*args, **kw)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def median(xs):
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def percentile(xs, q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[k]


def have(cmd: str) -> bool:
    return subprocess.run(["sh", "-c", f"command -v {cmd}"], capture_output=True).returncode == 0

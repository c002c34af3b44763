"""Shared plumbing: machine description, a quiet machine, tracefs, result files, plots."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import time
from pathlib import Path

from mace.defaults import DIRECTIONS  # noqa: F401  (re-exported: one spelling for every benchmark)

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
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


# -- a quiet machine ---------------------------------------------------------------------------

def cpu_sample() -> tuple[int, int]:
    """All CPUs' (total, idle + iowait) jiffies so far (/proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v), v[3] + v[4]


def busy_since(s0: tuple[int, int]) -> float | None:
    """Share of all CPUs' time spent busy since the cpu_sample() `s0` (None: no time passed)."""
    t1, i1 = cpu_sample()
    return round(1 - (i1 - s0[1]) / (t1 - s0[0]), 3) if t1 > s0[0] else None


def wait_quiet(limit_s: float = 2.0, below: float = 0.1) -> float | None:
    """Wait (at most `limit_s`) until all CPUs together are less than `below` busy, e.g.
    until the kernel has finished cleaning up the network namespaces of a testbed torn down
    just before, so that a timing is of the code and not of a neighbour.  Returns the last
    busy share seen (None without /proc/stat)."""
    end = time.monotonic() + limit_s
    busy = None
    try:
        while time.monotonic() < end:
            s0 = cpu_sample()
            time.sleep(0.1)
            busy = busy_since(s0)
            if busy is not None and busy < below:
                break
    except (OSError, ValueError):
        return None
    return busy


# -- tracefs ------------------------------------------------------------------------------------

def tracefs_mounts() -> list[str]:
    """Where tracefs is mounted now, from the mount table only: looking into
    /sys/kernel/debug/tracing would automount it."""
    try:
        with open("/proc/self/mounts") as f:
            return [parts[1] for parts in map(str.split, f) if len(parts) > 2 and parts[2] == "tracefs"]
    except OSError:
        return []


def tracefs_mounted() -> bool:
    return bool(tracefs_mounts())


# -- results ------------------------------------------------------------------------------------

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


def fmt_rate(x: float) -> str:
    if x >= 1e6:
        return f"{x / 1e6:.1f} M/s"
    if x >= 1e3:
        return f"{x / 1e3:.0f} k/s"
    return f"{x:.0f} /s"


def rate_bars(ax, names, vals, colors, target: float, headroom: float) -> None:
    """Log-scale bars of rates, each labelled, with the target as a dashed line."""
    bars = ax.bar(names, vals, color=colors)
    ax.set_yscale("log")
    ax.axhline(target, color="tab:red", ls="--", lw=1)
    ax.text(len(vals) - 0.55, target * 1.12, f"target {fmt_rate(target)}", color="tab:red",
            ha="right", fontsize=8)
    for b, v in zip(bars, vals, strict=True):
        ax.text(b.get_x() + b.get_width() / 2, v * 1.15, fmt_rate(v), ha="center", fontsize=9)
    ax.set_ylim(min(vals) / 3, max(max(vals), target) * headroom)


def save(fig, path) -> None:
    """Write a benchmark's figure and free it."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)

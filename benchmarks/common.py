"""Shared plumbing: machine description, result files, plots, and RESULTS.md."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
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
    for b, v in zip(bars, vals):
        ax.text(b.get_x() + b.get_width() / 2, v * 1.15, fmt_rate(v), ha="center", fontsize=9)
    ax.set_ylim(min(vals) / 3, max(max(vals), target) * headroom)


def save(fig, path) -> None:
    """Write a benchmark's figure and free it."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)

"""Each benchmark runs end to end with small counts: JSON, plot and sane numbers (no timing
assertions: these machines are shared)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_quick(name: str, out: Path) -> dict:
    r = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", name, "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / f"{name}.png").stat().st_size > 10_000
    assert (out / "RESULTS.md").read_text().count(f"## {name}") == 1
    return json.loads((out / f"{name}.json").read_text())


def test_ring_benchmark_quick(tmp_path):
    res = run_quick("ring", tmp_path)
    syn = res["synthetic"]
    assert syn["identical"] and syn["records"] > 10_000
    assert syn["cython"]["records_per_s"] > syn["reference"]["records_per_s"] > 0
    runs = res["live"]["runs"]
    assert runs and all(r["sent"] > 0 and r["events"] > 0 for r in runs)
    assert all(r["errors"] == 0 for r in runs)

"""Run benchmarks, write results/<name>.json and .png, regenerate RESULTS.md.

    python -m benchmarks                 # everything
    python -m benchmarks ring            # one or more by name
    python -m benchmarks --quick ring    # small counts (the test suite's smoke run)
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

from benchmarks.common import load_results, write_result
from benchmarks.report import write_results_md

# name -> module; each has run(quick) -> dict, plot(result, path), summary(result) -> rows
SUITE = {
    "ring": "benchmarks.ring",
    "accuracy": "benchmarks.accuracy",
    "correlate": "benchmarks.correlate",
    "perturbation": "benchmarks.perturbation",
    "throughput": "benchmarks.throughput",
    "service": "benchmarks.service",
    "sample_cost": "benchmarks.sample_cost",
    "scale": "benchmarks.scale",
    "metrics": "benchmarks.metrics",
    "format": "benchmarks.format",
    "socket": "benchmarks.socket",
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help=f"benchmarks to run (default all: {', '.join(SUITE)})")
    ap.add_argument("--quick", action="store_true", help="small counts, for smoke tests")
    ap.add_argument("--out", help="directory for results (default benchmarks/results)")
    args = ap.parse_args(argv)
    names = args.names or list(SUITE)
    unknown = [n for n in names if n not in SUITE]
    if unknown:
        ap.error(f"unknown benchmark(s): {', '.join(unknown)}; choose from {', '.join(SUITE)}")
    if args.out:
        from pathlib import Path

        import benchmarks.common as common
        common.RESULTS = Path(args.out)
    import benchmarks.common as common
    for name in names:
        mod = importlib.import_module(SUITE[name])
        print(f"== {name}", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        result = mod.run(quick=args.quick)
        result["quick"] = args.quick
        result["seconds"] = round(time.monotonic() - t0, 1)
        path = write_result(name, result)
        mod.plot(result, common.RESULTS / f"{name}.png")
        for row in mod.summary(result):
            print(f"   {row['metric']}: {row['value']}  (target {row.get('target', '-')})", file=sys.stderr)
        print(f"   -> {path}", file=sys.stderr)
    write_results_md(load_results(), common.RESULTS.parent / "RESULTS.md" if args.out is None
                     else common.RESULTS / "RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

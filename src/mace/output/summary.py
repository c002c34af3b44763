"""The end-of-trace summary: per container and direction, counts, coverage, latency
percentiles and every counter, as text (stderr) or JSON (--summary-json)."""

from __future__ import annotations

from mace.defaults import DIRECTIONS
from mace.output.clock import us as _us
from mace.output.report import Histogram, coverage

COUNTERS = ("crossed", "local", "dropped", "orphans", "expired", "evicted", "rejected", "in_flight")
PERCENTILES = (50, 90, 99)


def build(tracer, labels, inodes) -> dict:
    """The summary of a stopped Tracer."""
    stats = tracer.stats()
    corr = tracer.correlator
    out = []
    for i, c in enumerate(stats["containers"]):
        entry = {"target": labels[i], "netns": inodes[i]}
        for d, name in enumerate(DIRECTIONS):
            k = c[name]
            hist = Histogram(corr.histogram(i, d))
            row = {"count": k["reports"], "coverage": coverage(k),
                   "min_ns": k["min_ns"], "max_ns": k["max_ns"],
                   "mean_ns": k["sum_ns"] / k["reports"] if k["reports"] else None}
            for q in PERCENTILES:
                v = hist.percentile(q)      # a bucket's middle: keep it within what was seen
                row[f"p{q}_ns"] = None if v is None else min(max(v, k["min_ns"]), k["max_ns"])
            row.update({n: k[n] for n in COUNTERS})
            entry[name] = row
        out.append(entry)
    duration = None
    if tracer.started_at is not None and tracer.stopped_at is not None:
        duration = round(tracer.stopped_at - tracer.started_at, 3)
    rings = stats["rings"]
    return {
        "duration_s": duration,
        "containers": out,
        "events": rings.get("events", 0),
        "lost": rings.get("lost", 0),
        "kernel_dropped": rings.get("kernel_dropped", 0),
        "malformed": rings.get("errors", 0),
        "late": rings.get("late", 0),
        "table": {"size": stats["correlator"]["table_size"],
                  "bytes": stats["correlator"]["table_bytes"],
                  "evicted_unattributed": stats["correlator"]["evicted"]},
        "correlator": stats["correlator"],
    }


def format_text(summary: dict) -> str:
    """A table, one line per container and direction, then the totals.  Targets are shown
    whole (container runtimes' netns paths share long prefixes)."""
    w = max([6] + [len(c["target"]) for c in summary["containers"]])
    head = (f"{'target':<{w}} {'dir':<7} {'count':>7} {'cover':>7} {'min':>8} {'p50':>8} "
            f"{'p90':>8} {'p99':>8} {'max':>8}  (us)   lost-to: orphan expired evicted rejected")
    lines = [head]
    for c in summary["containers"]:
        for d in DIRECTIONS:
            r = c[d]
            cov = "-" if r["coverage"] is None else f"{100 * r['coverage']:.1f}%"
            lines.append(
                f"{c['target']:<{w}} {d:<7} {r['count']:>7} {cov:>7} {_us(r['min_ns']):>8} "
                f"{_us(r['p50_ns']):>8} {_us(r['p90_ns']):>8} {_us(r['p99_ns']):>8} "
                f"{_us(r['max_ns']):>8}          {r['orphans']:>6} {r['expired']:>7} "
                f"{r['evicted']:>7} {r['rejected']:>8}")
    t = summary
    tail = (f"{t['events']} events in {t['duration_s']} s; lost (ring full) {t['lost']}, "
            f"malformed {t['malformed']}, table {t['table']['size']} entries "
            f"({t['table']['bytes'] // 1024} KiB), evicted before attribution "
            f"{t['table']['evicted_unattributed']}")
    lines.append(tail)
    if t["kernel_dropped"]:
        lines.append(f"warning: the kernel dropped {t['kernel_dropped']} samples without reporting "
                     "them; reports may be missing (a kernel fault, not a full ring)")
    return "\n".join(lines)

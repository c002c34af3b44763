"""The end-of-trace summary: per container and direction, counts, coverage, latency
percentiles and every counter; the observer's cost (events per reported packet, samples of
traffic not reported, mace's estimated own cost inside each segment) and the other tracers
found at start; as text (stderr) or JSON (--summary-json)."""

from __future__ import annotations

from mace.capture.others import OtherTracer, warn_lines
from mace.defaults import DIRECTIONS, FILTERED_HIT_COST_NS, SAMPLE_COST_NS
from mace.output.clock import us as _us
from mace.output.report import Histogram, coverage
from mace.plan import QUEUE, RECV, RX, XMIT

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
        "observer": observer(tracer.plan, stats, _seconds(tracer)),
        "other_tracers": [t.as_dict() for t in tracer.other_tracers],
    }


def _seconds(tracer) -> float | None:
    if tracer.started_at is None or tracer.stopped_at is None:
        return None
    return tracer.stopped_at - tracer.started_at


def path_steps(plan) -> dict[str, list[tuple[str, str]]]:
    """By direction, the tracepoint hits (tracepoint, device) one packet of the plan's shape
    makes in the kernel from the segment's first step to its last, whether mace samples
    them or not (see mace.plan).  With containers of both kinds, a bridged one's path."""
    c = next((c for _, c in plan.active if c.bridge), plan.active[0][1])
    bridge = [c.bridge] if c.bridge else []
    egress = [(XMIT, c.inner), (RX, c.veth), (RECV, c.veth), *((RECV, b) for b in bridge),
              (QUEUE, plan.uplink)]
    if not plan.end_at_queue:
        egress.append((XMIT, plan.uplink))
    if getattr(plan, "start_at_veth", False):
        egress = egress[1:]
    # dev_queue_xmit runs trace_net_dev_queue on every device a packet is sent on
    ingress = [(RECV, plan.uplink), *(s for b in bridge for s in ((QUEUE, b), (XMIT, b))),
               (QUEUE, c.veth), (XMIT, c.veth), (RX, c.inner), (RECV, c.inner)]
    return {"egress": egress, "ingress": ingress}


def filtered_hits(plan, probes) -> dict[str, int]:
    """By direction, the hits inside a segment of tracepoints that `probes` enable but whose
    device filter rejects the packet: each costs the record the kernel builds before filtering."""
    filters = {p.tracepoint: p.devices for p in probes}
    return {d: sum(1 for tp, dev in steps if filters.get(tp) and dev not in filters[tp])
            for d, steps in path_steps(plan).items()}


def observer(plan, stats: dict, seconds: float | None) -> dict:
    """What observing costs: events sampled per report, samples per second that no report
    accounts for (other devices of the same names, the host's traffic, packets not
    reported), and an estimate of mace's own time inside each segment: every sample after
    the first one's timestamp, and every filtered hit, at costs measured on one VM."""
    per_packet = plan.samples_per_packet()
    reports = {d: sum(c[d]["reports"] for c in stats["containers"]) for d in DIRECTIONS}
    total = sum(reports.values())
    events = stats["rings"].get("events", 0)
    chains = sum(reports[d] * per_packet[d] for d in DIRECTIONS)
    filtered = filtered_hits(plan, plan.probes())
    inside = {d: max(0, per_packet[d] - 1) for d in DIRECTIONS}
    cost = {d: inside[d] * SAMPLE_COST_NS + filtered[d] * FILTERED_HIT_COST_NS for d in DIRECTIONS}
    return {
        "events_per_report": round(events / total, 3) if total else None,
        "samples_per_packet": per_packet,
        "unreported_samples_per_s": round(max(0, events - chains) / seconds, 1) if seconds else None,
        "own_cost_ns_estimate": {
            **cost,
            "basis": {"sample_ns": SAMPLE_COST_NS, "filtered_hit_ns": FILTERED_HIT_COST_NS,
                      "samples_inside": inside, "filtered_hits_inside": filtered,
                      "source": "measured on one VM, not on this host: see KERNEL-NOTES.md, "
                                "'What one sample costs here'"},
        },
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
    lines.append(_observer_line(t["observer"]))
    found = [OtherTracer(**o) for o in t["other_tracers"]]
    lines += [line.removeprefix("mace: ") for line in warn_lines(found)]
    if t["kernel_dropped"]:
        lines.append(f"warning: the kernel dropped {t['kernel_dropped']} samples without reporting "
                     "them; reports may be missing (a kernel fault, not a full ring)")
    return "\n".join(lines)


def _observer_line(o: dict) -> str:
    per = "-" if o["events_per_report"] is None else f"{o['events_per_report']:.1f}"
    rate = "-" if o["unreported_samples_per_s"] is None else f"{o['unreported_samples_per_s']:.0f}"
    cost = o["own_cost_ns_estimate"]
    return (f"observer: {per} events per reported packet, {rate} samples/s unreported, own cost "
            f"≈ {cost['egress'] / 1000:.1f} µs egress / {cost['ingress'] / 1000:.1f} µs ingress "
            "(estimate)")

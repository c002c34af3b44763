"""The end-of-trace summary: per container and direction, counts, coverage, latency
percentiles and every counter; the observer's cost (events per reported packet, samples of
traffic not reported, mace's estimated own cost inside each segment) and the other tracers
found at start; as text (stderr) or JSON (--summary-json)."""

from __future__ import annotations

from mace.capture.others import OtherTracer, warn_lines
from mace.defaults import (
    DIRECTIONS,
    EXTRA_EVENT_COST_NS,
    FILTER_TERM_COST_NS,
    FILTERED_HIT_COST_NS,
    SAMPLE_COST_NS,
)
from mace.output.clock import us as _us
from mace.output.report import Histogram, coverage
from mace.plan import EGRESS_HOPS, INGRESS_HOPS, QUEUE, RECV, ROUTE, RX, SOCKET_INGRESS_HOPS, XMIT

COUNTERS = ("crossed", "local", "dropped", "orphans", "expired", "evicted", "rejected", "unpaired",
            "in_flight")
PERCENTILES = (50, 90, 99)


class Tally:
    """What the command wrote, as opposed to what the correlator made: reports per container
    and direction (`--count` may stop short of the last ones) and, with hops, each hop
    interval in the correlator's histogram buckets, so a long trace holds no list of values.
    Hop intervals are named by the step they end at (see HOP_STEPS)."""

    def __init__(self, ncontainers: int, hops: bool, end_at_queue: bool, segment: str = "device"):
        self.written = [[0, 0] for _ in range(ncontainers)]
        self.hops = hops
        self.steps = hop_steps(end_at_queue, segment)
        # by container, then direction: row container * 2 + dir
        self.buckets = [[[0] * _nbuckets() for _ in self.steps[d]] for _ in range(ncontainers)
                        for d in DIRECTIONS] if hops else []

    def grow(self) -> None:
        """One container index more (a restarted target)."""
        self.written.append([0, 0])
        if self.hops:
            self.buckets += [[[0] * _nbuckets() for _ in self.steps[d]] for d in DIRECTIONS]

    def add(self, reports) -> None:
        from mace.correlate._correlate import bucket_of
        for r in reports:
            self.written[r.container][r.dir] += 1
            if not self.hops:
                continue
            rows = self.buckets[r.container * 2 + r.dir]
            prev = 0
            points = (*r.hops, r.latency)
            for i, point in enumerate(points):
                if point is None:
                    continue
                # the end is the last interval whatever the number of hop slots
                j = len(rows) - 1 if i == len(points) - 1 else i
                rows[j][bucket_of(max(point - prev, 0))] += 1
                prev = point

    def hop_medians(self, container: int, direction: int) -> dict[str, float | None] | None:
        if not self.hops:
            return None
        rows = self.buckets[container * 2 + direction]
        names = self.steps[DIRECTIONS[direction]]
        return {n: Histogram(row).percentile(50) for n, row in zip(names, rows, strict=True)
                if sum(row)}


# Per direction, the step at the end of each hop interval: the report's hop slots, then its
# end event.  An interval runs from the previous traced step (the start first) to the named one.
HOP_STEPS = {"egress": (*EGRESS_HOPS, "uplink xmit"), "ingress": (*INGRESS_HOPS, "container receive")}


def hop_steps(end_at_queue: bool, segment: str = "device") -> dict[str, tuple[str, ...]]:
    # the socket segment goes on from the container's device to the receive call
    ingress = (*SOCKET_INGRESS_HOPS, "socket receive") if segment == "socket" else HOP_STEPS["ingress"]
    if not end_at_queue:
        return {"egress": HOP_STEPS["egress"], "ingress": ingress}
    # ending at the uplink's queue, the queue is the end: its slot (the last) stays empty
    return {"egress": EGRESS_HOPS[:-1] + ("uplink queue",), "ingress": ingress}


def _nbuckets() -> int:
    from mace.correlate._correlate import BUCKETS
    return BUCKETS


def build(tracer, labels, inodes, tally: Tally | None = None,
          stopped: dict[int, float] | None = None, other_routes: tuple[str, ...] = ()) -> dict:
    """The summary of a stopped Tracer.  `tally`: what was written (then `count` is that,
    and `made` what the correlator made); `stopped`: container index -> seconds after the
    start at which its target went away."""
    stats = tracer.stats()
    corr = tracer.correlator
    out = []
    for i, c in enumerate(stats["containers"]):
        entry = {"target": labels[i], "netns": inodes[i]}
        if stopped and i in stopped:
            entry["stopped_after_s"] = round(stopped[i], 3)
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
            if tally is not None:
                row["made"] = row["count"]
                row["count"] = tally.written[i][d]
                hops = tally.hop_medians(i, d)
                if hops is not None:
                    row["hop_p50_ns"] = hops
            entry[name] = row
        out.append(entry)
    duration = None
    if tracer.started_at is not None and tracer.stopped_at is not None:
        duration = round(tracer.stopped_at - tracer.started_at, 3)
    rings = stats["rings"]
    return {
        "segment": tracer.plan.segment,
        "duration_s": duration,
        "containers": out,
        "events": rings.get("events", 0),
        "lost": rings.get("lost", 0),
        "kernel_dropped": rings.get("kernel_dropped", 0),
        "throttled": rings.get("throttled", 0),
        "malformed": rings.get("errors", 0),
        "late": rings.get("late", 0),
        "table": {"size": stats["correlator"]["table_size"],
                  "bytes": stats["correlator"]["table_bytes"],
                  "evicted_unattributed": stats["correlator"]["evicted"]},
        "correlator": stats["correlator"],
        "observer": observer(tracer.plan, stats, _seconds(tracer)),
        "other_tracers": [t.as_dict() for t in tracer.other_tracers],
        "uplinks": list(tracer.plan.uplinks),
        "untraced_route_devices": list(other_routes),
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
    # fib_table_lookup names the route's device: the uplink going out, the bridge (else the
    # veth) coming in
    egress = [(XMIT, c.inner), (RX, c.veth), (RECV, c.veth), *((RECV, b) for b in bridge),
              (ROUTE, plan.uplink), (QUEUE, plan.uplink)]
    if not plan.end_at_queue:
        egress.append((XMIT, plan.uplink))
    if getattr(plan, "start_at_veth", False):
        egress = egress[1:]
    # dev_queue_xmit runs trace_net_dev_queue on every device a packet is sent on
    ingress = [(RECV, plan.uplink), (ROUTE, c.bridge or c.veth),
               *(s for b in bridge for s in ((QUEUE, b), (XMIT, b))),
               (QUEUE, c.veth), (XMIT, c.veth), (RX, c.inner), (RECV, c.inner)]
    return {"egress": egress, "ingress": ingress}


def filtered_hits(plan, probes) -> dict[str, int]:
    """By direction, the hits inside a segment of tracepoints that `probes` enable but whose
    device filter rejects the packet: each costs the record the kernel builds before filtering."""
    by_tp = {p.tracepoint: p for p in probes}
    return {d: sum(1 for tp, dev in steps if tp in by_tp and not by_tp[tp].passes(dev))
            for d, steps in path_steps(plan).items()}


def filter_work_ns(plan, probes) -> dict[str, int]:
    """By direction, the time the kernel spends evaluating mace's filters on the hits
    inside a segment (after its first step): each hit of a filtered tracepoint walks every
    term of its filter and every perf event of it, sampled or not."""
    per_hit = {p.tracepoint: FILTER_TERM_COST_NS * max(0, len(p.terms()) - 1)
               + EXTRA_EVENT_COST_NS * max(0, len(p.filters()) - 1) for p in probes if p.devices}
    return {d: sum(per_hit.get(tp, 0) for tp, _ in steps[1:]) for d, steps in path_steps(plan).items()}


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
    probes = plan.probes()
    filtered = filtered_hits(plan, probes)
    walking = filter_work_ns(plan, probes)
    inside = {d: max(0, per_packet[d] - 1) for d in DIRECTIONS}
    cost = {d: inside[d] * SAMPLE_COST_NS + filtered[d] * FILTERED_HIT_COST_NS + walking[d]
            for d in DIRECTIONS}
    return {
        "events_per_report": round(events / total, 3) if total else None,
        "samples_per_packet": per_packet,
        "unreported_samples_per_s": round(max(0, events - chains) / seconds, 1) if seconds else None,
        "own_cost_ns_estimate": {
            **cost,
            "basis": {"sample_ns": SAMPLE_COST_NS, "filtered_hit_ns": FILTERED_HIT_COST_NS,
                      "samples_inside": inside, "filtered_hits_inside": filtered,
                      "filter_term_ns": FILTER_TERM_COST_NS, "extra_event_ns": EXTRA_EVENT_COST_NS,
                      "filter_walk_inside_ns": walking,
                      "source": "measured on one VM, not on this host: see KERNEL-NOTES.md, "
                                "'What one sample costs here'"},
        },
    }


def format_text(summary: dict) -> str:
    """A table, one line per container and direction, then the totals.  Targets are shown
    whole (container runtimes' netns paths share long prefixes)."""
    w = max([6] + [len(c["target"]) for c in summary["containers"]])
    segment = summary.get("segment", "device")
    head = (f"{'target':<{w}} {'dir':<7} {'count':>7} {'cover':>7} {'min':>8} {'p50':>8} "
            f"{'p90':>8} {'p99':>8} {'max':>8}  (us)   lost-to: orphan expired evicted rejected")
    lines = [f"segment: {segment} ({SEGMENT_TEXT[segment]})", head]
    for c in summary["containers"]:
        for d in DIRECTIONS:
            r = c[d]
            cov = "-" if r["coverage"] is None else f"{100 * r['coverage']:.1f}%"
            lines.append(
                f"{c['target']:<{w}} {d:<7} {r['count']:>7} {cov:>7} {_us(r['min_ns']):>8} "
                f"{_us(r['p50_ns']):>8} {_us(r['p90_ns']):>8} {_us(r['p99_ns']):>8} "
                f"{_us(r['max_ns']):>8}          {r['orphans']:>6} {r['expired']:>7} "
                f"{r['evicted']:>7} {r['rejected']:>8}")
    lines += _explanations(summary)
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
        covs = [c[d]["coverage"] for c in t["containers"] for d in DIRECTIONS]
        whose = ("no traced packet seen to cross lost a later step (a packet whose first sample "
                 "was dropped is not counted at all)"
                 if all(v is None or v == 1.0 for v in covs) else
                 "a traced container's coverage is below 100%: some of its reports may be missing")
        lines.append(f"warning: the kernel dropped {t['kernel_dropped']} samples without reporting "
                     f"them (a kernel fault, not a full ring); {whose}")
    return "\n".join(lines)


SEGMENT_TEXT = {
    "device": "the container's host-side veth to the uplink, and the uplink to its device",
    "socket": "the container's send call to the uplink's transmit, and the uplink to its receive call",
}


def _explanations(summary: dict) -> list[str]:
    """The counters behind each shortfall, the per-hop medians and the targets that went
    away, a line each, under the table."""
    out = []
    for c in summary["containers"]:
        if "stopped_after_s" in c:
            out.append(f"{c['target']}: stopped {c['stopped_after_s']:g} s after the start")
        for d in DIRECTIONS:
            r = c[d]
            at = f"{c['target']} {d}"
            if r.get("made", r["count"]) != r["count"]:
                out.append(f"{at}: {r['count']} of {r['made']} reports written (--count)")
            missed = sum(r[n] for n in ("orphans", "expired", "evicted", "rejected"))
            if r["count"] == 0 or missed or r["in_flight"]:
                out.append(f"{at}: {r['crossed']} crossed its veth, {r['local']} stayed on the host "
                           f"(local), {r['dropped']} dropped by the kernel, {missed} lost to the "
                           f"columns above, {r['in_flight']} in flight at the end"
                           + (" - nothing crossed: is the container sending?" if not r["crossed"]
                              else ""))
                if d == "egress" and r["crossed"] and not r["count"] and r["local"]:
                    out.append(f"{at}: " + uplink_hint(summary.get("uplinks", []),
                                                       summary.get("untraced_route_devices", [])))
            if r.get("unpaired"):
                out.append(f"{at}: {r['unpaired']} crossed but no call of the container's took them ("
                           + ("sent outside a send call: the kernel's own (TCP ACKs and "
                              "retransmissions, ICMP errors), one that waited for the container's ARP"
                              if d == "egress" else
                              "delivered to no socket in their chain, never read, or a stream's")
                           + "): the socket segment does not report them")
            if r.get("hop_p50_ns"):
                steps = " · ".join(f"{n} {_us(v)}" for n, v in r["hop_p50_ns"].items())
                out.append(f"{at} hops, p50 µs to each step: {steps}")
    return out


def uplink_hint(uplinks, others) -> str:
    """Why packets that crossed a veth may never reach a traced uplink, and what to do."""
    where = ", ".join(uplinks) or "the uplink"
    text = (f"none reached {where}: to the host itself, or out by a device mace does not trace")
    if others:
        return text + f"; the host also routes by {', '.join(others)} (add it with --uplink DEV)"
    return text + " (name it with --uplink DEV)"


def _observer_line(o: dict) -> str:
    per = "-" if o["events_per_report"] is None else f"{o['events_per_report']:.1f}"
    rate = "-" if o["unreported_samples_per_s"] is None else f"{o['unreported_samples_per_s']:.0f}"
    cost = o["own_cost_ns_estimate"]
    return (f"observer: {per} events per reported packet, {rate} samples/s unreported, own cost "
            f"≈ {cost['egress'] / 1000:.1f} µs egress / {cost['ingress'] / 1000:.1f} µs ingress "
            "(estimate)")

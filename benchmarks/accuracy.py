"""Accuracy: does subtracting mace's reports turn a container's RTT into the native RTT?

Per topology (bridge with NAT, bridge, calico-style routed /32 veths with NAT) and per load
(0, 1, 2, 4 co-located containers flooding the same peer with `ping -f`), the container
pings the peer while the host namespace pings it too, half an interval apart
(mace.demo.measure).  mace traces the container; each probe is matched with its egress and
ingress report, and

    corrected RTT = container RTT - egress - ingress      (per probe, Probe.corrected_ns)
    bias = median(corrected or raw) - median(native)      (per round)

A round is three measurements at one load: traced with the default plan (the bias), untraced
(what isolation adds when nothing traces: container minus native), and traced with hops
(where the expense goes; hops add samples, so its bias is reported apart).  Rounds of the
different loads are interleaved within a topology, so drift hits every load alike; the
figures per (topology, load) are medians over rounds with a distribution-free 95 %
confidence interval of that median (order statistics from the binomial distribution).
"""

from __future__ import annotations

import gzip
import json
import math
import statistics
import time
from collections import Counter
from pathlib import Path

from benchmarks.common import DIRECTIONS, pyplot, save, wait_quiet
from mace.output.summary import HOP_STEPS

# name -> Testbed keywords
TOPOLOGIES = {
    "bridge+nat": {"topology": "bridge", "masquerade": True, "peer_dev": "eth0"},
    "bridge": {"topology": "bridge", "masquerade": False},
    "routed+nat": {"topology": "routed", "masquerade": True},
    # a 4 Mbit/s uplink the floods fill: the host's own pings wait in its qdisc as long as
    # the container's, so the end point of egress decides the corrected RTT
    "shaped+nat": {"topology": "bridge", "masquerade": True, "uplink_rate_kbit": 4000},
}
# per topology: loads other than LOADS, and measurements beyond MEASUREMENTS
TOPOLOGY_LOADS = {"shaped+nat": (0, 2)}
EXTRA = {"shaped+nat": ("xmit",)}       # xmit: the default plan with --end-at-xmit
LOADS = (0, 1, 2, 4)
COUNT, INTERVAL_S, ROUNDS = 200, 0.004, 24
QUICK = {"topologies": ("bridge+nat",), "loads": (0, 1), "rounds": 2, "count": 40}
CONFIDENCE = 0.95
TARGET_MEDIAN_US = 2.0
TARGET_RATIO = 5.0
MEASUREMENTS = ("traced", "untraced", "hops")     # per round, in this order
# beside the result: {topology: {load: [{round, traced, untraced, hops}]}}, each measurement's
# probes column by column (see _columns), None for a measurement that failed
PROBES_FILE = "accuracy-probes.json.gz"

# HOP_STEPS (mace.output.summary): the step at the end of each hop interval.
# per round, median over its probes; then median over rounds with a confidence interval
STATS = ("raw_bias", "corrected_bias", "raw_bias_p99", "corrected_bias_p99", "untraced_added",
         "expense", "expense_vs_untraced", "hops_raw_bias", "hops_corrected_bias",
         "xmit_raw_bias", "xmit_corrected_bias",
         # the mechanism: what tracing does to the host's own ping (the reference), the
         # corrected RTT against the host's RTT when nothing traces, and the host's IP layer
         # inside the segments (hops: egress from the routing decision to its end, ingress
         # from its start to the decision)
         "reference_perturbation", "corrected_vs_untraced_native", "hops_host_ip",
         "hops_corrected_keeping_host_ip_bias")
PLAN_KW = {"hops": {"hops": True}, "xmit": {"end_at_queue": False}}


def _q(values, q):
    """Median (q=50) or p99 (q=99), by the rule mace demo reports them with."""
    from mace.demo import quantiles
    return quantiles(values)["median" if q == 50 else "p99"]


def median_ci(values, confidence: float = CONFIDENCE) -> dict | None:
    """Median of `values` with a distribution-free confidence interval for it.

    The interval is [x_(j+1), x_(n-j)] of the sorted values for the largest j whose coverage,
    1 - 2 P(B <= j) with B ~ Binomial(n, 1/2), is at least `confidence`; fewer than 6 values
    cannot reach 95 %, and then the interval is min..max with the coverage it has."""
    v = sorted(x for x in values if x is not None)
    n = len(v)
    if not n:
        return None
    cdf, j_best, cov_best = 0.0, 0, 1 - 2 * 0.5 ** n
    for j in range((n - 1) // 2):
        cdf += math.comb(n, j) * 0.5 ** n           # P(B <= j)
        cov = 1 - 2 * (cdf + math.comb(n, j + 1) * 0.5 ** n)
        if cov < confidence:
            break
        j_best, cov_best = j + 1, cov
    return {"median": statistics.median(v), "lo": v[j_best], "hi": v[n - 1 - j_best],
            "confidence": round(cov_best, 4), "n": n}


def hop_intervals(hops, latency: int) -> list[int | None]:
    """ns between consecutive traced steps of one report: hop i ends at slot i (None where
    that step was not traced), the last one at the report's end (`latency`)."""
    out, prev = [], 0
    for point in (*hops, latency):
        if point is None:
            out.append(None)
        else:
            out.append(point - prev)
            prev = point
    return out


def host_ip_shares(cols: dict) -> list[int]:
    """Per matched probe of a hops run with both routing decisions timed: the host's IP
    layer inside its segments (egress: decision -> end, ingress: start -> decision)."""
    from mace.plan import EGRESS_HOPS, INGRESS_HOPS
    e_at, i_at = EGRESS_HOPS.index("route"), INGRESS_HOPS.index("route")
    out = []
    for eh, el, ih in zip(cols["egress_hops"], cols["egress"], cols["ingress_hops"], strict=True):
        if len(eh) > e_at and len(ih) > i_at and eh[e_at] and ih[i_at]:
            out.append(el - eh[e_at] + ih[i_at])
    return out if len(out) == len(cols["egress"]) else []


# -- one round ------------------------------------------------------------------------------

def _counters(counters: dict) -> dict:
    k0 = counters["containers"][0]
    return {"reports": {d: k0[d]["reports"] for d in DIRECTIONS},
            "missed": {d: sum(k0[d][n] for n in ("orphans", "expired", "evicted", "rejected"))
                       for d in DIRECTIONS},
            "kernel_dropped": counters["rings"].get("kernel_dropped", 0),
            "lost": counters["rings"].get("lost", 0)}


def _columns(run, hops: bool) -> dict:
    """A traced run's probes, column by column (matched_* and the rest: one entry per
    matched probe, in one order)."""
    m = run.matched
    out = {"raw": [p.rtt_ns for p in run.probes], "native": list(run.native_ns),
           "matched_raw": [p.rtt_ns for p in m], "egress": [p.egress_ns for p in m],
           "ingress": [p.ingress_ns for p in m], "corrected": [p.corrected_ns for p in m],
           "egress_cpu": [p.egress_cpu for p in m], "ingress_cpu": [p.ingress_cpu for p in m]}
    if hops:
        out["egress_hops"] = [list(p.egress_hops) for p in m]
        out["ingress_hops"] = [list(p.ingress_hops) for p in m]
    return {**out, **_counters(run.counters)}


def _measure(tb, k: int, kind: str, count: int, interval: float) -> tuple[dict | None, float, str | None]:
    from mace import demo
    from mace.errors import MaceError

    t0 = time.monotonic()
    try:
        run = demo.measure(tb, count=count, interval=interval, colocated=k, trace=kind != "untraced",
                           plan_kw=PLAN_KW.get(kind))
    except MaceError as e:          # one bad measurement must not end a 15-minute run
        return None, time.monotonic() - t0, f"{kind}: {e}"
    if kind == "untraced":
        cols = {"raw": [p.rtt_ns for p in run.probes], "native": list(run.native_ns)}
    else:
        cols = _columns(run, hops=kind == "hops")
    return cols, time.monotonic() - t0, None


def _diff(a, b):
    return None if a is None or b is None else a - b


def _round_stats(tr: dict | None, un: dict | None, hp: dict | None, xm: dict | None = None) -> dict:
    s = dict.fromkeys(STATS)
    if tr and tr["native"]:
        for q, suffix in ((50, ""), (99, "_p99")):
            nat = _q(tr["native"], q)
            s["raw_bias" + suffix] = _diff(_q(tr["raw"], q), nat)
            s["corrected_bias" + suffix] = _diff(_q(tr["corrected"], q), nat)
    if tr and tr["egress"]:
        s["expense"] = _q([e + i for e, i in zip(tr["egress"], tr["ingress"], strict=True)], 50)
    if un and un["native"]:
        s["untraced_added"] = _diff(_q(un["raw"], 50), _q(un["native"], 50))
        if tr and tr["native"]:
            s["reference_perturbation"] = _diff(_q(tr["native"], 50), _q(un["native"], 50))
            s["corrected_vs_untraced_native"] = _diff(_q(tr["corrected"], 50), _q(un["native"], 50))
    s["expense_vs_untraced"] = _diff(s["expense"], s["untraced_added"])
    if hp and hp["native"]:
        nat = _q(hp["native"], 50)
        s["hops_raw_bias"] = _diff(_q(hp["raw"], 50), nat)
        s["hops_corrected_bias"] = _diff(_q(hp["corrected"], 50), nat)
        shares = host_ip_shares(hp)
        if shares:
            s["hops_host_ip"] = _q(shares, 50)
            kept = [c + h for c, h in zip(hp["corrected"], shares, strict=True)]
            s["hops_corrected_keeping_host_ip_bias"] = _diff(_q(kept, 50), nat)
    if xm and xm["native"]:
        nat = _q(xm["native"], 50)
        s["xmit_raw_bias"] = _diff(_q(xm["raw"], 50), nat)
        s["xmit_corrected_bias"] = _diff(_q(xm["corrected"], 50), nat)
    return s


# -- one (topology, load) -------------------------------------------------------------------

def _coverage(runs: list[dict]) -> dict:
    out = {}
    for d in DIRECTIONS:
        got = sum(r["reports"][d] for r in runs)
        total = got + sum(r["missed"][d] for r in runs)
        out[d] = got / total if total else None
    return out


def _hops(runs: list[dict]) -> dict:
    """Median of each hop interval per direction, over every matched probe of `runs`."""
    out = {}
    for d in DIRECTIONS:
        per_step: list[list[int]] = [[] for _ in HOP_STEPS[d]]
        for r in runs:
            for hops, lat in zip(r[f"{d}_hops"], r[d], strict=True):
                for i, v in enumerate(hop_intervals(hops, lat)):
                    if v is not None and i < len(per_step):
                        per_step[i].append(v)
        q, x = HOP_STEPS[d].index("uplink queue") if d == "egress" else 0, len(HOP_STEPS[d]) - 1
        if d == "egress" and not per_step[q] and per_step[x]:
            # egress ended at the uplink's queue (the default): the last interval ends there,
            # and there is no uplink xmit step
            per_step[q], per_step[x] = per_step[x], []
        out[d] = {name: (statistics.median(v) if v else None)
                  for name, v in zip(HOP_STEPS[d], per_step, strict=True)}
        out[d]["latency"] = _q([x for r in runs for x in r[d]], 50)
    return out


def _cpus(runs: list[dict]) -> dict:
    """How many end events of each direction ran on each CPU."""
    return {d: dict(sorted(Counter(c for r in runs for c in r[f"{d}_cpu"]).items())) for d in DIRECTIONS}


def _level(k: int, rounds: list[dict]) -> dict:
    traced = [r["traced"] for r in rounds if r["traced"]]
    with_hops = [r["hops"] for r in rounds if r["hops"]]
    lv = {"colocated": k, "rounds": [_round_counts(r) for r in rounds],
          "probes": sum(len(t["raw"]) for t in traced),
          "matched": sum(len(t["corrected"]) for t in traced),
          "kernel_dropped": sum(t["kernel_dropped"] for t in traced),
          "lost": sum(t["lost"] for t in traced),
          "coverage": _coverage(traced),
          "cpu": _cpus(traced),
          "stats": {key: median_ci([r["stats"][key] for r in rounds]) for key in STATS},
          "hops": {"probes": sum(len(h["raw"]) for h in with_hops),
                   "matched": sum(len(h["corrected"]) for h in with_hops),
                   "coverage": _coverage(with_hops),
                   "kernel_dropped": sum(h["kernel_dropped"] for h in with_hops),
                   "intervals": _hops(with_hops) if with_hops else None,
                   "cpu": _cpus(with_hops)},
          "errors": [e for r in rounds for e in r["errors"]]}
    lv["ratio"] = _ratio(lv)
    return lv


def _round_counts(rec: dict) -> dict:
    """A round as the result keeps it: its statistics and counts; the probes go to PROBES_FILE."""
    counts = {}
    for kind in (*MEASUREMENTS, "xmit"):
        c = rec.get(kind)
        counts[kind] = None if c is None else {
            "probes": len(c["raw"]), "native": len(c["native"]),
            **({"matched": len(c["corrected"]), "reports": c["reports"], "missed": c["missed"],
                "kernel_dropped": c["kernel_dropped"], "lost": c["lost"]} if "corrected" in c else {})}
    return {"round": rec["round"], "errors": rec["errors"], "stats": rec["stats"], "counts": counts}


def _ratio(lv: dict) -> float | None:
    """|raw median bias| / |corrected median bias| (None: no numbers, or nothing left to
    divide by; summary() shows that as infinite)."""
    raw, cor = lv["stats"]["raw_bias"], lv["stats"]["corrected_bias"]
    if raw is None or cor is None or cor["median"] == 0:
        return None
    return abs(raw["median"]) / abs(cor["median"])


# -- run ------------------------------------------------------------------------------------

def _warm(tb, n: int) -> None:
    # ARP, neighbour entries and the first packet's connection tracking are not the topic
    for c in tb.containers[:n]:
        tb.run(c.ns, ["ping", "-n", "-c", "2", "-i", "0.2", tb.peer_ip], timeout=10)
    tb.run(tb.host_ns, ["ping", "-n", "-c", "2", "-i", "0.2", tb.peer_ip], timeout=10)


def _topology(spec: dict, loads, rounds_n: int, count: int, interval: float, timing: list,
              probes: dict, extra: tuple = ()) -> list[dict]:
    """The levels of one topology; every round's probe columns go into probes[load]."""
    from mace.testing.testbed import Testbed

    per_load: dict[int, list[dict]] = {k: [] for k in loads}
    with Testbed(containers_n=1 + max(loads), **spec) as tb:
        _warm(tb, 1 + max(loads))
        for r in range(rounds_n):
            for k in loads:             # round r of every load before round r + 1 of any
                rec = {"round": r, "errors": []}
                for kind in (*MEASUREMENTS, *extra):
                    cols, seconds, err = _measure(tb, k, kind, count, interval)
                    rec[kind] = cols
                    timing.append(seconds)
                    if err:
                        rec["errors"].append(err)
                rec["stats"] = _round_stats(rec["traced"], rec["untraced"], rec["hops"], rec.get("xmit"))
                per_load[k].append(rec)
    for k in loads:
        probes[str(k)] = [{kind: rec[kind] for kind in ("round", *MEASUREMENTS, *extra)} for rec in per_load[k]]
    return [_level(k, per_load[k]) for k in loads]


def _write_probes(probes: dict) -> str:
    """Per-probe columns of every round, compact and compressed beside the result: with
    indentation they would be some 16 MB of JSON in the result itself."""
    # RESULTS is set by --out after this module's import
    import benchmarks.common as common

    common.RESULTS.mkdir(parents=True, exist_ok=True)
    path = common.RESULTS / PROBES_FILE
    with gzip.open(path, "wt") as f:
        json.dump(probes, f, separators=(",", ":"))
    return path.name


def run(quick: bool) -> dict:
    names = QUICK["topologies"] if quick else tuple(TOPOLOGIES)
    loads = QUICK["loads"] if quick else LOADS
    rounds = QUICK["rounds"] if quick else ROUNDS
    count = QUICK["count"] if quick else COUNT
    interval = INTERVAL_S
    timing: list[float] = []
    topologies, probes = {}, {}
    t0 = time.monotonic()
    for name in names:
        wait_quiet()        # the previous testbed's namespaces are still being cleaned up
        probes[name] = {}
        mine = loads if quick else TOPOLOGY_LOADS.get(name, loads)
        topologies[name] = {"testbed": TOPOLOGIES[name],
                            "levels": _topology(TOPOLOGIES[name], mine, rounds, count, interval, timing,
                                                probes[name], EXTRA.get(name, ()))}
    elapsed = time.monotonic() - t0
    per = statistics.median(timing)
    # a measurement's fixed cost (tracer, ping start, deadline polling) plus its probes
    overhead = max(0.0, per - count * interval)
    n_full = ROUNDS * sum(len(TOPOLOGY_LOADS.get(n, LOADS)) * (len(MEASUREMENTS) + len(EXTRA.get(n, ())))
                          for n in TOPOLOGIES)
    setup = max(0.0, elapsed - sum(timing)) / len(names)
    estimate = n_full * (overhead + COUNT * INTERVAL_S) + len(TOPOLOGIES) * setup
    return {"count": count, "interval_s": interval, "rounds": rounds, "loads": list(loads),
            "confidence": CONFIDENCE, "topologies": topologies, "probes_file": _write_probes(probes),
            "timing": {"measurements": len(timing), "median_s": round(per, 3),
                       "overhead_s": round(overhead, 3), "setup_s": round(setup, 1),
                       "full_run_estimate_s": round(estimate)}}


# -- report ---------------------------------------------------------------------------------

def _us(ns):
    return None if ns is None else ns / 1000


def _ci_us(s: dict | None, digits: int = 1) -> str:
    if s is None:
        return "-"
    f = f"{{:+.{digits}f}}"
    return (f"{f.format(_us(s['median']))} µs [{f.format(_us(s['lo']))}, {f.format(_us(s['hi']))}]"
            f" ({s['n']} rounds)")


def _levels(result: dict):
    for name, t in result["topologies"].items():
        for lv in t["levels"]:
            yield name, lv


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    topos = list(result["topologies"])
    fig, axes = plt.subplots(2, len(topos), figsize=(6 * len(topos), 9), squeeze=False)
    for col, name in enumerate(topos):
        levels = result["topologies"][name]["levels"]
        _bias_panel(axes[0][col], name, levels, result["confidence"])
        _hop_panel(plt, axes[1][col], name, levels)
    save(fig, path)


def _bias_panel(ax, name: str, levels: list[dict], confidence: float) -> None:
    ks = [lv["colocated"] for lv in levels]
    for key, label, color, dx in (("raw_bias", "raw", "tab:red", -0.06),
                                  ("corrected_bias", "corrected", "tab:green", 0.06)):
        xs, ys, lo, hi = [], [], [], []
        for i, lv in enumerate(levels):
            s = lv["stats"][key]
            if s is None:
                continue
            xs.append(i + dx)
            ys.append(_us(s["median"]))
            lo.append(_us(s["median"] - s["lo"]))
            hi.append(_us(s["hi"] - s["median"]))
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o-", color=color, capsize=4, label=f"{label} bias")
    ax.axhspan(-TARGET_MEDIAN_US, TARGET_MEDIAN_US, color="tab:green", alpha=0.12,
               label=f"target ±{TARGET_MEDIAN_US:g} µs")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(ks)))
    ax.set_xticklabels([f"{k} flooding" for k in ks])
    ax.set_ylabel("median RTT minus native median (µs)")
    # the interval's true coverage: below `confidence` with fewer than 6 rounds (quick runs)
    got = min((lv["stats"]["corrected_bias"] or {}).get("confidence", confidence) for lv in levels)
    ax.set_title(f"{name}: bias, median over rounds, {got:.0%} CI of the median", fontsize=10)
    ax.legend(fontsize=8)


def _hop_panel(plt, ax, name: str, levels: list[dict]) -> None:
    w = 0.38
    cmaps = {"egress": plt.get_cmap("Blues"), "ingress": plt.get_cmap("Oranges")}
    labelled = set()
    for di, d in enumerate(DIRECTIONS):
        steps = HOP_STEPS[d]
        for i, lv in enumerate(levels):
            iv = (lv["hops"]["intervals"] or {}).get(d) or {}
            bottom = 0.0
            for si, step in enumerate(steps):
                v = _us(iv.get(step))
                if not v:
                    continue
                ax.bar(i + (di - 0.5) * w, v, w * 0.95, bottom=bottom,
                       color=cmaps[d](0.35 + 0.6 * si / max(1, len(steps) - 1)),
                       label=None if (d, step) in labelled else f"{d}: to {step}",
                       edgecolor="white", lw=0.5)
                labelled.add((d, step))
                bottom += v
    ax.set_ylim(0, ax.get_ylim()[1] * 1.45)     # room for the legend above the bars
    ax.set_xticks(range(len(levels)))
    ax.set_xticklabels([f"{lv['colocated']} flooding\nE | I" for lv in levels])
    ax.set_ylabel("median interval (µs), stacked")
    ax.set_title(f"{name}: where the expense goes (hops plan), egress | ingress", fontsize=10)
    ax.legend(fontsize=7, ncol=2)


def _old(result: dict) -> bool:
    """A result of this benchmark's earlier layout (no topologies): RESULTS.md is rewritten
    after every benchmark, and must not fail on a stale accuracy.json."""
    return "topologies" not in result


def summary(result: dict) -> list[dict]:
    if _old(result):
        return [{"metric": "result in an earlier layout", "value": "-",
                 "target": "rerun: python -m benchmarks accuracy", "met": None}]
    rows = []
    for name, lv in _levels(result):
        at = f"{name}, {lv['colocated']} flooding"
        st = lv["stats"]
        cor, raw = st["corrected_bias"], st["raw_bias"]
        rows.append({"metric": f"{at}: corrected bias, median [CI]", "value": _ci_us(cor),
                     "target": f"|median| <= {TARGET_MEDIAN_US:g} µs",
                     "met": cor is not None and abs(_us(cor["median"])) <= TARGET_MEDIAN_US})
        rows.append({"metric": f"{at}: raw bias, median [CI]", "value": _ci_us(raw), "target": "",
                     "met": None})
        ratio = lv["ratio"]
        infinite = ratio is None and cor is not None and raw is not None and raw["median"] != 0
        rows.append({"metric": f"{at}: raw / corrected median bias",
                     "value": "∞" if infinite else ("-" if ratio is None else f"{ratio:.1f}x"),
                     "target": f">= {TARGET_RATIO:g}x",
                     "met": infinite or (ratio is not None and ratio >= TARGET_RATIO)})
        cov = lv["coverage"]
        rows.append({"metric": f"{at}: coverage egress / ingress",
                     "value": " / ".join("-" if cov[d] is None else f"{100 * cov[d]:.2f}%"
                                         for d in DIRECTIONS)
                     + (f" (kernel dropped {lv['kernel_dropped']} samples)" if lv["kernel_dropped"] else ""),
                     "target": "100%", "met": all(cov[d] == 1.0 for d in cov)})
        rows.append({"metric": f"{at}: untraced added / expense vs untraced added",
                     "value": f"{_ci_us(st['untraced_added'])} / {_ci_us(st['expense_vs_untraced'])}",
                     "target": "", "met": None})
        rows.append({"metric": f"{at}: host's ping traced - untraced (reference perturbation) / "
                               "corrected - untraced host RTT",
                     "value": f"{_ci_us(st['reference_perturbation'])} / "
                              f"{_ci_us(st['corrected_vs_untraced_native'])}",
                     "target": "", "met": None})
        rows.append({"metric": f"{at}: hops plan: host IP layer inside the segments / corrected bias "
                               "keeping it",
                     "value": f"{_ci_us(st['hops_host_ip'])} / {_ci_us(st['hops_corrected_keeping_host_ip_bias'])}",
                     "target": "", "met": None})
        if st["xmit_corrected_bias"] is not None:
            rows.append({"metric": f"{at}: ending at the uplink's driver (--end-at-xmit): corrected bias",
                         "value": _ci_us(st["xmit_corrected_bias"]), "target": "", "met": None})
        rows.append({"metric": f"{at}: hops plan: corrected bias; per-hop medians (µs)",
                     "value": f"{_ci_us(st['hops_corrected_bias'])}; {_hop_text(lv)}", "target": "",
                     "met": None})
    return rows


def _hop_text(lv: dict) -> str:
    iv = lv["hops"]["intervals"]
    if not iv:
        return "-"
    parts = []
    for d in DIRECTIONS:
        steps = ", ".join(f"{s} {_us(v):.1f}" for s, v in iv[d].items() if s != "latency" and v is not None)
        cpus = lv["hops"]["cpu"][d]
        total = sum(cpus.values()) or 1
        on = " ".join(f"{c}:{100 * n / total:.0f}%" for c, n in cpus.items())
        parts.append(f"{d} {steps} (CPU {on})")
    return "; ".join(parts)


def notes(result: dict) -> list[str]:
    if _old(result):
        return []
    t = result["timing"]
    conf = {s["confidence"] for _, lv in _levels(result) for s in lv["stats"].values() if s}
    beds = "; ".join(f"{n}: {tp['testbed']}" for n, tp in result["topologies"].items())
    out = [
        f"Method: per topology one `Testbed(containers_n=1 + max load, ...)` ({beds}); 2 pings from every "
        f"container and the host first. Then {result['rounds']} rounds; in each, every load "
        f"({', '.join(map(str, result['loads']))} containers running `ping -f` to the peer) in turn, "
        "and per load three measurements (mace.demo.measure): traced with the default plan, untraced, "
        f"traced with hops; each {result['count']} pings every {result['interval_s'] * 1000:g} ms from "
        "container 0 and from the host namespace, half an interval apart.",
        "Per round: bias = median(corrected or raw RTT) - median(host RTT of the same run); "
        "corrected = Probe.corrected_ns (container RTT - egress - ingress, per matched probe); "
        "untraced added = median container RTT - median host RTT with no tracer; expense vs untraced "
        "added = median(egress + ingress) - untraced added (what mace subtracts beyond what isolation "
        "adds when nothing traces). The table shows the median over rounds with a distribution-free "
        "confidence interval of the median: [x_(j+1), x_(n-j)] of the sorted per-round values, j the "
        "largest with 1 - 2·P(Binomial(n, 1/2) <= j) >= 95 % "
        f"(achieved coverage here: {', '.join(f'{c:.1%}' for c in sorted(conf)) or '-'}; fewer than 6 "
        "rounds cannot reach 95 %, the interval is then min..max).",
        "Hops: the third measurement traces every intermediate step (plan hops=True); an interval "
        "runs from the previous traced step (t0 first) to the named one, medians over all its matched "
        "probes; the CPU shares are of the reports' end events. Hops add samples, so the bias and "
        "coverage targets are of the default plan's run only.",
        "Mechanism rows: reference perturbation = median host RTT traced - median host RTT "
        "untraced in the same round (mace samples the host's own packets on the uplink: its "
        "queue and receive events); corrected - untraced host RTT compares with a reference "
        "nothing perturbs; host IP layer = per probe of the hops run, egress from the routing "
        "decision (fib:fib_table_lookup) to its end plus ingress from its start to the decision "
        "(the host's netfilter, NAT, forwarding and output on the uplink's side), and the bias "
        "of a correction that keeps it.",
        "shaped+nat (loads 0 and 2 only): the uplink is limited to 4 Mbit/s, which the floods fill, "
        "so every packet leaving the host, the host's own pings included, waits in its qdisc; a "
        "fourth measurement per round ends egress at the uplink's driver (--end-at-xmit, MACE's "
        "end) instead of its queue (the default), to show which end point matches a native "
        "measurement.",
        f"Duration: {t['measurements']} measurements, median {t['median_s']:.2f} s each "
        f"({t['overhead_s']:.2f} s beyond the pings), {t['setup_s']:.0f} s per testbed; the full run "
        f"({len(TOPOLOGIES)} topologies, {ROUNDS} rounds of 3 or 4 measurements of {COUNT} pings per "
        f"load) is estimated at {t['full_run_estimate_s'] / 60:.0f} min.",
        "ping reports RTT in whole µs; medians over many probes resolve finer.",
    ]
    errors = [f"{n}, {lv['colocated']} flooding: {e}" for n, lv in _levels(result) for e in lv["errors"]]
    if errors:
        out.append(f"{len(errors)} measurement(s) failed: " + "; ".join(errors[:5]))
    return out

"""Accuracy: does subtracting mace's reports turn a container's RTT into the native RTT?

For 0, 2, 4 and 8 co-located containers flooding the same target, the container pings the
peer while the host namespace pings it too, half an interval apart (mace.demo.measure).
mace traces the container; each probe is matched with its egress and ingress report, and

    corrected RTT = container RTT - egress - ingress          (per probe)
    bias at quantile q = quantile_q(corrected or raw) - quantile_q(native)

The native RTT is the host's, measured interleaved with the container's probes while mace
runs.  A second run per load level measures both pings with no tracer at all, for the
native RTT mace's own presence does not touch.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from benchmarks.common import DIRECTIONS, pyplot, save

LOADS = (0, 2, 4, 8)
TARGET_MEDIAN_US = 2.0
TARGET_P99_US = 10.0
TARGET_RATIO = 5.0


def _q(values, q):
    """Median (q=50) or p99 (q=99), by the rule mace demo reports them with."""
    from mace.demo import quantiles
    return quantiles(values)["median" if q == 50 else "p99"]


def _level(tb, k: int, count: int, interval: float, rounds: int) -> dict:
    """`rounds` traced and untraced measurements in turn; biases are taken per round (both
    pings of a round see the same moment of a noisy machine), then their median."""
    from mace import demo

    # corrected, egress, ingress and matched_raw: one entry per matched probe, in one order
    pooled = {key: [] for key in ("raw", "matched_raw", "corrected", "native", "egress", "ingress",
                                  "plain_raw", "plain_native")}
    per_round = []
    probes = matched = dropped = lost = 0
    crossing = {"egress": [0, 0], "ingress": [0, 0]}      # reports, reports + misses
    for _ in range(rounds):
        traced = demo.measure(tb, count=count, interval=interval, colocated=k)
        plain = demo.measure(tb, count=count, interval=interval, colocated=k, trace=False)
        m = traced.matched
        raw = [p.rtt_ns for p in traced.probes]
        corrected = [p.corrected_ns for p in m]
        plain_raw = [p.rtt_ns for p in plain.probes]
        if corrected and traced.native_ns and plain.native_ns and plain_raw:
            r = {}
            for q in (50, 99):
                nat = _q(traced.native_ns, q)
                r[f"raw_bias_p{q}"] = _q(raw, q) - nat
                r[f"corrected_bias_p{q}"] = _q(corrected, q) - nat
                r[f"corrected_vs_untraced_p{q}"] = _q(corrected, q) - _q(plain.native_ns, q)
                r[f"plain_raw_bias_p{q}"] = _q(plain_raw, q) - _q(plain.native_ns, q)
            per_round.append(r)
        pooled["raw"] += raw
        pooled["matched_raw"] += [p.rtt_ns for p in m]
        pooled["corrected"] += corrected
        pooled["native"] += traced.native_ns
        pooled["egress"] += [p.egress_ns for p in m]
        pooled["ingress"] += [p.ingress_ns for p in m]
        pooled["plain_raw"] += plain_raw
        pooled["plain_native"] += plain.native_ns
        probes += len(traced.probes)
        matched += len(m)
        k0 = traced.counters["containers"][0]
        for d in crossing:
            missed = sum(k0[d][n] for n in ("orphans", "expired", "evicted", "rejected"))
            crossing[d][0] += k0[d]["reports"]
            crossing[d][1] += k0[d]["reports"] + missed
        dropped += traced.counters["rings"].get("kernel_dropped", 0)
        lost += traced.counters["rings"].get("lost", 0)
    out = {"colocated": k, "rounds": per_round, "probes": probes, "matched": matched,
           "kernel_dropped": dropped, "lost": lost,
           "coverage": {d: (a / b if b else None) for d, (a, b) in crossing.items()}, **pooled}
    if not per_round:
        raise RuntimeError(f"{k} co-located: no round matched any probe")
    for key in per_round[0]:
        out[key] = statistics.median(r[key] for r in per_round)
    return out


def run(quick: bool) -> dict:
    from mace.testing.testbed import Testbed

    loads = (0, 2) if quick else LOADS
    count, interval, rounds = (150, 0.005, 1) if quick else (400, 0.004, 5)
    levels = []
    with Testbed(containers_n=1 + max(loads), masquerade=True) as tb:
        tb.run(tb.containers[0].ns, ["ping", "-n", "-c", "2", "-i", "0.2", tb.peer_ip], timeout=10)
        tb.run(tb.host_ns, ["ping", "-n", "-c", "2", "-i", "0.2", tb.peer_ip], timeout=10)
        for k in loads:
            levels.append(_level(tb, k, count, interval, rounds))
    return {"count": count, "interval_s": interval, "rounds": rounds, "levels": levels}


def _us(ns):
    return None if ns is None else ns / 1000


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    levels = result["levels"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 5))
    ks = [lv["colocated"] for lv in levels]
    x = range(len(ks))
    w = 0.2
    for i, (key, label, color) in enumerate((("raw_bias_p50", "raw, median", "tab:red"),
                                             ("corrected_bias_p50", "corrected, median", "tab:green"),
                                             ("raw_bias_p99", "raw, p99", "salmon"),
                                             ("corrected_bias_p99", "corrected, p99", "lightgreen"))):
        a1.bar([xi + (i - 1.5) * w for xi in x], [_us(lv[key]) for lv in levels], w, label=label,
               color=color)
    a1.axhline(0, color="black", lw=0.8)
    a1.set_xticks(list(x))
    a1.set_xticklabels([f"{k} co-located" for k in ks])
    a1.set_ylabel("bias vs native RTT (µs)")
    a1.set_title("container RTT minus native RTT, before and after mace's correction")
    a1.legend(fontsize=8)
    lv = levels[0]
    for key, label, color in (("raw", "container RTT (raw)", "tab:red"),
                              ("corrected", "corrected by mace", "tab:green"),
                              ("native", "native (host namespace)", "tab:blue")):
        v = sorted(_us(n) for n in lv[key])
        a2.plot(v, [(i + 1) / len(v) for i in range(len(v))], label=label, color=color)
    a2.set_xlabel("RTT (µs)")
    a2.set_ylabel("fraction of probes")
    a2.set_title(f"no co-located load: {lv['matched']} probes")
    hi = _q([_us(n) for n in lv["raw"]], 99) or 1
    a2.set_xlim(0, hi * 1.2)
    a2.legend(fontsize=8)
    save(fig, path)


def summary(result: dict) -> list[dict]:
    rows = []
    for lv in result["levels"]:
        k = lv["colocated"]
        cm, cp = _us(lv["corrected_bias_p50"]), _us(lv["corrected_bias_p99"])
        rm, rp = _us(lv["raw_bias_p50"]), _us(lv["raw_bias_p99"])
        ratio = abs(rm) / abs(cm) if cm else float("inf")
        rows.append({"metric": f"{k} co-located: raw bias median / p99",
                     "value": f"{rm:+.1f} / {rp:+.1f} µs", "target": "", "met": None})
        if k == 0:
            rows.append({"metric": "0 co-located: corrected bias median",
                         "value": f"{cm:+.1f} µs", "target": f"|x| <= {TARGET_MEDIAN_US:g} µs",
                         "met": abs(cm) <= TARGET_MEDIAN_US})
            rows.append({"metric": "0 co-located: corrected bias p99",
                         "value": f"{cp:+.1f} µs", "target": f"|x| <= {TARGET_P99_US:g} µs",
                         "met": abs(cp) <= TARGET_P99_US})
        else:
            rows.append({"metric": f"{k} co-located: corrected bias median / p99",
                         "value": f"{cm:+.1f} / {cp:+.1f} µs", "target": "", "met": None})
        rows.append({"metric": f"{k} co-located: raw / corrected median bias",
                     "value": f"{ratio:.1f}x", "target": f">= {TARGET_RATIO:g}x",
                     "met": ratio >= TARGET_RATIO})
        cov = lv["coverage"]
        rows.append({"metric": f"{k} co-located: coverage egress / ingress",
                     "value": " / ".join("-" if cov[d] is None else f"{100 * cov[d]:.2f}%"
                                         for d in DIRECTIONS)
                     + (f" (kernel dropped {lv['kernel_dropped']} samples)" if lv["kernel_dropped"] else ""),
                     "target": "100%", "met": all(cov[d] == 1.0 for d in cov)})
    return rows


def notes(result: dict) -> list[str]:
    out = [f"Each load level: {result['rounds']} rounds of {result['count']} pings every "
           f"{result['interval_s'] * 1000:g} ms from the container and from the host namespace "
           "(half an interval apart), traced and then untraced; biases are per round, then the "
           "median of the rounds is shown.  Co-located "
           "containers running `ping -f` to the same peer, through a bridge and nftables "
           "masquerade; the uplink is a veth to a peer namespace."]
    for lv in result["levels"]:
        out.append(
            f"{lv['colocated']} co-located: matched {lv['matched']}/{lv['probes']} probes; pooled median "
            f"raw {_us(_q(lv['raw'], 50)):.1f}, egress {_us(_q(lv['egress'], 50)):.1f}, ingress "
            f"{_us(_q(lv['ingress'], 50)):.1f}, corrected {_us(_q(lv['corrected'], 50)):.1f}, "
            f"native {_us(_q(lv['native'], 50)):.1f} µs; with no tracer at all: container "
            f"{_us(_q(lv['plain_raw'], 50)):.1f}, native {_us(_q(lv['plain_native'], 50)):.1f} µs "
            f"(corrected minus untraced native {_us(lv['corrected_vs_untraced_p50']):+.1f} µs).")
    out.append("ping reports RTT in whole µs; medians over many probes resolve finer. The native "
               "RTT while mace runs carries mace's events at the uplink (queue, transmit, receive); "
               "the corrected RTT carries the events mace records outside the measured segments.")
    return out

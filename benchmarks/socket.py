"""The socket segment (MACE's own): does the corrected RTT come out as the RTT on the wire?

A container pings the peer (`ping -U`: user space to user space, as the socket segment
ends where the receive call returns) while tcpdump captures the testbed's uplink with
nanosecond stamps, the stand-in for the paper's hardware RTT: each probe's request and reply
seen there, by ICMP identifier and sequence (mace.demo.wire_rtts).  mace traces the
container with `--segment socket`: from its ping's send call to the uplink's transmit, and
from the uplink's receive to its receive call.  Then

    corrected RTT = container RTT - egress - ingress,  bias = corrected - wire   (per probe)

idle and with 1, 2 and 4 co-located containers flooding the peer; rounds of the loads
interleaved, each round a traced and an untraced measurement (the latter for what tracing
adds to the container's RTT: perturbation); medians over rounds with a distribution-free
95 % interval.  The paper's three plots: bias, coverage, perturbation.

The capture is an instrument with a cost and a place of its own: its transmit tap runs in
xmit_one before the driver (`net_dev_start_xmit`, where the socket segment's egress ends),
so its work (a clone, a copy) lies inside mace's egress but inside the wire RTT too; its
receive stamp is taken when the reply is queued to the uplink's backlog (netif_rx), before
mace's ingress starts (netif_receive_skb).  Per probe, clocks aligned by
pcap.realtime_offset: `tap` = mace's egress end - the capture's request stamp, `rx_gap` =
mace's ingress start - the capture's reply stamp, and `apart` = bias + tap - rx_gap, what
is left with both instruments' differences taken out: ping's own user-space stamps outside
its send and receive calls.  The capture is buffered, not in immediate mode: a wakeup of
tcpdump per packet put ~5 µs into the tap (measured: tap 5.0-6.6 µs against 1.4-1.7).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.accuracy import _ci_us, _q, _us, median_ci
from benchmarks.common import pyplot, save, wait_quiet

LOADS = (0, 1, 2, 4)
COUNT, INTERVAL_S, ROUNDS = 200, 0.004, 12
QUICK = {"loads": (0, 1), "rounds": 2, "count": 40}
TARGET_US = 2.0
STATS = ("bias", "raw_bias", "tap", "rx_gap", "apart", "perturbation")


def _measure(tb, k: int, count: int, interval: float, trace: bool, tmp: str) -> tuple[dict | None, str | None]:
    from mace import demo
    from mace.errors import MaceError
    from mace.testing import pcap

    try:
        off = pcap.realtime_offset()
        run = demo.measure(tb, count=count, interval=interval, colocated=k, trace=trace,
                           segment="socket", wire=f"{tmp}/uplink-{k}-{trace}.pcap")
    except MaceError as e:
        return None, f"{'traced' if trace else 'untraced'}: {e}"
    m = [p for p in run.matched if p.wire_ns is not None] if trace else []
    out = {"raw": [p.rtt_ns for p in run.probes],
           "wire_all": [p.wire_ns for p in run.probes if p.wire_ns is not None],
           "corrected": [p.corrected_ns for p in m], "wire": [p.wire_ns for p in m],
           "tap": [p.egress_end + off - p.wire_out for p in m],
           "rx_gap": [p.ingress_start + off - p.wire_in for p in m]}
    if trace:
        k0 = run.counters["containers"][0]
        out["counts"] = {d: {n: k0[d][n] for n in ("crossed", "reports", "orphans", "expired", "evicted",
                                                     "rejected", "unpaired")}
                         for d in ("egress", "ingress")}
    return out, None


def _round(tr: dict | None, un: dict | None) -> dict:
    s = dict.fromkeys(STATS)
    if tr and tr["corrected"]:
        bias = [c - w for c, w in zip(tr["corrected"], tr["wire"], strict=True)]
        s["bias"] = _q(bias, 50)
        s["raw_bias"] = _q(tr["raw"], 50) - _q(tr["wire_all"], 50)
        s["tap"] = _q(tr["tap"], 50)
        s["rx_gap"] = _q(tr["rx_gap"], 50)
        s["apart"] = _q([b + t - g for b, t, g in zip(bias, tr["tap"], tr["rx_gap"], strict=True)], 50)
    if tr and un and un["raw"]:
        s["perturbation"] = _q(tr["raw"], 50) - _q(un["raw"], 50)
    return s


def _coverage(rounds: list[dict]) -> dict:
    out = {}
    for d in ("egress", "ingress"):
        got = missed = unpaired = 0
        for r in rounds:
            c = (r["traced"] or {}).get("counts")
            if c:
                got += c[d]["reports"]
                missed += sum(c[d][n] for n in ("orphans", "expired", "evicted", "rejected"))
                unpaired += c[d]["unpaired"]
        out[d] = {"coverage": got / (got + missed) if got + missed else None, "unpaired": unpaired}
    return out


def run(quick: bool) -> dict:
    from mace.testing.testbed import Testbed

    loads = QUICK["loads"] if quick else LOADS
    rounds_n = QUICK["rounds"] if quick else ROUNDS
    count = QUICK["count"] if quick else COUNT
    per: dict[int, list[dict]] = {k: [] for k in loads}
    t0 = time.monotonic()
    wait_quiet()
    with Testbed(containers_n=1 + max(loads), masquerade=True, cgroups=True) as tb, \
            tempfile.TemporaryDirectory(prefix="mace-bench-") as tmp:
        for c in tb.containers:
            tb.run(c.ns, ["ping", "-n", "-c", "2", "-i", "0.2", tb.peer_ip], timeout=10)
        tb.run(tb.host_ns, ["ping", "-n", "-c", "2", "-i", "0.2", tb.peer_ip], timeout=10)
        for r in range(rounds_n):
            for k in loads:
                rec = {"round": r, "errors": []}
                for trace in (True, False):
                    cols, err = _measure(tb, k, count, INTERVAL_S, trace, tmp)
                    rec["traced" if trace else "untraced"] = cols
                    if err:
                        rec["errors"].append(err)
                rec["stats"] = _round(rec["traced"], rec["untraced"])
                per[k].append(rec)
    levels = []
    for k in loads:
        rounds = per[k]
        levels.append({"colocated": k, "stats": {key: median_ci([r["stats"][key] for r in rounds]) for key in STATS},
                       "coverage": _coverage(rounds),
                       "probes": sum(len((r["traced"] or {}).get("raw", [])) for r in rounds),
                       "matched": sum(len((r["traced"] or {}).get("corrected", [])) for r in rounds),
                       "errors": [e for r in rounds for e in r["errors"]]})
    return {"count": count, "interval_s": INTERVAL_S, "rounds": rounds_n, "loads": list(loads),
            "levels": levels, "seconds_measuring": round(time.monotonic() - t0, 1)}


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4.6))
    levels = result["levels"]
    xs = list(range(len(levels)))
    labels = [f"{lv['colocated']} flooding" for lv in levels]
    for key, label, color, dx in (("raw_bias", "raw", "tab:red", -0.08), ("bias", "corrected", "tab:green", 0),
                                  ("apart", "corrected, the capture's tap and stamp apart", "tab:blue", 0.08)):
        pts = [(i + dx, lv["stats"][key]) for i, lv in enumerate(levels) if lv["stats"][key]]
        if pts:
            a.errorbar([x for x, _ in pts], [_us(s["median"]) for _, s in pts],
                       yerr=[[_us(s["median"] - s["lo"]) for _, s in pts], [_us(s["hi"] - s["median"]) for _, s in pts]],
                       fmt="o-", color=color, capsize=4, label=label)
    a.axhspan(-TARGET_US, TARGET_US, color="tab:green", alpha=0.12, label=f"target ±{TARGET_US:g} µs")
    a.axhline(0, color="black", lw=0.8)
    a.set_title("socket segment: RTT minus the wire's, median over rounds, 95% CI", fontsize=10)
    a.set_ylabel("µs")
    a.legend(fontsize=7)
    for d, color in (("egress", "tab:blue"), ("ingress", "tab:orange")):
        b.plot(xs, [100 * (lv["coverage"][d]["coverage"] or 0) for lv in levels], "o-", color=color, label=d)
    b.set_ylim(90, 100.5)
    b.set_title("coverage (reports / reportable)", fontsize=10)
    b.legend(fontsize=8)
    pts = [(i, lv["stats"]["perturbation"]) for i, lv in enumerate(levels) if lv["stats"]["perturbation"]]
    if pts:
        c.errorbar([x for x, _ in pts], [_us(s["median"]) for _, s in pts],
                   yerr=[[_us(s["median"] - s["lo"]) for _, s in pts], [_us(s["hi"] - s["median"]) for _, s in pts]],
                   fmt="o-", color="tab:purple", capsize=4)
    c.axhline(0, color="black", lw=0.8)
    c.set_title("perturbation: container RTT traced - untraced (median)", fontsize=10)
    for ax in (a, b, c):
        ax.set_xticks(xs)
        ax.set_xticklabels(labels)
    save(fig, path)


def summary(result: dict) -> list[dict]:
    rows = []
    for lv in result["levels"]:
        at = f"{lv['colocated']} flooding"
        st = lv["stats"]
        b = st["bias"]
        rows.append({"metric": f"{at}: corrected - wire RTT, median [CI]", "value": _ci_us(b),
                     "target": f"|median| <= {TARGET_US:g} µs",
                     "met": b is not None and abs(_us(b["median"])) <= TARGET_US})
        rows.append({"metric": f"{at}: the capture's transmit tap inside the egress / its receive stamp "
                               "before the ingress",
                     "value": f"{_ci_us(st['tap'])} / {_ci_us(st['rx_gap'])}", "target": "", "met": None})
        rows.append({"metric": f"{at}: corrected - wire RTT, both apart (ping's user-space stamps)",
                     "value": _ci_us(st["apart"]), "target": "", "met": None})
        rows.append({"metric": f"{at}: raw - wire RTT", "value": _ci_us(st["raw_bias"]), "target": "", "met": None})
        cov = lv["coverage"]
        rows.append({"metric": f"{at}: coverage egress / ingress (unpaired)",
                     "value": " / ".join("-" if cov[d]["coverage"] is None else f"{100 * cov[d]['coverage']:.2f}%"
                                         for d in ("egress", "ingress"))
                     + f" ({cov['egress']['unpaired']} / {cov['ingress']['unpaired']})",
                     "target": "100%", "met": all(cov[d]["coverage"] == 1.0 for d in cov)})
        rows.append({"metric": f"{at}: perturbation (container RTT traced - untraced)",
                     "value": _ci_us(st["perturbation"]), "target": "", "met": None})
    return rows


def notes(result: dict) -> list[str]:
    errors = [e for lv in result["levels"] for e in lv["errors"]]
    return [
        f"Method: Testbed(containers_n=1 + max load, masquerade=True, cgroups=True); {result['rounds']} rounds, "
        f"in each every load ({', '.join(map(str, result['loads']))} containers running `ping -f`) in turn, a "
        f"traced (`--segment socket`) and an untraced measurement of {result['count']} pings every "
        f"{result['interval_s'] * 1000:g} ms (`ping -U`) from container 0 (and the host, half an interval "
        "apart), tcpdump on the uplink throughout (nanosecond stamps, -U, buffered: not in immediate mode).",
        "bias = per probe, corrected RTT - its RTT on the uplink capture. The capture's tap = mace's egress "
        "end (net_dev_start_xmit on the uplink) - the capture's stamp of the request: the capture's own work "
        "(a clone, a copy into its ring), inside both mace's egress and the wire RTT. Its receive stamp is "
        "taken where the reply is queued to the uplink's backlog (netif_rx): rx gap = mace's ingress start "
        "(netif_receive_skb) - that stamp, a wait inside the corrected RTT and outside the wire's. "
        "'Both apart' = bias + tap - rx gap: ping's user-space stamps outside its calls.",
        f"Medians over rounds with a distribution-free 95 % interval (as the accuracy benchmark); "
        f"{statistics.median([lv['matched'] for lv in result['levels']]) if result['levels'] else 0:.0f} "
        "matched probes per level at the median.",
        *([f"{len(errors)} measurement(s) failed: " + "; ".join(errors[:5])] if errors else []),
    ]

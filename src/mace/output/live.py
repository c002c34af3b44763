"""The live view of `mace trace --tui`, in the style of htop and bpftop.

One row per traced container with egress and ingress latency (p50, p99 and max over a
sliding window and since the start), packets per second, coverage and a sparkline of the
median per second; a footer with events drained per second, lost, evicted, expired,
orphans, the table fill and mace's own CPU use.  With --hops, the split of the expense
between hops for the selected container (up/down or j/k to select, q to quit).

The view only reads snapshots between polls (counters, histograms, the reports of the last
poll) and redraws at most four times a second: it never slows the drain loop.
"""

from __future__ import annotations

import os
import select
import sys
import termios
import time
import tty
from collections import deque

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from mace.defaults import DIRECTIONS
from mace.output.clock import us as _us
from mace.output.report import Histogram, Report, coverage
from mace.plan import Plan

WINDOW_S = 10           # sliding window for the "now" columns
SPARK_S = 30            # seconds shown in a sparkline
REDRAW_S = 0.25
SPARK = "▁▂▃▄▅▆▇█"
# the segments between consecutive steps, by direction (see mace.plan)
# What lies between two steps of a report (its hop slots, then its end): the host's IP
# layer is split at the routing decision (netfilter's PREROUTING and the lookup before it;
# FORWARD, POSTROUTING (NAT) and the output after it)
EGRESS_SEGMENTS = ("veth xmit", "veth backlog", "bridge", "prerouting, route",
                   "forward, postrouting", "uplink qdisc")
INGRESS_SEGMENTS = ("prerouting, route", "forward, postrouting", "bridge", "veth xmit",
                    "container backlog", "socket, until read")


def sparkline(values: list[float | None]) -> str:
    seen = [v for v in values if v is not None]
    if not seen:
        return " " * len(values)
    lo, hi = min(seen), max(seen)
    span = (hi - lo) or 1.0
    return "".join(" " if v is None else SPARK[min(7, int((v - lo) / span * 7.999))] for v in values)


def segments(direction: int, hops: tuple, latency: int) -> list[int | None]:
    """Durations between consecutive steps of one report (None where a step was not seen)."""
    points = [0, *hops, latency]
    out: list[int | None] = []
    last = 0
    for p in points[1:]:
        if p is None:
            out.append(None)
            continue
        out.append(p - last)
        last = p
    # a step not seen merges its segment into the next one: keep lengths per direction
    return out[:len(EGRESS_SEGMENTS if direction == 0 else INGRESS_SEGMENTS)]


def segment_names(plan: Plan) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The segments each direction's reports of `plan` have (see segments())."""
    egress = EGRESS_SEGMENTS if not plan.end_at_queue else EGRESS_SEGMENTS[:-1]
    if plan.socket:     # the send call to the veth is the container's own stack
        return ("container stack", *egress[1:]), INGRESS_SEGMENTS
    return egress, INGRESS_SEGMENTS[:-1]


class LiveView:
    """Context manager drawing the live view of a Tracer; `quit` turns true on `q`."""

    def __init__(self, tracer, labels: list[str], plan: Plan, console: Console | None = None):
        self.tracer = tracer
        self.labels = labels
        self.plan = plan
        self.console = console or Console(stderr=False)
        self.quit = False
        self.selected = 0
        self.started = time.monotonic()
        self.snapshots: deque = deque()        # (time, histograms, counters, events)
        self.spark: list[list[deque]] = [[deque(maxlen=SPARK_S), deque(maxlen=SPARK_S)]
                                         for _ in labels]
        self.hop_sums = [[[0] * len(EGRESS_SEGMENTS), [0] * len(INGRESS_SEGMENTS)] for _ in labels]
        self.hop_counts = [[[0] * len(EGRESS_SEGMENTS), [0] * len(INGRESS_SEGMENTS)] for _ in labels]
        self.second: list[list[list[int]]] = [[[], []] for _ in labels]
        self.last_second = time.monotonic()
        self.last_draw = 0.0
        self.cpu0 = self._cpu()
        self.t_cpu = time.monotonic()
        self.cpu_share = 0.0
        self.live: Live | None = None
        self.tty_state = None
        self.messages: list[str] = []       # shown in the view, printed again after it

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> LiveView:
        self.live = Live(console=self.console, auto_refresh=False, screen=True,
                         redirect_stderr=False, redirect_stdout=False)
        self.live.__enter__()
        try:
            if sys.stdin.isatty():
                fd = sys.stdin.fileno()
                self.tty_state = termios.tcgetattr(fd)
                tty.setcbreak(fd)
        except BaseException:
            self.close()
            raise
        return self

    def message(self, text: str) -> None:
        """A line for the user (a container stopped): stderr is hidden behind the view."""
        self.messages.append(text)

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def close(self) -> None:
        if self.tty_state is not None:
            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, self.tty_state)
            self.tty_state = None
        if self.live is not None:
            self.live.__exit__(None, None, None)
            self.live = None

    # -- input -------------------------------------------------------------------------------

    def add(self, reports: list[Report]) -> None:
        for r in reports:
            self.second[r.container][r.dir].append(r.latency)
            for i, seg in enumerate(segments(r.dir, r.hops, r.latency)):
                if seg is not None:
                    self.hop_sums[r.container][r.dir][i] += seg
                    self.hop_counts[r.container][r.dir][i] += 1

    def _keys(self) -> None:
        if self.tty_state is None:
            return
        while select.select([sys.stdin], [], [], 0)[0]:
            ch = os.read(sys.stdin.fileno(), 8).decode(errors="ignore")
            if not ch:
                return
            if "q" in ch:
                self.quit = True
            if ch in ("j", "\x1b[B"):
                self.selected = min(len(self.labels) - 1, self.selected + 1)
            if ch in ("k", "\x1b[A"):
                self.selected = max(0, self.selected - 1)

    @staticmethod
    def _cpu() -> float:
        t = os.times()
        return t.user + t.system

    # -- drawing -----------------------------------------------------------------------------

    def refresh(self, force: bool = False) -> None:
        self._keys()
        now = time.monotonic()
        if now - self.last_second >= 1.0:
            self.last_second = now
            for c in range(len(self.labels)):
                for d in (0, 1):
                    lat = sorted(self.second[c][d])
                    self.spark[c][d].append(lat[len(lat) // 2] if lat else None)
                    self.second[c][d] = []
        if not force and now - self.last_draw < REDRAW_S:
            return
        cpu = self._cpu()
        if now > self.t_cpu:
            self.cpu_share = (cpu - self.cpu0) / (now - self.t_cpu)
        self.cpu0, self.t_cpu = cpu, now
        self.last_draw = now
        stats = self.tracer.stats()
        hists = [[Histogram(self.tracer.correlator.histogram(c, d)) for d in (0, 1)]
                 for c in range(len(self.labels))]
        self.snapshots.append((now, hists, stats))
        while self.snapshots and now - self.snapshots[0][0] > WINDOW_S:
            self.snapshots.popleft()
        if self.live is not None:
            self.live.update(self.render(now, hists, stats), refresh=True)

    def render(self, now: float, hists, stats):
        t0, old_hists, old_stats = self.snapshots[0]
        span = max(now - t0, 1e-3)
        wide = self.console.width >= 130      # narrow terminals drop the since-start columns
        table = Table(box=box.SIMPLE_HEAD, expand=True, title=f"mace · {len(self.labels)} "
                      f"container(s) · {self.plan.segment} segment · uplink {self.plan.uplink} · "
                      f"{now - self.started:.0f} s",
                      title_justify="left")
        table.add_column("container", no_wrap=True, overflow="ellipsis", max_width=28)
        table.add_column("dir", no_wrap=True)
        table.add_column("pkt/s", justify="right", no_wrap=True)
        for name in ("p50", "p99", "max"):
            table.add_column(f"{name} {WINDOW_S}s", justify="right", no_wrap=True)
        if wide:
            for name in ("p50", "p99", "max"):
                table.add_column(f"{name} all", justify="right", no_wrap=True)
        table.add_column("cover", justify="right", no_wrap=True)
        table.add_column("p50/s", no_wrap=True, overflow="crop")
        for c, label in enumerate(self.labels):
            for d, name in enumerate(DIRECTIONS):
                k = stats["containers"][c][name]
                win = hists[c][d].minus(old_hists[c][d])
                cov = coverage(k)
                style = "reverse" if c == self.selected and len(self.labels) > 1 else ""
                cells = [Text(label if d == 0 else "", style=style), name[:2] if not wide else name,
                         f"{win.total / span:.0f}", _us(win.percentile(50)),
                         _us(win.percentile(99)), _us(win.max_value())]
                if wide:
                    cells += [_us(hists[c][d].percentile(50)), _us(hists[c][d].percentile(99)),
                              _us(k["max_ns"])]
                cells += ["-" if cov is None else f"{100 * cov:.1f}%",
                          sparkline(list(self.spark[c][d]))]
                table.add_row(*cells)
        parts = [table]
        if self.plan.hops:
            parts.append(self._hops_panel())
        parts.append(self._footer(span, stats, old_stats))
        parts += [Text(m, style="yellow") for m in self.messages[-3:]]
        return Group(*parts)

    def _hops_panel(self):
        c = self.selected
        t = Table(box=box.SIMPLE, title=f"where the time goes · {self.labels[c]} (↑/↓ to choose)",
                  title_justify="left")
        t.add_column("dir")
        t.add_column("segment")
        t.add_column("mean µs", justify="right")
        t.add_column("share")
        for d, names in enumerate(segment_names(self.plan)):
            means = [s / n if n else None for s, n in zip(self.hop_sums[c][d], self.hop_counts[c][d], strict=True)]
            total = sum(m for m in means if m) or 1
            for i, (name, m) in enumerate(zip(names, means, strict=False)):
                bar = "█" * int(round(20 * (m or 0) / total))
                t.add_row(DIRECTIONS[d] if i == 0 else "",
                          name, _us(m), bar)
        return t

    def _footer(self, span, stats, old_stats):
        r, g = stats["rings"], stats["correlator"]
        ev = (r.get("events", 0) - old_stats["rings"].get("events", 0)) / span
        per = stats["containers"]
        total = {k: sum(c[d][k] for c in per for d in DIRECTIONS)
                 for k in ("evicted", "expired", "orphans")}
        fill = 100 * g["table_used"] / g["table_size"]
        return Text(f"events {ev:,.0f}/s · lost {r.get('lost', 0)} · evicted {total['evicted']}"
                    f" (+{g['evicted']} unattributed) · expired {total['expired']} · orphans "
                    f"{total['orphans']} · table {g['table_used']}/{g['table_size']} ({fill:.1f}%)"
                    f" · mace CPU {100 * self.cpu_share:.1f}% · q to quit", style="dim")

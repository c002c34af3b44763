"""Prometheus metrics of `mace serve --metrics [ADDR:]PORT`: every traced container's
latency histograms, packet outcomes and mace's own losses, at /metrics.

Nothing here runs per report.  The correlator counts each report into the exported
buckets itself, exactly (`Correlator.enable_buckets`: its own log-linear buckets do not
share edges with 5 µs, 10 µs, ..., so folding them at scrape time would misplace up to a
bucket's width at every bound).  A scrape asks the engine thread for a snapshot of the
counters, between two polls, and builds the families from it.

Series are labelled by the container's names (container, pod, namespace: the runtime's,
or `netns:INODE` for a namespace no runtime claims), never by addresses or per-packet
values; their number is bounded by --max-namespaces.  A container that goes away keeps its
series, frozen, for a grace period (GRACE, `$MACE_METRICS_GRACE`) and until a scrape of
/metrics has served them; a namespace that comes back under the same names (a restarted
container) continues the same counters.

Probes ask /healthz: it takes no snapshot, so it can neither cost a scrape's work nor take a
gone container's last values from Prometheus.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from mace import __version__
from mace.correlate._correlate import HOPS
from mace.defaults import DIRECTIONS
from mace.errors import ResourceError, UsageError
from mace.output.summary import hop_steps

# Inclusive upper bounds, 1-2-5 per decade from 1 µs to 100 ms: the added latency of a
# container path is µs to ms; beyond, +Inf.
BOUNDS_NS = [m * 10**e for e in range(3, 9) for m in (1, 2, 5)][:16]
BOUNDS_S = [b / 1e9 for b in BOUNDS_NS]

# exported outcome -> the correlator's counter
OUTCOMES = {"reported": "reports", "orphan": "orphans", "expired": "expired", "evicted": "evicted",
            "rejected": "rejected", "local": "local", "dropped": "dropped"}
LABELS = ("container", "pod", "namespace")
HOP_ROWS = HOPS + 2   # Correlator.buckets(): the latency, each hop slot, the end

# How long a gone container's frozen series stay (s), at least: served by every scraper
# before they leave.  Prometheus scrapes every 1 min unless told (its global default), the
# ServiceMonitor every 15 s: 120 s is two scrapes at the default, so one failed scrape (or
# one of an HA pair's scrapes landing late) still sees the last values; 8 at 15 s.  They
# also stay until a /metrics scrape has served them, however long that takes.
GRACE = 120.0
GRACE_ENV = "MACE_METRICS_GRACE"
METRICS_PATH = "/metrics"
HEALTH_PATH = "/healthz"


def parse_address(text: str) -> tuple[str, int]:
    """`[ADDR:]PORT` -> (addr, port); the address defaults to loopback, an IPv6 one is
    written in brackets."""
    addr, sep, port = text.rpartition(":")
    if not sep:
        addr = "127.0.0.1"
    elif addr.startswith("[") and addr.endswith("]"):
        addr = addr[1:-1]
    hint = "give [ADDR:]PORT, e.g. 9464, 0.0.0.0:9464 or [::]:9464"
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        raise UsageError(f"--metrics {text!r}: {addr!r} is not an IP address", hint=hint) from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--metrics {text!r}: {port!r} is not a port number (1-65535)", hint=hint)
    if ip.version == 6 and not text.startswith("["):
        raise UsageError(f"--metrics {text!r}: an IPv6 address needs brackets", hint=hint)
    return str(ip), int(port)


def grace_from_env(env=None) -> float:
    """The grace period: `$MACE_METRICS_GRACE` (seconds, >= 0), else GRACE."""
    text = (os.environ if env is None else env).get(GRACE_ENV, "").strip()
    if not text:
        return GRACE
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise UsageError(f"{GRACE_ENV}={text!r} is not a number of seconds",
                         hint=f"unset it (default {GRACE:g} s) or give e.g. {GRACE_ENV}=300")
    return value


@dataclass
class Series:
    """One container's counters: per direction the outcome counts, and the buckets
    (counts per row and bucket, not cumulative; sums per row in ns)."""

    labels: tuple[str, str, str]
    outcomes: list[dict[str, int]]
    buckets: list[tuple[list[list[int]], list[int]]]

    def add(self, other: Series) -> Series:
        return Series(self.labels,
                      [{k: a[k] + b[k] for k in a} for a, b in zip(self.outcomes, other.outcomes, strict=True)],
                      [([[x + y for x, y in zip(ra, rb, strict=True)] for ra, rb in zip(ca, cb, strict=True)],
                        [x + y for x, y in zip(sa, sb, strict=True)])
                       for (ca, sa), (cb, sb) in zip(self.buckets, other.buckets, strict=True)])


def labels_of(label: str, identity: dict | None) -> tuple[str, str, str]:
    who = identity or {}
    return (who.get("container") or label, who.get("pod") or "", who.get("k8s_namespace") or "")


def series_of(tracer, index: int, labels: tuple[str, str, str], counters: dict | None = None) -> Series:
    """The counters of container `index` now (engine thread, inside tracer.hold())."""
    per = (counters or tracer.correlator.counters())["containers"][index]
    return Series(labels, [{o: per[d][c] for o, c in OUTCOMES.items()} for d in DIRECTIONS],
                  [tracer.correlator.buckets(index, d) for d in range(2)])


@dataclass
class Snapshot:
    series: list[Series]
    events: int
    ring_lost: int
    kernel_dropped: int
    traced: int
    table_fill: float


@dataclass
class Gone:
    """A container that went away: its last counters, and since when."""

    series: Series
    since: float        # Book.clock() when it went (again)


@dataclass
class Book:
    """The engine's record of what scrapes have to show beyond the live tracer: counters of
    containers that went away and of tracers already closed.

    A gone container's series leave with the first scrape that serves them `grace` seconds
    or more after it went: so never unserved, and never before every scraper polling at
    least that often has seen them.  At most `limit` gone containers are kept (the oldest
    go first; a restarted container's earlier counters among them, which Prometheus then
    sees as a counter reset)."""

    grace: float = GRACE
    limit: int | None = None
    clock: Callable[[], float] = time.monotonic
    retired: dict[tuple, Gone] = field(default_factory=dict)
    base: dict[str, int] = field(default_factory=lambda: {"events": 0, "lost": 0, "kernel_dropped": 0})
    # kernel-dropped samples are known exactly only when a capture is retired (a handover,
    # a stop); the exported counter moves then
    settled_kernel_dropped: int = 0

    def retire(self, series: Series) -> None:
        """`series` went away (or its index is reset): counted on, frozen, until it may go."""
        old = self.retired.pop(series.labels, None)
        # new last values: they need a scrape of their own, and the grace starts again
        self.retired[series.labels] = Gone(series if old is None else old.series.add(series), self.clock())
        if self.limit is not None:
            while len(self.retired) > self.limit:      # insertion order: the oldest first
                del self.retired[next(iter(self.retired))]

    def close_tracer(self, stats: dict) -> None:
        rings = stats["rings"]
        self.base["events"] += rings.get("events", 0)
        self.base["lost"] += rings.get("lost", 0)
        self.base["kernel_dropped"] += rings.get("kernel_dropped", 0)

    def snapshot(self, live: Iterable[Series], tracer) -> Snapshot:
        """What a scrape of /metrics serves; the gone containers it serves past their grace
        leave the next ones (one back under the same names keeps its old counters)."""
        merged: dict[tuple, Series] = {}
        for s in live:
            merged[s.labels] = s if s.labels not in merged else merged[s.labels].add(s)
        live_keys = set(merged)
        now = self.clock()
        for key, gone in list(self.retired.items()):
            merged[key] = gone.series if key not in merged else merged[key].add(gone.series)
            if key not in live_keys and now - gone.since >= self.grace:
                del self.retired[key]
        events, lost, dropped, fill = (self.base["events"], self.base["lost"],
                                       self.base["kernel_dropped"], 0.0)
        if tracer is not None:
            st = tracer.stats()
            events += st["rings"].get("events", 0)
            lost += st["rings"].get("lost", 0)
            dropped += st["rings"].get("kernel_dropped", tracer.kernel_dropped_retired)
            g = st["correlator"]
            fill = g["table_used"] / g["table_size"] if g["table_size"] else 0.0
        self.settled_kernel_dropped = max(self.settled_kernel_dropped, dropped)
        return Snapshot(list(merged.values()), events, lost, self.settled_kernel_dropped,
                        len(live_keys), fill)


class Collector:
    """A prometheus_client collector over `snapshot()` (which runs in the engine thread)."""

    def __init__(self, snapshot: Callable[[], Snapshot | None], hops: bool, end_at_queue: bool,
                 segment: str = "device"):
        self.snapshot = snapshot
        self.hops = hops
        self.segment = segment
        steps = hop_steps(end_at_queue, segment)
        # per direction: (row, hop label) of each interval a report can have
        self.hop_rows = [[(1 + i, n.replace(" ", "_")) for i, n in enumerate(steps[d][:-1])]
                         + [(HOP_ROWS - 1, steps[d][-1].replace(" ", "_"))] for d in DIRECTIONS]

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        info = GaugeMetricFamily("mace_build_info", "mace's version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        snap = self.snapshot()
        if snap is None:
            return
        lat = HistogramMetricFamily("mace_container_latency_seconds",
                                    "Latency container isolation added to each packet, per container "
                                    "and direction (egress: host-side veth to uplink; ingress: uplink "
                                    "to the container's device)", labels=[*LABELS, "direction"])
        hop = HistogramMetricFamily("mace_hop_latency_seconds",
                                    "Time from the previous step to this hop on the path (with --hops)",
                                    labels=[*LABELS, "direction", "hop"])
        pk = CounterMetricFamily("mace_packets", "Packets that crossed a traced container's veth, "
                                 "by what became of them", labels=[*LABELS, "direction", "outcome"])
        for s in snap.series:
            for d, name in enumerate(DIRECTIONS):
                counts, sums = s.buckets[d]
                lat.add_metric([*s.labels, name], _cumulative(counts[0]), sums[0] / 1e9)
                if self.hops:
                    for row, hop_name in self.hop_rows[d]:
                        if any(counts[row]):
                            hop.add_metric([*s.labels, name, hop_name], _cumulative(counts[row]),
                                           sums[row] / 1e9)
                for outcome, n in s.outcomes[d].items():
                    pk.add_metric([*s.labels, name, outcome], n)
        yield lat
        if self.hops:
            yield hop
        yield pk
        yield CounterMetricFamily("mace_events", "Tracepoint samples mace read", value=snap.events)
        yield CounterMetricFamily("mace_ring_lost", "Samples lost because a ring was full",
                                  value=snap.ring_lost)
        yield CounterMetricFamily("mace_kernel_dropped", "Samples the kernel counted but never wrote "
                                  "(settled when a capture is retired or stopped)",
                                  value=snap.kernel_dropped)
        yield GaugeMetricFamily("mace_containers_traced", "Containers traced now", value=snap.traced)
        yield GaugeMetricFamily("mace_table_fill_ratio", "Occupied share of the correlator's table",
                                value=snap.table_fill)


def _cumulative(counts: list[int]) -> list[tuple[str, float]]:
    out, total = [], 0
    for bound, n in zip([*map(_le, BOUNDS_S), "+Inf"], counts, strict=True):
        total += n
        out.append((bound, total))
    return out


def _le(seconds: float) -> str:
    return f"{seconds:.6g}"


def make_app(registry, health: Callable[[], tuple[bool, str]]) -> Callable:
    """The WSGI app: /metrics (prometheus_client's exposition of `registry`: a snapshot) and
    /healthz (`health()`, no snapshot: for probes); any other path is 404, so that nothing
    but a scrape of /metrics can serve a gone container's last values."""
    from prometheus_client import make_wsgi_app

    metrics = make_wsgi_app(registry)

    def app(environ, start_response):
        path = environ.get("PATH_INFO") or "/"
        if path == METRICS_PATH:
            return metrics(environ, start_response)
        if environ.get("REQUEST_METHOD") != "GET":
            start_response("405 Method Not Allowed", [("Allow", "GET")])
            return [b""]
        if path == HEALTH_PATH:
            ok, text = health()
            body = (text + "\n").encode()
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
            return [body]
        body = f"not found: mace serves {METRICS_PATH} and {HEALTH_PATH}\n".encode()
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8"),
                                         ("Content-Length", str(len(body)))])
        return [body]

    return app


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True           # a stuck scraper never holds the service's exit


class _Quiet(WSGIRequestHandler):
    def log_message(self, format, *args):      # noqa: A002 - the base class's signature
        pass                        # a request per scrape and probe: not for the service's log


class Endpoint:
    """The HTTP server: bound at once (so a port in use fails the start), serving in a
    daemon thread until closed."""

    def __init__(self, addr: str, port: int, collector: Collector,
                 health: Callable[[], tuple[bool, str]] = lambda: (True, "ok")):
        from prometheus_client import CollectorRegistry, ProcessCollector

        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        ProcessCollector(registry=self.registry)
        server = type("Server", (_Server,), {"address_family": socket.AF_INET6 if ":" in addr else socket.AF_INET})
        try:
            self.httpd = make_server(addr, port, make_app(self.registry, health), server, handler_class=_Quiet)
        except OSError as e:
            raise ResourceError(f"--metrics: cannot listen on {_show(addr, port)}: {e.strerror or e}",
                                hint="choose another port, or stop what listens there") from None
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="mace-metrics", daemon=True)
        self.thread.start()
        self.addr, self.port = addr, self.httpd.server_port

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    @property
    def url(self) -> str:
        return f"http://{_show(self.addr, self.port)}{METRICS_PATH}"


def _show(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"

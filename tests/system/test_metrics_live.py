"""`mace serve --metrics` scraped by a real Prometheus server (Debian's `prometheus`),
started by the test in the testbed's host namespace and stopped by its PID: what
Prometheus stored is checked against what mace itself reported, per container and
direction; a container removed mid-run leaves the scrapes; bad input fails at start."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse

import pytest
from helpers import WAIT, finish, inode_of, one_line_error, ping, wait_for
from pyroute2 import netns
from test_service_live import NOPRIV, SETTLE, Service, mace_client, make_bed, ok, serve_argv

from mace.service.metrics import BOUNDS_NS

IN_CI = os.environ.get("CI", "").lower() == "true"
METRICS = "127.0.0.1:9464"          # inside the testbed's own host namespace: always free
PROMETHEUS = "127.0.0.1:9490"
N = 10


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        if IN_CI:
            pytest.fail("prometheus not found: .ci/run installs the Debian package prometheus")
        pytest.skip("prometheus not installed (Debian package prometheus)")
    return path


class Prometheus:
    """A Prometheus server scraping mace every 0.5 s, its data in the test's directory."""

    def __init__(self, tb, tmp_path):
        self.tb = tb
        cfg = tmp_path / "prometheus.yml"
        cfg.write_text("global:\n  scrape_interval: 500ms\n  scrape_timeout: 400ms\n"
                       "scrape_configs:\n  - job_name: mace\n    static_configs:\n"
                       f"      - targets: ['{METRICS}']\n")
        self.log = open(tmp_path / "prometheus.log", "w")
        self.proc = tb.popen(tb.host_ns, [prometheus_binary(), f"--config.file={cfg}",
                                          f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                          f"--web.listen-address={PROMETHEUS}"],
                             stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        self.logpath = tmp_path / "prometheus.log"
        wait_for(lambda: self.get("/-/ready", check=False) is not None, timeout=60,
                 what=lambda: f"prometheus ready:\n{self.logpath.read_text()[-2000:]}")

    def get(self, path: str, check: bool = True) -> str | None:
        # the server listens in the testbed's namespace: ask from there
        code = ("import sys, urllib.request\n"
                "try:\n"
                f"    print(urllib.request.urlopen('http://{PROMETHEUS}' + sys.argv[1], timeout=5).read().decode())\n"
                "except Exception as e:\n"
                "    print(repr(e), file=sys.stderr); sys.exit(1)\n")
        r = self.tb.run(self.tb.host_ns, [sys.executable, "-c", code, path], timeout=30)
        if r.returncode != 0:
            assert not check, r.stderr
            return None
        return r.stdout

    def query(self, expr: str) -> list[dict]:
        body = json.loads(self.get("/api/v1/query?" + urllib.parse.urlencode({"query": expr})))
        assert body["status"] == "success", body
        return body["data"]["result"]

    def value(self, expr: str) -> dict[tuple, float]:
        """By (container, direction[, outcome or hop]) the instant value of expr."""
        out = {}
        for r in self.query(expr):
            m = r["metric"]
            key = tuple(m[k] for k in ("container", "direction", "outcome", "hop") if k in m)
            out[key] = float(r["value"][1])
        return out

    def scrapes(self) -> float:
        got = self.query('prometheus_target_sync_length_seconds_count{scrape_job="mace"}') or \
            self.query('up{job="mace"}')
        return float(got[0]["value"][1]) if got else 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            finish(self.proc, 30, lambda: "prometheus did not stop")
        self.log.close()


@pytest.fixture
def prom_bed(testbed_factory, tmp_path):
    tb, sock = make_bed(testbed_factory, tmp_path, n=3)
    svc = Service(tb, sock, "--metrics", METRICS, "--hops")
    prom = None
    try:
        svc.ready()
        svc.wait_log(rf"^mace: metrics on http://{METRICS}/metrics$")
        prom = Prometheus(tb, tmp_path)
        yield tb, sock, svc, prom
    finally:
        if prom is not None:
            prom.stop()
        if svc.proc.poll() is None:
            svc.stop()


def bucket_index(seconds: float) -> int:
    return next((i for i, b in enumerate(BOUNDS_NS) if seconds * 1e9 <= b), len(BOUNDS_NS))


def read_reports(tb, c, sock) -> list[dict]:
    r = ok(mace_client(tb, c, sock, "read", "--format", "jsonl"))
    return [json.loads(line) for line in r.stdout.splitlines()]


def test_prometheus_stores_what_mace_reported_per_container_and_direction(prom_bed):
    tb, sock, svc, prom = prom_bed
    a, b, gone = tb.containers
    names = {c.ns: f"netns:{inode_of(tb, c)}" for c in tb.containers}
    for c in tb.containers:
        ok(mace_client(tb, c, sock, "on"))
    for c in tb.containers:
        ping(tb, c, N, interval="0.05")
    time.sleep(SETTLE)
    # scraped while all three are there, then the third one goes
    wait_for(lambda: len(prom.value("mace_container_latency_seconds_count")) == 6, timeout=WAIT,
             what="six latency series in prometheus")
    status = {c.ns: json.loads(ok(mace_client(tb, c, sock, "status", "--json")).stdout)
              for c in (a, b)}
    reports = {c.ns: read_reports(tb, c, sock) for c in (a, b)}
    netns.remove(gone.ns)
    tb._made.remove(gone.ns)
    svc.wait_log(rf"^mace: netns {inode_of_name(names[gone.ns])} disabled: namespace gone", timeout=5)
    # the next scrapes no longer have it: wait for a few
    before = time.monotonic()
    wait_for(lambda: names[gone.ns] not in {k[0] for k in prom.value("mace_packets_total")},
             timeout=WAIT, what="the removed container's series to leave")
    assert time.monotonic() - before < 10

    count = prom.value("mace_container_latency_seconds_count")
    seen = prom.value(f'max_over_time(mace_container_latency_seconds_count{{container="{names[gone.ns]}"}}[5m])')
    assert seen == {(names[gone.ns], d): N for d in ("egress", "ingress")}, seen
    for c in (a, b):
        label = names[c.ns]
        st = status[c.ns]
        for d in ("egress", "ingress"):
            mine = [r["latency_ns"] for r in reports[c.ns] if r["dir"] == d]
            assert len(mine) == N == st[d]["reports"]
            assert count[(label, d)] == N, count
            # histogram_quantile interpolates inside the bucket that holds the median
            q = prom.value(f'histogram_quantile(0.5, mace_container_latency_seconds_bucket'
                           f'{{container="{label}",direction="{d}"}})')
            median = sorted(mine)[(N - 1) // 2]
            assert abs(bucket_index(q[(label, d)]) - bucket_index(median / 1e9)) <= 1, (q, median)
            total = prom.value(f'mace_container_latency_seconds_sum{{container="{label}",direction="{d}"}}')
            assert total[(label, d)] == pytest.approx(sum(mine) / 1e9, rel=1e-9)
            outcomes = {k[2]: v for k, v in prom.value("mace_packets_total").items() if k[:2] == (label, d)}
            assert outcomes["reported"] == st[d]["reports"]
            assert {o: outcomes[o[:-1] if o == "orphans" else o] for o in st[d]["missed"]} == st[d]["missed"]
            # with --hops: every report ends its last hop interval
            hops = {k[2]: v for k, v in prom.value("mace_hop_latency_seconds_count").items()
                    if k[:2] == (label, d)}
            last = "uplink_queue" if d == "egress" else "container_receive"
            assert hops[last] == N, hops
    assert prom.value("mace_containers_traced") == {(): 2}
    assert list(prom.value("mace_events_total").values())[0] > 0
    assert prom.value("mace_ring_lost_total") == {(): 0}
    assert list(prom.value("process_cpu_seconds_total").values())[0] > 0


def inode_of_name(label: str) -> str:
    return label.removeprefix("netns:")


def test_metrics_bad_input_fails_at_start_with_one_line(testbed_factory, tmp_path):
    tb, sock = make_bed(testbed_factory, tmp_path, n=1)
    svc = Service(tb, sock, "--metrics", METRICS)
    try:
        svc.ready()
        svc.wait_log(r"^mace: metrics on ")
        other = str(tmp_path / "other" / "mace.sock")
        os.makedirs(os.path.dirname(other), mode=0o755)
        r = tb.run(tb.host_ns, serve_argv(other, "--metrics", METRICS), timeout=30)
        one_line_error(r, 9, r"--metrics: cannot listen on 127\.0\.0\.1:9464: .*in use")
        assert not os.path.lexists(other)       # nothing left behind
    finally:
        svc.stop()
    r = tb.run(tb.host_ns, serve_argv(sock, "--metrics", "localhost:9464"), timeout=30)
    one_line_error(r, 2, r"'localhost' is not an IP address")
    r = tb.run(tb.host_ns, serve_argv(sock, "--metrics", "0.0.0.0:99999"), timeout=30)
    one_line_error(r, 2, r"'99999' is not a port number")
    r = tb.run(tb.host_ns, [*NOPRIV, *serve_argv(sock, "--metrics", METRICS)], timeout=30)
    one_line_error(r, 3, r"needs to enter network namespaces")

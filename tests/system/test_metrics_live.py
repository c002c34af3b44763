"""`mace serve --metrics` scraped by a real Prometheus server (Debian's `prometheus`),
started by the test in the testbed's host namespace and stopped by its PID: what
Prometheus stored is checked against what mace itself reported (its reports, and its
status: p50 and every outcome counter), per container and direction; a container removed
mid-run stays its grace period (shortened here), then leaves the scrapes; probes have
/healthz; bad input fails at start."""

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

from mace.service.metrics import BOUNDS_NS, GRACE_ENV, OUTCOMES

IN_CI = os.environ.get("CI", "").lower() == "true"
METRICS = "127.0.0.1:9464"          # inside the testbed's own host namespace: always free
PROMETHEUS = "127.0.0.1:9490"
N = 10
GRACE = 3.0                         # s a gone container's series stay (120 by default)
LOCAL = 4                           # pings to the host itself: counted local, both ways
DROPPED = 5                         # datagrams the host's firewall drops: counted dropped
DISCARD = 9                         # their UDP port (discard)


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


def http_get(tb, url: str) -> tuple[int, str]:
    """(status, body) of a GET from inside the testbed's host namespace."""
    code = ("import sys, urllib.request, urllib.error\n"
            "try:\n"
            "    r = urllib.request.urlopen(sys.argv[1], timeout=5)\n"
            "except urllib.error.HTTPError as e:\n"
            "    r = e\n"
            "print(r.status); print(r.read().decode(), end='')\n")
    r = tb.run(tb.host_ns, [sys.executable, "-c", code, url], timeout=30)
    assert r.returncode == 0, r.stderr
    status, _, body = r.stdout.partition("\n")
    return int(status), body


def drop_udp(tb, port: int) -> None:
    """The testbed host's firewall drops forwarded UDP to `port` (its own table, in its own
    namespace: gone with it)."""
    tb.nft(tb.host_ns, "table ip mace_test_drop {\n"
                       "  chain mace_fwd { type filter hook forward priority filter; policy accept;\n"
                       f"    udp dport {port} drop\n"
                       "  }\n}\n")


def send_udp(tb, c, n: int, port: int) -> None:
    code = ("import socket, sys, time\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "for _ in range(int(sys.argv[2])):\n"
            "    s.sendto(b'mace', (sys.argv[1], int(sys.argv[3]))); time.sleep(0.02)\n")
    r = tb.run(c.ns, [sys.executable, "-c", code, tb.peer_ip, str(n), str(port)], timeout=30)
    assert r.returncode == 0, r.stderr


@pytest.fixture
def prom_bed(testbed_factory, tmp_path, monkeypatch):
    tb, sock = make_bed(testbed_factory, tmp_path, n=3)
    monkeypatch.setenv(GRACE_ENV, str(GRACE))         # the service inherits it
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
    # outcomes besides reported: a's pings to the host itself stay on the host (local, both
    # ways), b's datagrams are dropped by the host's firewall on their way out (dropped)
    r = tb.run(a.ns, ["ping", "-n", "-q", "-c", str(LOCAL), "-i", "0.05", tb.gateway], timeout=30)
    assert r.returncode == 0 and f" {LOCAL} received" in r.stdout, r.stdout + r.stderr
    drop_udp(tb, DISCARD)
    send_udp(tb, b, DROPPED, DISCARD)
    time.sleep(SETTLE)
    # scraped while all three are there, then the third one goes
    wait_for(lambda: len(prom.value("mace_container_latency_seconds_count")) == 6, timeout=WAIT,
             what="six latency series in prometheus")
    status = {c.ns: json.loads(ok(mace_client(tb, c, sock, "status", "--json")).stdout)
              for c in (a, b)}
    reports = {c.ns: read_reports(tb, c, sock) for c in (a, b)}
    # probes ask /healthz: it answers without a snapshot; /metrics alone serves the series
    assert http_get(tb, f"http://{METRICS}/healthz") == (200, "ok\n")
    assert http_get(tb, f"http://{METRICS}/")[0] == 404
    netns.remove(gone.ns)
    tb._made.remove(gone.ns)
    svc.wait_log(rf"^mace: netns {inode_of_name(names[gone.ns])} disabled: namespace gone", timeout=5)
    went = time.monotonic()

    def gone_series() -> set[str]:
        return {k[0] for k in prom.value("mace_packets_total")} & {names[gone.ns]}

    # its frozen series stay their grace (probes asking meanwhile), scraped every 0.5 s...
    while time.monotonic() < went + GRACE - 1:
        assert http_get(tb, f"http://{METRICS}/healthz")[0] == 200
        assert gone_series(), f"{names[gone.ns]} left within {time.monotonic() - went:.1f} s"
        time.sleep(0.2)
    # ... then leave: the next scrapes no longer have it
    wait_for(lambda: not gone_series(), timeout=WAIT, what="the removed container's series to leave")
    assert time.monotonic() - went < GRACE + 10

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
            # histogram_quantile interpolates inside the bucket that holds the median: within
            # one bucket of the p50 mace itself gives (status, from its own histogram)
            q = prom.value(f'histogram_quantile(0.5, mace_container_latency_seconds_bucket'
                           f'{{container="{label}",direction="{d}"}})')
            p50 = st[d]["p50_ns"]
            assert abs(bucket_index(q[(label, d)]) - bucket_index(p50 / 1e9)) <= 1, (q, p50)
            total = prom.value(f'mace_container_latency_seconds_sum{{container="{label}",direction="{d}"}}')
            assert total[(label, d)] == pytest.approx(sum(mine) / 1e9, rel=1e-9)
            # every outcome, as mace's status counts it
            outcomes = {k[2]: v for k, v in prom.value("mace_packets_total").items() if k[:2] == (label, d)}
            mace_says = {"reported": st[d]["reports"], "local": st[d]["local"], "dropped": st[d]["dropped"],
                         **{o: st[d]["missed"][c] for o, c in OUTCOMES.items() if c in st[d]["missed"]}}
            assert set(mace_says) == set(OUTCOMES) == set(outcomes), (mace_says, outcomes)
            assert outcomes == mace_says, (label, d)
            # with --hops: every report ends its last hop interval
            hops = {k[2]: v for k, v in prom.value("mace_hop_latency_seconds_count").items()
                    if k[:2] == (label, d)}
            last = "uplink_queue" if d == "egress" else "container_receive"
            assert hops[last] == N, hops
    # the traffic meant to move local and dropped did
    assert status[a.ns]["egress"]["local"] >= LOCAL and status[a.ns]["ingress"]["local"] >= LOCAL, status[a.ns]
    assert status[b.ns]["egress"]["dropped"] == DROPPED, status[b.ns]
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

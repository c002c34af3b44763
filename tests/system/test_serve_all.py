"""`mace serve --all` and `--netns`: containers traced without a client, followed as they
come and go (netlink link events), their series in /metrics; real pings in a testbed."""

from __future__ import annotations

import re
import sys
import time

from helpers import WAIT, inode_of, one_line_error, ping, wait_for
from prometheus_client.parser import text_string_to_metric_families
from test_service_live import SETTLE, Service, mace_client, make_bed, ok, serve_argv

from mace.service.metrics import GRACE_ENV

METRICS = "127.0.0.1:9464"


def scrape(tb) -> dict[tuple, float]:
    """/metrics from inside the testbed's host namespace: {(name, labels...): value}."""
    code = ("import urllib.request\n"
            f"print(urllib.request.urlopen('http://{METRICS}/metrics', timeout=5).read().decode())")
    r = tb.run(tb.host_ns, [sys.executable, "-c", code], timeout=30)
    assert r.returncode == 0, r.stderr
    out = {}
    for fam in text_string_to_metric_families(r.stdout):
        for s in fam.samples:
            out[(s.name, *sorted(s.labels.items()))] = s.value
    return out


def counts(m: dict) -> dict[tuple[str, str], float]:
    """(container, direction) -> reports, from the latency histograms' _count."""
    return {(dict(k[1:])["container"], dict(k[1:])["direction"]): v for k, v in m.items()
            if k[0] == "mace_container_latency_seconds_count"}


def traced(m: dict) -> float:
    return m[("mace_containers_traced",)]


def test_all_traces_every_container_follows_new_and_gone_ones_and_respects_off(testbed_factory, tmp_path,
                                                                             monkeypatch):
    tb, sock = make_bed(testbed_factory, tmp_path, n=2)
    a, b = tb.containers
    # no grace: a gone container's series are served by one scrape (test_metrics_live and
    # the unit tests take the grace period)
    monkeypatch.setenv(GRACE_ENV, "0")
    svc = Service(tb, sock, "--all", "--metrics", METRICS)
    try:
        svc.ready()
        for c in (a, b):
            svc.wait_log(rf"^mace: netns {inode_of(tb, c)} traced \(no runtime names it\): eth0 ⇄ {c.veth} ")
        # a container started while the service runs is traced within a moment
        t0, seen = time.monotonic(), len(svc.log)
        new = tb.add_container()
        wait_for(lambda: any(f"netns {inode_of(tb, new)} traced " in line for line in svc.log[seen:]),
                 timeout=WAIT, what="the new container traced")
        followed = time.monotonic() - t0
        assert followed < 3, followed
        for c in (a, b, new):
            ping(tb, c, 5, interval="0.05")
        time.sleep(SETTLE)
        m = scrape(tb)
        labels = {c.ns: f"netns:{inode_of(tb, c)}" for c in (a, b, new)}
        assert counts(m) == {(labels[c.ns], d): 5 for c in (a, b, new) for d in ("egress", "ingress")}
        assert traced(m) == 3
        # no client asked: nothing is queued for them
        r = mace_client(tb, a, sock, "read")
        assert r.returncode == 6 and "not enabled" in r.stderr, r.stderr
        # a container that goes: its last values are scraped once (no grace), then its series leave
        tb.remove_container(new)
        svc.wait_log(rf"^mace: netns {labels[new.ns][6:]} disabled: namespace gone$", timeout=5)
        m = scrape(tb)
        assert counts(m)[(labels[new.ns], "egress")] == 5 and traced(m) == 2
        assert (labels[new.ns], "egress") not in counts(scrape(tb))
        # a container's own `mace on` makes it a client; its `off` opts it out for good
        ok(mace_client(tb, a, sock, "on"))
        ping(tb, a, 2, interval="0.05")
        time.sleep(SETTLE)
        assert len(ok(mace_client(tb, a, sock, "read")).stdout.splitlines()) == 4
        ok(mace_client(tb, a, sock, "off"))
        svc.wait_log(rf"^mace: netns {labels[a.ns][6:]} disabled: mace off$", timeout=5)
        seen = len(svc.log)
        extra = tb.add_container()                   # a link event: --all looks again
        # (its namespace may get the gone one's inode: look at new lines only)
        wait_for(lambda: any(f"netns {inode_of(tb, extra)} traced " in line for line in svc.log[seen:]),
                 timeout=WAIT, what="the extra container traced")
        m = scrape(tb)
        assert traced(m) == 2, svc.text()           # b and the extra one, not a
        assert not re.search(rf"netns {labels[a.ns][6:]} traced", "\n".join(svc.log[-5:]))
    finally:
        assert svc.stop() == 0, svc.text()


def test_netns_targets_are_traced_from_the_start_and_bad_ones_fail_with_one_line(testbed_factory, tmp_path):
    tb, sock = make_bed(testbed_factory, tmp_path, n=2)
    a, b = tb.containers
    svc = Service(tb, sock, "--netns", tb.ns_path(a.ns), "--metrics", METRICS)
    try:
        svc.ready()
        svc.wait_log(rf"^mace: {re.escape(tb.ns_path(a.ns))} traced: eth0 ⇄ {a.veth} ")
        ping(tb, a, 3, interval="0.05")
        ping(tb, b, 3, interval="0.05")
        time.sleep(SETTLE)
        m = scrape(tb)
        assert counts(m) == {(f"netns:{inode_of(tb, a)}", d): 3 for d in ("egress", "ingress")}
    finally:
        assert svc.stop() == 0, svc.text()
    r = tb.run(tb.host_ns, serve_argv(sock, "--netns", "no-such-namespace-here"), timeout=30)
    one_line_error(r, 6, r"no network namespace named 'no-such-namespace-here'")
    r = tb.run(tb.host_ns, serve_argv(sock, "--netns", tb.ns_path(tb.host_ns)), timeout=30)
    one_line_error(r, 7, r"mace's own network namespace")

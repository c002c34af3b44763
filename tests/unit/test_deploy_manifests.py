"""deploy/: the Kubernetes manifests against the API's schemas (kubernetes-validate bundles
them, offline), the ServiceMonitor against the fields of the operator's CRD it uses, the
manifests against each other (selectors, ports, probes, volumes) and against mace's own
parser, and the Grafana dashboard: its variables, and every PromQL expression naming only
metrics that `mace serve --metrics` exports, and parsing (promtool, where installed)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mace.cli import build_parser
from mace.targets.runtimes import DEFAULT_SOCKETS

IN_CI = os.environ.get("CI", "").lower() == "true"
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
DASHBOARD = DEPLOY / "grafana" / "mace-dashboard.json"
# the oldest Kubernetes the schemas bundle, and the newest
KUBERNETES = ("1.25.0", "latest")

# what `mace serve --metrics` exports (mace.service.metrics), and prometheus_client's process_*
HISTOGRAMS = ("mace_container_latency_seconds", "mace_hop_latency_seconds")
METRICS = {
    *(h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")),
    "mace_packets_total", "mace_ring_lost_total", "mace_kernel_dropped_total", "mace_events_total",
    "mace_containers_traced", "mace_table_fill_ratio", "mace_build_info",
    "process_cpu_seconds_total", "process_resident_memory_bytes", "process_virtual_memory_bytes",
    "process_start_time_seconds", "process_open_fds", "process_max_fds",
}
FUNCTIONS = {"sum", "min", "max", "avg", "count", "rate", "irate", "increase", "delta", "topk",
             "bottomk", "histogram_quantile", "clamp_min", "clamp_max", "abs"}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
            "group_left", "group_right"}
COVERAGE_OUTCOMES = "reported|orphan|expired|evicted|rejected"

# the part of the Prometheus operator's ServiceMonitor CRD (monitoring.coreos.com/v1) the
# manifest uses, closed: a misspelt field fails here as the API server would refuse it
SERVICE_MONITOR = {
    "type": "object", "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {
            "type": "object", "additionalProperties": False, "required": ["selector", "endpoints"],
            "properties": {
                "selector": {"type": "object", "additionalProperties": False,
                             "properties": {"matchLabels": {"type": "object",
                                                            "additionalProperties": {"type": "string"}}}},
                "namespaceSelector": {"type": "object", "additionalProperties": False,
                                      "properties": {"matchNames": {"type": "array", "items": {"type": "string"}},
                                                     "any": {"type": "boolean"}}},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "required": ["port"],
                    "properties": {
                        "port": {"type": "string"}, "path": {"type": "string"},
                        "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                        "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                        "honorLabels": {"type": "boolean"},
                        "relabelings": {"type": "array", "items": {
                            "type": "object", "additionalProperties": False,
                            "properties": {
                                "sourceLabels": {"type": "array", "items": {"type": "string"}},
                                "targetLabel": {"type": "string"}, "regex": {"type": "string"},
                                "replacement": {"type": "string"}, "separator": {"type": "string"},
                                "action": {"enum": ["replace", "keep", "drop", "labelmap", "labeldrop",
                                                    "labelkeep", "hashmod", "lowercase", "uppercase"]}}}},
                    }}},
            }},
    },
}


def _need(module: str):
    try:
        return __import__(module)
    except ImportError:
        if IN_CI:
            pytest.fail(f"{module} is not installed (the `test` extra installs it)", pytrace=False)
        pytest.skip(f"needs {module} (pip install '.[test]')")


def _docs() -> list[tuple[Path, dict]]:
    yaml = _need("yaml")
    return [(p, d) for p in MANIFESTS for d in yaml.safe_load_all(p.read_text()) if d]


def _one(kind: str) -> dict:
    found = [d for _, d in _docs() if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} in deploy/kubernetes"
    return found[0]


def _agent() -> dict:
    return _one("DaemonSet")["spec"]["template"]["spec"]["containers"][0]


def test_there_are_manifests():
    assert {p.name for p in MANIFESTS} == {"daemonset.yaml", "servicemonitor.yaml"}


@pytest.mark.parametrize("version", KUBERNETES)
def test_builtin_kinds_validate(version):
    kv = _need("kubernetes_validate")
    version = kv.latest_version() if version == "latest" else version
    kinds = []
    for _path, doc in _docs():
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue
        kv.validate(doc, version, strict=True)      # raises, naming the field
        kinds.append(doc["kind"])
    assert sorted(kinds) == ["DaemonSet", "Namespace", "Service", "ServiceAccount"]


def test_service_monitor_fields():
    jsonschema = _need("jsonschema")
    jsonschema.validate(_one("ServiceMonitor"), SERVICE_MONITOR)


def _selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_everything_in_the_namespace_it_makes():
    ns = _one("Namespace")["metadata"]["name"]
    for path, doc in _docs():
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == ns, (path.name, doc["kind"])
    pod = _one("DaemonSet")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == _one("ServiceAccount")["metadata"]["name"]


def test_selectors_and_ports_agree():
    ds, svc, sm = _one("DaemonSet"), _one("Service"), _one("ServiceMonitor")
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    assert _selects(ds["spec"]["selector"]["matchLabels"], pod_labels)
    assert _selects(svc["spec"]["selector"], pod_labels)
    assert svc["spec"].get("clusterIP") == "None", "the Service is headless: one endpoint per node"
    assert _selects(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    assert svc["metadata"]["namespace"] in sm["spec"]["namespaceSelector"]["matchNames"]

    agent = _agent()
    args = agent["args"]
    port = int(args[args.index("--metrics") + 1].rpartition(":")[2])
    (metrics,) = [p for p in agent["ports"] if p["name"] == "metrics"]
    assert metrics["containerPort"] == port
    assert ds["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    (svc_port,) = svc["spec"]["ports"]
    assert svc_port["targetPort"] in ("metrics", port) and svc_port["port"] == port
    assert [e["port"] for e in sm["spec"]["endpoints"]] == [svc_port["name"]]
    # probes ask /healthz: a GET of /metrics would serve (and so end) a gone container's
    # last series before Prometheus scrapes them
    for probe in ("readinessProbe", "livenessProbe"):
        assert agent[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}, probe
        assert agent[probe]["timeoutSeconds"] > 3, "/healthz waits up to 3 s for the engine"
    assert ds["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    assert [e.get("path", "/metrics") for e in sm["spec"]["endpoints"]] == ["/metrics"]
    assert args[args.index("--metrics") + 1].startswith("0.0.0.0:"), "probes and scrapers come from outside"


def test_host_namespaces_and_capabilities():
    pod = _one("DaemonSet")["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["hostPID"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    sc = _agent()["securityContext"]
    assert sc["capabilities"]["drop"] == ["ALL"] and not sc.get("privileged")
    added = sc["capabilities"]["add"]
    assert added and len(set(added)) == len(added)
    # each added capability says why, in a comment right above it
    lines = (DEPLOY / "kubernetes" / "daemonset.yaml").read_text().splitlines()
    for cap in added:
        (i,) = [n for n, line in enumerate(lines) if line.strip() == f"- {cap}"]
        assert lines[i - 1].strip().startswith("#"), f"{cap} has no comment giving the reason"


def test_volumes_serve_the_arguments():
    pod = _one("DaemonSet")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in _agent()["volumeMounts"]}
    assert set(volumes) == {m["name"] for m in mounts.values()}
    socket = mounts["/run/mace"]
    assert volumes[socket["name"]]["hostPath"]["path"] == "/run/mace" and not socket.get("readOnly")
    args = _agent()["args"]
    state = args[args.index("--state-dir") + 1]
    holder = [p for p in mounts if state.startswith(p.rstrip("/") + "/")]
    assert holder and not mounts[holder[0]].get("readOnly"), f"--state-dir {state} is on no writable volume"
    assert _agent()["securityContext"]["readOnlyRootFilesystem"] is True


def test_the_runtimes_sockets_are_where_mace_looks_read_only():
    """Every socket mace asks a runtime on by default (Docker, Podman, containerd, the CRI)
    is at the same path in the container as on the node, under a read-only mount of a
    directory every node has (a hostPath of a socket stops the pod where it is missing),
    following the node's unmounts; the socket's directory stays writable within it."""
    pod = _one("DaemonSet")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = _agent()["volumeMounts"]

    def holder(path: str) -> dict:
        path = re.sub(r"^/var/run/", "/run/", path)      # a symlink to /run in Debian
        inside = [m for m in mounts if path.startswith(m["mountPath"].rstrip("/") + "/")]
        assert inside, f"{path}: on no volume"
        return max(inside, key=lambda m: len(m["mountPath"]))

    for runtime, paths in DEFAULT_SOCKETS.items():
        for path in paths:
            m = holder(path)
            host = volumes[m["name"]]["hostPath"]
            assert host["path"] == m["mountPath"] and host["type"] == "Directory", (runtime, path)
            assert m.get("readOnly") is True and m.get("mountPropagation") == "HostToContainer", m
    for v in volumes.values():
        assert v["hostPath"].get("type") != "Socket", v
    sock = holder("/run/mace/mace.sock")
    assert sock["mountPath"] == "/run/mace" and not sock.get("readOnly")


def test_arguments_parse(capsys):
    args = _agent()["args"]
    try:
        build_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"mace rejects the DaemonSet's args {args}: {capsys.readouterr().err}")


# -- the dashboard ------------------------------------------------------------------------------

def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(d: dict):
    for p in d["panels"]:
        yield p
        yield from p.get("panels", [])


def _exprs(d: dict) -> list[str]:
    exprs = [t["expr"] for p in _panels(d) for t in p.get("targets", [])]
    for v in d["templating"]["list"]:
        if v["type"] == "query":        # label_values(SERIES, LABEL): SERIES is PromQL
            m = re.fullmatch(r"label_values\((.+),\s*\w+\)", v["query"])
            assert m, f"variable {v['name']}: {v['query']!r} names no series"
            exprs.append(m.group(1))
    return exprs


def metric_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, function names) of a PromQL expression: strings, label matchers,
    ranges and grouping lists removed, what is called is a function, what is left a metric."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\$\{?\w+\}?", " ", e)
    e = re.sub(r"(?<![\w.])\d+(\.\d+)?(e[+-]?\d+)?\b", " ", e)
    called = set(re.findall(r"\b([a-zA-Z_][\w:]*)\s*\(", e))
    names = set(re.findall(r"\b([a-zA-Z_][\w:]*)\b", e)) - called - KEYWORDS
    return names, called


def test_metric_name_extraction():
    assert metric_names('histogram_quantile(0.99, sum by (container, le) '
                        '(rate(mace_x_bucket{container=~"$container"}[$__rate_interval])))') == \
        ({"mace_x_bucket"}, {"histogram_quantile", "sum", "rate"})


def test_dashboard_names_only_exported_metrics():
    for expr in _exprs(_dashboard()):
        names, called = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= METRICS, f"{sorted(names - METRICS)} in {expr!r} are not exported"
        assert called <= FUNCTIONS, f"{sorted(called - FUNCTIONS)} in {expr!r}"


def test_dashboard_variables_and_data_source():
    d = _dashboard()
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {"container", "direction"} <= set(variables)
    assert variables["direction"]["query"] == "egress,ingress"
    ids = [p["id"] for p in _panels(d)]
    assert len(ids) == len(set(ids))
    for p in _panels(d):
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            assert p["targets"] and all(t["datasource"] == p["datasource"] for t in p["targets"]), p["title"]


def test_dashboard_has_the_panels_asked_for():
    d = _dashboard()
    by_type: dict[str, list[str]] = {}
    for p in _panels(d):
        by_type.setdefault(p["type"], []).extend(t["expr"] for t in p.get("targets", []))
    flat = lambda e: re.sub(r"\s+", " ", e)     # noqa: E731
    (heat,) = by_type["heatmap"]
    assert "mace_container_latency_seconds_bucket" in heat and "by (le)" in heat
    heatmap = next(p for p in _panels(d) if p["type"] == "heatmap")
    assert heatmap.get("repeat") == "container", "one heatmap per container"
    series = [flat(e) for e in by_type["timeseries"]]
    for q in ("0.5", "0.99"):
        assert any(e.startswith(f"histogram_quantile({q}, sum by (container, direction, le)")
                   and "mace_container_latency_seconds_bucket" in e for e in series), q
    assert any('outcome="reported"' in e and f'outcome=~"{COVERAGE_OUTCOMES}"' in e
               and "by (container, direction)" in e for e in series), "coverage"
    for metric in ("mace_ring_lost_total", "mace_kernel_dropped_total", "mace_containers_traced"):
        assert any(metric in e for e in series), metric


def test_dashboard_promql_parses(tmp_path):
    """Every expression, its variables filled in, as promtool parses a rule."""
    promtool = shutil.which("promtool")
    if promtool is None:
        if IN_CI:
            pytest.fail("promtool is not installed (.ci/run installs prometheus)", pytrace=False)
        pytest.skip("needs promtool (Debian package prometheus)")
    exprs = _exprs(_dashboard())
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr{i}", "expr": re.sub(r"\$\{?(\w+)\}?", lambda m: "1m" if m.group(1) ==
                                                        "__rate_interval" else ".*", e)}
        for i, e in enumerate(exprs)]}]}
    path = tmp_path / "rules.json"      # JSON is YAML
    path.write_text(json.dumps(rules))
    r = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{len(exprs)} rules found" in r.stdout

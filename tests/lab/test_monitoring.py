"""The monitoring stack on the converged lab: every scrape target up, every panel query of every shipped
dashboard answering from the head's Prometheus, and an XID raised by a fake GPU reaching a webhook through
Prometheus and Alertmanager. RAYRACK_LAB names another lab (default: the molecule lab)."""

from __future__ import annotations

import http.server
import ipaddress
import json
import os
import shlex
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import jsonschema
import pytest
import required
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import lab as labtool

from monitoring.grafana import queries

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
LAB_NAME = os.environ.get("RAYRACK_LAB", "molecule")
INVENTORY = REPO / "inventories" / LAB_NAME
DASHBOARDS = REPO / "monitoring" / "grafana" / "dashboards"


def inventory_vars() -> dict:
    merged: dict = {}
    for path in sorted((INVENTORY / "group_vars" / "all").glob("*.yml")):
        merged.update(yaml.safe_load(path.read_text()) or {})
    return merged


def lab() -> labtool.Lab:
    hosts = yaml.safe_load((INVENTORY / "hosts.yml").read_text())
    workers = len(hosts["all"]["children"]["ray_workers"]["hosts"])
    subnet = ipaddress.IPv4Network(inventory_vars()["rayrack_cluster_cidr"])
    return labtool.Lab(LAB_NAME, workers, subnet, INVENTORY, 2)


@pytest.fixture(scope="module")
def the_lab() -> labtool.Lab:
    if not (INVENTORY / ".ssh" / "known_hosts").exists():
        pytest.fail(f"the {LAB_NAME} lab is not up: run `make integration` (it converges the lab, then runs these)")
    return lab()


def prometheus(the_lab: labtool.Lab, requests: list[tuple[str, dict]]) -> list[dict]:
    """The head's Prometheus, through TLS and its password (tests/lab/lab.py's client)."""
    return labtool.prometheus(the_lab, requests)


def test_every_target_is_scraped_and_up(the_lab):
    nodes = {node.name for node in the_lab.nodes}
    deadline = time.monotonic() + 90
    while True:
        (answer,) = prometheus(the_lab, [("/api/v1/targets", {"state": "active"})])
        targets = answer["data"]["activeTargets"]
        down = [(t["labels"].get("job"), t["scrapeUrl"], t["lastError"]) for t in targets if t["health"] != "up"]
        by_job: dict[str, set[str]] = {}
        for t in targets:
            by_job.setdefault(t["labels"]["job"], set()).add(t["labels"].get("node", ""))
        complete = all(by_job.get(job, set()) >= nodes for job in ("ray-agent", "node", "ray"))
        if (not down and complete) or time.monotonic() > deadline:
            break
        time.sleep(5)
    assert not down, f"targets down: {down}"
    for job in ("ray-agent", "node", "ray"):
        assert by_job.get(job, set()) >= nodes, f"job {job} scrapes {sorted(by_job.get(job, []))}, not every node"
    assert "prometheus" in by_job
    heads = [t for t in targets if t["labels"].get("ray_node_role") == "head"]
    assert heads and all(t["labels"]["node"] == the_lab.nodes[0].name for t in heads)


def test_every_gpu_is_in_exactly_one_state_with_the_guard_off(the_lab):
    """Every GPU an agent lists has one state of rayrack_gpu_state set, on nodes whose guard is off too."""
    asked = [
        ("/api/v1/query", {"query": 'count by (node, gpu) (rayrack_gpu_up{job="ray-agent"})'}),
        ("/api/v1/query", {"query": 'count by (node, gpu) (rayrack_gpu_state{job="ray-agent"} == 1)'}),
        ("/api/v1/query", {"query": 'count by (node) (rayrack_guard_dry_run{job="ray-agent"})'}),
    ]
    # An agent restarted without its guard (the idle-guard test converges it off again) keeps its last guard
    # series in Prometheus until its next scrape.
    deadline = time.monotonic() + 90
    while True:
        listed, stated, guarded = (
            {(r["metric"].get("node"), r["metric"].get("gpu")): float(r["value"][1]) for r in answer["data"]["result"]}
            for answer in prometheus(the_lab, asked)
        )
        unguarded = {node for node, _ in listed} - {node for node, _ in guarded}
        if (listed and set(stated) == set(listed) and unguarded) or time.monotonic() > deadline:
            break
        time.sleep(5)
    assert listed, "no agent lists a GPU"
    assert stated == dict.fromkeys(listed, 1.0), (listed, stated)
    assert unguarded, f"every node runs the guard ({sorted(guarded)}): nothing shows the states without it"


def ask_lab(the_lab: labtool.Lab) -> queries.Ask:
    return lambda requests: prometheus(the_lab, requests)


def answer_until_complete(check) -> tuple[list[str], int]:
    """Runs check() -> (problems, queries checked) until it finds none or two minutes have passed: recording
    rules and rates need a few evaluations after a converge."""
    deadline = time.monotonic() + 120
    while True:
        problems, count = check()
        if not problems or time.monotonic() > deadline:
            return problems, count
        time.sleep(10)


def every_panel(ask: queries.Ask, boards: list[dict]) -> tuple[list[str], int]:
    """Every panel query of the dashboards, with their variables at Grafana's defaults: what fails."""
    problems, checked = [], []
    for board in boards:
        resolved, variable_problems = queries.variables(board, ask)
        problems += variable_problems.values()
        values = queries.values_of(resolved)
        checked += [(t.where, queries.substitute(t.expr, values)) for t in queries.targets(board)]
    return problems + queries.answered(ask, checked), len(checked)


def test_every_panel_query_of_every_dashboard_returns_data(the_lab, probe):
    boards = [json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))]
    assert boards
    problems, count = answer_until_complete(lambda: every_panel(ask_lab(the_lab), boards))
    assert not problems, f"{len(problems)} of {count} panel queries failed:\n" + "\n".join(problems)


# Dashboards other projects publish for dcgm-exporter, checked against the lab's agents (ray_agent_dcgm_compat on,
# prometheus_instance_label dcgm-exporter: see tests/lab/lab.py). Read from ../shared, never copied here.
def ecosystem_board(name: str) -> dict:
    return json.loads(required.ecosystem(f"dashboards/{name}").read_text())


@pytest.mark.parametrize("name", ["dcgm-exporter-dashboard.json", "dcgm-exporter-dashboard.pr355.json"])
def test_every_panel_of_dcgm_exporters_dashboards_returns_data(the_lab, name):
    board = ecosystem_board(name)
    assert len(queries.targets(board)) >= 8
    problems, count = answer_until_complete(lambda: every_panel(ask_lab(the_lab), [board]))
    assert not problems, f"{len(problems)} of {count} panel queries failed:\n" + "\n".join(problems)


def test_every_nvidia_panel_of_canonicals_dashboard_returns_data(the_lab):
    """Canonical's GPU dashboard pairs each NVIDIA query (DCGM names) with an AMD one (node_exporter's drm and
    hwmon series), both under one `$instance` it lists from node_exporter's hwmon chips: its deployment gives a
    machine's exporters one instance, as prometheus_instance_label `node` does. Lab nodes are containers
    without hwmon chips, and run `dcgm-exporter` for DeepOps' dashboard, so `$instance` is listed from the GPU
    series here: what Grafana shows on a bare-metal node under `node`."""
    board = ecosystem_board("canonical-hardware-observer-GPU.json")
    ask = ask_lab(the_lab)
    nvidia = [t for t in queries.targets(board) if any(n.startswith("DCGM_") for n in queries.metric_names(t.expr))]
    assert len(nvidia) >= 8, [t.where for t in nvidia]

    def check() -> tuple[list[str], int]:
        resolved, problems = queries.variables(board, ask, {"instance": "label_values(DCGM_FI_DEV_GPU_TEMP, instance)"})
        values = queries.values_of(resolved)
        used = set().union(*(queries.referenced(t.expr) for t in nvidia))
        checked = [(t.where, queries.substitute(t.expr, values)) for t in nvidia]
        return [m for n, m in problems.items() if n in used] + queries.answered(ask, checked), len(checked)

    problems, count = answer_until_complete(check)
    assert not problems, f"{len(problems)} of {count} NVIDIA panel queries failed:\n" + "\n".join(problems)


# DeepOps' panels the lab cannot answer, and why: none of these is about naming or labels.
DEEPOPS_NOT_IN_LAB = {
    "NVLINK Bandwidth (A)": "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL, not among dcgm-exporter's default fields either",
    "Ethernet Throughput (A)": "lab nodes' interfaces are eth*, the panel reads en*",
    "Ethernet Throughput (B)": "lab nodes' interfaces are eth*, the panel reads en*",
    "Disk Throughput (A)": "node_disk_io_time_ms, node_exporter's name before 0.16",
    "Infiniband Throughput (A)": "no InfiniBand in the lab",
    "Infiniband Throughput (B)": "no InfiniBand in the lab",
    "System Total Power Draw (A)": "no chassis power sensor (hwmon) in containers",
    "System Power Draw (A)": "no chassis power sensor (hwmon) in containers",
}


def test_deepops_dashboard_answers_for_every_gpu_node_with_dcgm_exporter_instances(the_lab):
    """DeepOps' dashboard lists its servers from `instance=~".*:9400"` and reads node_exporter at
    `$hostname:9100`: prometheus_instance_label `dcgm-exporter` labels the series that way. The server list
    offers every GPU node (and the probe agent's, which has no node_exporter), and every other query returns
    data for each GPU node."""
    assert inventory_vars().get("prometheus_instance_label") == "dcgm-exporter"
    board = ecosystem_board("deepops-gpu-dashboard.json")
    ask = ask_lab(the_lab)
    gpu_nodes = sorted(node.name for node in the_lab.nodes[1:])
    targets = {t.where.split(" / ", 1)[1]: t for t in queries.targets(board)}
    assert set(DEEPOPS_NOT_IN_LAB) <= set(targets), sorted(set(DEEPOPS_NOT_IN_LAB) - set(targets))

    def check() -> tuple[list[str], int]:
        resolved, variable_problems = queries.variables(board, ask)
        problems = list(variable_problems.values())
        servers = set(resolved["hostname"].options)
        if not servers >= set(gpu_nodes):
            problems.append(f"DeepOps' server list {sorted(servers)} lacks GPU nodes of {gpu_nodes}")
        checked = [(f"{target.where} [{server}]",
                    queries.substitute(target.expr, queries.values_of(resolved, hostname=server)))
                   for where, target in targets.items() if where not in DEEPOPS_NOT_IN_LAB for server in gpu_nodes]
        return problems + queries.answered(ask, checked), len(checked)

    problems, count = answer_until_complete(check)
    assert count >= 20 * len(gpu_nodes)
    assert not problems, f"{len(problems)} of {count} queries failed:\n" + "\n".join(problems)


# Runs on the head as root: the provisioning files and dashboards the grafana role wrote.
PROVISIONED = r"""
import glob, json, pathlib
files = {}
for pattern in ("/etc/grafana/provisioning/*/rayrack.yml", "/var/lib/grafana/dashboards/*/*.json"):
    for path in sorted(glob.glob(pattern)):
        files[path] = pathlib.Path(path).read_text()
print(json.dumps(files))
"""


def test_grafana_provisioning_on_the_head_matches_the_schemas(the_lab):
    schemas = REPO / "monitoring" / "grafana" / "schema"
    provisioning = json.loads((schemas / "provisioning.schema.json").read_text())
    dashboard = json.loads((schemas / "dashboard.schema.json").read_text())
    result = labtool.ssh(the_lab, the_lab.nodes[0], "sudo python3 -c " + shlex.quote(PROVISIONED))
    files = json.loads(result.stdout)
    configs = {path: yaml.safe_load(text) for path, text in files.items() if path.endswith(".yml")}
    assert len(configs) == 2, sorted(files)
    for config in configs.values():
        jsonschema.validate(config, provisioning)
    shipped = {path.name: json.loads(path.read_text()) for path in DASHBOARDS.glob("*.json")}
    ours = {Path(path).name: json.loads(text) for path, text in files.items() if "/dashboards/rayrack/" in path}
    assert ours == shipped
    for board in ours.values():
        jsonschema.validate(board, dashboard)
    # Ray's own, copied from the head's session: loadable dashboards with their uids.
    ray = [json.loads(text) for path, text in files.items() if "/dashboards/ray/" in path]
    assert any(board.get("uid") == "rayDefaultDashboard" for board in ray), [b.get("uid") for b in ray]
    assert all(board.get("uid") and board.get("panels") for board in ray)


class WebhookReceiver(http.server.ThreadingHTTPServer):
    """Alertmanager's Slack-compatible webhook, on this host at the address the lab inventory gives it."""

    def __init__(self, address: tuple[str, int]):
        self.bodies: list[dict] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                receiver.bodies.append(json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0)))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        super().__init__(address, Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


# A second agent on the head (a "probe" node in Prometheus, found through its file_sd directory) with two
# fake GPUs: GPU 0 held by alice but idle, so its idle guard (dry run) bills idle GPU-seconds to her, and
# GPU 1 raising XID 79 25 s after the start. A transient unit, so that it outlives the SSH session.
PROBE_PORT = 19489
PROBE_DIR = "/run/rayrack-monitoring-probe"
PROBE_SCENARIO = {
    "driver_version": "550.54.15",
    "gpus": [
        {"model": "NVIDIA L4", "memory_total": "24GiB", "utilization": 0.0,
         "processes": [{"pid": 4242, "user": "alice", "memory": "20GiB"}]},
        {"model": "NVIDIA L4", "memory_total": "24GiB", "utilization": 0.5, "xids": [{"at": "25s", "code": 79}]},
    ],
}
PROBE_CONFIG = {
    "gpu": {"backend": "fake", "fake_scenario": f"{PROBE_DIR}/scenario.yml"},
    "attribution": {"enabled": False},
    "collection": {"interval": "1s", "call_timeout": "1s"},
    "guard": {"enabled": True, "dry_run": True, "window": "5s", "min_samples": 1, "max_gap": "5s",
              "audit_log": f"{PROBE_DIR}/audit.jsonl", "state_file": f"{PROBE_DIR}/state.json"},
    "web": {"listen_address": f"127.0.0.1:{PROBE_PORT}"},
}
PROBE_TARGET = [{"targets": [f"127.0.0.1:{PROBE_PORT}"], "labels": {"node": "monitoring-probe"}}]
PROBE_SD = "/etc/prometheus/file_sd/ray-agent/monitoring-probe.json"


@pytest.fixture(scope="module")
def probe(the_lab):
    """Starts the probe agent and, when the inventory names one, the webhook receiver Alertmanager posts to."""
    url = inventory_vars().get("alertmanager_slack_webhook_url")
    receiver = None
    if url:
        parsed = urllib.parse.urlparse(url)
        receiver = WebhookReceiver((parsed.hostname, parsed.port))
    head = the_lab.nodes[0]
    start = (
        f"set -e; sudo mkdir -p {PROBE_DIR}; "
        f"echo {shlex.quote(json.dumps(PROBE_SCENARIO))} | sudo tee {PROBE_DIR}/scenario.yml >/dev/null; "
        f"echo {shlex.quote(json.dumps(PROBE_CONFIG))} | sudo tee {PROBE_DIR}/agent.yml >/dev/null; "
        "sudo systemd-run --quiet --collect --unit rayrack-monitoring-probe "
        f"/opt/rayrack/agent/bin/ray-agent --config.file {PROBE_DIR}/agent.yml; "
        f"echo {shlex.quote(json.dumps(PROBE_TARGET))} | sudo tee {PROBE_SD} >/dev/null"
    )
    began = time.monotonic()
    try:
        started = labtool.ssh(the_lab, head, start, check=False)
        assert started.returncode == 0, started.stderr
        yield receiver, began
    finally:
        labtool.ssh(the_lab, head, f"sudo rm -f {PROBE_SD}; sudo systemctl stop rayrack-monitoring-probe; "
                                   f"sudo rm -rf {PROBE_DIR}", check=False)
        if receiver is not None:
            receiver.shutdown()
            receiver.server_close()


def test_an_xid_from_a_fake_gpu_is_delivered_to_the_webhook(probe):
    receiver, began = probe
    if receiver is None:
        pytest.fail(f"the {LAB_NAME} lab inventory must set alertmanager_slack_webhook_url to a receiver on this host "
                    "(e.g. http://<lab gateway>:19093/alertmanager) and a short alertmanager_group_wait")
    deadline = began + 150

    def xid_alerts() -> list[str]:
        bodies = [json.dumps(body) for body in receiver.bodies]
        return [b for b in bodies if "RayrackGpuXidCritical" in b and "monitoring-probe" in b]

    while not xid_alerts() and time.monotonic() < deadline:
        time.sleep(2)
    assert xid_alerts(), f"no XID alert delivered; received: {receiver.bodies}"
    text = xid_alerts()[0]
    assert "FIRING" in text and "Critical XID 79" in text, text
    print(f"XID alert delivered {time.monotonic() - began:.0f} s after the probe started (XID at 25 s)")

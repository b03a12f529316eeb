"""The monitoring stack on the converged lab: every scrape target up, every panel query of every shipped
dashboard answering from the head's Prometheus, and an XID raised by a fake GPU reaching a webhook through
Prometheus and Alertmanager. RAYRACK_LAB names another lab (default: the molecule lab)."""

from __future__ import annotations

import http.server
import ipaddress
import json
import os
import re
import shlex
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import jsonschema
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lab as labtool

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
LAB_NAME = os.environ.get("RAYRACK_LAB", "molecule")
INVENTORY = REPO / "inventories" / LAB_NAME
DASHBOARDS = REPO / "monitoring" / "grafana" / "dashboards"
# What Grafana puts in for its own variables at the dashboards' default range and a 5 s..15 s scrape interval.
GRAFANA_BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}


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


# Runs on the head: answers a list of PromQL requests (path + params) against the local Prometheus.
PROMETHEUS_CLIENT = r"""
import json, sys, urllib.parse, urllib.request
answers = []
for path, params in json.load(sys.stdin):
    url = "http://127.0.0.1:9090" + path + "?" + urllib.parse.urlencode(params, doseq=True)
    try:
        answers.append(json.load(urllib.request.urlopen(url, timeout=20)))
    except Exception as err:  # the test reports it with the query that caused it
        answers.append({"status": "error", "error": str(getattr(err, "read", lambda: b"")() or err)})
print(json.dumps(answers))
"""


def prometheus(the_lab: labtool.Lab, requests: list[tuple[str, dict]]) -> list[dict]:
    result = labtool.ssh(the_lab, the_lab.nodes[0], "python3 -c " + shlex.quote(PROMETHEUS_CLIENT),
                         input_text=json.dumps(requests), check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


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


def substitute(expr: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m[1], m[0]), expr)


def variable_values(the_lab, board: dict) -> tuple[dict[str, str], list[str]]:
    """Each query variable's values from Prometheus; panels then use Grafana's default, All (its allValue)."""
    values = dict(GRAFANA_BUILTINS)
    problems = []
    for variable in board["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["query"]["query"])
        selector, label = substitute(match[1], values), match[2]
        (answer,) = prometheus(the_lab, [(f"/api/v1/label/{label}/values", {"match[]": selector})])
        if not answer.get("data"):
            problems.append(f"{board['title']}: variable ${variable['name']} has no values ({selector}, {label})")
        values[variable["name"]] = variable.get("allValue") or "|".join(map(re.escape, answer.get("data", [])))
    return values, problems


def test_every_panel_query_of_every_dashboard_returns_data(the_lab, probe):
    boards = [json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))]
    assert boards
    deadline = time.monotonic() + 120  # recording rules and rates need a few evaluations after a converge
    while True:
        problems, queries = [], []
        for board in boards:
            values, variable_problems = variable_values(the_lab, board)
            problems += variable_problems
            for panel in board["panels"]:
                for target in panel.get("targets", []):
                    queries.append((f"{board['title']} / {panel['title']} ({target['refId']})",
                                    substitute(target["expr"], values)))
        answers = prometheus(the_lab, [("/api/v1/query", {"query": expr}) for _, expr in queries])
        for (where, expr), answer in zip(queries, answers, strict=True):
            if answer.get("status") != "success":
                problems.append(f"{where}: error {answer.get('error')}: {expr}")
            elif not answer["data"]["result"]:
                problems.append(f"{where}: no data: {expr}")
        if not problems or time.monotonic() > deadline:
            break
        time.sleep(10)
    assert not problems, f"{len(problems)} of {len(queries)} panel queries failed:\n" + "\n".join(problems)


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

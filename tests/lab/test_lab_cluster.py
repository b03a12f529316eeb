"""Checks on the converged molecule lab that need a live Ray cluster (run by `make integration`)."""

import http.server
import json
import os
import re
import secrets
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lab as labtool

from rayrack import inventory

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
# RAYRACK_LAB names another lab (default: molecule; the guard test needs two workers).
LAB_NAME = os.environ.get("RAYRACK_LAB", "molecule")
LAB = labtool.load(LAB_NAME)

# Runs on the head as the Ray user: an actor pinned to the head reports its pid, then the agent's own
# state-API client (from the agent's venv) must map that pid to the actor's job and class.
ATTRIBUTION_PROBE = r"""
import json, os, subprocess, sys
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

ray.init(address=sys.argv[1] + ":6379", logging_level="ERROR")
head = next(n for n in ray.nodes() if n["Alive"] and n["NodeManagerAddress"] == sys.argv[1])

@ray.remote(num_cpus=0)
class TrainingHolder:
    def pid(self):
        return os.getpid()

pinned = NodeAffinitySchedulingStrategy(head["NodeID"], soft=False)
holder = TrainingHolder.options(scheduling_strategy=pinned).remote()
pid = ray.get(holder.pid.remote())
agent_side = '''
import json, sys, time
from pathlib import Path
from ray_agent.attribution import RayStateClient
client = RayStateClient("http://127.0.0.1:8265", Path("/etc/rayrack/ray_token"), 5)
pid, found = int(sys.argv[2]), {}
for _ in range(60):
    found = client.identities(client.node_id(sys.argv[1]))
    if pid in found:
        break
    time.sleep(0.5)
ident = found.get(pid)
print(json.dumps(None if ident is None else {"job_id": ident.job_id, "actor": ident.actor, "task": ident.task}))
'''
out = subprocess.run(["/opt/rayrack/agent/bin/python", "-c", agent_side, sys.argv[1], str(pid)],
                     capture_output=True, text=True, timeout=60)
print("PROBE " + json.dumps({"pid": pid, "job_id": ray.get_runtime_context().get_job_id(),
                             "agent": json.loads(out.stdout) if out.stdout.strip() else out.stderr}))
"""


def on_head(script: str, *args: str) -> str:
    command = ("sudo -u ray sh -c " + shlex.quote(
        "set -a; . /etc/rayrack/ray.env; cd /var/lib/rayrack; python - " + " ".join(map(shlex.quote, args))))
    result = labtool.ssh(LAB, LAB.nodes[0], command, check=False, input_text=script)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module", autouse=True)
def converged_lab():
    if LAB is None:
        pytest.fail(f"lab {LAB_NAME!r} is not up: `make integration` converges the molecule lab, then runs these")


def test_agent_attributes_a_real_ray_actor_to_its_job_and_class():
    head_ip = LAB.nodes[0].ip
    line = next(ln for ln in on_head(ATTRIBUTION_PROBE, head_ip).splitlines() if ln.startswith("PROBE "))
    probe = json.loads(line.removeprefix("PROBE "))
    assert isinstance(probe["agent"], dict), f"the agent found no Ray identity for pid {probe['pid']}: {probe}"
    assert probe["agent"]["job_id"] == probe["job_id"], probe
    assert probe["agent"]["actor"] == "TrainingHolder", probe


# What a node's venv holds: its distributions, and whether the controller's packages would import.
VENV_PROBE = """
import importlib.metadata, importlib.util, json
print(json.dumps({"dists": sorted(d.metadata["Name"].lower() for d in importlib.metadata.distributions()),
                  "controller": [m for m in ("rayrack", "monitoring") if importlib.util.find_spec(m)]}))
"""


def venv_contents(node: labtool.Node, venv: str) -> dict:
    # -I: the venv alone, not the login's directory or environment.
    result = labtool.ssh(LAB, node, f"sudo {venv}/bin/python -I -", check=False, input_text=VENV_PROBE)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_nodes_get_only_the_agents_distribution():
    for node in LAB.nodes:
        agent = venv_contents(node, "/opt/rayrack/agent")
        assert "ray-agent" in agent["dists"], (node.name, agent)
        assert "rayrack" not in agent["dists"] and agent["controller"] == [], (node.name, agent)
        assert "aiohttp" not in agent["dists"], (node.name, agent)  # the gateway's extra is the gateway's alone
    # The head's gateway: the same wheel with its gateway extra.
    gateway = venv_contents(LAB.nodes[0], "/opt/rayrack/gateway")
    assert {"ray-agent", "aiohttp"} <= set(gateway["dists"]), gateway
    assert "rayrack" not in gateway["dists"] and gateway["controller"] == [], gateway


def test_rotating_the_cluster_token_restarts_every_node_with_it():
    """A new token on the controller reaches every node and every Ray process, and the cluster comes back."""
    token_file = LAB.inventory_dir / ".secrets" / "ray_token"
    old = token_file.read_text().strip()
    token_file.write_text(secrets.token_hex(32) + "\n")
    env = dict(os.environ, ANSIBLE_CACHE_PLUGIN_CONNECTION=str(LAB.inventory_dir / ".facts"))
    result = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(LAB.inventory_dir),
                             "playbooks/ray.yml"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:]
    # The old token no longer opens the Jobs API; the cluster_ready check inside the run used the new one.
    status = on_head(f"""
import urllib.error, urllib.request
req = urllib.request.Request("http://127.0.0.1:8265/api/jobs/", headers={{"Authorization": "Bearer {old}"}})
try:
    print(urllib.request.urlopen(req, timeout=5).status)
except urllib.error.HTTPError as err:
    print(err.code)
""")
    assert status.strip() == "403"


ALIVE_IDS = r"""
import json, urllib.request
req = urllib.request.Request("http://127.0.0.1:8265/api/v0/nodes?limit=1000&detail=false",
                             headers={"Authorization": "Bearer " + open("/etc/rayrack/ray_token").read().strip()})
rows = json.load(urllib.request.urlopen(req, timeout=10))["data"]["result"]["result"]
print(json.dumps(sorted(r["node_id"] for r in rows if r["state"] == "ALIVE")))
"""


def smoke(mode: str) -> str:
    env = dict(os.environ, ANSIBLE_CACHE_PLUGIN_CONNECTION=str(LAB.inventory_dir / ".facts"))
    result = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(LAB.inventory_dir),
                             "playbooks/smoke.yml", "-e", f"rayrack_smoke={mode}"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:]
    return result.stdout


def test_the_smoke_job_on_change_skips_a_quiet_rerun_and_runs_after_a_node_restarts():
    """rayrack_smoke on_change: the same alive nodes and the same job since the last that passed skip it (and say
    so); a restarted worker (a new Ray node ID) brings it back."""
    smoke("on_change")
    quiet = smoke("on_change")
    assert "nothing changed since the last smoke job that" in quiet and "Smoke job rayrack-smoke-" not in quiet
    worker = LAB.nodes[-1]
    before = json.loads(on_head(ALIVE_IDS))
    labtool.ssh(LAB, worker, f"sudo systemctl restart {inventory.load(LAB.inventory_dir).get(worker.name).ray_unit}")
    deadline = time.monotonic() + 120
    while True:
        alive = json.loads(on_head(ALIVE_IDS))
        if len(alive) == len(before) and alive != before:
            break
        assert time.monotonic() < deadline, f"the restarted worker did not come back: {before} -> {alive}"
        time.sleep(2)
    assert "Smoke job rayrack-smoke-" in smoke("on_change")


# Leaves the lab reconfigured for the guard (dashboard on the head's address, guard on): keep it last.
GUARD_JOB = r"""
import subprocess, sys, time
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init()
node = next(n for n in ray.nodes() if n["Alive"] and n["NodeManagerAddress"] == sys.argv[1])

@ray.remote(num_gpus=1)
def hold_gpu():
    # A child inherits CUDA_VISIBLE_DEVICES in its environment: the lab's fake GPU shows it as the holder.
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(900)"])
    time.sleep(900)

ray.get(hold_gpu.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote())
"""

JOBS_CLIENT = r"""
import json, sys, urllib.request
base, token = sys.argv[1], open("/etc/rayrack/ray_token").read().strip()
def call(method, path, body=None):
    req = urllib.request.Request(base + path, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=10))
"""


SUBMIT = r"""
import shlex
entrypoint = "python -c " + shlex.quote(sys.argv[2]) + " " + sys.argv[3]
print(call("POST", "/api/jobs/", {"entrypoint": entrypoint, "metadata": {"name": "guard-lab"}})["submission_id"])
"""
STATUS = 'print(call("GET", "/api/jobs/" + sys.argv[2])["status"])'


class WebhookReceiver(http.server.ThreadingHTTPServer):
    """Collects the guard's notifications, on the lab network's gateway (this host)."""

    def __init__(self, address: str):
        self.bodies: list[dict] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                receiver.bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        super().__init__((address, 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def jobs(base: str, script: str, *args: str) -> str:
    return on_head(JOBS_CLIENT + script, base, *args)


def converge_guard_settings() -> subprocess.CompletedProcess:
    """Apply the guard settings of the inventory: the firewall (a dashboard host off loopback opens the Jobs API
    to the cluster), Ray and the agents."""
    env = dict(os.environ, ANSIBLE_CACHE_PLUGIN_CONNECTION=str(LAB.inventory_dir / ".facts"))
    return subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(LAB.inventory_dir),
                           "playbooks/network.yml", "playbooks/ray.yml", "playbooks/ray_agent.yml"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)


def test_idle_guard_stops_the_idle_job_and_dry_run_stops_nothing():
    head, dry, live = LAB.nodes[0], LAB.nodes[1], LAB.nodes[2]
    host_vars = LAB.inventory_dir / "host_vars"
    group_vars = LAB.inventory_dir / "group_vars" / "all" / "guard.yml"
    receiver = WebhookReceiver(str(next(LAB.subnet.hosts())))
    try:
        guard = {
            "nvml_sim_scenario": "builtin:lab-2gpu-ray",
            "ray_agent_guard_enabled": True,
            "ray_agent_guard_window": "30s",
            "ray_agent_guard_notify_after": "0s",
            "ray_agent_guard_stop_after": "20s",
            "ray_agent_guard_webhook_url": f"http://{receiver.server_address[0]}:{receiver.server_address[1]}/hook",
            "ray_agent_extra_config": {"guard": {"max_gap": "30s"}},
        }
        host_vars.mkdir(exist_ok=True)
        (host_vars / f"{dry.name}.yml").write_text(json.dumps({**guard, "ray_agent_guard_dry_run": True}))
        (host_vars / f"{live.name}.yml").write_text(json.dumps({**guard, "ray_agent_guard_dry_run": False}))
        # The guard on the workers stops jobs through the head's Jobs API, plain HTTP: an admin's choice.
        group_vars.write_text(json.dumps({"rayrack_ray_dashboard_host": head.ip,
                                          "rayrack_accept_insecure": ["rayrack_ray_dashboard_host"]}))
        result = converge_guard_settings()
        assert result.returncode == 0, result.stdout[-4000:]

        base = f"http://{head.ip}:8265"
        ids = {node.name: jobs(base, SUBMIT, GUARD_JOB, node.ip).strip().splitlines()[-1] for node in (dry, live)}
        deadline = time.monotonic() + 420  # idle 1 min after the agent starts, a 30 s window, stop 20 s later
        while time.monotonic() < deadline and jobs(base, STATUS, ids[live.name]).strip() != "STOPPED":
            time.sleep(10)
        assert jobs(base, STATUS, ids[live.name]).strip() == "STOPPED"
        assert jobs(base, STATUS, ids[dry.name]).strip() == "RUNNING"

        def audit(node):
            res = labtool.podman("exec", node.container, "cat", "/var/lib/ray-agent/guard-audit.jsonl", capture=True)
            return [json.loads(line) for line in res.stdout.splitlines() if line.strip()]

        stopped = [r for r in audit(live) if r["action"] == "ray_job_stop"]
        # Submitted straight to the Jobs API, not through the gateway: its owner is unknown, its Linux user ray.
        assert any(r["outcome"] == "done" and r["submission_id"] == ids[live.name] and r["os_user"] == "ray"
                   and r["user"] == "unknown" for r in stopped), stopped
        would = [r for r in audit(dry) if r["action"] == "ray_job_stop"]
        assert would and all(r["outcome"] == "dry_run" for r in would), would
        assert any(ids[live.name] in json.dumps(body) for body in receiver.bodies), receiver.bodies
    finally:
        receiver.shutdown()
        # Leave the lab as converged for the tests after this one (an active guard would stop their jobs).
        for path in (host_vars / f"{dry.name}.yml", host_vars / f"{live.name}.yml", group_vars):
            path.unlink(missing_ok=True)
        # Drift the restoring converge must also repair: a node's firewall table removed, as `nft flush
        # ruleset` or another tool replacing the rules would.
        labtool.podman("exec", dry.container, "nft", "delete", "table", "inet", "rayrack")
        restored = converge_guard_settings()
        assert restored.returncode == 0, restored.stdout[-4000:]
        reloaded = re.search(r"TASK \[firewall : Load the table again\][^\n]*\n(.*?)\n\s*\n", restored.stdout, re.S)
        assert reloaded and f"changed: [{dry.name}]" in reloaded.group(1), restored.stdout[-6000:]
        table = labtool.podman("exec", dry.container, "nft", "list", "table", "inet", "rayrack", capture=True)
        assert "policy drop;" in table.stdout, table.stdout

"""GPU accounting on the converged molecule lab, after the gateway's tests (tests/lab/test_gateway.py).

alice submits a job through the gateway with the stock Ray CLI; it holds a fake GPU for HOLD_SECONDS. The GPU
is a probe agent's on the head (the head's Prometheus finds it through its file_sd directory): the fake
backend lists every process given the GPU in its CUDA_VISIBLE_DEVICES, and the job's entrypoint runs on the
head (it asks for no GPU), its child given GPU 0 the way Ray gives one to a num_gpus task. The probe agent
reads the job from the child's environment and its owner from the gateway, and runs the idle guard on a
short window with a webhook to this host. Then:

* Prometheus has the child's GPU memory with user="alice" (and the Linux user as os_user);
* the guard's notice reaches the webhook, naming alice with her contact from rayrack_users;
* `rayrack usage --since <just before the job> --format json` bills alice what the job measured itself
  (within 10 %) and bob 0.

RAYRACK_LAB names another lab (default: molecule).
"""

from __future__ import annotations

import http.server
import json
import re
import shlex
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lab as labtool
import test_gateway as gateway
import test_monitoring as monitoring_lab

pytestmark = pytest.mark.lab

LAB = gateway.LAB
# Long enough that one rule evaluation more or less (the lab's 5 s) stays within the 10 % asked of the bill.
HOLD_SECONDS = 100
PROBE_PORT = 19490
PROBE_NODE = "accounting-probe"
PROBE_UNIT = "rayrack-accounting-probe"
PROBE_DIR = "/run/rayrack-accounting-probe"
PROBE_SD = f"/etc/prometheus/file_sd/ray-agent/{PROBE_NODE}.json"
PROBE_SCENARIO = {
    "driver_version": "550.54.15",
    "gpus": [{"model": "NVIDIA L4", "memory_total": "24GiB", "utilization": 0.0,
              "processes": "from_cuda_visible_devices", "process_memory": "4GiB"}],
}
# alice's entrypoint: a Ray driver (ray.init gives the job its Ray job id) whose child holds GPU 0; it prints
# when it gave the GPU out and when it got it back.
HOLD_JOB = """\
import os, subprocess, sys, time
import ray
ray.init()
env = dict(os.environ, CUDA_VISIBLE_DEVICES="0")
started = time.time()
subprocess.run([sys.executable, "-c", "import time, sys; time.sleep(float(sys.argv[1]))", sys.argv[1]], env=env,
               check=True)
ended = time.time()
print(f"HELD {started:.3f} {ended:.3f}", flush=True)
"""


class WebhookReceiver(http.server.ThreadingHTTPServer):
    """The guard's notices, on the lab network's gateway (this host), which the nodes reach."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                receiver.bodies.append(json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0)))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        super().__init__((str(next(LAB.subnet.hosts())), 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://{self.server_address[0]}:{self.server_address[1]}/hook"


def lab_users() -> dict[str, dict]:
    return {u["name"]: u for u in monitoring_lab.inventory_vars().get("rayrack_users") or []}


def probe_config(head_ip: str) -> dict:
    users = [{k: v for k, v in u.items() if k in ("name", "contact", "max_gpus")} for u in lab_users().values()]
    return {
        "gpu": {"backend": "fake", "fake_scenario": f"{PROBE_DIR}/scenario.yml"},
        "attribution": {"enabled": True, "state_api": True, "dashboard_url": "http://127.0.0.1:8265",
                        "gateway_url": f"https://{head_ip}:8443", "ca_file": "/etc/rayrack/ca.crt",
                        "token_file": "/etc/rayrack/ray_token", "ttl": "2s", "node_ip": head_ip},
        "collection": {"interval": "1s", "call_timeout": "1s"},
        "guard": {"enabled": True, "dry_run": True, "window": "10s", "min_samples": 3, "max_gap": "10s",
                  "stages": {"notify_after": "0s"}, "webhook_url_file": f"{PROBE_DIR}/webhook.url",
                  "webhook_backoff": "1s", "audit_log": f"{PROBE_DIR}/audit.jsonl",
                  "state_file": f"{PROBE_DIR}/state.json"},
        "users": users,
        "web": {"listen_address": f"127.0.0.1:{PROBE_PORT}"},
    }


def query(promql: str) -> list[dict]:
    answer = monitoring_lab.prometheus(LAB, [("/api/v1/query", {"query": promql})])[0]
    assert answer.get("status") == "success", answer
    return answer["data"]["result"]


def wait_for(what: str, probe, timeout: float, interval: float = 2.0):
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if found:
            return found
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f}s"
        time.sleep(interval)


@pytest.fixture(scope="module")
def probe():
    """The probe agent on the head, scraped by its Prometheus; the webhook receiver it notifies."""
    if LAB is None:
        pytest.fail(f"lab {gateway.LAB_NAME!r} is not up: `make integration` converges the molecule lab")
    head = LAB.nodes[0]
    receiver = WebhookReceiver()
    target = [{"targets": [f"127.0.0.1:{PROBE_PORT}"], "labels": {"node": PROBE_NODE}}]
    files = {"scenario.yml": PROBE_SCENARIO, "agent.yml": probe_config(head.ip)}
    start = (
        f"set -e; sudo mkdir -p {PROBE_DIR}; "
        + "".join(f"echo {shlex.quote(json.dumps(body))} | sudo tee {PROBE_DIR}/{name} >/dev/null; "
                  for name, body in files.items())
        + f"echo {shlex.quote(receiver.url)} | sudo tee {PROBE_DIR}/webhook.url >/dev/null; "
        f"sudo /opt/rayrack/agent/bin/ray-agent check-config --config.file {PROBE_DIR}/agent.yml; "
        f"sudo systemd-run --quiet --collect --unit {PROBE_UNIT} "
        f"/opt/rayrack/agent/bin/ray-agent --config.file {PROBE_DIR}/agent.yml; "
        f"echo {shlex.quote(json.dumps(target))} | sudo tee {PROBE_SD} >/dev/null"
    )
    try:
        started = labtool.ssh(LAB, head, start, check=False)
        assert started.returncode == 0, started.stdout + started.stderr
        wait_for("the probe agent scraped", lambda: query(f'rayrack_up{{node="{PROBE_NODE}"}} == 1'), 60)
        yield receiver
    finally:
        labtool.ssh(LAB, head, f"sudo rm -f {PROBE_SD}; sudo systemctl stop {PROBE_UNIT}; sudo rm -rf {PROBE_DIR}",
                    check=False)
        receiver.shutdown()
        receiver.server_close()


researchers = gateway.researchers


@pytest.mark.usefixtures("researchers")
def test_alices_gpu_job_is_labelled_notified_and_billed_to_her(probe):
    receiver = probe
    alice = lab_users()["alice"]
    made = gateway.as_user("alice", f"mkdir -p accounting && cat > accounting/hold.py << 'EOF'\n{HOLD_JOB}EOF")
    assert made.returncode == 0, made.stderr
    submitted = gateway.ray_job("alice", "submit", "--no-wait", "--working-dir", "accounting", "--",
                                "python", "hold.py", str(HOLD_SECONDS), timeout=90)
    out = gateway.plain(submitted)
    assert submitted.returncode == 0, out[-3000:]
    submission = re.search(r"Job '([^']+)' submitted successfully", out).group(1)
    began = time.monotonic()

    # Her process on the probe's GPU, as Prometheus has it: the owner from the gateway, the Linux user apart.
    held = wait_for("alice's GPU process in Prometheus", lambda: query(
        f'rayrack_gpu_process_memory_used_bytes{{node="{PROBE_NODE}",user="alice",ray_job_id!=""}}'), 60)
    labels = held[0]["metric"]
    assert labels["os_user"] == "ray", labels  # Ray runs every job as its service user
    jobs = wait_for("alice's job in rayrack_job_info", lambda: query(
        f'rayrack_job_info{{node="{PROBE_NODE}",submission_id="{submission}"}}'), 30)
    assert jobs[0]["metric"]["user"] == "alice" and jobs[0]["metric"]["ray_job_id"] == labels["ray_job_id"]

    # The guard (10 s window, notify at once) tells alice, through her contact.
    def notices() -> list[dict]:
        return [b for b in receiver.bodies if any(h.get("submission_id") == submission for h in b.get("holders", []))]

    notice = wait_for("the guard's notice", notices, 60)[0]
    owner = {"user": "alice", "email": "", "slack_member_id": ""}
    for word in str(alice.get("contact", "")).split():
        owner["email" if "@" in word else "slack_member_id"] = word
    assert notice["owners"] == [owner], notice
    assert "alice" in notice["text"], notice["text"]
    if owner["slack_member_id"]:
        assert f"<@{owner['slack_member_id']}>" in notice["text"], notice["text"]
    if owner["email"]:
        assert notice["emails"] == [owner["email"]], notice

    # The job's own account of how long it held the GPU.
    assert gateway.wait_status("alice", submission, {"SUCCEEDED"}, timeout=HOLD_SECONDS + 90) == "SUCCEEDED"
    logs = gateway.plain(gateway.ray_job("alice", "logs", submission))
    started, ended = map(float, re.search(r"HELD ([0-9.]+) ([0-9.]+)", logs).groups())
    expected = ended - started
    # The last samples: the agent's next collection, the next scrape and the next rule evaluation (5 s each).
    time.sleep(15)

    # From shortly before the job gave out the GPU: what alice held earlier (another run) stays out of the bill.
    since = f"{int(time.time() - started) + 20}s"
    report = gateway.rayrack("usage", "--since", since, "--format", "json")
    assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
    rows = {row["user"]: row for row in json.loads(report.stdout)["rows"]}
    billed = rows["alice"]["gpu_seconds"]
    print(f"alice held the GPU {expected:.1f}s by the job's clock; billed {billed:.1f} GPU-s "
          f"({(billed - expected) / expected:+.1%}), idle {rows['alice']['idle_gpu_seconds']:.1f} GPU-s; "
          f"the test took {time.monotonic() - began:.0f}s")
    assert abs(billed - expected) <= 0.1 * expected, rows["alice"]
    # Idle from the start: the guard calls it idle_held once its window has passed.
    assert 0 < rows["alice"]["idle_gpu_seconds"] <= billed
    assert rows["bob"]["gpu_seconds"] == 0, rows["bob"]

    by_job = json.loads(gateway.rayrack("usage", "--since", since, "--by", "job", "--format", "json").stdout)
    assert any(r["submission_id"] == submission and r["user"] == "alice" for r in by_job["rows"]), by_job

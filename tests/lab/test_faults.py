"""Faults on a converged lab, each followed by proof that nothing was lost (run by `make integration`).

A Ray worker killed with SIGKILL, the agent killed with SIGKILL, and a worker unreachable over SSH during a
playbook run (the head killed and brought back: test_head_ft.py). Each test measures its recovery time; all of
them are printed and written to .cache/lab-faults.json. The lab is `inventories/molecule` unless RAYRACK_LAB
names another one (`lab.py up --name NAME`, converged with site.yml).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lab as labtool

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
LAB_NAME = os.environ.get("RAYRACK_LAB", "molecule")
RESULTS = REPO / ".cache" / "lab-faults.json"
AGENT_STATE_DIR = "/var/lib/ray-agent"
LAB = labtool.load(LAB_NAME)


@pytest.fixture(scope="module")
def lab():
    if LAB is None:
        pytest.fail(f"lab {LAB_NAME!r} is not up: `make integration` converges the molecule lab, then runs these")
    return LAB


@pytest.fixture(scope="module")
def recovery_log():
    """Recovery times by fault, printed and written to .cache/lab-faults.json at the end of the module."""
    times: dict[str, dict[str, float]] = {}
    yield times
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"lab": LAB_NAME, "recovery_seconds": times}, indent=2) + "\n")
    print(f"\nrecovery times (s), also in {RESULTS}:")
    for fault, figures in times.items():
        print(f"  {fault:<24} " + "  ".join(f"{k}={v:.1f}" for k, v in figures.items()))


def sh(lab: labtool.Lab, node: labtool.Node, command: str, input_text: str | None = None) -> str:
    res = labtool.ssh(lab, node, command, check=False, input_text=input_text)
    assert res.returncode == 0, f"{node.name}: {command}: {res.stderr[-2000:]}"
    return res.stdout


def unit(lab: labtool.Lab, node: labtool.Node, name: str) -> dict[str, str]:
    out = sh(lab, node, f"systemctl show -p MainPID,NRestarts,ActiveState,SubState {name}")
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def kill_main_process(lab: labtool.Lab, node: labtool.Node, name: str) -> tuple[float, float]:
    """kill -9 a unit's main process and wait until systemd runs it again (a new PID, one more restart).
    Returns when the kill started (time.monotonic()) and how long the restart took."""
    was = unit(lab, node, name)
    assert was["ActiveState"] == "active", was
    started = time.monotonic()
    sh(lab, node, f"sudo kill -9 {was['MainPID']}")
    now = wait_for(f"systemd restarts {name}", lambda: (
        u if (u := unit(lab, node, name))["ActiveState"] == "active"
        and u["MainPID"] not in ("0", was["MainPID"]) else None), 60)
    assert int(now["NRestarts"]) == int(was["NRestarts"]) + 1, now
    return started, time.monotonic() - started


def wait_for(what: str, probe, timeout: float, interval: float = 0.5):
    """Poll probe() until it returns something truthy; fail naming `what` and the last value."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except (AssertionError, subprocess.SubprocessError, ValueError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    pytest.fail(f"{what}: not within {timeout:.0f}s (last: {last!r})")


# Runs on the head: Ray's node table through the dashboard's state API, with the cluster token.
NODES_PROBE = r"""
import json, sys, urllib.request
token = open("/etc/rayrack/ray_token").read().strip()
for host in ("127.0.0.1", sys.argv[1]):
    try:
        req = urllib.request.Request(f"http://{host}:8265/api/v0/nodes?limit=1000",
                                     headers={"Authorization": "Bearer " + token})
        rows = json.load(urllib.request.urlopen(req, timeout=3))["data"]["result"]["result"]
        break
    except OSError:
        rows = None
print(json.dumps(None if rows is None else [[r["node_ip"], r["node_id"], r["state"]] for r in rows]))
"""


def alive_rows(lab: labtool.Lab) -> list[tuple[str, str]]:
    """(IP, node id) of every ALIVE Ray node, as the head sees them ([] while the dashboard is down)."""
    head = lab.nodes[0]
    out = sh(lab, head, f"sudo python3 - {head.ip}", input_text=NODES_PROBE)
    rows = json.loads(out.strip().splitlines()[-1]) or []
    return [(ip, node_id) for ip, node_id, state in rows if state == "ALIVE"]


def alive_nodes(lab: labtool.Lab) -> dict[str, str]:
    """IP -> node id of every ALIVE Ray node."""
    return dict(alive_rows(lab))


def all_alive(lab: labtool.Lab) -> dict[str, str] | None:
    """Every node alive exactly once: a killed node's old entry stays ALIVE until the head's health check
    notices, and a job pinned to it then fails."""
    rows = alive_rows(lab)
    return dict(rows) if sorted(ip for ip, _ in rows) == sorted(n.ip for n in lab.nodes) else None


# A job through the Jobs API (as the ray user, with the token): a task pinned to every node, holding a GPU where
# the node has some; it prints what ran where and the cluster's GPUs.
JOB = r"""
import json, socket, sys
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init()
alive = {n["NodeManagerAddress"]: n for n in ray.nodes() if n["Alive"]}

@ray.remote(num_cpus=0)
def where():
    return ray.util.get_node_ip_address()

refs = []
for ip in sys.argv[1].split(","):
    gpus = alive[ip]["Resources"].get("GPU", 0)
    pinned = NodeAffinitySchedulingStrategy(alive[ip]["NodeID"], soft=False)
    refs.append(where.options(num_gpus=1 if gpus else 0, scheduling_strategy=pinned).remote())
print("JOBRESULT " + json.dumps({"ran_on": sorted(ray.get(refs, timeout=120)),
                                 "gpus": ray.cluster_resources().get("GPU", 0)}))
"""

SUBMIT_AND_WAIT = r"""
import json, shlex, sys, time, urllib.request
token = open("/etc/rayrack/ray_token").read().strip()
def call(method, path, body=None):
    for host in ("127.0.0.1", sys.argv[1]):
        try:
            req = urllib.request.Request(f"http://{host}:8265{path}", method=method,
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Authorization": "Bearer " + token,
                                                  "Content-Type": "application/json"})
            return json.load(urllib.request.urlopen(req, timeout=10))
        except urllib.error.URLError as err:
            if host == sys.argv[1]:
                raise
entrypoint = "python -c " + shlex.quote(sys.argv[2]) + " " + sys.argv[3]
job = call("POST", "/api/jobs/", {"entrypoint": entrypoint, "metadata": {"name": "fault-recovery"}})["submission_id"]
deadline = time.monotonic() + 180
while (status := call("GET", "/api/jobs/" + job)["status"]) not in ("SUCCEEDED", "FAILED", "STOPPED"):
    if time.monotonic() > deadline:
        break
    time.sleep(0.5)
print(json.dumps({"status": status, "logs": call("GET", f"/api/jobs/{job}/logs")["logs"][-4000:]}))
"""


def job_runs_everywhere(lab: labtool.Lab) -> None:
    """Nothing was lost: a job submitted now runs a task on every node and sees every fake GPU."""
    head = lab.nodes[0]
    ips = ",".join(n.ip for n in lab.nodes)
    command = ("sudo -u ray sh -c " + shlex.quote(
        "set -a; . /etc/rayrack/ray.env; cd /var/lib/rayrack; python3 - "
        + " ".join(shlex.quote(a) for a in (head.ip, JOB, ips))))
    result = json.loads(sh(lab, head, command, input_text=SUBMIT_AND_WAIT).strip().splitlines()[-1])
    assert result["status"] == "SUCCEEDED", result["logs"]
    line = next(ln for ln in result["logs"].splitlines() if ln.startswith("JOBRESULT "))
    ran = json.loads(line.removeprefix("JOBRESULT "))
    assert ran["ran_on"] == sorted(n.ip for n in lab.nodes), ran
    assert ran["gpus"] == lab.workers * lab.gpus_per_worker, ran


def test_a_killed_ray_worker_is_restarted_and_rejoins(lab, recovery_log):
    head, victim, bystanders = lab.nodes[0], lab.nodes[1], lab.nodes[2:]
    before = wait_for("every node alive before the fault", lambda: all_alive(lab), 120)
    started, restarted = kill_main_process(lab, victim, "ray-worker")
    after = wait_for("the worker rejoins as a new Ray node", lambda: (
        a if (a := all_alive(lab)) and a[victim.ip] != before[victim.ip] else None), 300, interval=1)
    rejoined = time.monotonic() - started
    recovery_log["kill -9 ray worker"] = {"unit_restarted": restarted, "rejoined": rejoined}

    # Only the victim changed: the head and the other workers kept their Ray node.
    assert {ip: after[ip] for ip in (head.ip, *(n.ip for n in bystanders))} == \
        {ip: before[ip] for ip in (head.ip, *(n.ip for n in bystanders))}
    job_runs_everywhere(lab)
    recovery_log["kill -9 ray worker"]["job_after"] = time.monotonic() - started


# Runs on the head: one agent's per-GPU series (names and labels; rayrack_gpu_up stays while a GPU is lost, with
# value 0) from its /metrics.
AGENT_PROBE = r"""
import json, sys, urllib.request
ip, port = sys.argv[1], sys.argv[2]
try:
    body = urllib.request.urlopen(f"http://{ip}:{port}/metrics", timeout=3).read().decode()
    series = sorted({line.rsplit(" ", 1)[0] for line in body.splitlines()
                     if line.startswith("rayrack_gpu_up{")})
except OSError:
    series = None
print(json.dumps(series))
"""


def agent_and_prometheus(lab: labtool.Lab, node: labtool.Node) -> dict:
    """The agent's series from its /metrics, and Prometheus's latest scrape of that agent with its GPU count."""
    series = json.loads(sh(lab, lab.nodes[0], f"python3 - {node.ip} 9489", input_text=AGENT_PROBE))
    up, gpus = labtool.prometheus(lab, [("/api/v1/query", {"query": f'up{{job="ray-agent",node="{node.name}"}}'}),
                                        ("/api/v1/query", {"query": f'count(rayrack_gpu_up{{node="{node.name}"}})'})])
    up_rows = up.get("data", {}).get("result") or []
    gpu_rows = gpus.get("data", {}).get("result") or []
    return {"series": series, "up": up_rows[0]["value"] if up_rows else None,
            "prometheus_gpus": int(gpu_rows[0]["value"][1]) if gpu_rows else 0}


# Every file in the agent's state directory with its digest (the guard's state and audit log live there).
STATE_PROBE = f"cd {AGENT_STATE_DIR} && find . -type f -print0 | sort -z | xargs -0r sha256sum; echo; " \
              f"stat -c %U:%a {AGENT_STATE_DIR}"


# Seconds until the next scripted whole-GPU fault of the node's simulated NVML library (0 while one is on), from
# its compiled scenario: `fault GPU CALL CODE FROM UNTIL EVERY` lines, scenario time counted from the file's
# mtime (no `epoch` line). None when the node has no simulated library.
FAULT_CLOCK = r"""
import os, sys, time
path = "/etc/rayrack/nvml-sim.conf"
if not os.path.exists(path):
    print("none"); sys.exit()
lines = open(path).read().splitlines()
epoch = next((float(l.split()[1]) for l in lines if l.startswith("epoch ")), os.stat(path).st_mtime)
now, soonest = time.time() - epoch, float("inf")
for l in lines:
    f = l.split()
    if f[0] != "fault" or f[2] != "any":
        continue
    start, until, every = float(f[4]), float(f[5]), float(f[6])
    if every > 0:
        phase = (now - start) % every if now >= start else now - start
        inside = now >= start and phase < until - start
        soonest = min(soonest, 0 if inside else (every - phase if now >= start else start - now))
    elif until < 0 or now < until:
        soonest = min(soonest, max(0.0, start - now))
print(soonest)
"""


def test_a_killed_agent_is_restarted_and_its_metrics_continue(lab, recovery_log):
    victim = lab.nodes[1]
    # A GPU the scenario takes away (GPU_IS_LOST on every call) cannot be named by an agent starting meanwhile:
    # kill the agent only with a minute or more before the next such window.
    wait_for("a minute clear of scripted GPU losses", lambda: (
        (out := sh(lab, victim, "sudo python3 -", input_text=FAULT_CLOCK).strip()) == "none" or float(out) > 60),
        400, interval=5)

    def probe() -> dict:
        return agent_and_prometheus(lab, victim)

    before = wait_for("the agent's series in Prometheus", lambda: (
        p if (p := probe())["series"] and p["up"] and p["up"][1] == "1" else None), 60)
    state_before = sh(lab, victim, f"sudo sh -c {shlex.quote(STATE_PROBE)}")

    killed_at = time.time()
    started, restarted = kill_main_process(lab, victim, "ray-agent")
    served = wait_for("/metrics answers again", lambda: (p if (p := probe())["series"] else None), 60)
    serving = time.monotonic() - started
    # Prometheus scrapes it again: a fresh up == 1 sample taken after the kill.
    scraped = wait_for("Prometheus scrapes the restarted agent", lambda: (
        p if (p := probe())["up"] and p["up"][1] == "1" and float(p["up"][0]) > killed_at else None), 90,
        interval=1)
    recovery_log["kill -9 agent"] = {"unit_restarted": restarted, "metrics_served": serving,
                                     "prometheus_scraped": time.monotonic() - started}

    # The same per-GPU series (labels gpu, uuid) continue, in the agent and in Prometheus.
    assert served["series"] == before["series"] and len(served["series"]) == lab.gpus_per_worker, served
    assert scraped["prometheus_gpus"] == before["prometheus_gpus"] == lab.gpus_per_worker, scraped
    assert sh(lab, victim, f"sudo sh -c {shlex.quote(STATE_PROBE)}") == state_before


# ----------------------------------------------------------------------------------------------------------
# A worker unreachable over SSH while a playbook runs
# ----------------------------------------------------------------------------------------------------------
RECAP = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def recap(output: str) -> dict[str, dict[str, int]]:
    return {m[1]: {"ok": int(m[2]), "changed": int(m[3]), "unreachable": int(m[4]), "failed": int(m[5])}
            for m in RECAP.finditer(output)}


class SshBlackhole:
    """Drops this host's SSH packets to one node (nftables, a table of its own): to Ansible the node is gone,
    while its Ray and agent keep talking to the other nodes. Removed on exit, whatever happened."""

    def __init__(self, lab: labtool.Lab, node: labtool.Node):
        self.table = f"rayrack_fault_{lab.name}"
        self.node = node

    def __enter__(self):
        subprocess.run(["nft", "delete", "table", "inet", self.table], capture_output=True, check=False)
        script = (f"add table inet {self.table}\n"
                  f"add chain inet {self.table} out {{ type filter hook output priority 0; policy accept; }}\n"
                  f"add rule inet {self.table} out ip daddr {self.node.ip} tcp dport 22 drop\n")
        subprocess.run(["nft", "-f", "-"], input=script, text=True, check=True)
        return self

    def __exit__(self, *exc):
        subprocess.run(["nft", "delete", "table", "inet", self.table], check=True)


def playbook(lab: labtool.Lab, control_dir: str, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    # A fresh SSH control directory: a multiplexed connection kept from an earlier run would hang on the
    # dropped packets instead of failing to connect.
    env = dict(os.environ, ANSIBLE_CACHE_PLUGIN_CONNECTION=str(lab.inventory_dir / ".facts"),
               ANSIBLE_SSH_CONTROL_PATH_DIR=control_dir, ANSIBLE_TIMEOUT="5")
    started = time.monotonic()
    result = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(lab.inventory_dir),
                             "playbooks/facts.yml", *args], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    return result, time.monotonic() - started


def test_a_playbook_goes_on_without_an_unreachable_worker_then_converges_it(lab, recovery_log):
    """facts.yml (the first playbook of site.yml): one of three nodes gone is within the default
    rayrack_max_fail_percentage (50), so the others are converged and the run names the lost node; under a
    lower limit the play stops everywhere; once the node is back, a re-run converges it with nothing to change."""
    lost, others = lab.nodes[-1], lab.nodes[:-1]
    with tempfile.TemporaryDirectory(prefix="rayrack-cp-") as control:
        with SshBlackhole(lab, lost):
            tolerated, tolerated_secs = playbook(lab, control)
            stopped, _ = playbook(lab, control, "-e", json.dumps({"rayrack_max_fail_percentage": 20}))
        rerun, rerun_secs = playbook(lab, control)
    recovery_log["worker unreachable"] = {"run_without_it": tolerated_secs, "rerun_after_restore": rerun_secs}

    converged = recap(rerun.stdout)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    assert all(converged[n.name]["failed"] == converged[n.name]["unreachable"] == converged[n.name]["changed"] == 0
               for n in lab.nodes), converged

    went_on = recap(tolerated.stdout)
    assert tolerated.returncode == 2, tolerated.stdout[-3000:]
    assert went_on[lost.name]["failed"] + went_on[lost.name]["unreachable"] == 1, went_on
    assert f"{lost.name} is unreachable" in tolerated.stdout
    for node in others:
        # Every task ran on the reachable nodes: as many as in the full run afterwards.
        assert went_on[node.name] == converged[node.name], (node.name, went_on, converged)

    halted = recap(stopped.stdout)
    assert stopped.returncode == 2, stopped.stdout[-3000:]
    assert "NO MORE HOSTS LEFT" in stopped.stdout
    for node in others:
        assert halted[node.name]["ok"] < converged[node.name]["ok"], (node.name, halted, converged)

"""Day-2 on a converged lab, in file order: a worker removed and added back, a head outage without fault
tolerance, a rolling Ray upgrade node by node while a long job runs, a node failing mid-upgrade, and last the
teardown. They change the lab for good, so
`make integration` runs them after the other lab tests.

By default it uses the molecule lab (`make integration`); RAYRACK_UPGRADE_LAB / _SUBNET name another lab,
RAYRACK_UPGRADE_TO the Ray version to move to (default: 2.59.0 from 2.60.0, else required).
"""

import functools
import ipaddress
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rayrack import inventory
from rayrack.status import ray_version_of

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lab as labtool

pytestmark = [pytest.mark.lab, pytest.mark.day2]

REPO = Path(__file__).resolve().parents[2]
LAB_NAME = os.environ.get("RAYRACK_UPGRADE_LAB", "molecule")
LAB = labtool.Lab(LAB_NAME, 2, ipaddress.IPv4Network(os.environ.get("RAYRACK_UPGRADE_SUBNET", "10.213.1.0/24")),
                  REPO / "inventories" / LAB_NAME, 2)
HEAD, WORKER1, WORKER2 = LAB.nodes[:3]
NEIGHBOUR = {"2.60.0": "2.59.0"}
RAYRACK = [sys.executable, "-m", "rayrack", "-i", str(LAB.inventory_dir)]
# Short waits: the lab's nodes are idle apart from the test's own job.
FAST = ["--drain-timeout", "10", "-e", "ray_drain_agent_timeout=20", "-e", "ray_drain_rejoin_timeout=120"]

LONG_JOB = r"""
import socket, sys, time
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init()
node = next(n for n in ray.nodes() if n["Alive"] and n["NodeManagerAddress"] == sys.argv[1])

@ray.remote(num_gpus=1, max_retries=0)
def beat(seconds):
    for _ in range(seconds):
        print(f"HEARTBEAT {time.time():.1f} {socket.gethostname()}", flush=True)
        time.sleep(1)

ray.get(beat.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(1800))
"""

# Runs on the head as root: the Jobs API with the node's token. argv: method path [json body]
JOBS_API = r"""
import json, sys, urllib.error, urllib.request
token = open("/etc/rayrack/ray_token").read().strip()
data = sys.argv[3].encode() if len(sys.argv) > 3 else None
req = urllib.request.Request("http://127.0.0.1:8265" + sys.argv[2], data=data, method=sys.argv[1],
                             headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
try:
    print(urllib.request.urlopen(req, timeout=15).read().decode())
except urllib.error.URLError as exc:
    print(json.dumps({"error": str(exc)}))
"""

# A GPU task must run somewhere: proof the cluster still serves.
GPU_PROBE = ("import ray, socket; ray.init(); "
             "print('GPU TASK RAN ON', ray.get(ray.remote(num_gpus=1)(lambda: socket.gethostname()).remote()))")


def on(node, command, input_text=None):
    result = labtool.ssh(LAB, node, command, check=False, input_text=input_text)
    assert result.returncode == 0, f"{node.name}: {command}: {result.stderr[-2000:]}"
    return result.stdout


def jobs_api(method, path, body=None):
    args = " ".join(shlex.quote(a) for a in [method, path] + ([json.dumps(body)] if body else []))
    out = on(HEAD, f"sudo python3 - {args}", input_text=JOBS_API)
    return json.loads(out) if out.strip().startswith(("{", "[")) else out


def wait_job(job_id, states, timeout=180):
    deadline, status = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        status = jobs_api("GET", f"/api/jobs/{job_id}").get("status")
        if status in states:
            return status
        time.sleep(2)
    raise AssertionError(f"job {job_id} is {status}, not {states} after {timeout}s")


def submit(entrypoint, job_id):
    reply = jobs_api("POST", "/api/jobs/", {"entrypoint": entrypoint, "submission_id": job_id})
    assert reply.get("submission_id") == job_id, reply


@functools.cache
def host(node):
    """The node as the lab's inventory has it (its Ray unit, its venv's marker)."""
    return inventory.load(LAB.inventory_dir).get(node.name)


def node_state(node):
    """Which Ray the node has and which run of its unit this is (a restart gives a new InvocationID)."""
    wheelhouse = on(node, f"cat {host(node).ray_venv_marker}")
    invocation = on(node, f"systemctl show -p InvocationID --value {host(node).ray_unit}")
    return wheelhouse, invocation


def installed_version(node):
    return ray_version_of(node_state(node)[0])


def status():
    result = subprocess.run([*RAYRACK, "status"], cwd=REPO, capture_output=True, text=True, timeout=120)
    return result.stdout


def rayrack(*args, timeout=1200):
    started = time.monotonic()
    result = subprocess.run([*RAYRACK, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    return result, time.monotonic() - started


def units(node, *names):
    """`enabled/active` of each unit (`systemctl` prints one line per unit and query, even for unknown units)."""
    out = labtool.ssh(LAB, node, "systemctl is-enabled {0}; systemctl is-active {0}".format(" ".join(names)),
                      check=False).stdout.split()
    return {name: f"{out[i]}/{out[i + len(names)]}" for i, name in enumerate(names)}


def row(text, node):
    return next(line.split() for line in text.splitlines() if line.startswith(node.name + " "))


def test_a_removed_worker_stays_out_until_add_node_brings_it_back(lab_up):
    result, took = rayrack("remove-node", WORKER2.name, "--timeout", "10")
    assert result.returncode == 0, result.stdout[-5000:]
    print(f"remove-node {WORKER2.name}: {took:.0f}s")
    # Stopped and disabled (it stays out across a reboot), nothing uninstalled.
    unit = host(WORKER2).ray_unit
    assert units(WORKER2, unit, "ray-agent") == {unit: "disabled/inactive", "ray-agent": "disabled/inactive"}
    on(WORKER2, "test -x /opt/rayrack/venv/bin/ray")
    snap = status()
    assert row(snap, WORKER2)[4] != "ALIVE" and row(snap, WORKER1)[4] == "ALIVE", snap
    # The rest of the cluster serves: a GPU job runs, on worker1, the only GPU node left.
    job_id = f"after-remove-{int(time.time())}"
    submit(f"python -c {shlex.quote(GPU_PROBE)}", job_id)
    assert wait_job(job_id, {"SUCCEEDED", "FAILED", "STOPPED"}) == "SUCCEEDED"
    assert f"GPU TASK RAN ON {WORKER1.name}" in jobs_api("GET", f"/api/jobs/{job_id}/logs").get("logs", "")

    result, took = rayrack("add-node")
    assert result.returncode == 0, result.stdout[-5000:]
    print(f"add-node {WORKER2.name}: {took:.0f}s")
    unit = host(WORKER2).ray_unit
    assert units(WORKER2, unit, "ray-agent") == {unit: "enabled/active", "ray-agent": "enabled/active"}
    deadline = time.monotonic() + 120
    while row(snap := status(), WORKER2)[4] != "ALIVE" and time.monotonic() < deadline:
        time.sleep(5)
    # Back in Ray, its agent reporting both GPUs (busy/idle/free/down adds up to 2).
    assert row(snap, WORKER2)[4] == "ALIVE", snap
    assert sum(int(n) for n in row(snap, WORKER2)[6].split("/")) == 2, snap


def test_without_fault_tolerance_a_head_restart_ends_the_workers_work(lab_up):
    """The measurement behind the README's "without rayrack_gcs_ft": the same outage as test_head_ft.py's, on the
    same lab converged with fault tolerance off. It runs while every node has the inventory's Ray (before the
    upgrades): only the head changes. The upgrade after it brings the head back to the inventory's settings."""
    import test_head_ft as ft

    # Only the head's configuration changes (the workers carry no store settings).
    converge = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(LAB.inventory_dir), "playbooks/ray.yml",
         "--limit", HEAD.name, "-e", json.dumps({"rayrack_gcs_ft": False})],
        cwd=REPO, capture_output=True, text=True, timeout=900,
        env={**os.environ, "ANSIBLE_CACHE_PLUGIN_CONNECTION": str(LAB.inventory_dir / ".facts")})
    assert converge.returncode == 0, converge.stdout[-5000:]
    assert "RAY_REDIS_ADDRESS" not in on(HEAD, "sudo cat /etc/rayrack/ray.env")
    ft.alice_ready()
    resource = ft.worker_resource()
    ft.deploy_echo("v1", resource)
    # No running job this time: without FT its record goes with the head.
    seen = ft.measure_head_outage(resource, "v1", running_job=False)
    after = ft.count(resource, 1)
    lost = {"raylets_restarted": not seen["raylets_kept"], "counter_lost": after["n"] == 1,
            "model_gone": ft.echo_answers("v1") is None}
    ft.record("without FT", {**{k: v for k, v in seen.items() if k not in ("counter_before", "raylets_kept")},
                             **lost})
    # What the README states, measured: the workers' raylets started over, the actor's state is gone, and the
    # model stays down until it is deployed again (Serve's proxies come back with the head, its apps do not).
    assert lost == {"raylets_restarted": True, "counter_lost": True, "model_gone": True}, (seen, after)
    assert seen["success_during"] < 0.99, seen


@pytest.fixture(scope="module")
def lab_up():
    if not LAB.known_hosts.exists():
        pytest.fail(f"the {LAB_NAME} lab is not up: run `make integration` (it converges the lab, then runs these)")


@pytest.fixture(scope="module")
def versions(lab_up):
    original = installed_version(HEAD)
    target = os.environ.get("RAYRACK_UPGRADE_TO") or NEIGHBOUR.get(original)
    if not target:
        pytest.fail(f"the lab runs Ray {original}: set RAYRACK_UPGRADE_TO to the version to upgrade to")
    return original, target


def test_rolling_upgrade_keeps_a_long_job_running_on_the_other_worker(versions):
    original, target = versions
    on(HEAD, "sudo tee /var/lib/rayrack/long_job.py >/dev/null && sudo chmod 0644 /var/lib/rayrack/long_job.py",
       input_text=LONG_JOB)
    job_id = f"long-{int(time.time())}"
    submit(f"python /var/lib/rayrack/long_job.py {WORKER2.ip}", job_id)
    assert wait_job(job_id, {"RUNNING"}) == "RUNNING"
    time.sleep(5)  # a few heartbeats before the rollout starts

    started = time.monotonic()
    proc = subprocess.Popen([*RAYRACK, "upgrade", "--ray-version", target, *FAST], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output, window, during = [], {}, {}
    for line in proc.stdout:
        output.append(line)
        if f" {WORKER1.name} " in line and "start" not in window:
            window["start"] = time.time()
        if line.strip().endswith("GPU(s)") and f" {WORKER1.name} " in line and "end" not in window:
            # worker1 is done and checked: the job on worker2 must still run, and status must show the step.
            window["end"] = time.time()
            during["job"] = jobs_api("GET", f"/api/jobs/{job_id}").get("status")
            # Read now: the head's restart at the end of the rollout takes the job's record with it.
            during["logs"] = jobs_api("GET", f"/api/jobs/{job_id}/logs").get("logs", "")
            during["status"] = status()
    code = proc.wait(timeout=60)
    duration = time.monotonic() - started
    text = "".join(output)
    assert code == 0, text[-5000:]
    print(f"rolling upgrade {original} -> {target}: {duration:.0f}s")

    # While worker1 was drained, stopped, upgraded and checked, the job kept beating on worker2.
    assert set(window) == {"start", "end"}, text[-5000:]
    assert during["job"] == "RUNNING", during
    beats = [float(ln.split()[-2]) for ln in during["logs"].splitlines() if "HEARTBEAT" in ln]
    inside = [b for b in beats if window["start"] <= b <= window["end"]]
    assert inside, f"no heartbeat between {window}: {beats[-5:]}"
    gaps = [b - a for a, b in zip([window["start"], *inside], [*inside, window["end"]], strict=True)]
    assert max(gaps) < 10, f"the job stalled for {max(gaps):.0f}s while worker1 was upgraded"

    # The status table showed the step: worker1 on the new Ray waiting for the head, worker2 still serving.
    snap = during["status"]
    assert "run in progress: upgrade" in snap, snap
    assert row(snap, WORKER1)[5] == target and row(snap, WORKER1)[4] != "ALIVE", snap
    assert row(snap, WORKER2)[4] == "ALIVE" and row(snap, WORKER2)[5] == original, snap

    # Worker1 upgraded ahead of the head was refused for its version alone (what Ray does), then joined.
    assert "refused by the head" in text and f"Ray {original}" in text, text[-5000:]
    final = status()
    for node in (HEAD, WORKER1, WORKER2):
        assert row(final, node)[4:6] == ["ALIVE", target], final
    assert "last run: upgrade successful" in final, final
    submit(f"python -c {shlex.quote(GPU_PROBE)}", f"after-upgrade-{int(time.time())}")


def test_a_node_failing_mid_upgrade_stops_the_rollout_and_the_cluster_keeps_serving(versions):
    original, target = versions
    # After the upgrade test the lab is on the target: roll back. Alone, it moves to the target.
    goal = original if installed_version(HEAD) == target else target
    before = {node.name: node_state(node) for node in (HEAD, WORKER2)}
    # The fault: worker1's agent is gone, so after its upgrade it cannot show healthy GPUs.
    on(WORKER1, "sudo systemctl stop ray-agent")
    try:
        result = subprocess.run([*RAYRACK, "upgrade", "--ray-version", goal, *FAST], cwd=REPO,
                                capture_output=True, text=True, timeout=1200)
    finally:
        on(WORKER1, "sudo systemctl start ray-agent")
    assert result.returncode == 2, result.stdout[-5000:]
    assert f"Upgrading {WORKER1.name} failed" in result.stdout, result.stdout[-5000:]
    # The remaining nodes were not touched: same Ray, same run of their unit.
    assert {node.name: node_state(node) for node in (HEAD, WORKER2)} == before
    # The cluster still serves: a GPU job runs (on worker2, the only GPU node in it).
    job_id = f"after-fault-{int(time.time())}"
    submit(f"python -c {shlex.quote(GPU_PROBE)}", job_id)
    assert wait_job(job_id, {"SUCCEEDED", "FAILED", "STOPPED"}) == "SUCCEEDED"
    assert f"GPU TASK RAN ON {WORKER2.name}" in jobs_api("GET", f"/api/jobs/{job_id}/logs").get("logs", "")
    snap = status()
    assert "last run: upgrade failed" in snap and f"failed on {WORKER1.name}" in snap, snap


def test_teardown_needs_the_cluster_name_then_removes_ray_from_every_node(lab_up):
    wrong, _ = rayrack("teardown", "--confirm", "not-this-cluster")
    assert wrong.returncode != 0 and "confirm with -e teardown_confirm=" in wrong.stdout, wrong.stdout[-3000:]
    assert units(HEAD, host(HEAD).ray_unit) == {host(HEAD).ray_unit: "enabled/active"}

    shared = on(HEAD, "sudo ls /srv/rayrack-shared")
    result, took = rayrack("teardown", "--confirm", LAB.name)  # the lab names its cluster after itself
    assert result.returncode == 0, result.stdout[-5000:]
    print(f"teardown: {took:.0f}s")
    for node, unit in ((n, host(n).ray_unit) for n in (HEAD, WORKER1, WORKER2)):
        gone = labtool.ssh(LAB, node, f"systemctl cat {unit} ray-agent; ls -d /opt/rayrack /etc/rayrack", check=False)
        assert "No files found" in gone.stderr and "cannot access '/opt/rayrack'" in gone.stderr, gone
        assert "cannot access '/etc/rayrack'" in gone.stderr, gone
    # Researchers' files and the monitoring stay.
    assert on(HEAD, "sudo ls /srv/rayrack-shared") == shared
    assert units(HEAD, "prometheus") == {"prometheus": "enabled/active"}

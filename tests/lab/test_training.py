"""What researchers run, through the stock Ray CLI on an SSH tunnel to the head, on the converged molecule lab:
collectives between two nodes, a Ray Train job with checkpoints on the shared tree, and runtime_env packages
from the shared package directory with no package index. Under `firewall_intra_cluster: pinned` the same
rendezvous and training must fail, which shows these tests can fail.

RAYRACK_LAB names another lab (default: molecule).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lab as labtool

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
LAB_NAME = os.environ.get("RAYRACK_LAB", "molecule")
LAB = labtool.load(LAB_NAME)
RAY = str(Path(sys.executable).parent / "ray")
TRAIN_JOB = Path(__file__).resolve().parent / "train_job"
SHARED = "/srv/rayrack-shared"

# Two actors on two workers do what torch.distributed, NCCL and gloo do: one listens (torch's default port and
# an ephemeral one), the other connects. argv: ACCELERATOR_TYPE
RENDEZVOUS = r"""
import json, socket, sys, threading
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

ray.init()
gpu_nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("accelerator_type:" + sys.argv[1])]

@ray.remote(num_cpus=0)
class Listener:
    def __init__(self):
        self.socks = []
        for port in (29500, 0):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", port))
            s.listen(8)
            threading.Thread(target=self.serve, args=(s,), daemon=True).start()
            self.socks.append(s)

    def serve(self, s):
        while True:
            conn, _ = s.accept()
            conn.sendall(b"hello")
            conn.close()

    def where(self):
        return ray.util.get_node_ip_address(), [s.getsockname()[1] for s in self.socks]

@ray.remote(num_cpus=0)
def connect(address, ports):
    out = {}
    for port in ports:
        try:
            with socket.create_connection((address, port), timeout=5) as c:
                out[str(port)] = "connected" if c.recv(5) == b"hello" else "no greeting"
        except OSError as exc:
            out[str(port)] = f"failed: {exc}"
    return ray.util.get_node_ip_address(), out

pin = lambda node: NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
listener = Listener.options(scheduling_strategy=pin(gpu_nodes[0])).remote()
address, ports = ray.get(listener.where.remote())
client, results = ray.get(connect.options(scheduling_strategy=pin(gpu_nodes[1])).remote(address, ports))
print("RESULT " + json.dumps({"listener": address, "client": client, "ports": ports, "results": results,
                              "gpu_nodes": len(gpu_nodes)}), flush=True)
"""

# A task on every node tries to add a file to each directory given: what a job may write on the shared tree.
WRITE_PROBE = r"""
import json, os, sys, uuid
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

ray.init()

@ray.remote(num_cpus=0)
def attempt(paths):
    out = {}
    for path in paths:
        name = os.path.join(path, ".probe-" + uuid.uuid4().hex)
        try:
            with open(name, "x") as f:
                f.write("planted")
            os.unlink(name)
            out[path] = "written"
        except OSError as exc:
            out[path] = type(exc).__name__
    return ray.util.get_node_ip_address(), out

nodes = [n for n in ray.nodes() if n["Alive"]]
print("RESULT " + json.dumps(ray.get([attempt.options(
    scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(sys.argv[1:]) for n in nodes])),
    flush=True)
"""

# Tasks on every GPU node import a package that only the shared package directory holds.
OFFLINE_PACKAGE = r"""
import json, sys
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

ray.init()

@ray.remote(num_cpus=0)
def where():
    import einops
    return ray.util.get_node_ip_address(), einops.__version__, einops.__file__

nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")]
found = ray.get([where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
                 for n in nodes])
print("RESULT " + json.dumps(found), flush=True)
"""


@pytest.fixture(scope="module")
def jobs_api():
    """The head's Jobs API as a researcher reaches it: an SSH tunnel to its loopback, the stock Ray CLI."""
    if LAB is None:
        pytest.fail(f"lab {LAB_NAME!r} is not up: `make integration` converges the molecule lab, then runs these")
    with labtool.ssh_tunnel(LAB, LAB.nodes[0], 8265) as port:
        yield f"http://127.0.0.1:{port}"


def ray_cli(address: str, command: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`ray job COMMAND --address ADDRESS ARGS...` (the address before any `--` and entrypoint)."""
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(LAB.inventory_dir / ".secrets" / "ray_token"))
    return subprocess.run([RAY, "job", command, "--address", address, *args], capture_output=True, text=True,
                          env=env, timeout=timeout, check=False)


def run_job(address: str, entrypoint: str, working_dir: Path, *, runtime_env: dict | None = None,
            timeout: float = 600) -> tuple[str, str, float]:
    """Submit like `ray job submit --working-dir . -- python ...`, wait for the end: (status, logs, seconds)."""
    job_id = f"lab-{int(time.time() * 1000)}"
    args = ["--no-wait", "--submission-id", job_id, "--working-dir", str(working_dir)]
    if runtime_env:
        # Ray remembers a runtime env that failed to build; this one is new every time.
        args += ["--runtime-env-json", json.dumps({**runtime_env, "env_vars": {"RAYRACK_SUBMISSION": job_id}})]
    started = time.monotonic()
    submitted = ray_cli(address, "submit", *args, "--", *shlex.split(entrypoint))
    assert submitted.returncode == 0, submitted.stdout[-2000:] + submitted.stderr[-2000:]
    status = None
    while status is None:
        # "Job 'ID' succeeded" (or failed, stopped) once it has ended; "Status for job 'ID': RUNNING" before.
        out = re.sub(r"\x1b\[[0-9;]*m", "", ray_cli(address, "status", job_id).stdout)
        ended = re.search(rf"Job '{job_id}' (succeeded|failed|stopped)|job '{job_id}': (SUCCEEDED|FAILED|STOPPED)", out)
        status = (ended.group(1) or ended.group(2)).upper() if ended else None
        if status is None and time.monotonic() - started > timeout:
            ray_cli(address, "stop", job_id)
            status = f"still running after {timeout:.0f}s"
        time.sleep(0 if status else 3)
    logs = ray_cli(address, "logs", job_id).stdout
    return status, logs, time.monotonic() - started


def result(logs: str) -> dict:
    line = next((ln for ln in logs.splitlines() if ln.startswith("RESULT ")), None)
    assert line, logs[-4000:]
    return json.loads(line.removeprefix("RESULT "))


def accelerator_type() -> str:
    """Ray's name for the lab workers' simulated GPUs, as jobs write it. Ray names a node's accelerator type
    after its GPU 0: the H100 PCIe of lab-2gpu (and the H100s of demo-8gpu)."""
    from ray.util.accelerators import NVIDIA_H100

    return NVIDIA_H100


def probe_dir(tmp_path: Path, name: str, script: str) -> Path:
    (tmp_path / name).write_text(script)
    return tmp_path


def rendezvous(address: str, tmp_path: Path) -> tuple[str, dict]:
    status, logs, _ = run_job(address, f"python rendezvous.py {accelerator_type()}",
                              probe_dir(tmp_path, "rendezvous.py", RENDEZVOUS), timeout=180)
    return status, result(logs) if status == "SUCCEEDED" else {"logs": logs[-3000:]}


def train(address: str, name: str, timeout_s: int) -> tuple[str, str, float]:
    # Alice's scratch: hers and her jobs' (group ray), nobody else's.
    storage = f"{SHARED}/scratch/alice/train-{LAB.name}"
    return run_job(address, f"python train.py {storage} {name} {accelerator_type()} {timeout_s}", TRAIN_JOB,
                   timeout=900)


def test_two_workers_rendezvous_on_any_port(jobs_api, tmp_path):
    status, found = rendezvous(jobs_api, tmp_path)
    assert status == "SUCCEEDED", found
    # Ray schedules by its own accelerator name on both GPU nodes; the two actors are on different nodes.
    assert found["gpu_nodes"] == LAB.workers and found["listener"] != found["client"], found
    assert found["results"] == {str(port): "connected" for port in found["ports"]}, found


def test_a_ray_train_job_across_two_nodes_checkpoints_and_resumes_on_the_other_node(jobs_api):
    name = f"ddp-{int(time.time())}"
    status, logs, seconds = train(jobs_api, name, 120)
    assert status == "SUCCEEDED", logs[-6000:]
    found = result(logs)
    first, resumed = found["first"], found["resumed"]
    workers = {node.ip for node in LAB.nodes[1:]}
    assert first["world"] == 2 and set(first["nodes"]) == workers, first
    assert first["allreduce"] == 3.0, "the all-reduce did not add both ranks' values"
    assert found["checkpoint"].startswith(f"{SHARED}/scratch/"), found["checkpoint"]
    # The resumed run is on the node that did not write the checkpoint, and starts from its weights.
    assert resumed["nodes"] == [found["other"]] and found["other"] != found["rank0"], found
    assert resumed["started_at"] == first["step"] and resumed["restored"] == first["weights"], found
    print(f"\ntraining job (2 nodes, then resumed on 1): {seconds:.0f}s")


def converge_firewall(**settings: str) -> None:
    env = dict(os.environ, ANSIBLE_CACHE_PLUGIN_CONNECTION=str(LAB.inventory_dir / ".facts"))
    extra = ["-e", json.dumps(settings)] if settings else []
    done = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(LAB.inventory_dir),
                           "playbooks/network.yml", "--tags", "firewall_configure,firewall_service", *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-4000:]


@pytest.fixture(scope="class")
def pinned_with_a_management_address():
    """The strict firewall, and the head (the monitoring host) reached by Ansible at a second, management
    address while Ray and Prometheus use its cluster address (ansible_host != ray_node_ip)."""
    head = LAB.nodes[0]
    management = str(list(LAB.subnet.hosts())[199])
    host_vars = LAB.inventory_dir / "host_vars" / f"{head.name}.yml"
    known_hosts = LAB.known_hosts.read_text()
    key = next(line.split(None, 1)[1] for line in known_hosts.splitlines() if line.startswith(head.ip + " "))
    device = labtool.ssh(LAB, head, f"ip -o -4 addr show | awk '$4 ~ /^{head.ip}\\//{{print $2}}'").stdout.strip()
    labtool.ssh(LAB, head, f"sudo ip addr add {management}/{LAB.subnet.prefixlen} dev {device}")
    try:
        LAB.known_hosts.write_text(known_hosts + f"{management} {key}\n")
        host_vars.parent.mkdir(exist_ok=True)
        host_vars.write_text(json.dumps({"ansible_host": management, "ray_node_ip": head.ip}))
        converge_firewall(firewall_intra_cluster="pinned")
        yield
    finally:
        host_vars.unlink(missing_ok=True)
        LAB.known_hosts.write_text(known_hosts)
        converge_firewall()
        labtool.ssh(LAB, head, f"sudo ip addr del {management}/{LAB.subnet.prefixlen} dev {device}", check=False)


# Runs on the head as root: what Prometheus there does, from the same address: every node's node_exporter and
# agent answer. Prometheus' own targets of those jobs are asked after it, two scrape intervals after the reload.
SCRAPE_PROBE = r"""
import json, sys, time, urllib.request
reached = {}
for ip in sys.argv[1:]:
    for port in (9100, 9489):
        try:
            reached[f"{ip}:{port}"] = urllib.request.urlopen(f"http://{ip}:{port}/metrics", timeout=5).status
        except OSError as exc:
            reached[f"{ip}:{port}"] = str(exc)
time.sleep(12)
print("RESULT " + json.dumps({"reached": reached}))
"""


@pytest.mark.usefixtures("pinned_with_a_management_address")
class TestPinnedFirewall:
    """Under `firewall_intra_cluster: pinned`, with the head managed at another address than its cluster one."""

    def test_collectives_between_nodes_fail(self, jobs_api, tmp_path):
        status, found = rendezvous(jobs_api, tmp_path)
        assert status == "SUCCEEDED", found
        assert all(outcome.startswith("failed") for outcome in found["results"].values()), found
        status, logs, seconds = train(jobs_api, f"ddp-pinned-{int(time.time())}", 30)
        assert status == "FAILED", logs[-4000:]
        print(f"\ntraining under the pinned firewall failed after {seconds:.0f}s")

    def test_the_monitoring_host_scrapes_every_node_by_its_cluster_address(self):
        ips = [node.ip for node in LAB.nodes]
        out = labtool.ssh(LAB, LAB.nodes[0], "sudo python3 - " + " ".join(ips), input_text=SCRAPE_PROBE).stdout
        found = result(out)
        (up,) = labtool.prometheus(LAB, [("/api/v1/query", {"query": 'up{job=~"node|ray-agent"}'})])
        found["up"] = {r["metric"]["instance"]: r["value"][1] for r in up.get("data", {}).get("result", [])}
        assert set(found["reached"].values()) == {200}, found["reached"]
        assert found["up"] and set(found["up"].values()) == {"1"}, (found["up"], up)


def test_after_the_strict_mode_the_default_firewall_lets_collectives_through_again(jobs_api, tmp_path):
    status, found = rendezvous(jobs_api, tmp_path)
    assert status == "SUCCEEDED" and set(found["results"].values()) == {"connected"}, found


def test_runtime_env_packages_come_from_the_shared_package_directory_with_no_index(jobs_api, tmp_path):
    work = probe_dir(tmp_path, "offline.py", OFFLINE_PACKAGE)
    status, logs, seconds = run_job(jobs_api, "python offline.py", work, runtime_env={"pip": ["einops==0.8.1"]})
    assert status == "SUCCEEDED", logs[-4000:]
    found = result(logs)
    assert {ip for ip, _, _ in found} == {node.ip for node in LAB.nodes[1:]}, found
    assert all(version == "0.8.1" for _, version, _ in found), found
    print(f"\nruntime_env pip from the package directory on {len(found)} nodes: {seconds:.0f}s")
    # A version the directory does not hold cannot come from anywhere else: the nodes use no index.
    status, logs, _ = run_job(jobs_api, "python offline.py", work, runtime_env={"pip": ["einops==0.7.0"]})
    assert status == "FAILED", logs[-4000:]


def test_the_package_directory_is_roots_alone():
    for node in LAB.nodes:
        out = labtool.ssh(LAB, node, f"stat -c '%U %a' {SHARED}/packages; "
                                     f"sudo -u ray touch {SHARED}/packages/planted.whl; echo rc=$?", check=False)
        owner_mode, rc = out.stdout.split("\n")[0], out.stdout.strip().splitlines()[-1]
        assert owner_mode == "root 755" and rc != "rc=0", (node.name, out.stdout, out.stderr)


def test_a_job_writes_its_users_scratch_but_no_code_cache_or_users_code(jobs_api, tmp_path):
    refused = [f"{SHARED}/{path}" for path in ("wheelhouse", "models", "models/huggingface", "datasets",
                                                 "packages", "ray/working_dirs/alice", "ray/working_dirs/bob")]
    allowed = f"{SHARED}/scratch/alice"
    status, logs, _ = run_job(jobs_api, "python probe.py " + " ".join([*refused, allowed]),
                              probe_dir(tmp_path, "probe.py", WRITE_PROBE), timeout=180)
    assert status == "SUCCEEDED", logs[-4000:]
    found = dict(result(logs))
    assert set(found) == {node.ip for node in LAB.nodes}, found
    for node, outcome in found.items():
        assert outcome[allowed] == "written", (node, outcome)
        assert {path: outcome[path] for path in refused} == dict.fromkeys(refused, "PermissionError"), (node, outcome)

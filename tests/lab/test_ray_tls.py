"""What crosses the converged lab's network: Ray's traffic carries the cluster token only inside TLS.

The lab network's bridge is captured from the lab host (tcpdump) while a job runs tasks on a worker and a worker
asks the head's GCS for `ray status`: the token's bytes occur in no TCP stream. The control shows the test can
fail: a throwaway Ray head with TLS off (token auth on), started for the test on a worker, answers the same
`ray status` from the head, and the token then travels in clear. gRPC sends it as a literal header value (no
Huffman coding), so the token's own bytes are what is counted, in each TCP stream reassembled.

RAYRACK_LAB names another lab (default: molecule).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lab as labtool
import required
import wire

pytestmark = pytest.mark.lab

LAB_NAME = os.environ.get("RAYRACK_LAB", "molecule")
LAB = labtool.load(LAB_NAME)
GCS_PORT = 6379
ENV = "/etc/rayrack/ray.env"
CONTROL_UNIT = "rayrack-tls-control"
CONTROL_DIR = "/var/lib/rayrack/tls-control"

# Runs on the head as root: a job through the loopback Jobs API whose tasks run on the worker at argv[1], with an
# object passed back from there; prints the job's status and seconds.
JOB = r"""
import json, shlex, sys, time, urllib.request
token = open("/etc/rayrack/ray_token").read().strip()
entrypoint = "python -c " + shlex.quote(
    "import ray, sys\n"
    "from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as Pin\n"
    "ray.init()\n"
    "node = next(n for n in ray.nodes() if n['Alive'] and n['NodeManagerAddress'] == sys.argv[1])\n"
    "f = ray.remote(num_cpus=0)(lambda i: (ray.util.get_node_ip_address(), b'x' * 200000))\n"
    "out = ray.get([f.options(scheduling_strategy=Pin(node['NodeID'], soft=False)).remote(i) for i in range(4)])\n"
    "assert {ip for ip, _ in out} == {sys.argv[1]}, out\n"
    "print('TASKS-ON', sys.argv[1])\n") + " " + sys.argv[1]
def call(method, path, body=None):
    req = urllib.request.Request("http://127.0.0.1:8265" + path, method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=10))
started = time.monotonic()
job = call("POST", "/api/jobs/", {"entrypoint": entrypoint, "metadata": {"rayrack": "tls-test"}})["submission_id"]
status = "PENDING"
while status not in ("SUCCEEDED", "FAILED", "STOPPED") and time.monotonic() - started < 120:
    time.sleep(0.5)
    status = call("GET", "/api/jobs/" + job)["status"]
logs = call("GET", "/api/jobs/" + job + "/logs")["logs"]
print("RESULT " + json.dumps({"status": status, "seconds": round(time.monotonic() - started, 1), "logs": logs[-2000:]}))
"""


def on(node: labtool.Node, command: str, timeout: float = 120, input_text: str | None = None
       ) -> subprocess.CompletedProcess[str]:
    return labtool.ssh(LAB, node, f"timeout {int(timeout)} {command}", check=False, input_text=input_text)


def as_ray_client(command: str, **overrides: str) -> str:
    """COMMAND as the ray user with a Ray client's environment from the node's ray.env (token, TLS), changed by
    OVERRIDES."""
    extra = "".join(f"{name}={shlex.quote(value)}; " for name, value in overrides.items())
    return "sudo -u ray sh -c " + shlex.quote(f"set -a; . {ENV}; {extra}set +a; cd /var/lib/rayrack; {command}")


def bridge() -> str:
    """The host's interface of the lab's podman network."""
    res = labtool.podman("network", "inspect", LAB.network, capture=True)
    return json.loads(res.stdout)[0]["network_interface"]


@contextlib.contextmanager
def capture(directory: Path) -> Iterator[Path]:
    """tcpdump of every TCP packet on the lab's bridge while the block runs, into DIRECTORY; yields the pcap
    file, complete once the block has ended."""
    tcpdump = required.binary("tcpdump", "make host-deps installs it")
    pcap = directory / "bridge.pcap"
    # -Z root: it would otherwise drop to its own user, who cannot write into pytest's private directory.
    # --immediate-mode: each packet is read as it comes; buffered, the last second's would be lost at SIGTERM.
    proc = subprocess.Popen([tcpdump, "-i", bridge(), "--immediate-mode", "-U", "-s", "0", "-Z", "root",
                             "-w", str(pcap), "tcp"], stderr=subprocess.PIPE, text=True)
    try:
        # It says so on stderr once the capture has started.
        line = proc.stderr.readline()
        assert "listening on" in line, line + proc.stderr.read()
        yield pcap
    finally:
        time.sleep(0.5)
        proc.terminate()
        proc.wait(timeout=10)


def token() -> bytes:
    return (LAB.inventory_dir / ".secrets" / "ray_token").read_bytes().strip()


def new_connections(pcap: Path, server: str, port: int) -> list[bytes]:
    """What clients sent to SERVER:PORT on the connections opened during the capture, one entry each (those that
    sent nothing before the capture ended left out)."""
    streams = wire.streams(pcap)
    return [streams[flow] for flow in wire.opened(pcap)
            if flow.dst == server and flow.dport == port and streams.get(flow)]


@pytest.fixture(scope="module")
def lab():
    if LAB is None:
        pytest.fail(f"lab {LAB_NAME!r} is not up: `make integration` converges the molecule lab, then runs these")
    return LAB


def test_the_token_never_crosses_the_network_in_clear(lab, tmp_path):
    head, worker = lab.nodes[0], lab.nodes[1]
    with capture(tmp_path) as pcap:
        job = on(head, "sudo python3 - " + worker.ip, input_text=JOB)
        status = on(worker, as_ray_client(f"ray status --address {head.ip}:{GCS_PORT}"))
    result = json.loads(next(ln for ln in job.stdout.splitlines() if ln.startswith("RESULT ")).removeprefix("RESULT "))
    assert result["status"] == "SUCCEEDED" and f"TASKS-ON {worker.ip}" in result["logs"], result
    assert status.returncode == 0 and "Active:" in status.stdout, status.stdout[-2000:] + status.stderr[-2000:]

    # The capture saw the traffic: `ray status` reached the GCS, in a TLS handshake (a TLS record, not HTTP/2's
    # cleartext preface).
    sent = new_connections(pcap, head.ip, GCS_PORT)
    assert sent and all(data[:1] == b"\x16" for data in sent), [data[:24] for data in sent]
    found = wire.count(pcap, [token()])
    print(f"\ntoken occurrences on the bridge with Ray's TLS on: {sum(found.values())} "
          f"(job {result['seconds']}s, {len(wire.streams(pcap))} TCP streams)")
    assert found == {}, {str(flow): n for flow, n in found.items()}


def free_worker_ports(node: labtool.Node, count: int) -> list[int]:
    """COUNT ports of the node's pinned Ray worker range (as its unit names it) that nothing listens on, from the
    top: the firewall lets every node reach that range under either intra-cluster mode. Ray's workers pick their
    ports anywhere in it, so they are looked up now, not fixed."""
    unit = on(node, "systemctl cat ray-worker ray-head").stdout
    low, high = (int(re.search(rf"--{end}-worker-port=(\d+)", unit).group(1)) for end in ("min", "max"))
    listening = {int(line.split()[3].rsplit(":", 1)[1]) for line in on(node, "ss -Htln").stdout.splitlines()}
    free = [port for port in range(high, low - 1, -1) if port not in listening]
    assert len(free) >= count, f"{node.name}: only {len(free)} free ports in {low}-{high}"
    return free[:count]


@contextlib.contextmanager
def plain_ray_head(node: labtool.Node) -> Iterator[tuple[str, int]]:
    """A throwaway Ray head on NODE with token auth and TLS off, as a transient unit of the ray user (its own temp
    dir and ports, no dashboard), stopped and removed whatever happens. Yields its GCS address and port."""
    gcs, client, node_manager, objects, agent, agent_grpc, runtime_env, metrics, *workers = free_worker_ports(node, 12)
    args = ["ray", "start", "--head", "--block", f"--port={gcs}", f"--node-ip-address={node.ip}",
            "--include-dashboard=false", f"--ray-client-server-port={client}", f"--node-manager-port={node_manager}",
            f"--object-manager-port={objects}", f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
            f"--metrics-export-port={metrics}", f"--worker-port-list={','.join(map(str, workers))}",
            "--num-cpus=0", "--num-gpus=0", "--object-store-memory=80000000", "--disable-usage-stats",
            f"--temp-dir={CONTROL_DIR}"]
    script = f"set -a; . {ENV}; RAY_USE_TLS=0; set +a; exec " + " ".join(map(shlex.quote, args))
    unit = ["sudo", "systemd-run", f"--unit={CONTROL_UNIT}", "--uid=ray", "--gid=ray", "--collect",
            "-p", "WorkingDirectory=/var/lib/rayrack", "/bin/sh", "-c", script]
    try:
        started = on(node, " ".join(map(shlex.quote, unit)))
        assert started.returncode == 0, started.stderr
        deadline = time.monotonic() + 90
        while on(node, f"bash -c 'exec 3<>/dev/tcp/{node.ip}/{gcs}'", timeout=5).returncode != 0:
            state = on(node, f"systemctl is-active {CONTROL_UNIT}").stdout.strip()
            assert state in ("active", "activating") and time.monotonic() < deadline, (
                state, on(node, f"sudo journalctl -u {CONTROL_UNIT} --no-pager -n 40").stdout)
            time.sleep(1)
        yield f"{node.ip}:{gcs}", gcs
    finally:
        # A throwaway: killed outright (a clean `ray stop` of a head takes a minute here), every process of it.
        on(node, f"sudo systemctl kill --signal=SIGKILL {CONTROL_UNIT}")
        on(node, f"sudo systemctl stop {CONTROL_UNIT}", timeout=90)
        on(node, f"sudo systemctl reset-failed {CONTROL_UNIT}")
        on(node, f"sudo rm -rf {CONTROL_DIR}")


def test_with_tls_off_the_same_capture_finds_the_token(lab, tmp_path):
    """The control: without TLS, gRPC carries the token as a literal header value, and the count above would
    not be 0."""
    head, worker = lab.nodes[0], lab.nodes[1]
    with plain_ray_head(worker) as (address, port), capture(tmp_path) as pcap:
        # Without TLS towards this head, and with the head node's cluster token.
        status = on(head, as_ray_client(f"ray status --address {address}", RAY_USE_TLS="0"))
    # A fresh head may have no autoscaler report yet ("No cluster status"): the GCS answered all the same.
    assert status.returncode == 0, status.stdout[-2000:] + status.stderr[-2000:]
    sent = new_connections(pcap, worker.ip, port)
    assert sent and all(data.startswith(b"PRI * HTTP/2.0") for data in sent), [data[:24] for data in sent]
    found = wire.count(pcap, [token()])
    pcap.unlink()  # it holds the token in clear
    print(f"\ntoken occurrences on the bridge with TLS off (the control): {sum(found.values())}")
    assert sum(found.values()) > 0 and any(flow.dport == port for flow in found), found

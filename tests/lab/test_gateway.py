"""Researchers through the jobs gateway on the converged molecule lab, with the stock Ray CLI over TLS.

Each user is a plain Linux login on a worker, made by the converge (the firewall refuses the lab host: it is an
outsider), with their token in ~/.rayrack/token and the cluster CA the role installed. A job is the
submitter's: another user cannot stop it, an admin can. A revoked token is refused at once (the gateway
restarted, Ray not), and a user token opens neither Ray Client nor the GCS (refused at Ray's TLS handshake,
and for the token with a node's TLS).

RAYRACK_LAB names another lab (default: molecule).
"""

from __future__ import annotations

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
RAY = "/opt/rayrack/venv/bin/ray"
PYTHON = "/opt/rayrack/venv/bin/python"
# As the admin hands it out: the cluster CA from the controller (the nodes' copy is root's and Ray's alone).
CA = "~/.rayrack/ca.crt"
USERS = ("alice", "bob", "ops")
URL = f"https://{LAB.nodes[0].ip}:8443" if LAB else ""
# Ticks until stopped: long enough for every step below, short enough to end by itself if a step fails.
JOB = "import sys, time\nfor i in range(300):\n    print('tick', i, flush=True)\n    time.sleep(0.5)\n"


def node(name: str) -> labtool.Node:
    return next(n for n in LAB.nodes if n.name == name)


def on(where: str, command: str, *, input_text: str | None = None, timeout: float = 120
       ) -> subprocess.CompletedProcess[str]:
    return labtool.ssh(LAB, node(where), f"timeout {int(timeout)} {command}", check=False, input_text=input_text)


def as_user(user: str, command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """COMMAND in USER's login on worker1, the Ray CLI speaking to the gateway with the user's token."""
    # Unbuffered: a followed log is cut by `timeout`, and what it printed must not be lost with the process.
    script = (f"cd ~ && export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$HOME/.rayrack/token "
              f"RAY_ADDRESS={shlex.quote(URL)} && {command}")
    return on("worker1", f"sudo -u {user} -H bash -c {shlex.quote(script)}", timeout=timeout)


def ray_job(user: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`ray job COMMAND --verify CA ARGS...` (the option before any `--` and entrypoint)."""
    command, *rest = args
    return as_user(user, " ".join([RAY, "job", command, "--verify", CA, *map(shlex.quote, rest)]), timeout=timeout)


def plain(result: subprocess.CompletedProcess[str]) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", result.stdout + result.stderr)


def job_status(user: str, job_id: str) -> str:
    out = plain(ray_job(user, "status", job_id))
    match = re.search(r"job '[^']+': (\w+)|Job '[^']+' (?:was )?(succeeded|failed|stopped)", out)
    assert match, out[-2000:]
    return (match.group(1) or match.group(2)).upper()


def wait_status(user: str, job_id: str, states: set[str], timeout: float = 60) -> str:
    deadline, status = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        status = job_status(user, job_id)
        if status in states:
            return status
        time.sleep(1)
    raise AssertionError(f"job {job_id} is {status}, not {states} after {timeout:.0f}s")


def main_pid(where: str, unit: str) -> str:
    return on(where, f"systemctl show -p MainPID --value {unit}").stdout.strip()


def rayrack(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rayrack", "-i", str(LAB.inventory_dir), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)


def install(user: str, name: str, text: str) -> None:
    """~USER/.rayrack/NAME on worker1, written through stdin: a token never appears in a command line."""
    result = on("worker1", f"sudo -u {user} -H bash -c 'umask 077; mkdir -p ~/.rayrack; cat > ~/.rayrack/{name}'",
                input_text=text)
    assert result.returncode == 0, result.stderr


def install_token(user: str) -> None:
    install(user, "token", (LAB.inventory_dir / ".secrets" / "users" / f"{user}.token").read_text())


@pytest.fixture(scope="module")
def researchers():
    if LAB is None:
        pytest.fail(f"lab {LAB_NAME!r} is not up: `make integration` converges the molecule lab, then runs these")
    uids = {user["name"]: user["uid"] for user in labtool.LAB_USERS}
    for user in USERS:
        # The converge made each login with the inventory's uid.
        made = on("worker1", f"id -u {user}")
        assert made.returncode == 0 and made.stdout.strip() == str(uids[user]), (made.stdout, made.stderr)
        install_token(user)
        install(user, "ca.crt", (LAB.inventory_dir / ".secrets" / "ca" / "ca.crt").read_text())
    job_dir = "~/job"
    made = as_user("alice", f"mkdir -p {job_dir} && cat > {job_dir}/ticks.py << 'EOF'\n{JOB}EOF")
    assert made.returncode == 0, made.stderr
    yield
    # Leave bob as the lab's users file has him, whatever the test did.
    if not (LAB.inventory_dir / ".secrets" / "users" / "bob.token").exists():
        rayrack("user", "rotate", "bob")


@pytest.mark.usefixtures("researchers")
def test_owners_admins_and_a_revoked_token():
    submitted = ray_job("alice", "submit", "--no-wait", "--working-dir", "job", "--entrypoint-num-gpus", "1",
                        "--", "python", "ticks.py", timeout=90)
    out = plain(submitted)
    assert submitted.returncode == 0, out[-3000:]
    job_id = re.search(r"Job '([^']+)' submitted successfully", out).group(1)
    assert job_id.startswith("alice-raysubmit_")
    assert wait_status("alice", job_id, {"RUNNING"}) == "RUNNING"

    # Bob may see it, not stop it; bob's submissions are held to his max_gpus.
    refused = ray_job("bob", "stop", job_id)
    assert refused.returncode != 0 and f"job {job_id} belongs to alice" in plain(refused), plain(refused)[-2000:]
    assert job_status("bob", job_id) == "RUNNING"
    over = ray_job("bob", "submit", "--no-wait", "--entrypoint-num-gpus", "2", "--", "true")
    # Ray's client shows a 403's body (as an "Authentication failed"), which names the limit.
    assert over.returncode != 0 and "bob may ask for at most 1 GPUs" in plain(over), plain(over)[-2000:]

    # The owner follows the logs live (a websocket through the gateway).
    follow = ray_job("alice", "logs", "--follow", job_id, timeout=8)
    assert re.search(r"tick \d+", plain(follow)), plain(follow)[-2000:]

    listed = plain(ray_job("ops", "list"))
    assert job_id in listed and "'rayrack.user': 'alice'" in listed, listed[-2000:]
    stopped = ray_job("ops", "stop", job_id)
    assert stopped.returncode == 0, plain(stopped)[-2000:]
    assert wait_status("alice", job_id, {"STOPPED"}) == "STOPPED"

    # Revoked: bob's token is refused at once; the gateway restarted, Ray did not.
    head = LAB.nodes[0].name
    ray_pid, gateway_pid = main_pid(head, "ray-head"), main_pid(head, "rayrack-gateway")
    started = time.monotonic()
    revoked = rayrack("user", "revoke", "bob")
    assert revoked.returncode == 0, revoked.stdout[-3000:] + revoked.stderr[-3000:]
    print(f"rayrack user revoke bob: {time.monotonic() - started:.0f}s")
    denied = ray_job("bob", "list")
    assert denied.returncode != 0 and '{"error": "unauthorized"}' in plain(denied), plain(denied)[-2000:]
    assert main_pid(head, "ray-head") == ray_pid
    assert main_pid(head, "rayrack-gateway") != gateway_pid

    # Rotated: a new token works, the old one (on worker1) stays refused until it is replaced.
    rotated = rayrack("user", "rotate", "bob")
    assert rotated.returncode == 0, rotated.stdout[-3000:] + rotated.stderr[-3000:]
    assert '{"error": "unauthorized"}' in plain(ray_job("bob", "list"))
    install_token("bob")
    assert ray_job("bob", "list").returncode == 0


def handshake_failures() -> int:
    """TLS handshakes Ray's servers on the head refused so far (GCS, Ray Client: their logs). A head restarted with
    rayrack_gcs_ft keeps its session directory and writes gcs_server.1.err, .2, ...: every file counts."""
    logs = "/var/lib/rayrack/ray/session_latest/logs"
    out = on(LAB.nodes[0].name, f"sudo sh -c 'cat {logs}/gcs_server*.err {logs}/ray_client_server*.err'").stdout
    return out.count("Handshake failed")


@pytest.mark.usefixtures("researchers")
def test_a_user_token_opens_neither_ray_client_nor_the_gcs():
    """Ray's TLS is mutual: a researcher has no certificate the cluster CA signed and cannot read a node's key,
    so Ray's servers refuse the connection at the handshake, before any token is read. With a node's TLS
    identity (root's) and a user token, the token is refused: each layer holds alone."""
    head = LAB.nodes[0].ip
    # One connection attempt (Ray Client's default retries for half a minute); the cluster token, as the control,
    # connects with the same probe.
    probe = shlex.quote(f"from ray.util.client.worker import Worker; Worker('{head}:10001', connection_retries=1); "
                        "print('CONNECTED')")
    key = as_user("alice", "cat /etc/rayrack/tls/ray.key")
    assert key.returncode != 0 and "Permission denied" in plain(key), plain(key)[-2000:]
    refused = handshake_failures()
    client = as_user("alice", f"{PYTHON} -c {probe}", timeout=60)
    assert "CONNECTED" not in client.stdout and client.returncode != 0, plain(client)[-2000:]
    # Ray's GCS client retries a refused handshake until its own timeout (about a minute): 10 s show it.
    gcs = as_user("alice", f"{RAY} status --address {head}:6379", timeout=10)
    assert gcs.returncode != 0 and "Autoscaler status" not in gcs.stdout, plain(gcs)[-2000:]
    assert handshake_failures() > refused, "Ray's servers logged no refused TLS handshake for alice's attempts"

    # A node's TLS identity with alice's token: the token is what is refused.
    node_tls = "set -a; . /etc/rayrack/ray.env; set +a"
    user_token = f"RAY_AUTH_TOKEN_PATH=/home/alice/.rayrack/token {PYTHON} -c {probe}"
    client = on("worker1", "sudo sh -c " + shlex.quote(f"{node_tls}; cd /tmp; {user_token}"))
    assert "CONNECTED" not in client.stdout and client.returncode != 0, plain(client)[-2000:]
    gcs = on("worker1", "sudo sh -c " + shlex.quote(
        f"{node_tls}; cd /tmp; RAY_AUTH_TOKEN_PATH=/home/alice/.rayrack/token {RAY} status --address {head}:6379"))
    assert gcs.returncode != 0 and "InvalidAuthToken" in plain(gcs), plain(gcs)[-2000:]
    control = on("worker1", "sudo sh -c " + shlex.quote(f"{node_tls}; cd /tmp; {PYTHON} -c {probe}"))
    assert "CONNECTED" in control.stdout, plain(control)[-2000:]

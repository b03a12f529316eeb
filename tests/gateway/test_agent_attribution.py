"""The node agent's attribution against the real thing: a job alice submits through the gateway to a real Ray
head, its processes found by their environments, their owner from the gateway's job list over TLS."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import requests

from gateway.support import Account, Gateway, Pki, RayHead, run_sdk
from ray_agent.attribution import Attribution, RayStateClient
from ray_agent.config import AttributionConfig

pytestmark = pytest.mark.slow

# The driver (a submitted job's entrypoint) starts a child, as a training launcher would, and a Ray task; each
# writes its pid, then both sleep until the job is stopped.
JOB = """\
import os, subprocess, sys, time
import ray
ray.init()
out = sys.argv[1]
child = f"import os, time; open({out!r} + '/child', 'w').write(str(os.getpid())); time.sleep(120)"
subprocess.Popen([sys.executable, "-c", child])

@ray.remote(num_cpus=0)
def task():
    open(out + "/task", "w").write(str(os.getpid()))
    time.sleep(120)

ray.get(task.remote())
"""


def wait_pid(head: RayHead, submission: str, path: Path, timeout: float = 90) -> int:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().strip()):
        if time.monotonic() > deadline:
            logs = requests.get(f"{head.dashboard_url}/api/jobs/{submission}/logs",
                                headers={"Authorization": f"Bearer {head.token}"}, timeout=10).text
            raise AssertionError(f"{path.name} never started; the job's log: {logs[-3000:]}")
        time.sleep(0.2)
    return int(path.read_text())


def test_a_gateway_job_is_attributed_to_its_owner_by_job_id_and_submission_id(
    ray_head: RayHead, gateway: Gateway, pki: Pki, accounts: dict[str, Account], tmp_path: Path
) -> None:
    (tmp_path / "job.py").write_text(JOB)
    os.chmod(tmp_path, 0o755)
    submission = run_sdk(ray_head, gateway, accounts["alice"],
                         f"result = client.submit_job(entrypoint='{sys.executable} {tmp_path}/job.py {tmp_path}')")
    try:
        child, task = (wait_pid(ray_head, submission, tmp_path / name) for name in ("child", "task"))
        # The node's address as Ray registered it (not always the one given to `ray start`).
        node_ip = RayStateClient(ray_head.dashboard_url, ray_head.token_file, 10.0).list("nodes", [])[0]["node_ip"]
        attribution = Attribution(
            AttributionConfig(
                enabled=True,
                dashboard_url=ray_head.dashboard_url,
                state_api=True,
                gateway_url=gateway.url,
                ca_file=pki.ca_cert,
                token_file=ray_head.token_file,
                request_timeout=10.0,
            ),
            node_ip=node_ip,
        )
        deadline = time.monotonic() + 30
        while True:
            status = attribution.refresh()
            of_task, of_child = attribution.ray_identity(task), attribution.ray_identity(child)
            if status.success and of_task and of_task.task and of_child and of_child.job_id:
                break
            assert time.monotonic() < deadline, (status, of_task, of_child)
            time.sleep(1)
        # The task's worker: a worker Ray started before the job (RAY_JOB_ID=ffffffff in its environment) and
        # leased to it, so the job and the task's name come from the state API; owner and submission id from the
        # gateway's list.
        assert (of_task.user, of_task.submission_id, of_task.task) == ("alice", submission, "task")
        # The driver's child: the submission id from the job config Ray gives the driver, the job id from the list.
        assert (of_child.user, of_child.submission_id, of_child.job_id) == ("alice", submission, of_task.job_id)
        assert submission.startswith("alice-")
    finally:
        requests.post(f"{ray_head.dashboard_url}/api/jobs/{submission}/stop",
                      headers={"Authorization": f"Bearer {ray_head.token}"}, timeout=10)

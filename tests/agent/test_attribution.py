"""Ray attribution against a local HTTP server that answers like Ray's dashboard state API."""

from __future__ import annotations

import json
import os
import pwd
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from agent.support import (
    PROC_FIXTURE,
    LocalServer,
    QuietHandler,
    fake_sampler,
    sample_value,
    tls_server_context,
    write_token,
)
from ray_agent.attribution import Attribution, RayIdentity, identities_from_state
from ray_agent.clock import FakeClock
from ray_agent.config import AttributionConfig, ExporterConfig
from ray_agent.exporter import SnapshotCollector

NODE_IP = "127.0.0.1"
NODE_ID = "f" * 56
TOKEN = "cluster-secret-token"

STATE = {
    "nodes": [
        {"node_id": NODE_ID, "node_ip": NODE_IP, "state": "ALIVE", "is_head_node": True},
        {"node_id": "e" * 56, "node_ip": "127.0.0.2", "state": "ALIVE", "is_head_node": False},
    ],
    "actors": [
        {
            "actor_id": "a1",
            "class_name": "Trainer",
            "state": "ALIVE",
            "job_id": "02000000",
            "pid": 1001,
            "node_id": NODE_ID,
            "name": "",
        },
        {
            "actor_id": "a2",
            "class_name": "Elsewhere",
            "state": "ALIVE",
            "job_id": "02000000",
            "pid": 1001,
            "node_id": "e" * 56,
            "name": "",
        },
        {
            "actor_id": "a3",
            "class_name": "Gone",
            "state": "DEAD",
            "job_id": "01000000",
            "pid": 1003,
            "node_id": NODE_ID,
            "name": "",
        },
    ],
    "tasks": [
        {
            "task_id": "t1",
            "name": "Trainer.fit",
            "state": "RUNNING",
            "job_id": "02000000",
            "actor_id": "a1",
            "type": "ACTOR_TASK",
            "func_or_class_name": "Trainer.fit",
            "node_id": NODE_ID,
            "worker_pid": 1001,
        },
        {
            "task_id": "t2",
            "name": "preprocess",
            "state": "RUNNING",
            "job_id": "03000000",
            "actor_id": None,
            "type": "NORMAL_TASK",
            "func_or_class_name": "preprocess",
            "node_id": NODE_ID,
            "worker_pid": 1002,
        },
        {
            "task_id": "t3",
            "name": "finished",
            "state": "FINISHED",
            "job_id": "03000000",
            "actor_id": None,
            "type": "NORMAL_TASK",
            "func_or_class_name": "finished",
            "node_id": NODE_ID,
            "worker_pid": 1003,
        },
    ],
}


# The Jobs API's list: one job submitted through the gateway (its owner in the metadata), one not.
JOBS = [
    {
        "type": "SUBMISSION",
        "job_id": "02000000",
        "submission_id": "alice-raysubmit_aaaa",
        "status": "RUNNING",
        "entrypoint": "python train.py",
        "metadata": {"rayrack.user": "alice", "job_submission_id": "alice-raysubmit_aaaa"},
    },
    {
        "type": "SUBMISSION",
        "job_id": "03000000",
        "submission_id": "raysubmit_direct",
        "status": "RUNNING",
        "entrypoint": "python prep.py",
        "metadata": {},
    },
]


class RayDashboard(LocalServer):
    """Serves /api/v0/{nodes,actors,tasks} with Ray's envelope and filter semantics, the Jobs API's list
    (/api/jobs/) and the gateway's (/api/rayrack/jobs); may require a token."""

    def __init__(self, token: str | None = None, tls: ssl.SSLContext | None = None) -> None:
        self.token = token
        self.requests: list[str] = []
        self.slow_release = threading.Event()
        self.slow = False
        dashboard = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                dashboard.requests.append(self.path)
                if dashboard.slow:
                    dashboard.slow_release.wait(10)
                if dashboard.token and self.headers.get("Authorization") != f"Bearer {dashboard.token}":
                    self.reply(401, {"result": False, "msg": "Unauthorized", "data": {}})
                    return
                if parts.path == "/api/jobs/":
                    self.reply(200, JOBS)
                    return
                if parts.path == "/api/rayrack/jobs":
                    rows = [
                        {
                            "job_id": j["job_id"],
                            "submission_id": j["submission_id"],
                            "user": j["metadata"].get("rayrack.user", "unknown"),
                            "status": j["status"],
                            "start_time": None,
                            "end_time": None,
                            "entrypoint_num_gpus": None,
                        }
                        for j in JOBS
                    ]
                    self.reply(200, {"jobs": rows})
                    return
                resource = parts.path.removeprefix("/api/v0/")
                if resource not in STATE:
                    self.reply(404, {"result": False, "msg": "not found", "data": {}})
                    return
                query = parse_qs(parts.query)
                filters = zip(
                    query.get("filter_keys", []),
                    query.get("filter_predicates", []),
                    query.get("filter_values", []),
                    strict=True,
                )
                rows = STATE[resource]
                for key, predicate, value in filters:
                    assert predicate == "="
                    rows = [r for r in rows if str(r.get(key)).lower() == value.lower()]
                result = {
                    "total": len(rows),
                    "num_after_truncation": len(rows),
                    "num_filtered": len(rows),
                    "result": rows,
                    "partial_failure_warning": "",
                    "warnings": None,
                }
                self.reply(200, {"result": True, "msg": "", "data": {"result": result}})

        super().__init__(Handler, tls)

    def close(self) -> None:
        self.slow_release.set()
        super().close()


@pytest.fixture
def dashboard() -> Iterator[RayDashboard]:
    server = RayDashboard(token=TOKEN)
    yield server
    server.close()


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    return write_token(tmp_path / "auth_token", TOKEN)


def attribution_for(
    dashboard: RayDashboard,
    token_file: Path | None,
    clock: FakeClock | None = None,
    ttl: float = 10.0,
    proc_path: Path = Path("/proc"),
) -> Attribution:
    config = AttributionConfig(
        enabled=True, dashboard_url=dashboard.url, token_file=token_file, ttl=ttl, request_timeout=2.0
    )
    return Attribution(config, node_ip=NODE_IP, clock=clock or FakeClock(), proc_path=proc_path)


def test_identities_from_state_rows() -> None:
    found = identities_from_state(STATE["actors"][:1], STATE["tasks"][:2])
    assert found == {
        1001: RayIdentity(job_id="02000000", actor="Trainer", task="Trainer.fit"),
        1002: RayIdentity(job_id="03000000", actor="", task="preprocess"),
    }


def test_refresh_maps_pids_on_this_node_with_the_token(dashboard: RayDashboard, token_file: Path) -> None:
    # A /proc without pid directories: this host's real pid 1003 may descend from its real 1001.
    attribution = attribution_for(dashboard, token_file, proc_path=PROC_FIXTURE)
    status = attribution.refresh()
    assert status.success, status.error
    # The owner and submission id come from the job list: alice's job went through the gateway, 03000000 not.
    assert attribution.ray_identity(1001) == RayIdentity(
        "02000000", "Trainer", "Trainer.fit", "alice-raysubmit_aaaa", "alice"
    )
    assert attribution.ray_identity(1002) == RayIdentity("03000000", "", "preprocess", "raysubmit_direct", "unknown")
    assert attribution.ray_identity(1003) is None  # dead actor, finished task
    assert dashboard.requests[0] == "/api/jobs/"  # no gateway configured: the owners from the Jobs API
    nodes_request = dashboard.requests[1]
    assert nodes_request.startswith("/api/v0/nodes?") and "filter_values=127.0.0.1" in nodes_request
    assert any(r.startswith("/api/v0/tasks?") and "filter_values=RUNNING" in r for r in dashboard.requests)


def test_missing_token_is_reported(dashboard: RayDashboard) -> None:
    attribution = attribution_for(dashboard, None)
    status = attribution.refresh()
    assert not status.success and "HTTP 401" in status.error and "token" in status.error


def test_unreadable_token_file(dashboard: RayDashboard, tmp_path: Path) -> None:
    status = attribution_for(dashboard, tmp_path / "absent").refresh()
    assert not status.success and "cannot read token file" in status.error


def test_absent_ray_keeps_the_last_answer_until_it_is_stale(
    dashboard: RayDashboard, token_file: Path
) -> None:
    clock = FakeClock()
    attribution = attribution_for(dashboard, token_file, clock, ttl=10.0)
    assert attribution.refresh().success
    dashboard.close()
    assert not attribution.refresh().success
    assert attribution.ray_identity(1001) is not None
    clock.advance(31)
    assert attribution.ray_identity(1001) is None


def test_labels_reach_the_snapshot_and_users_come_from_proc(
    dashboard: RayDashboard, token_file: Path
) -> None:
    own_pid = os.getpid()
    STATE["tasks"].append(
        {
            "task_id": "t9",
            "name": "me",
            "state": "RUNNING",
            "job_id": "09000000",
            "actor_id": None,
            "type": "NORMAL_TASK",
            "func_or_class_name": "me",
            "node_id": NODE_ID,
            "worker_pid": own_pid,
        }
    )
    try:
        clock = FakeClock()
        attribution = attribution_for(dashboard, token_file, clock)
        assert attribution.refresh().success
        text = yaml.safe_dump(
            {
                "gpus": [
                    {
                        "model": "A",
                        "memory_total": "8GiB",
                        "processes": [
                            {"pid": 1001, "user": "alice", "memory": "1GiB"},
                            {"pid": own_pid, "memory": "2GiB"},  # no user given: looked up in /proc
                        ],
                    }
                ]
            }
        )
        sampler, _, _ = fake_sampler(text, clock=clock, attribution=attribution)
        snapshot = sampler.collect_once()
    finally:
        STATE["tasks"].pop()
    by_pid = {p.pid: p for p in snapshot.processes}
    assert (by_pid[1001].ray_job_id, by_pid[1001].ray_actor, by_pid[1001].ray_task) == (
        "02000000",
        "Trainer",
        "Trainer.fit",
    )
    # 1001's Linux user is alice (the scenario says so) and so is its job's owner in the job list.
    assert (by_pid[1001].user, by_pid[1001].os_user, by_pid[1001].submission_id) == (
        "alice",
        "alice",
        "alice-raysubmit_aaaa",
    )
    # A Ray task of a job the list does not know: owner unknown; the Linux user from /proc.
    assert by_pid[own_pid].user == "unknown"
    assert by_pid[own_pid].os_user == pwd.getpwuid(os.getuid()).pw_name
    # The exposition: both labels on the process, the job's info, and GPU shares by owner.
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: snapshot, ExporterConfig(hostname="n"), 60.0, clock))
    body = generate_latest(registry).decode()
    assert sample_value(body, "rayrack_gpu_process_memory_used_bytes", pid=str(own_pid), user="unknown",
                        os_user=pwd.getpwuid(os.getuid()).pw_name, ray_job_id="09000000") == 2 * 2**30
    assert sample_value(body, "rayrack_job_info", ray_job_id="02000000", submission_id="alice-raysubmit_aaaa",
                        user="alice") == 1
    assert sample_value(body, "rayrack_gpu_owner_share", user="unknown", ray_job_id="09000000") == 0.5
    assert sample_value(body, "rayrack_user_gpus", user="alice") == 1
    assert by_pid[own_pid].ray_task == "me"
    assert snapshot.collectors["attribution"].success


def test_slow_ray_never_blocks_collection(dashboard: RayDashboard, token_file: Path) -> None:
    dashboard.slow = True
    attribution = attribution_for(dashboard, token_file)
    attribution.start()
    try:
        sampler, _, _ = fake_sampler(
            yaml.safe_dump(
                {"gpus": [{"model": "A", "memory_total": "8GiB", "processes": [{"pid": 1001, "memory": 1}]}]}
            ),
            attribution=attribution,
        )
        snapshot = sampler.collect_once()
        # The collection finished while the first Ray request is still parked in the server.
        assert attribution.status is None
        assert snapshot.processes[0].ray_job_id == ""
        assert "attribution" not in snapshot.collectors
        dashboard.slow = False
        dashboard.slow_release.set()
        assert attribution.wait_for_refresh(1, timeout=10)
        assert sampler.collect_once().processes[0].ray_actor == "Trainer"
    finally:
        attribution.stop()


def fake_proc(root: Path, parents: dict[int, int]) -> Path:
    """A /proc with only `<pid>/stat` files, wired child -> parent (the comm has a space and a paren)."""
    for pid, parent in parents.items():
        (root / str(pid)).mkdir(parents=True)
        (root / str(pid) / "stat").write_text(f"{pid} (python (w) x) S {parent} {pid} {pid} 0 -1\n")
    return root


def test_a_child_of_a_ray_worker_belongs_to_its_job(dashboard: RayDashboard, token_file: Path, tmp_path: Path) -> None:
    # 1001 is the Trainer worker; 5000 its subprocess, 5001 a grandchild; 6000 descends from init only.
    proc = fake_proc(tmp_path, {5000: 1001, 5001: 5000, 6000: 1, 1001: 900, 900: 1})
    attribution = attribution_for(dashboard, token_file, proc_path=proc)
    assert attribution.refresh().success
    trainer = RayIdentity("02000000", "Trainer", "Trainer.fit", "alice-raysubmit_aaaa", "alice")
    assert attribution.ray_identity(5000) == trainer
    assert attribution.ray_identity(5001) == trainer
    assert attribution.ray_identity(6000) is None
    assert attribution.ray_identity(7000) is None  # no such process


def test_a_process_caught_inside_exec_is_read_again(
    dashboard: RayDashboard, token_file: Path, tmp_path: Path
) -> None:
    # Between exec's start and the new image's stack, /proc/<pid>/environ reads empty: not an answer to keep.
    proc = fake_proc(tmp_path, {4000: 1})
    (proc / "4000" / "environ").write_bytes(b"")
    attribution = attribution_for(dashboard, token_file, proc_path=proc)
    assert attribution.refresh().success
    assert attribution.ray_identity(4000) is None
    (proc / "4000" / "environ").write_bytes(b"PATH=/usr/bin\0RAY_JOB_ID=02000000\0")
    assert attribution.ray_identity(4000) == RayIdentity("02000000", submission_id="alice-raysubmit_aaaa", user="alice")


def test_ancestor_walk_is_bounded(dashboard: RayDashboard, token_file: Path, tmp_path: Path) -> None:
    chain = {7000 + i: 7000 + i + 1 for i in range(20)}
    chain[7020] = 1001
    proc = fake_proc(tmp_path, chain)
    attribution = attribution_for(dashboard, token_file, proc_path=proc)
    assert attribution.refresh().success
    assert attribution.ray_identity(7019) is not None  # two levels up
    assert attribution.ray_identity(7000) is None  # twenty levels up: not a child of that worker any more


# --- the job from the process's own environment ---------------------------------------------------


def ray_process(env: dict[str, str], children: int = 0) -> subprocess.Popen:
    """A real sleeping process with Ray's variables in its environment, and `children` levels of children."""
    code = "import time; time.sleep(60)"
    for _ in range(children):
        code = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {code!r}])"
    process = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **env})
    # Popen returns once exec began, which can be before the new environment is readable in /proc.
    environ = Path(f"/proc/{process.pid}/environ")
    deadline = time.monotonic() + 10
    while not environ.read_bytes():
        assert time.monotonic() < deadline, f"pid {process.pid} shows no environment"
        time.sleep(0.01)
    return process


def descendant(pid: int, depth: int, timeout: float = 10.0) -> int:
    """The pid `depth` generations below `pid`, once it exists."""
    deadline = time.monotonic() + timeout
    current = pid
    for _ in range(depth):
        while True:
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
            if children:
                current = int(children[0])
                break
            assert time.monotonic() < deadline, f"pid {current} started no child"
            time.sleep(0.02)
    return current


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        process.kill()
        process.wait()


def local_only(dashboard_url: str = "http://127.0.0.1:9", gateway_url: str | None = None) -> AttributionConfig:
    return AttributionConfig(
        enabled=True, dashboard_url=dashboard_url, state_api=False, gateway_url=gateway_url, request_timeout=2.0
    )


def test_a_ray_workers_job_comes_from_its_environment_without_any_dashboard(
    processes: list[subprocess.Popen],
) -> None:
    worker = ray_process({"RAY_JOB_ID": "02000000"}, children=1)
    idle_worker = ray_process({"RAY_JOB_ID": "ffffffff"})  # a prestarted worker not leased to a job
    processes += [worker, idle_worker]
    attribution = Attribution(local_only(), node_ip=NODE_IP)
    assert attribution.refresh().success  # nothing remote is configured, so nothing can fail
    child = descendant(worker.pid, 1)
    # No job list here: the job is known, its owner is not.
    assert attribution.ray_identity(worker.pid) == RayIdentity("02000000", user="unknown")
    assert attribution.ray_identity(child) == RayIdentity("02000000", user="unknown")
    assert attribution.ray_identity(idle_worker.pid) is None
    assert attribution.ray_identity(os.getpid()) is None


def driver_env(submission_id: str, metadata: dict[str, str]) -> dict[str, str]:
    """What Ray's job supervisor gives a submitted job's entrypoint (it removes RAY_JOB_ID)."""
    metadata = {"job_submission_id": submission_id, "job_name": submission_id, **metadata}
    config = {"runtime_env": {}, "metadata": metadata}
    return {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(config), "RAY_JOB_ID": ""}


def test_a_submitted_jobs_driver_is_known_by_its_submission_id(
    dashboard: RayDashboard, token_file: Path, processes: list[subprocess.Popen]
) -> None:
    driver = ray_process(driver_env("alice-raysubmit_aaaa", {"rayrack.user": "alice"}), children=1)
    processes.append(driver)
    attribution = attribution_for(dashboard, token_file, proc_path=Path("/proc"))
    assert attribution.refresh().success
    # The job id comes from the job list, where the submission id is.
    expected = RayIdentity("02000000", submission_id="alice-raysubmit_aaaa", user="alice")
    assert attribution.ray_identity(driver.pid) == expected
    assert attribution.ray_identity(descendant(driver.pid, 1)) == expected
    # Without any job list the driver still says who submitted it, through the gateway's metadata.
    offline = Attribution(local_only(), node_ip=NODE_IP)
    assert offline.ray_identity(driver.pid) == RayIdentity(submission_id="alice-raysubmit_aaaa", user="alice")


def gateway(pki: Path, token: str) -> RayDashboard:
    """A TLS server with the gateway's job list route, its certificate signed by the test CA."""
    return RayDashboard(token=token, tls=tls_server_context(pki))


def test_owners_come_from_the_gateway_over_verified_tls(
    pki: Path, token_file: Path, processes: list[subprocess.Popen], tmp_path: Path
) -> None:
    server = gateway(pki, TOKEN)
    try:
        worker = ray_process({"RAY_JOB_ID": "02000000"})
        processes.append(worker)
        attribution = Attribution(
            AttributionConfig(
                enabled=True,
                state_api=False,
                gateway_url=server.url,
                token_file=token_file,
                ca_file=pki / "ca.crt",
                request_timeout=2.0,
            ),
            node_ip=NODE_IP,
        )
        status = attribution.refresh()
        assert status.success, status.error
        assert server.requests == ["/api/rayrack/jobs"]
        assert attribution.ray_identity(worker.pid) == RayIdentity(
            "02000000", submission_id="alice-raysubmit_aaaa", user="alice"
        )
        # A certificate the configured CA did not sign is refused, and said so.
        (tmp_path / "other.crt").write_text((pki / "client.crt").read_text())
        untrusted = Attribution(
            AttributionConfig(
                enabled=True, state_api=False, gateway_url=server.url, token_file=token_file,
                ca_file=tmp_path / "other.crt", request_timeout=2.0,
            ),
            node_ip=NODE_IP,
        )
        status = untrusted.refresh()
        assert not status.success and "CERTIFICATE_VERIFY_FAILED" in status.error
        # The right CA put in its place is picked up by the running agent.
        (tmp_path / "other.crt").write_text((pki / "ca.crt").read_text())
        os.utime(tmp_path / "other.crt", ns=(1, 1))
        status = untrusted.refresh()
        assert status.success, status.error
    finally:
        server.close()


def test_a_job_the_list_does_not_know_yet_brings_the_next_refresh_forward(
    dashboard: RayDashboard, token_file: Path, processes: list[subprocess.Popen]
) -> None:
    config = AttributionConfig(
        enabled=True, dashboard_url=dashboard.url, token_file=token_file, state_api=True, ttl=3600.0
    )
    attribution = Attribution(config, node_ip=NODE_IP)
    attribution.start()
    try:
        assert attribution.wait_for_refresh(1, timeout=10)
        JOBS.append(dict(JOBS[0], job_id="0a000000", submission_id="alice-raysubmit_new"))
        worker = ray_process({"RAY_JOB_ID": "0a000000"})
        processes.append(worker)
        assert attribution.ray_identity(worker.pid).user == "unknown"  # not in the list fetched before it started
        # The hour-long ttl is cut short: the owner is known about a second later.
        assert attribution.wait_for_refresh(2, timeout=10)
        assert attribution.ray_identity(worker.pid).user == "alice"
    finally:
        JOBS.pop()
        attribution.stop()

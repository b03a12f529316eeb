"""Idle guard test helpers: scenario-driven samplers, a fake-clock driver, and real local HTTP servers.

`RayHead` answers like a Ray dashboard on 127.0.0.1: the state API rows attribution reads
(`/api/v0/{nodes,actors,tasks}`) and the Jobs API subset the guard uses (`GET /api/jobs/`,
`POST /api/jobs/<id>/stop`), with bearer-token checks. `WebhookReceiver` records posted JSON and can be
told to fail the first N deliveries.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from agent.support import SCENARIOS, LocalServer, QuietHandler
from ray_agent.attribution import Attribution
from ray_agent.clock import FakeClock
from ray_agent.config import AttributionConfig, CollectionConfig, GuardConfig, GuardStages
from ray_agent.gpu.fake import FakeBackend, load_scenario
from ray_agent.guard.tracker import Escalation, Observation, Tracker
from ray_agent.sampler import Sampler

NODE_IP = "127.0.0.1"
NODE_ID = "a" * 56
TOKEN = "guard-test-token"


def guard_config(tmp_path: Path, **overrides: Any) -> GuardConfig:
    """A 5-minute window, stages at 0 / 2 / 4 minutes after idle_held, dry-run unless told otherwise."""
    base = GuardConfig(
        enabled=True,
        window=300.0,
        min_samples=3,
        max_gap=60.0,
        stages=GuardStages(notify_after=0.0, stop_after=120.0, kill_after=240.0, kill_grace=2.0),
        webhook_retries=2,
        webhook_backoff=0.05,
        request_timeout=2.0,
        audit_log=tmp_path / "audit.jsonl",
        state_file=tmp_path / "state.json",
    )
    return replace(base, **overrides)


def scenario_sampler(
    name: str, clock: FakeClock, attribution: Attribution | None = None, proc_path: Path = Path("/proc")
) -> Sampler:
    backend = FakeBackend(load_scenario(SCENARIOS / name), clock, proc_path)
    return Sampler(
        backend,
        attribution,
        CollectionConfig(interval=10.0, call_timeout=1.0, backend_retry_interval=10.0),
        clock,
    )


@dataclass
class Trace:
    """What the tracker did at each step, in scenario seconds since the first collection."""

    observations: list[tuple[float, Observation]] = field(default_factory=list)

    @property
    def escalations(self) -> list[tuple[float, Escalation]]:
        return [(t, e) for t, o in self.observations for e in o.escalations]

    def fired(self, gpu: int) -> list[tuple[float, str]]:
        return [(t, e.stage) for t, e in self.escalations if e.gpu == gpu]

    def states(self, gpu: int) -> set[str]:
        return {track.state.value for _, o in self.observations for track in o.tracks if track.index == gpu}


def drive(sampler: Sampler, clock: FakeClock, tracker: Tracker, seconds: float, interval: float = 10.0) -> Trace:
    """Collect every `interval` of fake time for `seconds`, feeding each snapshot to the tracker."""
    trace = Trace()
    start = clock.monotonic()
    while True:
        t = clock.monotonic() - start
        if t > seconds:
            return trace
        trace.observations.append((t, tracker.observe(sampler.collect_once())))
        clock.advance(interval)


def attribution_for(head: RayHead, token_file: Path, clock: FakeClock, proc_path: Path = Path("/proc")) -> Attribution:
    # A long ttl: the fake clock jumps hours ahead and the test refreshes by hand.
    config = AttributionConfig(
        enabled=True, dashboard_url=head.url, token_file=token_file, ttl=86400.0, request_timeout=2.0
    )
    attribution = Attribution(config, node_ip=NODE_IP, proc_path=proc_path, clock=clock)
    status = attribution.refresh()
    assert status.success, status.error
    return attribution


class RayHead(LocalServer):
    def __init__(self, token: str | None = TOKEN) -> None:
        self.token = token
        self.actors: list[dict[str, Any]] = []
        self.tasks: list[dict[str, Any]] = []
        self.jobs: list[dict[str, Any]] = []
        self.stop_requests: list[str] = []
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        head = self

        class Handler(QuietHandler):
            def authorised(self) -> bool:
                if head.token and self.headers.get("Authorization") != f"Bearer {head.token}":
                    self.reply(401, b"Unauthorized")
                    return False
                return True

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                head.requests.append(("GET", parts.path))
                if not self.authorised():
                    return
                if parts.path == "/api/jobs/":
                    with head.lock:
                        self.reply(200, head.jobs)
                    return
                resource = parts.path.removeprefix("/api/v0/")
                rows = {"nodes": head.nodes(), "actors": head.actors, "tasks": head.tasks}.get(resource)
                if rows is None:
                    self.reply(404, b"not found")
                    return
                query = parse_qs(parts.query)
                filters = zip(query.get("filter_keys", []), query.get("filter_values", []), strict=True)
                for key, value in filters:
                    rows = [r for r in rows if str(r.get(key)) == value]
                self.reply(200, {"result": True, "msg": "", "data": {"result": {"result": rows}}})

            def do_POST(self) -> None:
                parts = urlsplit(self.path)
                head.requests.append(("POST", parts.path))
                if not self.authorised():
                    return
                if not (parts.path.startswith("/api/jobs/") and parts.path.endswith("/stop")):
                    self.reply(404, b"not found")
                    return
                wanted = unquote(parts.path.removeprefix("/api/jobs/").removesuffix("/stop"))
                with head.lock:
                    job = next((j for j in head.jobs if wanted in (j["submission_id"], j["job_id"])), None)
                    if job is None:
                        self.reply(404, f"Job {wanted} does not exist".encode())
                        return
                    if job["type"] != "SUBMISSION":
                        self.reply(400, b"Can only stop submission type jobs")
                        return
                    head.stop_requests.append(wanted)
                    running = job["status"] in ("PENDING", "RUNNING")
                    job["status"] = "STOPPED" if running else job["status"]
                self.reply(200, {"stopped": running})

        super().__init__(Handler)

    @staticmethod
    def nodes() -> list[dict[str, Any]]:
        return [{"node_id": NODE_ID, "node_ip": NODE_IP, "state": "ALIVE"}]

    def add_actor(self, pid: int, job_id: str, class_name: str) -> None:
        self.actors.append(
            {
                "actor_id": f"actor-{pid}",
                "class_name": class_name,
                "state": "ALIVE",
                "job_id": job_id,
                "pid": pid,
                "node_id": NODE_ID,
            }
        )

    def add_job(
        self, job_id: str, submission_id: str | None, metadata: dict[str, str] | None = None, entrypoint: str = ""
    ) -> None:
        # The shape of Ray's JobDetails rows (python/ray/dashboard/modules/job/common.py).
        self.jobs.append(
            {
                "type": "SUBMISSION" if submission_id else "DRIVER",
                "job_id": job_id,
                "submission_id": submission_id,
                "driver_info": None,
                "status": "RUNNING",
                "entrypoint": entrypoint,
                "message": None,
                "error_type": None,
                "start_time": 1700000000000,
                "end_time": None,
                "metadata": metadata or {},
                "runtime_env": {},
                "driver_agent_http_address": None,
                "driver_node_id": NODE_ID,
            }
        )


class WebhookReceiver(LocalServer):
    """Accepts JSON POSTs; the first `fail_first` answer with `fail_status`."""

    def __init__(self, fail_first: int = 0, fail_status: int = 503) -> None:
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.attempts: list[float] = []
        self.messages: list[dict[str, Any]] = []
        receiver = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                receiver.attempts.append(time.monotonic())
                if len(receiver.attempts) <= receiver.fail_first:
                    self.send_response(receiver.fail_status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                assert self.headers.get("Content-Type") == "application/json"
                receiver.messages.append(json.loads(body))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

        super().__init__(Handler)

"""Who owns a GPU process: its Linux user, its Ray job, the job's owner, and its Ray actor and task.

* The Ray job comes from the process itself, read locally from ``/proc/<pid>/environ`` of the process or its
  nearest Ray ancestor: Ray workers (tasks, actors) carry ``RAY_JOB_ID``; the driver of a submitted job (the
  entrypoint, and its children) carries ``RAY_JOB_CONFIG_JSON_ENV_VAR``, whose metadata holds the submission
  id (Ray removes ``RAY_JOB_ID`` from a driver's environment). This works on every node, dashboard or not,
  for drivers and their children and for workers Ray started for a job (a job with a runtime environment,
  such as a working_dir: every gateway submission made with the Ray CLI's --working-dir). A worker Ray
  started ahead of any job and leased to one later says ``RAY_JOB_ID=ffffffff``: its job comes from the state
  API only, so on a node without it such a worker's processes count as the Linux user's.
* The job's owner comes from the job list: rayrack-gateway's ``GET /api/rayrack/jobs`` (cluster token, TLS
  verified with the cluster CA), or, without a gateway, the dashboard's ``GET /api/jobs/`` where reachable.
  The owner is the job's ``metadata["rayrack.user"]``, stamped by the gateway; other jobs are "unknown".
* Actor and task names come from the dashboard's state API where it is reachable (the head, or every node
  when the dashboard listens on the cluster network).

Everything remote is fetched over plain HTTP(S) with ray_agent.ray_api (importing ray would cost more memory
than the whole agent) in a background thread every `ttl` and kept in dicts that lookups only read, so a slow or
absent Ray or gateway never delays a collection.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import quote, urlencode

from ray_agent.clock import Clock, SystemClock
from ray_agent.config import AttributionConfig
from ray_agent.ray_api import LIST_LIMIT, RayApi, RayApiError
from ray_agent.users import UNKNOWN_OWNER, job_owner

log = logging.getLogger(__name__)

# A mapping is dropped when this many refresh intervals pass without a successful refresh.
_STALE_AFTER_TTLS = 3
# How many parents up a GPU process may be from the Ray worker that started it.
_ANCESTOR_DEPTH = 8
# What Ray puts into the environments of its processes (src/ray/raylet, dashboard/modules/job).
_JOB_ID_ENV = "RAY_JOB_ID"
_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
_SUBMISSION_ID_KEY = "job_submission_id"
# JobID::Nil() in hex: a worker not (yet) leased to a job.
_NIL_JOB_ID = "ffffffff"
# Processes whose environment was read, by (pid, start time): a process's initial environment never changes.
_ENVIRON_CACHE_SIZE = 4096
# A job the list does not know yet makes the next refresh come early, but not more often than this.
_EARLY_REFRESH_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class RayIdentity:
    job_id: str = ""
    actor: str = ""
    task: str = ""
    submission_id: str = ""
    user: str = ""  # the job's owner; "unknown" for a Ray process whose job has no rayrack.user


@dataclass(frozen=True, slots=True)
class JobInfo:
    """One Ray job, from the Jobs API's list (`GET /api/jobs/`) or the gateway's (`GET /api/rayrack/jobs`)."""

    job_id: str
    submission_id: str
    type: str  # SUBMISSION (stoppable through the Jobs API) or DRIVER (ray.init() scripts); "" from the gateway
    status: str
    entrypoint: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    user: str = UNKNOWN_OWNER


@dataclass(frozen=True, slots=True)
class RefreshStatus:
    success: bool
    duration_seconds: float
    error: str = ""


class RayStateClient(RayApi):
    """Ray's Jobs and state APIs and rayrack-gateway's job list, through the one Ray HTTP client."""

    def list_jobs(self) -> list[JobInfo]:
        """The dashboard's Jobs API list, `GET /api/jobs/`."""
        path = "/api/jobs/"
        rows = self.get(path)
        if not isinstance(rows, list):
            raise RayApiError("expected a list of jobs", self.where("GET", path))
        jobs = []
        for row in rows:
            if not isinstance(row, dict):
                continue
            metadata = row.get("metadata") or {}
            metadata = {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}
            jobs.append(
                JobInfo(
                    job_id=str(row.get("job_id") or ""),
                    submission_id=str(row.get("submission_id") or ""),
                    type=str(row.get("type") or ""),
                    status=str(row.get("status") or ""),
                    entrypoint=str(row.get("entrypoint") or ""),
                    metadata=metadata,
                    user=job_owner(metadata),
                )
            )
        return jobs

    def gateway_jobs(self) -> list[JobInfo]:
        """rayrack-gateway's read-only list with each job's owner, `GET /api/rayrack/jobs`."""
        path = "/api/rayrack/jobs"
        body = self.get(path)
        rows = body.get("jobs") if isinstance(body, dict) else None
        if not isinstance(rows, list):
            raise RayApiError('expected {"jobs": [...]}', self.where("GET", path))
        return [
            JobInfo(
                job_id=str(row.get("job_id") or ""),
                submission_id=str(row.get("submission_id") or ""),
                type="",
                status=str(row.get("status") or ""),
                user=str(row.get("user") or UNKNOWN_OWNER),
            )
            for row in rows
            if isinstance(row, dict)
        ]

    def stop_job(self, submission_id: str) -> bool:
        """True when Ray stopped a running job, False when it was no longer running."""
        path = f"/api/jobs/{quote(submission_id, safe='')}/stop"
        answer = self.json("POST", path)
        if not isinstance(answer, dict) or not isinstance(answer.get("stopped"), bool):
            raise RayApiError('expected {"stopped": true|false}', self.where("POST", path))
        return answer["stopped"]

    def list(self, resource: str, filters: list[tuple[str, str, str]]) -> list[dict[str, Any]]:
        """GET /api/v0/<resource> with `key=value` filters; returns the rows."""
        query: list[tuple[str, str]] = [
            ("limit", str(LIST_LIMIT)),
            ("timeout", str(max(1, int(self.timeout)))),
        ]
        for key, predicate, value in filters:
            query += [("filter_keys", key), ("filter_predicates", predicate), ("filter_values", value)]
        path = f"/api/v0/{resource}?{urlencode(query)}"
        body = self.get(path)
        where = self.where("GET", path)
        try:
            if body["result"] is not True:
                raise RayApiError(body.get("msg") or "request failed", where)
            rows = body["data"]["result"]["result"]
        except (KeyError, TypeError):
            raise RayApiError("unexpected response shape", where) from None
        if not isinstance(rows, list):
            raise RayApiError("unexpected response shape", where)
        return rows

    def node_id(self, node_ip: str) -> str | None:
        rows = self.list("nodes", [("node_ip", "=", node_ip), ("state", "=", "ALIVE")])
        return str(rows[0]["node_id"]) if rows else None

    def identities(self, node_id: str) -> dict[int, RayIdentity]:
        on_node = ("node_id", "=", node_id)
        actors = self.list("actors", [on_node, ("state", "=", "ALIVE")])
        tasks = self.list("tasks", [on_node, ("state", "=", "RUNNING")])
        return identities_from_state(actors, tasks)


def identities_from_state(
    actors: list[dict[str, Any]], tasks: list[dict[str, Any]]
) -> dict[int, RayIdentity]:
    """pid -> Ray identity from state API rows: actors give the class, running tasks the task name."""
    actor_class = {a.get("actor_id"): a.get("class_name") or "" for a in actors}
    found: dict[int, RayIdentity] = {}
    for actor in actors:
        pid = actor.get("pid")
        if isinstance(pid, int) and pid > 0:
            found[pid] = RayIdentity(job_id=actor.get("job_id") or "", actor=actor.get("class_name") or "")
    # Sorted so that a worker running several tasks (async or threaded actors) gets a stable label.
    for task in sorted(tasks, key=lambda t: (str(t.get("name")), str(t.get("task_id")))):
        pid = task.get("worker_pid")
        if not isinstance(pid, int) or pid <= 0:
            continue
        current = found.get(pid)
        if current is not None and current.task:
            continue
        actor = actor_class.get(task.get("actor_id"), "") if task.get("actor_id") else ""
        found[pid] = RayIdentity(
            job_id=task.get("job_id") or (current.job_id if current else ""),
            actor=actor or (current.actor if current else ""),
            task=task.get("name") or task.get("func_or_class_name") or "",
        )
    return found


def _stat(proc_path: Path, pid: int) -> tuple[int, str] | None:
    """(parent pid, start time) from /proc/<pid>/stat; the comm may hold spaces and parentheses."""
    try:
        stat = (proc_path / str(pid) / "stat").read_text(encoding="utf-8", errors="replace")
        fields = stat.rsplit(")", 1)[1].split()
        return int(fields[1]), fields[19] if len(fields) > 19 else ""
    except (OSError, IndexError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class _LocalJob:
    """What a process's own environment says about its Ray job."""

    job_id: str = ""
    submission_id: str = ""
    owner: str = ""  # from a driver's job metadata; workers carry none


_NOT_RAY = _LocalJob()


def local_job(environ: Mapping[str, str]) -> _LocalJob | None:
    """A Ray worker's job id, or a submitted job's driver's submission id and owner; None: not a Ray process."""
    job_id = environ.get(_JOB_ID_ENV, "")
    if job_id and job_id != _NIL_JOB_ID:
        return _LocalJob(job_id=job_id)
    config = environ.get(_JOB_CONFIG_ENV)
    if config:
        try:
            metadata = json.loads(config).get("metadata") or {}
        except (ValueError, AttributeError):
            metadata = {}
        if isinstance(metadata, dict) and metadata.get(_SUBMISSION_ID_KEY):
            return _LocalJob(submission_id=str(metadata[_SUBMISSION_ID_KEY]), owner=job_owner(metadata))
    return None


def _read_environ(proc_path: Path, pid: int) -> dict[str, str] | None:
    try:
        raw = (proc_path / str(pid) / "environ").read_bytes()
    except OSError:
        return None  # gone, or another user's process
    environ = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            environ[key.decode(errors="replace")] = value.decode(errors="replace")
    return environ


@lru_cache(maxsize=256)
def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


class Attribution:
    """pid -> user and Ray identity, answered from memory and /proc."""

    def __init__(
        self,
        config: AttributionConfig,
        node_ip: str | None,
        proc_path: Path = Path("/proc"),
        clock: Clock | None = None,
        client: RayStateClient | None = None,
        gateway: RayStateClient | None = None,
    ) -> None:
        self.config = config
        self.node_ip = config.node_ip or node_ip
        self.proc_path = proc_path
        self._clock = clock or SystemClock()
        self._client = client or RayStateClient(
            config.dashboard_url, config.token_file, config.request_timeout, config.ca_file
        )
        self._gateway = gateway
        if gateway is None and config.gateway_url is not None:
            self._gateway = RayStateClient(
                config.gateway_url, config.token_file, config.request_timeout, config.ca_file
            )
        self._identities: Mapping[int, RayIdentity] = MappingProxyType({})
        self._refreshed_at: float | None = None
        self._jobs: Mapping[str, JobInfo] = MappingProxyType({})  # by job id and by submission id
        self._jobs_at: float | None = None
        self._environ: dict[tuple[int, str], _LocalJob] = {}
        self._node_id: str | None = None
        self._status: RefreshStatus | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._refreshed = threading.Condition()
        self._refresh_count = 0
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    def start(self) -> None:
        if not self.enabled or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="ray-attribution", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            # The fetch has its own timeout; waiting longer than that would only delay shutdown.
            self._thread.join(self.config.request_timeout * 4)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            # Early when a collection met a job the list did not have: its owner would be "unknown" until then.
            woken = self._wake.wait(self.config.ttl)
            self._wake.clear()
            if woken:
                self._stop.wait(_EARLY_REFRESH_SECONDS)

    def refresh(self) -> RefreshStatus:
        """Fetch the job list and Ray's view of this node once. Called by the background thread (and tests)."""
        started = self._clock.monotonic()
        errors = []
        try:
            self._refresh_jobs()
        except RayApiError as err:
            errors.append(str(err))
        if self.config.state_api:
            try:
                self._refresh_state()
            except RayApiError as err:
                errors.append(str(err))
        error = "; ".join(errors)
        status = RefreshStatus(not errors, self._clock.monotonic() - started, error)
        if errors and (self._status is None or self._status.success or self._status.error != error):
            log.warning("ray attribution incomplete: %s", error)
        if status.success and self._status is not None and not self._status.success:
            log.info("ray attribution available again")
        self._status = status
        with self._refreshed:
            self._refresh_count += 1
            self._refreshed.notify_all()
        return status

    def _refresh_jobs(self) -> None:
        if self._gateway is not None:
            jobs = self._gateway.gateway_jobs()
        elif self.config.state_api:
            jobs = self._client.list_jobs()
        else:
            return
        by_key: dict[str, JobInfo] = {}
        for job in jobs:
            for key in (job.job_id, job.submission_id):
                if key:
                    by_key[key] = job
        self._jobs = MappingProxyType(by_key)
        self._jobs_at = self._clock.monotonic()

    def _refresh_state(self) -> None:
        try:
            if not self.node_ip:
                raise RayApiError("this node's IP is unknown; set attribution.node_ip")
            if self._node_id is None:
                self._node_id = self._client.node_id(self.node_ip)
            identities = {} if self._node_id is None else self._client.identities(self._node_id)
        except RayApiError:
            # The node id may have changed with a Ray restart; look it up again next time.
            self._node_id = None
            raise
        self._identities = MappingProxyType(identities)
        self._refreshed_at = self._clock.monotonic()

    def wait_for_refresh(self, count: int, timeout: float) -> bool:
        """Block until at least `count` refreshes have finished (tests and start-up use this)."""
        with self._refreshed:
            return self._refreshed.wait_for(lambda: self._refresh_count >= count, timeout)

    @property
    def status(self) -> RefreshStatus | None:
        return self._status

    def _fresh(self, at: float | None) -> bool:
        return at is not None and self._clock.monotonic() - at <= self.config.ttl * _STALE_AFTER_TTLS

    def _local_job(self, pid: int, start_time: str) -> _LocalJob:
        key = (pid, start_time)
        found = self._environ.get(key)
        if found is None:
            environ = _read_environ(self.proc_path, pid)
            if environ == {}:
                # Caught inside exec: the new image's environment is not in place yet. Ask again next time.
                return _NOT_RAY
            found = (local_job(environ) if environ is not None else None) or _NOT_RAY
            if len(self._environ) >= _ENVIRON_CACHE_SIZE:
                self._environ.clear()
            self._environ[key] = found
        return found

    def job(self, key: str) -> JobInfo | None:
        """A job of the latest job list, by job id or submission id (None once the list is stale)."""
        return self._jobs.get(key) if key and self._fresh(self._jobs_at) else None

    def ray_identity(self, pid: int) -> RayIdentity | None:
        """The Ray job, its owner, actor and task of a process or its nearest Ray ancestor; None: not Ray's."""
        identities = self._identities if self._fresh(self._refreshed_at) else {}
        # A process started by a Ray worker (a training subprocess, a launcher's children) belongs to the
        # worker's job: walk up the parents until a Ray process, pid 1, or the depth limit.
        current = pid
        for _ in range(_ANCESTOR_DEPTH + 1):
            stat = _stat(self.proc_path, current)
            local = self._local_job(current, stat[1]) if stat is not None else _NOT_RAY
            state = identities.get(current)
            if local is not _NOT_RAY or state is not None:
                return self._identity(local, state)
            if stat is None or stat[0] <= 1:
                return None
            current = stat[0]
        return None

    def _identity(self, local: _LocalJob, state: RayIdentity | None) -> RayIdentity:
        job_id = local.job_id or (state.job_id if state else "")
        job = self.job(job_id) or self.job(local.submission_id)
        if job is None and (job_id or local.submission_id) and (self._gateway is not None or self.config.state_api):
            self._wake.set()
        return RayIdentity(
            job_id=job_id or (job.job_id if job else ""),
            actor=state.actor if state else "",
            task=state.task if state else "",
            submission_id=local.submission_id or (job.submission_id if job else ""),
            user=job.user if job else local.owner or UNKNOWN_OWNER,
        )

    def user(self, pid: int) -> str:
        """Linux user owning /proc/<pid>; empty when the process is gone or not visible here."""
        try:
            uid = os.stat(self.proc_path / str(pid)).st_uid
        except OSError:
            return ""
        return _user_name(uid)

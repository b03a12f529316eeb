"""Who owns a GPU process: its Linux user (from /proc) and its Ray job, actor and task.

Ray's identity comes from the dashboard's state API over plain HTTP (importing ray would cost more memory
than the whole agent). It is fetched in a background thread every `ttl` and kept in a dict that lookups only
read, so a slow or absent Ray never delays a collection.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlencode

from ray_agent.clock import Clock, SystemClock
from ray_agent.config import AttributionConfig

log = logging.getLogger(__name__)

# Ray caps list results at RAY_MAX_LIMIT_FROM_API_SERVER (10000 by default).
_LIST_LIMIT = 10_000
# A mapping is dropped when this many refresh intervals pass without a successful refresh.
_STALE_AFTER_TTLS = 3
# How many parents up a GPU process may be from the Ray worker that started it.
_ANCESTOR_DEPTH = 8


@dataclass(frozen=True, slots=True)
class RayIdentity:
    job_id: str = ""
    actor: str = ""
    task: str = ""


@dataclass(frozen=True, slots=True)
class RefreshStatus:
    success: bool
    duration_seconds: float
    error: str = ""


class RayStateError(Exception):
    pass


def read_token(token_file: Path | None) -> str | None:
    """The cluster token for `Authorization: Bearer`, read on every use so that a rotated token is picked up."""
    if token_file is None:
        return None
    try:
        token = token_file.read_text(encoding="utf-8").strip()
    except OSError as err:
        raise RayStateError(f"cannot read token file {token_file}: {err.strerror}") from None
    if not token:
        raise RayStateError(f"token file {token_file} is empty")
    return token


class RayStateClient:
    """Reads Ray's state API (`/api/v0/...`) with urllib; optional bearer token for Ray token auth."""

    def __init__(self, dashboard_url: str, token_file: Path | None, timeout: float) -> None:
        self.dashboard_url = dashboard_url.rstrip("/")
        self.token_file = token_file
        self.timeout = timeout

    def _token(self) -> str | None:
        return read_token(self.token_file)

    def list(self, resource: str, filters: list[tuple[str, str, str]]) -> list[dict[str, Any]]:
        """GET /api/v0/<resource> with `key=value` filters; returns the rows."""
        query: list[tuple[str, str]] = [
            ("limit", str(_LIST_LIMIT)),
            ("timeout", str(max(1, int(self.timeout)))),
        ]
        for key, predicate, value in filters:
            query += [("filter_keys", key), ("filter_predicates", predicate), ("filter_values", value)]
        request = urllib.request.Request(f"{self.dashboard_url}/api/v0/{resource}?{urlencode(query)}")
        token = self._token()
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = json.load(response)
        except urllib.error.HTTPError as err:
            hint = " (is the token right?)" if err.code in (401, 403) else ""
            raise RayStateError(f"{resource}: HTTP {err.code}{hint}") from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise RayStateError(f"{resource}: {reason}") from None
        except ValueError as err:
            raise RayStateError(f"{resource}: response is not JSON: {err}") from None
        try:
            if body["result"] is not True:
                raise RayStateError(f"{resource}: {body.get('msg') or 'request failed'}")
            rows = body["data"]["result"]["result"]
        except (KeyError, TypeError):
            raise RayStateError(f"{resource}: unexpected response shape") from None
        if not isinstance(rows, list):
            raise RayStateError(f"{resource}: unexpected response shape")
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


def _parent_pid(proc_path: Path, pid: int) -> int | None:
    try:
        stat = (proc_path / str(pid) / "stat").read_text(encoding="utf-8", errors="replace")
        return int(stat.rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


@lru_cache(maxsize=256)
def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


class Attribution:
    """pid -> user and Ray identity, answered from memory."""

    def __init__(
        self,
        config: AttributionConfig,
        node_ip: str | None,
        proc_path: Path = Path("/proc"),
        clock: Clock | None = None,
        client: RayStateClient | None = None,
    ) -> None:
        self.config = config
        self.node_ip = config.node_ip or node_ip
        self.proc_path = proc_path
        self._clock = clock or SystemClock()
        self._client = client or RayStateClient(
            config.dashboard_url, config.token_file, config.request_timeout
        )
        self._identities: Mapping[int, RayIdentity] = MappingProxyType({})
        self._refreshed_at: float | None = None
        self._node_id: str | None = None
        self._status: RefreshStatus | None = None
        self._stop = threading.Event()
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
        if self._thread is not None:
            # The fetch has its own timeout; waiting longer than that would only delay shutdown.
            self._thread.join(self.config.request_timeout * 4)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._stop.wait(self.config.ttl)

    def refresh(self) -> RefreshStatus:
        """Fetch Ray's view of this node once. Called by the background thread (and directly by tests)."""
        started = self._clock.monotonic()
        try:
            if not self.node_ip:
                raise RayStateError("this node's IP is unknown; set attribution.node_ip")
            if self._node_id is None:
                self._node_id = self._client.node_id(self.node_ip)
            identities = {} if self._node_id is None else self._client.identities(self._node_id)
            status = RefreshStatus(True, self._clock.monotonic() - started)
            self._identities = MappingProxyType(identities)
            self._refreshed_at = self._clock.monotonic()
        except RayStateError as err:
            # The node id may have changed with a Ray restart; look it up again next time.
            self._node_id = None
            status = RefreshStatus(False, self._clock.monotonic() - started, str(err))
            if self._status is None or self._status.success:
                log.warning("ray attribution unavailable: %s", err)
        if status.success and self._status is not None and not self._status.success:
            log.info("ray attribution available again")
        self._status = status
        with self._refreshed:
            self._refresh_count += 1
            self._refreshed.notify_all()
        return status

    def wait_for_refresh(self, count: int, timeout: float) -> bool:
        """Block until at least `count` refreshes have finished (tests and start-up use this)."""
        with self._refreshed:
            return self._refreshed.wait_for(lambda: self._refresh_count >= count, timeout)

    @property
    def status(self) -> RefreshStatus | None:
        return self._status

    def ray_identity(self, pid: int) -> RayIdentity | None:
        refreshed_at = self._refreshed_at
        if refreshed_at is None:
            return None
        if self._clock.monotonic() - refreshed_at > self.config.ttl * _STALE_AFTER_TTLS:
            return None
        identities = self._identities
        if not identities:
            return None
        # A process started by a Ray worker (a training subprocess, a launcher's children) belongs to the
        # worker's job: walk up the parents until a known worker, pid 1, or the depth limit.
        current: int | None = pid
        for _ in range(_ANCESTOR_DEPTH + 1):
            assert current is not None
            found = identities.get(current)
            if found is not None:
                return found
            current = _parent_pid(self.proc_path, current)
            if current is None or current <= 1:
                return None
        return None

    def user(self, pid: int) -> str:
        """Linux user owning /proc/<pid>; empty when the process is gone or not visible here."""
        try:
            uid = os.stat(self.proc_path / str(pid)).st_uid
        except OSError:
            return ""
        return _user_name(uid)

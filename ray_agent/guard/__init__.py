"""The idle-GPU guard: snapshots -> tracker -> policy -> actions -> audit log and metrics.

Each GPU's state (:mod:`ray_agent.gpu_state`) comes from :class:`GpuStates`, the tracker on its own, which
the agent runs whether or not the guard is enabled. With the guard, :meth:`Guard.observe` is the sampler
listener instead. It runs the same :class:`GpuStates` (pure, in memory), publishes an immutable
:class:`GuardSnapshot` for the exporter and hands due escalations and the state document to two worker
threads, so a slow webhook, Jobs API or disk never delays a collection:

* ``guard-actions`` carries out escalations one after another (see :mod:`ray_agent.guard.actions`);
* ``guard-state`` writes the state file whenever the runs change.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ray_agent.attribution import RayStateClient
from ray_agent.clock import Clock, SystemClock
from ray_agent.config import AttributionConfig, GuardConfig
from ray_agent.guard.actions import ActionRunner, Webhook
from ray_agent.guard.audit import AuditLog
from ray_agent.guard.tracker import Escalation, GpuTrack, Observation, StateFile, Tracker
from ray_agent.sampler import Snapshot
from ray_agent.users import User

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StateSnapshot:
    """Each GPU's state after the latest collection, and idle_held GPU-seconds since the agent started."""

    gpus: tuple[GpuTrack, ...] = ()
    # (user, ray job id) -> idle_held GPU-seconds
    idle_seconds_total: Mapping[tuple[str, str], float] = field(default_factory=lambda: MappingProxyType({}))


class GpuStates:
    """The tracker as a sampler listener: GPU states for the exporter, with the guard on or off.

    ``observe`` runs on the sampler's thread; ``latest`` may be called from any thread.
    """

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker
        self._lock = threading.Lock()
        self._idle_seconds: dict[tuple[str, str], float] = {}
        self._latest = StateSnapshot()

    def observe(self, snapshot: Snapshot) -> Observation:
        observation = self.tracker.observe(snapshot)
        with self._lock:
            for owner, seconds in observation.idle_seconds.items():
                self._idle_seconds[owner] = self._idle_seconds.get(owner, 0.0) + seconds
            self._latest = StateSnapshot(observation.tracks, MappingProxyType(dict(self._idle_seconds)))
        return observation

    def latest(self) -> StateSnapshot:
        return self._latest


@dataclass(frozen=True, slots=True)
class GuardSnapshot:
    """What the exporter shows about the guard's actions; counters are cumulative since the agent started."""

    dry_run: bool
    actions_total: Mapping[tuple[str, str, str], int]  # (stage, action, outcome) -> audit records
    webhook_failed_attempts_total: int
    audit_write_failures_total: int
    state_write_failures_total: int


class Guard:
    def __init__(
        self,
        config: GuardConfig,
        attribution: AttributionConfig,
        clock: Clock | None = None,
        host: str | None = None,
        proc_path: Path = Path("/proc"),
        users: tuple[User, ...] = (),
    ) -> None:
        self.config = config
        self._clock = clock or SystemClock()
        self._state_file = StateFile(config.state_file)
        self.states = GpuStates(Tracker(config, self._state_file.load()))
        self.tracker = self.states.tracker
        self.audit = AuditLog(config.audit_log)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._actions: dict[tuple[str, str, str], int] = {}
        self._webhook_failures = 0
        self._state_failures = 0
        self._latest = self._build_snapshot()

        jobs = (
            RayStateClient(
                attribution.dashboard_url, attribution.token_file, config.request_timeout, attribution.ca_file
            )
            if attribution.enabled and attribution.state_api
            else None
        )
        self.runner = ActionRunner(
            config,
            jobs,
            Webhook(config, self._stop, self._count_webhook_failure),
            self._record,
            host or socket.gethostname(),
            proc_path,
            self._clock.time,
            self._stop,
            users,
        )
        self._escalations: queue.Queue[Escalation | None] = queue.Queue()
        self._state_lock = threading.Condition()
        self._state_pending: dict[str, Any] | None = None
        self._state_written: dict[str, Any] | None = None
        self._threads: list[threading.Thread] = []

    # --- lifecycle ---

    def start(self) -> None:
        if self._threads:
            return
        self._threads = [
            threading.Thread(target=self._run_actions, name="guard-actions", daemon=True),
            threading.Thread(target=self._run_state, name="guard-state", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        log.info(
            "idle guard enabled%s: idle below %.0f%% (signal %s) for %gs -> %s",
            " (dry-run)" if self.config.dry_run else "",
            self.config.idle_threshold * 100,
            self.config.signal,
            self.config.window,
            describe_stages(self.config),
        )

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the workers; an action in progress (a webhook retry, a kill grace period) is cut short."""
        self._stop.set()
        self._escalations.put(None)
        with self._state_lock:
            self._state_lock.notify_all()
        for thread in self._threads:
            thread.join(timeout)

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until every escalation handed over so far is handled and the state is on disk (tests)."""
        done = threading.Event()

        def wait() -> None:
            self._escalations.join()
            done.set()

        threading.Thread(target=wait, daemon=True).start()
        if not done.wait(timeout):
            return False
        with self._state_lock:
            return self._state_lock.wait_for(lambda: self._state_pending is None, timeout)

    # --- the sampler listener ---

    def observe(self, snapshot: Snapshot) -> None:
        observation = self.states.observe(snapshot)
        for escalation in observation.escalations:
            self._escalations.put(escalation)
        document = self.tracker.state_document(snapshot)
        with self._state_lock:
            if document["runs"] != (self._state_written or {}).get("runs"):
                self._state_pending = document
                self._state_lock.notify_all()

    def latest(self) -> GuardSnapshot:
        return self._latest

    # --- workers ---

    def _run_actions(self) -> None:
        while True:
            escalation = self._escalations.get()
            try:
                if escalation is None:
                    return
                if not self._stop.is_set():
                    self.runner.handle(escalation)
            except Exception:
                log.exception("idle guard: handling %s for gpu %s failed", escalation.stage, escalation.gpu)
            finally:
                self._escalations.task_done()

    def _run_state(self) -> None:
        while True:
            with self._state_lock:
                self._state_lock.wait_for(lambda: self._state_pending is not None or self._stop.is_set())
                document = self._state_pending
            if document is not None:
                try:
                    self._state_file.save(document)
                except OSError as err:
                    with self._lock:
                        self._state_failures += 1
                        self._latest = self._build_snapshot()
                    log.error("idle guard: cannot write state file %s: %s", self.config.state_file, err)
            with self._state_lock:
                self._state_written = document
                if self._state_pending is document:
                    self._state_pending = None
                self._state_lock.notify_all()
                if self._stop.is_set() and self._state_pending is None:
                    return

    # --- counters ---

    def _record(self, record: dict[str, Any]) -> None:
        self.audit.write(record)
        key = (record["stage"], record["action"], record["outcome"])
        with self._lock:
            self._actions[key] = self._actions.get(key, 0) + 1
            self._latest = self._build_snapshot()

    def _count_webhook_failure(self) -> None:
        with self._lock:
            self._webhook_failures += 1
            self._latest = self._build_snapshot()

    def _build_snapshot(self) -> GuardSnapshot:
        return GuardSnapshot(
            dry_run=self.config.dry_run,
            actions_total=MappingProxyType(dict(self._actions)),
            webhook_failed_attempts_total=self._webhook_failures,
            audit_write_failures_total=self.audit.write_failures,
            state_write_failures_total=self._state_failures,
        )


def describe_stages(config: GuardConfig) -> str:
    stages = config.stages
    parts = []
    for name, delay in (("notify", stages.notify_after), ("stop", stages.stop_after), ("kill", stages.kill_after)):
        if delay is not None:
            parts.append(f"{name} after {delay:g}s")
    if stages.kill_after is not None:
        parts[-1] += f" (grace {stages.kill_grace:g}s)"
    return ", ".join(parts) or "no stages"

"""Per-GPU idle state machine over the snapshot stream, and its persistence across agent restarts.

Each snapshot puts every GPU in one of the states defined in :mod:`ray_agent.gpu_state`. Unknown and lost
count as active: they end an idle run and never lead to an action.

An idle run belongs to one GPU and one set of holding pids: a process arriving or leaving starts a new run.
Once a GPU is idle_held, each configured stage (notify, stop, kill) becomes due ``<stage>_after`` seconds
later and is emitted once per run as an :class:`Escalation`.

MIG: NVML does not report utilisation for a GPU in MIG mode (NOT_SUPPORTED), and memory held says nothing
about whether kernels run. Such a GPU is therefore ``unknown`` whenever processes hold it (the guard
abstains) and ``free`` when none do. The same holds for any GPU whose activity is not readable.

Activity is one value per sample, chosen by ``guard.signal`` in :func:`activity`: NVML's utilisation (the
fraction of time any kernel ran, so one tiny kernel after another reads as 100 %), or GPM's SM activity
(the fraction of SM cycles with work; Hopper and later). ``auto`` takes SM activity from GPUs that report
GPM and utilisation from the others; on a GPM GPU's first read after the agent (re)initialised NVML there is
no GPM interval yet, and that one sample is judged by utilisation. A GPM GPU whose GPM read failed is
unknown, as is every GPU without GPM under ``sm_active``.

Times are the sampler's monotonic clock while running; the state file stores wall-clock times so that a
restarted agent can continue an idle run (see :class:`StateFile`).
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray_agent.config import GuardConfig
from ray_agent.gpu.base import GpuSample
from ray_agent.gpu_state import LOST_ERRORS, GpuState
from ray_agent.sampler import GpuStatus, ProcessEntry, Snapshot

log = logging.getLogger(__name__)

STAGES = ("notify", "stop", "kill")
STATE_VERSION = 1
# Sample times are sums of floating-point steps: a window that ends exactly on a sample must not slip to the
# next one because of rounding.
_TOLERANCE_SECONDS = 1e-3


@dataclass(frozen=True, slots=True)
class Holder:
    """A process holding a GPU, with what attribution knew about it when the snapshot was taken."""

    pid: int
    user: str  # the owner (see ray_agent.sampler.ProcessEntry)
    ray_job_id: str = ""
    ray_actor: str = ""
    ray_task: str = ""
    used_memory_bytes: int | None = None
    os_user: str = ""
    submission_id: str = ""

    @classmethod
    def of(cls, entry: ProcessEntry) -> Holder:
        return cls(
            entry.pid,
            entry.user,
            entry.ray_job_id,
            entry.ray_actor,
            entry.ray_task,
            entry.used_memory_bytes,
            entry.os_user or entry.user,
            entry.submission_id,
        )


@dataclass(frozen=True, slots=True)
class GpuTrack:
    """What the guard thinks of one GPU after a snapshot."""

    index: int
    uuid: str
    state: GpuState
    idle_seconds: float = 0.0  # length of the current idle run (0 when there is none)
    stage: str = ""  # last stage emitted in this run
    holders: tuple[Holder, ...] = ()


@dataclass(frozen=True, slots=True)
class Escalation:
    """A stage that became due for an idle_held GPU. Handled once, by the action worker."""

    stage: str
    gpu: int
    uuid: str
    holders: tuple[Holder, ...]
    idle_seconds: float  # since the first idle sample of the run
    taken_at: float  # wall clock of the snapshot that made it due
    # Other GPUs on this node that are not idle_held, by the Ray job and pid holding them, so that a job
    # (or process) still computing elsewhere is not stopped for one idle GPU.
    active_jobs: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    active_pids: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    unreadable_gpus: tuple[int, ...] = ()  # GPUs whose holders are unknown this time


@dataclass(slots=True)
class _Run:
    uuid: str
    pids: frozenset[int]
    idle_since: float  # monotonic time of the first idle sample
    last_seen: float
    samples: int = 0
    held_since: float | None = None
    stages_done: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Observation:
    tracks: tuple[GpuTrack, ...]
    escalations: tuple[Escalation, ...]
    # Idle-held GPU-seconds added by this snapshot, by (user, Ray job id).
    idle_seconds: Mapping[tuple[str, str], float]


class Reading(enum.StrEnum):
    """One sample on its own, before the window is taken into account."""

    BUSY = "busy"
    IDLE = "idle"  # held, utilisation below the threshold
    FREE = "free"
    UNKNOWN = "unknown"
    LOST = "lost"


def activity(sample: GpuSample, signal: str) -> float | None:
    """The one activity value the guard compares with its threshold (guard.signal); None: unknown."""
    if signal == "utilization":
        return sample.utilization_ratio
    if sample.gpm is not None:
        return sample.gpm.sm_active_ratio
    if signal == "sm_active" or any(e.field == "gpm" for e in sample.field_errors):
        return None  # no GPM here, not yet, or its read failed
    return sample.utilization_ratio


def classify(status: GpuStatus, holders: tuple[Holder, ...], config: GuardConfig) -> Reading:
    sample = status.sample
    if not status.up and status.error is not None and status.error.name in LOST_ERRORS:
        return Reading.LOST
    if not status.up or sample is None or sample.processes is None:
        return Reading.UNKNOWN
    if not sample.processes:
        return Reading.FREE
    value = activity(sample, config.signal)
    if value is None:
        return Reading.UNKNOWN  # MIG or an unreadable field: abstain
    if not holders:
        # Processes listed but none made it into the snapshot (should not happen): do not guess.
        return Reading.UNKNOWN
    return Reading.IDLE if value < config.idle_threshold else Reading.BUSY


def _stage_delays(config: GuardConfig) -> tuple[tuple[str, float], ...]:
    stages = config.stages
    delays = (("notify", stages.notify_after), ("stop", stages.stop_after), ("kill", stages.kill_after))
    return tuple((name, delay) for name, delay in delays if delay is not None)


class Tracker:
    """Turns snapshots into GPU states and due escalations. Called from one thread only."""

    def __init__(self, config: GuardConfig, restored: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.config = config
        self._stages = _stage_delays(config)
        self._runs: dict[int, _Run] = {}
        # Runs read from the state file, by GPU uuid, waiting for the GPU's first observation.
        self._restored: dict[str, Mapping[str, Any]] = dict(restored or {})
        self._last_held: dict[int, float] = {}  # GPU -> monotonic time of the last idle_held sample

    def observe(self, snapshot: Snapshot) -> Observation:
        now = snapshot.taken_monotonic
        holders_by_gpu: dict[int, list[Holder]] = {}
        for entry in snapshot.processes:
            holders_by_gpu.setdefault(entry.gpu, []).append(Holder.of(entry))

        tracks: list[GpuTrack] = []
        due: list[tuple[_Run, GpuStatus, tuple[Holder, ...], str]] = []
        idle_seconds: dict[tuple[str, str], float] = {}
        seen: set[int] = set()
        for status in snapshot.gpus:
            seen.add(status.index)
            holders = tuple(sorted(holders_by_gpu.get(status.index, ()), key=lambda h: h.pid))
            reading = classify(status, holders, self.config)
            if reading is not Reading.IDLE:
                self._runs.pop(status.index, None)
                self._last_held.pop(status.index, None)
                self._restored.pop(status.uuid, None)
                tracks.append(GpuTrack(status.index, status.uuid, GpuState(reading.value), holders=holders))
                continue

            run = self._continue_run(status, holders, snapshot)
            run.samples += 1
            run.last_seen = now
            idle_for = now - run.idle_since
            confirmed = idle_for >= self.config.window - _TOLERANCE_SECONDS and run.samples >= self.config.min_samples
            if not confirmed:
                self._last_held.pop(status.index, None)
                tracks.append(GpuTrack(status.index, status.uuid, GpuState.BUSY, idle_for, holders=holders))
                continue
            if run.held_since is None:
                run.held_since = now
            previous = self._last_held.get(status.index)
            if previous is not None:
                _split(idle_seconds, holders, now - previous)
            self._last_held[status.index] = now
            for stage, delay in self._stages:
                if stage not in run.stages_done and now - run.held_since >= delay - _TOLERANCE_SECONDS:
                    run.stages_done.append(stage)
                    due.append((run, status, holders, stage))
            stage_done = run.stages_done[-1] if run.stages_done else ""
            tracks.append(GpuTrack(status.index, status.uuid, GpuState.IDLE_HELD, idle_for, stage_done, holders))

        for index in set(self._runs) - seen:
            del self._runs[index]
            self._last_held.pop(index, None)

        escalations = tuple(
            self._escalation(run, status, holders, stage, tracks, snapshot) for run, status, holders, stage in due
        )
        return Observation(tuple(tracks), escalations, idle_seconds)

    def _continue_run(self, status: GpuStatus, holders: tuple[Holder, ...], snapshot: Snapshot) -> _Run:
        now = snapshot.taken_monotonic
        pids = frozenset(h.pid for h in holders)
        run = self._runs.get(status.index)
        if (
            run is not None
            and run.uuid == status.uuid
            and run.pids == pids
            and now - run.last_seen <= self.config.max_gap
        ):
            return run
        restored = self._restore(status, pids, snapshot)
        run = restored or _Run(status.uuid, pids, idle_since=now, last_seen=now)
        self._runs[status.index] = run
        self._last_held.pop(status.index, None)
        return run

    def _restore(self, status: GpuStatus, pids: frozenset[int], snapshot: Snapshot) -> _Run | None:
        entry = self._restored.pop(status.uuid, None)
        if entry is None:
            return None
        try:
            saved_pids = frozenset(int(p) for p in entry["pids"])
            last_seen_wall = float(entry["last_seen"])
            idle_since_wall = float(entry["idle_since"])
            held_wall = entry.get("held_since")
            held_since_wall = None if held_wall is None else float(held_wall)
            samples = int(entry["samples"])
            stages_done = [str(s) for s in entry.get("stages_done", []) if s in STAGES]
        except (KeyError, TypeError, ValueError):
            log.warning("idle guard: ignoring a malformed saved run for GPU %s", status.uuid)
            return None
        gap = snapshot.taken_at - last_seen_wall
        if saved_pids != pids:
            log.info(
                "idle guard: GPU %d is held by other processes than before the restart; idle clock restarts",
                status.index,
            )
            return None
        if gap < 0 or gap > self.config.max_gap:
            log.info(
                "idle guard: saved idle run of GPU %d is %.0fs old (max_gap %gs); idle clock restarts",
                status.index,
                gap,
                self.config.max_gap,
            )
            return None

        def monotonic(wall: float) -> float:
            return snapshot.taken_monotonic - (snapshot.taken_at - wall)

        log.info(
            "idle guard: GPU %d continues an idle run of %.0fs from before the restart",
            status.index,
            snapshot.taken_at - idle_since_wall,
        )
        return _Run(
            status.uuid,
            pids,
            idle_since=monotonic(idle_since_wall),
            last_seen=monotonic(last_seen_wall),
            samples=samples,
            held_since=None if held_since_wall is None else monotonic(held_since_wall),
            stages_done=stages_done,
        )

    def _escalation(
        self,
        run: _Run,
        status: GpuStatus,
        holders: tuple[Holder, ...],
        stage: str,
        tracks: list[GpuTrack],
        snapshot: Snapshot,
    ) -> Escalation:
        active_jobs: dict[str, list[int]] = {}
        active_pids: dict[int, list[int]] = {}
        unreadable: list[int] = []
        for track in tracks:
            if track.index == status.index or track.state in (GpuState.IDLE_HELD, GpuState.FREE):
                continue
            if track.state in (GpuState.UNKNOWN, GpuState.LOST) and not track.holders:
                unreadable.append(track.index)
            for holder in track.holders:
                active_pids.setdefault(holder.pid, []).append(track.index)
                if holder.ray_job_id:
                    active_jobs.setdefault(holder.ray_job_id, []).append(track.index)
        return Escalation(
            stage=stage,
            gpu=status.index,
            uuid=status.uuid,
            holders=holders,
            idle_seconds=snapshot.taken_monotonic - run.idle_since,
            taken_at=snapshot.taken_at,
            active_jobs={k: tuple(v) for k, v in active_jobs.items()},
            active_pids={k: tuple(v) for k, v in active_pids.items()},
            unreadable_gpus=tuple(unreadable),
        )

    def state_document(self, snapshot: Snapshot) -> dict[str, Any]:
        """The runs in progress, in wall-clock time, for the state file."""

        def wall(monotonic: float) -> float:
            return round(snapshot.taken_at - (snapshot.taken_monotonic - monotonic), 3)

        runs = {
            run.uuid: {
                "gpu": index,
                "pids": sorted(run.pids),
                "idle_since": wall(run.idle_since),
                "last_seen": wall(run.last_seen),
                "held_since": None if run.held_since is None else wall(run.held_since),
                "samples": run.samples,
                "stages_done": list(run.stages_done),
            }
            for index, run in sorted(self._runs.items())
        }
        # Saved runs not yet matched to a GPU (the GPU was not readable since the restart) are kept.
        for uuid, entry in self._restored.items():
            runs.setdefault(uuid, dict(entry))
        return {"version": STATE_VERSION, "saved_at": round(snapshot.taken_at, 3), "runs": runs}


def _split(totals: dict[tuple[str, str], float], holders: Iterable[Holder], seconds: float) -> None:
    """Share one GPU's idle seconds among its distinct (user, job) owners, so the bill adds up to GPU time."""
    owners = sorted({(h.user, h.ray_job_id) for h in holders})
    for owner in owners:
        totals[owner] = totals.get(owner, 0.0) + seconds / len(owners)


class StateFile:
    """The tracker's runs on disk: JSON, replaced atomically (write a temporary file, fsync, rename)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, Mapping[str, Any]]:
        try:
            document = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            log.warning("idle guard: cannot read state file %s (%s); starting with no idle runs", self.path, err)
            return {}
        runs = document.get("runs") if isinstance(document, dict) else None
        if document.get("version") != STATE_VERSION or not isinstance(runs, dict):
            log.warning("idle guard: state file %s has an unknown format; starting with no idle runs", self.path)
            return {}
        return {str(k): v for k, v in runs.items() if isinstance(v, dict)}

    def save(self, document: Mapping[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(document, out, sort_keys=True)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

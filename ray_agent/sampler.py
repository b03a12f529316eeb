"""Background collection: GPU backend and attribution -> one immutable Snapshot per interval.

Every backend call runs in a worker thread ("lane") and is waited on for at most `call_timeout`. Each GPU
has its own lane, so a GPU whose call hangs is reported down (DEADLINE_EXCEEDED) while the others are
read normally; its lane stays occupied until the call returns, and only then is that GPU read again.
Readers of snapshots (the HTTP exporter, the idle guard) never touch the backend.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from queue import SimpleQueue
from types import MappingProxyType
from typing import Any, TypeVar

from ray_agent.attribution import Attribution
from ray_agent.clock import Clock, SystemClock
from ray_agent.config import CollectionConfig
from ray_agent.gpu.base import (
    DEADLINE_EXCEEDED,
    BackendInfo,
    ErrorInfo,
    ErrorScope,
    GpuBackend,
    GpuError,
    GpuSample,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

COLLECTOR_GPU = "gpu"
COLLECTOR_ATTRIBUTION = "attribution"
# Name for failures that are bugs or surprises rather than NVML errors; the exception is logged.
AGENT_ERROR = "AGENT_ERROR"


@dataclass(frozen=True, slots=True)
class CollectorStatus:
    success: bool
    duration_seconds: float


@dataclass(frozen=True, slots=True)
class BackendStatus:
    name: str
    up: bool
    driver_version: str = ""
    error: ErrorInfo | None = None
    init_failures_total: int = 0


@dataclass(frozen=True, slots=True)
class GpuStatus:
    index: int
    uuid: str  # empty when the GPU was never read successfully
    up: bool
    sample: GpuSample | None = None
    error: ErrorInfo | None = None


@dataclass(frozen=True, slots=True)
class ProcessEntry:
    """A process on a GPU. `user` is who answers for it: the Ray job's owner (the gateway's user, "unknown" for a
    job not submitted through it) for a Ray process, the Linux user for any other; `os_user` is always the
    Linux user."""

    gpu: int
    uuid: str
    pid: int
    used_memory_bytes: int | None
    user: str
    ray_job_id: str = ""
    ray_actor: str = ""
    ray_task: str = ""
    os_user: str = ""
    submission_id: str = ""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything one collection saw. Counters are cumulative since the agent started."""

    sequence: int
    taken_at: float  # wall-clock seconds
    taken_monotonic: float
    backend: BackendStatus
    gpus: tuple[GpuStatus, ...]
    processes: tuple[ProcessEntry, ...]
    collectors: Mapping[str, CollectorStatus]
    gpu_read_errors_total: Mapping[tuple[int, str], int]  # (gpu, error) -> count
    field_errors_total: Mapping[tuple[int, str, str], int]  # (gpu, field, error) -> count


class CallLane:
    """A single daemon worker thread that runs one call at a time and can be abandoned while it hangs."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: SimpleQueue[tuple[Future, Callable[[], Any]] | None] = SimpleQueue()
        self._pending: Future | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        return self._pending is not None and not self._pending.done()

    def submit(self, fn: Callable[[], T]) -> Future:
        if self.busy:
            raise RuntimeError(f"lane {self.name} is still running a call")
        future: Future = Future()
        self._pending = future
        self._jobs.put((future, fn))
        return future

    def close(self) -> None:
        self._jobs.put(None)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            future, fn = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as err:
                future.set_exception(err)


def _error_of(future: Future, what: str) -> ErrorInfo | None:
    err = future.exception()
    if err is None:
        return None
    if isinstance(err, GpuError):
        return ErrorInfo.from_gpu_error(err)
    log.error("unexpected failure in %s", what, exc_info=err)
    return ErrorInfo(AGENT_ERROR)


class Sampler:
    def __init__(
        self,
        backend: GpuBackend,
        attribution: Attribution | None,
        config: CollectionConfig,
        clock: Clock | None = None,
    ) -> None:
        self.backend = backend
        self.attribution = attribution
        self.config = config
        self._clock = clock or SystemClock()
        self._backend_lane = CallLane("gpu-backend")
        self._gpu_lanes: dict[int, CallLane] = {}
        self._backend_info: BackendInfo | None = None
        self._backend_error: ErrorInfo | None = None
        self._backend_needs_shutdown = False
        self._next_init_at = float("-inf")  # clock.monotonic() time of the next init attempt
        self._init_failures = 0
        self._known_uuids: dict[int, str] = {}
        self._gpu_read_errors: dict[tuple[int, str], int] = {}
        self._field_errors: dict[tuple[int, str, str], int] = {}
        self._sequence = 0
        self._latest: Snapshot | None = None
        self._published = threading.Condition()
        self._listeners: list[Callable[[Snapshot], None]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._collect_lock = threading.Lock()

    # --- reading snapshots -------------------------------------------------------------------------

    def latest(self) -> Snapshot | None:
        return self._latest

    def wait_for(self, sequence: int, timeout: float) -> Snapshot | None:
        """The first snapshot whose sequence is at least `sequence`, or None after `timeout` seconds."""
        with self._published:
            self._published.wait_for(
                lambda: self._latest is not None and self._latest.sequence >= sequence, timeout
            )
            latest = self._latest
        return latest if latest is not None and latest.sequence >= sequence else None

    def subscribe(self, listener: Callable[[Snapshot], None]) -> None:
        """Call `listener` with every new snapshot, from the sampler thread; it must return quickly."""
        self._listeners.append(listener)

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop collecting and shut the backend down, waiting no longer than the call timeout for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.config.interval + 2 * self.config.call_timeout + 1.0)
        with self._collect_lock:
            if self._backend_info is not None or self._backend_needs_shutdown:
                if not self._backend_lane.busy:
                    future = self._backend_lane.submit(self.backend.shutdown)
                    wait_futures([future], timeout=self.config.call_timeout)
                    if future.done() and future.exception() is not None:
                        log.warning("GPU backend shutdown failed: %s", future.exception())
                else:
                    log.warning("GPU backend still busy with a hung call; not shutting it down")
                self._backend_info = None
            for lane in (self._backend_lane, *self._gpu_lanes.values()):
                lane.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.collect_once()
            except Exception:
                log.exception("collection failed")
            self._stop.wait(max(0.0, self.config.interval - (time.monotonic() - started)))

    # --- one collection ----------------------------------------------------------------------------

    def collect_once(self) -> Snapshot:
        with self._collect_lock:
            collectors: dict[str, CollectorStatus] = {}

            started = self._clock.monotonic()
            gpus = self._collect_gpus()
            gpu_ok = self._backend_info is not None and all(g.up for g in gpus)
            collectors[COLLECTOR_GPU] = CollectorStatus(gpu_ok, self._clock.monotonic() - started)

            if (
                self.attribution is not None
                and self.attribution.enabled
                and self.attribution.status is not None
            ):
                status = self.attribution.status
                collectors[COLLECTOR_ATTRIBUTION] = CollectorStatus(status.success, status.duration_seconds)

            self._sequence += 1
            snapshot = Snapshot(
                sequence=self._sequence,
                taken_at=self._clock.time(),
                taken_monotonic=self._clock.monotonic(),
                backend=BackendStatus(
                    name=self.backend.name,
                    up=self._backend_info is not None,
                    driver_version=self._backend_info.driver_version if self._backend_info else "",
                    error=self._backend_error,
                    init_failures_total=self._init_failures,
                ),
                gpus=gpus,
                processes=self._processes(gpus),
                collectors=MappingProxyType(collectors),
                gpu_read_errors_total=MappingProxyType(dict(self._gpu_read_errors)),
                field_errors_total=MappingProxyType(dict(self._field_errors)),
            )
        with self._published:
            self._latest = snapshot
            self._published.notify_all()
        for listener in self._listeners:
            try:
                listener(snapshot)
            except Exception:
                log.exception("snapshot listener failed")
        return snapshot

    def _ensure_backend(self) -> None:
        if self._backend_info is not None:
            return
        now = self._clock.monotonic()
        if now < self._next_init_at or self._backend_lane.busy:
            return

        def reinit() -> BackendInfo:
            if self._backend_needs_shutdown:
                self._backend_needs_shutdown = False
                try:
                    self.backend.shutdown()
                except GpuError as err:
                    log.debug("shutdown before re-init failed: %s", err)
            return self.backend.init()

        future = self._backend_lane.submit(reinit)
        wait_futures([future], timeout=self.config.call_timeout)
        if future.done() and future.exception() is None:
            self._backend_info = future.result()
            if self._backend_error is not None:
                log.info("GPU backend %s is up again", self.backend.name)
            self._backend_error = None
            return
        error = _error_of(future, "backend init") if future.done() else ErrorInfo(DEADLINE_EXCEEDED)
        if error != self._backend_error:
            log.warning(
                "GPU backend %s unavailable: %s; retrying every %gs",
                self.backend.name,
                error.name,
                self.config.backend_retry_interval,
            )
        if not future.done():
            # If the abandoned init completes later, release it before the next attempt.
            self._backend_needs_shutdown = True
        self._backend_error = error
        self._init_failures += 1
        self._next_init_at = now + self.config.backend_retry_interval

    def _lane(self, index: int) -> CallLane:
        lane = self._gpu_lanes.get(index)
        if lane is None:
            lane = self._gpu_lanes[index] = CallLane(f"gpu-{index}")
        return lane

    def _collect_gpus(self) -> tuple[GpuStatus, ...]:
        self._ensure_backend()
        info = self._backend_info
        if info is None:
            # Degraded: GPUs seen earlier are reported down, none are invented.
            return tuple(
                GpuStatus(i, uuid, up=False, error=self._backend_error)
                for i, uuid in sorted(self._known_uuids.items())
            )

        results: dict[int, GpuStatus] = {}
        futures: dict[int, Future] = {}
        for index in range(info.device_count):
            lane = self._lane(index)
            if lane.busy:
                results[index] = self._down(index, ErrorInfo(DEADLINE_EXCEEDED))
            else:
                futures[index] = lane.submit(lambda i=index: self.backend.read_device(i))
        if futures:
            wait_futures(list(futures.values()), timeout=self.config.call_timeout)

        backend_error: ErrorInfo | None = None
        for index, future in futures.items():
            if not future.done():
                results[index] = self._down(index, ErrorInfo(DEADLINE_EXCEEDED))
                continue
            err = future.exception()
            if err is None:
                sample: GpuSample = future.result()
                self._known_uuids[index] = sample.uuid
                for field_error in sample.field_errors:
                    key = (index, field_error.field, field_error.error.name)
                    self._field_errors[key] = self._field_errors.get(key, 0) + 1
                results[index] = GpuStatus(index, sample.uuid, up=True, sample=sample)
                continue
            error = _error_of(future, f"reading GPU {index}")
            assert error is not None
            if isinstance(err, GpuError) and err.scope is ErrorScope.BACKEND:
                backend_error = error
            results[index] = self._down(index, error)

        if backend_error is not None:
            log.warning(
                "GPU backend %s failed: %s; re-initialising in %gs",
                self.backend.name,
                backend_error.name,
                self.config.backend_retry_interval,
            )
            self._backend_info = None
            self._backend_error = backend_error
            self._backend_needs_shutdown = True
            self._next_init_at = self._clock.monotonic() + self.config.backend_retry_interval
        return tuple(results[i] for i in sorted(results))

    def _down(self, index: int, error: ErrorInfo) -> GpuStatus:
        key = (index, error.name)
        self._gpu_read_errors[key] = self._gpu_read_errors.get(key, 0) + 1
        return GpuStatus(index, self._known_uuids.get(index, ""), up=False, error=error)

    def _processes(self, gpus: tuple[GpuStatus, ...]) -> tuple[ProcessEntry, ...]:
        entries = []
        attribution = self.attribution
        for status in gpus:
            if status.sample is None or not status.sample.processes:
                continue
            for process in status.sample.processes:
                os_user = process.user
                if os_user is None:
                    os_user = attribution.user(process.pid) if attribution is not None else ""
                identity = (
                    attribution.ray_identity(process.pid)
                    if attribution is not None and attribution.enabled
                    else None
                )
                entries.append(
                    ProcessEntry(
                        gpu=status.index,
                        uuid=status.uuid,
                        pid=process.pid,
                        used_memory_bytes=process.used_memory_bytes,
                        user=identity.user if identity else os_user,
                        ray_job_id=identity.job_id if identity else "",
                        ray_actor=identity.actor if identity else "",
                        ray_task=identity.task if identity else "",
                        os_user=os_user,
                        submission_id=identity.submission_id if identity else "",
                    )
                )
        return tuple(entries)

"""Collection through the sampler: error paths, hangs, recovery and degraded mode, on a fake clock."""

from __future__ import annotations

import yaml

from agent.support import fake_sampler
from ray_agent.gpu.base import DEADLINE_EXCEEDED, ErrorInfo


def scenario(faults: list[dict] | None = None, gpu_faults: list[dict] | None = None, **top: object) -> str:
    gpus = [
        {"model": "A", "memory_total": "8GiB", "processes": [{"pid": 11, "user": "alice", "memory": "1GiB"}]},
        {"model": "B", "memory_total": "8GiB", "faults": gpu_faults or []},
        {"model": "C", "memory_total": "8GiB"},
    ]
    return yaml.safe_dump({"gpus": gpus, "faults": faults or [], **top})


def test_healthy_snapshot() -> None:
    sampler, _, clock = fake_sampler(scenario())
    snapshot = sampler.collect_once()
    assert snapshot.sequence == 1
    assert snapshot.taken_at == clock.time()
    assert snapshot.backend.up and snapshot.backend.driver_version == "550.54.15"
    assert [g.up for g in snapshot.gpus] == [True, True, True]
    assert [(p.gpu, p.pid, p.user) for p in snapshot.processes] == [(0, 11, "alice")]
    # Host memory and CPU are node_exporter's: the agent does not collect them.
    assert {k: v.success for k, v in snapshot.collectors.items()} == {"gpu": True}
    assert sampler.latest() is snapshot


def test_not_supported_field_is_left_out_and_counted() -> None:
    sampler, _, _ = fake_sampler(scenario(gpu_faults=[{"call": "power", "error": "NOT_SUPPORTED"}]))
    sampler.collect_once()
    snapshot = sampler.collect_once()
    gpu = snapshot.gpus[1]
    assert gpu.up and gpu.sample.power_watts is None
    assert snapshot.field_errors_total == {(1, "power", "NOT_SUPPORTED"): 2}
    # A missing field is not a failed collection.
    assert snapshot.collectors["gpu"].success


def test_device_errors_take_one_gpu_down_and_it_recovers() -> None:
    for error in ("GPU_IS_LOST", "RESET_REQUIRED"):
        sampler, _, clock = fake_sampler(
            scenario(gpu_faults=[{"call": "device", "error": error, "from": "10s", "until": "20s"}])
        )
        first = sampler.collect_once()
        uuid = first.gpus[1].uuid
        clock.advance(10)
        down = sampler.collect_once()
        assert [g.up for g in down.gpus] == [True, False, True]
        assert down.gpus[1].sample is None and down.gpus[1].uuid == uuid
        assert down.gpus[1].error == ErrorInfo(error, 15 if error == "GPU_IS_LOST" else 16)
        assert down.gpu_read_errors_total == {(1, error): 1}
        assert not down.collectors["gpu"].success
        clock.advance(10)
        recovered = sampler.collect_once()
        assert [g.up for g in recovered.gpus] == [True, True, True]
        assert recovered.gpu_read_errors_total == {(1, error): 1}


def test_missing_library_runs_degraded_and_retries() -> None:
    for error, code in (("LIBRARY_NOT_FOUND", 12), ("DRIVER_NOT_LOADED", 9), ("LIB_RM_VERSION_MISMATCH", 18)):
        sampler, _, clock = fake_sampler(
            scenario(faults=[{"call": "init", "error": error, "until": "25s"}]), retry=10.0
        )
        degraded = sampler.collect_once()
        assert not degraded.backend.up
        assert degraded.backend.error == ErrorInfo(error, code)
        assert degraded.gpus == () and not degraded.collectors["gpu"].success
        assert degraded.backend.init_failures_total == 1
        # No new attempt before the retry interval has passed.
        clock.advance(5)
        assert sampler.collect_once().backend.init_failures_total == 1
        clock.advance(5)
        assert sampler.collect_once().backend.init_failures_total == 2
        clock.advance(20)
        recovered = sampler.collect_once()
        assert recovered.backend.up and recovered.backend.error is None
        assert [g.up for g in recovered.gpus] == [True, True, True]


def test_library_failure_mid_run_keeps_known_gpus_down_then_reinitialises() -> None:
    sampler, _, clock = fake_sampler(
        scenario(faults=[{"call": "any", "error": "DRIVER_NOT_LOADED", "from": "10s", "until": "15s"}]),
        retry=10.0,
    )
    healthy = sampler.collect_once()
    clock.advance(10)
    broken = sampler.collect_once()
    assert not broken.backend.up and broken.backend.error.name == "DRIVER_NOT_LOADED"
    assert [(g.up, g.uuid) for g in broken.gpus] == [(False, g.uuid) for g in healthy.gpus]
    clock.advance(5)
    still = sampler.collect_once()  # fault gone, but the retry interval has not passed
    assert not still.backend.up and [g.up for g in still.gpus] == [False] * 3
    clock.advance(5)
    again = sampler.collect_once()
    assert again.backend.up and [g.up for g in again.gpus] == [True] * 3


def test_hung_gpu_is_down_while_the_others_are_read() -> None:
    sampler, _, clock = fake_sampler(
        scenario(gpu_faults=[{"call": "utilization", "error": "hang", "from": "5s", "until": "60s"}]),
        call_timeout=0.2,
    )
    sampler.collect_once()
    clock.advance(5)
    hung = sampler.collect_once()
    assert [g.up for g in hung.gpus] == [True, False, True]
    assert hung.gpus[1].error == ErrorInfo(DEADLINE_EXCEEDED)
    # While the call is still stuck, that GPU is not read again (its lane is busy) and stays down.
    stuck = sampler.collect_once()
    assert [g.up for g in stuck.gpus] == [True, False, True]
    assert stuck.gpu_read_errors_total == {(1, DEADLINE_EXCEEDED): 2}
    clock.advance(60)
    # The hung call returns on its own once the fault clears; wait for that instead of sleeping.
    lane = sampler._gpu_lanes[1]
    lane._pending.result(timeout=5)
    recovered = sampler.collect_once()
    assert [g.up for g in recovered.gpus] == [True, True, True]
    sampler.stop()


def test_hung_init_is_abandoned_and_retried() -> None:
    sampler, _, clock = fake_sampler(
        scenario(faults=[{"call": "init", "error": "hang", "until": "10s"}]), call_timeout=0.2, retry=1.0
    )
    first = sampler.collect_once()
    assert not first.backend.up and first.backend.error == ErrorInfo(DEADLINE_EXCEEDED)
    clock.advance(10)
    sampler._backend_lane._pending.result(timeout=5)  # the hung init finishes once its window closes
    # That late success is not trusted: a fresh init runs after the retry interval.
    clock.advance(1)
    assert sampler.collect_once().backend.up


def test_listeners_and_wait_for() -> None:
    sampler, _, _ = fake_sampler(scenario(), interval=0.05)
    seen = []
    sampler.subscribe(lambda s: seen.append(s.sequence))
    sampler.start()
    try:
        third = sampler.wait_for(3, timeout=10)
        assert third is not None and third.sequence >= 3
    finally:
        sampler.stop()
    assert seen[:3] == [1, 2, 3]
    assert sampler.wait_for(10_000, timeout=0.01) is None


def test_stop_shuts_the_backend_down() -> None:
    sampler, backend, _ = fake_sampler(scenario())
    sampler.collect_once()
    sampler.stop()
    assert backend._closed.is_set()

"""The fake backend raises exactly what the NVML backend raises; the NVML backend is tried for real."""

from __future__ import annotations

import ctypes.util
import threading
import time

import pytest
import yaml

from ray_agent.clock import FakeClock
from ray_agent.gpu.base import NVML_ERROR_CODES, ErrorScope, GpuBackend, GpuError
from ray_agent.gpu.fake import FakeBackend, parse_scenario
from ray_agent.gpu.nvml import NvmlBackend

TWO_GPUS = {
    "gpus": [
        {"model": "A", "memory_total": "8GiB", "processes": [{"pid": 7, "user": "u", "memory": "1GiB"}]},
        {"model": "B", "memory_total": "8GiB"},
    ]
}


def backend_with(faults: list[dict], clock: FakeClock | None = None, **top: object) -> FakeBackend:
    return FakeBackend(
        parse_scenario(yaml.safe_dump({**TWO_GPUS, "faults": faults, **top})), clock or FakeClock()
    )


def test_both_backends_satisfy_the_interface() -> None:
    assert isinstance(NvmlBackend(), GpuBackend)
    assert isinstance(backend_with([]), GpuBackend)


@pytest.mark.parametrize(
    ("name", "code", "scope"),
    [
        ("NOT_SUPPORTED", 3, ErrorScope.FIELD),
        ("DRIVER_NOT_LOADED", 9, ErrorScope.BACKEND),
        ("LIBRARY_NOT_FOUND", 12, ErrorScope.BACKEND),
        ("GPU_IS_LOST", 15, ErrorScope.DEVICE),
        ("RESET_REQUIRED", 16, ErrorScope.DEVICE),
        ("LIB_RM_VERSION_MISMATCH", 18, ErrorScope.BACKEND),
    ],
)
def test_injected_error_carries_nvml_code_and_name(name: str, code: int, scope: ErrorScope) -> None:
    assert NVML_ERROR_CODES[name] == code
    backend = backend_with([{"call": "init", "error": name}])
    with pytest.raises(GpuError) as caught:
        backend.init()
    assert (caught.value.code, caught.value.name, caught.value.scope) == (code, name, scope)
    assert caught.value.call == "init"


def test_field_error_leaves_only_that_field_out() -> None:
    backend = backend_with([{"call": "power", "error": "NOT_SUPPORTED", "gpu": 1}])
    backend.init()
    healthy, partial = backend.read_device(0), backend.read_device(1)
    assert healthy.power_watts == 60.0 and not healthy.field_errors
    assert partial.power_watts is None
    assert partial.temperature_celsius == 40.0
    assert [(e.field, e.error.name, e.error.code) for e in partial.field_errors] == [
        ("power", "NOT_SUPPORTED", 3)
    ]


def test_device_error_fails_the_whole_read() -> None:
    backend = backend_with([{"call": "memory", "error": "GPU_IS_LOST", "gpu": 0}])
    backend.init()
    with pytest.raises(GpuError) as caught:
        backend.read_device(0)
    assert caught.value.scope is ErrorScope.DEVICE
    assert backend.read_device(1).model == "B"


def test_fault_window_appears_and_clears() -> None:
    clock = FakeClock()
    backend = backend_with(
        [{"call": "device", "error": "RESET_REQUIRED", "gpu": 0, "from": "10s", "until": "20s"}], clock
    )
    backend.init()
    backend.read_device(0)
    clock.advance(10)
    with pytest.raises(GpuError, match="RESET_REQUIRED"):
        backend.read_device(0)
    clock.advance(10)
    assert backend.read_device(0).index == 0


def test_repeating_window() -> None:
    clock = FakeClock()
    backend = backend_with(
        [{"call": "any", "error": 15, "gpu": 1, "from": "5s", "until": "6s", "every": "10s"}], clock
    )
    backend.init()
    failing_at = []
    for second in range(30):
        try:
            backend.read_device(1)
        except GpuError:
            failing_at.append(second)
        clock.advance(1)
    assert failing_at == [5, 15, 25]


def test_hang_blocks_until_the_window_ends() -> None:
    clock = FakeClock()
    backend = backend_with([{"call": "temperature", "error": "hang", "gpu": 0, "until": "30s"}], clock)
    backend.init()
    result: list[object] = []
    reader = threading.Thread(target=lambda: result.append(backend.read_device(0)))
    reader.start()
    reader.join(0.3)
    assert reader.is_alive() and not result  # still hanging: the clock has not moved
    clock.advance(30)
    reader.join(5)
    assert not reader.is_alive()
    assert result[0].temperature_celsius == 40.0


def test_shutdown_releases_a_hung_call() -> None:
    backend = backend_with([{"call": "device", "error": "hang", "gpu": 1}])
    backend.init()
    errors: list[GpuError] = []

    def read() -> None:
        try:
            backend.read_device(1)
        except GpuError as err:
            errors.append(err)

    reader = threading.Thread(target=read)
    reader.start()
    reader.join(0.2)
    assert reader.is_alive()
    backend.shutdown()
    reader.join(5)
    assert [e.name for e in errors] == ["UNINITIALIZED"]


def test_per_call_delay_is_applied() -> None:
    backend = backend_with([], delay="20ms")
    backend.init()
    started = time.monotonic()
    backend.read_device(0)
    # A read is a device call plus 11 field calls, each delayed; only a lower bound is meaningful.
    assert time.monotonic() - started >= 12 * 0.02


def test_traces_processes_and_counters_follow_scenario_time() -> None:
    clock = FakeClock()
    text = yaml.safe_dump(
        {
            "gpus": [
                {
                    "model": "A",
                    "memory_total": "10GiB",
                    "utilization": [{"for": "10s", "value": 0.2}, {"for": "10s", "value": 0.8}],
                    "nvlink_tx_bytes_per_second": 100,
                    "xids": [{"at": "15s", "code": 79}],
                    "processes": [
                        {"pid": 1, "user": "a", "memory": "1GiB"},
                        {"pid": 2, "user": "b", "memory": "2GiB", "from": "12s"},
                    ],
                }
            ]
        }
    )
    backend = FakeBackend(parse_scenario(text), clock)
    backend.init()
    first = backend.read_device(0)
    assert (first.utilization_ratio, first.nvlink_tx_bytes_total, first.xid_errors_total) == (0.2, 0, 0)
    assert first.memory_used_bytes == 2**30 and [p.pid for p in first.processes] == [1]
    clock.advance(16)
    later = backend.read_device(0)
    assert later.utilization_ratio == 0.8
    assert later.nvlink_tx_bytes_total == 1600
    assert (later.xid_errors_total, later.last_xid) == (1, 79)
    assert later.memory_used_bytes == 3 * 2**30
    assert later.memory_free_bytes == 7 * 2**30


def test_nvml_backend_for_real() -> None:
    """Without an NVIDIA driver the real library is missing: NVML's own LIBRARY_NOT_FOUND, wrapped."""
    backend = NvmlBackend()
    if ctypes.util.find_library("nvidia-ml") is None:
        with pytest.raises(GpuError) as caught:
            backend.init()
        assert (caught.value.code, caught.value.name) == (12, "LIBRARY_NOT_FOUND")
        assert caught.value.scope is ErrorScope.BACKEND
        return
    info = backend.init()
    try:
        assert info.device_count >= 0 and info.driver_version
        if info.device_count:
            sample = backend.read_device(0)
            assert sample.uuid.startswith(("GPU-", "MIG-")) and sample.memory_total_bytes
    finally:
        backend.shutdown()

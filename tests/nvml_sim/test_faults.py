"""Injected errors, hangs and delays: the library fails where the fake backend fails, with NVML's codes and
nvidia-ml-py's exception classes."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from nvml_sim.support import run_client, write_config
from ray_agent.clock import FakeClock
from ray_agent.gpu.base import DEVICE_CALL, FIELD_NAMES, NVML_ERROR_NAMES, GpuError
from ray_agent.gpu.fake import FakeBackend, parse_scenario, processes_assigned

A100 = {"model": "NVIDIA A100-SXM4-80GB", "memory_total": "80GiB"}
H100 = {"model": "NVIDIA H100 80GB HBM3", "memory_total": "80GiB", "gpm": True}  # GPM is read only where it is


def test_every_error_code_raises_the_matching_pynvml_exception(nvml_sim_library: Path, tmp_path: Path) -> None:
    codes = sorted(NVML_ERROR_NAMES)
    scenario = {"gpus": [{**A100, "faults": [{"call": "memory", "error": code}]} for code in codes]}
    config = tmp_path / "sim.conf"
    write_config(config, scenario)
    result = run_client(
        config,
        f"""
        pynvml.nvmlInit()
        result = []
        for index, code in enumerate({codes!r}):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            try:
                pynvml.nvmlDeviceGetMemoryInfo(handle)
                result.append([code, None, None, None])
            except pynvml.NVMLError as err:
                expected = type(pynvml.NVMLError(code))
                result.append([code, err.value, type(err).__name__, expected.__name__])
            # The fault is on memory only: the rest of the GPU still answers.
            pynvml.nvmlDeviceGetPowerUsage(handle)
        pynvml.nvmlShutdown()
        """,
    )
    assert len(result) == len(codes)
    for code, value, raised, expected in result:
        assert value == code, f"code {code} surfaced as {value}"
        assert raised == expected, f"code {code}: {raised} instead of {expected}"
    named = {code: raised for code, _, raised, _ in result}
    assert named[15] == "NVMLError_GpuIsLost" and named[9] == "NVMLError_DriverNotLoaded"
    assert named[3] == "NVMLError_NotSupported" and named[999] == "NVMLError_Unknown"


# One GPU per fault kind, plus windows that open and close, a top-level fault aimed at one GPU and an
# `any` fault: read by the agent's NVML backend through the library, and by the fake backend.
KINDS = (DEVICE_CALL, *FIELD_NAMES)
WINDOWED = {
    "gpus": [{**(H100 if kind == "gpm" else A100), "faults": [{"call": kind, "error": "NO_DATA"}]} for kind in KINDS]
    + [
        {
            **A100,
            "faults": [{"call": "power", "error": "NOT_SUPPORTED", "from": "10s", "until": "20s", "every": "60s"}],
        },
        {**A100, "unsupported": ["temperature", "ecc"]},
        {**A100, "processes": [{"pid": 7, "memory": "1GiB", "from": "10s", "until": "20s"}]},
        A100,
    ],
    "faults": [
        {"call": "any", "error": "GPU_IS_LOST", "gpu": len(KINDS) + 3, "from": "70s", "until": "80s"},
        {"call": "utilization", "error": "TIMEOUT", "gpu": len(KINDS) + 2, "until": "20s"},
    ],
}

READ_ALL = """
from ray_agent.gpu.nvml import NvmlBackend
from ray_agent.gpu.base import GpuError
import dataclasses
backend = NvmlBackend()
info = backend.init()
result = []
for index in range(info.device_count):
    try:
        sample = backend.read_device(index)
        result.append({"errors": [[e.field, e.error.code] for e in sample.field_errors],
                       "processes": [p.pid for p in sample.processes or ()]})
    except GpuError as err:
        result.append({"raised": err.code})
backend.shutdown()
"""


def fake_reads(text: str, t: float) -> list[dict]:
    clock = FakeClock()
    backend = FakeBackend(parse_scenario(text, "<test>"), clock)
    clock.advance(t)
    backend.init()
    reads = []
    for index in range(len(backend.scenario.gpus)):
        try:
            sample = backend.read_device(index)
        except GpuError as err:
            reads.append({"raised": err.code})
            continue
        reads.append(
            {
                "errors": [[e.field, e.error.code] for e in sample.field_errors],
                "processes": [p.pid for p in sample.processes or ()],
            }
        )
    return reads


@pytest.mark.parametrize("scenario_time", [5.0, 15.0, 45.0, 75.0])
def test_faults_match_the_fake_backend(nvml_sim_library: Path, tmp_path: Path, scenario_time: float) -> None:
    text = yaml.safe_dump(WINDOWED)
    config = tmp_path / "sim.conf"
    write_config(config, text, scenario_time)
    lib = run_client(config, READ_ALL)
    assert lib == fake_reads(text, scenario_time)
    # The test means something: every kind failed on its GPU, and the windows are where they should be.
    assert lib[0] == {"raised": 21}
    assert [r["errors"] for r in lib[1 : len(KINDS)]] == [[[kind, 21]] for kind in FIELD_NAMES]
    windowed = lib[len(KINDS)]["errors"]
    assert windowed == ([["power", 3]] if scenario_time in (15.0, 75.0) else [])
    assert lib[len(KINDS) + 3] == ({"raised": 15} if scenario_time == 75.0 else {"errors": [], "processes": []})


def test_init_fault_window(nvml_sim_library: Path, tmp_path: Path) -> None:
    scenario = {"faults": [{"call": "init", "error": "DRIVER_NOT_LOADED", "until": "20s"}], "gpus": [A100]}
    body = """
    try:
        pynvml.nvmlInit()
        result = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
    except pynvml.NVMLError_DriverNotLoaded:
        result = "DriverNotLoaded"
    """
    config = tmp_path / "sim.conf"
    write_config(config, scenario, 5.0)
    assert run_client(config, body) == "DriverNotLoaded"
    write_config(config, scenario, 25.0)
    assert run_client(config, body) == 1


def test_hang_until_the_window_ends_or_shutdown(nvml_sim_library: Path, tmp_path: Path) -> None:
    scenario = {"gpus": [{**A100, "faults": [{"call": "temperature", "error": "hang", "until": "3s"}]}]}
    config = tmp_path / "sim.conf"
    write_config(config, scenario, 0.0)
    result = run_client(
        config,
        """
        import threading
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        start = time.monotonic()
        # Shut down from another thread: the hung call must come back at once as uninitialised.
        threading.Timer(0.5, pynvml.nvmlShutdown).start()
        try:
            pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)
            released = "returned"
        except pynvml.NVMLError_Uninitialized:
            released = "uninitialized"
        released_after = time.monotonic() - start
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        start = time.monotonic()
        value = pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)
        result = [released, released_after, value, time.monotonic() - start, time.time()]
        pynvml.nvmlShutdown()
        """,
    )
    released, released_after, value, hung_for, _ = result
    assert released == "uninitialized" and 0.4 < released_after < 1.0
    # The window ends 3 s into the scenario; the client got there about 0.6 s in.
    assert value == 40 and 1.0 < hung_for < 3.0


def test_delays_per_scenario_and_per_gpu(nvml_sim_library: Path, tmp_path: Path) -> None:
    scenario = {"delay": "60ms", "gpus": [A100, {**A100, "delay": 0}]}
    config = tmp_path / "sim.conf"
    write_config(config, scenario)
    slow, fast = run_client(
        config,
        """
        pynvml.nvmlInit()
        result = []
        for index in (0, 1):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            calls = []
            for _ in range(5):
                start = time.monotonic()
                pynvml.nvmlDeviceGetPowerUsage(handle)
                calls.append(time.monotonic() - start)
            result.append(min(calls))
        pynvml.nvmlShutdown()
        """,
    )
    # The quickest of five calls: a busy machine only ever adds time, so the minimum shows the delay itself.
    assert 0.06 <= slow < 0.12
    assert fast < 0.03


def test_unmodelled_calls_are_not_supported(nvml_sim_library: Path, tmp_path: Path) -> None:
    config = tmp_path / "sim.conf"
    write_config(config, {"gpus": [A100]})
    result = run_client(
        config,
        """
        result = {}
        def outcome(fn, *args):
            try:
                fn(*args)
                return "ok"
            except pynvml.NVMLError as err:
                return type(err).__name__
        pynvml._LoadNvmlLibrary()
        result["before_init"] = outcome(pynvml.nvmlDeviceGetCount)
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        for fn in (pynvml.nvmlDeviceGetBAR1MemoryInfo, pynvml.nvmlDeviceGetPersistenceMode,
                   pynvml.nvmlDeviceGetVbiosVersion, pynvml.nvmlDeviceGetPowerManagementLimit,
                   pynvml.nvmlDeviceGetSerial):
            result[fn.__name__] = outcome(fn, handle)
        pynvml.nvmlShutdown()
        result["after_shutdown"] = outcome(pynvml.nvmlDeviceGetPersistenceMode, handle)
        """,
    )
    assert result.pop("before_init") == "NVMLError_Uninitialized"
    assert result.pop("after_shutdown") == "NVMLError_Uninitialized"
    assert set(result.values()) == {"NVMLError_NotSupported"}, result


def test_missing_or_broken_configuration(nvml_sim_library: Path, tmp_path: Path) -> None:
    body = """
    try:
        pynvml.nvmlInit()
        result = "ok"
    except pynvml.NVMLError as err:
        result = type(err).__name__
    """
    assert run_client(tmp_path / "absent.conf", body) == "NVMLError_DriverNotLoaded"
    broken = tmp_path / "broken.conf"
    broken.write_text("gpus: []\n")
    assert run_client(broken, body) == "NVMLError_Unknown"
    truncated = tmp_path / "truncated.conf"
    write_config(truncated, {"gpus": [A100]})
    truncated.write_text(truncated.read_text().replace("\nend\n", "\n"))
    assert run_client(truncated, body) == "NVMLError_Unknown"


def test_xid_events_arrive_when_due(nvml_sim_library: Path, tmp_path: Path) -> None:
    scenario = {"gpus": [{**A100, "xids": [{"at": "2s", "code": 79}, {"at": "1h", "code": 31}]}]}
    config = tmp_path / "sim.conf"
    epoch = write_config(config, scenario, 1.0)
    result = run_client(
        config,
        """
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        events = pynvml.nvmlEventSetCreate()
        pynvml.nvmlDeviceRegisterEvents(handle, pynvml.nvmlEventTypeXidCriticalError, events)
        def wait(ms):
            try:
                data = pynvml.nvmlEventSetWait_v2(events, ms)
                return [data.eventType, data.eventData, time.time()]
            except pynvml.NVMLError_Timeout:
                return ["timeout", None, time.time()]
        result = [wait(0), wait(5000), wait(0)]
        pynvml.nvmlEventSetFree(events)
        pynvml.nvmlShutdown()
        """,
    )
    first, second, third = result
    assert first[0] == "timeout" and first[2] - epoch < 2.0
    assert second[:2] == [8, 79] and 2.0 <= second[2] - epoch < 2.5
    assert third[0] == "timeout"


def test_processes_from_cuda_visible_devices(nvml_sim_library: Path, tmp_path: Path) -> None:
    scenario = {
        "gpus": [
            {**A100, "processes": "from_cuda_visible_devices", "process_memory": "3GiB"},
            {**A100, "processes": "from_cuda_visible_devices", "process_memory": "5GiB"},
        ]
    }
    config = tmp_path / "sim.conf"
    write_config(config, scenario)
    env = {"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": "1"}
    # The shell was given GPU 1; the sleep it starts inherits the same value and is not a holder of its own.
    holder = subprocess.Popen(["sh", "-c", "sleep 30 & wait"], env=env, start_new_session=True)
    try:
        time.sleep(0.3)
        result = run_client(
            config,
            """
            pynvml.nvmlInit()
            result = []
            for index in (0, 1):
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                result.append([[p.pid, p.usedGpuMemory] for p in procs] + [pynvml.nvmlDeviceGetMemoryInfo(handle).used])
            pynvml.nvmlShutdown()
            """,
        )
        fake = FakeBackend(parse_scenario(yaml.safe_dump(scenario), "<test>"))
        fake.init()
        expected = [[[p.pid, p.used_memory_bytes] for p in fake.read_device(i).processes] for i in (0, 1)]
        uuid = fake.scenario.gpus[1].uuid
        assert processes_assigned(Path("/proc"), 1, uuid) == (holder.pid,)
    finally:
        os.killpg(holder.pid, signal.SIGKILL)  # the sleep too: it would hold GPU 1 in later tests
        holder.wait()
    assert result[0] == [0]
    assert result[1] == [[holder.pid, 5 * 2**30], 5 * 2**30]
    assert [r[:-1] for r in result] == expected


def test_compile_command(tmp_path: Path) -> None:
    out = tmp_path / "lab.conf"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ray_agent.cli",
            "nvml-sim",
            "compile",
            "builtin:lab-2gpu",
            str(out),
            "--uuid-seed",
            "worker1",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert text.startswith("rayrack-nvml-sim 1\n") and "epoch" not in text
    fake = FakeBackend(
        parse_scenario(
            Path(__file__).parents[2].joinpath("ray_agent/gpu/scenarios/lab-2gpu.yml").read_text(), "x", "worker1"
        )
    )
    assert f"uuid {fake.scenario.gpus[0].uuid}\n" in text
    # GPU 1 marks NVLink unsupported: it has no links.
    assert text.split("gpu 1\n")[1].count("nvlink_links 0") == 1
    bad = subprocess.run(
        [sys.executable, "-m", "ray_agent.cli", "nvml-sim", "compile", "builtin:nope", "-"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2 and "no bundled scenario 'nope'" in bad.stderr


def test_dataclass_fields_compared_exist() -> None:
    """The value tests compare by field name; a renamed GpuSample field must break them loudly."""
    from nvml_sim.test_values import EXACT, TOLERANCE
    from ray_agent.gpu.base import GpuSample

    names = {f.name for f in dataclasses.fields(GpuSample)}
    assert set(EXACT) | set(TOLERANCE) <= names

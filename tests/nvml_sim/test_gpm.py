"""GPM through the simulated libnvidia-ml and the agent's NVML backend equals the fake backend's: the mean
of each trace between two consecutive reads of a GPU, none on the first read, none where there is no GPM."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest

from nvml_sim.support import run_client, write_config
from nvml_sim.test_values import assert_matches
from ray_agent.clock import FakeClock
from ray_agent.gpu.base import GpmSample
from ray_agent.gpu.fake import FakeBackend, parse_scenario, resolve_scenario_path

# Three rounds over every GPU with the agent's NVML backend, a pause between rounds, wall time around reads.
ROUNDS = """
from ray_agent.gpu.nvml import NvmlBackend
import dataclasses
backend = NvmlBackend()
info = backend.init()
rounds = []
for _ in range(3):
    reads = []
    for index in range(info.device_count):
        before = time.time()
        sample = backend.read_device(index)
        reads.append({"before": before, "after": time.time(), "sample": dataclasses.asdict(sample)})
    rounds.append(reads)
    time.sleep(0.4)
backend.shutdown()
result = rounds
"""

SCENARIO = """
gpus:
  - model: NVIDIA H100 80GB HBM3
    uuid: GPU-11111111-2222-3333-4444-555555555555
    memory_total: 80GiB
    gpm: true
    utilization: 1.0
    sm_active: [{for: 2s, from: 0.0, to: 1.0}, {for: 1s, value: 0.02}]
    sm_occupancy: [{for: 1500ms, from: 0.1, to: 0.6}]
    tensor_active: [{for: 700ms, value: 0.8}, {for: 300ms, value: 0.0}]
    dram_active: 0.35
    pcie_tx_bytes_per_second: [{for: 2s, from: 1.0e+8, to: 5.0e+8}]
    pcie_rx_bytes_per_second: 3.0e+8
    nvlink_tx_bytes_per_second: [{for: 1s, value: 5.0e+10}, {for: 2s, from: 0, to: 1.0e+11}]
    nvlink_rx_bytes_per_second: 2.0e+10
  - model: NVIDIA H100 80GB HBM3
    uuid: GPU-22222222-2222-3333-4444-555555555555
    memory_total: 80GiB
    gpm: true
    unsupported: [gpm]
  - model: NVIDIA A100-SXM4-80GB
    uuid: GPU-33333333-2222-3333-4444-555555555555
    memory_total: 80GiB
    utilization: 0.9
"""

GPM_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(GpmSample))
# NVML reports percent and MiB/s as doubles: only the conversion's rounding separates the two backends.
RELATIVE = 1e-9


def fake_gpm(text: str, start: float, end: float, index: int) -> GpmSample | None:
    """The fake's GPM for a GPU read at scenario times `start` and then `end`."""
    clock = FakeClock()
    backend = FakeBackend(parse_scenario(text, "<test>"), clock)
    clock.advance(start)
    backend.init()
    assert backend.read_device(index).gpm is None
    clock.advance(end - start)
    return backend.read_device(index).gpm


def assert_gpm_matches(text: str, epoch: float, previous: dict, current: dict) -> None:
    index = current["sample"]["index"]
    lib = current["sample"]["gpm"]
    corners = [
        fake_gpm(text, start - epoch, end - epoch, index)
        for start in (previous["before"], previous["after"])
        for end in (current["before"], current["after"])
    ]
    if corners[0] is None:
        assert lib is None and all(c is None for c in corners), (index, lib)
        return
    assert lib is not None, index
    for name in GPM_FIELD_NAMES:
        values = [getattr(c, name) for c in corners]
        slack = RELATIVE * max(1.0, *map(abs, values))
        assert min(values) - slack <= lib[name] <= max(values) + slack, (index, name, lib[name], values)


def test_gpm_means_between_reads(nvml_sim_library: Path, tmp_path: Path) -> None:
    config = tmp_path / "sim.conf"
    epoch = write_config(config, SCENARIO, 0.5)
    rounds = run_client(config, ROUNDS)
    for reads in rounds:
        for read in reads:
            # Every other field, and the same field errors, against single fake reads (GPM: below).
            assert_matches(SCENARIO, epoch, {**read, "sample": {**read["sample"], "gpm": None}})
    # First read after init: no interval yet, on any GPU.
    assert [read["sample"]["gpm"] for read in rounds[0]] == [None, None, None]
    for previous, current in itertools.pairwise(rounds):
        for before, after in zip(previous, current, strict=True):
            assert_gpm_matches(SCENARIO, epoch, before, after)
    gpm = rounds[2][0]["sample"]["gpm"]
    assert gpm["graphics_active_ratio"] == pytest.approx(1.0)  # follows utilization unless given
    assert gpm["dram_active_ratio"] == pytest.approx(0.35)
    assert gpm["pcie_rx_bytes_per_second"] == pytest.approx(3.0e8)
    # GPM present but failing: counted on every read. No GPM: nothing, and nothing counted.
    for reads in rounds:
        assert reads[1]["sample"]["gpm"] is None
        assert {"field": "gpm", "error": {"name": "NOT_SUPPORTED", "code": 3}} in reads[1]["sample"]["field_errors"]
        assert reads[2]["sample"]["gpm"] is None and reads[2]["sample"]["field_errors"] == []


@pytest.mark.parametrize("scenario_time", [30.0, 400.0])
def test_demo_scenario_gpm(nvml_sim_library: Path, tmp_path: Path, scenario_time: float) -> None:
    """The shipped demo: its Hopper GPUs have GPM, the others none."""
    text = resolve_scenario_path("builtin:demo-8gpu").read_text(encoding="utf-8")
    config = tmp_path / "sim.conf"
    epoch = write_config(config, text, scenario_time)
    rounds = run_client(config, ROUNDS)
    scenario = parse_scenario(text, "<demo>")
    for previous, current in itertools.pairwise(rounds):
        for before, after in zip(previous, current, strict=True):
            index = after["sample"]["index"]
            if after["sample"]["field_errors"] or before["sample"]["field_errors"]:
                continue  # the demo's flaky GPU: whether a read failed depends on where its window edge fell
            assert_gpm_matches(text, epoch, before, after)
            assert (after["sample"]["gpm"] is not None) == (scenario.gpus[index].gpm is not None)
    assert any(gpu.gpm is not None for gpu in scenario.gpus)


def test_raw_gpm_calls(nvml_sim_library: Path, tmp_path: Path) -> None:
    """Struct versions, unsupported GPUs and metrics, and bad sample pairs, as real NVML answers them."""
    config = tmp_path / "sim.conf"
    write_config(config, SCENARIO, 1.0)
    result = run_client(
        config,
        """
        pynvml.nvmlInit()
        gpm_gpu, plain_gpu = pynvml.nvmlDeviceGetHandleByIndex(0), pynvml.nvmlDeviceGetHandleByIndex(2)

        def code(call, *args):
            try:
                call(*args)
            except pynvml.NVMLError as err:
                return err.value
            return 0

        support = pynvml.c_nvmlGpmSupport_t(version=2)
        bad_version = pynvml._nvmlGetFunctionPointer("nvmlGpmQueryDeviceSupport")(gpm_gpu, pynvml.byref(support))
        first, second = pynvml.nvmlGpmSampleAlloc(), pynvml.nvmlGpmSampleAlloc()
        pynvml.nvmlGpmSampleGet(gpm_gpu, first)
        time.sleep(0.05)
        pynvml.nvmlGpmSampleGet(gpm_gpu, second)

        def request(one, two, metrics, version=pynvml.NVML_GPM_METRICS_GET_VERSION):
            get = pynvml.c_nvmlGpmMetricsGet_t()
            get.version, get.numMetrics, get.sample1, get.sample2 = version, len(metrics), one, two
            for i, metric in enumerate(metrics):
                get.metrics[i].metricId = metric
            return get

        metrics = [pynvml.NVML_GPM_METRIC_SM_UTIL, pynvml.NVML_GPM_METRIC_FP64_UTIL]
        got = pynvml.nvmlGpmMetricsGet(request(first, second, metrics))
        result = {
            "supported": [pynvml.nvmlGpmQueryDeviceSupport(h).isSupportedDevice for h in (gpm_gpu, plain_gpu)],
            "bad_version": bad_version,
            "plain_sample": code(pynvml.nvmlGpmSampleGet, plain_gpu, first),
            "returns": [got.metrics[i].nvmlReturn for i in range(2)],
            "unit": got.metrics[0].metricInfo.unit.decode(),
            "same_sample": code(pynvml.nvmlGpmMetricsGet, request(second, second, metrics)),
            "reversed": code(pynvml.nvmlGpmMetricsGet, request(second, first, metrics)),
            "old_version": code(pynvml.nvmlGpmMetricsGet, request(first, second, metrics, version=2)),
        }
        pynvml.nvmlGpmSampleFree(first)
        pynvml.nvmlGpmSampleFree(second)
        pynvml.nvmlShutdown()
        result["after_shutdown"] = code(pynvml.nvmlGpmQueryDeviceSupport, gpm_gpu)
        """,
    )
    assert result["supported"] == [1, 0]
    assert result["bad_version"] == 25  # ARGUMENT_VERSION_MISMATCH
    assert result["plain_sample"] == 3  # NOT_SUPPORTED on a GPU without GPM
    assert result["returns"] == [0, 3] and result["unit"] == "%"
    assert result["same_sample"] == result["reversed"] == 2  # INVALID_ARGUMENT
    assert result["old_version"] == 25
    assert result["after_shutdown"] == 1

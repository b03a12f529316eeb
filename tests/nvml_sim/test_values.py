"""The library answers with the scenario's values: the same scenario through the Python fake backend and
through nvidia-ml-py + the simulated libnvidia-ml agree at the same scenario time."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from nvml_sim.support import run_client, write_config
from ray_agent.clock import FakeClock
from ray_agent.gpu.base import GpuSample
from ray_agent.gpu.fake import FakeBackend, parse_scenario, resolve_scenario_path

# Reads every GPU with the agent's own NVML backend, noting wall time before and after each read.
AGENT_READS = """
from ray_agent.gpu.nvml import NvmlBackend
import dataclasses
backend = NvmlBackend()
info = backend.init()
samples = []
for index in range(info.device_count):
    before = time.time()
    sample = backend.read_device(index)
    samples.append({"before": before, "after": time.time(), "sample": dataclasses.asdict(sample)})
backend.shutdown()
result = {"info": dataclasses.asdict(info), "samples": samples}
"""

# Rounding of NVML's integer units: percent, milliwatts, degrees, MHz, KiB/s, KiB.
TOLERANCE = {
    "memory_used_bytes": 1,
    "memory_free_bytes": 1,
    "utilization_ratio": 0.005,
    "memory_utilization_ratio": 0.005,
    "power_watts": 0.0005,
    "temperature_celsius": 0.5,
    "sm_clock_hertz": 0.5e6,
    "memory_clock_hertz": 0.5e6,
    "pcie_tx_bytes_per_second": 512,
    "pcie_rx_bytes_per_second": 512,
    "nvlink_tx_bytes_total": 1024,
    "nvlink_rx_bytes_total": 1024,
    "fan_speed_ratio": 0.005,
    "memory_temperature_celsius": 0.5,
    "energy_joules_total": 0.0005,
    "pcie_replay_errors_total": 0,
    "encoder_utilization_ratio": 0.005,
    "decoder_utilization_ratio": 0.005,
}
EXACT = (
    "index",
    "uuid",
    "model",
    "pci_bus_id",
    "memory_total_bytes",
    "ecc",
    "xid_errors_total",
    "last_xid",
    "gpm",  # None on a first read (tests/nvml_sim/test_gpm.py reads twice)
    "memory_reserved_bytes",
    "remapped_rows",
    "retired_pages_pending",
    "clock_event_reasons",
)


def fake_at(text: str, t: float, index: int, seed: str = "") -> GpuSample:
    clock = FakeClock()
    backend = FakeBackend(parse_scenario(text, "<test>", seed), clock)
    clock.advance(t)
    backend.init()
    return backend.read_device(index)


def assert_matches(text: str, epoch: float, read: dict) -> None:
    lib = read["sample"]
    index = lib["index"]
    early = dataclasses.asdict(fake_at(text, read["before"] - epoch, index))
    late = dataclasses.asdict(fake_at(text, read["after"] - epoch, index))
    for key in EXACT:
        assert lib[key] == early[key] == late[key], (index, key, lib[key], early[key])
    for key, tolerance in TOLERANCE.items():
        if early[key] is None or late[key] is None:
            # A field fault (flaky power in the demo): the library must fail it too, unless a window edge
            # fell between the two reads.
            assert lib[key] is None or early[key] != late[key], (index, key, lib[key])
            continue
        low = min(early[key], late[key]) - tolerance
        high = max(early[key], late[key]) + tolerance
        assert low <= lib[key] <= high, (index, key, lib[key], early[key], late[key])
    # nvidia-ml-py does not know users; pids and memory must be the scenario's.
    assert [(p["pid"], p["used_memory_bytes"]) for p in lib["processes"]] == [
        (p["pid"], p["used_memory_bytes"]) for p in early["processes"]
    ]
    assert lib["field_errors"] == list(early["field_errors"])


@pytest.mark.parametrize("scenario_time", [25.0, 57.0, 170.0])
def test_demo_scenario_through_the_agents_nvml_backend(
    nvml_sim_library: Path, tmp_path: Path, scenario_time: float
) -> None:
    """demo-8gpu: ramps, loops, a process with from/until, an XID at 150 s, NVLink byte counters."""
    text = resolve_scenario_path("builtin:demo-8gpu").read_text(encoding="utf-8")
    config = tmp_path / "sim.conf"
    epoch = write_config(config, text, scenario_time)
    result = run_client(config, AGENT_READS)
    assert result["info"] == {"name": "nvml", "driver_version": "550.54.15", "device_count": 8}
    for read in result["samples"]:
        assert_matches(text, epoch, read)
    xids = [r["sample"]["xid_errors_total"] for r in result["samples"]]
    assert xids == ([0, 0, 0, 1, 0, 0, 0, 0] if scenario_time > 150 else [0] * 8)
    held = {r["sample"]["index"]: [p["pid"] for p in r["sample"]["processes"]] for r in result["samples"]}
    assert held[4] == ([32001, 32002] if 20 <= scenario_time < 200 else [32001])


RAMPS = """
driver_version: "535.183.01"
gpus:
  - model: NVIDIA H100 80GB HBM3
    uuid: GPU-11111111-2222-3333-4444-555555555555
    pci_bus_id: "00000000:1B:00.0"
    memory_total: 80GiB
    memory_used: [{for: 4s, from: 1GiB, to: 60GiB}, {for: 2s, value: 2GiB}]
    utilization: [{for: 3s, from: 0.0, to: 1.0}, {for: 3s, from: 1.0, to: 0.0}]
    memory_utilization: [{for: 2s, from: 0.1, to: 0.7}]
    power_watts: [{for: 5s, from: 100, to: 700}]
    temperature_celsius: [{for: 6s, from: 30, to: 80}]
    sm_clock_mhz: [{for: 6s, from: 1000, to: 1980}]
    memory_clock_mhz: 2619
    pcie_tx_bytes_per_second: [{for: 2s, from: 1.0e+8, to: 5.0e+8}]
    pcie_rx_bytes_per_second: 3.0e+8
    nvlink_tx_bytes_per_second: [{for: 1s, value: 5.0e+10}, {for: 2s, from: 0, to: 1.0e+11}]
    nvlink_rx_bytes_per_second: [{for: 7s, from: 1.0e+9, to: 2.0e+10}]
    ecc: {corrected_volatile: 4, uncorrected_volatile: 1, corrected_aggregate: 40, uncorrected_aggregate: 2}
    xids: [{at: 1s, code: 48}, {at: 2s, code: 79}, {at: 1h, code: 31}]
    fan_speed: [{for: 4s, from: 0.2, to: 0.9}]
    memory_temperature_celsius: [{for: 3s, from: 40, to: 85}]
    pcie_replay_errors_per_second: [{for: 2s, value: 0}, {for: 1s, value: 3.5}]
    encoder_utilization: [{for: 2s, from: 0, to: 0.6}]
    decoder_utilization: 0.35
    memory_reserved: 527MiB
    remapped_rows: {correctable: 3, uncorrectable: 1, pending: true}
    retired_pages_pending: true
    clock_event_reasons: [sw_power_cap, hw_thermal_slowdown]
"""


@pytest.mark.parametrize("scenario_time", [2.5, 3600.0 * 5 + 1.7])
def test_ramps_integrals_ecc_and_xids(nvml_sim_library: Path, tmp_path: Path, scenario_time: float) -> None:
    config = tmp_path / "sim.conf"
    epoch = write_config(config, RAMPS, scenario_time)
    result = run_client(config, AGENT_READS)
    assert result["info"]["driver_version"] == "535.183.01"
    (read,) = result["samples"]
    assert_matches(RAMPS, epoch, read)
    sample = read["sample"]
    assert sample["ecc"] == {
        "corrected_volatile": 4,
        "uncorrected_volatile": 1,
        "corrected_aggregate": 40,
        "uncorrected_aggregate": 2,
    }
    assert (sample["xid_errors_total"], sample["last_xid"]) == ((2, 79) if scenario_time < 3600 else (3, 31))
    # Health fields: what nvidia-ml-py got from the library, in the agent's units.
    assert sample["memory_reserved_bytes"] == 527 * 2**20
    assert sample["remapped_rows"] == {"correctable": 3, "uncorrectable": 1, "pending": True, "failed": False}
    assert sample["retired_pages_pending"] is True
    assert sample["clock_event_reasons"] == 0x4 | 0x40
    assert sample["decoder_utilization_ratio"] == 0.35
    # Energy integrates the power ramp (100 -> 700 W over 5 s, looping: 2000 J a period); replays come at
    # 3.5/s in the last second of every 3 s.
    def energy(t: float) -> float:
        periods, offset = divmod(t, 5.0)
        return 2000 * periods + (100 + 60 * offset) * offset

    def replays(t: float) -> int:
        periods, offset = divmod(t, 3.0)
        return int(3.5 * periods + 3.5 * max(0.0, offset - 2.0))

    before, after = read["before"] - epoch, read["after"] - epoch
    assert energy(before) - 0.001 <= sample["energy_joules_total"] <= energy(after) + 0.001
    assert replays(before) <= sample["pcie_replay_errors_total"] <= replays(after)
    assert sample["field_errors"] == []


def test_raw_calls_and_identity(nvml_sim_library: Path, tmp_path: Path) -> None:
    """What the agent does not read: versions, handles by UUID and PCI id, topology, NVLink state."""
    config = tmp_path / "sim.conf"
    text = resolve_scenario_path("builtin:demo-8gpu").read_text(encoding="utf-8")
    write_config(config, text, 10.0)
    result = run_client(
        config,
        """
        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        uuid = pynvml.nvmlDeviceGetUUID(handles[5])
        pci = pynvml.nvmlDeviceGetPciInfo(handles[5])
        result = {
            "nvml": pynvml.nvmlSystemGetNVMLVersion(),
            "cuda": pynvml.nvmlSystemGetCudaDriverVersion(),
            "by_uuid": pynvml.nvmlDeviceGetIndex(pynvml.nvmlDeviceGetHandleByUUID(uuid)),
            "by_pci": pynvml.nvmlDeviceGetIndex(pynvml.nvmlDeviceGetHandleByPciBusId(pci.busId)),
            "pci": [pci.domain, pci.bus, pci.device, pci.busIdLegacy],
            "topology": [
                pynvml.nvmlDeviceGetTopologyCommonAncestor(handles[0], h) for h in handles
            ],
            "links": [pynvml.nvmlDeviceGetNvLinkState(handles[0], link) for link in range(12)],
            "p2p": pynvml.nvmlDeviceGetNvLinkCapability(handles[0], 0, pynvml.NVML_NVLINK_CAP_P2P_SUPPORTED),
            "per_link": pynvml.nvmlDeviceGetFieldValues(
                handles[0], [(pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, 0)]
            )[0].nvmlReturn,
            "other_field": pynvml.nvmlDeviceGetFieldValues(handles[0], [pynvml.NVML_FI_DEV_POWER_INSTANT])[
                0
            ].nvmlReturn,
            "error_string": pynvml.nvmlErrorString(pynvml.NVML_ERROR_GPU_IS_LOST),
        }
        try:
            pynvml.nvmlDeviceGetNvLinkState(handles[0], 12)
        except pynvml.NVMLError as err:
            result["link_12"] = err.value
        try:
            pynvml.nvmlDeviceGetHandleByUUID("GPU-not-there")
        except pynvml.NVMLError as err:
            result["unknown_uuid"] = err.value
        pynvml.nvmlShutdown()
        """,
    )
    assert result["nvml"] == "12.550.54.15"
    assert result["cuda"] == 12040
    assert result["by_uuid"] == 5 and result["by_pci"] == 5
    assert result["pci"] == [0, 0x15, 0, "0000:15:00.0"]
    # GPU pairs share a PCIe switch, halves share a socket.
    assert result["topology"] == [0, 20, 40, 40, 50, 50, 50, 50]
    assert result["links"] == [1] * 12 and result["p2p"] == 1
    assert result["per_link"] == 0 and result["other_field"] == 3
    assert result["error_string"] == "GPU is lost"
    assert result["link_12"] == 2 and result["unknown_uuid"] == 6

"""Topology faults as a driver reports them: a narrow PCIe link, NVLink links down or slow, a row remap
pending, a fabric not ready; read through nvidia-ml-py from the simulated library."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from nvml_sim.support import run_client, write_config
from ray_agent.gpu.fake import ScenarioError, parse_scenario

H100 = {"model": "NVIDIA H100 80GB HBM3", "memory_total": "80GiB"}
SCENARIO = {
    "gpus": [
        H100,
        {
            **H100,
            "pcie_link": {"generation": 3, "width": 8, "max_generation": 5, "max_width": 16},
            "nvlink_links": {"count": 18, "speed_mbps": 26562, "down": [3], "speeds": {5: 13281}},
            "remapped_rows": {"correctable": 0, "uncorrectable": 2, "pending": True},
            "fabric": {"state": "in_progress"},
        },
        {**H100, "fabric": {"state": "completed", "status": "SUCCESS"}, "unsupported": ["nvlink"]},
        {**H100, "fabric": {"state": "completed", "status": "NOT_READY"}, "unsupported": ["remapped_rows"]},
    ]
}

READ = """
pynvml.nvmlInit()
def outcome(fn, *args):
    try:
        return fn(*args)
    except pynvml.NVMLError as err:
        return type(err).__name__
result = []
for index in range(pynvml.nvmlDeviceGetCount()):
    h = pynvml.nvmlDeviceGetHandleByIndex(index)
    speeds = [pynvml.NVML_FI_DEV_NVLINK_SPEED_MBPS_COMMON, pynvml.NVML_FI_DEV_NVLINK_SPEED_MBPS_L0,
              pynvml.NVML_FI_DEV_NVLINK_SPEED_MBPS_L3, pynvml.NVML_FI_DEV_NVLINK_SPEED_MBPS_L5]
    values = pynvml.nvmlDeviceGetFieldValues(h, speeds)
    fabric = pynvml.c_nvmlGpuFabricInfo_v2_t()
    fabric_v = outcome(pynvml.nvmlDeviceGetGpuFabricInfoV, h, pynvml.byref(fabric))
    result.append({
        "pcie": [pynvml.nvmlDeviceGetCurrPcieLinkGeneration(h), pynvml.nvmlDeviceGetCurrPcieLinkWidth(h),
                 pynvml.nvmlDeviceGetMaxPcieLinkGeneration(h), pynvml.nvmlDeviceGetMaxPcieLinkWidth(h),
                 pynvml.nvmlDeviceGetGpuMaxPcieLinkGeneration(h)],
        "links": [outcome(pynvml.nvmlDeviceGetNvLinkState, h, link) for link in range(6)],
        "speeds": [[v.nvmlReturn, v.value.uiVal] for v in values],
        "remapped": outcome(pynvml.nvmlDeviceGetRemappedRows, h),
        "fabric": None if fabric_v != 0 else [fabric.state, fabric.status],
        "fabric_error": None if fabric_v == 0 else fabric_v,
    })
pynvml.nvmlShutdown()
"""


def test_topology_faults_through_pynvml(nvml_sim_library: Path, tmp_path: Path) -> None:
    config = tmp_path / "sim.conf"
    write_config(config, SCENARIO)
    healthy, faulty, no_nvlink, not_ready = run_client(config, READ)

    # Defaults: PCIe 4.0 x16 at its maximum, 12 NVLink 3 links up, no remaps, no fabric manager.
    assert healthy["pcie"] == [4, 16, 4, 16, 4]
    assert healthy["links"] == [1] * 6
    assert healthy["speeds"] == [[0, 25781]] * 4
    assert healthy["remapped"] == [0, 0, 0, 0]
    assert healthy["fabric"] is None and healthy["fabric_error"] == "NVMLError_NotSupported"

    # Narrow link: trained at Gen3 x8 on a Gen5 x16 slot.
    assert faulty["pcie"] == [3, 8, 5, 16, 5]
    # Link 3 down (inactive, speed 0), link 5 at half speed; the common speed is the slowest active link.
    assert faulty["links"] == [1, 1, 1, 0, 1, 1]
    assert faulty["speeds"] == [[0, 13281], [0, 26562], [0, 0], [0, 13281]]
    assert faulty["remapped"] == [0, 2, 1, 0]
    # Registration still running: state IN_PROGRESS, status not ready yet.
    assert faulty["fabric"] == [2, 27]

    assert no_nvlink["links"] == ["NVMLError_NotSupported"] * 6
    assert [code for code, _ in no_nvlink["speeds"]] == [3] * 4
    assert no_nvlink["fabric"] == [3, 0]
    assert not_ready["fabric"] == [3, 27]
    assert not_ready["remapped"] == "NVMLError_NotSupported"


ECC_AND_LINK_SPEEDS = """
pynvml.nvmlInit()
result = []
for index in range(pynvml.nvmlDeviceGetCount()):
    h = pynvml.nvmlDeviceGetHandleByIndex(index)
    scoped = [(pynvml.NVML_FI_DEV_NVLINK_GET_SPEED, link) for link in (0, 5, 13, 17, 18)]
    result.append({"ecc": pynvml.nvmlDeviceGetEccMode(h),
                   "speeds": [[v.nvmlReturn, v.value.uiVal] for v in pynvml.nvmlDeviceGetFieldValues(h, scoped)]})
pynvml.nvmlShutdown()
"""


def test_ecc_mode_and_the_per_link_speed_field_of_any_link(nvml_sim_library: Path, tmp_path: Path) -> None:
    config = tmp_path / "sim.conf"
    links = {"count": 18, "speed_mbps": 26562, "down": [17], "speeds": {13: 13281}}
    write_config(config, {"gpus": [{**H100, "nvlink_links": links}, {**H100, "ecc_enabled": False}]})
    on, off = run_client(config, ECC_AND_LINK_SPEEDS)
    assert on["ecc"] == [1, 1] and off["ecc"] == [0, 0]
    # NVML_FI_DEV_NVLINK_GET_SPEED reaches links past L11: link 13 slow, link 17 down, no link 18.
    assert on["speeds"] == [[0, 26562], [0, 26562], [0, 13281], [0, 0], [3, 0]]
    assert off["speeds"] == [[0, 25781]] * 2 + [[3, 0]] * 3  # the default 12 links


@pytest.mark.parametrize(
    ("gpu", "message"),
    [
        ({"pcie_link": {"width": 5}}, "gpus[0].pcie_link.width: x5 is not a PCIe width"),
        ({"pcie_link": {"generation": 5}}, "gpus[0].pcie_link.generation: 5 is above the link's maximum 4"),
        ({"nvlink_links": {"count": 4, "down": [4]}}, "gpus[0].nvlink_links.down[0]: no link 4"),
        ({"nvlink_links": {"count": 19}}, "gpus[0].nvlink_links.count: 19 is above the maximum 18"),
        ({"nvlink_links": {"speeds": [1]}}, "gpus[0].nvlink_links.speeds: expected a mapping"),
        ({"fabric": {"state": "done"}}, "gpus[0].fabric.state: 'done' is not allowed; allowed values: not_started"),
        ({"fabric": {"state": "completed", "status": "hang"}}, "gpus[0].fabric.status: a fabric status cannot hang"),
        ({"remapped_rows": {"pending": "yes"}}, "gpus[0].remapped_rows.pending: expected true or false"),
        ({"ecc_enabled": "off"}, "gpus[0].ecc_enabled: expected true or false"),
        ({"clock_event_reasons": ["slow"]}, "gpus[0].clock_event_reasons[0]: 'slow' is not allowed"),
        ({"fan_speed": 1.5}, "gpus[0].fan_speed: 1.5 is above the maximum 1"),
        ({"memory_reserved": "100GiB"}, "gpus[0].memory_reserved: exceeds memory_total"),
    ],
)
def test_bad_health_and_topology_keys_are_named(gpu: dict, message: str) -> None:
    with pytest.raises(ScenarioError) as err:
        parse_scenario(yaml.safe_dump({"gpus": [{**H100, **gpu}]}), "s.yml")
    assert f"s.yml: {message}" in str(err.value)

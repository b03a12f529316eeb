"""Hardware faults of a GPU node as scenarios of the simulated NVML library, and what the GPU acceptance check
(rayrack/gpu_check.py) must call each: shared by its unit tests and the lab test of the gpu_validate module."""

from __future__ import annotations

from typing import Any

# Two HGX H100 GPUs (18 NVLink 4 links each, registered with Fabric Manager); no shipped profile matches two,
# so only the self-consistency checks run.
H100: dict[str, Any] = {
    "model": "NVIDIA H100 80GB HBM3",
    "memory_total": "80GiB",
    "pcie_link": {"generation": 5, "width": 16, "max_generation": 5, "max_width": 16},
    "nvlink_links": {"count": 18, "speed_mbps": 26562},
    "fabric": {"state": "completed", "status": "SUCCESS"},
}
NVLINK = H100["nvlink_links"]
HEALTHY: dict[str, Any] = {"driver_version": "550.54.15", "gpus": [H100, H100]}

# fault -> (what GPU1 gets, the finding's check). Each scenario has the fault on GPU1 only.
FAULTS: dict[str, tuple[dict[str, Any], str]] = {
    "link down": ({"nvlink_links": {**NVLINK, "down": [3]}}, "NVLink inactive"),
    "slow link": ({"nvlink_links": {**NVLINK, "speeds": {14: 13281}}}, "NVLink bandwidth"),
    "narrow PCIe link": ({"pcie_link": {**H100["pcie_link"], "width": 8}}, "PCIe width"),
    "remap pending": ({"remapped_rows": {"uncorrectable": 2, "pending": True}}, "row remapping pending"),
    "fabric not completed": ({"fabric": {"state": "in_progress"}}, "fabric state"),
    "ECC off": ({"ecc_enabled": False}, "ECC"),
}


def faulty(fault: str) -> dict[str, Any]:
    """The healthy scenario with `fault` on GPU1."""
    gpu, _ = FAULTS[fault]
    return {**HEALTHY, "gpus": [H100, {**H100, **gpu}]}

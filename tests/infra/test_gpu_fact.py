"""The GPU local fact against sysfs trees shaped like real servers' (IDs from the PCI ID database)."""

import json
import subprocess
import sys

import pytest

from .conftest import ROLES, load_module

FACT = ROLES / "gpu_facts" / "files" / "gpus.fact"
fact = load_module(FACT, "gpus_fact")

# (PCI address, vendor, device, class) as found under /sys/bus/pci/devices on real systems.
H100_BUSES = (0x18, 0x2a, 0x3a, 0x5d, 0x9a, 0xab, 0xba, 0xdb)
HGX_H100 = ([(f"0000:{bus:02x}:00.0", "0x10de", "0x2330", "0x030200") for bus in H100_BUSES]
            + [(f"0000:{bus:02x}:00.0", "0x10de", "0x22a3", "0x068000") for bus in (0x05, 0x06, 0x07, 0x08)]
            + [("0000:00:00.0", "0x8086", "0x09a2", "0x060000"), ("0000:19:00.0", "0x15b3", "0x1021", "0x020700")])
WORKSTATION = [("0000:01:00.0", "0x10de", "0x2684", "0x030000"), ("0000:01:00.1", "0x10de", "0x22ba", "0x040300"),
               ("0000:00:02.0", "0x8086", "0xa780", "0x030000")]
LSPCI_HGX = "\n".join(
    f'{addr} "3D controller" "NVIDIA Corporation" "GH100 [H100 SXM5 80GB]" -ra1 "NVIDIA Corporation" "Device 16c1"'
    for addr, _, dev, _ in HGX_H100 if dev == "0x2330")


def sysfs(tmp_path, devices):
    for addr, vendor, device, klass in devices:
        d = tmp_path / addr
        d.mkdir()
        (d / "vendor").write_text(vendor + "\n")
        (d / "device").write_text(device + "\n")
        (d / "class").write_text(klass + "\n")
    return tmp_path


def test_hgx_h100_with_names(tmp_path):
    result = fact.scan(sysfs(tmp_path, HGX_H100), fact.parse_lspci(LSPCI_HGX))
    assert result["count"] == 8
    assert result["models"] == ["GH100 [H100 SXM5 80GB]"]
    assert result["nvswitch"] is True and result["nvswitch_count"] == 4
    assert [d["pci_bus_id"] for d in result["devices"]][:2] == ["0000:18:00.0", "0000:2a:00.0"]


def test_workstation_counts_the_gpu_not_its_audio_function_nor_other_vendors(tmp_path):
    result = fact.scan(sysfs(tmp_path, WORKSTATION), {})
    assert result["count"] == 1
    assert result["models"] == ["NVIDIA 0x2684"]  # no pci.ids: the device ID stands in for the name
    assert result["nvswitch"] is False


def test_host_without_gpus(tmp_path):
    result = fact.scan(sysfs(tmp_path, WORKSTATION[2:]), {})
    assert result == {"count": 0, "models": [], "accelerator_type": None, "devices": [], "nvswitch_count": 0,
                      "nvswitch": False,
                      "driver_loaded": result["driver_loaded"]}


@pytest.mark.parametrize("devices", [HGX_H100, WORKSTATION])
def test_fact_script_prints_json_for_ansible(tmp_path, devices):
    out = subprocess.run([sys.executable, str(FACT), str(sysfs(tmp_path, devices))], capture_output=True, text=True,
                         check=True).stdout
    assert json.loads(out)["count"] == sum(1 for d in devices if d[1] == "0x10de" and d[3][:6] in ("0x0300", "0x0302"))


# (lspci's name from the PCI ID database, NVML's device name) of one GPU, as real systems report them.
NAMED_GPUS = [
    ("GH100 [H100 SXM5 80GB]", "NVIDIA H100 80GB HBM3"),
    ("GH100 [H200 SXM 141GB]", "NVIDIA H200"),
    ("GA100 [A100 SXM4 80GB]", "NVIDIA A100-SXM4-80GB"),
    ("AD102GL [L40S]", "NVIDIA L40S"),
    ("AD104GL [L4]", "NVIDIA L4"),
    ("TU104GL [Tesla T4]", "Tesla T4"),
    ("GV100GL [Tesla V100 SXM2 16GB]", "Tesla V100-SXM2-16GB"),
    ("GA102GL [A10G]", "NVIDIA A10G"),
    ("GB100 [B200]", "NVIDIA B200"),
    ("AD102 [GeForce RTX 4090]", "NVIDIA GeForce RTX 4090"),
    ("GB202GL [RTX PRO 6000 Blackwell Server Edition]", "NVIDIA RTX PRO 6000 Blackwell Server Edition"),
]


@pytest.mark.parametrize(("lspci", "nvml"), NAMED_GPUS)
def test_accelerator_type_is_rays_own_name_for_the_model(lspci, nvml):
    ray_rule = pytest.importorskip("ray._private.accelerators.nvidia_gpu").NvidiaGPUAcceleratorManager
    expected = ray_rule._gpu_name_to_accelerator_type(nvml)
    assert fact.ray_accelerator_type(lspci) == expected
    assert fact.ray_accelerator_type(nvml) == expected


def test_accelerator_types_match_ray_util_accelerators():
    accelerators = pytest.importorskip("ray.util.accelerators.accelerators")
    names = {fact.ray_accelerator_type(lspci) for lspci, _ in NAMED_GPUS}
    for constant in ("NVIDIA_H100", "NVIDIA_H200", "NVIDIA_A100", "NVIDIA_L40S", "NVIDIA_L4", "NVIDIA_TESLA_T4",
                     "NVIDIA_TESLA_V100", "NVIDIA_TESLA_A10G", "NVIDIA_B200", "NVIDIA_RTX_PRO_6000"):
        assert getattr(accelerators, constant) in names, constant


def test_the_fact_names_the_accelerator_type(tmp_path):
    result = fact.scan(sysfs(tmp_path, HGX_H100), fact.parse_lspci(LSPCI_HGX))
    assert result["accelerator_type"] == "H100"

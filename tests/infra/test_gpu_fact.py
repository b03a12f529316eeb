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
    assert result == {"count": 0, "models": [], "devices": [], "nvswitch_count": 0, "nvswitch": False,
                      "driver_loaded": result["driver_loaded"]}


@pytest.mark.parametrize("devices", [HGX_H100, WORKSTATION])
def test_fact_script_prints_json_for_ansible(tmp_path, devices):
    out = subprocess.run([sys.executable, str(FACT), str(sysfs(tmp_path, devices))], capture_output=True, text=True,
                         check=True).stdout
    assert json.loads(out)["count"] == sum(1 for d in devices if d[1] == "0x10de" and d[3][:6] in ("0x0300", "0x0302"))

"""gpu_validate's parsers (rayrack/gpu_check.py, the role's module_utils) on real nvidia-smi outputs
(tests/infra/data/nvidia-smi/*/SOURCE names each origin), its comparison with the shipped profiles, and the whole
module path, packed by Ansible, against the lab's nvidia-smi stand-in."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rayrack import gpu_check as gv

from .conftest import REPO

DATA = Path(__file__).parent / "data" / "nvidia-smi"
PROFILES = gv.load_profiles()
STANDIN = REPO / "molecule" / "gpu" / "files" / "nvidia-smi-standin"


def run_module(args: dict, env: dict | None = None) -> dict:
    """gpu_validate run by `ansible localhost -m`: AnsiballZ packs the module with its module_utils."""
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "ansible"), "localhost", "-i", "localhost,", "-c", "local",
         "-e", f"ansible_python_interpreter={sys.executable}", "-m", "rayrack.cluster.gpu_validate",
         "-a", json.dumps(args)],
        capture_output=True, text=True, check=False,
        env={**os.environ, **(env or {}), "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
             "ANSIBLE_STDOUT_CALLBACK": "json", "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1", "ANSIBLE_LOCALHOST_WARNING": "0"})
    assert proc.stdout.strip(), proc.stderr
    result = json.loads(proc.stdout)["plays"][0]["tasks"][0]["hosts"]["localhost"]
    assert "module_stderr" not in result and "Traceback" not in json.dumps(result), result
    return result


def read(machine, name):
    return (DATA / machine / name).read_text()


def test_every_sample_names_its_source():
    for machine in DATA.iterdir():
        source = (machine / "SOURCE").read_text()
        assert "https://" in source, machine.name
        for sample in machine.iterdir():
            if sample.name != "SOURCE":
                assert sample.name in source, f"{machine.name}/{sample.name} has no source line"


@pytest.mark.parametrize(("machine", "gpus", "marker", "numa"), [
    ("hgx-h100", 8, "NV18", ["0"] * 4 + ["1"] * 4),
    ("hgx-a100-4gpu", 4, "NV4", ["0-1"] * 4),
    ("pcie-8x-rtx4090", 8, "SYS", ["0"] * 4 + ["1"] * 4),
    ("workstation-2x-rtx5090", 2, "PHB", ["0", "0"]),
])
def test_topo_matrix_of_real_machines(machine, gpus, marker, numa):
    topo = gv.parse_topo(read(machine, "topo-m.txt"))
    assert topo["gpus"] == [f"GPU{i}" for i in range(gpus)]
    assert {v for row in topo["links"].values() for v in row.values()} == {marker}
    assert all(len(row) == gpus - 1 for row in topo["links"].values())
    assert [topo["numa"][g] for g in topo["gpus"]] == numa


def test_topo_nic_columns_are_not_gpus():
    topo = gv.parse_topo(read("pcie-8x-rtx4090", "topo-m.txt"))
    assert "NIC0" not in topo["links"]["GPU6"]  # GPU6 is PHB to both NICs, SYS to every GPU
    assert topo["links"]["GPU6"]["GPU7"] == "SYS"


def test_topo_published_partially_keeps_the_rows_it_has():
    topo = gv.parse_topo(read("hgx-a100-8gpu", "topo-m.txt"))
    assert len(topo["gpus"]) == 8 and sorted(topo["links"]) == [f"GPU{i}" for i in range(6)]
    assert topo["numa"]["GPU4"] == "7"
    assert gv.compare({"gpus": [], "topology": topo}, {"nvlink": {"links_per_pair": 12}}) == []


def test_topo_without_matrix_is_an_error():
    with pytest.raises(ValueError, match="no topology matrix"):
        gv.parse_topo("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.")


def test_nvlink_status_a100():
    status = gv.parse_nvlink_status(read("dgx-a100", "nvlink-status.txt"))
    assert sorted(status) == [0, 1]
    assert status[0]["name"] == "NVIDIA A100-SXM4-80GB"
    assert status[1]["uuid"] == "GPU-0c512562-871f-8257-6187-b5ae1b986d5e"
    assert status[0]["links"] == dict.fromkeys(range(12), 25.0)


def test_nvlink_status_with_inactive_links_fails_the_profile():
    status = gv.parse_nvlink_status(read("dgx1-v100", "nvlink-status.txt"))
    assert status[3]["links"] == {0: 25.781, 1: 25.781, 2: 25.781, 3: None, 4: 25.781, 5: None}
    diffs = gv.compare({"gpus": [], "nvlink": status}, {"nvlink": {"links_per_gpu": 6, "min_link_gbps": 25.0}})
    assert [(d["check"], d["gpu"], d["observed"]) for d in diffs] == [
        ("NVLink inactive", "GPU3", "links 3, 5 inactive"), ("NVLink active links", "GPU3", "4")]


def test_query_gpu_csv_of_l40s_box():
    gpus = gv.parse_query_gpu(read("pcie-2x-l40s", "query-gpu.csv"))
    assert [g["pci.bus_id"] for g in gpus] == ["00000000:01:00.0", "00000000:91:00.0"]
    assert {g["name"] for g in gpus} == {"NVIDIA L40S"}
    assert gpus[0]["memory.total"] == "46068 MiB" and gpus[0]["driver_version"] == "595.71.05"


def test_query_gpu_not_available_values_are_none():
    gpus = gv.parse_query_gpu("index, retired_pages.pending, ecc.mode.current\n0, [N/A], Enabled\n")
    assert gpus == [{"index": "0", "retired_pages.pending": None, "ecc.mode.current": "Enabled"}]


def test_dcgmi_diag_level_one_results():
    results = gv.parse_dcgmi_diag(read("pcie-t4", "dcgmi-diag.txt"))
    assert results["Persistence Mode"] == "Pass" and results["Driver Version Detected"] == "535.129.03"
    assert gv.compare({"gpus": [], "dcgm": results}, {}) == []
    results["Page Retirement/Row Remap"] = "Fail"
    assert gv.compare({"gpus": [], "dcgm": results}, {})[0]["observed"] == "Page Retirement/Row Remap: Fail"


def h100_node(**overrides):
    gpu = {"name": "NVIDIA H100 80GB HBM3", "driver_version": "550.54.15", "persistence_mode": "Enabled",
           "ecc.mode.current": "Enabled", "pcie.link.gen.max": "5", "pcie.link.width.max": "16",
           "retired_pages.pending": None, "remapped_rows.failure": "0"}
    gpus = [dict(gpu, index=str(i)) for i in range(8)]
    node = {"gpus": gpus, "topology": gv.parse_topo(read("hgx-h100", "topo-m.txt")),
            "nvlink": {i: {"name": gpu["name"], "uuid": "-", "links": dict.fromkeys(range(18), 26.562)}
                       for i in range(8)}}
    node.update(overrides)
    return node


def test_healthy_hgx_h100_matches_its_shipped_profile():
    node = h100_node()
    name, profile = gv.select_profile("auto", PROFILES, node["gpus"])
    assert name == "hgx-h100-8"
    assert gv.compare(node, profile) == []


def test_every_difference_is_named():
    node = h100_node()
    node["gpus"][2]["persistence_mode"] = "Disabled"
    node["gpus"][3]["ecc.mode.current"] = "Disabled"
    node["gpus"][4]["pcie.link.width.max"] = "8"
    node["gpus"][5]["remapped_rows.failure"] = "1"
    node["gpus"][7]["driver_version"] = "550.90.07"
    node["topology"]["links"]["GPU1"]["GPU6"] = "NV17"
    diffs = gv.compare(node, PROFILES["hgx-h100-8"])
    assert {(d["check"], d["gpu"]) for d in diffs} == {
        ("persistence mode", "GPU2"), ("ECC", "GPU3"), ("PCIe width", "GPU4"), ("row remapping failure", "GPU5"),
        ("driver version", "-"), ("NVLink links per pair", "GPU1-GPU6")}
    text = gv.table(diffs)
    assert "| NVLink links per pair | GPU1-GPU6 | NV18" in text
    assert len({len(line) for line in text.splitlines()}) == 1  # aligned


def test_missing_gpu_and_wrong_model():
    node = h100_node(gpus=h100_node()["gpus"][:7])
    node["gpus"][0]["name"] = "NVIDIA A100-SXM4-80GB"
    diffs = gv.compare(node, PROFILES["hgx-h100-8"])
    assert ("count", "8", "7") in {(d["check"], d["expected"], d["observed"]) for d in diffs}
    assert any(d["check"] == "model" and d["gpu"] == "GPU0" for d in diffs)


@pytest.mark.parametrize(("name", "count", "profile"), [
    ("NVIDIA A100-SXM4-80GB", 8, "hgx-a100-8"), ("NVIDIA A100-SXM4-40GB", 4, "hgx-a100-4"),
    ("NVIDIA L40S", 4, "pcie-l40s-4"), ("NVIDIA GeForce RTX 5090", 2, "workstation-rtx5090-2")])
def test_auto_picks_the_shipped_profile(name, count, profile):
    assert gv.select_profile("auto", PROFILES, [{"name": name}] * count)[0] == profile


def test_no_matching_profile_leaves_the_self_consistency_checks():
    assert gv.select_profile("auto", PROFILES, [{"name": "NVIDIA L40S"}] * 3) == (None, {})
    # A profile for any model applies only when named.
    assert gv.select_profile("auto", PROFILES, [{"name": "NVIDIA GeForce RTX 4090"}]) == (None, {})
    assert gv.select_profile("workstation-1", PROFILES, [{"name": "NVIDIA GeForce RTX 4090"}])[0] == "workstation-1"
    report = gv.check({"gpus": [{"index": str(i), "name": "NVIDIA L40S"} for i in range(3)]}, "auto", PROFILES)
    assert report["ok"] is True and report["profile"] is None
    assert [(f["severity"], f["check"], f["observed"]) for f in report["findings"]] == [
        ("note", "profile", "none matches 3 x NVIDIA L40S: self-consistency checks only")]
    with pytest.raises(ValueError, match="no GPU profile named 'dgx'"):
        gv.select_profile("dgx", PROFILES, [])


# --- The module path against the stand-in the lab installs ------------------------------------------------
LAB_PROFILE = {"count": 2, "model": "A100-SXM4", "nvlink": {"links_per_pair": 12, "links_per_gpu": 12,
               "min_link_gbps": 25.0}, "pcie": {"gen": 4, "width": 16}, "ecc": True, "persistence": True}


@pytest.fixture
def standin_env(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    dpkg = bin_dir / "dpkg-query"
    dpkg.write_text("#!/bin/sh\nprintf '535.309.01-0+deb12u1'\n")
    dpkg.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("NVIDIA_SMI_STANDIN_LINKS_DOWN", str(tmp_path / "links-down"))
    return tmp_path


def test_standin_passes_the_lab_profile(standin_env):
    observed, errors = gv.observe(str(STANDIN), "", 30, nvml="off")
    assert errors == []
    assert [g["driver_version"] for g in observed["gpus"]] == ["535.309.01"] * 2
    assert gv.compare(observed, LAB_PROFILE) == []


def test_standin_with_a_link_down_fails_the_lab_profile(standin_env):
    (standin_env / "links-down").write_text("1 7\n")
    observed, _ = gv.observe(str(STANDIN), "", 30, nvml="off")
    checks = {(d["check"], d["gpu"]) for d in gv.compare(observed, LAB_PROFILE)}
    assert checks == {("NVLink links per pair", "GPU0-GPU1"), ("NVLink inactive", "GPU1"),
                      ("NVLink active links", "GPU1")}


def test_module_fails_with_the_table_and_writes_the_report(standin_env):
    (standin_env / "links-down").write_text("0 3\n")
    report = standin_env / "report.json"
    args = {"ANSIBLE_MODULE_ARGS": {"profile": "lab", "profiles": {"lab": LAB_PROFILE}, "nvidia_smi": str(STANDIN),
                                    "dcgmi": "", "nvml": "off", "report_path": str(report)}}
    result = run_module(args["ANSIBLE_MODULE_ARGS"])
    assert result["failed"] is True
    assert "3 difference(s) from the expected GPU profile" in result["msg"]
    assert "| NVLink inactive" in result["msg"] and "links 3 inactive" in result["msg"]
    saved = json.loads(report.read_text())
    assert saved["ok"] is False and saved["profile"] == "lab" and saved["driver_versions"] == ["535.309.01"]


def test_module_reports_a_driver_that_is_not_loaded(tmp_path):
    args = {"ANSIBLE_MODULE_ARGS": {"profiles": {"lab": LAB_PROFILE}, "nvidia_smi": str(STANDIN), "dcgmi": ""}}
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dpkg-query").write_text("#!/bin/sh\nexit 1\n")  # no nvidia-smi package: a driverless node
    (bin_dir / "dpkg-query").chmod(0o755)
    result = run_module(args["ANSIBLE_MODULE_ARGS"], {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    assert result["failed"] is True
    assert "couldn't communicate with the NVIDIA driver" in result["msg"]

"""The GPU acceptance check's NVML source (rayrack/gpu_check.py) against the simulated libnvidia-ml.so.1: every
fault a scenario injects is named under `auto` with no matching profile, each fact says it came from NVML, and
nvidia-smi is used only for the topology matrix, or for everything where NVML does not load."""

from __future__ import annotations

import ctypes.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from gpu_faults import FAULTS, HEALTHY, faulty
from nvml_sim.support import LIBRARY, build_library, write_config

from rayrack import gpu_check

from .conftest import REPO
from .test_gpu_check import DATA, fake_nvidia_smi

# The --query-gpu fields NVML answers on a simulated H100 (persistence mode is NOT_SUPPORTED there).
NVML_FIELDS = set(gpu_check.QUERY_FIELDS) - {"persistence_mode"}


@pytest.fixture(scope="module", autouse=True)
def library() -> Path:
    return build_library()


def live(tmp_path: Path, scenario: dict | None, *args: str, nvidia_smi: str = "/nonexistent/nvidia-smi",
         library: bool = True) -> tuple[int, dict]:
    """`rayrack gpu-check --live --json` with the simulated library serving `scenario` (None: no scenario file,
    so nvmlInit_v2 fails with DRIVER_NOT_LOADED)."""
    config = tmp_path / "sim.conf"
    if scenario is not None:
        write_config(config, scenario)
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAYRACK_NVML_SCENARIO": str(config)}
    env.pop("LD_LIBRARY_PATH", None)
    if library:
        env["LD_LIBRARY_PATH"] = str(LIBRARY.parent)
    proc = subprocess.run([sys.executable, "-m", "rayrack", "gpu-check", "--live", "--json", "--dcgmi", "",
                           "--nvidia-smi", nvidia_smi, *args], capture_output=True, text=True, check=False,
                          cwd=REPO, env=env, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def errors(report: dict) -> set[tuple[str, str]]:
    return {(f["check"], f["gpu"]) for f in report["findings"] if f["severity"] == "error"}


def test_healthy_node_has_no_findings_and_every_fact_is_from_nvml(tmp_path):
    rc, report = live(tmp_path, HEALTHY)
    assert rc == 0 and report["ok"] is True and errors(report) == set(), report["findings"]
    assert report["profile"] is None
    observed = report["observed"]
    assert observed["read"] == ["NVML"]
    assert {fact for fact, sources in observed["sources"].items() if sources == ["NVML"]} == NVML_FIELDS | {"nvlink"}
    gpus = observed["gpus"]
    assert [g["name"] for g in gpus] == ["NVIDIA H100 80GB HBM3"] * 2
    assert [g["pcie.link.width.current"] for g in gpus] == ["16", "16"]
    assert {g["driver_version"] for g in gpus} == {"550.54.15"}
    assert all(g["uuid"].startswith("GPU-") and g["pci.bus_id"].startswith("00000000:") for g in gpus)
    assert gpus[0]["persistence_mode"] is None  # NOT_SUPPORTED: left out, not guessed
    link = observed["nvlink"]["0"]
    assert link["links"] == {str(n): 26.562 for n in range(18)} and link["unmeasured"] == []
    assert set(link["version"].values()) == {3} and link["remote"]["0"] == "00000000:C0:00.0"
    # nvidia-smi is absent: the topology matrix is not read, and the report says so.
    notes = {f["check"]: f["observed"] for f in report["findings"] if f["severity"] == "note"}
    assert "not found: GPU pairs and CPU/NUMA affinity not checked" in notes["topology"]
    assert observed["topology"] is None


@pytest.mark.parametrize("fault", FAULTS)
def test_each_fault_is_named_with_no_profile(tmp_path, fault):
    rc, report = live(tmp_path, faulty(fault))
    assert rc == 1 and report["profile"] is None
    assert errors(report) == {(FAULTS[fault][1], "GPU1")}, report["findings"]
    assert report["observed"]["read"] == ["NVML"]


def test_what_each_fault_looks_like(tmp_path):
    seen = {}
    for fault in FAULTS:
        _, report = live(tmp_path, faulty(fault))
        seen[fault] = next(f["observed"] for f in report["findings"] if f["gpu"] == "GPU1")
    assert seen == {"link down": "links 3 inactive", "slow link": "link 14: 13.281 GB/s",
                    "narrow PCIe link": "x8", "remap pending": "Yes", "fabric not completed": "In Progress",
                    "ECC off": "Disabled"}


def test_not_supported_leaves_the_fact_out(tmp_path):
    gpu = {**HEALTHY["gpus"][1], "unsupported": ["remapped_rows", "ecc", "nvlink", "retired_pages"]}
    gpu.pop("fabric")
    rc, report = live(tmp_path, {**HEALTHY, "gpus": [HEALTHY["gpus"][0], gpu]})
    assert rc == 0 and errors(report) == set(), report["findings"]
    gpu1 = report["observed"]["gpus"][1]
    for field in ("remapped_rows.pending", "remapped_rows.failure", "ecc.mode.current", "retired_pages.pending",
                  "fabric.state", "fabric.status"):
        assert gpu1[field] is None, field
    assert report["observed"]["nvlink"]["1"]["links"] == {}


def test_another_nvml_error_is_named_with_its_call_and_gpu(tmp_path):
    gpu = {**HEALTHY["gpus"][1], "faults": [{"call": "remapped_rows", "error": "UNKNOWN"}]}
    rc, report = live(tmp_path, {**HEALTHY, "gpus": [HEALTHY["gpus"][0], gpu]})
    assert rc == 1
    inputs = [f for f in report["findings"] if f["check"] == "input"]
    assert [(f["expected"], f["observed"]) for f in inputs] == [
        ("an answer from NVML", "NVML nvmlDeviceGetRemappedRows on GPU1: Unknown Error (999)")]
    assert errors(report) == {("input", "-")}
    # The GPU's other facts were still read.
    assert report["observed"]["gpus"][1]["pcie.link.width.current"] == "16"


def test_topology_comes_from_nvidia_smi_and_the_rest_from_nvml(tmp_path):
    script = fake_nvidia_smi(tmp_path, {"nvidia-smi-topo-m.txt": (DATA / "workstation-2x-rtx5090" /
                                                                 "topo-m.txt").read_text()})
    rc, report = live(tmp_path, HEALTHY, nvidia_smi=str(script))
    assert rc == 0, report["findings"]
    observed = report["observed"]
    assert observed["read"] == ["NVML", "nvidia-smi topo -m"]
    assert observed["sources"]["topology"] == ["nvidia-smi topo -m"]
    assert observed["sources"]["pcie.link.width.current"] == ["NVML"]
    assert observed["topology"]["links"]["GPU0"] == {"GPU1": "PHB"}
    assert "topology" not in observed["unread"]


def test_without_nvml_nvidia_smi_gives_everything(tmp_path):
    query = "index, name, pcie.link.width.current, pcie.link.width.max\n0, NVIDIA H100 80GB HBM3, 8, 16\n"
    script = fake_nvidia_smi(tmp_path, {"nvidia-smi-query-gpu.csv": query})
    # The library loads but nvmlInit_v2 fails (no scenario: DRIVER_NOT_LOADED); then no library at all (where
    # this host has no NVML of its own).
    for library in (True, False) if ctypes.util.find_library("nvidia-ml") is None else (True,):
        rc, report = live(tmp_path, None, nvidia_smi=str(script), library=library)
        observed = report["observed"]
        assert rc == 1
        assert observed["read"][0] == "nvidia-smi --query-gpu"
        assert observed["sources"]["pcie.link.width.current"] == ["nvidia-smi --query-gpu"]
        assert ("PCIe width", "GPU0") in errors(report)
        assert "nvidia-smi only" in observed["unread"]["NVML"]
    assert "Driver Not Loaded" in live(tmp_path, None, nvidia_smi=str(script))[1]["observed"]["unread"]["NVML"]


def test_a_library_that_is_not_nvml_is_not_used(tmp_path):
    source = tmp_path / "other.c"
    source.write_text("int something(void) { return 0; }\n")
    other = tmp_path / "libother.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(other), str(source)], check=True)
    with pytest.raises(gpu_check.NvmlUnavailable, match=r"libother\.so is not NVML: it has no nvmlErrorString"):
        gpu_check.observe_nvml(str(other))
    with pytest.raises(gpu_check.NvmlUnavailable, match=r"does not load: .*nope\.so"):
        gpu_check.observe_nvml(str(tmp_path / "nope.so"))


def test_nvml_off_reads_nvidia_smi_only(tmp_path):
    query = "index, name\n0, NVIDIA L40S\n"
    script = fake_nvidia_smi(tmp_path, {"nvidia-smi-query-gpu.csv": query})
    _, report = live(tmp_path, HEALTHY, "--nvml", "off", nvidia_smi=str(script))
    assert [g["name"] for g in report["observed"]["gpus"]] == ["NVIDIA L40S"]
    assert "NVML" not in report["observed"]["read"] and report["observed"]["unread"] == {}


def test_a_hung_nvml_falls_back_to_nvidia_smi(tmp_path):
    gpu = {**HEALTHY["gpus"][1], "faults": [{"call": "pcie", "error": "hang"}]}
    script = fake_nvidia_smi(tmp_path, {"nvidia-smi-query-gpu.csv": "index, name\n0, NVIDIA H100 80GB HBM3\n"})
    _, report = live(tmp_path, {**HEALTHY, "gpus": [HEALTHY["gpus"][0], gpu]}, "--timeout", "2",
                     nvidia_smi=str(script))
    assert report["observed"]["unread"]["NVML"] == "no answer from NVML within 2s; nvidia-smi only"
    assert report["observed"]["read"][0] == "nvidia-smi --query-gpu"


def test_the_module_reads_nvml_and_fails_naming_the_fault(tmp_path):
    from .test_gpu_validate import run_module

    config = tmp_path / "sim.conf"
    write_config(config, faulty("slow link"))
    report_path = tmp_path / "report.json"
    result = run_module({"profiles": gpu_check.load_profiles(), "nvidia_smi": "/nonexistent/nvidia-smi",
                         "dcgmi": "", "report_path": str(report_path)},
                        {"LD_LIBRARY_PATH": str(LIBRARY.parent), "RAYRACK_NVML_SCENARIO": str(config)})
    assert result["failed"] is True
    assert "NVLink bandwidth" in result["msg"] and "link 14: 13.281 GB/s" in result["msg"]
    saved = json.loads(report_path.read_text())
    assert saved["observed"]["read"] == ["NVML"] and saved["profile"] is None
    assert [(d["check"], d["gpu"]) for d in result["differences"]] == [("NVLink bandwidth", "GPU1")]


def test_fault_scenarios_are_valid_yaml_scenarios():
    # The lab test sends them through `ray-agent nvml-sim compile` as files.
    for fault in FAULTS:
        assert yaml.safe_load(yaml.safe_dump(faulty(fault))) == faulty(fault)

"""tests/gpu/nvml_differential.py without a GPU: its simulated half against the built library, and its
comparison on answers that differ the ways a real library can."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pynvml
import pytest
from nvml_sim.support import REPO, build_library

from gpu import nvml_differential as differential

SCRIPT = Path(differential.__file__)


@pytest.fixture(scope="module")
def library() -> Path:
    return build_library()


def run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_the_simulated_library_answers_within_the_documented_ranges(library, tmp_path: Path):
    result = run("--sim-only", "--json", str(tmp_path / "answers.json"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "simulated (8 GPUs, builtin:demo-8gpu)" in result.stdout and "0 mismatches" in result.stdout
    answers = json.loads((tmp_path / "answers.json").read_text())
    assert answers["real"] is None and answers["mismatches"] == []
    gpus = answers["sim"]["gpus"]
    assert len(gpus) == 8
    calls = {name for name, *_ in differential._calls(pynvml)}
    for gpu in gpus:
        assert set(gpu) == calls
        for call in ("nvmlDeviceGetName", "nvmlDeviceGetUUID", "nvmlDeviceGetPciInfo", "nvmlDeviceGetMemoryInfo",
                     "nvmlDeviceGetUtilizationRates", "nvmlDeviceGetPowerUsage", "nvmlDeviceGetTemperature(GPU)"):
            assert gpu[call].get("in_range") is True, (call, gpu[call])
    assert answers["sim"]["system"]["nvmlSystemGetDriverVersion"]["shape"] == "str"


def test_the_gpm_half_runs_against_the_simulated_library(library):
    result = run("--gpm", "--sim-only")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [f"GPU {i}" for i in range(8)]
    assert all("GPM support" in line for line in lines)


def test_a_missing_library_is_a_clear_error_not_a_traceback(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(differential, "SIM_DIR", tmp_path / "nowhere")
    assert differential.main(["--sim-only"]) == 2


def answer(value, in_range: bool = True) -> dict:
    return {"value": value, "shape": differential.shape(value), "in_range": in_range}


def side(gpu: dict, system: dict | None = None) -> dict:
    return {"init": "SUCCESS", "count": 1, "system": system or {}, "gpus": [gpu]}


def test_every_kind_of_difference_is_a_row():
    real = side({"fan": {"error": "NOT_SUPPORTED"}, "memory": answer({"total": 8, "used": 1}),
                 "temperature": answer(40), "processes": answer([]), "clock": answer(1980, in_range=False)},
                {"nvmlSystemGetCudaDriverVersion": answer(13000)})
    sim = side({"fan": answer(30), "memory": answer({"total": 8, "used": 1.5}), "temperature": answer(40),
                "processes": answer([{"pid": 1}]), "clock": answer(1410)},
               {"nvmlSystemGetCudaDriverVersion": answer("13.0")})
    rows = differential.mismatches(real, sim)
    assert sorted((call, gpu, what) for call, gpu, _, _, what in rows) == [
        ("clock", "0", "out of range"),
        ("fan", "0", "answer"),
        ("memory", "0", "type"),
        ("nvmlSystemGetCudaDriverVersion", "-", "type"),
    ]
    assert ("fan", "0", "NOT_SUPPORTED", "SUCCESS", "answer") in rows
    printed = differential.table(rows)
    assert printed.splitlines()[0].split() == ["call", "gpu", "real", "simulated", "differs", "in"]
    assert len(printed.splitlines()) == 2 + len(rows)


def test_identical_sides_do_not_differ_and_a_failed_init_is_one_row():
    gpu = {"temperature": answer(40), "fan": {"error": "NOT_SUPPORTED"}}
    assert differential.mismatches(side(gpu), side(dict(gpu))) == []
    assert differential.mismatches({"init": "DRIVER_NOT_LOADED"}, side(gpu)) == [
        ("nvmlInit", "-", "DRIVER_NOT_LOADED", "SUCCESS", "init")]

"""Where the library looks for its scenario when RAYRACK_NVML_SCENARIO is not set: the path it was built with,
the nvml_sim role's (under rayrack_config_dir) on the nodes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jinja2
import yaml

from nvml_sim.support import REPO, write_config

A100 = {"model": "NVIDIA A100-SXM4-80GB", "memory_total": "80GiB"}
COUNT = "import pynvml\npynvml.nvmlInit()\nprint(pynvml.nvmlDeviceGetCount())\n"


def role_default_config() -> str:
    config_dir = yaml.safe_load((REPO / "roles/rayrack/defaults/main.yml").read_text())["rayrack_config_dir"]
    template = yaml.safe_load((REPO / "roles/nvml_sim/vars/main.yml").read_text())["_nvml_sim_config"]
    return jinja2.Template(template).render(rayrack_config_dir=config_dir)


def build(config: Path | str, library: Path) -> None:
    result = subprocess.run(["make", "--no-print-directory", "nvml-sim", f"NVML_SIM_CONFIG={config}",
                             f"NVML_SIM_LIB={library}"], cwd=REPO, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def device_count(library: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "RAYRACK_NVML_SCENARIO"}
    env["LD_LIBRARY_PATH"] = str(library.parent)
    return subprocess.run([sys.executable, "-c", COUNT], env=env, capture_output=True, text=True, timeout=60,
                          check=False)


def test_the_library_reads_the_path_it_was_built_with(tmp_path: Path) -> None:
    config = tmp_path / "etc" / "site" / "nvml-sim.conf"
    library = tmp_path / "lib" / "libnvidia-ml.so.1"
    build(config, library)
    missing = device_count(library)
    assert missing.returncode != 0 and "NVMLError_DriverNotLoaded" in missing.stderr, missing.stderr
    config.parent.mkdir(parents=True)
    write_config(config, {"gpus": [A100, A100, A100]})
    found = device_count(library)
    assert found.returncode == 0, found.stderr
    assert found.stdout.split() == ["3"]


def test_a_plain_build_defaults_to_the_role_default_path(nvml_sim_library: Path) -> None:
    # `make nvml-sim` without NVML_SIM_CONFIG serves what the role installs with rayrack_config_dir's default.
    assert role_default_config().encode() + b"\0" in nvml_sim_library.read_bytes()

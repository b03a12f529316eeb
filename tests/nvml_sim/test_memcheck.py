"""valgrind memcheck of a C client exercising the library: no invalid reads or writes, no leaks."""

from __future__ import annotations

import subprocess
from pathlib import Path

import required

from nvml_sim.support import client_env, write_config
from ray_agent.gpu.fake import resolve_scenario_path

CLIENT = Path(__file__).with_name("memcheck_client.c")


def test_memcheck_clean(nvml_sim_library: Path, tmp_path: Path) -> None:
    valgrind = required.binary("valgrind", "`make host-deps` installs it")
    binary = tmp_path / "client"
    subprocess.run(
        [
            "gcc",
            "-std=gnu11",
            "-g",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-o",
            str(binary),
            str(CLIENT),
            f"-L{nvml_sim_library.parent}",
            "-l:libnvidia-ml.so.1",
        ],
        check=True,
    )
    # The demo scenario: faults, processes, XIDs, NVLink; plus real processes from CUDA_VISIBLE_DEVICES.
    text = resolve_scenario_path("builtin:demo-8gpu").read_text(encoding="utf-8")
    text = text.replace(
        "processes:\n      - {pid: 33001, user: carol, memory: 40GiB}", "processes: from_cuda_visible_devices", 1
    )
    assert "from_cuda_visible_devices" in text
    config = tmp_path / "sim.conf"
    write_config(config, text, 160.0)
    proc = subprocess.run(
        [
            valgrind,
            "--error-exitcode=99",
            "--leak-check=full",
            "--errors-for-leak-kinds=definite,indirect",
            "--show-leak-kinds=definite,indirect",
            str(binary),
        ],
        env=client_env(config),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "failures 0" in proc.stdout
    assert "ERROR SUMMARY: 0 errors" in proc.stderr

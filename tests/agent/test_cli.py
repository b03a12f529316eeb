"""The real `ray-agent` command: exit codes, messages, degraded mode, hangs and SIGTERM."""

from __future__ import annotations

import ctypes.util
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agent.support import SCENARIOS, poll_metrics, sample_value, wait_for_metrics
from ray_agent import __version__
from ray_agent.cli import EXIT_FAILURE, EXIT_LISTEN, EXIT_OK, EXIT_USAGE

NO_NVML = ctypes.util.find_library("nvidia-ml") is None


def ray_agent(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ray_agent.cli", *args], capture_output=True, text=True, timeout=60, cwd=cwd
    )


def write_config(path: Path, document: dict) -> Path:
    path.write_text(yaml.safe_dump(document))
    return path


def test_version() -> None:
    result = ray_agent("--version")
    assert result.returncode == EXIT_OK
    assert result.stdout.strip() == f"ray-agent {__version__}"


def test_unknown_flag_is_a_usage_error() -> None:
    result = ray_agent("--web.listen-adress=:1")
    assert result.returncode == EXIT_USAGE
    assert "unrecognized arguments: --web.listen-adress" in result.stderr


def test_bad_config_names_the_key(tmp_path: Path) -> None:
    config = write_config(tmp_path / "agent.yml", {"gpu": {"backend": "rocm"}})
    result = ray_agent("--config.file", str(config))
    assert result.returncode == EXIT_USAGE
    assert "gpu.backend: 'rocm' is not allowed; allowed values: nvml, fake" in result.stderr


def test_bad_listen_flag() -> None:
    result = ray_agent("--web.listen-address", "127.0.0.1:http")
    assert result.returncode == EXIT_USAGE
    assert "--web.listen-address: port must be a number" in result.stderr


def test_invalid_scenario_is_a_usage_error(tmp_path: Path) -> None:
    scenario = tmp_path / "s.yml"
    scenario.write_text("gpus: [{model: A, memory_total: 1GiB, utilization: 2}]\n")
    result = ray_agent(
        "--web.listen-address", "127.0.0.1:1", "--gpu.backend", "fake", "--gpu.fake-scenario", str(scenario)
    )
    assert result.returncode == EXIT_USAGE
    assert "gpus[0].utilization: 2 is above the maximum 1" in result.stderr


def test_port_taken_exits_3_with_a_clear_message() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = ray_agent(
            "--web.listen-address",
            f"127.0.0.1:{port}",
            "--gpu.backend",
            "fake",
            "--gpu.fake-scenario",
            "builtin:lab-2gpu",
        )
    assert result.returncode == EXIT_LISTEN
    assert f"cannot listen on 127.0.0.1:{port}: the port is already in use" in result.stderr


def test_check_healthy() -> None:
    result = ray_agent("check", "--gpu.backend", "fake", "--gpu.fake-scenario", "builtin:lab-2gpu")
    assert result.returncode == EXIT_OK, result.stderr
    assert "GPU backend  fake: up, driver 550.54.15, 2 GPU(s)" in result.stdout
    assert "NVIDIA L4" in result.stdout and "gpu 1 nvlink: NOT_SUPPORTED (3)" in result.stdout
    assert "Attribution  " in result.stdout
    assert not [line for line in result.stdout.splitlines() if line.startswith("Host ")], result.stdout


def test_check_reports_a_lost_gpu() -> None:
    result = ray_agent("check", "--config.file", str(SCENARIOS / "golden.config.yml"))
    assert result.returncode == EXIT_FAILURE
    assert "DOWN GPU_IS_LOST (15)" in result.stdout
    assert "gpu 0 pid 1001 user alice 20480 MiB" in result.stdout


@pytest.mark.skipif(not NO_NVML, reason="an NVIDIA driver is installed here")
def test_check_without_nvidia_driver() -> None:
    result = ray_agent("check", "--gpu.backend", "nvml")
    assert result.returncode == EXIT_FAILURE
    assert "GPU backend  nvml: DOWN, LIBRARY_NOT_FOUND (12)" in result.stdout


@pytest.mark.skipif(not NO_NVML, reason="an NVIDIA driver is installed here")
def test_run_degraded_without_nvidia_driver(agent_process, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "agent.yml",
        {
            "collection": {"interval": "200ms", "call_timeout": "100ms", "backend_retry_interval": "200ms"},
            "attribution": {"enabled": False},
        },
    )
    agent = agent_process(["--config.file", str(config), "--gpu.backend", "nvml"])
    wait_for_metrics(agent.url, agent.process)
    # Let a few retries happen; the agent keeps running and collecting meanwhile.
    body = poll_metrics(agent.url, lambda b: (sample_value(b, "rayrack_gpu_backend_init_failures_total") or 0) >= 3)
    assert sample_value(body, "rayrack_gpu_backend_init_failures_total") >= 3
    assert sample_value(body, "rayrack_gpu_backend_up", backend="nvml") == 0
    assert sample_value(body, "rayrack_gpu_backend_error_info", code="12", error="LIBRARY_NOT_FOUND") == 1
    assert sample_value(body, "rayrack_up") == 1
    assert sample_value(body, "rayrack_last_collection_timestamp_seconds") > 0
    assert agent.process.poll() is None
    assert agent.stop() == EXIT_OK


def test_sigterm_with_a_hung_gpu_exits_cleanly(agent_process, tmp_path: Path) -> None:
    scenario = tmp_path / "hang.yml"
    scenario.write_text(
        yaml.safe_dump(
            {
                "gpus": [
                    {"model": "A", "memory_total": "8GiB"},
                    {
                        "model": "B",
                        "memory_total": "8GiB",
                        "faults": [{"call": "temperature", "error": "hang"}],
                    },
                ]
            }
        )
    )
    config = write_config(
        tmp_path / "agent.yml",
        {
            "gpu": {"backend": "fake", "fake_scenario": str(scenario)},
            "collection": {"interval": "200ms", "call_timeout": "100ms"},
            "attribution": {"enabled": False},
        },
    )
    agent = agent_process(["--config.file", str(config)])
    wait_for_metrics(agent.url, agent.process)
    body = poll_metrics(agent.url, lambda b: sample_value(b, "rayrack_gpu_up", gpu="1") is not None)
    assert sample_value(body, "rayrack_gpu_up", gpu="0") == 1
    assert sample_value(body, "rayrack_gpu_up", gpu="1") == 0
    assert agent.stop() == EXIT_OK
    stderr = agent.process.stderr.read()
    assert "received SIGTERM" in stderr and "msg=stopped" in stderr


def test_check_config_accepts_a_good_file_without_touching_hardware(tmp_path: Path) -> None:
    config = write_config(tmp_path / "agent.yml", {"gpu": {"backend": "nvml"}, "collection": {"interval": "5s"}})
    result = ray_agent("check-config", "--config.file", str(config))
    assert result.returncode == EXIT_OK, result.stderr
    assert result.stdout.strip() == "ray-agent: configuration OK"


def test_check_config_rejects_a_broken_scenario(tmp_path: Path) -> None:
    scenario = tmp_path / "s.yml"
    scenario.write_text("gpus: [{model: A, memory_total: 1GiB, utilization: 2}]\n")
    config = write_config(tmp_path / "agent.yml", {"gpu": {"backend": "fake", "fake_scenario": "s.yml"}})
    result = ray_agent("check-config", "--config.file", str(config))
    assert result.returncode == EXIT_USAGE
    assert "utilization" in result.stderr

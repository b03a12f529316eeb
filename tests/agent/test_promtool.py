"""`promtool check metrics` on what a running agent serves over HTTP."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import required
import yaml

from agent.support import SCENARIOS, wait_for_metrics

pytestmark = pytest.mark.promtool


def promtool() -> str:
    return required.binary("promtool", "`make host-deps` installs Debian's prometheus package")


def lint(binary: str, body: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [binary, "check", "metrics"], input=body, capture_output=True, text=True, timeout=60
    )


def served(agent_process, tmp_path: Path, dcgm_compat: bool) -> str:
    config = tmp_path / "agent.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "gpu": {"backend": "fake", "fake_scenario": str(SCENARIOS / "golden.yml")},
                "exporter": {"dcgm_compat": dcgm_compat},
                "collection": {"interval": "500ms", "call_timeout": "200ms"},
                "attribution": {"enabled": False},
            }
        )
    )
    agent = agent_process(["--config.file", str(config)])
    return wait_for_metrics(agent.url, agent.process)


def test_native_metrics_pass_promtool(agent_process, tmp_path: Path) -> None:
    binary = promtool()
    body = served(agent_process, tmp_path, dcgm_compat=False)
    assert "rayrack_gpu_utilization_ratio" in body and "process_resident_memory_bytes" in body
    result = lint(binary, body)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == ""


def test_dcgm_names_parse_and_only_their_label_names_are_linted(agent_process, tmp_path: Path) -> None:
    binary = promtool()
    body = served(agent_process, tmp_path, dcgm_compat=True)
    assert "DCGM_FI_DEV_GPU_UTIL{" in body
    result = lint(binary, body)
    problems = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    # dcgm-exporter's own label `modelName` is camelCase; keeping it is the point of compatibility mode.
    assert problems, "expected promtool to mention the camelCase modelName label"
    # dcgm-exporter's own name DCGM_FI_DEV_PCIE_REPLAY_COUNTER contains a type word; it is kept as dcgm spells it.
    dcgm_spelling = "DCGM_FI_DEV_PCIE_REPLAY_COUNTER metric name should not include type 'counter'"
    for problem in problems:
        assert problem == dcgm_spelling or (
            problem.startswith("DCGM_FI_DEV_") and "label names should be written in 'snake_case'" in problem
        ), problem

"""Fixtures for the simulated libnvidia-ml tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from nvml_sim.support import build_library


@pytest.fixture(scope="session")
def nvml_sim_library() -> Path:
    return build_library()

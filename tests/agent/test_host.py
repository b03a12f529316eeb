"""Host readings from procfs, and the default listen address from the routing table."""

from __future__ import annotations

import ipaddress
import shutil
from pathlib import Path

import pytest

from agent.support import PROC_FIXTURE
from ray_agent.host import HostReader, HostReadError
from ray_agent.server import ListenError, default_route_address


def test_fixture_values() -> None:
    sample = HostReader(PROC_FIXTURE).read()
    assert sample.memory_total_bytes == 263842512 * 1024
    assert sample.memory_available_bytes == 201326592 * 1024
    assert (sample.swap_total_bytes, sample.swap_free_bytes) == (8388604 * 1024, 8000000 * 1024)
    assert dict(sample.cpu_seconds)["idle"] == 900000.0
    assert [mode for mode, _ in sample.cpu_seconds] == [
        "user",
        "nice",
        "system",
        "idle",
        "iowait",
        "irq",
        "softirq",
        "steal",
    ]


def test_this_machine() -> None:
    sample = HostReader().read()
    assert 0 < sample.memory_available_bytes <= sample.memory_total_bytes
    assert sum(seconds for _, seconds in sample.cpu_seconds) > 0


def test_missing_and_incomplete_files(tmp_path: Path) -> None:
    with pytest.raises(HostReadError, match=r"cannot read .*meminfo"):
        HostReader(tmp_path).read()
    shutil.copy(PROC_FIXTURE / "stat", tmp_path / "stat")
    (tmp_path / "meminfo").write_text("MemTotal: 10 kB\n")
    with pytest.raises(HostReadError, match="has no MemAvailable line"):
        HostReader(tmp_path).read()


def test_default_route_address() -> None:
    with pytest.raises(ListenError, match="no default route"):
        default_route_address(PROC_FIXTURE)
    try:
        address = default_route_address()
    except ListenError:
        pytest.skip("this machine has no default route")
    assert not ipaddress.ip_address(address).is_unspecified

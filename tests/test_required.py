"""tests/required.py: what a test needs from the host skips it on a workstation and fails it under CI=true."""

from __future__ import annotations

import pytest
import required

ABSENT = "rayrack-no-such-tool"


def test_missing_skips_when_ci_is_unset(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="amtool is not installed"):
        required.missing("amtool is not installed")


def test_missing_skips_when_ci_is_not_true(monkeypatch):
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception):
        required.missing("amtool is not installed")


def test_missing_fails_under_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="amtool is not installed: required in CI"):
        required.missing("amtool is not installed")


def test_binary_names_the_tool_and_how_to_install_it(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=f"{ABSENT} is not installed \\(apt-get install it\\)"):
        required.binary(ABSENT, "apt-get install it")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match=ABSENT):
        required.binary(ABSENT, "apt-get install it")


def test_binary_returns_the_path_of_an_installed_tool(monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert required.binary("sh", "coreutils").endswith("/sh")

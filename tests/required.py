"""What a test needs from the host. On a workstation a missing tool skips the test; under CI=true it fails it,
because `make test` installs everything (`make host-deps`) and a skip there would hide a broken set-up."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NoReturn

import pytest


def missing(what: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what}: required in CI")
    pytest.skip(what)


def binary(name: str, install: str) -> str:
    path = shutil.which(name)
    if path is None:
        missing(f"{name} is not installed ({install})")
    return path


def shared_fixtures(*parts: str) -> Path:
    """A path under ../shared/fixtures (real artefacts of other tools, read at run time, never copied here)."""
    path = Path(__file__).resolve().parents[2].joinpath("shared", "fixtures", *parts)
    if not path.exists():
        missing(f"{path} is not there (the shared fixtures sit next to the checkout)")
    return path

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


# Artefacts published by other GPU-monitoring projects (dashboards, alert rules, captures), kept next to the
# repository and read at run time, never copied into it.
ECOSYSTEM = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "gpu-ecosystem"


def ecosystem(relative: str) -> Path:
    path = ECOSYSTEM / relative
    if not path.exists():
        missing(f"{path} is missing (the gpu-ecosystem fixtures live in ../shared next to the repository)")
    return path

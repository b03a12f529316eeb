"""What a test needs from the host. On a workstation a missing tool skips the test; under CI=true it fails it,
because `make test` installs everything (`make host-deps`) and a skip there would hide a broken set-up."""

from __future__ import annotations

import os
import shutil
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

"""Helpers for tests of the Ansible content: load project files that Ansible loads by path."""

import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
ROLES = REPO / "roles"


def load_module(path: Path, name: str) -> ModuleType:
    # An explicit loader: Ansible fact scripts have no .py suffix.
    loader = importlib.machinery.SourceFileLoader(name, str(path))
    spec = importlib.util.spec_from_loader(name, loader)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module

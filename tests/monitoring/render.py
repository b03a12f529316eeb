"""Render a role's template the way the role does, with the role's defaults and vars, on the controller."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
ANSIBLE = Path(sys.executable).parent / "ansible"


def role_vars(role: str) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    # The rayrack role comes first in every play: its defaults and vars are every other role's too.
    for path in (REPO / "roles" / "rayrack" / "defaults" / "main.yml", REPO / "roles" / "rayrack" / "vars" / "main.yml",
                 REPO / "roles" / role / "defaults" / "main.yml", REPO / "roles" / role / "vars" / "main.yml"):
        merged.update(yaml.safe_load(path.read_text()) or {})
    return merged


def render(role: str, template: str, dest: Path, overrides: dict[str, Any] | None = None) -> str:
    variables = {**role_vars(role), "role_path": str(REPO / "roles" / role), **(overrides or {})}
    extra = dest.with_suffix(dest.suffix + ".vars.json")
    extra.write_text(json.dumps(variables))
    src = REPO / "roles" / role / "templates" / template
    # The project's ansible.cfg finds its filters, as every play does.
    env = dict(os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"), ANSIBLE_CACHE_PLUGIN_CONNECTION=str(dest.parent))
    result = subprocess.run(
        [str(ANSIBLE), "localhost", "-c", "local", "-i", "localhost,", "-m", "ansible.builtin.template",
         "-a", f"src={src} dest={dest} mode=0600", "-e", f"@{extra}",
         "-e", f"ansible_python_interpreter={sys.executable}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return dest.read_text()

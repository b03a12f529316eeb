"""Helpers for tests of the Ansible content: load project files that Ansible loads by path."""

import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
ROLES = REPO / "roles"
FILTERS = REPO / "plugins" / "filter"


def load_module(path: Path, name: str) -> ModuleType:
    # An explicit loader: Ansible fact scripts have no .py suffix.
    loader = importlib.machinery.SourceFileLoader(name, str(path))
    spec = importlib.util.spec_from_loader(name, loader)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def run_play(directory: Path, inventory: Mapping, play: str, extra_vars: Mapping[str, object],
             env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """PLAY against a throwaway INVENTORY written to DIRECTORY, the way the project runs Ansible (its ansible.cfg,
    the venv's ansible-playbook); ENV adds what the play needs (plugin or role paths). It must pass."""
    (directory / "hosts.json").write_text(json.dumps(inventory))
    (directory / "play.yml").write_text(play)
    result = subprocess.run(
        [str(REPO / ".venv" / "bin" / "ansible-playbook"), "-i", str(directory / "hosts.json"),
         str(directory / "play.yml"), "-e", json.dumps(dict(extra_vars))],
        cwd=REPO, capture_output=True, text=True, check=False,
        env={**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"), "ANSIBLE_INVENTORY_UNPARSED_WARNING": "0",
             "ANSIBLE_LOCALHOST_WARNING": "0", **env})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    return result


def role_vars_files(roles: list[str], parts: tuple[str, ...] = ("defaults", "vars")) -> list[str]:
    """The ROLES' defaults and vars files, in the order the roles load them."""
    return [f"{ROLES}/{role}/{part}/main.yml" for role in roles for part in parts
            if (ROLES / role / part / "main.yml").exists()]


def template_play(hosts: str, role: str, template: str, dest: str = "{{ dest }}", defaults: bool = True) -> str:
    """A play rendering ROLE's TEMPLATE on the controller for HOSTS, with the rayrack and ROLE defaults (unless the
    inventory carries them: defaults=False) and vars, as the role would; DEST may use the play's variables."""
    files = role_vars_files(["rayrack", role], ("defaults", "vars") if defaults else ("vars",))
    return json.dumps([{"hosts": hosts, "gather_facts": False, "vars_files": files, "tasks": [
        {"ansible.builtin.template": {"src": f"{ROLES}/{role}/templates/{template}", "dest": dest, "mode": "0644"},
         "delegate_to": "localhost"}]}])


def play_with_role_vars(roles: list[str], tasks: str) -> str:
    """A play on every host that loads ROLES' defaults and vars as the roles would, then runs TASKS (YAML)."""
    files = "".join(f"    - {path}\n" for path in role_vars_files(roles))
    return f"- hosts: all\n  gather_facts: false\n  vars_files:\n{files}  tasks:\n{tasks}"

"""The inventory as Ansible sees it (through `ansible-inventory --list`), and SSH to its nodes."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

HEAD_GROUP, WORKER_GROUP, MONITORING_GROUP = "ray_head", "ray_workers", "monitoring"
ROLES = Path(__file__).resolve().parents[1] / "roles"
# A template the CLI can resolve itself: nothing but other settings, e.g. "{{ rayrack_prefix }}/venv".
_REFERENCE = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def role_defaults(*roles: str) -> dict[str, Any]:
    """The roles' defaults/main.yml, merged: the values the CLI uses when the inventory sets none."""
    merged: dict[str, Any] = {}
    for role in roles:
        merged.update(yaml.safe_load((ROLES / role / "defaults" / "main.yml").read_text()) or {})
    return merged


def _filter(module: str) -> Any:
    """A filter plugin as a module: the CLI reads what the playbooks write with the playbooks' own code."""
    path = ROLES.parent / "plugins" / "filter" / f"{module}.py"
    spec = importlib.util.spec_from_file_location(f"rayrack_filters_{module}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"no filter plugin at {path}")
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


# A venv's marker -> its wheelhouse identity ({} without one).
wheelhouse_marker = _filter("rayrack_wheelhouse").rayrack_wheelhouse_marker

# Role defaults the CLI needs on the controller, read from the roles themselves; an inventory value wins.
DEFAULTS: dict[str, Any] = role_defaults("rayrack", "prometheus")


@dataclass(frozen=True)
class Host:
    name: str
    role: str  # head or worker
    vars: Mapping[str, Any]

    @property
    def address(self) -> str:
        """The IP Ray uses for the node: ray_node_ip, else ansible_host, else the name."""
        return str(self.vars.get("ray_node_ip") or self.vars.get("ansible_host") or self.name)

    def setting(self, name: str, _depth: int = 0) -> Any:
        """The inventory's value, else the role default; templates of other settings alone are resolved, any other
        template (a filter, a fact) gives None."""
        value = self.vars.get(name, DEFAULTS.get(name))
        if not isinstance(value, str) or "{{" not in value:
            return value
        if _depth > 8 or "{{" in _REFERENCE.sub("", value) or "{%" in value:
            return None
        parts = {ref: self.setting(ref, _depth + 1) for ref in _REFERENCE.findall(value)}
        if any(part is None for part in parts.values()):
            return None
        return _REFERENCE.sub(lambda m: str(parts[m.group(1)]), value)

    @property
    def ray_unit(self) -> str:
        """The node's Ray unit (rayrack_ray_units, by what the node is)."""
        return str(self.setting("rayrack_ray_units")[self.role])

    @property
    def ray_venv_marker(self) -> str:
        """Where the node's Ray venv keeps its wheelhouse identity."""
        return f"{self.setting('rayrack_venv_dir')}/{self.setting('rayrack_venv_marker')}"

    def ssh_command(self, remote: str) -> list[str]:
        """ssh as Ansible would reach the node (user, port, key, common and extra args), non-interactive."""
        v = self.vars
        cmd = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]
        if v.get("ansible_port"):
            cmd += ["-p", str(v["ansible_port"])]
        if v.get("ansible_ssh_private_key_file"):
            cmd += ["-i", str(v["ansible_ssh_private_key_file"])]
        for key in ("ansible_ssh_common_args", "ansible_ssh_extra_args"):
            if v.get(key):
                cmd += shlex.split(str(v[key]))
        target = str(v.get("ansible_host") or self.name)
        user = v.get("ansible_user")
        return [*cmd, f"{user}@{target}" if user else target, remote]


@dataclass(frozen=True)
class Inventory:
    path: Path
    hosts: tuple[Host, ...]
    monitoring: tuple[Host, ...] = ()  # the monitoring group, when the inventory has one

    @property
    def directory(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent

    @property
    def head(self) -> Host | None:
        return next((h for h in self.hosts if h.role == "head"), None)

    @property
    def monitoring_host(self) -> Host | None:
        """Where Prometheus runs: the monitoring group's first host, or the head (playbooks/monitoring.yml)."""
        return self.monitoring[0] if self.monitoring else self.head

    def get(self, name: str) -> Host | None:
        return next((h for h in self.hosts if h.name == name), None)

    def setting(self, name: str) -> Any:
        anchor = self.head or (self.hosts[0] if self.hosts else None)
        return anchor.setting(name) if anchor else DEFAULTS.get(name)


def _group_hosts(listing: Mapping[str, Any], group: str, seen: set[str] | None = None) -> list[str]:
    """Hosts of a group and of its child groups, in inventory order."""
    seen = set() if seen is None else seen
    if group in seen:
        return []
    seen.add(group)
    entry = listing.get(group) or {}
    hosts = list(entry.get("hosts") or [])
    for child in entry.get("children") or []:
        hosts += [h for h in _group_hosts(listing, child, seen) if h not in hosts]
    return hosts


def parse_listing(path: Path, listing: Mapping[str, Any]) -> Inventory:
    """`ansible-inventory --list` output -> the Ray nodes: the head first, then the workers."""
    hostvars = (listing.get("_meta") or {}).get("hostvars") or {}
    heads = _group_hosts(listing, HEAD_GROUP)
    workers = [h for h in _group_hosts(listing, WORKER_GROUP) if h not in heads]
    hosts = [Host(h, "head", hostvars.get(h) or {}) for h in heads]
    hosts += [Host(h, "worker", hostvars.get(h) or {}) for h in workers]
    monitoring = [Host(h, "monitoring", hostvars.get(h) or {}) for h in _group_hosts(listing, MONITORING_GROUP)]
    return Inventory(path, tuple(hosts), tuple(monitoring))


def load(path: Path) -> Inventory:
    tool = Path(sys.executable).parent / "ansible-inventory"
    command = str(tool) if tool.exists() else shutil.which("ansible-inventory") or "ansible-inventory"
    result = subprocess.run([command, "-i", str(path), "--list"], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"ansible-inventory could not read {path}: {result.stderr.strip()[-2000:]}")
    return parse_listing(path, json.loads(result.stdout))

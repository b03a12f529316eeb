"""`rayrack status`: one table of the cluster from the nodes themselves, the head's Ray APIs and the agents."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from ray_agent import ray_api
from ray_agent.gpu_state import GpuState
from rayrack.inventory import Host, Inventory, wheelhouse_marker
from rayrack.progress import format_duration
from rayrack.remote import run_python

# Runs on every node with its system python3, as the SSH user (no sudo): the Ray unit, the Ray venv's marker,
# the agent's /metrics and, on the head, Ray's view (the token arrives on stdin, never on a command line).
# It goes with the Ray HTTP client's source, so the node needs no package of ours.
NODE_PROBE = ray_api.source() + r"""
import json, subprocess, sys
unit, marker, address, agent_port, api = sys.argv[1:6]
out = {"active": subprocess.run(["systemctl", "is-active", unit], capture_output=True, text=True).stdout.strip()}
try:
    out["wheelhouse"] = open(marker).read()
except OSError:
    out["wheelhouse"] = None
try:
    out["metrics"] = RayApi(f"http://{address}:{agent_port}", timeout=5).text("/metrics")
except Exception as exc:
    out["metrics_error"] = str(exc)
if api:
    head = RayApi(api, timeout=10, token=sys.stdin.read().strip() or None)
    for key, path in [("version", "/api/version"), ("nodes", f"/api/v0/nodes?limit={LIST_LIMIT}&detail=true"),
                      ("jobs", "/api/jobs/")]:
        try:
            out[key] = head.get(path)
        except Exception as exc:
            out[key + "_error"] = str(exc)
print("RAYRACK-PROBE " + json.dumps(out))
"""

GPU_STATES = ("busy", "idle", "free", "down")
# The table's column for each state the agent exports (ray_agent/gpu_state.py): GPUs whose work is not known
# are shown with the lost ones.
COLUMN_OF_STATE = {
    GpuState.BUSY: "busy",
    GpuState.IDLE_HELD: "idle",
    GpuState.FREE: "free",
    GpuState.UNKNOWN: "down",
    GpuState.LOST: "down",
}


@dataclass
class NodeRow:
    name: str
    role: str
    address: str
    unit: str = "?"
    ray: str = "?"
    version: str = "?"
    gpus: dict[str, int] = field(default_factory=lambda: dict.fromkeys(GPU_STATES, 0))
    agent: str = "?"
    driver: str = ""
    error: str = ""


def ray_version_of(marker: str | None) -> str:
    """The Ray venv's marker (its wheelhouse identity, JSON) -> the Ray version in it; - without one."""
    identity = wheelhouse_marker(marker)
    return identity["version"] if identity.get("package") == "ray" else "-"


def gpu_states(metrics_text: str) -> tuple[dict[str, int], str, str]:
    """Agent /metrics -> (GPUs per column busy/idle/free/down, agent version, driver version).

    Each GPU's state is the agent's (rayrack_gpu_state); a GPU listed without one (an agent too old to export
    it) is down, since nothing here judges utilisation.
    """
    listed: set[str] = set()
    state: dict[str, str] = {}
    agent, driver = "?", ""
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            gpu = sample.labels.get("gpu")
            if sample.name == "rayrack_gpu_up" and gpu is not None:
                listed.add(gpu)
            elif sample.name == "rayrack_gpu_state" and gpu is not None:
                listed.add(gpu)
                if sample.value == 1:
                    state[gpu] = sample.labels.get("state", "")
            elif sample.name == "rayrack_agent_info":
                agent = sample.labels.get("version", "?")
            elif sample.name == "rayrack_gpu_info" and not driver:
                driver = sample.labels.get("driver_version", "")
    counts = dict.fromkeys(GPU_STATES, 0)
    for gpu in listed:
        counts[COLUMN_OF_STATE.get(state.get(gpu, ""), "down")] += 1
    return counts, agent, driver


def ray_states(nodes_payload: Mapping[str, Any] | None) -> dict[str, str]:
    """State API /api/v0/nodes -> node IP -> ALIVE / DEAD (+ draining), the live entry winning."""
    rows = (((nodes_payload or {}).get("data") or {}).get("result") or {}).get("result") or []
    states: dict[str, str] = {}
    for row in rows:
        ip = row.get("node_ip")
        if not ip:
            continue
        state = str(row.get("state", "?"))
        if state == "ALIVE" and (row.get("is_draining") or "drain" in str(row.get("state_message") or "").lower()):
            state = "DRAINING"
        if states.get(ip) in ("ALIVE", "DRAINING") and state not in ("ALIVE", "DRAINING"):
            continue
        states[ip] = state
    return states


def job_summary(jobs_payload: Iterable[Mapping[str, Any]] | None) -> str:
    counts: dict[str, int] = {}
    for job in jobs_payload or []:
        status = str(job.get("status", "?"))
        counts[status] = counts.get(status, 0) + 1
    return ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())) or "none"


def build_rows(inventory: Inventory, probes: Mapping[str, Mapping[str, Any]]) -> list[NodeRow]:
    head_probe = probes.get(inventory.head.name, {}) if inventory.head else {}
    by_ip = ray_states(head_probe.get("nodes"))
    rows = []
    for host in inventory.hosts:
        probe = probes.get(host.name) or {}
        row = NodeRow(host.name, host.role, host.address)
        if "error" in probe:
            row.error = probe["error"]
            rows.append(row)
            continue
        row.unit = probe.get("active", "?")
        row.version = ray_version_of(probe.get("wheelhouse"))
        row.ray = by_ip.get(host.address, "ABSENT" if head_probe.get("nodes") else "?")
        if probe.get("metrics"):
            row.gpus, row.agent, row.driver = gpu_states(probe["metrics"])
        else:
            row.agent = "down"
            row.error = probe.get("metrics_error", "")
        rows.append(row)
    return rows


def describe_run(record: Mapping[str, Any] | None, now: datetime | None = None) -> str:
    if not record:
        return "last run: none recorded"
    now = now or datetime.now(UTC)
    started = datetime.fromisoformat(record["started"])
    if record.get("status") == "running":
        step = record.get("step") or {}
        where = f": {step.get('play', '')} / {step.get('task', '')}" if step else ""
        return (f"run in progress: {record['command']} since {started:%Y-%m-%d %H:%M:%S} UTC "
                f"({format_duration((now - started).total_seconds())}){where}")
    hosts = record.get("hosts") or {}
    bad = sorted(h for h, s in hosts.items() if s.get("failed") or s.get("unreachable"))
    return (f"last run: {record['command']} {record.get('status')} at {started:%Y-%m-%d %H:%M:%S} UTC, took "
            f"{format_duration(record.get('duration_seconds') or 0)}"
            + (f"; failed on {', '.join(bad)}" if bad else ""))


def render(inventory: Inventory, rows: list[NodeRow], head_probe: Mapping[str, Any],
           record: Mapping[str, Any] | None) -> str:
    header = f"{'NODE':<12} {'ROLE':<7} {'ADDRESS':<15} {'UNIT':<10} {'RAY':<9} {'VERSION':<8} " \
             f"{'GPUS busy/idle/free/down':<25} {'AGENT':<7} DRIVER"
    lines = [header]
    for r in rows:
        if r.error and r.unit == "?":
            lines.append(f"{r.name:<12} {r.role:<7} {r.address:<15} unreachable: {r.error}")
            continue
        g = r.gpus
        gpus = f"{g['busy']}/{g['idle']}/{g['free']}/{g['down']}" if r.agent != "down" else "-"
        lines.append(f"{r.name:<12} {r.role:<7} {r.address:<15} {r.unit:<10} {r.ray:<9} {r.version:<8} "
                     f"{gpus:<25} {r.agent:<7} {r.driver or '-'}")
    version = (head_probe.get("version") or {}).get("ray_version")
    alive = sum(1 for r in rows if r.ray in ("ALIVE", "DRAINING"))
    if version:
        cluster = (f"cluster {inventory.setting('rayrack_cluster_name')}: head on Ray {version}, "
                   f"{alive}/{len(rows)} inventory nodes alive, jobs: {job_summary(head_probe.get('jobs'))}")
    else:
        cluster = f"cluster: the head's API did not answer ({head_probe.get('version_error', 'no probe')})"
    target = inventory.setting("rayrack_ray_version")
    behind = [r.name for r in rows if r.version not in ("?", "-", target)]
    lines += ["", cluster]
    if behind:
        lines.append(f"not on the inventory's Ray {target}: {', '.join(behind)}")
    lines.append(describe_run(record))
    return "\n".join(lines)


def probe_node(host: Host, token: str) -> dict[str, Any]:
    api = f"http://127.0.0.1:{host.setting('rayrack_ray_dashboard_port')}" if host.role == "head" else ""
    args = [host.ray_unit, host.ray_venv_marker, host.address, str(host.setting("rayrack_agent_port")), api]
    return run_python(host, NODE_PROBE, args, input_text=token if api else "")


def collect(inventory: Inventory, token_file: Path) -> dict[str, dict[str, Any]]:
    token = token_file.read_text().strip() if token_file.exists() else ""
    with ThreadPoolExecutor(max_workers=min(32, max(1, len(inventory.hosts)))) as pool:
        futures = {h.name: pool.submit(probe_node, h, token) for h in inventory.hosts}
        return {name: f.result() for name, f in futures.items()}


def status_text(inventory: Inventory, token_file: Path, record: Mapping[str, Any] | None) -> tuple[str, int]:
    """The table and an exit code: 0 every inventory node alive, 1 otherwise."""
    started = time.monotonic()
    probes = collect(inventory, token_file)
    rows = build_rows(inventory, probes)
    head_probe = probes.get(inventory.head.name, {}) if inventory.head else {}
    text = render(inventory, rows, head_probe, record)
    healthy = all(r.ray == "ALIVE" for r in rows)
    return f"{text}\n(probed in {time.monotonic() - started:.1f}s)", 0 if healthy else 1

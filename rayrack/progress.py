"""Turn ansible-runner events into progress lines and a per-host summary (pure functions, no I/O)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# playbook_on_stats keys -> the summary's column names.
STAT_KEYS = {"ok": "ok", "changed": "changed", "failures": "failed", "dark": "unreachable", "skipped": "skipped"}
# Modules whose ok result carries a message worth showing: plans, checks, reports.
TALKATIVE = {"debug", "assert", "ansible.builtin.debug", "ansible.builtin.assert"}


@dataclass
class HostStats:
    ok: int = 0
    changed: int = 0
    failed: int = 0
    unreachable: int = 0
    skipped: int = 0

    @property
    def status(self) -> str:
        if self.unreachable:
            return "unreachable"
        if self.failed:
            return "failed"
        return "changed" if self.changed else "ok"


@dataclass
class RunState:
    """What the run has done so far; fed one event at a time."""

    play: str = ""
    task: str = ""
    hosts: dict[str, HostStats] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def host(self, name: str) -> HostStats:
        return self.hosts.setdefault(name, HostStats())


def _message(result: Mapping[str, Any]) -> str:
    for key in ("msg", "stderr", "reason"):
        value = result.get(key)
        if value:
            text = value if isinstance(value, str) else " ".join(str(v) for v in value) if isinstance(
                value, list) else str(value)
            return " ".join(text.split())
    return ""


def _host_label(data: Mapping[str, Any]) -> str:
    host = str(data.get("host", "?"))
    delegated = (data.get("res") or {}).get("_ansible_delegated_vars") or {}
    target = delegated.get("ansible_delegated_host") or delegated.get("ansible_host")
    return f"{host} -> {target}" if target and target != host else host


def handle_event(state: RunState, event: Mapping[str, Any], verbose: bool = False) -> list[str]:
    """Update state from one ansible-runner event; return the progress lines it deserves (maybe none)."""
    kind = event.get("event", "")
    data = event.get("event_data") or {}
    if kind == "playbook_on_play_start":
        state.play = str(data.get("play") or data.get("name") or "")
        return [f"PLAY {state.play}"]
    if kind == "playbook_on_task_start":
        state.task = str(data.get("task") or data.get("name") or "")
        return [f"  TASK {state.task}"] if verbose else []
    if kind == "playbook_on_stats":
        for key, column in STAT_KEYS.items():
            for host, count in (data.get(key) or {}).items():
                setattr(state.host(host), column, int(count))
        return []
    if not kind.startswith("runner_on_") or "host" not in data:
        return []
    res = data.get("res") or {}
    label = _host_label(data)
    task = str(data.get("task") or state.task)
    if kind == "runner_on_failed":
        if data.get("ignore_errors"):
            return [f"  {label:<12} failed (ignored)  {task}"] if verbose else []
        line = f"  {label:<12} FAILED     {task}: {_message(res)}"
        state.failures.append(line.strip())
        return [line]
    if kind == "runner_on_unreachable":
        line = f"  {label:<12} UNREACHABLE {task}: {_message(res)}"
        state.failures.append(line.strip())
        return [line]
    if kind == "runner_on_ok":
        if res.get("changed"):
            return [f"  {label:<12} changed    {task}"]
        action = str(data.get("task_action") or "")
        if action in TALKATIVE and res.get("msg") and not res.get("_ansible_no_log"):
            return [f"  {label:<12} {'ok':<10} {task}: {_message(res)}"]
        return [f"  {label:<12} ok         {task}"] if verbose else []
    if kind == "runner_on_skipped":
        return [f"  {label:<12} skipped    {task}"] if verbose else []
    return []


def summary(state: RunState, duration_seconds: float, status: str) -> list[str]:
    """The end-of-run table: one row per host, then the outcome and how long it took."""
    rows = [f"{'HOST':<14} {'OK':>4} {'CHANGED':>8} {'FAILED':>7} {'UNREACHABLE':>12} {'SKIPPED':>8}  RESULT"]
    for name in sorted(state.hosts):
        h = state.hosts[name]
        rows.append(f"{name:<14} {h.ok:>4} {h.changed:>8} {h.failed:>7} {h.unreachable:>12} {h.skipped:>8}  "
                    f"{h.status}")
    rows.append(f"{status} in {format_duration(duration_seconds)}")
    if state.failures:
        rows.append("failures:")
        rows.extend(f"  {line}" for line in state.failures)
    return rows


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def exit_code(status: str, state: RunState, rc: int | None) -> int:
    """0 success; 2 a host failed; 3 a host was unreachable (and none failed); 4 the run itself broke."""
    if status == "successful" and not rc:
        return 0
    if any(h.failed for h in state.hosts.values()):
        return 2
    if any(h.unreachable for h in state.hosts.values()):
        return 3
    return 4 if status != "successful" else (2 if rc else 0)

"""Run a playbook through ansible-runner: progress lines while it runs, a summary and a record at the end."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from rayrack.progress import RunState, exit_code, format_duration, handle_event, summary
from rayrack.records import write_record

PROJECT = Path(__file__).resolve().parents[1]
PLAYBOOKS = {
    "up": "site.yml",
    "upgrade": "playbooks/upgrade.yml",
    "drain": "playbooks/drain.yml",
    "add-node": "playbooks/add_node.yml",
    "remove-node": "playbooks/remove_node.yml",
    "teardown": "playbooks/teardown.yml",
    # A user's new or revoked token reaches the gateway alone: nothing else is converged.
    "user rotate": "playbooks/gateway.yml",
    "user revoke": "playbooks/gateway.yml",
}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _stamp(line: str) -> str:
    return f"[{datetime.now().strftime('%H:%M:%S')}] {line}"


def run_playbook(command: str, inventory_path: Path, inventory_dir: Path, *, extravars: Mapping[str, Any] | None = None,
                 limit: str | None = None, verbose: bool = False, out: TextIO = sys.stdout) -> int:
    import ansible_runner  # the controller tool; imported here so `rayrack --help` works without it

    playbook = PROJECT / PLAYBOOKS[command]
    if not playbook.exists():
        print(f"rayrack: {playbook} is missing; run rayrack from a rayrack checkout", file=sys.stderr)
        return 1
    # ansible-playbook from the same environment as this CLI, and the project's ansible.cfg.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    envvars = {
        "ANSIBLE_CONFIG": str(PROJECT / "ansible.cfg"),
        "ANSIBLE_CACHE_PLUGIN_CONNECTION": str(inventory_dir / ".facts"),
        "ANSIBLE_FORCE_COLOR": "0",
    }
    state = RunState()
    started, started_monotonic = _now(), time.monotonic()
    record: dict[str, Any] = {
        "command": command, "playbook": PLAYBOOKS[command], "limit": limit,
        "extravars": {k: v for k, v in (extravars or {}).items() if "token" not in k},
        "started": started, "finished": None, "status": "running", "step": None, "hosts": {},
    }
    write_record(inventory_dir, record)
    last_write = 0.0

    def on_event(event: Mapping[str, Any]) -> bool:
        nonlocal last_write
        for line in handle_event(state, event, verbose):
            print(_stamp(line), file=out, flush=True)
        kind = event.get("event", "")
        if kind in ("playbook_on_task_start", "playbook_on_play_start", "runner_on_failed"):
            data = event.get("event_data") or {}
            record["step"] = {"play": state.play, "task": state.task, "at": _now(),
                              "hosts": data.get("host") or None}
            # The record is what `rayrack status` shows during the run; a write per step is cheap.
            if time.monotonic() - last_write > 0.5 or kind != "playbook_on_task_start":
                write_record(inventory_dir, record)
                last_write = time.monotonic()
        return True

    print(_stamp(f"rayrack {command}: {PLAYBOOKS[command]} on {inventory_path}"
                 + (f" (limit {limit})" if limit else "")), file=out, flush=True)
    with tempfile.TemporaryDirectory(prefix="rayrack-run-") as private:
        try:
            runner = ansible_runner.run(
                private_data_dir=private, project_dir=str(PROJECT), playbook=str(playbook),
                inventory=str(inventory_path), extravars=dict(extravars or {}), limit=limit, envvars=envvars,
                event_handler=on_event, quiet=True, suppress_env_files=True,
            )
            status, rc = runner.status, runner.rc
        except KeyboardInterrupt:
            status, rc = "canceled", None
    duration = time.monotonic() - started_monotonic
    record.update({
        "finished": _now(), "status": status, "rc": rc, "duration_seconds": round(duration, 1), "step": None,
        "hosts": {name: vars(stats) for name, stats in state.hosts.items()},
    })
    write_record(inventory_dir, record)
    print("", file=out)
    for line in summary(state, duration, status):
        print(line, file=out)
    code = exit_code(status, state, rc)
    print(f"rayrack {command}: {status} ({format_duration(duration)}), exit {code}", file=out, flush=True)
    return code

"""The guard's append-only audit log: one JSON object per line, for every action taken or suppressed.

Each record::

    {"time": "2025-01-01T12:00:00.000Z", "gpu": 1, "uuid": "GPU-...", "pid": 4242, "user": "alice",
     "os_user": "ray", "process": "python", "ray_job_id": "02000000", "submission_id": "alice-raysubmit_...",
     "ray_actor": "Trainer", "ray_task": "Trainer.fit", "stage": "stop", "action": "ray_job_stop",
     "outcome": "dry_run", "reason": "would stop submission alice-raysubmit_...", "idle_seconds": 1830.0,
     "dry_run": true}

``user`` is the owner (the Ray job's gateway user, "unknown" for a job not submitted through the gateway, or
the Linux user of a process outside Ray), ``os_user`` the Linux user. ``stage`` is notify, stop or kill.
``action`` is log or webhook (notify), ray_job_stop (stop), sigterm or sigkill (kill: the last signal sent).
``outcome`` is one of :data:`OUTCOMES`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DONE = "done"
DRY_RUN = "dry_run"
SKIPPED = "skipped"  # nothing to do: no Ray job, not a submitted job, job or process already gone
FAILED = "failed"
OUTCOMES = (DONE, DRY_RUN, "allow_listed", "opted_out", "job_active", SKIPPED, FAILED)

FIELDS = (
    "time",
    "gpu",
    "uuid",
    "pid",
    "user",
    "os_user",
    "process",
    "ray_job_id",
    "submission_id",
    "ray_actor",
    "ray_task",
    "stage",
    "action",
    "outcome",
    "reason",
    "idle_seconds",
    "dry_run",
)


def rfc3339(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AuditLog:
    """Appends records with O_APPEND and fsync, so lines from one writer never interleave or vanish."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self.write_failures = 0

    def write(self, record: dict[str, Any]) -> bool:
        missing = [k for k in FIELDS if k not in record]
        if missing:
            raise ValueError(f"audit record lacks {', '.join(missing)}")
        line = json.dumps({k: record[k] for k in FIELDS}, separators=(",", ":")) + "\n"
        with self._lock:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
                try:
                    os.write(fd, line.encode())
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as err:
                self.write_failures += 1
                log.error("idle guard: cannot append to audit log %s: %s", self.path, err)
                return False
        return True


def read_audit(path: Path) -> list[dict[str, Any]]:
    """All records (tests and tools)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]

"""The small record the CLI keeps per inventory: the last (or current) playbook run."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

RECORD_DIR = ".rayrack"
LAST_RUN = "last-run.json"


def record_path(inventory_dir: Path) -> Path:
    return inventory_dir / RECORD_DIR / LAST_RUN


def write_record(inventory_dir: Path, record: dict[str, Any]) -> None:
    """Atomically, so `rayrack status` never reads half a file while a run updates it."""
    path = record_path(inventory_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".last-run.")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(record, handle, indent=2, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_record(inventory_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads(record_path(inventory_dir).read_text())
    except (OSError, ValueError):
        return None

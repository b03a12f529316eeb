"""The wheelhouse identity: what a venv on a node was built from.

One identity names the controller's wheelhouse (its directory and tar) and is written into the venv as a JSON
marker; the venv tasks, the upgrade plan and `rayrack status` read that marker back, never a name taken apart.
A venv whose marker differs from the wanted identity is replaced from scratch.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

FIELDS = ("package", "version", "python", "arch", "lock")


def rayrack_wheelhouse(requirements: Iterable[str], package: str, version: str, python: str, arch: str,
                       lock_text: str | None = None) -> dict[str, str]:
    """The identity of the wheelhouse for these requirements on one Python and CPU architecture.

    lock: a hash of the lock file the wheels come from when there is one, else of the requirements themselves
    (their order does not matter to pip, so it does not matter here).
    """
    text = lock_text if lock_text is not None else "\n".join(sorted(str(r) for r in requirements))
    return {"package": str(package), "version": str(version), "python": str(python), "arch": str(arch),
            "lock": hashlib.sha256(text.encode()).hexdigest()[:12]}


def rayrack_wheelhouse_name(identity: Mapping[str, Any]) -> str:
    """The controller's file name of a wheelhouse, e.g. ray-2.60.0-py3.11-x86_64-0123456789ab; none for no venv."""
    if not identity:
        return "none"
    return "{package}-{version}-py{python}-{arch}-{lock}".format(**identity)


def rayrack_wheelhouse_marker(marker: Mapping[str, Any] | str | None) -> dict[str, str]:
    """A venv's marker -> its identity; {} when there is none or it is not one (a marker of an older kit).

    Takes the marker's text or the result of slurping it (a missing file is a failed slurp).
    """
    if isinstance(marker, Mapping):
        if "content" not in marker:
            return {}
        marker = base64.b64decode(marker["content"]).decode(errors="replace")
    try:
        data = json.loads(marker or "")
    except ValueError:
        return {}
    if not isinstance(data, dict) or set(data) != set(FIELDS):
        return {}
    return {key: str(data[key]) for key in FIELDS}


class FilterModule:
    def filters(self):
        return {
            "rayrack_wheelhouse": rayrack_wheelhouse,
            "rayrack_wheelhouse_name": rayrack_wheelhouse_name,
            "rayrack_wheelhouse_marker": rayrack_wheelhouse_marker,
        }

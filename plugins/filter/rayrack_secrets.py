"""Controller-side secrets: bcrypt hashes for the basic_auth_users of exporter-toolkit's web configuration
(Prometheus, Alertmanager), and which secret paths are not yet private."""

from __future__ import annotations

import os
import stat
from typing import Any

from ansible.errors import AnsibleFilterError

# bcrypt's cost: the servers check a password once per client and cache the result.
ROUNDS = 12


def rayrack_bcrypt(password: Any, current: Any = None) -> str:
    """A bcrypt hash of password: `current` when that already is one of this password, so that a converge rewrites
    nothing, else a new one with a fresh salt."""
    try:
        import bcrypt
    except ImportError as exc:
        raise AnsibleFilterError("rayrack_bcrypt needs the bcrypt package on the controller: "
                                 "pip install -r requirements.txt (make venv)") from exc
    secret = str(password).encode()
    if not secret:
        raise AnsibleFilterError("rayrack_bcrypt: the password is empty")
    if current:
        try:
            if bcrypt.checkpw(secret, str(current).encode()):
                return str(current)
        except ValueError:  # not a bcrypt hash (or a password bcrypt refuses, named below)
            pass
    try:
        return bcrypt.hashpw(secret, bcrypt.gensalt(ROUNDS)).decode()
    except ValueError as exc:  # bcrypt 5 refuses a password longer than it reads (72 bytes)
        raise AnsibleFilterError(f"rayrack_bcrypt: {exc}") from exc


def rayrack_not_private(paths: Any, kind: str = "file") -> list[str]:
    """The paths among `paths` on the controller that are missing, not of `kind` (file or directory), or readable by
    anyone but their owner (0600 files, 0700 directories): what the file tasks after it must fix. Read in the
    controller's own process, so a converge with nothing to fix runs no module for them."""
    if kind not in ("file", "directory"):
        raise AnsibleFilterError(f"rayrack_not_private: kind must be file or directory, not {kind!r}")
    want, is_kind = (0o600, stat.S_ISREG) if kind == "file" else (0o700, stat.S_ISDIR)
    loose = []
    for path in paths:
        try:
            st = os.stat(str(path))
        except FileNotFoundError:
            loose.append(str(path))
            continue
        if not is_kind(st.st_mode) or stat.S_IMODE(st.st_mode) != want:
            loose.append(str(path))
    return loose


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"rayrack_bcrypt": rayrack_bcrypt, "rayrack_not_private": rayrack_not_private}

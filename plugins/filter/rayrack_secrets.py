"""bcrypt hashes for the basic_auth_users of exporter-toolkit's web configuration (Prometheus, Alertmanager)."""

from __future__ import annotations

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


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"rayrack_bcrypt": rayrack_bcrypt}

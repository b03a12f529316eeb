"""Researchers' tokens on the controller (rotate, revoke) and `whoami` against the jobs gateway.

A user's token is <secrets>/users/<name>.token (mode 0600, directory 0700) unless the inventory gives it in
rayrack_user_tokens; a <name>.revoked marker there keeps the user out of the gateway's users until the next
rotate. Both commands change files only; the caller converges playbooks/gateway.yml to apply them.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ray_agent.ray_api import RayApi, RayApiError
from rayrack.inventory import Inventory

TOKEN_BYTES = 32  # 64 hex characters, as the playbook generates them


class UserError(Exception):
    """A problem to tell the operator, naming what to fix."""


def secrets_dir(inv: Inventory) -> Path:
    """rayrack_secrets_dir as the inventory sets it; its default is <inventory>/.secrets."""
    value = inv.setting("rayrack_secrets_dir")
    return Path(value) if isinstance(value, str) and value and "{{" not in value else inv.directory / ".secrets"


def tokens_dir(inv: Inventory) -> Path:
    return secrets_dir(inv) / "users"


def user_names(inv: Inventory) -> list[str]:
    users = inv.setting("rayrack_users") or []
    return [str(u["name"]) for u in users if isinstance(u, Mapping) and "name" in u]


def _check_user(inv: Inventory, name: str) -> None:
    names = user_names(inv)
    if name not in names:
        raise UserError(f"{name} is not in rayrack_users (users: {', '.join(names) or 'none'})")
    inline = inv.setting("rayrack_user_tokens")
    if isinstance(inline, Mapping) and name in inline:
        raise UserError(f"{name}'s token comes from rayrack_user_tokens in the inventory: change or remove it there")


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, atomically: no moment where it is world-readable or half-written."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def rotate(inv: Inventory, name: str) -> Path:
    """A new token for NAME (a revoked user is let back in). Returns the token file."""
    _check_user(inv, name)
    directory = tokens_dir(inv)
    token_file = directory / f"{name}.token"
    _write_private(token_file, secrets.token_hex(TOKEN_BYTES))
    (directory / f"{name}.revoked").unlink(missing_ok=True)
    return token_file


def revoke(inv: Inventory, name: str) -> Path:
    """NAME's token removed and a marker written, so no later run generates a new one. Returns the marker."""
    _check_user(inv, name)
    directory = tokens_dir(inv)
    marker = directory / f"{name}.revoked"
    _write_private(marker, f"revoked {datetime.now(UTC).isoformat(timespec='seconds')}\n")
    (directory / f"{name}.token").unlink(missing_ok=True)
    return marker


def gateway_url(inv: Inventory) -> str:
    if inv.head is None:
        raise UserError("the inventory has no host in group ray_head")
    return f"https://{inv.head.address}:{inv.setting('rayrack_gateway_port')}"


def whoami(url: str, token_file: Path, ca_file: Path, timeout: float = 10) -> dict[str, Any]:
    """GET <url>/api/rayrack/whoami with the token of TOKEN_FILE, the gateway verified against CA_FILE."""
    gateway = RayApi(url, token_file, timeout, ca_file)
    try:
        return gateway.get("/api/rayrack/whoami")
    except RayApiError as exc:
        if exc.status == 401:
            raise UserError("this token belongs to no user") from None
        if not exc.call:  # the token or CA file
            raise UserError(str(exc)) from None
        if exc.status is not None:
            raise UserError(f"{url} answered {exc.cause}") from None
        raise UserError(f"cannot reach the gateway at {url}: {exc.cause}") from None


def describe(identity: Mapping[str, Any]) -> str:
    limit = identity.get("max_gpus")
    return "\n".join([f"user: {identity.get('user')}", f"admin: {'yes' if identity.get('admin') else 'no'}",
                      f"max_gpus: {'no limit' if limit is None else limit}"])

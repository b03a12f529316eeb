"""Users and their tokens: users.json holds only sha256 hashes, looked up in constant time.

users.json (written by the ray_gateway role)::

    {"users": [{"name": "alice", "token_sha256": "<64 hex>", "admin": false, "max_gpus": 2}]}

Tokens are 64 random hex characters, so a plain sha256 is enough: there is nothing to guess that stretching
would slow down. Every lookup compares against every user, so the time does not say how close a guess came.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray_agent.users import USER_NAME

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_USER_KEYS = ("name", "token_sha256", "admin", "max_gpus", "contact")


class SecretError(ValueError):
    """A secret file (users, cluster token, TLS) that is missing or unusable; the message names it."""


@dataclass(frozen=True, slots=True)
class User:
    name: str
    admin: bool = False
    max_gpus: int | float | None = None  # None: no limit


def token_digest(token: str) -> bytes:
    """The stored form of a token: sha256 of its UTF-8 text, surrounding whitespace stripped."""
    return hashlib.sha256(token.strip().encode("utf-8")).digest()


class Users:
    def __init__(self, entries: list[tuple[bytes, User]]) -> None:
        self._entries = tuple(entries)

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, token: str) -> User | None:
        digest = token_digest(token)
        found: User | None = None
        for stored, user in self._entries:
            # No early exit: the loop takes the same time whichever entry matches, or none.
            if hmac.compare_digest(stored, digest):
                found = user
        return found


def parse_users(document: Any, source: str) -> Users:
    def error(where: str, message: str) -> SecretError:
        return SecretError(f"{source}: {where}: {message}")

    if not isinstance(document, dict) or not isinstance(document.get("users"), list):
        raise SecretError(f'{source}: expected {{"users": [...]}}')
    entries: list[tuple[bytes, User]] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(document["users"]):
        where = f"users[{index}]"
        if not isinstance(item, dict):
            raise error(where, f"expected an object, got {type(item).__name__}")
        unknown = [k for k in item if k not in _USER_KEYS]
        if unknown:
            raise error(f"{where}.{unknown[0]}", f"unknown key; allowed keys: {', '.join(_USER_KEYS)}")
        name = item.get("name")
        if not isinstance(name, str) or not USER_NAME.fullmatch(name):
            raise error(f"{where}.name", f"must match {USER_NAME.pattern}, got {name!r}")
        if name in seen:
            raise error(f"{where}.name", f"{name!r} is also users[{seen[name]}]")
        seen[name] = index
        digest = item.get("token_sha256")
        if not isinstance(digest, str) or not _HEX64.match(digest):
            raise error(f"{where}.token_sha256", "must be 64 lower-case hex characters (sha256 of the token)")
        admin = item.get("admin", False)
        if not isinstance(admin, bool):
            raise error(f"{where}.admin", f"expected true or false, got {admin!r}")
        max_gpus = item.get("max_gpus")
        if max_gpus is not None and (
            isinstance(max_gpus, bool) or not isinstance(max_gpus, int | float) or max_gpus < 0
        ):
            raise error(f"{where}.max_gpus", f"expected a number of GPUs (0 or more) or null, got {max_gpus!r}")
        entries.append((bytes.fromhex(digest), User(name, admin, max_gpus)))
    return Users(entries)


def load_users(path: Path) -> Users:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise SecretError(f"users_file {path}: cannot read: {err.strerror}") from None
    try:
        document = json.loads(text)
    except ValueError as err:
        raise SecretError(f"users_file {path}: not valid JSON: {err}") from None
    return parse_users(document, f"users_file {path}")

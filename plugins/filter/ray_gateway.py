"""The gateway's users file from rayrack_users and the users' tokens on the controller.

A user's token is rayrack_user_tokens[name] (the inventory, e.g. Vault) or the file <name>.token in
rayrack_user_tokens_dir; a <name>.revoked marker there leaves the user out. Only each token's sha256 is written.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ansible.errors import AnsibleFilterError


def ray_gateway_revoked(users: Iterable[Mapping[str, Any]], tokens_dir: str) -> list[str]:
    """Names in rayrack_users with a <name>.revoked marker in the tokens directory."""
    return [user["name"] for user in users if (Path(tokens_dir) / f"{user['name']}.revoked").exists()]


def ray_gateway_users(users: Iterable[Mapping[str, Any]], tokens: Mapping[str, str], tokens_dir: str
                      ) -> dict[str, list[dict[str, Any]]]:
    """users.json's content: {"users": [{name, token_sha256, admin, max_gpus}]}, revoked users left out."""
    revoked = set(ray_gateway_revoked(users, tokens_dir))
    entries = []
    for user in users:
        name = user["name"]
        if name in revoked:
            continue
        if name in tokens:
            token = str(tokens[name])
        else:
            path = Path(tokens_dir) / f"{name}.token"
            try:
                token = path.read_text()
            except OSError as exc:
                raise AnsibleFilterError(f"rayrack_users: {name} has no token: {path}: {exc.strerror}") from None
        entries.append({"name": name, "token_sha256": hashlib.sha256(token.strip().encode()).hexdigest(),
                        "admin": bool(user.get("admin", False)), "max_gpus": user.get("max_gpus")})
    return {"users": entries}


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"ray_gateway_users": ray_gateway_users, "ray_gateway_revoked": ray_gateway_revoked}

"""The gateway's users file from rayrack_users and the controller's token files (the ray_gateway filter)."""

import hashlib

import pytest
from ansible.errors import AnsibleFilterError

from .conftest import FILTERS, load_module

gw = load_module(FILTERS / "ray_gateway.py", "ray_gateway_filter")

USERS = [{"name": "alice", "contact": "alice@example.org"}, {"name": "bob", "max_gpus": 1},
         {"name": "ops", "admin": True}]


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_hashes_of_files_and_inventory_tokens_revoked_users_left_out(tmp_path):
    (tmp_path / "alice.token").write_text("a" * 64 + "\n")
    (tmp_path / "bob.token").write_text("b" * 64)
    (tmp_path / "bob.revoked").write_text("revoked\n")
    document = gw.ray_gateway_users(USERS, {"ops": " " + "o" * 40 + "\n"}, str(tmp_path))
    assert document == {"users": [
        {"name": "alice", "token_sha256": sha("a" * 64), "admin": False, "max_gpus": None},
        {"name": "ops", "token_sha256": sha("o" * 40), "admin": True, "max_gpus": None}]}
    assert gw.ray_gateway_revoked(USERS, str(tmp_path)) == ["bob"]


def test_a_user_without_a_token_is_named(tmp_path):
    with pytest.raises(AnsibleFilterError, match=r"rayrack_users: alice has no token: .*alice.token"):
        gw.ray_gateway_users(USERS[:1], {}, str(tmp_path))

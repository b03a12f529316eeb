"""The gateway's configuration file, users.json and the command line's check-config."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.support import REPO
from ray_agent.config import ConfigError
from ray_agent.gateway.config import GatewayConfig, build_config
from ray_agent.gateway.users import SecretError, Users, load_users, parse_users, token_digest

GOOD = {
    "listen_host": "10.213.1.10",
    "listen_port": 8443,
    "tls_cert_file": "/run/credentials/rayrack-gateway.service/tls.crt",
    "tls_key_file": "/run/credentials/rayrack-gateway.service/tls.key",
    "upstream_url": "http://127.0.0.1:8265/",
    "upstream_token_file": "/run/credentials/rayrack-gateway.service/cluster.token",
    "users_file": "/run/credentials/rayrack-gateway.service/users.json",
}


def test_a_full_config_without_its_secrets_on_disk() -> None:
    config = build_config(GOOD, "gw.yml")
    assert config == GatewayConfig(
        listen_host="10.213.1.10",
        listen_port=8443,
        tls_cert_file=Path(GOOD["tls_cert_file"]),
        tls_key_file=Path(GOOD["tls_key_file"]),
        upstream_url="http://127.0.0.1:8265",
        upstream_token_file=Path(GOOD["upstream_token_file"]),
        users_file=Path(GOOD["users_file"]),
        request_timeout=30.0,
    )
    assert config.tls


def test_plain_http_and_no_ray_token() -> None:
    config = build_config({**GOOD, "tls_cert_file": None, "tls_key_file": None, "upstream_token_file": None,
                           "request_timeout": "2s"})  # fmt: skip
    assert not config.tls
    assert config.upstream_token_file is None
    assert config.request_timeout == 2.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"users_file": ...}, r"gw.yml: users_file: required key is missing"),
        ({"tls_key_file": ...}, r"tls_key_file: required key is missing"),
        ({"listen_port": 0}, r"listen_port: must be at least 1"),
        ({"listen_port": 70000}, r"listen_port: must be a port from 1 to 65535"),
        ({"listen_port": "8443"}, r"listen_port: expected an integer"),
        ({"listen_host": None}, r"listen_host: must be the address"),
        ({"tls_key_file": None}, r"tls_key_file: tls_cert_file and tls_key_file go together"),
        ({"upstream_url": "127.0.0.1:8265"}, r"upstream_url: expected an http\(s\) URL"),
        ({"request_timeout": 0}, r"request_timeout: must be above 0"),
        ({"request_timeout": "soon"}, r"request_timeout: expected a duration"),
        ({"listen": "x"}, r"listen: unknown key; allowed keys: listen_host, "),
    ],
)
def test_errors_name_the_key(change: dict, message: str) -> None:
    document = {k: v for k, v in {**GOOD, **change}.items() if v is not ...}
    with pytest.raises(ConfigError, match=message):
        build_config(document, "gw.yml")


def test_not_a_mapping() -> None:
    with pytest.raises(ConfigError, match="expected a mapping"):
        build_config(["listen_host"], "gw.yml")


def _gateway(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ray_agent.gateway.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=60)  # fmt: skip


def test_check_config_exit_codes(tmp_path: Path) -> None:
    good = tmp_path / "good.yml"
    good.write_text(json.dumps(GOOD))  # JSON is YAML
    ok = _gateway("check-config", "--config.file", str(good))
    assert (ok.returncode, ok.stdout.strip()) == (0, f"{good}: ok")
    bad = tmp_path / "bad.yml"
    bad.write_text(json.dumps({**GOOD, "listen_port": "x"}))
    failed = _gateway("check-config", "--config.file", str(bad))
    assert failed.returncode == 1
    assert f"{bad}: listen_port: expected an integer" in failed.stderr
    missing = _gateway("check-config", "--config.file", str(tmp_path / "absent.yml"))
    assert missing.returncode == 1
    assert "absent.yml: cannot read" in missing.stderr


def _entry(name: str, secret: str, **extra: object) -> dict:
    return {"name": name, "token_sha256": hashlib.sha256(secret.encode()).hexdigest(), **extra}


def test_users_lookup_by_token() -> None:
    users = parse_users({"users": [_entry("alice", "a" * 64, max_gpus=2), _entry("root", "r" * 64, admin=True)]},
                        "users.json")  # fmt: skip
    assert len(users) == 2
    alice = users.lookup("a" * 64 + "\n")  # as read from a token file
    assert alice is not None and (alice.name, alice.admin, alice.max_gpus) == ("alice", False, 2)
    root = users.lookup("r" * 64)
    assert root is not None and root.admin
    assert users.lookup("b" * 64) is None
    assert users.lookup("") is None
    assert token_digest(" x ") == hashlib.sha256(b"x").digest()
    assert Users([]).lookup("a" * 64) is None


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"user": []}, r'expected \{"users": \[...\]\}'),
        ({"users": [{"name": "Alice", "token_sha256": "0" * 64}]}, r"users\[0\].name: must match"),
        ({"users": [_entry("a", "x"), _entry("a", "y")]}, r"users\[1\].name: 'a' is also users\[0\]"),
        ({"users": [{"name": "a", "token_sha256": "0" * 63}]}, r"users\[0\].token_sha256: must be 64"),
        ({"users": [_entry("a", "x", admin="yes")]}, r"users\[0\].admin: expected true or false"),
        ({"users": [_entry("a", "x", max_gpus=-1)]}, r"users\[0\].max_gpus: expected a number"),
        ({"users": [_entry("a", "x", token="x")]}, r"users\[0\].token: unknown key"),
    ],
)
def test_users_json_errors_name_the_entry(document: dict, message: str) -> None:
    with pytest.raises(SecretError, match=message):
        parse_users(document, "users.json")


def test_users_file_missing_or_broken(tmp_path: Path) -> None:
    with pytest.raises(SecretError, match=r"users_file .*absent.json: cannot read"):
        load_users(tmp_path / "absent.json")
    broken = tmp_path / "users.json"
    broken.write_text("{")
    with pytest.raises(SecretError, match="not valid JSON"):
        load_users(broken)



def test_run_refuses_an_unreadable_or_empty_cluster_token(tmp_path: Path) -> None:
    users = tmp_path / "users.json"
    users.write_text('{"users": []}')
    empty = tmp_path / "empty.token"
    empty.write_text("\n")
    config = tmp_path / "gw.yml"
    absent = tmp_path / "absent.token"
    for token_file, message in ((absent, f"cannot read token file {absent}"), (empty, f"token file {empty} is empty")):
        # Refused before it listens: the port is never bound.
        config.write_text(json.dumps({**GOOD, "listen_host": "127.0.0.1", "listen_port": 9, "tls_cert_file": None,
                                      "tls_key_file": None, "users_file": str(users),
                                      "upstream_token_file": str(token_file)}))  # fmt: skip
        failed = _gateway("run", "--config.file", str(config))
        assert failed.returncode == 1
        assert f"rayrack-gateway: upstream_token_file: {message}" in failed.stderr

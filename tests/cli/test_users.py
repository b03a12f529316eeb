"""`rayrack user rotate|revoke` on the controller's token files, and `rayrack whoami` against a real gateway."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from rayrack import users
from rayrack.cli import main
from rayrack.inventory import parse_listing

USERS = [{"name": "alice", "contact": "alice@example.org"}, {"name": "bob", "max_gpus": 1},
         {"name": "ops", "admin": True}, {"name": "vault", "admin": False}]


def inventory(tmp_path: Path, port: int = 8443):
    head_vars = {"ansible_host": "127.0.0.1", "rayrack_users": USERS, "rayrack_gateway_port": port,
                 "rayrack_user_tokens": {"vault": "v" * 64}}
    listing = {"_meta": {"hostvars": {"head": head_vars}}, "ray_head": {"hosts": ["head"]}}
    return parse_listing(tmp_path, listing)


def test_rotate_writes_a_private_new_token_and_lets_a_revoked_user_back(tmp_path):
    inv = inventory(tmp_path)
    first = users.rotate(inv, "alice").read_text()
    token_file = users.rotate(inv, "alice")
    assert token_file == tmp_path / ".secrets" / "users" / "alice.token"
    assert len(token_file.read_text()) == 64 and token_file.read_text() != first
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(token_file.parent.stat().st_mode) == 0o700
    users.revoke(inv, "alice")
    users.rotate(inv, "alice")
    assert not (token_file.parent / "alice.revoked").exists()
    assert sorted(p.name for p in token_file.parent.iterdir()) == ["alice.token"]


def test_revoke_removes_the_token_and_leaves_a_marker(tmp_path):
    inv = inventory(tmp_path)
    users.rotate(inv, "bob")
    marker = users.revoke(inv, "bob")
    assert marker.name == "bob.revoked" and marker.read_text().startswith("revoked ")
    assert not (marker.parent / "bob.token").exists()


def test_names_outside_rayrack_users_or_with_inventory_tokens_are_refused(tmp_path):
    inv = inventory(tmp_path)
    with pytest.raises(users.UserError, match=r"^carol is not in rayrack_users \(users: alice, bob, ops, vault\)$"):
        users.rotate(inv, "carol")
    with pytest.raises(users.UserError, match="vault's token comes from rayrack_user_tokens in the inventory"):
        users.revoke(inv, "vault")
    assert not (tmp_path / ".secrets" / "users").exists()


def test_cli_refuses_an_unknown_user_before_any_run(tmp_path, capsys):
    (tmp_path / "hosts.yml").write_text(json.dumps({"all": {"children": {"ray_head": {"hosts": {"head": {
        "ansible_host": "127.0.0.1", "rayrack_users": USERS}}}}}}))
    assert main(["-i", str(tmp_path / "hosts.yml"), "user", "revoke", "mallory"]) == 1
    assert "mallory is not in rayrack_users" in capsys.readouterr().err


# --- whoami against rayrack-gateway over TLS -------------------------------------------------------------
def _pki(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a certificate for 127.0.0.1 signed by it: (ca.crt, tls.crt, tls.key)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True).sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "head")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(2).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False).sign(ca_key, hashes.SHA256()))
    paths = directory / "ca.crt", directory / "tls.crt", directory / "tls.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """rayrack-gateway with alice and bob (max 1 GPU); no Ray behind it: whoami never asks Ray."""
    directory = tmp_path_factory.mktemp("gateway")
    ca, cert, key = _pki(directory)
    tokens = {"alice": "a1" * 32, "bob": "b2" * 32}
    (directory / "users.json").write_text(json.dumps({"users": [
        {"name": "alice", "token_sha256": hashlib.sha256(tokens["alice"].encode()).hexdigest(), "admin": False,
         "max_gpus": None},
        {"name": "bob", "token_sha256": hashlib.sha256(tokens["bob"].encode()).hexdigest(), "admin": False,
         "max_gpus": 1}]}))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    (directory / "gateway.yml").write_text(json.dumps({
        "listen_host": "127.0.0.1", "listen_port": port, "tls_cert_file": str(cert), "tls_key_file": str(key),
        "upstream_url": "http://127.0.0.1:9", "upstream_token_file": None,
        "users_file": str(directory / "users.json")}))
    process = subprocess.Popen([sys.executable, "-m", "ray_agent.gateway.cli", "run", "--config.file",
                                str(directory / "gateway.yml")], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert process.poll() is None, process.stderr.read().decode()
                assert time.monotonic() < deadline, "the gateway did not listen within 20 s"
                time.sleep(0.1)
        yield {"url": f"https://127.0.0.1:{port}", "port": port, "ca": ca, "tokens": tokens, "dir": directory}
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_whoami_names_the_user_and_limit(gateway, tmp_path, capsys):
    token_file = tmp_path / "token"
    token_file.write_text(gateway["tokens"]["bob"] + "\n")
    identity = users.whoami(gateway["url"], token_file, gateway["ca"])
    assert identity == {"user": "bob", "admin": False, "max_gpus": 1}
    assert users.describe(identity) == "user: bob\nadmin: no\nmax_gpus: 1"
    # Through the CLI, the URL from the inventory's head and gateway port.
    (tmp_path / "hosts.yml").write_text(json.dumps({"all": {"children": {"ray_head": {"hosts": {"head": {
        "ansible_host": "127.0.0.1", "rayrack_gateway_port": gateway["port"]}}}}}}))
    assert main(["-i", str(tmp_path / "hosts.yml"), "whoami", "--token-file", str(token_file),
                 "--ca-cert", str(gateway["ca"])]) == 0
    assert capsys.readouterr().out == "user: bob\nadmin: no\nmax_gpus: 1\n"


def test_whoami_unknown_token_exits_1(gateway, tmp_path, capsys):
    token_file = tmp_path / "token"
    token_file.write_text("f" * 64)
    (tmp_path / "hosts.yml").write_text(json.dumps({"all": {"children": {"ray_head": {"hosts": {"head": {
        "ansible_host": "127.0.0.1", "rayrack_gateway_port": gateway["port"]}}}}}}))
    assert main(["-i", str(tmp_path / "hosts.yml"), "whoami", "--token-file", str(token_file),
                 "--ca-cert", str(gateway["ca"])]) == 1
    assert capsys.readouterr().err == "rayrack: this token belongs to no user\n"


def test_whoami_refuses_a_gateway_the_ca_did_not_sign(gateway, tmp_path):
    other_ca = _pki(tmp_path)[0]
    token_file = tmp_path / "token"
    token_file.write_text(gateway["tokens"]["alice"])
    with pytest.raises(users.UserError, match=r"cannot reach the gateway at .*CERTIFICATE_VERIFY_FAILED"):
        users.whoami(gateway["url"], token_file, other_ca)

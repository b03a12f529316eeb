"""The cluster CA and a node certificate (rayrack tasks/ca.yml and node_cert.yml), run by Ansible on this machine:
made once, unchanged by a re-run, renewed when close to expiry, and the certificate verifies against the CA."""

from __future__ import annotations

import grp
import os
import re
from pathlib import Path

import pytest
from cryptography import x509

from .conftest import run_play

REPO = Path(__file__).resolve().parents[2]
ROLES = REPO / "roles"
pytestmark = pytest.mark.slow

PLAY = """
- hosts: head
  gather_facts: false
  tasks:
    - ansible.builtin.include_role:
        name: rayrack
        tasks_from: ca
    - ansible.builtin.include_role:
        name: rayrack
        tasks_from: node_cert
      vars:
        rayrack_cert_name: gateway
"""


def converge(tmp_path: Path, **extra: object) -> int:
    """Run the play; the number of changed tasks."""
    inventory = {"all": {"children": {"ray_head": {"hosts": {"head": {
        "ansible_host": "127.0.0.1", "ansible_connection": "local",
        "ansible_python_interpreter": str(REPO / ".venv" / "bin" / "python")}}}}}}
    settings = {"rayrack_config_dir": str(tmp_path / "etc"), "rayrack_secrets_dir": str(tmp_path / "secrets"), **extra}
    (tmp_path / "etc").mkdir(exist_ok=True)
    result = run_play(tmp_path, inventory, PLAY, settings,
                      {"ANSIBLE_ROLES_PATH": str(ROLES), "ANSIBLE_FORCE_COLOR": "0"})
    return int(re.search(r"head\s*:.*changed=(\d+)", result.stdout).group(1))


def cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_made_once_verified_by_the_ca_and_renewed_near_expiry(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the tasks install root-owned files")
    assert converge(tmp_path) > 0
    ca_file, node_file = tmp_path / "etc" / "ca.crt", tmp_path / "etc" / "tls" / "gateway.crt"
    assert ca_file.read_bytes() == (tmp_path / "secrets" / "ca" / "ca.crt").read_bytes()
    assert oct((tmp_path / "secrets" / "ca" / "ca.key").stat().st_mode & 0o777) == "0o600"
    assert oct((tmp_path / "etc" / "tls" / "gateway.key").stat().st_mode & 0o777) == "0o600"
    ca, first = cert(ca_file), cert(node_file)
    first.verify_directly_issued_by(ca)
    sans = first.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "127.0.0.1" in [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
    assert "head" in sans.get_values_for_type(x509.DNSName)

    assert converge(tmp_path) == 0
    assert cert(node_file).serial_number == first.serial_number

    # Within the renewal windows (here: always), a normal converge replaces both; the CA keeps its key, so what
    # it signed before stays valid.
    assert converge(tmp_path, _rayrack_cert_renew_before="+400d", _rayrack_ca_renew_before="+3700d") > 0
    renewed, new_ca = cert(node_file), cert(ca_file)
    assert renewed.serial_number != first.serial_number and new_ca.serial_number != ca.serial_number
    renewed.verify_directly_issued_by(new_ca)
    first.verify_directly_issued_by(new_ca)


def test_rays_certificate_key_for_its_group_loopback_names_and_a_new_ca(tmp_path):
    """What Ray's mutual TLS asks of node_cert.yml: a key its group reads, loopback among the names (Ray Client's
    proxy dials its per-client servers there), and a certificate signed again when the CA is a new one."""
    if os.geteuid() != 0:
        pytest.skip("the tasks install root-owned files")
    play = PLAY.replace("rayrack_cert_name: gateway", "rayrack_cert_name: ray\n        rayrack_cert_key_group: daemon\n"
                        "        rayrack_cert_extra_sans: [127.0.0.1, '::1', localhost]")
    settings = {"rayrack_config_dir": str(tmp_path / "etc"), "rayrack_secrets_dir": str(tmp_path / "secrets")}
    inventory = {"all": {"children": {"ray_head": {"hosts": {"head": {
        "ansible_host": "10.0.0.10", "ansible_connection": "local",
        "ansible_python_interpreter": str(REPO / ".venv" / "bin" / "python")}}}}}}
    (tmp_path / "etc").mkdir()
    env = {"ANSIBLE_ROLES_PATH": str(ROLES), "ANSIBLE_FORCE_COLOR": "0"}
    run_play(tmp_path, inventory, play, settings, env)
    key = (tmp_path / "etc" / "tls" / "ray.key").stat()
    assert (oct(key.st_mode & 0o777), key.st_uid, key.st_gid) == ("0o640", 0, grp.getgrnam("daemon").gr_gid)
    first = cert(tmp_path / "etc" / "tls" / "ray.crt")
    sans = first.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(str(ip) for ip in sans.get_values_for_type(x509.IPAddress)) == ["10.0.0.10", "127.0.0.1", "::1"]
    assert sorted(sans.get_values_for_type(x509.DNSName)) == ["head", "localhost"]

    # The CA replaced on the controller (its directory lost): every node's certificate is signed again by it.
    for name in ("ca.key", "ca.crt"):
        (tmp_path / "secrets" / "ca" / name).unlink()
    run_play(tmp_path, inventory, play, settings, env)
    new_ca, renewed = cert(tmp_path / "etc" / "ca.crt"), cert(tmp_path / "etc" / "tls" / "ray.crt")
    assert renewed.serial_number != first.serial_number
    renewed.verify_directly_issued_by(new_ca)


def test_the_controller_checks_the_ca_once_per_run(tmp_path):
    """Every play that installs the CA certificate includes ca.yml; the controller's half runs in the first only."""
    if os.geteuid() != 0:
        pytest.skip("the tasks install root-owned files")
    inventory = {"all": {"children": {"ray_head": {"hosts": {"head": {
        "ansible_host": "127.0.0.1", "ansible_connection": "local",
        "ansible_python_interpreter": str(REPO / ".venv" / "bin" / "python")}}}}}}
    settings = {"rayrack_config_dir": str(tmp_path / "etc"), "rayrack_secrets_dir": str(tmp_path / "secrets")}
    (tmp_path / "etc").mkdir()
    # A third play puts the certificate somewhere else as well (a service's own copy, as web_auth.yml does).
    elsewhere = PLAY.replace("tasks_from: ca\n", f"tasks_from: ca\n      vars:\n"
                             f"        rayrack_ca_cert_file: {tmp_path / 'etc' / 'other-ca.crt'}\n")
    result = run_play(tmp_path, inventory, PLAY + PLAY + elsewhere, settings,
                      {"ANSIBLE_ROLES_PATH": str(ROLES), "ANSIBLE_FORCE_COLOR": "0"})
    assert result.stdout.count("TASK [rayrack : Make the CA key on the controller]") == 1, result.stdout
    ca = cert(tmp_path / "etc" / "ca.crt")
    assert cert(tmp_path / "etc" / "other-ca.crt") == ca
    cert(tmp_path / "etc" / "tls" / "gateway.crt").verify_directly_issued_by(ca)


SECRETS_PLAY = """
- hosts: head
  gather_facts: false
  tasks:
    - ansible.builtin.include_role:
        name: rayrack
        tasks_from: secrets
      vars:
        rayrack_secret_files: ["{{ rayrack_secrets_dir }}/web/one.password", "{{ rayrack_secrets_dir }}/two.password"]
"""


def test_generated_secrets_stay_private_and_a_loose_one_is_fixed(tmp_path):
    inventory = {"all": {"hosts": {"head": {"ansible_connection": "local",
                                            "ansible_python_interpreter": str(REPO / ".venv" / "bin" / "python")}}}}
    secrets = tmp_path / "secrets"
    settings = {"rayrack_config_dir": str(tmp_path / "etc"), "rayrack_secrets_dir": str(secrets)}
    env = {"ANSIBLE_ROLES_PATH": str(ROLES), "ANSIBLE_FORCE_COLOR": "0"}

    def changed() -> int:
        result = run_play(tmp_path, inventory, SECRETS_PLAY, settings, env)
        return int(re.search(r"head\s*:.*changed=(\d+)", result.stdout).group(1))

    def modes() -> dict[str, str]:
        paths = (secrets, secrets / "web", secrets / "web" / "one.password", secrets / "two.password")
        return {p.name: oct(p.stat().st_mode & 0o777) for p in paths}

    private = {"secrets": "0o700", "web": "0o700", "one.password": "0o600", "two.password": "0o600"}
    changed()
    assert modes() == private
    first = (secrets / "two.password").read_text()
    assert len(first.strip()) == 40
    assert changed() == 0
    (secrets / "two.password").chmod(0o644)
    (secrets / "web").chmod(0o755)
    assert changed() == 2
    assert modes() == private
    assert (secrets / "two.password").read_text() == first

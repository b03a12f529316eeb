"""The rayrack-gateway unit as the role renders it: hardened (systemd-analyze security) and valid for systemd."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import required

from .conftest import run_play, template_play

REPO = Path(__file__).resolve().parents[2]
ROLES = REPO / "roles"
pytestmark = pytest.mark.slow
# systemd-analyze's exposure score, 0 (locked down) to 10; the project's ceiling for its units.
MAX_EXPOSURE = 4.5

PLAY = template_play("head", "ray_gateway", "etc/systemd/system/rayrack-gateway.service.j2")


@pytest.fixture(scope="module")
def unit(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("unit")
    inventory = {"all": {"vars": {"ansible_connection": "local"}, "children": {
        "ray_head": {"hosts": {"head": {"ansible_host": "10.0.0.10"}}}}}}
    dest = tmp / "rayrack-gateway.service"
    run_play(tmp, inventory, PLAY, {"dest": str(dest)},
             {})
    return dest


def test_secrets_are_credentials_of_a_dynamic_user(unit):
    text = unit.read_text()
    assert "DynamicUser=yes" in text
    assert re.findall(r"^LoadCredential=(.*)$", text, re.M) == [
        "gateway.yml:/etc/rayrack/gateway.yml", "tls.key:/etc/rayrack/tls/gateway.key",
        "tls.crt:/etc/rayrack/tls/gateway.crt",
        "users.json:/etc/rayrack/gateway-users.json", "cluster.token:/etc/rayrack/ray_token"]
    assert "--config.file /run/credentials/rayrack-gateway.service/gateway.yml" in text
    assert "Restart=always" in text and "RestartSec=1" in text


def test_exposure_score_is_low(unit):
    analyze = shutil.which("systemd-analyze") or required.missing("systemd-analyze (systemd) is not installed")
    result = subprocess.run([analyze, "security", "--offline=yes", "--no-pager", str(unit)],
                            capture_output=True, text=True, check=False)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout[-2000:] + result.stderr[-2000:]
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


def test_systemd_accepts_the_unit(unit):
    analyze = shutil.which("systemd-analyze") or required.missing("systemd-analyze (systemd) is not installed")
    result = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, check=False)
    # The ExecStart binary exists only on the head; every other complaint is a mistake in the unit.
    problems = [line for line in result.stderr.splitlines() if "rayrack-gateway" in line
                and "is not executable" not in line and "No such file" not in line]
    assert problems == [], result.stderr

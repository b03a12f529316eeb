"""promtool on rayrack's Prometheus rules: syntax, and the unit tests in monitoring/prometheus/tests."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import required
import yaml

pytestmark = pytest.mark.promtool

REPO = Path(__file__).resolve().parents[2]
RULES = sorted((REPO / "monitoring" / "prometheus" / "rules").glob("*.yml"))
TESTS = sorted((REPO / "monitoring" / "prometheus" / "tests").glob("*.test.yml"))


def promtool() -> str:
    return required.binary("promtool", "`make host-deps` installs Debian's prometheus package")


def rules() -> list[dict]:
    return [rule for path in RULES for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def test_there_are_rules_and_tests():
    assert RULES and TESTS


@pytest.mark.parametrize("path", RULES, ids=lambda p: p.name)
def test_promtool_check_rules(path: Path):
    result = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize("path", TESTS, ids=lambda p: p.name)
def test_promtool_test_rules(path: Path):
    result = subprocess.run([promtool(), "test", "rules", path.name], cwd=path.parent, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_wrong_expectation_fails(tmp_path: Path):
    """The unit tests can fail: the same XID test expecting another code is caught."""
    shutil.copytree(REPO / "monitoring" / "prometheus", tmp_path / "prometheus")
    test = tmp_path / "prometheus" / "tests" / "gpu-alerts.test.yml"
    text = test.read_text()
    assert "Critical XID 79 on GPU 1 of w1" in text
    test.write_text(text.replace("Critical XID 79 on GPU 1 of w1", "Critical XID 48 on GPU 1 of w1"))
    result = subprocess.run([promtool(), "test", "rules", test.name], cwd=test.parent, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0 and "RayrackGpuXidCritical" in result.stdout + result.stderr


def test_every_rule_has_a_unit_test():
    tested = "\n".join(path.read_text() for path in TESTS)
    for rule in rules():
        if "alert" in rule:
            assert re.search(rf"alertname: {rule['alert']}\n", tested), f"alert {rule['alert']} has no promtool test"
        else:
            assert re.search(rf"expr: {re.escape(rule['record'])}\b", tested), f"{rule['record']} has no promtool test"


def test_alerts_have_a_known_severity_and_text():
    for rule in rules():
        if "alert" not in rule:
            continue
        assert rule["alert"].startswith("Rayrack"), rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_canonicals_throttle_rules_pass_their_own_tests(tmp_path: Path):
    """The harness runs someone else's rules and tests as published: Canonical's DCGM throttle alerts, with the
    test's `rule_files` (relative to their repository) pointed at the rules' copy here."""
    rules_path = required.ecosystem("alerts/canonical-hardware-observer-dcgm.yaml")
    test = yaml.safe_load(required.ecosystem("alerts/canonical-hardware-observer-test_dcgm.yaml").read_text())
    shutil.copy(rules_path, tmp_path / "dcgm.yaml")
    test["rule_files"] = ["dcgm.yaml"]
    (tmp_path / "test_dcgm.yaml").write_text(yaml.safe_dump(test, sort_keys=False))
    result = subprocess.run([promtool(), "test", "rules", "test_dcgm.yaml"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout

"""monitoring/grafana/sync.py against a local server speaking the Grafana API endpoints it uses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fake_grafana import FakeGrafana

from monitoring.grafana import sync
from monitoring.grafana.generate import DASHBOARDS, DASHBOARDS_DIR

REPO = Path(__file__).resolve().parents[2]
TOKEN = "glsa_test_0123456789"


@pytest.fixture
def grafana():
    server = FakeGrafana(TOKEN)
    yield server
    server.shutdown()


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return path


def run(grafana: FakeGrafana, token_file: Path, *extra: str) -> int:
    return sync.main(["--url", grafana.url, "--token-file", str(token_file), *extra])


def test_first_run_creates_the_folder_and_every_dashboard_then_a_rerun_changes_nothing(grafana, token_file, capsys):
    assert run(grafana, token_file) == 0
    out = capsys.readouterr().out
    assert "folder rayrack: created" in out and f"{len(DASHBOARDS)} dashboards, {len(DASHBOARDS)} changed" in out
    shipped = {json.loads(p.read_text())["uid"] for p in DASHBOARDS_DIR.glob("*.json")}
    assert set(grafana.dashboards) == shipped
    assert all(d["meta"]["folderUid"] == "rayrack" for d in grafana.dashboards.values())
    writes = list(grafana.writes)

    assert run(grafana, token_file) == 0
    out = capsys.readouterr().out
    assert grafana.writes == writes, "a second run must not write anything"
    assert out.count(": unchanged") == len(DASHBOARDS) and f"{len(DASHBOARDS)} dashboards, 0 changed" in out


def test_a_dashboard_edited_in_grafana_or_moved_is_put_back(grafana, token_file, capsys):
    assert run(grafana, token_file) == 0
    grafana.dashboards["rayrack-gpu"]["dashboard"]["title"] = "edited by hand"
    grafana.folders["elsewhere"] = {"id": 9, "uid": "elsewhere", "title": "elsewhere", "version": 1}
    grafana.dashboards["rayrack-idle"]["meta"]["folderUid"] = "elsewhere"
    capsys.readouterr()

    assert run(grafana, token_file) == 0
    out = capsys.readouterr().out
    assert "rayrack-gpu (rayrack / GPU detail): updated" in out
    assert "rayrack-idle (rayrack / Idle GPU waste): updated" in out
    assert "2 changed" in out
    assert grafana.dashboards["rayrack-gpu"]["dashboard"]["title"] == "rayrack / GPU detail"
    assert grafana.dashboards["rayrack-gpu"]["dashboard"]["version"] == 2
    assert grafana.dashboards["rayrack-idle"]["meta"]["folderUid"] == "rayrack"


def test_dry_run_reports_and_writes_nothing(grafana, token_file, capsys):
    assert run(grafana, token_file, "--dry-run") == 0
    assert grafana.writes == [] and grafana.dashboards == {}
    assert capsys.readouterr().out.count("would be created") == len(DASHBOARDS)


def test_the_datasource_uid_of_the_target_grafana_becomes_the_default(grafana, token_file):
    assert run(grafana, token_file, "--datasource-uid", "P1809F7CD0C75ACF3") == 0
    board = grafana.dashboards["rayrack-cluster"]["dashboard"]
    variable = next(v for v in board["templating"]["list"] if v["type"] == "datasource")
    assert variable["current"]["value"] == "P1809F7CD0C75ACF3"


def test_the_token_can_come_from_the_environment(grafana, monkeypatch, capsys):
    monkeypatch.setenv(sync.TOKEN_ENV, TOKEN)
    assert sync.main(["--url", grafana.url]) == 0
    assert len(grafana.dashboards) == len(DASHBOARDS)


def test_a_rejected_token_is_reported_and_nothing_written(grafana, tmp_path, capsys):
    wrong = tmp_path / "wrong"
    wrong.write_text("glsa_wrong")
    assert sync.main(["--url", grafana.url, "--token-file", str(wrong)]) == 1
    assert "rejected the token (401)" in capsys.readouterr().err
    assert grafana.writes == []


def test_no_token_or_no_grafana_fail_clearly(grafana, token_file, monkeypatch, capsys):
    monkeypatch.delenv(sync.TOKEN_ENV, raising=False)
    assert sync.main(["--url", grafana.url]) == 2
    assert "no Grafana token" in capsys.readouterr().err
    # Nothing listens there any more.
    url = grafana.url
    grafana.shutdown()
    grafana.server_close()
    assert sync.main(["--url", url, "--token-file", str(token_file), "--timeout", "2"]) == 1
    assert "grafana sync:" in capsys.readouterr().err


def test_python_dash_m_entry_point(grafana, token_file):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "monitoring.grafana.sync", "--url", grafana.url,
                             "--token-file", str(token_file)], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"{len(DASHBOARDS)} dashboards, {len(DASHBOARDS)} changed" in result.stdout

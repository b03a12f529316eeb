"""The checked-in dashboards: generated, valid, and querying only metrics that exist."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from monitoring.grafana import generate

REPO = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((REPO / "monitoring" / "grafana" / "schema" / "dashboard.schema.json").read_text())
CHECKED_IN = sorted(generate.DASHBOARDS_DIR.glob("*.json"))
GRAFANA_VARIABLES = {"__rate_interval", "__interval", "__range", "datasource"}
# The idle guard's families (exporter.py GuardCollector) and the idle_held counter, which the golden scenario
# never reaches; the golden files hold the others.
GUARD_METRICS = {
    "rayrack_guard_dry_run": "guard_dry_run",
    "rayrack_gpu_idle_seconds_total": "gpu_idle_seconds",
    "rayrack_guard_actions_total": "guard_actions",
}


def boards() -> list[tuple[str, dict]]:
    return [(path.name, json.loads(path.read_text())) for path in CHECKED_IN]


def queries(board: dict) -> list[tuple[str, str]]:
    return [(panel["title"], target["expr"]) for panel in board["panels"] for target in panel.get("targets", [])]


def agent_metrics() -> set[str]:
    names = set()
    for golden in (REPO / "tests" / "agent" / "golden").glob("*.prom"):
        for line in golden.read_text().splitlines():
            if line.startswith("# TYPE "):
                name, kind = line.split()[2:4]
                names.add(name + ("_total" if kind == "counter" and not name.endswith("_total") else ""))
            elif line and not line.startswith("#"):
                names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    exporter = (REPO / "ray_agent" / "exporter.py").read_text()
    for name, family in GUARD_METRICS.items():
        assert f'"{family}"' in exporter, f"{family} is no longer exported: update GUARD_METRICS"
        names.add(name)
    return names


def recorded() -> set[str]:
    names = set()
    for path in (REPO / "monitoring" / "prometheus" / "rules").glob("*.yml"):
        for group in yaml.safe_load(path.read_text())["groups"]:
            names.update(rule["record"] for rule in group["rules"] if "record" in rule)
    return names


def test_every_generated_dashboard_is_checked_in_unchanged():
    assert {path.name for path in CHECKED_IN} == set(generate.DASHBOARDS)
    for name, build in generate.DASHBOARDS.items():
        assert (generate.DASHBOARDS_DIR / name).read_text() == generate.render(build), (
            f"{name} differs from the generator: run python -m monitoring.grafana.generate")


def test_check_mode_catches_a_hand_edit(tmp_path: Path, capsys):
    assert generate.main(["--out", str(tmp_path)]) == 0
    assert generate.main(["--check", "--out", str(tmp_path)]) == 0
    edited = tmp_path / "gpu-detail.json"
    edited.write_text(edited.read_text().replace("Temperature", "Temp"))
    assert generate.main(["--check", "--out", str(tmp_path)]) == 1
    assert "gpu-detail.json" in capsys.readouterr().err


@pytest.mark.parametrize(("name", "board"), boards(), ids=[p.name for p in CHECKED_IN])
def test_dashboard_matches_the_schema(name: str, board: dict):
    jsonschema.validate(board, SCHEMA)


def test_the_schema_rejects_what_grafana_would_not_load():
    board = json.loads((generate.DASHBOARDS_DIR / "cluster-overview.json").read_text())
    broken = json.loads(json.dumps(board))
    del broken["panels"][1]["targets"][0]["expr"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMA)
    broken = json.loads(json.dumps(board))
    broken["panels"][1]["gridPos"]["w"] = 30
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMA)


@pytest.mark.parametrize(("name", "board"), boards(), ids=[p.name for p in CHECKED_IN])
def test_panels_are_unique_and_do_not_overlap(name: str, board: dict):
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_uids_are_unique_across_dashboards():
    uids = [board["uid"] for _, board in boards()]
    assert len(uids) == len(set(uids))


@pytest.mark.parametrize(("name", "board"), boards(), ids=[p.name for p in CHECKED_IN])
def test_queries_use_defined_variables_and_existing_metrics(name: str, board: dict):
    defined = {variable["name"] for variable in board["templating"]["list"]} | GRAFANA_VARIABLES
    known = agent_metrics() | recorded()
    for title, expr in queries(board):
        for variable in re.findall(r"\$\{?(\w+)", expr):
            assert variable in defined, f"{name} / {title}: ${variable} is not defined"
        for metric in re.findall(r"\b(rayrack_\w+|\w+:\w+:\w+)\b", expr):
            assert metric in known, f"{name} / {title}: {metric} is neither exported by the agent nor recorded"
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            metric = re.match(r"label_values\((\w+)", variable["query"]["query"])[1]
            assert metric in known | {"up"}, f"{name}: variable {variable['name']} reads unknown {metric}"

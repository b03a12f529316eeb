"""The grafana role's provisioning files, rendered as the role renders them, against Grafana's schema."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from render import REPO, render

SCHEMA = json.loads((REPO / "monitoring" / "grafana" / "schema" / "provisioning.schema.json").read_text())
TEMPLATES = "etc/grafana/provisioning"


def datasource(tmp_path: Path, password: str = "pa55word") -> dict:
    ca = tmp_path / "ca"
    ca.mkdir()
    (ca / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    text = render("grafana", f"{TEMPLATES}/datasources/rayrack.yml.j2", tmp_path / "ds.yml",
                  {"prometheus_scrape_interval": "15s", "rayrack_ca_dir": str(ca),
                   "rayrack_prometheus_password": password})
    provisioning = yaml.safe_load(text)
    jsonschema.validate(provisioning, SCHEMA)
    (source,) = provisioning["datasources"]
    return source


def test_datasource_is_the_one_the_dashboards_default_to(tmp_path: Path):
    source = datasource(tmp_path)
    assert source["url"] == "https://127.0.0.1:9090" and source["isDefault"] is True
    assert source["name"] == "Prometheus", "Ray's dashboards and RAY_PROMETHEUS_NAME expect this name"
    board = json.loads((REPO / "monitoring" / "grafana" / "dashboards" / "cluster-overview.json").read_text())
    variable = next(v for v in board["templating"]["list"] if v["type"] == "datasource")
    assert variable["current"]["value"] == source["uid"]


def test_datasource_sends_prometheus_password_and_checks_the_cluster_ca(tmp_path: Path):
    source = datasource(tmp_path, password="pa$$word")
    assert (source["basicAuth"], source["basicAuthUser"]) == (True, "rayrack")
    assert source["jsonData"]["tlsAuthWithCACert"] is True
    # Grafana expands $ in provisioning files; $$ is its escape for one.
    assert source["secureJsonData"] == {"basicAuthPassword": "pa$$$$word",
                                        "tlsCACert": (tmp_path / "ca" / "ca.crt").read_text().strip()}


@pytest.mark.parametrize("ray", [True, False])
def test_dashboard_providers(tmp_path: Path, ray: bool):
    text = render("grafana", f"{TEMPLATES}/dashboards/rayrack.yml.j2", tmp_path / "dash.yml",
                  {"grafana_ray_dashboards": ray})
    provisioning = yaml.safe_load(text)
    jsonschema.validate(provisioning, SCHEMA)
    paths = {p["name"]: p["options"]["path"] for p in provisioning["providers"]}
    expected = {"rayrack": "/var/lib/grafana/dashboards/rayrack"}
    if ray:
        expected["ray"] = "/var/lib/grafana/dashboards/ray"
    assert paths == expected


def test_the_schema_rejects_a_broken_provisioning_file():
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"apiVersion": 1, "providers": [{"name": "x", "type": "file", "options": {}}]}, SCHEMA)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"apiVersion": 1, "datasources": [{"name": "P", "type": "prometheus", "access": "proxy",
                                                               "uid": "u", "url": "localhost:9090"}]}, SCHEMA)

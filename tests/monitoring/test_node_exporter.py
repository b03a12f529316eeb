"""Host metrics are node_exporter's: every node_exporter series the dashboards and rules read is one that
Debian's node_exporter serves with the flags the prometheus role gives it (no collector changed)."""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import required
import yaml
from local_prometheus import free_port

from monitoring.grafana import generate, queries

REPO = Path(__file__).resolve().parents[2]
DEFAULTS_TEMPLATE = REPO / "roles" / "prometheus" / "templates" / "etc" / "default" / "prometheus-node-exporter.j2"
RULES = sorted((REPO / "monitoring" / "prometheus" / "rules").glob("*.yml"))


def role_flags() -> list[str]:
    """The template's flags with the listen address left out: the one flag that is templated per node."""
    (args,) = re.findall(r'^ARGS="(.*)"$', DEFAULTS_TEMPLATE.read_text(), re.MULTILINE)
    flags = re.sub(r"\{\{.*?\}\}", "{}", args).split()
    templated = [flag for flag in flags if "{}" in flag]
    assert [flag.split("=")[0] for flag in templated] == ["--web.listen-address"], templated
    return [flag for flag in flags if "{}" not in flag]


def node_exporter_series_read() -> dict[str, set[str]]:
    """node_* metric names -> where rayrack reads them (dashboard panels, rules)."""
    read: dict[str, set[str]] = {}
    expressions = [(t.where, t.expr) for path in sorted(generate.DASHBOARDS_DIR.glob("*.json"))
                   for t in queries.targets(json.loads(path.read_text()))]
    expressions += [(rule.get("record") or rule["alert"], rule["expr"]) for path in RULES
                    for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]
    for where, expr in expressions:
        for name in queries.metric_names(expr):
            if name.startswith("node_"):
                read.setdefault(name, set()).add(where)
    return read


@pytest.fixture(scope="module")
def exported() -> set[str]:
    binary = required.binary("prometheus-node-exporter", "`make host-deps` installs Debian's package")
    port = free_port()
    process = subprocess.Popen([binary, f"--web.listen-address=127.0.0.1:{port}", *role_flags()],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
                    body = response.read().decode()
                break
            except OSError:
                assert process.poll() is None, process.communicate()[1]
                assert time.monotonic() < deadline, "node_exporter did not answer in 30 s"
                time.sleep(0.1)
    finally:
        process.terminate()
        process.wait(timeout=10)
    return {line.split()[2] for line in body.splitlines() if line.startswith("# TYPE ")}


def test_the_host_panels_and_the_memory_alert_read_node_exporter():
    read = node_exporter_series_read()
    assert {"node_memory_MemAvailable_bytes", "node_memory_MemTotal_bytes", "node_cpu_seconds_total"} <= set(read)
    assert "RayrackNodeMemoryPressure" in read["node_memory_MemAvailable_bytes"]
    # Nor any series of the agent's under the names it no longer exports.
    shipped = [*generate.DASHBOARDS_DIR.glob("*.json"), *RULES]
    assert not [path.name for path in shipped if "rayrack_host_" in path.read_text()]


def test_every_node_exporter_series_read_is_served(exported: set[str]):
    assert "node_cpu_seconds_total" in exported  # the exporter answered with its default collectors
    missing = {name: sorted(where) for name, where in node_exporter_series_read().items() if name not in exported}
    assert not missing, f"read but not served by node_exporter with the role's flags: {missing}"

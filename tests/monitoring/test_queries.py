"""Dashboard queries as Grafana sends them (monitoring/grafana/queries.py): the published DCGM dashboards' panels
and template variables, answered by a real Prometheus scraping dcgm-exporter-style series, and the parts that
need no Prometheus."""

from __future__ import annotations

import json
import re
import time

import pytest
import required
import yaml
from local_prometheus import Exporter, running

from monitoring.grafana import queries

pytestmark = pytest.mark.promtool


def board(name: str) -> dict:
    return json.loads(required.ecosystem(f"dashboards/{name}").read_text())


# What the dashboards read, under dcgm-exporter's names and labels, and node_exporter's.
DCGM_FIELDS = {"DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_SM_CLOCK", "DCGM_FI_DEV_MEM_CLOCK",
               "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_MEM_COPY_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE",
               "DCGM_FI_DEV_FAN_SPEED", "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "DCGM_FI_PROF_GR_ENGINE_ACTIVE",
               "DCGM_FI_PROF_PCIE_TX_BYTES", "DCGM_FI_PROF_PCIE_RX_BYTES"}
NODE_FIELDS = {"node_load1", "node_load5", "node_load15", "node_uname_info"}


def dcgm_series(hostname: str) -> str:
    return "".join(f'{field}{{gpu="{gpu}",UUID="GPU-{hostname}-{gpu}",Hostname="{hostname}",hostname="{hostname}",'
                   f'modelName="NVIDIA H200"}} {10 + gpu}\n' for field in sorted(DCGM_FIELDS) for gpu in (0, 1))


NODE_SERIES = "".join(f"{field} 1\n" for field in sorted(NODE_FIELDS))


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    """Two GPU nodes, one with a dotted name, labelled the way prometheus_instance_label dcgm-exporter labels
    them (<name>:9400, node_exporter at <name>:9100)."""
    tmp = tmp_path_factory.mktemp("prometheus")
    exporters = {"10.0.0.1": Exporter(dcgm_series("10.0.0.1")), "gpu-b.lab": Exporter(dcgm_series("gpu-b.lab"))}
    node_exporter = Exporter(NODE_SERIES)
    targets = [{"targets": [f"127.0.0.1:{e.port}"], "labels": {"instance": f"{name}:9400"}}
               for name, e in exporters.items()]
    config = tmp / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [
            {"job_name": "ray-agent", "static_configs": targets},
            {"job_name": "node", "static_configs": [{"targets": [f"127.0.0.1:{node_exporter.port}"],
                                                     "labels": {"instance": "gpu-b.lab:9100"}}]},
        ],
    }))
    try:
        with running(config, tmp / "data") as server:
            server.wait_for_targets(3)
            # Targets turn up with their first scrape; its samples become queryable just after.
            deadline = time.monotonic() + 30
            while True:
                answer = server.get("/api/v1/query", {"query": "count(DCGM_FI_DEV_GPU_TEMP)"})
                if answer["data"]["result"] and answer["data"]["result"][0]["value"][1] == "4":
                    break
                assert time.monotonic() < deadline, f"the GPU series did not appear: {answer}"
                time.sleep(0.2)
            yield server
    finally:
        for exporter in [*exporters.values(), node_exporter]:
            exporter.shutdown()


@pytest.mark.parametrize("name", ["dcgm-exporter-dashboard.json", "dcgm-exporter-dashboard.pr355.json"])
def test_every_panel_of_dcgm_exporters_dashboards_answers(prometheus, name):
    dashboard = board(name)
    resolved, problems = queries.variables(dashboard, prometheus.ask)
    assert not problems
    assert set(resolved["gpu"].options) == {"0", "1"}
    checked = [(t.where, queries.substitute(t.expr, queries.values_of(resolved))) for t in queries.targets(dashboard)]
    assert len(checked) == 8
    assert queries.answered(prometheus.ask, checked) == []


def test_pr355_lists_gpus_of_the_hosts_it_lists_with_dotted_names_escaped(prometheus):
    resolved, _ = queries.variables(board("dcgm-exporter-dashboard.pr355.json"), prometheus.ask)
    assert resolved["Hostname"].options == ("10.0.0.1", "gpu-b.lab")
    assert resolved["Hostname"].value == r"(10\\.0\\.0\\.1|gpu-b\\.lab)"
    # The escaped regex matches exactly those names: not another host whose name differs at a dot.
    selector = f'DCGM_FI_DEV_GPU_TEMP{{Hostname=~"{resolved["Hostname"].value}"}}'
    answer = prometheus.get("/api/v1/query", {"query": f"count({selector})"})
    assert answer["data"]["result"][0]["value"][1] == "4"
    value = queries.regex_value(["10x0x0x1"])
    answer = prometheus.get("/api/v1/query", {"query": f'DCGM_FI_DEV_GPU_TEMP{{Hostname=~"{value}"}}'})
    assert answer["status"] == "success" and answer["data"]["result"] == []


def test_deepops_lists_servers_from_the_dcgm_exporter_port_and_answers_for_each(prometheus):
    dashboard = board("deepops-gpu-dashboard.json")
    resolved, problems = queries.variables(dashboard, prometheus.ask)
    assert not problems
    assert set(resolved["hostname"].options) == {"10.0.0.1", "gpu-b.lab"}
    assert resolved["hostname"].value == resolved["hostname"].options[0]  # no All: Grafana takes the first
    gpu = [t for t in queries.targets(dashboard) if queries.metric_names(t.expr) <= DCGM_FIELDS]
    node = [t for t in queries.targets(dashboard) if queries.metric_names(t.expr) <= NODE_FIELDS]
    assert len(gpu) == 13 and len(node) == 5
    checked = [(f"{t.where} [{server}]", queries.substitute(t.expr, queries.values_of(resolved, hostname=server)))
               for t in gpu for server in resolved["hostname"].options]
    checked += [(t.where, queries.substitute(t.expr, queries.values_of(resolved, hostname="gpu-b.lab"))) for t in node]
    assert queries.answered(prometheus.ask, checked) == []
    # And a server without node_exporter answers nothing there: the check can fail.
    missing = [(t.where, queries.substitute(t.expr, queries.values_of(resolved, hostname="10.0.0.1"))) for t in node]
    assert len(queries.answered(prometheus.ask, missing)) == 5


def test_canonicals_nvidia_panels_answer_when_instance_is_listed_from_the_gpu_series(prometheus):
    dashboard = board("canonical-hardware-observer-GPU.json")
    nvidia = [t for t in queries.targets(dashboard) if any(n.startswith("DCGM_") for n in queries.metric_names(t.expr))]
    assert len(nvidia) == 8 and all(t.where.endswith("(A)") for t in nvidia)
    resolved, problems = queries.variables(dashboard, prometheus.ask,
                                           {"instance": "label_values(DCGM_FI_DEV_GPU_TEMP, instance)"})
    # Nothing here has hwmon or drm series: the AMD variable is the only one without values.
    assert set(problems) == {"amd_gpu"}
    checked = [(t.where, queries.substitute(t.expr, queries.values_of(resolved))) for t in nvidia]
    assert queries.answered(prometheus.ask, checked) == []


def test_substitute_knows_grafanas_spellings():
    values = {"a": "1", "b": "2", "c": "3"}
    assert queries.substitute('x{a="$a", b="${b}", c="[[c]]", d="${a:regex}"}[$__rate_interval]', values) == \
        'x{a="1", b="2", c="3", d="1"}[$__rate_interval]'
    assert queries.substitute('label_replace(x, "i", "$1", "i", "(.*)")', values) == \
        'label_replace(x, "i", "$1", "i", "(.*)")'
    assert queries.referenced('x{a=~"$a"} / y{b="${b}"}') == {"a", "b"}


def test_metric_names_skip_functions_labels_and_strings():
    expr = ('label_replace(node_hwmon_temp_celsius{instance=~"$instance"} * on(chip) group_right() '
            'node_drm_card_info{chip=~"x{y}"}, "gpu", "$1", "card", "card([0-9]+)")')
    assert queries.metric_names(expr) == {"node_hwmon_temp_celsius", "node_drm_card_info"}


def test_targets_walk_rows_and_skip_expressionless_ones():
    dashboard = {"title": "T", "panels": [
        {"type": "row", "title": "R", "panels": [{"title": "inner", "targets": [{"refId": "A", "expr": "up"}]}]},
        {"title": "outer", "targets": [{"refId": "A", "expr": "up"}, {"refId": "B", "expr": "x", "hide": True},
                                       {"refId": "C", "datasource": {"type": "__expr__"}}]}],
        "rows": [{"panels": [{"title": "old", "targets": [{"refId": "A", "expr": "y"}]}]}]}
    assert [t.where for t in queries.targets(dashboard)] == ["T / inner (A)", "T / outer (A)", "T / old (A)"]


@pytest.mark.parametrize(("variable", "message"), [
    ({"name": "v", "type": "query", "query": "metrics(up)"}, "variable $v has query 'metrics(up)'; expected"),
    ({"name": "v", "type": "query", "query": "label_values(up, job)", "regex": "job-(.*)"},
     "variable $v has regex 'job-(.*)'; expected /pattern/flags"),
])
def test_a_variable_it_cannot_read_is_named(variable, message):
    def ask(requests):
        return [{"status": "success", "data": ["a"]} for _ in requests]

    with pytest.raises(queries.DashboardError, match="^" + re.escape("B: " + message)):
        queries.variables({"title": "B", "templating": {"list": [variable]}}, ask)


def test_answered_names_failing_and_empty_queries(prometheus):
    problems = queries.answered(prometheus.ask, [("p1", "DCGM_FI_DEV_GPU_TEMP"), ("p2", "no_such_metric"),
                                                 ("p3", "sum(")])
    assert [p.split(":")[0] for p in problems] == ["p2", "p3"]
    assert "no data" in problems[0] and "error" in problems[1]

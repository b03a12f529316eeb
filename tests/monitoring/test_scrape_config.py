"""The prometheus role's scrape configuration, rendered as the role renders it and loaded by a real Prometheus
(Debian's binary) scraping two local exporters: the `instance` label each prometheus_instance_label gives the
agent's and node_exporter's series, for inventory nodes and file_sd agents alike."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from local_prometheus import Exporter, running
from render import render

pytestmark = pytest.mark.promtool
TEMPLATE = "etc/prometheus/prometheus.yml.j2"


def scraped_instances(tmp_path: Path, mode: str) -> dict[tuple[str, str], str]:
    """(job, node) -> instance, as a Prometheus running the rendered configuration labels its targets."""
    agent, node_exporter = Exporter(), Exporter()
    file_sd = tmp_path / "file_sd"
    (file_sd / "ray-agent").mkdir(parents=True)
    (file_sd / "ray-agent" / "probe.json").write_text(
        json.dumps([{"targets": [f"localhost:{agent.port}"], "labels": {"node": "probe"}}]))
    config = tmp_path / "prometheus.yml"
    render("prometheus", TEMPLATE, config, {
        "prometheus_instance_label": mode, "prometheus_scrape_interval": "1s",
        "_prometheus_nodes": {"w1": "127.0.0.1"}, "_prometheus_head": "w1", "prometheus_scrape_ray": False,
        "rayrack_agent_port": agent.port, "prometheus_node_exporter_port": node_exporter.port,
        "prometheus_file_sd_dir": str(file_sd), "_prometheus_rules_dir": str(tmp_path / "rules"),
        "prometheus_alertmanagers": [], "rayrack_cluster_name": "test",
    })
    try:
        with running(config, tmp_path / "data") as prometheus:
            targets = prometheus.wait_for_targets(3)
            return {(t["labels"]["job"], t["labels"]["node"]): t["labels"]["instance"] for t in targets}
    finally:
        agent.shutdown()
        node_exporter.shutdown()


def test_address_keeps_prometheus_own_instance(tmp_path: Path):
    instances = scraped_instances(tmp_path, "address")
    ports = {job: int(instance.rsplit(":", 1)[1]) for (job, _), instance in instances.items()}
    assert instances[("ray-agent", "w1")] == f"127.0.0.1:{ports['ray-agent']}"
    assert instances[("node", "w1")] == f"127.0.0.1:{ports['node']}"
    assert instances[("ray-agent", "probe")].startswith("localhost:")


def test_node_gives_gpu_and_host_series_the_same_instance(tmp_path: Path):
    assert scraped_instances(tmp_path, "node") == {
        ("ray-agent", "w1"): "w1", ("node", "w1"): "w1", ("ray-agent", "probe"): "probe"}


def test_dcgm_exporter_gives_the_exporters_default_ports(tmp_path: Path):
    assert scraped_instances(tmp_path, "dcgm-exporter") == {
        ("ray-agent", "w1"): "w1:9400", ("node", "w1"): "w1:9100", ("ray-agent", "probe"): "probe:9400"}

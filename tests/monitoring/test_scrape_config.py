"""The prometheus role's scrape configuration, rendered as the role renders it and loaded by a real Prometheus
(Debian's binary) scraping two local exporters: the `instance` label each prometheus_instance_label gives the
agent's and node_exporter's series, for inventory nodes and file_sd agents alike."""

from __future__ import annotations

import http.server
import json
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import required
from render import render

pytestmark = pytest.mark.promtool
TEMPLATE = "etc/prometheus/prometheus.yml.j2"


class Exporter(http.server.ThreadingHTTPServer):
    def __init__(self) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = b"rayrack_test_up 1\n"
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return self.server_address[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    check = subprocess.run([required.binary("promtool", "`make host-deps` installs Debian's prometheus package"),
                            "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    port = free_port()
    process = subprocess.Popen(
        [required.binary("prometheus", "`make host-deps` installs Debian's prometheus package"),
         f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                answer = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/targets", timeout=2))
                targets = [t for t in answer["data"]["activeTargets"] if t["labels"]["job"] != "prometheus"]
                if len(targets) == 3 and all(t["health"] == "up" for t in targets):
                    return {(t["labels"]["job"], t["labels"]["node"]): t["labels"]["instance"] for t in targets}
            except OSError:
                pass
            assert time.monotonic() < deadline, "Prometheus did not scrape the three targets"
            time.sleep(0.3)
    finally:
        process.terminate()
        process.wait(timeout=30)
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

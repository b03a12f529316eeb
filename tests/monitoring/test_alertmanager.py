"""The alertmanager role's configuration: amtool accepts it, and a real Alertmanager (Debian's binary) routes
with it: chat for everything, and a dead node pages once (its other alerts inhibited)."""

from __future__ import annotations

import http.server
import json
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import required
import yaml
from local_prometheus import free_port
from render import render

pytestmark = pytest.mark.promtool
TEMPLATE = "etc/prometheus/alertmanager.yml.j2"
INSTALL = "apt-get install prometheus-alertmanager"


class Receiver(http.server.ThreadingHTTPServer):
    def __init__(self) -> None:
        self.bodies: list[dict] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                receiver.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([required.binary("amtool", INSTALL), "check-config", str(path)], capture_output=True,
                          text=True, timeout=60)


def test_config_with_chat_and_email_passes_amtool(tmp_path: Path):
    text = render("alertmanager", TEMPLATE, tmp_path / "am.yml", {
        "alertmanager_slack_webhook_url": "https://hooks.slack.example/T0/B0/secret",
        "alertmanager_slack_channel": "#gpu-alerts",
        "alertmanager_email_to": ["oncall@example.com"],
        "alertmanager_smtp_smarthost": "smtp.example.com:587",
        "alertmanager_smtp_from": "rayrack@example.com",
        "alertmanager_smtp_auth_username": "rayrack",
        "alertmanager_smtp_auth_password": "s3cret",
    })
    result = check(tmp_path / "am.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    # Secrets are read from files, never written into the configuration.
    assert "secret" not in text.replace("alertmanager-secrets", "") and "s3cret" not in text
    config = yaml.safe_load(text)
    page = next(r for r in config["receivers"] if r["name"] == "page")
    assert page["email_configs"] == [{"to": "oncall@example.com", "send_resolved": True}]
    assert page["slack_configs"][0]["api_url_file"].endswith("slack_webhook_url")


def test_config_without_receivers_passes_amtool(tmp_path: Path):
    render("alertmanager", TEMPLATE, tmp_path / "am.yml")
    result = check(tmp_path / "am.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_dead_node_pages_once(tmp_path: Path):
    receiver = Receiver()
    url_file = tmp_path / "slack_url"
    url_file.write_text(f"http://127.0.0.1:{receiver.server_address[1]}/hook")
    render("alertmanager", TEMPLATE, tmp_path / "am.yml", {
        "alertmanager_slack_webhook_url": "set", "_alertmanager_slack_url_file": str(url_file),
        "alertmanager_group_wait": "1s", "alertmanager_group_interval": "1s",
    })
    port = free_port()
    process = subprocess.Popen(
        [required.binary("prometheus-alertmanager", INSTALL), f"--config.file={tmp_path / 'am.yml'}",
         f"--storage.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/api/v2"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{base}/status", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "Alertmanager did not start"
                time.sleep(0.2)

        def alert(name: str, node: str, severity: str) -> dict:
            return {"labels": {"alertname": name, "node": node, "severity": severity, "cluster": "lab"},
                    "annotations": {"summary": f"{name} {node}", "description": "test"}}

        alerts = [alert("RayrackNodeDown", "w1", "critical"), alert("RayrackAgentDown", "w1", "warning"),
                  alert("RayrackRayNodeDead", "w1", "critical"), alert("RayrackAgentDown", "w2", "warning")]
        request = urllib.request.Request(f"{base}/alerts", data=json.dumps(alerts).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=5)

        def delivered() -> set[tuple[str, str]]:
            return {(b["attachments"][0]["title"].split("] ")[1].split(" on ")[0],
                     b["attachments"][0]["title"].rsplit(" on ", 1)[1]) for b in receiver.bodies}

        deadline = time.monotonic() + 30
        while delivered() != {("RayrackNodeDown", "w1"), ("RayrackAgentDown", "w2")} and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2)  # anything inhibited would have been sent by now (group_wait 1s)
        assert delivered() == {("RayrackNodeDown", "w1"), ("RayrackAgentDown", "w2")}, receiver.bodies
        state = json.load(urllib.request.urlopen(f"{base}/alerts", timeout=5))
        suppressed = {(a["labels"]["alertname"], a["labels"]["node"]) for a in state
                      if a["status"]["state"] == "suppressed" and a["status"]["inhibitedBy"]}
        assert suppressed == {("RayrackAgentDown", "w1"), ("RayrackRayNodeDead", "w1")}
    finally:
        process.terminate()
        process.wait(timeout=10)
        receiver.shutdown()

"""Prometheus behind the web configuration the monitoring roles write (exporter-toolkit's: TLS with a certificate
of the cluster CA, bcrypt basic auth), run as Debian's binary: who gets in, its self-scrape through TLS and its
own password as the prometheus role configures it, and the bcrypt hash a converge keeps."""

from __future__ import annotations

import importlib.util
import json
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import yaml
from local_prometheus import free_port, running, secured
from render import REPO, render

from rayrack.usage import PROMETHEUS_QUERIES, requests

pytestmark = pytest.mark.promtool
_SPEC = importlib.util.spec_from_file_location(
    "rayrack_secrets", REPO / "plugins" / "filter" / "rayrack_secrets.py")
assert _SPEC and _SPEC.loader
FILTERS = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(FILTERS)


def status(url: str, context: ssl.SSLContext | None, header: str | None = None) -> int | str:
    request = urllib.request.Request(url, headers={"Authorization": header} if header else {})
    try:
        return urllib.request.urlopen(request, timeout=10, context=context).status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError as err:
        return type(getattr(err, "reason", err)).__name__


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    """Prometheus with the role's scrape configuration (its self-scrape only) behind the role's web configuration."""
    tmp = tmp_path_factory.mktemp("web")
    web = secured(tmp)
    (tmp / "prometheus.password").write_text(web.password)
    port = free_port()
    config = tmp / "prometheus.yml"
    render("prometheus", "etc/prometheus/prometheus.yml.j2", config, {
        "prometheus_scrape_interval": "1s", "prometheus_listen_address": f"0.0.0.0:{port}",
        "_prometheus_nodes": {}, "_prometheus_head": "w1", "prometheus_scrape_ray": False,
        "prometheus_scrape_ray_agent": False, "prometheus_scrape_node_exporter": False,
        "_prometheus_self_password_file": str(tmp / "prometheus.password"), "rayrack_monitoring_tls_dir": str(tmp),
        "_prometheus_rules_dir": str(tmp / "rules"), "prometheus_alertmanagers": [], "rayrack_cluster_name": "test"})
    with running(config, tmp / "data", web, port) as server:
        deadline = time.monotonic() + 60
        while status(f"{server.base}/-/ready", web.context(), web.header()) != 200:
            assert time.monotonic() < deadline, "Prometheus did not start behind TLS"
            time.sleep(0.3)
        yield server


def test_only_the_password_gets_in(prometheus):
    web, url = prometheus.web, f"{prometheus.base}/api/v1/query?query=up"
    assert status(url, web.context()) == 401
    assert status(url, web.context(), web.header("wrong")) == 401
    assert status(url, web.context(), web.header()) == 200
    # Plain HTTP, and TLS that does not check the certificate against the cluster CA, get nothing.
    assert status(url.replace("https://", "http://"), None, web.header()) == 400
    assert status(url, ssl.create_default_context(), web.header()) == "SSLCertVerificationError"


def test_the_self_scrape_goes_through_tls_and_basic_auth(prometheus):
    deadline = time.monotonic() + 30
    while True:
        targets = prometheus.get("/api/v1/targets")["data"]["activeTargets"]
        if (targets and targets[0]["health"] == "up") or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    (target,) = targets
    assert target["labels"]["job"] == "prometheus" and target["scrapeUrl"].startswith("https://127.0.0.1:")
    assert target["health"] == "up", target["lastError"]


def test_a_changed_password_applies_without_a_restart(tmp_path, prometheus):
    """Prometheus reads its web configuration for every request: the role changes it without a restart."""
    web = prometheus.web
    original = web.config.read_text()
    try:
        replacement = secured(tmp_path, password="an0ther-Pa55word")
        web.config.write_text(replacement.config.read_text().replace(str(tmp_path), str(web.config.parent)))
        url = f"{prometheus.base}/-/ready"
        assert status(url, web.context(), web.header()) == 401
        assert status(url, web.context(), web.header("an0ther-Pa55word")) == 200
    finally:
        web.config.write_text(original)


def test_the_usage_script_asks_through_tls_with_the_password(prometheus):
    """The script `rayrack usage` runs on the monitoring host, with the password and CA on stdin."""
    asked = requests("user", "5m", time.time())[:1]
    given = {"asked": asked, "user": "rayrack", "password": prometheus.web.password,
             "ca": prometheus.web.ca_file.read_text()}

    def run(stdin: dict) -> dict:
        done = subprocess.run([sys.executable, "-c", PROMETHEUS_QUERIES, prometheus.base], input=json.dumps(stdin),
                              capture_output=True, text=True, timeout=60, check=True)
        return json.loads(done.stdout.removeprefix("RAYRACK-PROBE "))

    assert run(given)["rules"]["status"] == "success"
    refused = run({**given, "password": "wrong"})["rules"]
    assert refused["status"] == "error" and "Unauthorized" in refused["error"], refused


def test_a_converge_keeps_the_hash_while_the_password_matches(tmp_path):
    def users(name: str, **given) -> dict:
        (tmp_path / name).mkdir()
        return yaml.safe_load(secured(tmp_path / name, **given).config.read_text())["basic_auth_users"]

    current = users("first")
    assert current["rayrack"].startswith("$2b$12$")
    assert users("again", current=current) == current
    assert users("changed", password="n3w-Pa55word", current=current)["rayrack"] != current["rayrack"]


def test_the_hash_filter_refuses_what_bcrypt_would_cut_or_cannot_hash():
    hashed = FILTERS.rayrack_bcrypt("pw")
    assert FILTERS.rayrack_bcrypt("pw", hashed) == hashed
    assert FILTERS.rayrack_bcrypt("pw", "not a hash") != "not a hash"
    with pytest.raises(Exception, match="72"):
        FILTERS.rayrack_bcrypt("x" * 73)
    with pytest.raises(Exception, match="empty"):
        FILTERS.rayrack_bcrypt("")

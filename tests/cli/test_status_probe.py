"""`rayrack status`'s node probe, run as the nodes run it (python3 -c, the token on stdin) against a real
HTTP server standing in for the agent's /metrics and the head's Ray APIs on 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent.support import LocalServer, QuietHandler, free_port

from rayrack.remote import MARKER
from rayrack.status import NODE_PROBE

TOKEN = "cluster-token-for-the-probe"
WHEELHOUSE = '{"arch": "x86_64", "lock": "0123456789ab", "package": "ray", "python": "3.11", "version": "2.58.1"}\n'
METRICS = 'rayrack_agent_info{version="0.1.0"} 1.0\n'
NODES = {"result": True, "msg": "", "data": {"result": {"result": [{"node_ip": "10.0.0.1", "state": "ALIVE"}]}}}


@pytest.fixture
def node() -> Iterator[tuple[str, list[str]]]:
    paths: list[str] = []

    class Handler(QuietHandler):
        def do_GET(self) -> None:
            paths.append(self.path)
            if self.path == "/metrics":
                return self.reply(200, METRICS.encode(), "text/plain")
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                return self.reply(401, b"Unauthorized", "text/plain")
            answers = {"/api/version": {"ray_version": "2.58.1"}, "/api/jobs/": [{"status": "RUNNING"}]}
            body = NODES if self.path.startswith("/api/v0/nodes?") else answers.get(self.path)
            self.reply(200 if body is not None else 404, body)

    server = LocalServer(Handler)
    yield server.url.rsplit(":", 1)[1], paths
    server.close()


def probe(tmp_path: Path, agent_port: str, api: str, token: str) -> dict:
    (tmp_path / ".rayrack-wheelhouse").write_text(WHEELHOUSE)
    args = ["rayrack-absent-unit.service", str(tmp_path / ".rayrack-wheelhouse"), "127.0.0.1", agent_port, api]
    result = subprocess.run([sys.executable, "-c", NODE_PROBE, *args], input=token, capture_output=True,
                            text=True, timeout=60, check=True)  # fmt: skip
    lines = [line for line in result.stdout.splitlines() if line.startswith(MARKER)]
    assert len(lines) == 1, result.stdout + result.stderr
    return json.loads(lines[0].removeprefix(MARKER))


def test_the_head_probe_reads_metrics_and_rays_apis_with_the_token(node, tmp_path: Path) -> None:
    port, paths = node
    out = probe(tmp_path, port, f"http://127.0.0.1:{port}", TOKEN)
    assert out["metrics"] == METRICS and out["wheelhouse"] == WHEELHOUSE
    assert (out["version"], out["nodes"], out["jobs"]) == ({"ray_version": "2.58.1"}, NODES, [{"status": "RUNNING"}])
    assert paths == ["/metrics", "/api/version", "/api/v0/nodes?limit=10000&detail=true", "/api/jobs/"]


def test_the_probe_names_each_failed_call_and_never_the_token(node, tmp_path: Path) -> None:
    port, _ = node
    closed = str(free_port())
    out = probe(tmp_path, closed, f"http://127.0.0.1:{port}", "a-wrong-token")
    assert out["metrics_error"] == f"GET http://127.0.0.1:{closed}/metrics: connection refused"
    assert out["version_error"] == (f"GET http://127.0.0.1:{port}/api/version: HTTP 401 (is the token right?): "
                                    "Unauthorized")  # fmt: skip
    assert out["nodes_error"].startswith(f"GET http://127.0.0.1:{port}/api/v0/nodes: HTTP 401")
    assert "a-wrong-token" not in json.dumps(out)


def test_a_worker_probe_asks_only_its_agent(node, tmp_path: Path) -> None:
    port, paths = node
    out = probe(tmp_path, port, "", "")
    assert out["metrics"] == METRICS and "version" not in out and "version_error" not in out
    assert paths == ["/metrics"]

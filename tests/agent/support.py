"""Test helpers: scenario paths, free ports, real agent processes, plain HTTP GETs, local HTTP(S) servers."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from ray_agent.clock import FakeClock
from ray_agent.config import AttributionConfig, CollectionConfig
from ray_agent.gpu.fake import FakeBackend, parse_scenario
from ray_agent.sampler import Sampler

TESTS = Path(__file__).resolve().parent.parent
SCENARIOS = TESTS / "scenarios"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
PROC_FIXTURE = FIXTURES / "proc"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalServer:
    """A real HTTP server on 127.0.0.1 in a thread; HTTPS with `tls`, a server-side context."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], tls: ssl.SSLContext | None = None) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def write_token(path: Path, token: str) -> Path:
    """A token file as the roles write it: the token and a newline, readable by its owner only."""
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


def tls_server_context(pki: Path) -> ssl.SSLContext:
    """A server-side context with the `pki` fixture's certificate for 127.0.0.1."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki / "server.crt", pki / "server.key")
    return context


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that logs nothing and answers JSON (or given bytes) with `reply`."""

    def log_message(self, *args: object) -> None:
        pass

    def reply(self, status: int, body: Any, content_type: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def http_get(url: str, timeout: float = 10.0, context: object = None) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def wait_for_metrics(
    url: str, process: subprocess.Popen | None = None, deadline: float = 20.0, context: object = None
) -> str:
    """Poll until the agent answers; fail early if its process exits."""
    end = time.monotonic() + deadline
    last: Exception | None = None
    while time.monotonic() < end:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"agent exited early with {process.returncode}: {process.stderr.read()}")
        try:
            status, body = http_get(url, timeout=2.0, context=context)
            if status == 200 and "rayrack_last_collection_timestamp_seconds" in body:
                return body
        except OSError as err:
            last = err
        time.sleep(0.05)
    raise AssertionError(f"no metrics from {url}: {last}")


def poll_metrics(url: str, done: Callable[[str], bool], deadline: float = 30.0) -> str:
    """Scrape until `done(body)` or the deadline (a bound for loaded machines, not a speed goal); the last body."""
    end = time.monotonic() + deadline
    body = ""
    while time.monotonic() < end:
        body = http_get(url)[1]
        if done(body):
            break
        time.sleep(0.1)
    return body


def metric_lines(body: str, name: str) -> list[str]:
    return [line for line in body.splitlines() if line.startswith(name + "{") or line.startswith(name + " ")]


def sample_value(body: str, name: str, **labels: str) -> float | None:
    """Value of the one series of `name` whose labels include `labels`, None when absent."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    found = [line for line in metric_lines(body, name) if all(w in line for w in wanted)]
    if not found:
        return None
    assert len(found) == 1, found
    return float(found[0].rsplit(" ", 1)[1])


def fake_sampler(
    scenario_text: str,
    clock: FakeClock | None = None,
    interval: float = 1.0,
    call_timeout: float = 0.5,
    retry: float = 10.0,
    attribution: object = None,
) -> tuple[Sampler, FakeBackend, FakeClock]:
    clock = clock or FakeClock()
    backend = FakeBackend(parse_scenario(scenario_text, "<test>"), clock)
    sampler = Sampler(
        backend,
        attribution,
        CollectionConfig(interval=interval, call_timeout=call_timeout, backend_retry_interval=retry),
        clock,
    )
    return sampler, backend, clock


DISABLED_ATTRIBUTION = AttributionConfig(enabled=False)


class AgentProcess:
    """A real `ray-agent` process on 127.0.0.1, stopped with SIGTERM at the end of the test."""

    def __init__(self, args: list[str], cwd: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/metrics"
        command = [
            sys.executable,
            "-m",
            "ray_agent.cli",
            "--web.listen-address",
            f"127.0.0.1:{self.port}",
            *args,
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

"""A real Prometheus (Debian's binary) on loopback for the duration of a test, and exporters for it to scrape."""

from __future__ import annotations

import contextlib
import http.server
import json
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import required

INSTALL = "`make host-deps` installs Debian's prometheus package"


class Exporter(http.server.ThreadingHTTPServer):
    """Serves one fixed exposition text on /metrics (any path) until shut down."""

    def __init__(self, body: str = "rayrack_test_up 1\n") -> None:
        payload = body.encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

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


class Prometheus:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, params: dict | None = None) -> dict:
        url = f"{self.base}{path}?{urllib.parse.urlencode(params or {}, doseq=True)}"
        try:
            return json.load(urllib.request.urlopen(url, timeout=10))
        except urllib.error.HTTPError as err:  # Prometheus answers bad queries with 400 and a JSON error
            return json.load(err)

    def ask(self, requests: list[tuple[str, dict]]) -> list[dict]:
        return [self.get(path, params) for path, params in requests]

    def targets(self) -> list[dict]:
        return [t for t in self.get("/api/v1/targets")["data"]["activeTargets"] if t["labels"]["job"] != "prometheus"]

    def wait_for_targets(self, count: int, timeout: float = 60) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError):
                targets = self.targets()
                if len(targets) == count and all(t["health"] == "up" for t in targets):
                    return targets
            assert time.monotonic() < deadline, f"Prometheus did not scrape {count} targets"
            time.sleep(0.3)


@contextlib.contextmanager
def running(config: Path, data: Path) -> Iterator[Prometheus]:
    check = subprocess.run([required.binary("promtool", INSTALL), "check", "config", str(config)],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    port = free_port()
    process = subprocess.Popen(
        [required.binary("prometheus", INSTALL), f"--config.file={config}", f"--storage.tsdb.path={data}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield Prometheus(port)
    finally:
        process.terminate()
        process.wait(timeout=30)

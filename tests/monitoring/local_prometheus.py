"""A real Prometheus (Debian's binary) on loopback for the duration of a test, and exporters for it to scrape;
optionally behind TLS and basic auth with the web configuration the monitoring roles write."""

from __future__ import annotations

import base64
import contextlib
import datetime
import http.server
import ipaddress
import json
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import required
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from render import render

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


@dataclass(frozen=True)
class WebAuth:
    """TLS and basic auth in front of a server: its web configuration and what a client needs."""

    config: Path  # --web.config.file
    ca_file: Path
    user: str
    password: str

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def header(self, password: str | None = None) -> str:
        pair = f"{self.user}:{self.password if password is None else password}".encode()
        return "Basic " + base64.b64encode(pair).decode()


def certificates(directory: Path, name: str) -> Path:
    """A throwaway CA (ca.crt) and a certificate for 127.0.0.1 and localhost signed by it (<name>.crt and
    <name>.key), as the monitoring roles lay them out. Returns the CA certificate."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])

    def issue(subject: x509.Name, public_key, ca: bool) -> x509.Certificate:
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name).public_key(public_key)
                   .serial_number(x509.random_serial_number()).not_valid_before(now)
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
        return builder.sign(ca_key, hashes.SHA256())

    pem = serialization.Encoding.PEM
    (directory / "ca.crt").write_bytes(issue(ca_name, ca_key.public_key(), True).public_bytes(pem))
    server = issue(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), key.public_key(), False)
    (directory / f"{name}.crt").write_bytes(server.public_bytes(pem))
    (directory / f"{name}.key").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                              serialization.NoEncryption()))
    return directory / "ca.crt"


def secured(directory: Path, password: str = "s3cret-Pa55word", name: str = "prometheus",
            current: dict | None = None) -> WebAuth:
    """The rayrack role's web configuration template rendered for a certificate made here; `current` is the
    basic_auth_users of the file already there, whose hash the role keeps while it matches."""
    ca_file = certificates(directory, name)
    config = directory / f"{name}-web.yml"
    render("rayrack", "etc/prometheus/web.yml.j2", config, {
        "rayrack_web_name": name, "rayrack_web_password": password, "_current_users": current or {},
        "rayrack_monitoring_tls_dir": str(directory)})
    check = subprocess.run([required.binary("promtool", INSTALL), "check", "web-config", str(config)],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    return WebAuth(config, ca_file, "rayrack", password)


class Prometheus:
    def __init__(self, port: int, web: WebAuth | None = None) -> None:
        self.web = web
        self.base = f"{'https' if web else 'http'}://127.0.0.1:{port}"

    def get(self, path: str, params: dict | None = None) -> dict:
        url = f"{self.base}{path}?{urllib.parse.urlencode(params or {}, doseq=True)}"
        request = urllib.request.Request(url, headers={"Authorization": self.web.header()} if self.web else {})
        try:
            return json.load(urllib.request.urlopen(request, timeout=10,
                                                    context=self.web.context() if self.web else None))
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
def running(config: Path, data: Path, web: WebAuth | None = None, port: int | None = None) -> Iterator[Prometheus]:
    check = subprocess.run([required.binary("promtool", INSTALL), "check", "config", str(config)],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    port = port or free_port()
    process = subprocess.Popen(
        [required.binary("prometheus", INSTALL), f"--config.file={config}", f"--storage.tsdb.path={data}",
         f"--web.listen-address=127.0.0.1:{port}", *([f"--web.config.file={web.config}"] if web else [])],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield Prometheus(port, web)
    finally:
        process.terminate()
        process.wait(timeout=30)

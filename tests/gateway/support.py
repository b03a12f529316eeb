"""What the gateway tests and its benchmark start: a real Ray head with token auth, a throwaway CA, the gateway.

Everything started here is stopped by process id (the Ray head's whole process group, then anything left
that runs from its own temporary directory), never by name: other Ray clusters on this machine are not ours.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import requests

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
BIN = Path(PYTHON).parent


def free_ports(count: int) -> list[int]:
    """Ports free right now, all different (the sockets are held until every port is chosen)."""
    held = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            held.append(sock)
        return [s.getsockname()[1] for s in held]
    finally:
        for sock in held:
            sock.close()


def wait_http(url: str, timeout: float, ca: Path | None = None, expect: Iterable[int] = (200,)) -> float:
    """Seconds until `url` answers one of `expect`; raises TimeoutError."""
    import requests

    started = time.monotonic()
    while True:
        try:
            if requests.get(url, timeout=2, verify=str(ca) if ca else True).status_code in expect:
                return time.monotonic() - started
        except requests.RequestException:
            pass
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{url} did not answer within {timeout:g}s")
        time.sleep(0.05)


def write_secret(path: Path, text: str) -> Path:
    path.write_text(text + "\n", encoding="utf-8")
    path.chmod(0o600)
    return path


# --- Ray head -------------------------------------------------------------------------------------


@dataclass
class RayHead:
    """`ray start --head --block` with token auth, its own temp dir and ports, on loopback."""

    workdir: Path
    token: str = field(default_factory=lambda: secrets.token_hex(32))
    num_gpus: int = 2
    process: subprocess.Popen[bytes] | None = None
    dashboard_port: int = 0

    @property
    def token_file(self) -> Path:
        return self.workdir / "cluster.token"

    temp_dir: Path = Path()  # set by start(): short, since Ray's socket paths must fit in 107 bytes

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self, token_file: Path | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(token_file or self.token_file),
            RAY_USAGE_STATS_ENABLED="0",
        )
        env.pop("RAY_AUTH_TOKEN", None)
        env.pop("RAY_ADDRESS", None)
        return env

    def start(self, timeout: float = 90.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rr-ray-", dir="/tmp"))
        write_secret(self.token_file, self.token)
        gcs, dashboard, client, agent_http, agent_grpc, metrics, runtime_env, node_manager, objects, *workers = (
            free_ports(9 + 16)
        )
        self.dashboard_port = dashboard
        args = [
            str(BIN / "ray"), "start", "--head", "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            f"--temp-dir={self.temp_dir}",
            "--num-cpus=2",
            f"--num-gpus={self.num_gpus}",  # no GPU here: Ray only counts them, which is all the gateway reads
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={runtime_env}",
            f"--node-manager-port={node_manager}",
            f"--object-manager-port={objects}",
            "--worker-port-list=" + ",".join(map(str, workers)),
            "--disable-usage-stats",
        ]  # fmt: skip
        log = (self.workdir / "ray-start.log").open("wb")
        # Its own session: the teardown signals this group, which holds nothing but this head.
        self.process = subprocess.Popen(args, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)  # fmt: skip
        started = time.monotonic()
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited {self.process.returncode}: "
                                   + (self.workdir / "ray-start.log").read_text(errors="replace")[-3000:])  # fmt: skip
            try:
                import requests

                r = requests.get(f"{self.dashboard_url}/api/version", timeout=2,
                                 headers={"Authorization": f"Bearer {self.token}"})  # fmt: skip
                # The version answers before the job module is ready; the job list needs it.
                if (
                    r.status_code == 200
                    and requests.get(
                        f"{self.dashboard_url}/api/jobs/", timeout=2, headers={"Authorization": f"Bearer {self.token}"}
                    ).status_code
                    == 200
                ):
                    return
            except requests.RequestException:
                pass
            if time.monotonic() - started > timeout:
                self.stop()
                raise TimeoutError(f"the Ray head's dashboard did not answer within {timeout:g}s")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)
        self.process = None
        # Ray's daemons (and its workers, which outlive a raylet's SIGTERM for a moment) carry the temp dir in
        # their command lines: whatever is left of ours is found that way, by pid.
        deadline = time.monotonic() + 10
        while True:
            left = _pids_with(str(self.temp_dir))
            if not left:
                shutil.rmtree(self.temp_dir, ignore_errors=True)
                return
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL if time.monotonic() > deadline - 5 else signal.SIGTERM)
            if time.monotonic() > deadline:
                return
            time.sleep(0.5)


def _pids_with(text: str) -> list[int]:
    found = []
    needle = text.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


# --- TLS ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    cert: Path
    key: Path


def make_pki(directory: Path) -> Pki:
    """A throwaway CA and a server certificate for 127.0.0.1 and localhost, signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rayrack test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                    x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    pem = serialization.Encoding.PEM
    (directory / "ca.crt").write_bytes(ca.public_bytes(pem))
    (directory / "tls.crt").write_bytes(cert.public_bytes(pem))
    write_secret(directory / "tls.key", key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()).decode().strip())  # fmt: skip
    return Pki(directory / "ca.crt", directory / "tls.crt", directory / "tls.key")


# --- the gateway ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Account:
    name: str
    token: str
    token_file: Path
    admin: bool = False
    max_gpus: float | None = None


def make_accounts(directory: Path, specs: Iterable[tuple[str, bool, float | None]]) -> dict[str, Account]:
    directory.mkdir(parents=True, exist_ok=True)
    accounts = {}
    for name, admin, max_gpus in specs:
        token = secrets.token_hex(32)
        accounts[name] = Account(name, token, write_secret(directory / f"{name}.token", token), admin, max_gpus)
    return accounts


def write_users(path: Path, accounts: Iterable[Account]) -> Path:
    """users.json as the ray_gateway role writes it: hashes only."""
    users = [
        {"name": a.name, "token_sha256": hashlib.sha256(a.token.encode()).hexdigest(), "admin": a.admin,
         "max_gpus": a.max_gpus}
        for a in accounts
    ]  # fmt: skip
    path.write_text(json.dumps({"users": users}), encoding="utf-8")
    return path


@dataclass
class Gateway:
    """`rayrack-gateway run` as a child process, its log in a file."""

    workdir: Path
    upstream_url: str
    users_file: Path
    upstream_token_file: Path | None
    pki: Pki | None = None
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    startup_seconds: float = 0.0

    @property
    def url(self) -> str:
        return f"{'https' if self.pki else 'http'}://127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.workdir / "gateway.log"

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_ports(1)[0]

        def opt(path: Path | None) -> str:
            return "null" if path is None else str(path)

        config = self.workdir / "gateway.yml"
        config.write_text(
            f"listen_host: 127.0.0.1\n"
            f"listen_port: {self.port}\n"
            f"tls_cert_file: {opt(self.pki.cert if self.pki else None)}\n"
            f"tls_key_file: {opt(self.pki.key if self.pki else None)}\n"
            f"upstream_url: {self.upstream_url}\n"
            f"upstream_token_file: {opt(self.upstream_token_file)}\n"
            f"users_file: {self.users_file}\n"
            f"request_timeout: 30\n",
            encoding="utf-8",
        )
        return config

    def start(self, timeout: float = 20.0) -> None:
        config = self.write_config()
        env = dict(os.environ, PYTHONPATH=str(REPO))
        started = time.monotonic()
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(
                [PYTHON, "-m", "ray_agent.gateway.cli", "run", "--config.file", str(config)],
                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
            )  # fmt: skip
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the gateway exited {self.process.returncode}: {self.log()[-3000:]}")
            try:
                wait_http(f"{self.url}/-/healthy", 0.0, self.pki.ca_cert if self.pki else None)
                self.startup_seconds = time.monotonic() - started
                return
            except TimeoutError:
                pass
            if time.monotonic() - started > timeout:
                self.stop()
                raise TimeoutError(f"the gateway did not answer within {timeout:g}s: {self.log()[-3000:]}")
            time.sleep(0.05)

    def stop(self) -> int | None:
        if self.process is None:
            return None
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait(timeout=5)
        self.process = None
        return code

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def rss_bytes(self) -> int:
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0


def client_env(head: RayHead, account: Account) -> dict[str, str]:
    """What a researcher sets: token auth on, the token file theirs (the SDK reads both once per process)."""
    return head.env(account.token_file)


def call(gateway: Gateway, method: str, path: str, account: Account | None = None, **kwargs: object
         ) -> requests.Response:  # fmt: skip
    """One request to the gateway as `account` (its token as Ray's SDK sends it), trusting the test CA."""
    import requests  # with Ray (its dependency): this module's fixtures skip or fail without it

    assert gateway.pki is not None
    headers = dict(kwargs.pop("headers", {}) or {})  # type: ignore[call-overload]
    if account is not None:
        headers["Authorization"] = f"Bearer {account.token}"
    return requests.request(method, gateway.url + path, headers=headers, verify=str(gateway.pki.ca_cert),
                            timeout=60, **kwargs)  # type: ignore[arg-type]  # fmt: skip


_SDK_PREAMBLE = """
import json, os, sys
from ray.job_submission import JobSubmissionClient
client = JobSubmissionClient(os.environ["GATEWAY_URL"], verify=os.environ["GATEWAY_CA"])
def error(call, *args, **kwargs):
    try:
        call(*args, **kwargs)
    except Exception as err:
        return str(err)
    return None
"""


def run_sdk(head: RayHead, gateway: Gateway, account: Account, code: str, timeout: float = 120) -> object:
    """Run `code` with the stock JobSubmissionClient as `account`; it sets `result`, returned (JSON)."""
    assert gateway.pki is not None
    env = client_env(head, account)
    env.update(GATEWAY_URL=gateway.url, GATEWAY_CA=str(gateway.pki.ca_cert))
    script = _SDK_PREAMBLE + code + "\nprint('RESULT=' + json.dumps(result))\n"
    proc = subprocess.run([PYTHON, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT=")]
    if proc.returncode != 0 or not lines:
        raise AssertionError(f"the SDK script failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return json.loads(lines[-1][len("RESULT=") :])


def ray_job_cli(head: RayHead, gateway: Gateway, account: Account, *args: str, timeout: float = 120,
                ca_from_env: bool = False) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """The stock `ray job ...` command line against the gateway, as `account`, trusting the CA.

    The CA is given with `--verify CA`, or (`ca_from_env`) the way that needs no flag: REQUESTS_CA_BUNDLE for
    the HTTP calls (requests) and SSL_CERT_FILE for the log tail's websocket (aiohttp's default context).
    """
    assert gateway.pki is not None
    command, *rest = args
    env = client_env(head, account)
    if ca_from_env:
        env.update(REQUESTS_CA_BUNDLE=str(gateway.pki.ca_cert), SSL_CERT_FILE=str(gateway.pki.ca_cert))
        verify: list[str] = []
    else:
        verify = ["--verify", str(gateway.pki.ca_cert)]
    argv = [str(BIN / "ray"), "job", command, "--address", gateway.url, *verify, *rest]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)

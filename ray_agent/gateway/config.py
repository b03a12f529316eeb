"""The gateway's configuration file: one frozen dataclass, loaded and validated here.

Example (every key required unless marked)::

    listen_host: 10.213.1.10        # the head's cluster address
    listen_port: 8443
    tls_cert_file: /run/credentials/rayrack-gateway.service/tls.crt   # null (with tls_key_file) = plain HTTP
    tls_key_file: /run/credentials/rayrack-gateway.service/tls.key
    upstream_url: http://127.0.0.1:8265                                  # Ray's dashboard on loopback
    upstream_token_file: /run/credentials/rayrack-gateway.service/cluster.token   # null: Ray token auth is off
    users_file: /run/credentials/rayrack-gateway.service/users.json
    request_timeout: 30             # optional, seconds, per upstream call (not the logs tail)

The secret files are not read here: `check-config` runs in Ansible's `validate:` before they exist where the
service will find them (systemd's LoadCredential= puts them under /run/credentials at start).
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from ray_agent.config import ConfigError, _Reader, _url
from ray_agent.units import parse_duration

DEFAULT_REQUEST_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    listen_host: str
    listen_port: int
    tls_cert_file: Path | None
    tls_key_file: Path | None
    upstream_url: str
    upstream_token_file: Path | None
    users_file: Path
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None


# Every key without a default must be given, null where it does not apply.
_REQUIRED = tuple(f.name for f in fields(GatewayConfig) if f.default is MISSING)


def build_config(document: Any, source: str = "<config>", base_dir: Path | None = None) -> GatewayConfig:
    """Validate a parsed YAML document. Relative paths are resolved against `base_dir`."""
    base_dir = base_dir or Path.cwd()
    reader = _Reader(source, "", document, GatewayConfig)
    missing = [key for key in _REQUIRED if key not in reader.node]
    if missing:
        # null is a value (plain HTTP, no Ray token); an absent key is a mistake.
        raise reader.error(missing[0], "required key is missing (null where it does not apply)")
    host = reader.string("listen_host", None)
    if host is None:
        raise reader.error("listen_host", "must be the address to listen on, got null")
    port = reader.integer("listen_port", 0, 1)
    if not 0 < port < 65536:
        raise reader.error("listen_port", f"must be a port from 1 to 65535, got {port}")
    cert = reader.path("tls_cert_file", base_dir)
    key = reader.path("tls_key_file", base_dir)
    if (cert is None) != (key is None):
        raise reader.error(
            "tls_key_file" if key is None else "tls_cert_file",
            "tls_cert_file and tls_key_file go together: set both, or null both for plain HTTP",
        )
    upstream = reader.get("upstream_url", None, _url)
    if upstream is None:
        raise reader.error("upstream_url", "must be Ray's dashboard URL such as http://127.0.0.1:8265, got null")
    users_file = reader.path("users_file", base_dir)
    if users_file is None:
        raise reader.error("users_file", "must be the path of users.json, got null")
    timeout = reader.get("request_timeout", DEFAULT_REQUEST_TIMEOUT, parse_duration)
    if timeout <= 0:
        raise reader.error("request_timeout", f"must be above 0 seconds, got {timeout:g}")
    return GatewayConfig(
        listen_host=host,
        listen_port=port,
        tls_cert_file=cert,
        tls_key_file=key,
        upstream_url=upstream,
        upstream_token_file=reader.path("upstream_token_file", base_dir),
        users_file=users_file,
        request_timeout=timeout,
    )


def load_config(path: Path) -> GatewayConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror}") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return build_config(document, str(path), path.parent)

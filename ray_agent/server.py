"""HTTP(S) serving of /metrics with prometheus_client's threaded WSGI server, plus listen-address helpers."""

from __future__ import annotations

import errno
import fcntl
import socket
import struct
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server
from prometheus_client.registry import CollectorRegistry

from ray_agent.config import TlsConfig

_SIOCGIFADDR = 0x8915
_RTF_UP = 0x1
_RTF_GATEWAY = 0x2


class ListenError(Exception):
    """The server cannot listen where it was told to (port taken, address not on this host, bad TLS files)."""


def default_route_address(proc_path: Path = Path("/proc")) -> str:
    """IPv4 address of the interface carrying the default route, read locally (no packets are sent)."""
    try:
        lines = (proc_path / "net" / "route").read_text(encoding="ascii").splitlines()[1:]
    except OSError as err:
        raise ListenError(f"cannot read the routing table: {err.strerror}") from None
    candidates = []
    for line in lines:
        fields = line.split()
        if len(fields) < 8:
            continue
        iface, destination, flags, metric = fields[0], fields[1], int(fields[3], 16), int(fields[6])
        if destination == "00000000" and flags & _RTF_UP and flags & _RTF_GATEWAY:
            candidates.append((metric, iface))
    if not candidates:
        raise ListenError("this host has no default route; set web.listen_address (or --web.listen-address)")
    iface = min(candidates)[1]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            reply = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, struct.pack("256s", iface[:15].encode()))
        except OSError as err:
            raise ListenError(
                f"interface {iface} (default route) has no IPv4 address: {err.strerror}"
            ) from None
    return socket.inet_ntoa(reply[20:24])


class MetricsServer:
    def __init__(
        self, registry: CollectorRegistry, host: str, port: int, tls: TlsConfig | None = None
    ) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self.tls = tls
        self._httpd: WSGIServer | None = None

    @property
    def bound_port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("server is not running")
        return int(self._httpd.server_address[1])

    def start(self) -> None:
        tls = self.tls
        where = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        try:
            self._httpd, _ = start_http_server(
                self.port,
                addr=self.host,
                registry=self.registry,
                certfile=str(tls.cert_file) if tls else None,
                keyfile=str(tls.key_file) if tls else None,
                client_cafile=str(tls.client_ca_file) if tls and tls.client_ca_file else None,
                client_auth_required=tls.client_auth_required if tls else False,
            )
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise ListenError(
                    f"cannot listen on {where}: the port is already in use "
                    "(is another agent or exporter running?)"
                ) from None
            if err.errno == errno.EADDRNOTAVAIL:
                raise ListenError(f"cannot listen on {where}: the address is not on this host") from None
            if err.errno == errno.EACCES:
                raise ListenError(f"cannot listen on {where}: permission denied") from None
            raise ListenError(f"cannot listen on {where}: {err}") from None
        except socket.gaierror as err:
            raise ListenError(f"cannot listen on {where}: {err.strerror}") from None

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

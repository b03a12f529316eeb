"""Command line: `rayrack-gateway run|check-config --config.file PATH`.

Exit codes:
  0  clean exit (run: stopped by SIGTERM/SIGINT; check-config: the file is valid)
  1  the configuration is invalid, or a secret file (users, cluster token, TLS) is missing or unusable
  3  cannot listen on the requested address (port in use, address not on this host)
"""

from __future__ import annotations

import argparse
import errno
import logging
import socket
import ssl
import sys
from pathlib import Path

from ray_agent import __version__
from ray_agent.config import ConfigError
from ray_agent.gateway.config import GatewayConfig, load_config
from ray_agent.gateway.users import SecretError, load_users
from ray_agent.ray_api import RayApiError, read_token

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_LISTEN = 3

log = logging.getLogger("ray_agent.gateway")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_FAILURE, f"{self.prog}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="rayrack-gateway",
        description="Per-user tokens and job ownership in front of Ray's Jobs API.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "command",
        choices=("run", "check-config"),
        help="run: serve the gateway; check-config: validate the configuration file (secrets are not read)",
    )
    parser.add_argument("--version", action="version", version=f"rayrack-gateway {__version__}")
    parser.add_argument(
        "--config.file", dest="config_file", type=Path, metavar="PATH", required=True, help="YAML configuration file"
    )
    parser.add_argument(
        "--log.level",
        dest="log_level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="log level (default: info)",
    )
    return parser


def tls_context(config: GatewayConfig) -> ssl.SSLContext | None:
    if config.tls_cert_file is None or config.tls_key_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.tls_cert_file, config.tls_key_file)
    except FileNotFoundError as err:
        raise SecretError(f"tls_cert_file/tls_key_file: {err.filename}: no such file") from None
    except (OSError, ssl.SSLError) as err:
        raise SecretError(
            f"tls_cert_file {config.tls_cert_file} / tls_key_file {config.tls_key_file}: unusable: {err}"
        ) from None
    return context


def run(config: GatewayConfig) -> int:
    # Imported here: check-config, run from Ansible's validate:, needs no aiohttp.
    from aiohttp import web

    from ray_agent.gateway.app import Upstream, build_app

    try:
        users = load_users(config.users_file)
        token = read_token(config.upstream_token_file) if config.upstream_token_file is not None else None
        context = tls_context(config)
    except RayApiError as err:
        print(f"rayrack-gateway: upstream_token_file: {err}", file=sys.stderr)
        return EXIT_FAILURE
    except SecretError as err:
        print(f"rayrack-gateway: {err}", file=sys.stderr)
        return EXIT_FAILURE
    app = build_app(users, Upstream(config.upstream_url, token, config.request_timeout))
    scheme = "https" if context else "http"
    where = f"[{config.listen_host}]" if ":" in config.listen_host else config.listen_host
    log.info(
        "listening on %s://%s:%d for %d users, forwarding to %s",
        scheme,
        where,
        config.listen_port,
        len(users),
        config.upstream_url,
    )
    try:
        # run_app stops on SIGTERM/SIGINT; open log tails get a second to close, so a restart stays quick.
        web.run_app(
            app,
            host=config.listen_host,
            port=config.listen_port,
            ssl_context=context,
            shutdown_timeout=1.0,
            access_log=None,
            print=None,
            handle_signals=True,
        )
    except OSError as err:
        reason = {
            errno.EADDRINUSE: "the port is already in use",
            errno.EADDRNOTAVAIL: "the address is not on this host",
            errno.EACCES: "permission denied",
        }.get(err.errno or 0, str(err))
        if isinstance(err, socket.gaierror):
            reason = err.strerror or str(err)
        print(f"rayrack-gateway: cannot listen on {where}:{config.listen_port}: {reason}", file=sys.stderr)
        return EXIT_LISTEN
    log.info("stopped")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s",
        stream=sys.stderr,
    )
    try:
        config = load_config(args.config_file)
    except ConfigError as err:
        print(f"rayrack-gateway: {err}", file=sys.stderr)
        return EXIT_FAILURE
    if args.command == "check-config":
        print(f"{args.config_file}: ok")
        return EXIT_OK
    return run(config)


if __name__ == "__main__":
    sys.exit(main())

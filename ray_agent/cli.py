"""Command line: `ray-agent [run|check] --config.file PATH --web.listen-address HOST:PORT ...`.

Exit codes:
  0  clean exit (run: stopped by SIGTERM/SIGINT; check: everything was read)
  1  check found a problem (GPU library down, a GPU down, host unreadable), or run failed unexpectedly
  2  bad flags or configuration
  3  cannot listen on the requested address (port in use, address not on this host, TLS files unusable)
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TextIO

from prometheus_client import ProcessCollector
from prometheus_client.registry import CollectorRegistry

from ray_agent import __version__
from ray_agent.attribution import Attribution
from ray_agent.clock import Clock, SystemClock
from ray_agent.config import BACKENDS, Config, ConfigError, load_config, parse_listen_address
from ray_agent.exporter import GuardCollector, SnapshotCollector, StateCollector
from ray_agent.gpu.base import GpuBackend
from ray_agent.gpu.fake import FakeBackend, ScenarioError, load_scenario
from ray_agent.guard import GpuStates, Guard, describe_stages
from ray_agent.guard.tracker import Tracker
from ray_agent.sampler import Sampler, Snapshot
from ray_agent.server import ListenError, MetricsServer, default_route_address

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_LISTEN = 3

log = logging.getLogger("ray_agent")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ray-agent",
        description="GPU metrics exporter for rayrack nodes (host metrics are node_exporter's).",
        epilog="`ray-agent nvml-sim compile SCENARIO OUT` compiles a scenario for the simulated libnvidia-ml "
        "(see `ray-agent nvml-sim --help`).",
        allow_abbrev=False,
    )
    parser.add_argument(
        "command",
        nargs="?",
        choices=("run", "check", "check-config"),
        default="run",
        help="run: serve /metrics (default); check: read everything once and print a table; "
        "check-config: validate the configuration (and fake scenario) without touching hardware",
    )
    parser.add_argument("--version", action="version", version=f"ray-agent {__version__}")
    parser.add_argument(
        "--config.file",
        dest="config_file",
        type=Path,
        metavar="PATH",
        help="YAML configuration file (default: built-in defaults)",
    )
    parser.add_argument(
        "--web.listen-address",
        dest="listen_address",
        metavar="HOST:PORT",
        help="address to serve /metrics on (default: default-route IP, port 9489)",
    )
    parser.add_argument("--gpu.backend", dest="gpu_backend", choices=BACKENDS, help="GPU backend")
    parser.add_argument(
        "--gpu.fake-scenario",
        dest="fake_scenario",
        metavar="PATH",
        help="scenario file for the fake backend, or builtin:NAME",
    )
    parser.add_argument(
        "--log.level",
        dest="log_level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="log verbosity (default: info)",
    )
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    overrides: dict[str, object] = {}
    if args.listen_address is not None:
        overrides["web.listen_address"] = args.listen_address
    if args.gpu_backend is not None:
        overrides["gpu.backend"] = args.gpu_backend
    if args.fake_scenario is not None:
        scenario = args.fake_scenario
        # A path given on the command line is relative to where the command runs, not to the config file.
        if not scenario.startswith("builtin:"):
            scenario = str(Path(scenario).resolve())
        overrides["gpu.fake_scenario"] = scenario
    return overrides


@dataclass
class Agent:
    """The wired-up parts of a running agent."""

    config: Config
    sampler: Sampler
    attribution: Attribution
    registry: CollectorRegistry
    host: str
    states: GpuStates
    guard: Guard | None = None


def build_backend(config: Config, clock: Clock) -> GpuBackend:
    if config.gpu.backend == "fake":
        assert config.gpu.fake_scenario is not None  # enforced by config validation
        return FakeBackend(
            load_scenario(config.gpu.fake_scenario, uuid_seed=socket.gethostname()), clock, config.host.proc_path
        )
    # Imported here so that the fake backend works where nvidia-ml-py is absent.
    from ray_agent.gpu.nvml import NvmlBackend

    return NvmlBackend()


def build_agent(config: Config, clock: Clock | None = None, host: str | None = None) -> Agent:
    clock = clock or SystemClock()
    if host is None:
        host = config.web.listen_address.host or default_route_address()
    backend = build_backend(config, clock)
    attribution = Attribution(config.attribution, node_ip=host, proc_path=config.host.proc_path, clock=clock)
    sampler = Sampler(backend, attribution, config.collection, clock)
    registry = CollectorRegistry(auto_describe=False)
    stale_after = 3 * config.collection.interval + 2 * config.collection.call_timeout
    registry.register(SnapshotCollector(sampler.latest, config.exporter, stale_after, clock, config.users))
    guard = None
    if config.guard.enabled:
        guard = Guard(config.guard, config.attribution, clock, proc_path=config.host.proc_path, users=config.users)
        # The listener only updates memory and queues work; actions run in the guard's own threads.
        sampler.subscribe(guard.observe)
        registry.register(GuardCollector(guard.latest))
        states = guard.states
    else:
        # The same states without the guard: nothing acts on them and nothing is saved across restarts.
        states = GpuStates(Tracker(config.guard))
        sampler.subscribe(states.observe)
    registry.register(StateCollector(states.latest))
    if config.exporter.process_metrics:
        ProcessCollector(registry=registry)
    return Agent(config, sampler, attribution, registry, host, states, guard)


def run(config: Config) -> int:
    try:
        agent = build_agent(config)
    except (ListenError, ScenarioError) as err:
        print(f"ray-agent: {err}", file=sys.stderr)
        return EXIT_USAGE
    port = config.web.listen_address.port
    server = MetricsServer(agent.registry, agent.host, port, config.web.tls)
    try:
        server.start()
    except ListenError as err:
        print(f"ray-agent: {err}", file=sys.stderr)
        return EXIT_LISTEN

    stop = threading.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    agent.attribution.start()
    if agent.guard is not None:
        agent.guard.start()
    agent.sampler.start()
    scheme = "https" if config.web.tls else "http"
    shown_host = f"[{agent.host}]" if ":" in agent.host else agent.host
    log.info(
        "ray-agent %s serving %s://%s:%d/metrics (backend %s)",
        __version__,
        scheme,
        shown_host,
        server.bound_port,
        config.gpu.backend,
    )
    while not stop.wait(1.0):
        pass
    server.stop()
    agent.sampler.stop()
    if agent.guard is not None:
        agent.guard.stop()
    agent.attribution.stop()
    log.info("stopped")
    return EXIT_OK


def _fmt(value: float | None, unit: str = "", scale: float = 1.0, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value / scale:.{digits}f}{unit}"


def render_check(snapshot: Snapshot, attribution_enabled: bool, out: TextIO) -> bool:
    """Print what the agent sees; True when nothing failed."""
    ok = True
    backend = snapshot.backend
    if backend.up:
        out.write(
            f"GPU backend  {backend.name}: up, driver {backend.driver_version}, {len(snapshot.gpus)} GPU(s)\n"
        )
    else:
        ok = False
        error = backend.error
        detail = (
            f"{error.name}" + (f" ({error.code})" if error and error.code is not None else "")
            if error
            else "?"
        )
        out.write(f"GPU backend  {backend.name}: DOWN, {detail}\n")

    rows = [
        (
            "GPU",
            "UUID",
            "MODEL",
            "UTIL",
            "MEMORY USED/TOTAL",
            "POWER",
            "TEMP",
            "SM CLK",
            "MEM CLK",
            "PROCS",
            "STATUS",
        )
    ]
    for status in snapshot.gpus:
        s = status.sample
        if s is None:
            ok = False
            error = status.error
            state = (
                f"DOWN {error.name}" + (f" ({error.code})" if error and error.code is not None else "")
                if error
                else "DOWN"
            )
            rows.append(
                (str(status.index), status.uuid or "-", "-", "-", "-", "-", "-", "-", "-", "-", state)
            )
            continue
        memory = f"{_fmt(s.memory_used_bytes, '', 2**30, 1)}/{_fmt(s.memory_total_bytes, ' GiB', 2**30, 1)}"
        util = _fmt(None if s.utilization_ratio is None else s.utilization_ratio * 100, "%")
        rows.append(
            (
                str(status.index),
                s.uuid,
                s.model,
                util,
                memory,
                _fmt(s.power_watts, " W", 1, 1),
                _fmt(s.temperature_celsius, " C"),
                _fmt(s.sm_clock_hertz, " MHz", 1e6),
                _fmt(s.memory_clock_hertz, " MHz", 1e6),
                "-" if s.processes is None else str(len(s.processes)),
                "up" if not s.field_errors else f"up, {len(s.field_errors)} field error(s)",
            )
        )
    if snapshot.gpus:
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            out.write(
                "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() + "\n"
            )

    field_errors = [
        (status.index, fe) for status in snapshot.gpus if status.sample for fe in status.sample.field_errors
    ]
    if field_errors:
        out.write("Fields not read:\n")
        for index, fe in field_errors:
            code = f" ({fe.error.code})" if fe.error.code is not None else ""
            out.write(f"  gpu {index} {fe.field}: {fe.error.name}{code}\n")

    if snapshot.processes:
        out.write("Processes:\n")
        for p in snapshot.processes:
            ray = ", ".join(
                f"{k}={v}"
                for k, v in (("job", p.ray_job_id), ("actor", p.ray_actor), ("task", p.ray_task))
                if v
            )
            linux = f" (Linux user {p.os_user})" if p.os_user and p.os_user != p.user else ""
            out.write(
                f"  gpu {p.gpu} pid {p.pid} user {p.user or '?'}{linux} {_fmt(p.used_memory_bytes, ' MiB', 2**20)}"
                f"{'  ' + ray if ray else ''}\n"
            )

    attribution = snapshot.collectors.get("attribution")
    if not attribution_enabled:
        out.write("Attribution  disabled\n")
    elif attribution is None:
        out.write("Attribution  no answer yet\n")
    else:
        answer = "ok" if attribution.success else "incomplete (the job list or state API did not answer)"
        out.write(f"Attribution  {answer}\n")
    return ok


def check(config: Config) -> int:
    try:
        agent = build_agent(config, host=config.web.listen_address.host or _best_effort_host() or "")
    except ScenarioError as err:
        print(f"ray-agent: {err}", file=sys.stderr)
        return EXIT_USAGE
    if config.attribution.enabled:
        # One synchronous refresh: the table should show what Ray says, and check is a one-shot anyway.
        agent.attribution.refresh()
    snapshot = agent.sampler.collect_once()
    agent.sampler.stop()
    if config.attribution.enabled and agent.attribution.status and not agent.attribution.status.success:
        print(f"attribution: {agent.attribution.status.error}", file=sys.stderr)
    ok = render_check(snapshot, config.attribution.enabled, sys.stdout)
    render_guard(config, sys.stdout)
    return EXIT_OK if ok else EXIT_FAILURE


def render_guard(config: Config, out: TextIO) -> None:
    """One line on the idle guard's configuration (check never runs it: one snapshot cannot show idleness)."""
    guard = config.guard
    if not guard.enabled:
        out.write("Idle guard   disabled\n")
        return
    webhook = (
        f"webhook from {guard.webhook_url_file}"
        if guard.webhook_url_file
        else f"webhook from ${guard.webhook_url_env}"
        if guard.webhook_url_env
        else "no webhook"
    )
    out.write(
        f"Idle guard   {'dry-run' if guard.dry_run else 'ACTIVE'}: held GPUs below {guard.idle_threshold:.0%} "
        f"({guard.signal}) for {guard.window:g}s -> {describe_stages(guard)}; {webhook}; audit {guard.audit_log}\n"
    )


def check_config(config: Config) -> int:
    """Config already parsed and validated by load_config; a fake scenario is parsed too."""
    if config.gpu.backend == "fake":
        try:
            load_scenario(config.gpu.fake_scenario)
        except (ScenarioError, OSError) as err:
            print(f"ray-agent: gpu.fake_scenario: {err}", file=sys.stderr)
            return EXIT_USAGE
    print("ray-agent: configuration OK")
    return EXIT_OK


def _best_effort_host() -> str | None:
    try:
        return default_route_address()
    except ListenError:
        return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["nvml-sim"]:
        # Its own argument parser: `ray-agent nvml-sim compile SCENARIO OUT` takes no agent flags.
        from ray_agent.gpu.nvml_sim.compiler import main as nvml_sim_main

        return nvml_sim_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s",
        stream=sys.stderr,
    )
    if args.listen_address is not None:
        try:
            parse_listen_address(args.listen_address)
        except ValueError as err:
            print(f"ray-agent: --web.listen-address: {err}", file=sys.stderr)
            return EXIT_USAGE
    try:
        config = load_config(args.config_file, _overrides(args))
    except ConfigError as err:
        print(f"ray-agent: {err}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "check":
        return check(config)
    if args.command == "check-config":
        return check_config(config)
    return run(config)


if __name__ == "__main__":
    sys.exit(main())

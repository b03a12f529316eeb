"""Compile a fake-backend scenario into the flat text file the simulated libnvidia-ml reads at nvmlInit.

The scenario is parsed and validated by the fake backend's own loader, so one scenario file drives both the
fake backend and the simulated library. The output is one record per line, whitespace-separated, with free
text (model names, user names, the driver version) only in the last position of a line:

    rayrack-nvml-sim 1
    epoch 1732390000.250000000      # optional; scenario time 0 (else the file's mtime)
    driver_version 550.54.15
    delay 0.001
    gpus 2
    gpu 0                           # starts a GPU block; the records below belong to it
    uuid GPU-...
    pci 00000000:10:00.0
    memory_total 25769803776
    trace utilization 2 45 0.85 0.85 15 0.05 0.05   # name, segment count, then duration start end ...
    ecc 0 0 3 0
    xid 45 79                       # at, code
    process 4242 21474836480 0 600 -1 alice   # pid memory from until(-1) every(-1) user(- for none)
    discover 1073741824             # processes: from_cuda_visible_devices, with process_memory
    gpu_delay 0.005
    nvlink_links 12 25781          # count, MB/s per link (count 0: no NVLink)
    nvlink_down 3                  # an inactive link
    nvlink_speed 5 12890           # a link at another speed
    memory_reserved 536870912
    remapped_rows 0 1 1 0          # correctable uncorrectable pending(0/1) failed(0/1)
    retired_pages_pending 0
    ecc_mode 1                     # ECC enabled (1) or disabled (0), current and pending
    clock_event_reasons 4          # NVML's bitmask
    pcie_link 4 8 4 16 4           # generation width max_generation max_width gpu_max_generation
    fabric 3 0                     # state (1 not started, 2 in progress, 3 completed), status (NVML code)
    gpm 1                           # answers GPM (then the GPM traces below are the scenario's)
    trace sm_active 1 1 0.6 0.6     # one per GPM trace (graphics_active, sm_active, ...), 0 without GPM
    model NVIDIA L4
    fault -1 any 15 300 330 600     # gpu(-1: all) call error(-1: hang) from until(-1) every(-1)

`memory_used` appears as a trace only when the scenario sets it (else memory follows the processes).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from operator import attrgetter
from pathlib import Path

from ray_agent.gpu.base import NVML_ERROR_CODES
from ray_agent.gpu.fake import (
    BUILTIN_PREFIX,
    GPM_TRACE_KEYS,
    FakeGpu,
    Health,
    Scenario,
    ScenarioError,
    Topology,
    Trace,
    Window,
    load_scenario,
    resolve_scenario_path,
)

FORMAT = "rayrack-nvml-sim 1"
_TRACES = (
    ("utilization", "utilization"),
    ("memory_utilization", "memory_utilization"),
    ("power_watts", "power_watts"),
    ("temperature_celsius", "temperature_celsius"),
    ("sm_clock_mhz", "sm_clock_mhz"),
    ("memory_clock_mhz", "memory_clock_mhz"),
    ("pcie_tx", "pcie_tx"),
    ("pcie_rx", "pcie_rx"),
    ("nvlink_tx", "nvlink_tx"),
    ("nvlink_rx", "nvlink_rx"),
    ("fan_speed", "health.fan_speed"),
    ("memory_temperature_celsius", "health.memory_temperature_celsius"),
    ("pcie_replay_errors_per_second", "health.pcie_replay_errors_per_second"),
    ("encoder_utilization", "health.encoder_utilization"),
    ("decoder_utilization", "health.decoder_utilization"),
)


def _number(value: float | None) -> str:
    return "-1" if value is None else repr(float(value))


def _trace(name: str, trace: Trace) -> str:
    parts = [f"trace {name} {len(trace.segments)}"]
    parts.extend(f"{_number(s.duration)} {_number(s.start)} {_number(s.end)}" for s in trace.segments)
    return " ".join(parts)


def _window(window: Window) -> str:
    return f"{_number(window.start)} {_number(window.end)} {_number(window.every)}"


def _token(text: str, what: str) -> str:
    if not text or any(c.isspace() for c in text):
        raise ScenarioError(f"{what} {text!r} cannot be simulated: it must be one word")
    return text


def _nvlink_supported(scenario: Scenario, index: int) -> bool:
    """NVLink is absent when the scenario marks the field unsupported on this GPU for good."""
    unsupported = NVML_ERROR_CODES["NOT_SUPPORTED"]
    return not any(
        f.call == "nvlink" and f.gpu == index and f.error == unsupported and f.window == Window()
        for f in scenario.faults
    )


def _gpu(scenario: Scenario, index: int, gpu: FakeGpu) -> list[str]:
    lines = [
        f"gpu {index}",
        f"uuid {_token(gpu.uuid, 'uuid')}",
        f"pci {_token(gpu.pci_bus_id, 'pci_bus_id')}",
        f"memory_total {gpu.memory_total_bytes}",
    ]
    if gpu.memory_used is not None:
        lines.append(_trace("memory_used", gpu.memory_used))
    lines.extend(_trace(name, attrgetter(attr)(gpu)) for name, attr in _TRACES)
    ecc = gpu.ecc
    lines.append(
        f"ecc {ecc.corrected_volatile or 0} {ecc.uncorrected_volatile or 0} "
        f"{ecc.corrected_aggregate or 0} {ecc.uncorrected_aggregate or 0}"
    )
    lines.extend(f"xid {_number(x.at)} {x.code}" for x in gpu.xids)
    for p in gpu.processes:
        user = _token(p.user, "user") if p.user else "-"
        lines.append(f"process {p.pid} {p.memory_bytes} {_window(p.window)} {user}")
    if gpu.processes_from_cuda_visible_devices:
        lines.append(f"discover {gpu.process_memory_bytes}")
    if gpu.delay is not None:
        lines.append(f"gpu_delay {_number(gpu.delay)}")
    lines.extend(_health(gpu.health))
    lines.extend(_topology(gpu.topology, _nvlink_supported(scenario, index)))
    lines.extend(_gpm(gpu))
    lines.append(f"model {gpu.model}")
    return lines


def _gpm(gpu: FakeGpu) -> list[str]:
    """The GPM switch and traces; a GPU without GPM gets zero traces (the library wants every trace)."""
    lines = [f"gpm {int(gpu.gpm is not None)}"]
    for name in GPM_TRACE_KEYS:
        trace = Trace.constant(0.0) if gpu.gpm is None else getattr(gpu.gpm, name)
        lines.append(_trace(name, trace))
    return lines


def _health(health: Health) -> list[str]:
    rows = health.remapped_rows
    return [
        f"memory_reserved {health.memory_reserved_bytes}",
        f"remapped_rows {rows.correctable} {rows.uncorrectable} {int(rows.pending)} {int(rows.failed)}",
        f"retired_pages_pending {int(health.retired_pages_pending)}",
        f"ecc_mode {int(health.ecc_enabled)}",
        f"clock_event_reasons {health.clock_event_reasons}",
    ]


def _topology(topology: Topology, nvlink_supported: bool) -> list[str]:
    link = topology.pcie_link
    nvlink = topology.nvlink
    count = nvlink.count if nvlink_supported else 0
    lines = [
        f"pcie_link {link.generation} {link.width} {link.max_generation} {link.max_width} {link.gpu_max_generation}",
        f"nvlink_links {count} {nvlink.speed_mbps}",
    ]
    if count:
        lines.extend(f"nvlink_down {link}" for link in sorted(nvlink.down))
        lines.extend(f"nvlink_speed {link} {speed}" for link, speed in nvlink.speeds)
    if topology.fabric is not None:
        lines.append(f"fabric {topology.fabric.state} {topology.fabric.status}")
    return lines


def compile_scenario(scenario: Scenario, epoch: float | None = None) -> str:
    """The simulator's configuration for `scenario`; scenario time 0 is `epoch` (Unix time) when given."""
    lines = [FORMAT]
    if epoch is not None:
        lines.append(f"epoch {epoch:.9f}")
    driver = scenario.driver_version
    lines.append(f"driver_version {_token(driver, 'driver_version')}")
    lines.append(f"delay {_number(scenario.delay)}")
    lines.append(f"gpus {len(scenario.gpus)}")
    for index, gpu in enumerate(scenario.gpus):
        lines.extend(_gpu(scenario, index, gpu))
    lines.append("end_gpus")
    for fault in scenario.faults:
        gpu = -1 if fault.gpu is None else fault.gpu
        error = -1 if fault.error is None else fault.error
        lines.append(f"fault {gpu} {fault.call} {error} {_window(fault.window)}")
    lines.append("end")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ray-agent nvml-sim",
        description="Tools for the simulated libnvidia-ml.so.1 (GPUs from a fake-backend scenario).",
    )
    sub = parser.add_subparsers(dest="action", required=True)
    comp = sub.add_parser("compile", help="compile a scenario into the library's configuration file")
    comp.add_argument("scenario", help=f"scenario file, or {BUILTIN_PREFIX}NAME for a bundled one")
    comp.add_argument("output", help="file to write ('-' for standard output)")
    comp.add_argument(
        "--epoch",
        help="Unix time at which scenario time is 0: a number, or 'now' (default: none, the library then "
        "uses the written file's modification time, so rewriting the same content keeps the clock)",
    )
    comp.add_argument(
        "--uuid-seed",
        default="",
        help="seed for derived GPU UUIDs; the agent's fake backend uses the host name (default: none)",
    )
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    epoch = None
    if args.epoch == "now":
        epoch = time.time()
    elif args.epoch is not None:
        try:
            epoch = float(args.epoch)
        except ValueError:
            print(f"ray-agent nvml-sim: --epoch: {args.epoch!r} is not a number or 'now'", file=sys.stderr)
            return 2
    try:
        scenario = load_scenario(resolve_scenario_path(args.scenario, Path.cwd()), uuid_seed=args.uuid_seed)
        text = compile_scenario(scenario, epoch)
    except ScenarioError as err:
        print(f"ray-agent nvml-sim: {err}", file=sys.stderr)
        return 2
    if args.output == "-":
        sys.stdout.write(text)
        return 0
    output = Path(args.output)
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, output)  # readers never see half a file
    return 0

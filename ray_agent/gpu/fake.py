"""Fake GPU backend driven by a scenario file, for the lab, demos and tests.

Scenario format (YAML)
======================

Times are durations from the moment the backend is created ("scenario time"): a number of seconds or a
string such as ``90s``, ``1m30s``, ``250ms``. Sizes are bytes or strings such as ``80GiB``.

.. code-block:: yaml

    driver_version: "550.54.15"      # reported by init (default "550.54.15")
    delay: 2ms                       # real time added to every call (default 0); a GPU may override it
    faults:                          # optional, see "Faults"; here without `gpu` they match every GPU
      - {call: init, error: DRIVER_NOT_LOADED, until: 20s}
    gpus:
      - model: NVIDIA A100-SXM4-80GB # required
        uuid: GPU-...                # default: derived from the index (and the host name in the agent)
        pci_bus_id: "00000000:07:00.0"   # default: derived from the index
        memory_total: 80GiB          # required
        memory_used: 20GiB           # trace of bytes; default: the memory of the processes running
        utilization:                 # trace, ratio 0..1 (default 0)
          - {for: 30s, value: 0.9}
          - {for: 10s, from: 0.9, to: 0.0}   # linear ramp
        memory_utilization: 0.4      # trace, ratio 0..1 (default 0)
        power_watts: 250             # trace (default 60)
        temperature_celsius: 55      # trace (default 40)
        sm_clock_mhz: 1410           # trace (default 1410)
        memory_clock_mhz: 1593       # trace (default 1593)
        pcie_tx_bytes_per_second: 0  # traces (default 0)
        pcie_rx_bytes_per_second: 0
        nvlink_tx_bytes_per_second: 0   # traces; exported as byte counters (their integral over time)
        nvlink_rx_bytes_per_second: 0
        ecc: {corrected_volatile: 0, uncorrected_volatile: 0, corrected_aggregate: 3}   # missing keys: 0
        xids: [{at: 45s, code: 79}]  # XID events; counted once scenario time passes `at`
        fan_speed: 0.35              # trace, ratio 0..1 of the fan's maximum (default 0.3)
        memory_temperature_celsius: 50   # trace (default 45)
        pcie_replay_errors_per_second: 0 # trace; exported as a counter (its integral, whole replays)
        encoder_utilization: 0       # traces, ratio 0..1 (default 0)
        decoder_utilization: 0
        memory_reserved: 512MiB      # driver-reserved device memory (default 0)
        remapped_rows: {correctable: 0, uncorrectable: 1, pending: true, failed: false}   # missing keys: 0/false
        retired_pages_pending: false # (default false)
        ecc_enabled: true            # ECC mode, current and pending (default true)
        clock_event_reasons: [sw_power_cap]   # active clocks-event reasons (default none), see below
        pcie_link: {generation: 4, width: 8, max_generation: 4, max_width: 16}   # see "Topology"
        nvlink_links: {count: 12, speed_mbps: 25781, down: [3], speeds: {5: 12890}}
        fabric: {state: completed, status: SUCCESS}
        unsupported: [power]         # fields that always fail with NOT_SUPPORTED
        delay: 5ms
        processes:
          - {pid: 4242, user: alice, memory: 20GiB, from: 0s, until: 10m}   # from/until optional
        # processes: from_cuda_visible_devices   # instead of a list: real processes, see below
        # process_memory: 18GiB                  # memory of each such process (default 1GiB)
        faults:
          - {call: any, error: GPU_IS_LOST, from: 60s, until: 90s}
        # GPM (GPU Performance Monitoring, Hopper and later), see "GPM" below
        gpm: true                    # the GPU has GPM (default false)
        graphics_active: 0.9         # traces, ratio 0..1; graphics_active defaults to utilization,
        sm_active: 0.6               # the others to 0
        sm_occupancy: 0.3
        tensor_active: 0.4
        dram_active: 0.5

Traces
------
A trace is either a single number (constant) or a list of segments. Each segment lasts ``for`` and holds
``value``, or ramps linearly ``from`` -> ``to``. The list loops forever: its period is the sum of the
segments. Byte counters fed by a rate trace (NVLink) are the exact integral of the trace.

GPM
---
With ``gpm: true`` a GPU answers NVML's GPM calls; without it GPM is not supported there (the keys
``graphics_active``, ``sm_active``, ``sm_occupancy``, ``tensor_active`` and ``dram_active`` are then an
error). ``graphics_active`` is the fraction of time any kernel ran (what utilisation also says);
``sm_active`` the fraction of SM cycles with work, so one tiny kernel keeps utilisation at 1 but
``sm_active`` near 0; ``sm_occupancy`` resident warps against the maximum; ``tensor_active`` tensor-core
cycles; ``dram_active`` DRAM bandwidth against the peak. GPM's PCIe and NVLink rates are the GPU's
``pcie_*`` and ``nvlink_*`` traces. Each GPM value is the exact mean of its trace over the interval
between two consecutive reads of the GPU (the integral over the interval divided by its length): the first
read after init has none, and a failed read (a ``gpm`` fault) leaves the previous one as the start.
Health fields
-------------
Energy is not a key: ``nvmlDeviceGetTotalEnergyConsumption`` is the exact integral of ``power_watts``
since scenario time 0 (the driver loading). ``clock_event_reasons`` names NVML's clocks-event reasons:
gpu_idle, applications_clocks_setting, sw_power_cap, hw_slowdown, sync_boost, sw_thermal_slowdown,
hw_thermal_slowdown, hw_power_brake_slowdown, display_clock_setting. Each health field can be listed in
``unsupported`` (a board without a fan: ``unsupported: [fan_speed]``) or be the ``call`` of a fault.

Topology
--------
Read by the hardware-acceptance check through the simulated library; samples do not carry it.
``pcie_link``: current ``generation`` and ``width`` (default: the maximum; lower is a degraded link),
``max_generation`` and ``max_width`` of the link (default 4 and 16), ``gpu_max_generation`` of the GPU
itself (default ``max_generation``). ``nvlink_links``: ``count`` links (default 12, at most 18; 0 when
``nvlink`` is unsupported), each at ``speed_mbps`` MB/s (default 25781, NVLink 3), except those in
``speeds`` (link -> MB/s); links in ``down`` are inactive and report speed 0. ``fabric``: NVSwitch fabric
registration, ``state`` one of not_started, in_progress, completed, and once completed the ``status``
(SUCCESS or an NVML error name); without it the GPU has no fabric and the call answers NOT_SUPPORTED.

Processes from CUDA_VISIBLE_DEVICES
-----------------------------------
With ``processes: from_cuda_visible_devices`` a fake GPU is held by the real processes on this node that
were given it: every process whose ``/proc/<pid>/environ`` has ``CUDA_VISIBLE_DEVICES`` listing this GPU's
index (or its UUID), each using ``process_memory`` bytes; the user comes from /proc like NVML's. A process
whose parent carries the same value inherited it rather than being assigned it, and is not listed (so a
Ray node started with ``CUDA_VISIBLE_DEVICES`` set does not make every worker a holder).

``/proc/<pid>/environ`` is the environment a process was started with: a Ray worker that sets
``CUDA_VISIBLE_DEVICES`` in ``os.environ`` for a ``num_gpus`` task does not show it there, but the
processes it starts afterwards do. A lab job therefore holds fake GPU N by running a child process from its
``num_gpus=1`` task (attribution maps the child to the task's Ray job through its parent). Reading another
user's environ needs the same user, root, or CAP_SYS_PTRACE; processes the agent cannot read are not seen.
Utilisation and everything else still come from the scenario's traces.

Faults
------
``call`` is ``init``, ``shutdown``, ``device`` (opening a GPU: handle and identity), a field name (memory,
utilization, power, temperature, sm_clock, memory_clock, ecc, xid, pcie, nvlink, processes, fan_speed,
memory_temperature, energy, pcie_replay, encoder_utilization, decoder_utilization, memory_reserved,
remapped_rows, retired_pages, clock_events, gpm; ``FIELD_NAMES``) or ``any``.
``error`` is an NVML code (number) or name (``NOT_SUPPORTED``, ``DRIVER_NOT_LOADED``, ``LIBRARY_NOT_FOUND``,
``GPU_IS_LOST``, ``RESET_REQUIRED``, ``LIB_RM_VERSION_MISMATCH``, ... see ``NVML_ERROR_NAMES``), or ``hang``:
the call blocks until the window ends or the backend shuts down. A fault is active from ``from`` (default
0) until ``until`` (default forever); with ``every`` the window repeats with that period. Faults listed
under a GPU apply to that GPU; top-level faults apply to GPU ``gpu`` when given, else to every call.
"""

from __future__ import annotations

import threading
import time
import uuid as uuid_module
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from ray_agent.clock import Clock, SystemClock
from ray_agent.gpu.base import (
    BACKEND_CALLS,
    CLOCK_EVENT_REASONS,
    DEVICE_CALL,
    FIELD_NAMES,
    NVML_ERROR_CODES,
    NVML_ERROR_NAMES,
    BackendInfo,
    EccCounts,
    FieldCollector,
    GpmSample,
    GpuError,
    GpuProcess,
    GpuSample,
    RemappedRows,
)
from ray_agent.units import parse_bytes, parse_duration

HANG = "hang"
_MHZ = 1_000_000
_UUID_NAMESPACE = uuid_module.UUID("5b0e7d2c-3f1a-4c9e-9a57-2d0c1f6e8b41")
# Longest stretch a hung call sleeps before re-checking its window (the clock may be a test's fake clock).
_HANG_POLL_SECONDS = 0.5
_BUNDLED = Path(__file__).with_name("scenarios")
BUILTIN_PREFIX = "builtin:"


class ScenarioError(ValueError):
    """A scenario file that cannot be used; the message names the file and the offending key."""


# --- traces ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Segment:
    duration: float
    start: float
    end: float

    def value_at(self, offset: float) -> float:
        return self.start + (self.end - self.start) * (offset / self.duration)

    def area_until(self, offset: float) -> float:
        return (self.start + self.value_at(offset)) / 2.0 * offset


@dataclass(frozen=True, slots=True)
class Trace:
    """A piecewise-linear signal that repeats with the sum of its segment durations as period."""

    segments: tuple[Segment, ...]

    @classmethod
    def constant(cls, value: float) -> Trace:
        return cls((Segment(1.0, value, value),))

    @property
    def period(self) -> float:
        return sum(s.duration for s in self.segments)

    def bounds(self) -> tuple[float, float]:
        values = [v for s in self.segments for v in (s.start, s.end)]
        return min(values), max(values)

    def value_at(self, t: float) -> float:
        offset = t % self.period if t >= 0 else 0.0
        for segment in self.segments:
            if offset < segment.duration:
                return segment.value_at(offset)
            offset -= segment.duration
        last = self.segments[-1]
        return last.end

    def integral(self, t: float) -> float:
        """Area under the trace from 0 to t."""
        if t <= 0:
            return 0.0
        period = self.period
        whole, offset = divmod(t, period)
        total = whole * sum(s.area_until(s.duration) for s in self.segments)
        for segment in self.segments:
            if offset < segment.duration:
                return total + segment.area_until(offset)
            total += segment.area_until(segment.duration)
            offset -= segment.duration
        return total

    def mean(self, start: float, end: float) -> float:
        """Mean of the trace from `start` to `end` (end > start): what GPM reports for that interval."""
        return (self.integral(end) - self.integral(start)) / (end - start)


# --- scenario model -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Window:
    start: float = 0.0
    end: float | None = None
    every: float | None = None

    def active(self, t: float) -> bool:
        if t < self.start:
            return False
        if self.every is not None:
            t = self.start + (t - self.start) % self.every
        return self.end is None or t < self.end

    def remaining(self, t: float) -> float | None:
        """Seconds until the current activation ends (None: never ends); meaningful while active."""
        if self.end is None:
            return None
        if self.every is not None:
            t = self.start + (t - self.start) % self.every
        return self.end - t


@dataclass(frozen=True, slots=True)
class Fault:
    call: str
    error: int | None  # None means hang
    window: Window
    gpu: int | None = None

    def matches(self, call: str, gpu: int | None) -> bool:
        if self.gpu is not None and self.gpu != gpu:
            return False
        if self.call == "any":
            return True
        return self.call == call


@dataclass(frozen=True, slots=True)
class ScheduledProcess:
    pid: int
    user: str | None
    memory_bytes: int
    window: Window


@dataclass(frozen=True, slots=True)
class XidEvent:
    at: float
    code: int


@dataclass(frozen=True, slots=True)
class Health:
    """A GPU's health fields: traces are read at scenario time, counters integrate their rate traces."""

    fan_speed: Trace
    memory_temperature_celsius: Trace
    pcie_replay_errors_per_second: Trace
    encoder_utilization: Trace
    decoder_utilization: Trace
    memory_reserved_bytes: int
    remapped_rows: RemappedRows
    retired_pages_pending: bool
    clock_event_reasons: int
    ecc_enabled: bool = True


# NVML's nvmlGpuFabricState_t, by the name scenarios use.
FABRIC_STATES: dict[str, int] = {"not_started": 1, "in_progress": 2, "completed": 3}
# NVML_NVLINK_MAX_LINKS: the most links NVML reports per GPU.
NVLINK_MAX_LINKS = 18
PCIE_WIDTHS = (1, 2, 4, 8, 12, 16, 32)


@dataclass(frozen=True, slots=True)
class PcieLink:
    """PCIe link as NVML reports it; a current generation or width below the maximum is a degraded link."""

    generation: int
    width: int
    max_generation: int
    max_width: int
    gpu_max_generation: int


@dataclass(frozen=True, slots=True)
class NvlinkLinks:
    """NVLink links of a GPU: how many, their speed, which are down, and per-link speeds that differ."""

    count: int
    speed_mbps: int
    down: frozenset[int] = frozenset()
    speeds: tuple[tuple[int, int], ...] = ()  # (link, MB/s) for links slower (or faster) than speed_mbps

    def speed_of(self, link: int) -> int:
        """MB/s of one link; 0 for a link that is down."""
        if link in self.down:
            return 0
        return dict(self.speeds).get(link, self.speed_mbps)

    def common_speed(self) -> int:
        """The speed every active link reaches (NVML's ..._SPEED_MBPS_COMMON): the slowest active link."""
        active = [self.speed_of(link) for link in range(self.count) if link not in self.down]
        return min(active) if active else 0


@dataclass(frozen=True, slots=True)
class Fabric:
    """NVSwitch fabric registration (nvmlDeviceGetGpuFabricInfo): state, and the status once completed."""

    state: int
    status: int


@dataclass(frozen=True, slots=True)
class Topology:
    """Link state for the hardware-acceptance check; the simulated library reports it, samples do not."""

    pcie_link: PcieLink
    nvlink: NvlinkLinks
    fabric: Fabric | None  # None: no NVSwitch fabric (the call answers NOT_SUPPORTED)


@dataclass(frozen=True, slots=True)
class FakeGpu:
    model: str
    uuid: str
    pci_bus_id: str
    memory_total_bytes: int
    memory_used: Trace | None
    utilization: Trace
    memory_utilization: Trace
    power_watts: Trace
    temperature_celsius: Trace
    sm_clock_mhz: Trace
    memory_clock_mhz: Trace
    pcie_tx: Trace
    pcie_rx: Trace
    nvlink_tx: Trace
    nvlink_rx: Trace
    ecc: EccCounts
    xids: tuple[XidEvent, ...]
    processes: tuple[ScheduledProcess, ...]
    health: Health
    topology: Topology
    delay: float | None
    processes_from_cuda_visible_devices: bool = False
    process_memory_bytes: int = 2**30
    gpm: FakeGpm | None = None  # None: the GPU has no GPM


@dataclass(frozen=True, slots=True)
class FakeGpm:
    """The activity traces of a GPU with GPM (see GPM_FIELDS for what each becomes)."""

    graphics_active: Trace
    sm_active: Trace
    sm_occupancy: Trace
    tensor_active: Trace
    dram_active: Trace


# GpmSample field -> the trace it is the interval mean of: FakeGpm's traces, then FakeGpu's PCIe and NVLink.
GPM_FIELDS: tuple[tuple[str, str], ...] = (
    ("graphics_active_ratio", "graphics_active"),
    ("sm_active_ratio", "sm_active"),
    ("sm_occupancy_ratio", "sm_occupancy"),
    ("tensor_active_ratio", "tensor_active"),
    ("dram_active_ratio", "dram_active"),
    ("pcie_tx_bytes_per_second", "pcie_tx"),
    ("pcie_rx_bytes_per_second", "pcie_rx"),
    ("nvlink_tx_bytes_per_second", "nvlink_tx"),
    ("nvlink_rx_bytes_per_second", "nvlink_rx"),
)
GPM_TRACE_KEYS = tuple(f.name for f in fields(FakeGpm))


def gpm_trace(gpu: FakeGpu, name: str) -> Trace:
    """The trace behind one GPM_FIELDS entry of a GPU with GPM."""
    assert gpu.gpm is not None
    return getattr(gpu.gpm, name) if name in GPM_TRACE_KEYS else getattr(gpu, name)


@dataclass(frozen=True, slots=True)
class Scenario:
    gpus: tuple[FakeGpu, ...]
    faults: tuple[Fault, ...]
    driver_version: str = "550.54.15"
    delay: float = 0.0
    source: str = "<memory>"


# --- parsing --------------------------------------------------------------------------------------

_TOP_KEYS = {"driver_version", "delay", "faults", "gpus"}
_GPU_KEYS = {
    "model",
    "uuid",
    "pci_bus_id",
    "memory_total",
    "memory_used",
    "utilization",
    "memory_utilization",
    "power_watts",
    "temperature_celsius",
    "sm_clock_mhz",
    "memory_clock_mhz",
    "pcie_tx_bytes_per_second",
    "pcie_rx_bytes_per_second",
    "nvlink_tx_bytes_per_second",
    "nvlink_rx_bytes_per_second",
    "ecc",
    "xids",
    "unsupported",
    "delay",
    "processes",
    "process_memory",
    "faults",
    *(
        "fan_speed",
        "memory_temperature_celsius",
        "pcie_replay_errors_per_second",
        "encoder_utilization",
        "decoder_utilization",
        "memory_reserved",
        "remapped_rows",
        "retired_pages_pending",
        "ecc_enabled",
        "clock_event_reasons",
        "pcie_link",
        "nvlink_links",
        "fabric",
    ),
}
_GPM_KEYS = {"gpm", *GPM_TRACE_KEYS}
FROM_CUDA_VISIBLE_DEVICES = "from_cuda_visible_devices"
_FAULT_KEYS = {"call", "error", "from", "until", "every", "gpu"}
_PROCESS_KEYS = {"pid", "user", "memory", "from", "until"}
_ECC_KEYS = {"corrected_volatile", "uncorrected_volatile", "corrected_aggregate", "uncorrected_aggregate"}
_REMAPPED_ROWS_KEYS = {"correctable", "uncorrectable", "pending", "failed"}
_PCIE_LINK_KEYS = {"generation", "width", "max_generation", "max_width", "gpu_max_generation"}
_NVLINK_KEYS = {"count", "speed_mbps", "down", "speeds"}
_FABRIC_KEYS = {"state", "status"}
# Defaults: a PCIe 4.0 x16 board with 12 NVLink 3 links to NVSwitches and no fabric manager (HGX A100).
DEFAULT_PCIE_LINK = PcieLink(generation=4, width=16, max_generation=4, max_width=16, gpu_max_generation=4)
DEFAULT_NVLINK_LINKS = 12
DEFAULT_NVLINK_SPEED_MBPS = 25781
FAULT_CALLS = (*BACKEND_CALLS, DEVICE_CALL, *FIELD_NAMES, "any")


class _Parser:
    def __init__(self, source: str, uuid_seed: str = "") -> None:
        self.source = source
        # Real UUIDs are unique across machines: the same scenario on two nodes must not share them.
        self.uuid_seed = uuid_seed

    def fail(self, path: str, message: str) -> ScenarioError:
        return ScenarioError(f"{self.source}: {path}: {message}" if path else f"{self.source}: {message}")

    def mapping(self, node: Any, path: str, allowed: set[str], required: tuple[str, ...] = ()) -> dict:
        if not isinstance(node, dict):
            raise self.fail(path, f"expected a mapping, got {type(node).__name__}")
        for key in node:
            if key not in allowed:
                raise self.fail(
                    _join(path, str(key)), f"unknown key; allowed keys: {', '.join(sorted(allowed))}"
                )
        for key in required:
            if key not in node:
                raise self.fail(_join(path, key), "is required")
        return node

    def sequence(self, node: Any, path: str) -> list:
        if not isinstance(node, list):
            raise self.fail(path, f"expected a list, got {type(node).__name__}")
        return node

    def convert(self, node: Any, path: str, parse: Callable[[Any], Any]) -> Any:
        try:
            return parse(node)
        except (TypeError, ValueError) as err:
            raise self.fail(path, str(err)) from None

    def number(self, node: Any, path: str, low: float | None = None, high: float | None = None) -> float:
        if isinstance(node, bool) or not isinstance(node, int | float):
            raise self.fail(path, f"expected a number, got {node!r}")
        return self.check_range(float(node), path, low, high)

    def check_range(self, value: float, path: str, low: float | None, high: float | None) -> float:
        if low is not None and value < low:
            raise self.fail(path, f"{value:g} is below the minimum {low:g}")
        if high is not None and value > high:
            raise self.fail(path, f"{value:g} is above the maximum {high:g}")
        return value

    def integer(self, node: Any, path: str, low: int = 0) -> int:
        if isinstance(node, bool) or not isinstance(node, int):
            raise self.fail(path, f"expected an integer, got {node!r}")
        if node < low:
            raise self.fail(path, f"{node} is below the minimum {low}")
        return node

    def duration(self, node: Any, path: str) -> float:
        return self.convert(node, path, parse_duration)

    def trace(
        self,
        node: Any,
        path: str,
        value: Callable[[Any, str], float],
    ) -> Trace:
        if not isinstance(node, list):
            return Trace.constant(value(node, path))
        if not node:
            raise self.fail(path, "a trace needs at least one segment")
        segments = []
        for i, item in enumerate(node):
            item_path = f"{path}[{i}]"
            if not isinstance(item, dict):
                raise self.fail(item_path, "expected a segment such as {for: 30s, value: 0.5}")
            self.mapping(item, item_path, {"for", "value", "from", "to"}, required=("for",))
            length = self.duration(item["for"], _join(item_path, "for"))
            if length <= 0:
                raise self.fail(_join(item_path, "for"), "a segment must last longer than 0s")
            if "value" in item:
                if "from" in item or "to" in item:
                    raise self.fail(item_path, "use either value or from/to, not both")
                level = value(item["value"], _join(item_path, "value"))
                segments.append(Segment(length, level, level))
            elif "from" in item and "to" in item:
                start = value(item["from"], _join(item_path, "from"))
                end = value(item["to"], _join(item_path, "to"))
                segments.append(Segment(length, start, end))
            else:
                raise self.fail(item_path, "a segment needs value, or both from and to")
        return Trace(tuple(segments))

    def error(self, node: Any, path: str) -> int | None:
        if node == HANG:
            return None
        if isinstance(node, int) and not isinstance(node, bool):
            if node not in NVML_ERROR_NAMES:
                raise self.fail(path, f"{node} is not an NVML error code")
            return node
        if isinstance(node, str):
            name = node.upper().removeprefix("NVML_ERROR_")
            if name in NVML_ERROR_CODES:
                return NVML_ERROR_CODES[name]
        raise self.fail(
            path, f"{node!r} is not an NVML error; use a code, a name such as GPU_IS_LOST, or {HANG!r}"
        )

    def window(self, node: dict, path: str) -> Window:
        start = self.duration(node["from"], _join(path, "from")) if "from" in node else 0.0
        end = self.duration(node["until"], _join(path, "until")) if "until" in node else None
        if end is not None and end <= start:
            raise self.fail(_join(path, "until"), "must be later than from")
        every = None
        if "every" in node:
            every = self.duration(node["every"], _join(path, "every"))
            if end is None:
                raise self.fail(_join(path, "every"), "a repeating window needs until")
            if every < end - start:
                raise self.fail(_join(path, "every"), "must be at least as long as the window")
        return Window(start, end, every)

    def fault(self, node: Any, path: str, gpu: int | None, gpu_count: int) -> Fault:
        allowed = _FAULT_KEYS if gpu is None else _FAULT_KEYS - {"gpu"}
        self.mapping(node, path, allowed, required=("call", "error"))
        call = node["call"]
        if call not in FAULT_CALLS:
            raise self.fail(
                _join(path, "call"), f"{call!r} is not allowed; allowed values: {', '.join(FAULT_CALLS)}"
            )
        target = gpu
        if "gpu" in node:
            target = self.integer(node["gpu"], _join(path, "gpu"))
            if target >= gpu_count:
                raise self.fail(_join(path, "gpu"), f"no GPU {target}; the scenario has {gpu_count}")
        if target is not None and call in BACKEND_CALLS:
            raise self.fail(_join(path, "call"), f"{call} is library-wide and cannot target one GPU")
        return Fault(
            call=call,
            error=self.error(node["error"], _join(path, "error")),
            window=self.window(node, path),
            gpu=target,
        )

    # --- health and topology keys -----------------------------------------------------------------

    def boolean(self, node: Any, path: str) -> bool:
        if not isinstance(node, bool):
            raise self.fail(path, f"expected true or false, got {node!r}")
        return node

    def choice(self, node: Any, path: str, allowed: Mapping[str, int]) -> int:
        if not isinstance(node, str) or node.lower() not in allowed:
            raise self.fail(path, f"{node!r} is not allowed; allowed values: {', '.join(allowed)}")
        return allowed[node.lower()]

    def health(self, node: dict, path: str, trace: Callable[..., Trace], total: int) -> Health:
        def ratio(v: Any, p: str) -> float:
            return self.number(v, p, 0.0, 1.0)

        reserved = 0
        if "memory_reserved" in node:
            key = _join(path, "memory_reserved")
            reserved = int(self.convert(node["memory_reserved"], key, parse_bytes))
            if reserved > total:
                raise self.fail(key, "exceeds memory_total")
        rows = self.mapping(node.get("remapped_rows", {}), _join(path, "remapped_rows"), _REMAPPED_ROWS_KEYS)
        rows_path = _join(path, "remapped_rows")
        remapped = RemappedRows(
            correctable=self.integer(rows.get("correctable", 0), _join(rows_path, "correctable")),
            uncorrectable=self.integer(rows.get("uncorrectable", 0), _join(rows_path, "uncorrectable")),
            pending=self.boolean(rows.get("pending", False), _join(rows_path, "pending")),
            failed=self.boolean(rows.get("failed", False), _join(rows_path, "failed")),
        )
        reasons = 0
        reasons_path = _join(path, "clock_event_reasons")
        for i, name in enumerate(self.sequence(node.get("clock_event_reasons", []), reasons_path)):
            reasons |= self.choice(name, f"{reasons_path}[{i}]", CLOCK_EVENT_REASONS)
        return Health(
            fan_speed=trace("fan_speed", ratio, 0.3),
            memory_temperature_celsius=trace("memory_temperature_celsius", lambda v, p: self.number(v, p), 45.0),
            pcie_replay_errors_per_second=trace(
                "pcie_replay_errors_per_second", lambda v, p: self.number(v, p, 0.0), 0.0
            ),
            encoder_utilization=trace("encoder_utilization", ratio, 0.0),
            decoder_utilization=trace("decoder_utilization", ratio, 0.0),
            memory_reserved_bytes=reserved,
            remapped_rows=remapped,
            retired_pages_pending=self.boolean(
                node.get("retired_pages_pending", False), _join(path, "retired_pages_pending")
            ),
            clock_event_reasons=reasons,
            ecc_enabled=self.boolean(node.get("ecc_enabled", True), _join(path, "ecc_enabled")),
        )

    def topology(self, node: dict, path: str) -> Topology:
        link_path = _join(path, "pcie_link")
        link = self.mapping(node.get("pcie_link", {}), link_path, _PCIE_LINK_KEYS)

        def generation(key: str, default: int) -> int:
            value = self.integer(link.get(key, default), _join(link_path, key), 1)
            if value > 6:
                raise self.fail(_join(link_path, key), f"{value} is above the maximum 6 (PCIe 6.0)")
            return value

        def width(key: str, default: int) -> int:
            value = self.integer(link.get(key, default), _join(link_path, key), 1)
            if value not in PCIE_WIDTHS:
                raise self.fail(
                    _join(link_path, key), f"x{value} is not a PCIe width; allowed values: {PCIE_WIDTHS}"
                )
            return value

        max_generation = generation("max_generation", DEFAULT_PCIE_LINK.max_generation)
        max_width = width("max_width", DEFAULT_PCIE_LINK.max_width)
        pcie = PcieLink(
            generation=generation("generation", max_generation),
            width=width("width", max_width),
            max_generation=max_generation,
            max_width=max_width,
            gpu_max_generation=generation("gpu_max_generation", max_generation),
        )
        for key, current, most in (
            ("generation", pcie.generation, pcie.max_generation),
            ("width", pcie.width, pcie.max_width),
            ("max_generation", pcie.max_generation, pcie.gpu_max_generation),
        ):
            if current > most:
                raise self.fail(_join(link_path, key), f"{current} is above the link's maximum {most}")

        nv_path = _join(path, "nvlink_links")
        nv = self.mapping(node.get("nvlink_links", {}), nv_path, _NVLINK_KEYS)
        count = self.integer(nv.get("count", DEFAULT_NVLINK_LINKS), _join(nv_path, "count"))
        if count > NVLINK_MAX_LINKS:
            raise self.fail(_join(nv_path, "count"), f"{count} is above the maximum {NVLINK_MAX_LINKS}")
        speed = self.integer(nv.get("speed_mbps", DEFAULT_NVLINK_SPEED_MBPS), _join(nv_path, "speed_mbps"), 1)

        def link_index(value: Any, where: str) -> int:
            index = self.integer(value, where)
            if index >= count:
                raise self.fail(where, f"no link {index}; the GPU has {count} (links 0..{count - 1})")
            return index

        down = frozenset(
            link_index(v, f"{_join(nv_path, 'down')}[{i}]")
            for i, v in enumerate(self.sequence(nv.get("down", []), _join(nv_path, "down")))
        )
        speeds_path = _join(nv_path, "speeds")
        speeds_node = nv.get("speeds", {})
        if not isinstance(speeds_node, dict):
            raise self.fail(speeds_path, "expected a mapping of link number to MB/s, such as {3: 12890}")
        speeds = tuple(
            sorted(
                (link_index(k, _join(speeds_path, str(k))), self.integer(v, _join(speeds_path, str(k)), 1))
                for k, v in speeds_node.items()
            )
        )

        fabric = None
        if "fabric" in node:
            fabric_path = _join(path, "fabric")
            fab = self.mapping(node["fabric"], fabric_path, _FABRIC_KEYS, required=("state",))
            status = 0
            if "status" in fab:
                status_node = fab["status"]
                success = (status_node == 0 and not isinstance(status_node, bool)) or (
                    isinstance(status_node, str) and status_node.upper() in ("SUCCESS", "NVML_SUCCESS")
                )
                status = 0 if success else self.error(status_node, _join(fabric_path, "status"))
                if status is None:
                    raise self.fail(_join(fabric_path, "status"), "a fabric status cannot hang")
            fabric = Fabric(self.choice(fab["state"], _join(fabric_path, "state"), FABRIC_STATES), status)
        return Topology(pcie, NvlinkLinks(count, speed, down, speeds), fabric)

    def gpu(self, node: Any, path: str, index: int, gpu_count: int) -> tuple[FakeGpu, tuple[Fault, ...]]:
        self.mapping(node, path, _GPU_KEYS | _GPM_KEYS, required=("model", "memory_total"))

        def ratio(v: Any, p: str) -> float:
            return self.number(v, p, 0.0, 1.0)

        def non_negative(v: Any, p: str) -> float:
            return self.number(v, p, 0.0)

        def any_number(v: Any, p: str) -> float:
            return self.number(v, p)

        def size(v: Any, p: str) -> float:
            return float(self.convert(v, p, parse_bytes))

        def trace(key: str, kind: Callable[[Any, str], float], default: float) -> Trace:
            if key not in node:
                return Trace.constant(default)
            return self.trace(node[key], _join(path, key), kind)

        model = node["model"]
        if not isinstance(model, str) or not model:
            raise self.fail(_join(path, "model"), "expected a non-empty string")
        total = int(size(node["memory_total"], _join(path, "memory_total")))
        memory_used = None
        if "memory_used" in node:
            memory_used = self.trace(node["memory_used"], _join(path, "memory_used"), size)
            if memory_used.bounds()[1] > total:
                raise self.fail(_join(path, "memory_used"), "exceeds memory_total")

        ecc = EccCounts(0, 0, 0, 0)
        if "ecc" in node:
            ecc_node = self.mapping(node["ecc"], _join(path, "ecc"), _ECC_KEYS)
            ecc = EccCounts(
                **{k: self.integer(ecc_node.get(k, 0), _join(path, f"ecc.{k}")) for k in _ECC_KEYS}
            )

        xids = []
        for i, item in enumerate(self.sequence(node.get("xids", []), _join(path, "xids"))):
            item_path = f"{_join(path, 'xids')}[{i}]"
            self.mapping(item, item_path, {"at", "code"}, required=("at", "code"))
            xids.append(
                XidEvent(
                    self.duration(item["at"], _join(item_path, "at")),
                    self.integer(item["code"], _join(item_path, "code"), 1),
                )
            )

        processes = []
        seen_pids: set[int] = set()
        discover = node.get("processes") == FROM_CUDA_VISIBLE_DEVICES
        process_memory = 2**30
        if "process_memory" in node:
            if not discover:
                raise self.fail(
                    _join(path, "process_memory"), f"is only used with processes: {FROM_CUDA_VISIBLE_DEVICES}"
                )
            process_memory = int(size(node["process_memory"], _join(path, "process_memory")))
            if process_memory > total:
                raise self.fail(_join(path, "process_memory"), "exceeds memory_total")
        if isinstance(node.get("processes"), str) and not discover:
            raise self.fail(
                _join(path, "processes"), f"expected a list of processes or {FROM_CUDA_VISIBLE_DEVICES!r}"
            )
        listed = [] if discover else node.get("processes", [])
        for i, item in enumerate(self.sequence(listed, _join(path, "processes"))):
            item_path = f"{_join(path, 'processes')}[{i}]"
            self.mapping(item, item_path, _PROCESS_KEYS, required=("pid", "memory"))
            pid = self.integer(item["pid"], _join(item_path, "pid"), 1)
            if pid in seen_pids:
                raise self.fail(_join(item_path, "pid"), f"pid {pid} is listed twice on this GPU")
            seen_pids.add(pid)
            user = item.get("user")
            if user is not None and not isinstance(user, str):
                raise self.fail(_join(item_path, "user"), "expected a user name")
            processes.append(
                ScheduledProcess(
                    pid,
                    user,
                    int(size(item["memory"], _join(item_path, "memory"))),
                    self.window(item, item_path),
                )
            )

        faults = [
            self.fault(item, f"{_join(path, 'faults')}[{i}]", index, gpu_count)
            for i, item in enumerate(self.sequence(node.get("faults", []), _join(path, "faults")))
        ]
        for i, name in enumerate(self.sequence(node.get("unsupported", []), _join(path, "unsupported"))):
            if name not in FIELD_NAMES:
                raise self.fail(
                    f"{_join(path, 'unsupported')}[{i}]",
                    f"{name!r} is not a field; allowed values: {', '.join(FIELD_NAMES)}",
                )
            faults.append(
                Fault(call=name, error=NVML_ERROR_CODES["NOT_SUPPORTED"], window=Window(), gpu=index)
            )

        seed = f"{self.uuid_seed}-" if self.uuid_seed else ""
        uuid = node.get("uuid", f"GPU-{uuid_module.uuid5(_UUID_NAMESPACE, f'fake-gpu-{seed}{index}')}")
        pci = node.get("pci_bus_id", f"00000000:{0x10 + index:02X}:00.0")
        for key, text in (("uuid", uuid), ("pci_bus_id", pci)):
            if not isinstance(text, str) or not text:
                raise self.fail(_join(path, key), "expected a non-empty string")
        gpu = FakeGpu(
            model=model,
            uuid=uuid,
            pci_bus_id=pci,
            memory_total_bytes=total,
            memory_used=memory_used,
            utilization=trace("utilization", ratio, 0.0),
            memory_utilization=trace("memory_utilization", ratio, 0.0),
            power_watts=trace("power_watts", non_negative, 60.0),
            temperature_celsius=trace("temperature_celsius", any_number, 40.0),
            sm_clock_mhz=trace("sm_clock_mhz", non_negative, 1410.0),
            memory_clock_mhz=trace("memory_clock_mhz", non_negative, 1593.0),
            pcie_tx=trace("pcie_tx_bytes_per_second", non_negative, 0.0),
            pcie_rx=trace("pcie_rx_bytes_per_second", non_negative, 0.0),
            nvlink_tx=trace("nvlink_tx_bytes_per_second", non_negative, 0.0),
            nvlink_rx=trace("nvlink_rx_bytes_per_second", non_negative, 0.0),
            ecc=ecc,
            xids=tuple(sorted(xids, key=lambda x: x.at)),
            processes=tuple(processes),
            delay=self.duration(node["delay"], _join(path, "delay")) if "delay" in node else None,
            processes_from_cuda_visible_devices=discover,
            process_memory_bytes=process_memory,
            gpm=self.gpm(node, path, trace, ratio),
            health=self.health(node, path, trace, total),
            topology=self.topology(node, path),
        )
        return gpu, tuple(faults)

    def gpm(
        self, node: dict, path: str, trace: Callable[..., Trace], ratio: Callable[[Any, str], float]
    ) -> FakeGpm | None:
        if not self.boolean(node.get("gpm", False), _join(path, "gpm")):
            for key in GPM_TRACE_KEYS:
                if key in node:
                    raise self.fail(_join(path, key), "a GPM trace needs gpm: true on this GPU (Hopper and later)")
            return None
        utilization = trace("utilization", ratio, 0.0)
        return FakeGpm(
            **{
                key: utilization if key == "graphics_active" and key not in node else trace(key, ratio, 0.0)
                for key in GPM_TRACE_KEYS
            }
        )

    def scenario(self, document: Any) -> Scenario:
        if document is None:
            raise self.fail("", "the scenario is empty")
        self.mapping(document, "", _TOP_KEYS, required=("gpus",))
        gpu_nodes = self.sequence(document["gpus"], "gpus")
        gpus = []
        faults: list[Fault] = []
        for i, node in enumerate(gpu_nodes):
            gpu, gpu_faults = self.gpu(node, f"gpus[{i}]", i, len(gpu_nodes))
            gpus.append(gpu)
            faults.extend(gpu_faults)
        uuids = [g.uuid for g in gpus]
        if len(set(uuids)) != len(uuids):
            raise self.fail("gpus", "two GPUs share a uuid")
        for i, node in enumerate(self.sequence(document.get("faults", []), "faults")):
            faults.append(self.fault(node, f"faults[{i}]", None, len(gpu_nodes)))
        driver = document.get("driver_version", "550.54.15")
        if not isinstance(driver, str):
            raise self.fail("driver_version", "expected a string; quote it in YAML")
        delay = self.duration(document["delay"], "delay") if "delay" in document else 0.0
        return Scenario(tuple(gpus), tuple(faults), driver, delay, self.source)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def parse_scenario(text: str, source: str = "<memory>", uuid_seed: str = "") -> Scenario:
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ScenarioError(f"{source}: not valid YAML: {err}") from None
    return _Parser(source, uuid_seed).scenario(document)


def bundled_scenarios() -> dict[str, Path]:
    return {p.stem: p for p in sorted(_BUNDLED.glob("*.yml"))}


def resolve_scenario_path(reference: str, base_dir: Path | None = None) -> Path:
    """A path, relative to `base_dir` when not absolute, or ``builtin:NAME`` for a scenario shipped here."""
    if reference.startswith(BUILTIN_PREFIX):
        name = reference.removeprefix(BUILTIN_PREFIX)
        bundled = bundled_scenarios()
        if name not in bundled:
            raise ScenarioError(f"no bundled scenario {name!r}; bundled: {', '.join(bundled)}")
        return bundled[name]
    path = Path(reference)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return path


def load_scenario(path: Path, uuid_seed: str = "") -> Scenario:
    """`uuid_seed` (e.g. the host name) makes derived GPU UUIDs differ between machines."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ScenarioError(f"{path}: cannot read scenario: {err.strerror}") from None
    return parse_scenario(text, str(path), uuid_seed)


# --- real processes by CUDA_VISIBLE_DEVICES --------------------------------------------------------


def _visible_devices(proc_path: Path, pid: str) -> str | None:
    try:
        environ = (proc_path / pid / "environ").read_bytes()
    except OSError:
        return None  # gone, or not ours to read
    for item in environ.split(b"\0"):
        if item.startswith(b"CUDA_VISIBLE_DEVICES="):
            return item.split(b"=", 1)[1].decode(errors="replace")
    return None


def _parent(proc_path: Path, pid: str) -> str | None:
    try:
        stat = (proc_path / pid / "stat").read_text(encoding="utf-8", errors="replace")
        return stat.rsplit(")", 1)[1].split()[1]
    except (OSError, IndexError):
        return None


def processes_assigned(proc_path: Path, index: int, uuid: str) -> tuple[int, ...]:
    """Pids whose start-up CUDA_VISIBLE_DEVICES lists GPU `index` (or `uuid`) and did not inherit it."""
    wanted = {str(index), uuid}
    try:
        entries = [entry.name for entry in proc_path.iterdir() if entry.name.isdigit()]
    except OSError:
        return ()
    found = []
    for pid in entries:
        value = _visible_devices(proc_path, pid)
        if value is None or not wanted.intersection(v.strip() for v in value.split(",")):
            continue
        parent = _parent(proc_path, pid)
        if parent is not None and _visible_devices(proc_path, parent) == value:
            continue
        found.append(int(pid))
    return tuple(sorted(found))


# --- backend --------------------------------------------------------------------------------------


class FakeBackend:
    """Answers like NVML would, from a scenario evaluated at the clock's current scenario time."""

    name = "fake"

    def __init__(self, scenario: Scenario, clock: Clock | None = None, proc_path: Path = Path("/proc")) -> None:
        self.scenario = scenario
        self._clock = clock or SystemClock()
        self.proc_path = proc_path
        self._origin = self._clock.monotonic()
        self._closed = threading.Event()
        self._initialised = False
        # Scenario time of each GPU's previous GPM read (its start of the next interval); cleared by init.
        self._gpm_previous: dict[int, float] = {}

    def scenario_time(self) -> float:
        return self._clock.monotonic() - self._origin

    def _call(self, call: str, gpu: int | None) -> None:
        """Apply the per-call delay and any active fault, exactly where NVML would fail or stall."""
        delay = self.scenario.delay
        if gpu is not None and self.scenario.gpus[gpu].delay is not None:
            delay = self.scenario.gpus[gpu].delay
        if delay:
            time.sleep(delay)
        for fault in self.scenario.faults:
            if not fault.matches(call, gpu) or not fault.window.active(self.scenario_time()):
                continue
            if fault.error is not None:
                raise GpuError(fault.error, call=call, detail="injected by scenario")
            self._hang(fault)
        if self._closed.is_set() and call not in BACKEND_CALLS:
            raise GpuError(NVML_ERROR_CODES["UNINITIALIZED"], call=call)

    def _hang(self, fault: Fault) -> None:
        while fault.window.active(now := self.scenario_time()):
            remaining = fault.window.remaining(now)
            remaining = _HANG_POLL_SECONDS if remaining is None else remaining
            # A real hung call holds no interpreter lock; sleeping in long stretches keeps this one quiet too.
            if self._closed.wait(min(max(remaining, 0.01), _HANG_POLL_SECONDS)):
                raise GpuError(
                    NVML_ERROR_CODES["UNINITIALIZED"], call=fault.call, detail="shut down while hung"
                )

    def init(self) -> BackendInfo:
        self._closed.clear()
        self._call("init", None)
        self._initialised = True
        self._gpm_previous.clear()
        return BackendInfo(self.name, self.scenario.driver_version, len(self.scenario.gpus))

    def shutdown(self) -> None:
        self._closed.set()
        self._initialised = False
        self._call("shutdown", None)

    def read_device(self, index: int) -> GpuSample:
        if not self._initialised:
            raise GpuError(NVML_ERROR_CODES["UNINITIALIZED"], call=DEVICE_CALL)
        if not 0 <= index < len(self.scenario.gpus):
            raise GpuError(NVML_ERROR_CODES["INVALID_ARGUMENT"], call=DEVICE_CALL)
        gpu = self.scenario.gpus[index]
        self._call(DEVICE_CALL, index)
        t = self.scenario_time()
        fields = FieldCollector()

        def read(name: str, value: Callable[[], Any]) -> Any:
            def reader() -> Any:
                self._call(name, index)
                return value()

            return fields.read(name, reader)

        running = tuple(p for p in gpu.processes if p.window.active(t))
        if gpu.processes_from_cuda_visible_devices:
            running = tuple(
                ScheduledProcess(pid, None, gpu.process_memory_bytes, Window())
                for pid in processes_assigned(self.proc_path, index, gpu.uuid)
            )

        def memory() -> tuple[int, int]:
            used = (
                int(gpu.memory_used.value_at(t)) if gpu.memory_used else sum(p.memory_bytes for p in running)
            )
            used = min(used, gpu.memory_total_bytes)
            return used, gpu.memory_total_bytes - used

        mem = read("memory", memory)
        rates = read("utilization", lambda: (gpu.utilization.value_at(t), gpu.memory_utilization.value_at(t)))
        power = read("power", lambda: gpu.power_watts.value_at(t))
        temperature = read("temperature", lambda: gpu.temperature_celsius.value_at(t))
        sm_clock = read("sm_clock", lambda: gpu.sm_clock_mhz.value_at(t) * _MHZ)
        mem_clock = read("memory_clock", lambda: gpu.memory_clock_mhz.value_at(t) * _MHZ)
        ecc = read("ecc", lambda: gpu.ecc)
        seen = [x for x in gpu.xids if x.at <= t]
        xid = read("xid", lambda: (len(seen), seen[-1].code if seen else None))
        pcie = read("pcie", lambda: (gpu.pcie_tx.value_at(t), gpu.pcie_rx.value_at(t)))
        nvlink = read("nvlink", lambda: (int(gpu.nvlink_tx.integral(t)), int(gpu.nvlink_rx.integral(t))))
        processes = read(
            "processes", lambda: tuple(GpuProcess(p.pid, p.memory_bytes, p.user) for p in running)
        )
        gpm = read("gpm", lambda: self._gpm(index, gpu, t)) if gpu.gpm is not None else None
        health = _read_health(gpu, t, read)
        return GpuSample(
            index=index,
            uuid=gpu.uuid,
            model=gpu.model,
            pci_bus_id=gpu.pci_bus_id,
            memory_total_bytes=gpu.memory_total_bytes if mem is not None else None,
            memory_used_bytes=mem[0] if mem is not None else None,
            memory_free_bytes=mem[1] if mem is not None else None,
            utilization_ratio=rates[0] if rates is not None else None,
            memory_utilization_ratio=rates[1] if rates is not None else None,
            power_watts=power,
            temperature_celsius=temperature,
            sm_clock_hertz=sm_clock,
            memory_clock_hertz=mem_clock,
            ecc=ecc,
            xid_errors_total=xid[0] if xid is not None else None,
            last_xid=xid[1] if xid is not None else None,
            pcie_tx_bytes_per_second=pcie[0] if pcie is not None else None,
            pcie_rx_bytes_per_second=pcie[1] if pcie is not None else None,
            nvlink_tx_bytes_total=nvlink[0] if nvlink is not None else None,
            nvlink_rx_bytes_total=nvlink[1] if nvlink is not None else None,
            processes=processes,
            gpm=gpm,
            **health,
            field_errors=tuple(fields.errors),
        )

    def _gpm(self, index: int, gpu: FakeGpu, t: float) -> GpmSample | None:
        previous = self._gpm_previous.get(index)
        if previous is not None and t <= previous:
            return None  # no time has passed since the previous read: nothing to average over
        self._gpm_previous[index] = t
        if previous is None:
            return None
        return GpmSample(**{name: gpm_trace(gpu, trace).mean(previous, t) for name, trace in GPM_FIELDS})


def _read_health(gpu: FakeGpu, t: float, read: Callable[[str, Callable[[], Any]], Any]) -> dict[str, Any]:
    """The health fields of a sample, each read (and failed) on its own like NVML's separate calls."""
    h = gpu.health
    return {
        "fan_speed_ratio": read("fan_speed", lambda: h.fan_speed.value_at(t)),
        "memory_temperature_celsius": read("memory_temperature", lambda: h.memory_temperature_celsius.value_at(t)),
        # Energy since the driver loaded (scenario time 0): the exact integral of the power trace.
        "energy_joules_total": read("energy", lambda: gpu.power_watts.integral(t)),
        "pcie_replay_errors_total": read("pcie_replay", lambda: int(h.pcie_replay_errors_per_second.integral(t))),
        "encoder_utilization_ratio": read("encoder_utilization", lambda: h.encoder_utilization.value_at(t)),
        "decoder_utilization_ratio": read("decoder_utilization", lambda: h.decoder_utilization.value_at(t)),
        "memory_reserved_bytes": read("memory_reserved", lambda: h.memory_reserved_bytes),
        "remapped_rows": read("remapped_rows", lambda: h.remapped_rows),
        "retired_pages_pending": read("retired_pages", lambda: h.retired_pages_pending),
        "clock_event_reasons": read("clock_events", lambda: h.clock_event_reasons),
    }


def fake_from_mapping(document: Mapping[str, Any], clock: Clock | None = None) -> FakeBackend:
    """Build a fake straight from a mapping (tests and the benchmark generate scenarios in code)."""
    return FakeBackend(_Parser("<generated>").scenario(dict(document)), clock)

"""The GPU backend interface, the sample dataclasses it returns and the one error type it raises.

Everything above a backend (sampler, exporter, the idle guard) only sees what is defined here, so the NVML
backend and the scenario-driven fake are interchangeable.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar, runtime_checkable

# NVML's return codes (nvml.h). Kept here rather than read from pynvml so that code which never touches NVML
# (the fake, the exporter, tests) does not depend on it.
NVML_ERROR_NAMES: dict[int, str] = {
    1: "UNINITIALIZED",
    2: "INVALID_ARGUMENT",
    3: "NOT_SUPPORTED",
    4: "NO_PERMISSION",
    5: "ALREADY_INITIALIZED",
    6: "NOT_FOUND",
    7: "INSUFFICIENT_SIZE",
    8: "INSUFFICIENT_POWER",
    9: "DRIVER_NOT_LOADED",
    10: "TIMEOUT",
    11: "IRQ_ISSUE",
    12: "LIBRARY_NOT_FOUND",
    13: "FUNCTION_NOT_FOUND",
    14: "CORRUPTED_INFOROM",
    15: "GPU_IS_LOST",
    16: "RESET_REQUIRED",
    17: "OPERATING_SYSTEM",
    18: "LIB_RM_VERSION_MISMATCH",
    19: "IN_USE",
    20: "MEMORY",
    21: "NO_DATA",
    22: "VGPU_ECC_NOT_SUPPORTED",
    23: "INSUFFICIENT_RESOURCES",
    24: "FREQ_NOT_SUPPORTED",
    25: "ARGUMENT_VERSION_MISMATCH",
    26: "DEPRECATED",
    27: "NOT_READY",
    28: "GPU_NOT_FOUND",
    29: "INVALID_STATE",
    30: "RESET_TYPE_NOT_SUPPORTED",
    999: "UNKNOWN",
}
NVML_ERROR_CODES: dict[str, int] = {name: code for code, name in NVML_ERROR_NAMES.items()}

# The agent's own error name for a call it gave up waiting on; deliberately not NVML's TIMEOUT (10).
DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"


class ErrorScope(enum.Enum):
    """How far an error reaches: one field, one GPU, or the whole library."""

    FIELD = "field"
    DEVICE = "device"
    BACKEND = "backend"


# The library as a whole is unusable: shut it down and re-initialise later.
_BACKEND_CODES = frozenset({1, 9, 12, 13, 18})
# This GPU is unusable until it recovers or is reset; its other fields cannot be trusted either.
_DEVICE_CODES = frozenset({15, 16, 28})


class GpuError(Exception):
    """An NVML failure (or the fake's imitation of one), with NVML's numeric code and name."""

    def __init__(self, code: int, call: str = "", detail: str = "") -> None:
        self.code = code
        self.name = NVML_ERROR_NAMES.get(code, f"CODE_{code}")
        self.call = call
        self.detail = detail
        text = f"NVML error {code} ({self.name})"
        if call:
            text += f" in {call}"
        if detail:
            text += f": {detail}"
        super().__init__(text)

    @property
    def scope(self) -> ErrorScope:
        if self.code in _BACKEND_CODES:
            return ErrorScope.BACKEND
        if self.code in _DEVICE_CODES:
            return ErrorScope.DEVICE
        return ErrorScope.FIELD


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """A failure as it is reported: NVML's code when there is one, and a name (NVML's or the agent's)."""

    name: str
    code: int | None = None

    @classmethod
    def from_gpu_error(cls, err: GpuError) -> ErrorInfo:
        return cls(name=err.name, code=err.code)


@dataclass(frozen=True, slots=True)
class FieldError:
    """One field of one GPU that could not be read this time; the field is left out of the sample."""

    field: str
    error: ErrorInfo


@dataclass(frozen=True, slots=True)
class GpuProcess:
    """A compute process on a GPU as the backend sees it. `user` is set only when the backend knows it."""

    pid: int
    used_memory_bytes: int | None
    user: str | None = None


@dataclass(frozen=True, slots=True)
class EccCounts:
    corrected_volatile: int | None = None
    uncorrected_volatile: int | None = None
    corrected_aggregate: int | None = None
    uncorrected_aggregate: int | None = None


@dataclass(frozen=True, slots=True)
class GpmSample:
    """GPU Performance Monitoring (Hopper and later): means over the interval since the previous read.

    Ratios are 0..1 (fraction of the interval, or of the theoretical maximum for occupancy and DRAM
    bandwidth); rates are bytes per second. A value is None when NVML did not report that metric.
    """

    graphics_active_ratio: float | None = None
    sm_active_ratio: float | None = None
    sm_occupancy_ratio: float | None = None
    tensor_active_ratio: float | None = None
    dram_active_ratio: float | None = None
    pcie_tx_bytes_per_second: float | None = None
    pcie_rx_bytes_per_second: float | None = None
    nvlink_tx_bytes_per_second: float | None = None
    nvlink_rx_bytes_per_second: float | None = None


@dataclass(frozen=True, slots=True)
class RemappedRows:
    """Row remapping of HBM (NVML's nvmlDeviceGetRemappedRows): rows remapped so far, and the remapper's state.

    `pending`: a remap is waiting for the next GPU reset; `failed`: a row could not be remapped.
    """

    correctable: int
    uncorrectable: int
    pending: bool
    failed: bool


# NVML's clocks-event-reasons bits (nvmlClocksEventReason*), by the name the exporter and scenarios use.
CLOCK_EVENT_REASONS: dict[str, int] = {
    "gpu_idle": 0x1,
    "applications_clocks_setting": 0x2,
    "sw_power_cap": 0x4,
    "hw_slowdown": 0x8,
    "sync_boost": 0x10,
    "sw_thermal_slowdown": 0x20,
    "hw_thermal_slowdown": 0x40,
    "hw_power_brake_slowdown": 0x80,
    "display_clock_setting": 0x100,
}


@dataclass(frozen=True, slots=True)
class GpuSample:
    """One read of one GPU. A field is None when it could not be read; `field_errors` says why."""

    index: int
    uuid: str
    model: str
    pci_bus_id: str
    memory_total_bytes: int | None = None
    memory_used_bytes: int | None = None
    memory_free_bytes: int | None = None
    utilization_ratio: float | None = None
    memory_utilization_ratio: float | None = None
    power_watts: float | None = None
    temperature_celsius: float | None = None
    sm_clock_hertz: float | None = None
    memory_clock_hertz: float | None = None
    ecc: EccCounts | None = None
    xid_errors_total: int | None = None
    last_xid: int | None = None
    pcie_tx_bytes_per_second: float | None = None
    pcie_rx_bytes_per_second: float | None = None
    nvlink_tx_bytes_total: int | None = None
    nvlink_rx_bytes_total: int | None = None
    # None: the process list could not be read (unknown), () : no processes.
    processes: tuple[GpuProcess, ...] | None = None
    # None: the GPU has no GPM, this is its first read (GPM needs two), or the read failed.
    gpm: GpmSample | None = None
    # Health fields.
    fan_speed_ratio: float | None = None
    memory_temperature_celsius: float | None = None
    energy_joules_total: float | None = None
    pcie_replay_errors_total: int | None = None
    encoder_utilization_ratio: float | None = None
    decoder_utilization_ratio: float | None = None
    memory_reserved_bytes: int | None = None
    remapped_rows: RemappedRows | None = None
    retired_pages_pending: bool | None = None
    clock_event_reasons: int | None = None
    field_errors: tuple[FieldError, ...] = ()


@dataclass(frozen=True, slots=True)
class BackendInfo:
    name: str
    driver_version: str
    device_count: int


@runtime_checkable
class GpuBackend(Protocol):
    """What the sampler needs from GPU hardware. Every method may raise GpuError, block, or hang.

    The sampler calls `read_device` for different indices concurrently, each from its own thread.
    """

    name: str

    def init(self) -> BackendInfo: ...

    def read_device(self, index: int) -> GpuSample: ...

    def shutdown(self) -> None: ...


T = TypeVar("T")


@dataclass
class FieldCollector:
    """Collects per-field failures while a backend reads one GPU.

    A field-scoped error leaves that field out and is recorded; device and backend errors propagate, since
    they make the whole read meaningless.
    """

    errors: list[FieldError] = field(default_factory=list)

    def read(self, name: str, reader: Callable[[], T]) -> T | None:
        try:
            return reader()
        except GpuError as err:
            if err.scope is not ErrorScope.FIELD:
                raise
            self.errors.append(FieldError(field=name, error=ErrorInfo.from_gpu_error(err)))
            return None


# Health fields (fan, memory temperature, energy, PCIe replays, encoder/decoder, remapping, clock events).
HEALTH_FIELD_NAMES = (
    "fan_speed",
    "memory_temperature",
    "energy",
    "pcie_replay",
    "encoder_utilization",
    "decoder_utilization",
    "memory_reserved",
    "remapped_rows",
    "retired_pages",
    "clock_events",
)
# Field names used in `rayrack_gpu_field_errors_total{field=...}` and in fake scenario faults.
FIELD_NAMES = (
    "memory",
    "utilization",
    "power",
    "temperature",
    "sm_clock",
    "memory_clock",
    "ecc",
    "xid",
    "pcie",
    "nvlink",
    "processes",
    "gpm",
    *HEALTH_FIELD_NAMES,
)
# Calls that are not per field: opening a device (handle and identity), and library-wide calls.
DEVICE_CALL = "device"
BACKEND_CALLS = ("init", "shutdown")

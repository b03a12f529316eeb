"""GPU backend on NVML through nvidia-ml-py (the `pynvml` module).

Every pynvml.NVMLError is turned into GpuError with NVML's code, so the sampler treats this backend and the
fake alike. Static identity (UUID, model, PCI bus id) is read once per device and init.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pynvml

from ray_agent.gpu.base import (
    DEVICE_CALL,
    NVML_ERROR_CODES,
    BackendInfo,
    EccCounts,
    FieldCollector,
    GpmSample,
    GpuError,
    GpuProcess,
    GpuSample,
    RemappedRows,
)

T = TypeVar("T")

_KIB = 1024
_MHZ = 1_000_000
# nvmlDeviceGetFieldValues scope meaning "all NVLink links summed".
_ALL_LINKS = 0xFFFFFFFF
# Bound on XID events drained per read, so an event storm cannot keep one read busy.
_MAX_EVENTS_PER_READ = 1000
_MIB = 1024 * 1024
_PERCENT = 100.0
# GpmSample field -> (NVML GPM metric, NVML's unit -> the sample's: percent -> ratio, MiB/s -> bytes/s).
_GPM_METRICS: tuple[tuple[str, int, Callable[[float], float]], ...] = (
    ("graphics_active_ratio", pynvml.NVML_GPM_METRIC_GRAPHICS_UTIL, lambda v: v / _PERCENT),
    ("sm_active_ratio", pynvml.NVML_GPM_METRIC_SM_UTIL, lambda v: v / _PERCENT),
    ("sm_occupancy_ratio", pynvml.NVML_GPM_METRIC_SM_OCCUPANCY, lambda v: v / _PERCENT),
    ("tensor_active_ratio", pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL, lambda v: v / _PERCENT),
    ("dram_active_ratio", pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL, lambda v: v / _PERCENT),
    ("pcie_tx_bytes_per_second", pynvml.NVML_GPM_METRIC_PCIE_TX_PER_SEC, lambda v: v * _MIB),
    ("pcie_rx_bytes_per_second", pynvml.NVML_GPM_METRIC_PCIE_RX_PER_SEC, lambda v: v * _MIB),
    ("nvlink_tx_bytes_per_second", pynvml.NVML_GPM_METRIC_NVLINK_TOTAL_TX_PER_SEC, lambda v: v * _MIB),
    ("nvlink_rx_bytes_per_second", pynvml.NVML_GPM_METRIC_NVLINK_TOTAL_RX_PER_SEC, lambda v: v * _MIB),
)


def _nvml(call: str, fn: Callable[..., T], *args: Any) -> T:
    try:
        return fn(*args)
    except pynvml.NVMLError as err:
        raise GpuError(int(err.value), call=call, detail=str(err)) from None


# The symbol is missing from this driver's libnvidia-ml (an older driver): for a health field that means
# "not supported here", not a broken library, so it is turned into NOT_SUPPORTED for that field alone.
_FUNCTION_NOT_FOUND = NVML_ERROR_CODES["FUNCTION_NOT_FOUND"]
_NOT_SUPPORTED = NVML_ERROR_CODES["NOT_SUPPORTED"]
# A GPM support query failing with these means "no GPM here" (pre-Hopper GPU, or a driver without GPM calls).
_GPM_ABSENT = frozenset({_NOT_SUPPORTED, _FUNCTION_NOT_FOUND})
# nvmlValueType_t -> the member of nvmlFieldValue_t.value holding it.
_VALUE_MEMBERS = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}


def _nvml_optional(call: str, fn: Callable[..., T], *args: Any) -> T:
    try:
        return _nvml(call, fn, *args)
    except GpuError as err:
        if err.code == _FUNCTION_NOT_FOUND:
            raise GpuError(_NOT_SUPPORTED, call=call, detail=f"not in this driver's NVML: {err.detail}") from None
        raise


def _field_values(call: str, handle: Any, ids: list[tuple[int, int]]) -> list[float | int]:
    """nvmlDeviceGetFieldValues for (field id, scope id) pairs; a value that failed fails the whole field."""
    values = _nvml(call, pynvml.nvmlDeviceGetFieldValues, handle, ids)
    result = []
    for value in values:
        if value.nvmlReturn != pynvml.NVML_SUCCESS:
            raise GpuError(int(value.nvmlReturn), call=call)
        member = _VALUE_MEMBERS.get(int(value.valueType))
        if member is None:
            raise GpuError(_NOT_SUPPORTED, call=call, detail=f"unknown value type {value.valueType}")
        result.append(getattr(value.value, member))
    return result


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


@dataclass
class _Gpm:
    """A GPU's GPM state: support, decided at its first successful query, and two sample buffers."""

    supported: bool | None = None  # None: not asked successfully yet
    samples: tuple[Any, Any] | None = None
    previous: Any | None = None  # the buffer holding the previous read's sample


@dataclass
class _Device:
    handle: Any
    uuid: str
    model: str
    pci_bus_id: str
    event_set: Any | None
    event_error: GpuError | None
    xid_count: int = 0
    last_xid: int | None = None
    gpm: _Gpm = field(default_factory=_Gpm)


class NvmlBackend:
    name = "nvml"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._devices: dict[int, _Device] = {}
        self._initialised = False

    def init(self) -> BackendInfo:
        _nvml("init", pynvml.nvmlInit)
        self._initialised = True
        driver = _text(_nvml("init", pynvml.nvmlSystemGetDriverVersion))
        count = int(_nvml("init", pynvml.nvmlDeviceGetCount))
        return BackendInfo(name=self.name, driver_version=driver, device_count=count)

    def shutdown(self) -> None:
        with self._lock:
            devices, self._devices = self._devices, {}
        for device in devices.values():
            if device.gpm.samples is not None:
                for sample in device.gpm.samples:
                    with contextlib.suppress(pynvml.NVMLError):
                        pynvml.nvmlGpmSampleFree(sample)
            if device.event_set is not None:
                # The library is going away anyway; a failure to free changes nothing.
                with contextlib.suppress(pynvml.NVMLError):
                    pynvml.nvmlEventSetFree(device.event_set)
        if self._initialised:
            self._initialised = False
            _nvml("shutdown", pynvml.nvmlShutdown)

    def _open(self, index: int) -> _Device:
        with self._lock:
            device = self._devices.get(index)
        if device is not None:
            return device
        handle = _nvml(DEVICE_CALL, pynvml.nvmlDeviceGetHandleByIndex, index)
        uuid = _text(_nvml(DEVICE_CALL, pynvml.nvmlDeviceGetUUID, handle))
        model = _text(_nvml(DEVICE_CALL, pynvml.nvmlDeviceGetName, handle))
        pci = _text(_nvml(DEVICE_CALL, pynvml.nvmlDeviceGetPciInfo, handle).busId)
        event_set = None
        event_error = None
        try:
            event_set = _nvml("xid", pynvml.nvmlEventSetCreate)
            _nvml(
                "xid",
                pynvml.nvmlDeviceRegisterEvents,
                handle,
                pynvml.nvmlEventTypeXidCriticalError,
                event_set,
            )
        except GpuError as err:
            # Some boards do not deliver XID events; the field is then reported as failing on every read.
            event_error = err
            if event_set is not None:
                with contextlib.suppress(pynvml.NVMLError):
                    pynvml.nvmlEventSetFree(event_set)
                event_set = None
        device = _Device(handle, uuid, model, pci, event_set, event_error)
        with self._lock:
            self._devices[index] = device
        return device

    def read_device(self, index: int) -> GpuSample:
        device = self._open(index)
        handle = device.handle
        fields = FieldCollector()

        memory = fields.read("memory", lambda: _nvml("memory", pynvml.nvmlDeviceGetMemoryInfo, handle))
        rates = fields.read(
            "utilization", lambda: _nvml("utilization", pynvml.nvmlDeviceGetUtilizationRates, handle)
        )
        power_mw = fields.read("power", lambda: _nvml("power", pynvml.nvmlDeviceGetPowerUsage, handle))
        temperature = fields.read(
            "temperature",
            lambda: _nvml(
                "temperature", pynvml.nvmlDeviceGetTemperature, handle, pynvml.NVML_TEMPERATURE_GPU
            ),
        )
        sm_clock = fields.read(
            "sm_clock", lambda: _nvml("sm_clock", pynvml.nvmlDeviceGetClockInfo, handle, pynvml.NVML_CLOCK_SM)
        )
        mem_clock = fields.read(
            "memory_clock",
            lambda: _nvml("memory_clock", pynvml.nvmlDeviceGetClockInfo, handle, pynvml.NVML_CLOCK_MEM),
        )
        ecc = fields.read("ecc", lambda: self._read_ecc(handle))
        xid = fields.read("xid", lambda: self._drain_xid(device))
        pcie = fields.read("pcie", lambda: self._read_pcie(handle))
        nvlink = fields.read("nvlink", lambda: self._read_nvlink(handle))
        processes = fields.read("processes", lambda: self._read_processes(handle))
        gpm = fields.read("gpm", lambda: self._read_gpm(device))
        health = _read_health(handle, fields)

        return GpuSample(
            index=index,
            uuid=device.uuid,
            model=device.model,
            pci_bus_id=device.pci_bus_id,
            memory_total_bytes=int(memory.total) if memory is not None else None,
            memory_used_bytes=int(memory.used) if memory is not None else None,
            memory_free_bytes=int(memory.free) if memory is not None else None,
            utilization_ratio=rates.gpu / 100.0 if rates is not None else None,
            memory_utilization_ratio=rates.memory / 100.0 if rates is not None else None,
            power_watts=power_mw / 1000.0 if power_mw is not None else None,
            temperature_celsius=float(temperature) if temperature is not None else None,
            sm_clock_hertz=float(sm_clock) * _MHZ if sm_clock is not None else None,
            memory_clock_hertz=float(mem_clock) * _MHZ if mem_clock is not None else None,
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

    @staticmethod
    def _read_ecc(handle: Any) -> EccCounts:
        def total(kind: int, counter: int) -> int:
            return int(_nvml("ecc", pynvml.nvmlDeviceGetTotalEccErrors, handle, kind, counter))

        corrected = pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED
        uncorrected = pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
        return EccCounts(
            corrected_volatile=total(corrected, pynvml.NVML_VOLATILE_ECC),
            uncorrected_volatile=total(uncorrected, pynvml.NVML_VOLATILE_ECC),
            corrected_aggregate=total(corrected, pynvml.NVML_AGGREGATE_ECC),
            uncorrected_aggregate=total(uncorrected, pynvml.NVML_AGGREGATE_ECC),
        )

    @staticmethod
    def _drain_xid(device: _Device) -> tuple[int, int | None]:
        if device.event_set is None:
            raise device.event_error or GpuError(3, call="xid")
        for _ in range(_MAX_EVENTS_PER_READ):
            try:
                event = pynvml.nvmlEventSetWait_v2(device.event_set, 0)
            except pynvml.NVMLError as err:
                if err.value == pynvml.NVML_ERROR_TIMEOUT:
                    break  # no more pending events
                raise GpuError(int(err.value), call="xid", detail=str(err)) from None
            if event.eventType == pynvml.nvmlEventTypeXidCriticalError:
                device.xid_count += 1
                device.last_xid = int(event.eventData)
        return device.xid_count, device.last_xid

    @staticmethod
    def _read_pcie(handle: Any) -> tuple[float, float]:
        tx = _nvml("pcie", pynvml.nvmlDeviceGetPcieThroughput, handle, pynvml.NVML_PCIE_UTIL_TX_BYTES)
        rx = _nvml("pcie", pynvml.nvmlDeviceGetPcieThroughput, handle, pynvml.NVML_PCIE_UTIL_RX_BYTES)
        return float(tx) * _KIB, float(rx) * _KIB

    @staticmethod
    def _read_nvlink(handle: Any) -> tuple[int, int]:
        ids = [
            (pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, _ALL_LINKS),
            (pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX, _ALL_LINKS),
        ]
        tx, rx = _field_values("nvlink", handle, ids)
        return int(tx) * _KIB, int(rx) * _KIB

    @staticmethod
    def _read_processes(handle: Any) -> tuple[GpuProcess, ...]:
        found = _nvml("processes", pynvml.nvmlDeviceGetComputeRunningProcesses, handle)
        return tuple(
            GpuProcess(
                pid=int(p.pid),
                used_memory_bytes=int(p.usedGpuMemory) if p.usedGpuMemory is not None else None,
            )
            for p in found
        )

    @staticmethod
    def _read_gpm(device: _Device) -> GpmSample | None:
        """Metrics between the previous read and this one; None on the first read and where there is no GPM."""
        state = device.gpm
        if state.supported is None:
            # A failure here is counted and the question asked again on the next read.
            supported = NvmlBackend._gpm_supported(device.handle)
            if supported:
                first = _nvml("gpm", pynvml.nvmlGpmSampleAlloc)
                try:
                    second = _nvml("gpm", pynvml.nvmlGpmSampleAlloc)
                except GpuError:
                    with contextlib.suppress(pynvml.NVMLError):
                        pynvml.nvmlGpmSampleFree(first)
                    raise
                state.samples = (first, second)
            state.supported = supported
        if state.samples is None:
            return None
        first, second = state.samples
        current = second if state.previous is first else first
        _nvml("gpm", pynvml.nvmlGpmSampleGet, device.handle, current)
        previous, state.previous = state.previous, current
        if previous is None:
            return None
        request = pynvml.c_nvmlGpmMetricsGet_t()
        request.version = pynvml.NVML_GPM_METRICS_GET_VERSION
        request.numMetrics = len(_GPM_METRICS)
        request.sample1 = previous
        request.sample2 = current
        for i, (_, metric, _) in enumerate(_GPM_METRICS):
            request.metrics[i].metricId = metric
        _nvml("gpm", pynvml.nvmlGpmMetricsGet, request)
        # A metric this GPU does not report (nvmlReturn set per metric) is left out of the sample.
        return GpmSample(
            **{
                name: convert(request.metrics[i].value)
                for i, (name, _, convert) in enumerate(_GPM_METRICS)
                if request.metrics[i].nvmlReturn == pynvml.NVML_SUCCESS
            }
        )

    @staticmethod
    def _gpm_supported(handle: Any) -> bool:
        try:
            return bool(_nvml("gpm", pynvml.nvmlGpmQueryDeviceSupport, handle).isSupportedDevice)
        except GpuError as err:
            if err.code in _GPM_ABSENT:
                return False
            raise


# --- health fields ---------------------------------------------------------------------------------


def _clock_event_reasons(handle: Any) -> int:
    # nvmlDeviceGetCurrentClocksEventReasons replaced ...ThrottleReasons (same bits) in driver 535.
    current = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
    if current is not None:
        try:
            return int(_nvml("clock_events", current, handle))
        except GpuError as err:
            if err.code != _FUNCTION_NOT_FOUND:
                raise
    return int(_nvml_optional("clock_events", pynvml.nvmlDeviceGetCurrentClocksThrottleReasons, handle))


def _remapped_rows(handle: Any) -> RemappedRows:
    correctable, uncorrectable, pending, failed = _nvml_optional(
        "remapped_rows", pynvml.nvmlDeviceGetRemappedRows, handle
    )
    return RemappedRows(int(correctable), int(uncorrectable), bool(pending), bool(failed))


def _read_health(handle: Any, fields: FieldCollector) -> dict[str, Any]:
    """The health fields of a sample, keyed by GpuSample attribute; each call fails on its own."""

    def read(name: str, fn: Callable[..., Any], *args: Any) -> Any:
        return fields.read(name, lambda: _nvml_optional(name, fn, handle, *args))

    fan = read("fan_speed", pynvml.nvmlDeviceGetFanSpeed)
    memory_temperature = fields.read(
        "memory_temperature",
        lambda: _field_values("memory_temperature", handle, [(pynvml.NVML_FI_DEV_MEMORY_TEMP, 0)])[0],
    )
    energy_mj = read("energy", pynvml.nvmlDeviceGetTotalEnergyConsumption)
    replays = read("pcie_replay", pynvml.nvmlDeviceGetPcieReplayCounter)
    encoder = read("encoder_utilization", pynvml.nvmlDeviceGetEncoderUtilization)
    decoder = read("decoder_utilization", pynvml.nvmlDeviceGetDecoderUtilization)
    memory = read("memory_reserved", pynvml.nvmlDeviceGetMemoryInfo, pynvml.nvmlMemory_v2)
    pending_pages = read("retired_pages", pynvml.nvmlDeviceGetRetiredPagesPendingStatus)
    return {
        "fan_speed_ratio": fan / 100.0 if fan is not None else None,
        "memory_temperature_celsius": float(memory_temperature) if memory_temperature is not None else None,
        "energy_joules_total": energy_mj / 1000.0 if energy_mj is not None else None,
        "pcie_replay_errors_total": int(replays) if replays is not None else None,
        # [utilisation %, sampling period in microseconds]
        "encoder_utilization_ratio": encoder[0] / 100.0 if encoder is not None else None,
        "decoder_utilization_ratio": decoder[0] / 100.0 if decoder is not None else None,
        "memory_reserved_bytes": int(memory.reserved) if memory is not None else None,
        "remapped_rows": fields.read("remapped_rows", lambda: _remapped_rows(handle)),
        "retired_pages_pending": bool(pending_pages) if pending_pages is not None else None,
        "clock_event_reasons": fields.read("clock_events", lambda: _clock_event_reasons(handle)),
    }

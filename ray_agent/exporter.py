"""Snapshot -> Prometheus metric families, in rayrack's own names and optionally dcgm-exporter's.

`collect()` builds fresh families from the latest snapshot on every scrape; nothing here is a long-lived
gauge, and nothing here calls the GPU backend. A field missing from a sample is simply not exported.

Host metrics are node_exporter's (job ``node``, on every Ray node, labelled with the same ``node``): memory
and swap (``node_memory_*``), CPU time (``node_cpu_seconds_total``), load, filesystems and network. The agent
exports none of them. It keeps only what node_exporter cannot see, because it needs NVML, Ray or the guard:

- each GPU's readings, health and errors (``rayrack_gpu_*``, and dcgm-exporter's names when asked);
- the processes on each GPU with their Linux user, Ray job, actor and task, and each user's GPUs and limit
  (``rayrack_gpu_process*``, ``rayrack_job_info``, ``rayrack_user_*``): node_exporter has no per-process
  series, and none tied to a Ray job;
- the GPU states and the idle guard's (``rayrack_gpu_state``, ``rayrack_gpu_idle_*``, ``rayrack_guard_*``);
- the agent's own health (``rayrack_up``, ``rayrack_collector_*``, ``rayrack_gpu_backend_*``).

``rayrack_gpu_state{gpu, uuid, state}`` is each GPU's state, one-hot over busy, idle_held, free, unknown and
lost, as :mod:`ray_agent.gpu_state` defines them from the guard's settings; it is exported whether or not the
guard is enabled, with ``rayrack_gpu_idle_run_seconds`` (the idle clock) and
``rayrack_gpu_idle_seconds_total{user, ray_job_id}`` (idle_held GPU-seconds by owner). Anything that asks
whether a GPU is idle reads these series, never utilisation against a threshold of its own.

dcgm-exporter's default counters (its ``default-counters.csv``) that NVML cannot supply with dcgm's meaning,
and are therefore not exported under dcgm's names (``DCGM_NOT_FROM_NVML``):

- ``DCGM_FI_DEV_VGPU_LICENSE_STATUS``: the vGPU guest licence state comes from the vGPU host manager
  (nvmlVgpuInstanceGetLicenseStatus per vGPU instance), not from a bare-metal GPU; there is no value for a
  physical GPU to report.
- ``DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL``: DCGM sums its own per-link bandwidth counters, headers and
  payload of both directions. The agent reads NVML's data-throughput counters
  (``NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_*``), payload only and per direction, so the sum would be a
  different quantity under the same name; it is exported as ``rayrack_gpu_nvlink_transferred_bytes_total``
  (``direction`` tx/rx) instead.
- ``DCGM_FI_DRIVER_VERSION`` is a label, not a series; it is on every DCGM series here.
"""


from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    UnknownMetricFamily,
)
from prometheus_client.registry import Collector

from ray_agent import __version__
from ray_agent.clock import Clock, SystemClock
from ray_agent.config import ExporterConfig
from ray_agent.gpu.base import CLOCK_EVENT_REASONS, GpmSample, GpuSample
from ray_agent.gpu_state import GpuState
from ray_agent.guard import GuardSnapshot, StateSnapshot
from ray_agent.sampler import GpuStatus, Snapshot
from ray_agent.users import User

PREFIX = "rayrack_"
_MIB = 1024 * 1024
_GPU_LABELS = ["gpu", "uuid"]
# dcgm-exporter's label set, so that its dashboards and queries work unchanged.
# Released dcgm-exporter labels the node `Hostname`, its main branch `hostname`: both are set.
DCGM_LABELS = ["gpu", "UUID", "pci_bus_id", "device", "modelName", "Hostname", "hostname", "DCGM_FI_DRIVER_VERSION"]
# dcgm-exporter's default counters that have no NVML source with dcgm's meaning (see the module docstring).
DCGM_NOT_FROM_NVML = ("DCGM_FI_DEV_VGPU_LICENSE_STATUS", "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL")
# `user` is who answers for the process: the Ray job's owner ("unknown" for a job not submitted through the
# gateway), or the Linux user of a process outside Ray; `os_user` is always the Linux user.
PROCESS_LABELS = ["gpu", "uuid", "pid", "user", "os_user", "ray_job_id", "ray_actor", "ray_task"]
GPU_STATES = tuple(state.value for state in GpuState)


def _gauge(name: str, documentation: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, documentation, labels=labels)


def _counter(name: str, documentation: str, labels: list[str] | None = None) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, documentation, labels=labels)


# (family name, help, how to get the value from a sample) for the plain per-GPU gauges.
_GPU_GAUGES: tuple[tuple[str, str, Callable[[GpuSample], float | None]], ...] = (
    (
        "gpu_utilization_ratio",
        "Fraction of time a kernel was running on the GPU (0..1).",
        lambda s: s.utilization_ratio,
    ),
    (
        "gpu_memory_utilization_ratio",
        "Fraction of time device memory was being read or written (0..1).",
        lambda s: s.memory_utilization_ratio,
    ),
    ("gpu_memory_used_bytes", "Device memory in use.", lambda s: s.memory_used_bytes),
    ("gpu_memory_total_bytes", "Device memory installed.", lambda s: s.memory_total_bytes),
    ("gpu_power_watts", "Power draw.", lambda s: s.power_watts),
    ("gpu_temperature_celsius", "GPU core temperature.", lambda s: s.temperature_celsius),
    ("gpu_sm_clock_hertz", "Current SM clock.", lambda s: s.sm_clock_hertz),
    ("gpu_memory_clock_hertz", "Current memory clock.", lambda s: s.memory_clock_hertz),
    (
        "gpu_xid_last_code",
        "Code of the most recent XID error seen since the agent started.",
        lambda s: s.last_xid,
    ),
)


def _flag(value: bool | None) -> float | None:
    return None if value is None else (1.0 if value else 0.0)


def _percent(ratio: float | None) -> float | None:
    return None if ratio is None else round(ratio * 100, 4)


# Health fields: (family name, help, value) for the per-GPU gauges.
_HEALTH_GAUGES: tuple[tuple[str, str, Callable[[GpuSample], float | None]], ...] = (
    ("gpu_fan_speed_ratio", "Fan speed as a fraction of its maximum (0..1).", lambda s: s.fan_speed_ratio),
    (
        "gpu_memory_temperature_celsius",
        "Device memory (HBM) temperature.",
        lambda s: s.memory_temperature_celsius,
    ),
    (
        "gpu_encoder_utilization_ratio",
        "Fraction of time the video encoder was busy (0..1).",
        lambda s: s.encoder_utilization_ratio,
    ),
    (
        "gpu_decoder_utilization_ratio",
        "Fraction of time the video decoder was busy (0..1).",
        lambda s: s.decoder_utilization_ratio,
    ),
    ("gpu_memory_reserved_bytes", "Device memory reserved by the driver.", lambda s: s.memory_reserved_bytes),
    (
        "gpu_row_remap_pending",
        "1 when a memory row remap waits for the next GPU reset, else 0.",
        lambda s: None if s.remapped_rows is None else _flag(s.remapped_rows.pending),
    ),
    (
        "gpu_row_remap_failed",
        "1 when a memory row could not be remapped (the GPU needs service), else 0.",
        lambda s: None if s.remapped_rows is None else _flag(s.remapped_rows.failed),
    ),
    (
        "gpu_retired_pages_pending",
        "1 when retired memory pages wait for the next driver reload, else 0.",
        lambda s: _flag(s.retired_pages_pending),
    ),
)
# Health counters: (family name without _total, help, value).
_HEALTH_COUNTERS: tuple[tuple[str, str, Callable[[GpuSample], float | None]], ...] = (
    ("gpu_energy_joules", "Energy consumed since the driver loaded.", lambda s: s.energy_joules_total),
    (
        "gpu_pcie_replay_errors",
        "PCIe replays (link-level retries) since the driver loaded.",
        lambda s: s.pcie_replay_errors_total,
    ),
)

# (DCGM field, help, value) for dcgm-exporter's gauges, in its units.
_DCGM_GAUGES: tuple[tuple[str, str, Callable[[GpuSample], float | None]], ...] = (
    (
        "DCGM_FI_DEV_GPU_UTIL",
        "GPU utilization (in %).",
        lambda s: None if s.utilization_ratio is None else round(s.utilization_ratio * 100, 4),
    ),
    (
        "DCGM_FI_DEV_MEM_COPY_UTIL",
        "Memory utilization (in %).",
        lambda s: None if s.memory_utilization_ratio is None else round(s.memory_utilization_ratio * 100, 4),
    ),
    (
        "DCGM_FI_DEV_FB_USED",
        "Framebuffer memory used (in MiB).",
        lambda s: None if s.memory_used_bytes is None else s.memory_used_bytes // _MIB,
    ),
    (
        "DCGM_FI_DEV_FB_FREE",
        "Framebuffer memory free (in MiB).",
        lambda s: None if s.memory_free_bytes is None else s.memory_free_bytes // _MIB,
    ),
    ("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", lambda s: s.power_watts),
    ("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", lambda s: s.temperature_celsius),
    (
        "DCGM_FI_DEV_SM_CLOCK",
        "SM clock frequency (in MHz).",
        lambda s: None if s.sm_clock_hertz is None else s.sm_clock_hertz / 1e6,
    ),
    (
        "DCGM_FI_DEV_MEM_CLOCK",
        "Memory clock frequency (in MHz).",
        lambda s: None if s.memory_clock_hertz is None else s.memory_clock_hertz / 1e6,
    ),
    (
        "DCGM_FI_DEV_XID_ERRORS",
        "Value of the last XID error encountered.",
        lambda s: None if s.xid_errors_total is None else (s.last_xid or 0),
    ),
    # Health fields.
    ("DCGM_FI_DEV_FAN_SPEED", "Fan speed (in %).", lambda s: _percent(s.fan_speed_ratio)),
    ("DCGM_FI_DEV_MEMORY_TEMP", "Memory temperature (in C).", lambda s: s.memory_temperature_celsius),
    ("DCGM_FI_DEV_ENC_UTIL", "Encoder utilization (in %).", lambda s: _percent(s.encoder_utilization_ratio)),
    ("DCGM_FI_DEV_DEC_UTIL", "Decoder utilization (in %).", lambda s: _percent(s.decoder_utilization_ratio)),
    (
        "DCGM_FI_DEV_FB_RESERVED",
        "Framebuffer memory reserved (in MiB).",
        lambda s: None if s.memory_reserved_bytes is None else s.memory_reserved_bytes // _MIB,
    ),
    (
        "DCGM_FI_DEV_ROW_REMAP_FAILURE",
        "Whether remapping of rows has failed",
        lambda s: None if s.remapped_rows is None else _flag(s.remapped_rows.failed),
    ),
    (
        "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS",
        "Current clock throttle reasons (NVML's bitmask).",
        lambda s: s.clock_event_reasons,
    ),
)

def _ecc_count(attribute: str) -> Callable[[GpuSample], float | None]:
    return lambda s: getattr(s.ecc, attribute) if s.ecc is not None else None


# dcgm-exporter types these as counters without a _total suffix, which the Prometheus text format cannot
# express; untyped keeps the exact names (rate() works on them all the same).
_DCGM_ECC: tuple[tuple[str, str, Callable[[GpuSample], float | None]], ...] = (
    (
        "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL",
        "Total number of single-bit volatile ECC errors.",
        _ecc_count("corrected_volatile"),
    ),
    (
        "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
        "Total number of double-bit volatile ECC errors.",
        _ecc_count("uncorrected_volatile"),
    ),
    (
        "DCGM_FI_DEV_ECC_SBE_AGG_TOTAL",
        "Total number of single-bit persistent ECC errors.",
        _ecc_count("corrected_aggregate"),
    ),
    (
        "DCGM_FI_DEV_ECC_DBE_AGG_TOTAL",
        "Total number of double-bit persistent ECC errors.",
        _ecc_count("uncorrected_aggregate"),
    ),
)

# GPM (Hopper and later), means over the interval between two reads. Native and dcgm-exporter's names carry
# the same values: dcgm's profiling fields are ratios and bytes per second too.
# (native family, help, dcgm field, dcgm help, GpmSample attribute)
_GPM_RATIOS: tuple[tuple[str, str, str, str, str], ...] = (
    (
        "gpu_graphics_active_ratio",
        "Fraction of time a graphics or compute engine was active (GPM, 0..1).",
        "DCGM_FI_PROF_GR_ENGINE_ACTIVE",
        "Ratio of time the graphics engine is active.",
        "graphics_active_ratio",
    ),
    (
        "gpu_sm_active_ratio",
        "Fraction of SM cycles with at least one warp assigned, over all SMs (GPM, 0..1).",
        "DCGM_FI_PROF_SM_ACTIVE",
        "The ratio of cycles an SM has at least 1 warp assigned.",
        "sm_active_ratio",
    ),
    (
        "gpu_sm_occupancy_ratio",
        "Resident warps as a fraction of the SMs' maximum (GPM, 0..1).",
        "DCGM_FI_PROF_SM_OCCUPANCY",
        "The ratio of number of warps resident on an SM.",
        "sm_occupancy_ratio",
    ),
    (
        "gpu_tensor_active_ratio",
        "Fraction of cycles a tensor pipe was active (GPM, 0..1).",
        "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE",
        "Ratio of cycles the tensor (HMMA) pipe is active.",
        "tensor_active_ratio",
    ),
    (
        "gpu_dram_active_ratio",
        "Device memory bandwidth used as a fraction of its peak (GPM, 0..1).",
        "DCGM_FI_PROF_DRAM_ACTIVE",
        "Ratio of cycles the device memory interface is active sending or receiving data.",
        "dram_active_ratio",
    ),
)
# (native family with a direction label, help, ((direction, dcgm field, dcgm help, GpmSample attribute), ...))
_GPM_RATES: tuple[tuple[str, str, tuple[tuple[str, str, str, str], ...]], ...] = (
    (
        "gpu_gpm_pcie_bytes_per_second",
        "PCIe traffic, mean over the interval between reads (GPM).",
        (
            (
                "tx",
                "DCGM_FI_PROF_PCIE_TX_BYTES",
                "The rate of data transmitted over the PCIe bus - including both protocol headers and data "
                "payloads - in bytes per second.",
                "pcie_tx_bytes_per_second",
            ),
            (
                "rx",
                "DCGM_FI_PROF_PCIE_RX_BYTES",
                "The rate of data received over the PCIe bus - including both protocol headers and data "
                "payloads - in bytes per second.",
                "pcie_rx_bytes_per_second",
            ),
        ),
    ),
    (
        "gpu_gpm_nvlink_bytes_per_second",
        "NVLink traffic over all links, mean over the interval between reads (GPM).",
        (
            (
                "tx",
                "DCGM_FI_PROF_NVLINK_TX_BYTES",
                "The rate of data transmitted over NVLink, not including protocol headers, in bytes per second.",
                "nvlink_tx_bytes_per_second",
            ),
            (
                "rx",
                "DCGM_FI_PROF_NVLINK_RX_BYTES",
                "The rate of data received over NVLink, not including protocol headers, in bytes per second.",
                "nvlink_rx_bytes_per_second",
            ),
        ),
    ),
)


def _with_gpm(snapshot: Snapshot) -> list[tuple[GpuStatus, GpuSample, GpmSample]]:
    """The GPUs that reported GPM this time; the others have no GPM series."""
    return [(s, s.sample, s.sample.gpm) for s in snapshot.gpus if s.sample is not None and s.sample.gpm is not None]


# dcgm-exporter's counters among the health fields, untyped for the same reason: (field, help, value).
_DCGM_HEALTH_COUNTERS: tuple[tuple[str, str, Callable[[GpuSample], float | None]], ...] = (
    (
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        "Total energy consumption since boot (in mJ).",
        lambda s: None if s.energy_joules_total is None else round(s.energy_joules_total * 1000),
    ),
    (
        "DCGM_FI_DEV_PCIE_REPLAY_COUNTER",
        "Total number of PCIe retries.",
        lambda s: s.pcie_replay_errors_total,
    ),
    (
        "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
        "Number of remapped rows for correctable errors",
        lambda s: None if s.remapped_rows is None else s.remapped_rows.correctable,
    ),
    (
        "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS",
        "Number of remapped rows for uncorrectable errors",
        lambda s: None if s.remapped_rows is None else s.remapped_rows.uncorrectable,
    ),
)


def _health_families(readable: list[tuple[GpuStatus, GpuSample]]) -> Iterator[Metric]:
    """The native health families: gauges, counters, remapped rows by kind, and clock events by reason."""

    def labels(status: GpuStatus, sample: GpuSample) -> list[str]:
        return [str(status.index), sample.uuid]

    for make, table in ((_gauge, _HEALTH_GAUGES), (_counter, _HEALTH_COUNTERS)):
        for name, documentation, value_of in table:
            family = make(name, documentation, _GPU_LABELS)
            for status, sample in readable:
                value = value_of(sample)
                if value is not None:
                    family.add_metric(labels(status, sample), value)
            yield family
    rows = _counter(
        "gpu_remapped_rows", "Memory rows remapped, by the kind of error that caused it.", [*_GPU_LABELS, "kind"]
    )
    events = _gauge(
        "gpu_clock_event_active",
        "1 for each clocks-event reason (NVML's throttle reasons) holding the clocks down now, else 0.",
        [*_GPU_LABELS, "reason"],
    )
    for status, sample in readable:
        if sample.remapped_rows is not None:
            rows.add_metric([*labels(status, sample), "correctable"], sample.remapped_rows.correctable)
            rows.add_metric([*labels(status, sample), "uncorrectable"], sample.remapped_rows.uncorrectable)
        if sample.clock_event_reasons is not None:
            for reason, bit in CLOCK_EVENT_REASONS.items():
                active = 1.0 if sample.clock_event_reasons & bit else 0.0
                events.add_metric([*labels(status, sample), reason], active)
    yield rows
    yield events


class SnapshotCollector(Collector):
    def __init__(
        self,
        source: Callable[[], Snapshot | None],
        config: ExporterConfig,
        stale_after: float,
        clock: Clock | None = None,
        users: tuple[User, ...] = (),
    ) -> None:
        self._source = source
        self._config = config
        self._users = users
        self._stale_after = stale_after
        self._clock = clock or SystemClock()
        self._hostname = config.hostname or socket.gethostname()

    def describe(self) -> list[Metric]:
        # Families depend on what the hardware reports; an empty description keeps the registry from
        # calling collect() at registration time.
        return []

    def collect(self) -> Iterator[Metric]:
        snapshot = self._source()
        fresh = (
            snapshot is not None and self._clock.monotonic() - snapshot.taken_monotonic <= self._stale_after
        )
        up = _gauge("up", "1 when the agent has a current collection (not older than 3 intervals), else 0.")
        up.add_metric([], 1.0 if fresh else 0.0)
        yield up
        info = _gauge("agent_info", "Agent version; always 1.", ["version"])
        info.add_metric([__version__], 1.0)
        yield info
        limits = _gauge(
            "user_max_gpus",
            "The user's GPU limit (rayrack_users max_gpus); users without a limit have no series.",
            ["user"],
        )
        for user in self._users:
            if user.max_gpus is not None:
                limits.add_metric([user.name], user.max_gpus)
        if limits.samples:
            yield limits
        if snapshot is None:
            return
        groups = [
            self._agent_families(snapshot),
            self._backend_families(snapshot),
            self._gpu_families(snapshot),
            self._gpm_families(snapshot),
            self._process_families(snapshot),
        ]
        if self._config.dcgm_compat:
            groups.append(self._dcgm_families(snapshot))
            groups.append(self._dcgm_gpm_families(snapshot))
        for group in groups:
            # A family with no series (no GPUs, field unsupported everywhere) is left out entirely.
            yield from (family for family in group if family.samples)

    @staticmethod
    def _agent_families(snapshot: Snapshot) -> Iterator[Metric]:
        last = _gauge("last_collection_timestamp_seconds", "When the latest collection finished.")
        last.add_metric([], snapshot.taken_at)
        yield last
        success = _gauge(
            "collector_success", "1 when the collector's latest run succeeded, else 0.", ["collector"]
        )
        duration = _gauge(
            "collector_duration_seconds", "How long the collector's latest run took.", ["collector"]
        )
        for name, status in sorted(snapshot.collectors.items()):
            success.add_metric([name], 1.0 if status.success else 0.0)
            duration.add_metric([name], status.duration_seconds)
        yield success
        yield duration

    @staticmethod
    def _backend_families(snapshot: Snapshot) -> Iterator[Metric]:
        backend = snapshot.backend
        up = _gauge(
            "gpu_backend_up", "1 when the GPU library is initialised and answering, else 0.", ["backend"]
        )
        up.add_metric([backend.name], 1.0 if backend.up else 0.0)
        yield up
        if backend.up:
            info = _gauge("gpu_backend_info", "GPU library in use; always 1.", ["backend", "driver_version"])
            info.add_metric([backend.name, backend.driver_version], 1.0)
            yield info
        elif backend.error is not None:
            error = _gauge(
                "gpu_backend_error_info",
                "Why the GPU library is unavailable (NVML code and name); present only while it is down.",
                ["backend", "code", "error"],
            )
            code = "" if backend.error.code is None else str(backend.error.code)
            error.add_metric([backend.name, code, backend.error.name], 1.0)
            yield error
        failures = _counter(
            "gpu_backend_init_failures", "Failed attempts to initialise the GPU library.", ["backend"]
        )
        failures.add_metric([backend.name], backend.init_failures_total)
        yield failures

    def _gpu_families(self, snapshot: Snapshot) -> Iterator[Metric]:
        gpus = snapshot.gpus
        up = _gauge(
            "gpu_up",
            "1 when the GPU was read this collection, else 0 (its other series are absent).",
            _GPU_LABELS,
        )
        for status in gpus:
            up.add_metric([str(status.index), status.uuid], 1.0 if status.up else 0.0)
        yield up

        read_errors = _counter(
            "gpu_read_errors", "Collections in which the GPU could not be read, by error.", ["gpu", "error"]
        )
        for (index, error), count in sorted(snapshot.gpu_read_errors_total.items()):
            read_errors.add_metric([str(index), error], count)
        yield read_errors
        field_errors = _counter(
            "gpu_field_errors",
            "Reads in which one field of a GPU failed and was left out, by field and error.",
            ["gpu", "field", "error"],
        )
        for (index, field, error), count in sorted(snapshot.field_errors_total.items()):
            field_errors.add_metric([str(index), field, error], count)
        yield field_errors

        readable = [(status, status.sample) for status in gpus if status.sample is not None]
        info = _gauge(
            "gpu_info", "GPU identity; always 1.", ["gpu", "uuid", "model", "driver_version", "pci_bus_id"]
        )
        for status, sample in readable:
            info.add_metric(
                [
                    str(status.index),
                    sample.uuid,
                    sample.model,
                    snapshot.backend.driver_version,
                    sample.pci_bus_id,
                ],
                1.0,
            )
        yield info

        for name, documentation, value_of in _GPU_GAUGES:
            family = _gauge(name, documentation, _GPU_LABELS)
            for status, sample in readable:
                value = value_of(sample)
                if value is not None:
                    family.add_metric([str(status.index), sample.uuid], value)
            yield family

        ecc = _counter(
            "gpu_ecc_errors",
            "ECC memory errors; volatile since the driver loaded, aggregate lifetime.",
            [*_GPU_LABELS, "type", "scope"],
        )
        xid = _counter("gpu_xid_errors", "XID errors seen since the agent started.", _GPU_LABELS)
        pcie = _gauge(
            "gpu_pcie_throughput_bytes_per_second",
            "PCIe throughput over NVML's sample window.",
            [*_GPU_LABELS, "direction"],
        )
        nvlink = _counter(
            "gpu_nvlink_transferred_bytes",
            "Data sent or received over all NVLink links.",
            [*_GPU_LABELS, "direction"],
        )
        processes = _gauge("gpu_processes", "Compute processes on the GPU.", _GPU_LABELS)
        for status, sample in readable:
            labels = [str(status.index), sample.uuid]
            if sample.ecc is not None:
                for kind, scope, count in (
                    ("corrected", "volatile", sample.ecc.corrected_volatile),
                    ("uncorrected", "volatile", sample.ecc.uncorrected_volatile),
                    ("corrected", "aggregate", sample.ecc.corrected_aggregate),
                    ("uncorrected", "aggregate", sample.ecc.uncorrected_aggregate),
                ):
                    if count is not None:
                        ecc.add_metric([*labels, kind, scope], count)
            if sample.xid_errors_total is not None:
                xid.add_metric(labels, sample.xid_errors_total)
            if sample.pcie_tx_bytes_per_second is not None:
                pcie.add_metric([*labels, "tx"], sample.pcie_tx_bytes_per_second)
            if sample.pcie_rx_bytes_per_second is not None:
                pcie.add_metric([*labels, "rx"], sample.pcie_rx_bytes_per_second)
            if sample.nvlink_tx_bytes_total is not None:
                nvlink.add_metric([*labels, "tx"], sample.nvlink_tx_bytes_total)
            if sample.nvlink_rx_bytes_total is not None:
                nvlink.add_metric([*labels, "rx"], sample.nvlink_rx_bytes_total)
            if sample.processes is not None:
                processes.add_metric(labels, len(sample.processes))
        yield ecc
        yield xid
        yield pcie
        yield nvlink
        yield processes
        yield from _health_families(readable)

    @staticmethod
    def _process_families(snapshot: Snapshot) -> Iterator[Metric]:
        memory = _gauge("gpu_process_memory_used_bytes", "Device memory used by one process.", PROCESS_LABELS)
        for entry in snapshot.processes:
            if entry.used_memory_bytes is None:
                continue
            memory.add_metric(
                [
                    str(entry.gpu),
                    entry.uuid,
                    str(entry.pid),
                    entry.user,
                    entry.os_user,
                    entry.ray_job_id,
                    entry.ray_actor,
                    entry.ray_task,
                ],
                entry.used_memory_bytes,
            )
        yield memory

        # Who holds each GPU, whatever the process reports about memory: the base of the accounting rules.
        owners: dict[tuple[int, str], set[tuple[str, str]]] = {}
        jobs: set[tuple[str, str, str]] = set()
        for entry in snapshot.processes:
            owners.setdefault((entry.gpu, entry.uuid), set()).add((entry.user, entry.ray_job_id))
            if entry.ray_job_id or entry.submission_id:
                jobs.add((entry.ray_job_id, entry.submission_id, entry.user))
        share = _gauge(
            "gpu_owner_share",
            "Share of the GPU held by the user and Ray job: 1, or 1/n when n owners hold it, so shares add up to "
            "GPUs.",
            ["gpu", "uuid", "user", "ray_job_id"],
        )
        per_user: dict[str, int] = {}
        for (gpu, uuid), holders in sorted(owners.items()):
            for user, job in sorted(holders):
                share.add_metric([str(gpu), uuid, user, job], 1.0 / len(holders))
            for user in {user for user, _ in holders}:
                per_user[user] = per_user.get(user, 0) + 1
        yield share
        in_use = _gauge("user_gpus", "GPUs on this node that the user's processes hold.", ["user"])
        for user, count in sorted(per_user.items()):
            in_use.add_metric([user], count)
        yield in_use
        job_info = _gauge(
            "job_info", "A Ray job holding a GPU on this node, with its submission id and owner; always 1.",
            ["ray_job_id", "submission_id", "user"],
        )
        for job_id, submission_id, user in sorted(jobs):
            job_info.add_metric([job_id, submission_id, user], 1.0)
        yield job_info

    @staticmethod
    def _gpm_families(snapshot: Snapshot) -> Iterator[Metric]:
        gpus = _with_gpm(snapshot)
        for name, documentation, _, _, attribute in _GPM_RATIOS:
            family = _gauge(name, documentation, _GPU_LABELS)
            for status, sample, gpm in gpus:
                value = getattr(gpm, attribute)
                if value is not None:
                    family.add_metric([str(status.index), sample.uuid], value)
            yield family
        for name, documentation, directions in _GPM_RATES:
            family = _gauge(name, documentation, [*_GPU_LABELS, "direction"])
            for status, sample, gpm in gpus:
                for direction, _, _, attribute in directions:
                    value = getattr(gpm, attribute)
                    if value is not None:
                        family.add_metric([str(status.index), sample.uuid, direction], value)
            yield family

    def _dcgm_gpm_families(self, snapshot: Snapshot) -> Iterator[Metric]:
        gpus = _with_gpm(snapshot)
        fields = [(field, documentation, attribute) for _, _, field, documentation, attribute in _GPM_RATIOS]
        fields += [
            (field, documentation, attribute)
            for *_, rates in _GPM_RATES
            for _, field, documentation, attribute in rates
        ]
        for field, documentation, attribute in fields:
            family = GaugeMetricFamily(field, documentation, labels=DCGM_LABELS)
            for status, sample, gpm in gpus:
                value = getattr(gpm, attribute)
                if value is not None:
                    family.add_metric(self._dcgm_labels(status, sample, snapshot), value)
            yield family

    def _dcgm_labels(self, status: GpuStatus, sample: GpuSample, snapshot: Snapshot) -> list[str]:
        return [
            str(status.index),
            sample.uuid,
            sample.pci_bus_id,
            f"nvidia{status.index}",
            sample.model,
            self._hostname,
            self._hostname,
            snapshot.backend.driver_version,
        ]

    def _dcgm_families(self, snapshot: Snapshot) -> Iterator[Metric]:
        readable = [(s, s.sample) for s in snapshot.gpus if s.sample is not None]

        def labels(status: GpuStatus, sample: GpuSample) -> list[str]:
            return self._dcgm_labels(status, sample, snapshot)

        untyped = _DCGM_ECC + _DCGM_HEALTH_COUNTERS
        for kind, fields in ((GaugeMetricFamily, _DCGM_GAUGES), (UnknownMetricFamily, untyped)):
            for field, documentation, value_of in fields:
                family = kind(field, documentation, labels=DCGM_LABELS)
                for status, sample in readable:
                    value = value_of(sample)
                    if value is not None:
                        family.add_metric(labels(status, sample), value)
                yield family


_Latest = TypeVar("_Latest")


class _LatestCollector(Collector, Generic[_Latest]):
    """Families built from the latest immutable snapshot that `source` returns."""

    def __init__(self, source: Callable[[], _Latest]) -> None:
        self._source = source

    def describe(self) -> list[Metric]:
        return []


class StateCollector(_LatestCollector[StateSnapshot]):
    """Each GPU's state (ray_agent.gpu_state) and idle_held time, whether or not the guard is enabled."""

    def collect(self) -> Iterator[Metric]:
        latest = self._source()
        state = _gauge(
            "gpu_state",
            "1 for the GPU's current state, 0 for the others: busy, idle_held (held, activity below the idle "
            "threshold for the whole window), free, unknown (not read, or its processes or activity unreadable), "
            "lost (NVML says the GPU is lost).",
            [*_GPU_LABELS, "state"],
        )
        idle_run = _gauge(
            "gpu_idle_run_seconds",
            "How long the GPU has been held with activity below the idle threshold (0 when it is not).",
            _GPU_LABELS,
        )
        for track in latest.gpus:
            labels = [str(track.index), track.uuid]
            for name in GPU_STATES:
                state.add_metric([*labels, name], 1.0 if track.state == name else 0.0)
            idle_run.add_metric(labels, track.idle_seconds)
        idle = _counter(
            "gpu_idle_seconds",
            "GPU-seconds spent idle_held, by the holding user and Ray job; a GPU held by several owners is "
            "shared equally among them.",
            ["user", "ray_job_id"],
        )
        for (user, job), seconds in sorted(latest.idle_seconds_total.items()):
            idle.add_metric([user, job], seconds)
        # No GPU yet (or none at all): no families, as for the snapshot's.
        yield from (family for family in (state, idle_run, idle) if family.samples)


class GuardCollector(_LatestCollector[GuardSnapshot]):
    """The idle guard's own families, from its latest GuardSnapshot. Registered only when the guard is enabled."""

    def collect(self) -> Iterator[Metric]:
        guard = self._source()
        dry_run = _gauge("guard_dry_run", "1 when the idle guard only reports what it would do, else 0.")
        dry_run.add_metric([], 1.0 if guard.dry_run else 0.0)
        yield dry_run

        actions = _counter(
            "guard_actions",
            "Idle guard audit records, one per process per stage, by action and outcome.",
            ["stage", "action", "outcome"],
        )
        for (stage, action, outcome), count in sorted(guard.actions_total.items()):
            actions.add_metric([stage, action, outcome], count)
        yield actions
        for name, documentation, value in (
            (
                "guard_webhook_failed_attempts",
                "Webhook deliveries that failed (each retry counts).",
                guard.webhook_failed_attempts_total,
            ),
            (
                "guard_audit_write_failures",
                "Audit records that could not be written.",
                guard.audit_write_failures_total,
            ),
            (
                "guard_state_write_failures",
                "Failed writes of the guard's state file.",
                guard.state_write_failures_total,
            ),
        ):
            family = _counter(name, documentation)
            family.add_metric([], value)
            yield family

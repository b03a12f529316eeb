"""Exposition text: golden files over real HTTP, and the rules for missing, failed and stale data.

Regenerate the golden files with RAYRACK_UPDATE_GOLDEN=1 after an intended change, and review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import required
import yaml
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from agent.support import SCENARIOS, fake_sampler, http_get, metric_lines, sample_value
from ray_agent.cli import build_agent
from ray_agent.clock import FakeClock
from ray_agent.config import ExporterConfig, load_config
from ray_agent.exporter import DCGM_NOT_FROM_NVML, GPU_STATES, SnapshotCollector
from ray_agent.server import MetricsServer

GOLDEN = Path(__file__).resolve().parent / "golden"
UPDATE = os.environ.get("RAYRACK_UPDATE_GOLDEN") == "1"


def served_metrics(dcgm_compat: bool) -> str:
    overrides = {"exporter.dcgm_compat": True} if dcgm_compat else {}
    config = load_config(SCENARIOS / "golden.config.yml", overrides)
    clock = FakeClock(wall=1_700_000_000.0, monotonic=500.0)
    agent = build_agent(config, clock=clock, host="127.0.0.1")
    # Two collections (GPM needs two reads), the second in the second utilisation segment, first XID seen,
    # both processes running.
    clock.advance(11)
    agent.sampler.collect_once()
    clock.advance(1)
    agent.sampler.collect_once()
    server = MetricsServer(agent.registry, "127.0.0.1", 0)
    server.start()
    try:
        status, body = http_get(f"http://127.0.0.1:{server.bound_port}/metrics")
    finally:
        server.stop()
        agent.sampler.stop()
    assert status == 200
    return body


@pytest.mark.parametrize(("name", "dcgm_compat"), [("native.prom", False), ("dcgm_compat.prom", True)])
def test_golden_exposition(name: str, dcgm_compat: bool) -> None:
    body = served_metrics(dcgm_compat)
    golden = GOLDEN / name
    if UPDATE:
        golden.write_text(body)
    assert golden.exists(), f"{golden} missing; run with RAYRACK_UPDATE_GOLDEN=1 to create it"
    assert body == golden.read_text()


def test_host_metrics_are_left_to_node_exporter() -> None:
    """Every family is one of the kinds the exporter's docstring lists, none of which node_exporter has:
    memory, swap and CPU time are node_exporter's alone."""
    families = {
        line.split()[2]
        for golden in GOLDEN.glob("*.prom")
        for line in golden.read_text().splitlines()
        if line.startswith("# TYPE ")
    }
    own = ("rayrack_gpu_", "rayrack_user_", "rayrack_job_info", "rayrack_guard_", "rayrack_up", "rayrack_agent_info",
           "rayrack_collector_", "rayrack_last_collection_", "DCGM_")
    assert len(families) > 40
    assert not [family for family in families if not family.startswith(own)]


def test_golden_content_follows_the_rules() -> None:
    """Spot checks on the golden output, so that a regenerated file cannot silently drop the rules."""
    body = (GOLDEN / "native.prom").read_text()
    # Base units.
    assert sample_value(body, "rayrack_gpu_utilization_ratio", gpu="0") == 0.75
    assert sample_value(body, "rayrack_gpu_memory_used_bytes", gpu="0") == 21 * 2**30
    assert sample_value(body, "rayrack_gpu_sm_clock_hertz", gpu="0") == 1.41e9
    # Unsupported field: absent (never -1) and counted.
    assert sample_value(body, "rayrack_gpu_power_watts", gpu="1") is None
    assert (
        sample_value(body, "rayrack_gpu_field_errors_total", gpu="1", field="power", error="NOT_SUPPORTED")
        == 2  # once per collection
    )
    assert " -1" not in body
    # Lost GPU: up 0, nothing else about it but the error counter and its state.
    assert sample_value(body, "rayrack_gpu_up", gpu="2") == 0
    assert sample_value(body, "rayrack_gpu_read_errors_total", gpu="2", error="GPU_IS_LOST") == 2
    assert not [
        line
        for line in body.splitlines()
        if 'gpu="2"' in line and "_up{" not in line and "errors" not in line and "_state{" not in line
        and "_idle_run_seconds{" not in line
    ]
    # One state per GPU, and only one: held and computing, nobody's, lost.
    states = {
        gpu: [state for state in GPU_STATES if sample_value(body, "rayrack_gpu_state", gpu=gpu, state=state) == 1]
        for gpu in ("0", "1", "2", "3")
    }
    assert states == {"0": ["busy"], "1": ["free"], "2": ["lost"], "3": ["free"]}
    assert len(metric_lines(body, "rayrack_gpu_state")) == 4 * len(GPU_STATES)
    # No hostname label on native names.
    assert "hostname" not in body.lower()
    # Processes outside Ray: the user who answers for them is their Linux user.
    assert metric_lines(body, "rayrack_gpu_process_memory_used_bytes") == [
        'rayrack_gpu_process_memory_used_bytes{gpu="0",os_user="alice",pid="1001",ray_actor="",ray_job_id="",'
        'ray_task="",user="alice",uuid="GPU-11111111-2222-3333-4444-555555555555"} 2.147483648e+10',
        'rayrack_gpu_process_memory_used_bytes{gpu="0",os_user="bob",pid="1002",ray_actor="",ray_job_id="",'
        'ray_task="",user="bob",uuid="GPU-11111111-2222-3333-4444-555555555555"} 1.073741824e+09',
    ]
    # Two owners share GPU 0: half each, and one GPU in use for each of them.
    assert sample_value(body, "rayrack_gpu_owner_share", gpu="0", user="alice", ray_job_id="") == 0.5
    assert sample_value(body, "rayrack_user_gpus", user="bob") == 1
    # Limits from the configuration's users: alice has one, bob none.
    assert sample_value(body, "rayrack_user_max_gpus", user="alice") == 2
    assert sample_value(body, "rayrack_user_max_gpus", user="bob") is None
    dcgm = (GOLDEN / "dcgm_compat.prom").read_text()
    line = metric_lines(dcgm, "DCGM_FI_DEV_GPU_UTIL")[0]
    for label in (
        'gpu="0"',
        'UUID="GPU-1111',
        'pci_bus_id="00000000:07:00.0"',
        'device="nvidia0"',
        'modelName="NVIDIA A100-SXM4-80GB"',
        'Hostname="node-a"',
        'hostname="node-a"',
        'DCGM_FI_DRIVER_VERSION="550.54.15"',
    ):
        assert label in line
    assert line.endswith(" 75.0")
    assert sample_value(dcgm, "DCGM_FI_DEV_FB_USED", gpu="0") == 21 * 1024
    # dcgm's meaning: a gauge holding the last XID code (0 when there was none), not a count.
    assert "# TYPE DCGM_FI_DEV_XID_ERRORS gauge" in dcgm
    assert sample_value(dcgm, "DCGM_FI_DEV_XID_ERRORS", gpu="0") == 79
    assert sample_value(dcgm, "DCGM_FI_DEV_XID_ERRORS", gpu="1") == 0
    # GPM: the mean between the two collections, only where the GPU has GPM; nothing counted elsewhere.
    assert sample_value(body, "rayrack_gpu_sm_active_ratio", gpu="3") == pytest.approx(0.02)
    assert sample_value(body, "rayrack_gpu_tensor_active_ratio", gpu="3") == pytest.approx(0.26)
    assert sample_value(body, "rayrack_gpu_gpm_nvlink_bytes_per_second", gpu="3", direction="rx") == 2.5e9
    assert sample_value(body, "rayrack_gpu_utilization_ratio", gpu="3") == 1.0
    assert [line for line in metric_lines(body, "rayrack_gpu_sm_active_ratio") if 'gpu="3"' not in line] == []
    assert 'field="gpm"' not in body
    assert sample_value(dcgm, "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", gpu="3") == pytest.approx(0.26)
    assert sample_value(dcgm, "DCGM_FI_PROF_GR_ENGINE_ACTIVE", gpu="3") == 1.0
    assert sample_value(dcgm, "DCGM_FI_PROF_PCIE_TX_BYTES", gpu="3") == 3 * 2**20
    assert sample_value(dcgm, "DCGM_FI_PROF_SM_ACTIVE", gpu="0") is None


def test_golden_health_fields() -> None:
    """Health fields in base units natively, in dcgm's units with compat; unsupported ones absent."""
    body = (GOLDEN / "native.prom").read_text()
    assert sample_value(body, "rayrack_gpu_fan_speed_ratio", gpu="0") == 0.42
    assert sample_value(body, "rayrack_gpu_fan_speed_ratio", gpu="1") is None
    assert sample_value(body, "rayrack_gpu_memory_temperature_celsius", gpu="0") == 61
    # 12 s of scenario time at 250.5 W; replays at 0.5/s.
    assert sample_value(body, "rayrack_gpu_energy_joules_total", gpu="0") == 250.5 * 12
    assert sample_value(body, "rayrack_gpu_pcie_replay_errors_total", gpu="0") == 6
    assert sample_value(body, "rayrack_gpu_memory_reserved_bytes", gpu="0") == 527 * 2**20
    assert sample_value(body, "rayrack_gpu_remapped_rows_total", gpu="0", kind="uncorrectable") == 1
    assert sample_value(body, "rayrack_gpu_row_remap_pending", gpu="0") == 1
    assert sample_value(body, "rayrack_gpu_row_remap_pending", gpu="1") is None
    assert sample_value(body, "rayrack_gpu_clock_event_active", gpu="0", reason="sw_power_cap") == 1
    assert sample_value(body, "rayrack_gpu_clock_event_active", gpu="0", reason="hw_slowdown") == 0
    dcgm = (GOLDEN / "dcgm_compat.prom").read_text()
    assert sample_value(dcgm, "DCGM_FI_DEV_FAN_SPEED", gpu="0") == 42
    assert sample_value(dcgm, "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", gpu="0") == 250.5 * 12 * 1000
    assert sample_value(dcgm, "DCGM_FI_DEV_FB_RESERVED", gpu="0") == 527
    assert sample_value(dcgm, "DCGM_FI_DEV_ENC_UTIL", gpu="0") == 10
    assert sample_value(dcgm, "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS", gpu="0") == 0x4 | 0x20
    assert sample_value(dcgm, "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", gpu="0") == 1


def render(sampler, clock, stale_after: float = 10.0, **config: object) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(
        SnapshotCollector(sampler.latest, ExporterConfig(hostname="h", **config), stale_after, clock)
    )
    return generate_latest(registry).decode()


GPU = {"model": "A", "memory_total": "8GiB"}


def test_no_snapshot_yet_means_not_up() -> None:
    sampler, _, clock = fake_sampler(yaml.safe_dump({"gpus": [GPU]}))
    body = render(sampler, clock)
    assert sample_value(body, "rayrack_up") == 0
    assert "rayrack_gpu_up" not in body


def test_stale_snapshot_means_not_up() -> None:
    sampler, _, clock = fake_sampler(yaml.safe_dump({"gpus": [GPU]}))
    sampler.collect_once()
    assert sample_value(render(sampler, clock, stale_after=10), "rayrack_up") == 1
    clock.advance(11)
    assert sample_value(render(sampler, clock, stale_after=10), "rayrack_up") == 0


def test_degraded_exposition_names_the_error() -> None:
    sampler, _, clock = fake_sampler(
        yaml.safe_dump({"gpus": [GPU], "faults": [{"call": "init", "error": "DRIVER_NOT_LOADED"}]})
    )
    sampler.collect_once()
    body = render(sampler, clock, dcgm_compat=True)
    assert sample_value(body, "rayrack_gpu_backend_up", backend="fake") == 0
    assert sample_value(body, "rayrack_gpu_backend_error_info", code="9", error="DRIVER_NOT_LOADED") == 1
    assert sample_value(body, "rayrack_gpu_backend_init_failures_total") == 1
    assert sample_value(body, "rayrack_collector_success", collector="gpu") == 0
    assert sample_value(body, "rayrack_last_collection_timestamp_seconds") is not None
    assert "DCGM_FI" not in body and "rayrack_gpu_up" not in body


def test_recovered_gpu_series_return() -> None:
    sampler, _, clock = fake_sampler(
        yaml.safe_dump(
            {"gpus": [GPU], "faults": [{"call": "device", "error": 15, "gpu": 0, "from": 1, "until": 2}]}
        )
    )
    clock.advance(1)
    sampler.collect_once()
    down = render(sampler, clock)
    assert sample_value(down, "rayrack_gpu_up", gpu="0") == 0
    assert sample_value(down, "rayrack_gpu_temperature_celsius", gpu="0") is None
    clock.advance(1)
    sampler.collect_once()
    up = render(sampler, clock)
    assert sample_value(up, "rayrack_gpu_up", gpu="0") == 1
    assert sample_value(up, "rayrack_gpu_temperature_celsius", gpu="0") == 40
    assert sample_value(up, "rayrack_gpu_read_errors_total", gpu="0", error="GPU_IS_LOST") == 1


def test_dcgm_profiling_fields_have_dcgm_exporters_types_and_help() -> None:
    """Each DCGM_FI_PROF_* family is typed and described as in dcgm-exporter's own counter list (its lines
    commented out there are fields it knows but does not collect by default; an active line wins)."""
    csv = required.ecosystem("counters/dcgm-exporter-dcp-metrics-included.csv")
    active: dict[str, tuple[str, str]] = {}
    known: dict[str, tuple[str, str]] = {}
    for line in csv.read_text(encoding="utf-8").splitlines():
        entry = line.removeprefix("# ")
        if entry.startswith("DCGM_FI_PROF_"):
            name, kind, documentation = (part.strip() for part in entry.split(",", 2))
            (known if line.startswith("#") else active)[name] = (kind, documentation)
    theirs = {**known, **active}
    body = (GOLDEN / "dcgm_compat.prom").read_text()
    ours = {
        line.split()[2]: line.split(None, 3)[3]
        for line in body.splitlines()
        if line.startswith("# HELP DCGM_FI_PROF_")
    }
    assert set(ours) >= {"DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "DCGM_FI_PROF_GR_ENGINE_ACTIVE"}
    compared = 0
    for name, documentation in ours.items():
        if name not in theirs:
            continue  # NVLink rates: in DCGM's field list, not in that file
        assert f"# TYPE {name} {theirs[name][0]}" in body, name
        assert documentation == theirs[name][1], name
        compared += 1
    assert compared >= 7


def dcgm_default_counters() -> list[tuple[str, str]]:
    """(field, type) of every active line of dcgm-exporter's default-counters.csv."""
    fields = []
    counters = required.ecosystem("counters/dcgm-exporter-default-counters.csv")
    for line in counters.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, kind, _ = (part.strip() for part in line.split(",", 2))  # the file has "DCGM_FI_DEV_DEC_UTIL ,"
        fields.append((name, kind))
    return fields


def test_every_dcgm_default_counter_is_exported() -> None:
    """With dcgm_compat, GPU 0 of the golden scenario (every field set) has each default dcgm-exporter field,
    except those NVML cannot supply with dcgm's meaning (listed, with reasons, in the exporter); the profiling
    fields (GPM, Hopper and later) are on its H100, GPU 3."""
    fields = dcgm_default_counters()
    assert len(fields) > 20 and ("DCGM_FI_DEV_DEC_UTIL", "gauge") in fields
    body = served_metrics(dcgm_compat=True)
    missing = []
    for name, kind in fields:
        if name in DCGM_NOT_FROM_NVML:
            continue
        if kind == "label":
            present = f'{name}="' in metric_lines(body, "DCGM_FI_DEV_GPU_UTIL")[0]
        else:
            gpu = "3" if name.startswith("DCGM_FI_PROF_") else "0"
            present = sample_value(body, name, gpu=gpu) is not None
        if not present:
            missing.append(name)
    assert not missing, f"not exported: {missing}"
    assert set(DCGM_NOT_FROM_NVML) <= {name for name, _ in fields}
    assert not [name for name in DCGM_NOT_FROM_NVML if metric_lines(body, name)]

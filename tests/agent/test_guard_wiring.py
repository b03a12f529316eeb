"""The guard in the agent: its config section, its metrics on /metrics, `check`, and the fake backend's
processes taken from real CUDA_VISIBLE_DEVICES environments."""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest

from agent.support import PROC_FIXTURE, SCENARIOS, metric_lines, sample_value
from ray_agent.attribution import Attribution
from ray_agent.cli import build_agent, render_guard
from ray_agent.clock import FakeClock
from ray_agent.config import (
    GUARD_SIGNALS,
    AttributionConfig,
    CollectionConfig,
    ConfigError,
    GuardConfig,
    GuardStages,
    build_config,
)
from ray_agent.gpu.fake import FakeBackend, ScenarioError, bundled_scenarios, load_scenario, parse_scenario
from ray_agent.sampler import Sampler

# --- config -------------------------------------------------------------------------------------------------


def test_guard_defaults_are_off_and_dry_run() -> None:
    guard = build_config({}).guard
    assert guard == GuardConfig()
    assert (guard.enabled, guard.dry_run, guard.idle_threshold, guard.window) == (False, True, 0.05, 1800.0)
    assert guard.signal == "auto"
    assert guard.stages == GuardStages(notify_after=0.0, stop_after=None, kill_after=None, kill_grace=None)


def test_guard_section_parses(tmp_path: Path) -> None:
    document = {
        "guard": {
            "enabled": True,
            "dry_run": False,
            "idle_threshold": 0.1,
            "signal": "sm_active",
            "window": "45m",
            "min_samples": 10,
            "max_gap": "1m",
            "stages": {"notify_after": "0s", "stop_after": "15m", "kill_after": "30m", "kill_grace": "30s"},
            "webhook_url_file": "hook.url",
            "allow_users": ["svc-*"],
            "allow_job_patterns": ["nightly-*"],
            "allow_processes": ["jupyter*"],
            "audit_log": "audit.jsonl",
        }
    }
    guard = build_config(document, "agent.yml", tmp_path).guard
    assert guard.window == 2700.0 and guard.max_gap == 60.0 and guard.min_samples == 10
    assert guard.stages == GuardStages(0.0, 900.0, 1800.0, 30.0)
    assert guard.webhook_url_file == tmp_path / "hook.url" and guard.audit_log == tmp_path / "audit.jsonl"
    assert guard.allow_users == ("svc-*",)
    assert guard.signal == "sm_active"


def test_the_role_offers_exactly_the_agents_signals() -> None:
    specs = Path(__file__).resolve().parents[2] / "roles" / "ray_agent" / "meta" / "argument_specs.yml"
    option = yaml.safe_load(specs.read_text())["argument_specs"]["main"]["options"]["ray_agent_guard_signal"]
    assert option["choices"] == list(GUARD_SIGNALS) and option["default"] == GuardConfig().signal


def test_a_short_window_lowers_the_default_max_gap() -> None:
    assert build_config({"guard": {"window": "30s"}}).guard.max_gap == 30.0


@pytest.mark.parametrize(
    ("guard", "message"),
    [
        ({"idle": 1}, r"guard\.idle: unknown key; allowed keys: enabled, dry_run, idle_threshold, signal, window"),
        ({"stages": {"warn_after": "1m"}}, r"guard\.stages\.warn_after: unknown key; allowed keys: notify_after"),
        ({"idle_threshold": 5}, r"guard\.idle_threshold: expected a ratio above 0 and at most 1, got 5"),
        ({"min_samples": 0}, r"guard\.min_samples: must be at least 1"),
        (
            {"signal": "sm_util"},
            r"guard\.signal: 'sm_util' is not allowed; allowed values: auto, utilization, sm_active",
        ),
        ({"dry_run": "no"}, r"guard\.dry_run: expected true or false"),
        ({"stages": {"kill_after": "1h"}}, r"guard\.stages\.kill_grace: is required when kill_after is set"),
        (
            {"stages": {"stop_after": "5m", "kill_after": "1m", "kill_grace": "5s"}},
            r"guard\.stages\.kill_after: \(60s\) must not be earlier than stop_after \(300s\)",
        ),
        ({"webhook_url_file": "/x", "webhook_url_env": "X"}, r"guard\.webhook_url_env: use either"),
        ({"allow_users": "alice"}, r"guard\.allow_users: expected a list of non-empty strings"),
        ({"window": "10m", "max_gap": "20m"}, r"guard\.max_gap: \(1200s\) must not exceed guard\.window"),
    ],
)
def test_guard_errors_name_the_key(guard: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config({"guard": guard}, "agent.yml")


# --- metrics and check ------------------------------------------------------------------------------------


def test_guard_metrics_appear_only_when_enabled(tmp_path: Path) -> None:
    """The guard's own families need it enabled; the GPU states are the same either way."""
    config_file = tmp_path / "agent.yml"
    document = yaml.safe_load((SCENARIOS / "golden.config.yml").read_text())
    document["gpu"]["fake_scenario"] = str(SCENARIOS / "guard-idle-after-busy.yml")
    document["host"]["proc_path"] = str(PROC_FIXTURE)
    config_file.write_text(yaml.safe_dump(document))

    from ray_agent.config import load_config

    disabled = build_agent(load_config(config_file), clock=FakeClock(), host="127.0.0.1")
    disabled.sampler.collect_once()
    assert "guard" not in generate_latest(disabled.registry).decode()
    assert disabled.guard is None
    disabled.sampler.stop()

    overrides = {
        "guard.enabled": True,
        "guard.window": "5m",
        "guard.audit_log": str(tmp_path / "audit.jsonl"),
        "guard.state_file": str(tmp_path / "state.json"),
    }
    config = load_config(config_file, overrides)
    clock = FakeClock()
    agent = build_agent(config, clock=clock, host="127.0.0.1")
    assert agent.guard is not None
    agent.guard.start()
    try:
        for _ in range(121):  # 0..1200 s: idle from 600 s, idle_held from 900 s
            agent.sampler.collect_once()  # the guard is subscribed: no direct call here
            clock.advance(10)
        assert agent.guard.drain(10)
        body = generate_latest(agent.registry).decode()
    finally:
        agent.guard.stop()
        agent.sampler.stop()
    assert sample_value(body, "rayrack_guard_dry_run") == 1
    assert sample_value(body, "rayrack_gpu_state", gpu="0", state="idle_held") == 1
    assert sample_value(body, "rayrack_gpu_state", gpu="0", state="busy") == 0
    assert sample_value(body, "rayrack_gpu_idle_run_seconds", gpu="0") == 600
    assert sample_value(body, "rayrack_gpu_idle_seconds_total", user="bob", ray_job_id="") == 300
    assert sample_value(body, "rayrack_guard_actions_total", stage="notify", action="log", outcome="done") == 1
    assert sample_value(body, "rayrack_guard_webhook_failed_attempts_total") == 0

    # The guard off, the same settings otherwise: the same states, idle clock and idle-held seconds.
    unguarded = load_config(config_file, {"guard.window": "5m"})
    clock = FakeClock()
    plain = build_agent(unguarded, clock=clock, host="127.0.0.1")
    assert plain.guard is None
    try:
        for _ in range(121):
            plain.sampler.collect_once()
            clock.advance(10)
        plain_body = generate_latest(plain.registry).decode()
    finally:
        plain.sampler.stop()
    assert "guard" not in plain_body
    for name in ("rayrack_gpu_state", "rayrack_gpu_idle_run_seconds", "rayrack_gpu_idle_seconds_total"):
        assert metric_lines(plain_body, name) == metric_lines(body, name) != []


def test_check_summarises_the_guard(tmp_path: Path) -> None:
    import io

    out = io.StringIO()
    render_guard(build_config({}), out)
    assert out.getvalue() == "Idle guard   disabled\n"
    out = io.StringIO()
    config = build_config(
        {
            "guard": {
                "enabled": True,
                "window": "30m",
                "webhook_url_env": "HOOK",
                "stages": {"stop_after": "10m", "kill_after": "20m", "kill_grace": "30s"},
            }
        },
        "a.yml",
        tmp_path,
    )
    render_guard(config, out)
    assert out.getvalue() == (
        "Idle guard   dry-run: held GPUs below 5% (auto) for 1800s -> notify after 0s, stop after 600s, "
        "kill after 1200s (grace 30s); webhook from $HOOK; audit /var/lib/ray-agent/guard-audit.jsonl\n"
    )


# --- processes from CUDA_VISIBLE_DEVICES -----------------------------------------------------------------


@pytest.fixture
def assigned() -> Iterator[list[subprocess.Popen]]:
    """Real processes started with CUDA_VISIBLE_DEVICES, like the children of Ray num_gpus tasks."""
    started: list[subprocess.Popen] = []

    def start(devices: str, with_child: bool = False) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
        env["CUDA_VISIBLE_DEVICES"] = devices
        if not with_child:
            argv = [sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(60)"]
        else:
            # A process assigned the GPU that starts a child, which inherits the value: only the parent holds it.
            argv = [
                sys.executable,
                "-c",
                "import subprocess, sys, time\n"
                "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                "print(c.pid, flush=True)\ntime.sleep(60)\n",
            ]
        process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True)
        assert process.stdout is not None
        process.first_line = process.stdout.readline().strip()  # type: ignore[attr-defined]
        started.append(process)
        return process

    yield start  # type: ignore[misc]
    for process in started:
        process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()
        # A killed parent's child lives on with its CUDA_VISIBLE_DEVICES and would hold a GPU in later tests.
        if process.first_line.isdigit():  # type: ignore[attr-defined]
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(process.first_line), signal.SIGKILL)  # type: ignore[attr-defined]


def test_fake_gpus_are_held_by_the_real_processes_they_were_assigned_to(assigned) -> None:  # type: ignore[no-untyped-def]
    on_one = assigned("1")
    on_both = assigned("0,1")
    parent = assigned("0", with_child=True)
    grandchild = int(parent.first_line)
    text = yaml.safe_dump(
        {
            "gpus": [
                {"model": "L4", "memory_total": "24GiB", "processes": "from_cuda_visible_devices"},
                {
                    "model": "L4",
                    "memory_total": "24GiB",
                    "processes": "from_cuda_visible_devices",
                    "process_memory": "18GiB",
                },
                {"model": "L4", "memory_total": "24GiB", "processes": [{"pid": 4, "memory": 1}]},
            ]
        }
    )
    clock = FakeClock()
    attribution = Attribution(AttributionConfig(enabled=False), node_ip=None)
    sampler = Sampler(
        FakeBackend(parse_scenario(text), clock),
        attribution,
        CollectionConfig(10.0, 1.0),
        clock,
    )
    snapshot = sampler.collect_once()
    sampler.stop()
    held = {(p.gpu, p.pid): (p.user, p.used_memory_bytes) for p in snapshot.processes}
    me = pwd.getpwuid(os.getuid()).pw_name
    # Other processes on this machine may hold CUDA_VISIBLE_DEVICES too: look only at ours.
    ours = {key: value for key, value in held.items() if key[1] in (on_one.pid, on_both.pid, parent.pid, grandchild)}
    assert ours == {
        (0, on_both.pid): (me, 2**30),
        (0, parent.pid): (me, 2**30),
        (1, on_one.pid): (me, 18 * 2**30),
        (1, on_both.pid): (me, 18 * 2**30),
    }
    # Two processes of 18 GiB on a 24 GiB GPU: used memory is capped at the total.
    assert snapshot.gpus[1].sample.memory_used_bytes == 24 * 2**30


def test_scenario_rejects_a_misspelled_process_source() -> None:
    with pytest.raises(ScenarioError, match=r"gpus\[0\]\.processes: expected a list of processes or 'from_cuda"):
        parse_scenario(yaml.safe_dump({"gpus": [{"model": "L4", "memory_total": "1GiB", "processes": "from_cuda"}]}))
    with pytest.raises(ScenarioError, match=r"gpus\[0\]\.process_memory: is only used with processes"):
        parse_scenario(yaml.safe_dump({"gpus": [{"model": "L4", "memory_total": "1GiB", "process_memory": 1}]}))


def test_the_live_lab_scenario_ships() -> None:
    scenario = load_scenario(bundled_scenarios()["lab-2gpu-ray"])
    assert len(scenario.gpus) == 2
    assert all(g.processes_from_cuda_visible_devices for g in scenario.gpus)
    # Busy at first, idle later, on both GPUs.
    for gpu in scenario.gpus:
        assert gpu.utilization.value_at(0) > 0.5 and gpu.utilization.value_at(590) < 0.05

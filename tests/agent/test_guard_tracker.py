"""Idle guard tracker: scenario traces through the real sampler on a fake clock, and properties of any trace."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.guard_support import drive, guard_config, scenario_sampler
from ray_agent.clock import FakeClock
from ray_agent.config import CollectionConfig, GuardStages
from ray_agent.gpu.base import ErrorInfo, GpuProcess, GpuSample
from ray_agent.gpu.fake import FakeBackend, parse_scenario
from ray_agent.guard.tracker import GpuState, Tracker
from ray_agent.sampler import BackendStatus, GpuStatus, ProcessEntry, Sampler, Snapshot

WINDOW = 300.0


@pytest.fixture
def tracker(tmp_path: Path) -> Tracker:
    return Tracker(guard_config(tmp_path))


def test_steady_busy_never_fires(tracker: Tracker) -> None:
    clock = FakeClock()
    trace = drive(scenario_sampler("guard-steady-busy.yml", clock), clock, tracker, 3 * 3600)
    assert trace.escalations == []
    assert trace.states(0) == {"busy"}
    assert trace.states(1) == {"free"}
    assert max(track.idle_seconds for _, o in trace.observations for track in o.tracks) == 0


@pytest.mark.parametrize(
    ("signal", "states", "notified"),
    [
        # NVML's utilisation: every GPU is 100 % busy.
        ("utilization", ("busy", "busy", "busy"), None),
        # SM activity: the tiny-kernel GPU is idle from its second read (the first has no GPM interval yet);
        # the GPU without GPM cannot be judged.
        ("sm_active", ("idle_held", "unknown", "busy"), 310.0),
        # auto: SM activity where there is GPM; the first read falls back to utilisation (busy).
        ("auto", ("idle_held", "busy", "busy"), 310.0),
    ],
)
def test_the_signal_decides_whether_tiny_kernels_are_idle(
    tmp_path: Path, signal: str, states: tuple[str, ...], notified: float | None
) -> None:
    clock = FakeClock()
    tracker = Tracker(guard_config(tmp_path, signal=signal))
    trace = drive(scenario_sampler("guard-busy-kernels.yml", clock), clock, tracker, 900)
    last = trace.observations[-1][1]
    assert tuple(track.state.value for track in last.tracks) == states
    assert trace.fired(1) == [] and trace.fired(2) == []
    if notified is None:
        assert trace.fired(0) == []
    else:
        assert trace.fired(0)[0] == (notified, "notify")


def test_idle_after_busy_fires_each_stage_once_on_time(tracker: Tracker) -> None:
    clock = FakeClock()
    trace = drive(scenario_sampler("guard-idle-after-busy.yml", clock), clock, tracker, 3600)
    # Idle from 600 s; first idle sample at 600 s, so idle_held at 900 s; stages 0, 120 and 240 s later.
    assert trace.fired(0) == [(900.0, "notify"), (1020.0, "stop"), (1140.0, "kill")]
    notify = trace.escalations[0][1]
    assert notify.idle_seconds == WINDOW
    assert [(h.pid, h.user) for h in notify.holders] == [(3011, "bob")]
    states = {t: o.tracks[0].state for t, o in trace.observations}
    assert states[590.0] is GpuState.BUSY and states[890.0] is GpuState.BUSY
    assert states[900.0] is GpuState.IDLE_HELD and states[3600.0] is GpuState.IDLE_HELD


def test_idle_seconds_are_billed_to_the_holder_only_while_idle_held(tracker: Tracker) -> None:
    clock = FakeClock()
    trace = drive(scenario_sampler("guard-idle-after-busy.yml", clock), clock, tracker, 1800)
    billed: dict[tuple[str, str], float] = {}
    for _, observation in trace.observations:
        for owner, seconds in observation.idle_seconds.items():
            billed[owner] = billed.get(owner, 0.0) + seconds
    # idle_held from 900 s to 1800 s.
    assert billed == {("bob", ""): pytest.approx(900.0)}


def test_pauses_shorter_than_the_window_never_fire(tracker: Tracker) -> None:
    clock = FakeClock()
    trace = drive(scenario_sampler("guard-short-gaps.yml", clock), clock, tracker, 4 * 3600)
    assert trace.escalations == []
    assert trace.states(0) == {"busy"}
    longest = max(o.tracks[0].idle_seconds for _, o in trace.observations)
    assert 270.0 <= longest < WINDOW  # the 4m50s pause came close


def test_flapping_never_fires(tracker: Tracker) -> None:
    clock = FakeClock()
    trace = drive(scenario_sampler("guard-flapping.yml", clock), clock, tracker, 2 * 3600)
    assert trace.escalations == []
    assert 0 < max(o.tracks[0].idle_seconds for _, o in trace.observations) <= 40.0


def test_nvml_errors_mid_window_count_as_active(tracker: Tracker) -> None:
    clock = FakeClock()
    trace = drive(scenario_sampler("guard-nvml-errors.yml", clock), clock, tracker, 2 * 3600)
    for gpu, unreadable in ((0, "lost"), (1, "unknown"), (2, "unknown")):
        assert trace.fired(gpu) == [], gpu
        assert unreadable in trace.states(gpu)
    # NVML's GPU_IS_LOST is the GPU gone, not a failed read.
    assert "unknown" not in trace.states(0)
    # The same GPU without errors does fire: the window is reachable in this trace.
    assert trace.fired(3) == [(300.0, "notify"), (420.0, "stop"), (540.0, "kill")]


def test_one_idle_gpu_of_a_multi_gpu_job_is_flagged_with_the_busy_one_noted(tracker: Tracker) -> None:
    clock = FakeClock()
    trace = drive(scenario_sampler("guard-multi-gpu-job.yml", clock), clock, tracker, 1200)
    assert trace.fired(0) == []
    assert trace.fired(1) == [(420.0, "notify"), (540.0, "stop"), (660.0, "kill")]
    # Without attribution the job is unknown, but the busy GPU's pid is listed as active.
    stop = next(e for _, e in trace.escalations if e.gpu == 1 and e.stage == "stop")
    assert stop.active_pids == {3061: (0,)}


def test_min_samples_holds_back_a_sparse_run(tmp_path: Path) -> None:
    tracker = Tracker(guard_config(tmp_path, min_samples=40))
    clock = FakeClock()
    trace = drive(scenario_sampler("guard-idle-after-busy.yml", clock), clock, tracker, 1800)
    # 31 samples cover the window at 900 s; the 40th idle sample is at 990 s.
    assert trace.fired(0)[0] == (990.0, "notify")


def test_a_stage_set_to_null_is_off(tmp_path: Path) -> None:
    config = guard_config(tmp_path, stages=GuardStages(notify_after=60.0, stop_after=None, kill_after=None))
    clock = FakeClock()
    trace = drive(scenario_sampler("guard-idle-after-busy.yml", clock), clock, Tracker(config), 3600)
    assert trace.fired(0) == [(960.0, "notify")]


def test_a_collection_gap_longer_than_max_gap_restarts_the_idle_clock(tracker: Tracker) -> None:
    clock = FakeClock()
    sampler = scenario_sampler("guard-idle-after-busy.yml", clock)
    drive(sampler, clock, tracker, 800)  # idle since 600 s, last sample at 800 s
    clock.advance(70)  # the sampler stalled: 80 s between samples, max_gap is 60 s
    trace = drive(sampler, clock, tracker, 400)
    # The run restarts at 880 s (scenario time), so idle_held at 1180 s, not at 900 s.
    assert [stage for _, stage in trace.fired(0)][:1] == ["notify"]
    assert trace.fired(0)[0][0] == pytest.approx(1180.0 - 880.0)


def test_mig_gpu_without_utilisation_abstains(tmp_path: Path) -> None:
    tracker = Tracker(guard_config(tmp_path, window=60.0, max_gap=60.0))
    text = yaml.safe_dump(
        {
            "gpus": [
                {
                    "model": "NVIDIA A100-SXM4-80GB MIG",
                    "memory_total": "80GiB",
                    "unsupported": ["utilization"],
                    "processes": [{"pid": 3071, "user": "ivan", "memory": "5GiB"}],
                },
                {"model": "NVIDIA A100-SXM4-80GB MIG", "memory_total": "80GiB", "unsupported": ["utilization"]},
            ]
        }
    )
    clock = FakeClock()
    sampler = Sampler(
        FakeBackend(parse_scenario(text), clock), None, CollectionConfig(10.0, 1.0), clock
    )
    trace = drive(sampler, clock, tracker, 3600)
    assert trace.escalations == []
    assert trace.states(0) == {"unknown"}
    assert trace.states(1) == {"free"}  # no processes: free is still known


# --- properties -------------------------------------------------------------------------------------------

# Readings a generated trace is made of; each becomes one GPU sample.
IDLE, BUSY, FREE = "idle", "busy", "free"
UNKNOWN_KINDS = ("gpu_down", "no_utilization", "no_process_list")
OTHER_KINDS = (BUSY, FREE, *UNKNOWN_KINDS)


def _snapshot(sequence: int, at: float, kind: str, pids: tuple[int, ...] = (4001,)) -> Snapshot:
    uuid = "GPU-prop-0"
    processes = ()
    if kind == "gpu_down":
        status = GpuStatus(0, uuid, up=False, error=ErrorInfo("GPU_IS_LOST", 15))
    else:
        held = () if kind == FREE else tuple(GpuProcess(pid, 2**30) for pid in pids)
        sample = GpuSample(
            index=0,
            uuid=uuid,
            model="T",
            pci_bus_id="0",
            utilization_ratio=None if kind == "no_utilization" else (0.0 if kind == IDLE else 0.9),
            processes=None if kind == "no_process_list" else held,
        )
        status = GpuStatus(0, uuid, up=True, sample=sample)
        if sample.processes:
            processes = tuple(ProcessEntry(0, uuid, p.pid, p.used_memory_bytes, "prop") for p in sample.processes)
    return Snapshot(
        sequence=sequence,
        taken_at=1_700_000_000.0 + at,
        taken_monotonic=1000.0 + at,
        backend=BackendStatus("fake", True),
        gpus=(status,),
        processes=processes,
        collectors={},
        gpu_read_errors_total={},
        field_errors_total={},
    )


def _run(tracker: Tracker, kinds: list[str], interval: float) -> list[tuple[str, list]]:
    out = []
    for i, kind in enumerate(kinds):
        observation = tracker.observe(_snapshot(i + 1, i * interval, kind))
        out.append((kind, list(observation.escalations)))
    return out


@st.composite
def short_idle_traces(draw: st.DrawFn) -> tuple[float, list[str]]:
    """Traces whose idle runs (first to last idle sample) are all shorter than the window."""
    interval = draw(st.sampled_from([1.0, 5.0, 10.0, 15.0, 30.0]))
    longest = int((WINDOW - 1e-6) // interval) + 1  # samples in a run spanning less than the window
    kinds: list[str] = []
    for _ in range(draw(st.integers(1, 8))):
        kinds += [IDLE] * draw(st.integers(1, longest))
        kinds += [draw(st.sampled_from(OTHER_KINDS))] * draw(st.integers(1, 5))
    return interval, kinds


@settings(max_examples=150, deadline=None)
@given(trace=short_idle_traces(), min_samples=st.integers(1, 5))
def test_no_action_when_every_idle_run_is_shorter_than_the_window(
    trace: tuple[float, list[str]], min_samples: int, tmp_path_factory: pytest.TempPathFactory
) -> None:
    interval, kinds = trace
    config = guard_config(tmp_path_factory.getbasetemp(), min_samples=min_samples, max_gap=WINDOW)
    steps = _run(Tracker(config), kinds, interval)
    assert all(not escalations for _, escalations in steps)


@st.composite
def any_traces(draw: st.DrawFn) -> tuple[float, list[str]]:
    interval = draw(st.sampled_from([5.0, 10.0, 30.0]))
    kinds: list[str] = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from((IDLE, IDLE, *OTHER_KINDS)))
        kinds += [kind] * draw(st.integers(1, 80))
    return interval, kinds


@settings(max_examples=150, deadline=None)
@given(trace=any_traces())
def test_unknown_samples_never_cause_an_action(
    trace: tuple[float, list[str]], tmp_path_factory: pytest.TempPathFactory
) -> None:
    interval, kinds = trace
    config = guard_config(tmp_path_factory.getbasetemp(), max_gap=WINDOW)
    steps = _run(Tracker(config), kinds, interval)
    # An escalation only ever comes with an idle reading, never with an unknown (or any other) one...
    for kind, escalations in steps:
        if escalations:
            assert kind == IDLE
    # ...and turning every idle reading into unknown leaves nothing at all.
    for unknown in UNKNOWN_KINDS:
        masked = [unknown if k == IDLE else k for k in kinds]
        assert all(not e for _, e in _run(Tracker(config), masked, interval))


def test_the_property_traces_can_fire(tmp_path: Path) -> None:
    """The generators above are not vacuous: one idle sample more than a window's worth fires."""
    config = replace(guard_config(tmp_path), max_gap=WINDOW)
    steps = _run(Tracker(config), [IDLE] * 31, 10.0)
    assert [e.stage for _, es in steps for e in es] == ["notify"]

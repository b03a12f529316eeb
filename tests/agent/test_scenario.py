"""Scenario parsing: traces, units, and validation messages that name the offending key."""

from __future__ import annotations

import math

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.support import SCENARIOS
from ray_agent.clock import FakeClock
from ray_agent.gpu.fake import (
    FakeBackend,
    ScenarioError,
    Trace,
    bundled_scenarios,
    load_scenario,
    parse_scenario,
    resolve_scenario_path,
)
from ray_agent.units import parse_bytes, parse_duration


def one_gpu(**extra: object) -> str:
    gpu = {"model": "T", "memory_total": "16GiB", **extra}
    return yaml.safe_dump({"gpus": [gpu]})


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("1m30s", 90.0), ("2h", 7200.0), (5, 5.0), (0.5, 0.5), ("1.5s", 1.5), ("1d", 86400.0)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "5", "5 s", "s", "-1s", True, -3, "1m30", None])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("text", "size"),
    [("80GiB", 80 * 2**30), ("512 MiB", 512 * 2**20), ("1GB", 10**9), (1024, 1024), ("7", 7)],
)
def test_sizes(text: object, size: int) -> None:
    assert parse_bytes(text) == size


segments = st.lists(
    st.tuples(
        st.integers(min_value=1, max_value=600),
        st.floats(min_value=0, max_value=1, allow_nan=False),
        st.one_of(st.none(), st.floats(min_value=0, max_value=1, allow_nan=False)),
    ),
    min_size=1,
    max_size=6,
)


def _yaml_segments(spec: list[tuple[int, float, float | None]]) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for length, start, end in spec:
        if end is None:
            out.append({"for": f"{length}s", "value": start})
        else:
            out.append({"for": f"{length}s", "from": start, "to": end})
    return out


@settings(max_examples=60, deadline=None)
@given(spec=segments, t=st.floats(min_value=0, max_value=5000, allow_nan=False))
def test_trace_from_yaml_matches_its_segments(spec: list[tuple[int, float, float | None]], t: float) -> None:
    scenario = parse_scenario(one_gpu(utilization=_yaml_segments(spec)))
    trace = scenario.gpus[0].utilization
    period = sum(length for length, _, _ in spec)
    assert trace.period == period
    # The value at t is the value in the segment that t falls in after looping.
    offset = t % period
    for length, start, end in spec:
        if offset < length:
            expected = start if end is None else start + (end - start) * offset / length
            break
        offset -= length
    assert math.isclose(trace.value_at(t), expected, abs_tol=1e-9)
    # Looping: one period later the value is the same.
    assert math.isclose(trace.value_at(t + period), trace.value_at(t), abs_tol=1e-9)
    low, high = trace.bounds()
    assert low - 1e-12 <= trace.value_at(t) <= high + 1e-12


@settings(max_examples=60, deadline=None)
@given(spec=segments, t=st.floats(min_value=0, max_value=5000, allow_nan=False))
def test_trace_integral_is_the_area_under_it(spec: list[tuple[int, float, float | None]], t: float) -> None:
    trace = parse_scenario(one_gpu(utilization=_yaml_segments(spec))).gpus[0].utilization
    # Midpoint sum over a fine grid of the (piecewise linear) trace.
    steps = 2000
    dt = t / steps if t else 0.0
    approx = sum(trace.value_at((i + 0.5) * dt) for i in range(steps)) * dt
    assert math.isclose(trace.integral(t), approx, rel_tol=0.02, abs_tol=trace.period * 0.02 + 1e-9)
    assert trace.integral(t + 1) >= trace.integral(t)


def test_constant_trace_integral() -> None:
    assert Trace.constant(3.0).integral(10.0) == pytest.approx(30.0)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (
            {"gpus": [{"model": "T", "memory_total": "1GiB", "utilisation": 0.5}]},
            r"gpus\[0\]\.utilisation: unknown key",
        ),
        ({"gpus": [{"memory_total": "1GiB"}]}, r"gpus\[0\]\.model: is required"),
        (
            {"gpus": [{"model": "T", "memory_total": "1GiB", "utilization": 1.5}]},
            r"gpus\[0\]\.utilization: 1\.5 is above",
        ),
        (
            {"gpus": [{"model": "T", "memory_total": "1GiB", "utilization": [{"for": "0s", "value": 0.1}]}]},
            r"utilization\[0\]\.for: a segment must last longer than 0s",
        ),
        (
            {"gpus": [{"model": "T", "memory_total": "1GiB", "utilization": [{"for": "5s"}]}]},
            r"utilization\[0\]: a segment needs value, or both from and to",
        ),
        ({"gpus": [{"model": "T", "memory_total": "1GiB", "memory_used": "2GiB"}]}, r"memory_used: exceeds"),
        ({"gpus": [{"model": "T", "memory_total": "lots"}]}, r"gpus\[0\]\.memory_total: expected a size"),
        (
            {
                "gpus": [
                    {"model": "T", "memory_total": "1GiB", "faults": [{"call": "power", "error": "MELTED"}]}
                ]
            },
            r"faults\[0\]\.error: 'MELTED' is not an NVML error",
        ),
        (
            {"gpus": [{"model": "T", "memory_total": "1GiB", "faults": [{"call": "fan", "error": 3}]}]},
            r"faults\[0\]\.call: 'fan' is not allowed; allowed values: init, shutdown, device, memory",
        ),
        ({"gpus": [], "faults": [{"call": "any", "error": 15, "gpu": 2}]}, r"faults\[0\]\.gpu: no GPU 2"),
        (
            {
                "gpus": [{"model": "T", "memory_total": "1GiB"}],
                "faults": [{"call": "init", "error": 9, "gpu": 0}],
            },
            r"faults\[0\]\.call: init is library-wide",
        ),
        (
            {"gpus": [], "faults": [{"call": "any", "error": 15, "from": "10s", "until": "5s"}]},
            r"faults\[0\]\.until: must be later than from",
        ),
        (
            {"gpus": [], "faults": [{"call": "any", "error": 15, "every": "10s"}]},
            r"every: a repeating window needs until",
        ),
        (
            {"gpus": [{"model": "T", "memory_total": "1GiB", "unsupported": ["fan"]}]},
            r"unsupported\[0\]: 'fan' is not a field",
        ),
        (
            {
                "gpus": [
                    {
                        "model": "T",
                        "memory_total": "1GiB",
                        "processes": [{"pid": 5, "memory": 1}, {"pid": 5, "memory": 1}],
                    }
                ]
            },
            r"processes\[1\]\.pid: pid 5 is listed twice",
        ),
        ({"gpu": []}, r"gpu: unknown key; allowed keys: delay, driver_version, faults, gpus"),
        ({"gpus": [], "driver_version": 550.1}, r"driver_version: expected a string"),
        (
            {"gpus": [{"model": "T", "memory_total": "1GiB", "sm_active": 0.5}]},
            r"gpus\[0\]\.sm_active: a GPM trace needs gpm: true",
        ),
        ({"gpus": [{"model": "T", "memory_total": "1GiB", "gpm": "yes"}]}, r"gpus\[0\]\.gpm: expected true or"),
        (
            {"gpus": [{"model": "T", "memory_total": "1GiB", "gpm": True, "tensor_active": [{"for": 1, "value": 2}]}]},
            r"gpus\[0\]\.tensor_active\[0\]\.value: 2 is above the maximum 1",
        ),
    ],
)
def test_validation_names_the_key(document: dict, message: str) -> None:
    with pytest.raises(ScenarioError, match=message):
        parse_scenario(yaml.safe_dump(document), "scenario.yml")


def test_error_message_names_the_file(tmp_path) -> None:
    path = tmp_path / "broken.yml"
    path.write_text("gpus: [{model: T}]\n")
    with pytest.raises(ScenarioError, match=r"broken\.yml: gpus\[0\]\.memory_total: is required"):
        load_scenario(path)


def test_not_yaml() -> None:
    with pytest.raises(ScenarioError, match="not valid YAML"):
        parse_scenario("gpus: [", "x.yml")


def test_every_scenario_file_in_the_tree_loads() -> None:
    files = sorted(SCENARIOS.glob("*.yml"))
    files = [f for f in files if not f.name.endswith(".config.yml")]
    assert files
    for path in files:
        assert load_scenario(path).gpus is not None


def test_bundled_scenarios_load_and_resolve() -> None:
    bundled = bundled_scenarios()
    assert {"demo-8gpu", "lab-2gpu"} <= set(bundled)
    demo = load_scenario(resolve_scenario_path("builtin:demo-8gpu"))
    assert len(demo.gpus) == 8
    # YAML merge keys give every copy its own processes but the shared model.
    assert {g.model for g in demo.gpus} == {"NVIDIA H100 80GB HBM3"}
    assert all(g.gpm is not None for g in demo.gpus)
    with pytest.raises(ScenarioError, match="no bundled scenario 'nope'"):
        resolve_scenario_path("builtin:nope")


def test_error_names_and_codes_are_both_accepted() -> None:
    text = yaml.safe_dump(
        {
            "gpus": [{"model": "T", "memory_total": 1}],
            "faults": [
                {"call": "init", "error": "NVML_ERROR_DRIVER_NOT_LOADED"},
                {"call": "init", "error": "lib_rm_version_mismatch"},
                {"call": "init", "error": 12},
                {"call": "init", "error": "hang"},
            ],
        }
    )
    assert [f.error for f in parse_scenario(text).faults] == [9, 18, 12, None]


def test_derived_uuids_differ_between_hosts_but_not_between_runs() -> None:
    from ray_agent.gpu.fake import parse_scenario

    text = "gpus: [{model: A, memory_total: 1GiB}, {model: A, memory_total: 1GiB}]\n"
    node1, node1_again, node2 = (parse_scenario(text, uuid_seed=seed) for seed in ("worker1", "worker1", "worker2"))
    assert [g.uuid for g in node1.gpus] == [g.uuid for g in node1_again.gpus]
    assert not {g.uuid for g in node1.gpus} & {g.uuid for g in node2.gpus}
    assert len({g.uuid for g in node1.gpus}) == 2


def test_gpm_is_the_mean_between_reads_and_a_failed_read_keeps_its_start() -> None:
    clock = FakeClock()
    text = yaml.safe_dump(
        {
            "gpus": [
                {
                    "model": "H",
                    "memory_total": "80GiB",
                    "gpm": True,
                    "utilization": 1.0,
                    "sm_active": [{"for": "10s", "value": 0.02}, {"for": "10s", "value": 0.5}],
                    "dram_active": [{"for": "20s", "from": 0.0, "to": 1.0}],
                    "pcie_tx_bytes_per_second": 4.0e8,
                    "faults": [{"call": "gpm", "error": "UNKNOWN", "from": "20s", "until": "25s"}],
                },
                {"model": "A", "memory_total": "80GiB", "utilization": 1.0},
            ]
        }
    )
    backend = FakeBackend(parse_scenario(text), clock)
    backend.init()
    assert backend.read_device(0).gpm is None  # first read: no interval yet
    clock.advance(15)
    gpm = backend.read_device(0).gpm
    assert gpm is not None
    assert gpm.sm_active_ratio == pytest.approx((10 * 0.02 + 5 * 0.5) / 15)
    assert gpm.dram_active_ratio == pytest.approx(15 / 20 / 2)
    assert gpm.graphics_active_ratio == 1.0 and gpm.tensor_active_ratio == 0.0
    assert gpm.pcie_tx_bytes_per_second == pytest.approx(4.0e8)
    clock.advance(7)  # t=22: the read fails and is counted; the interval keeps starting at 15
    failed = backend.read_device(0)
    assert failed.gpm is None and [e.field for e in failed.field_errors] == ["gpm"]
    clock.advance(8)  # t=30
    assert backend.read_device(0).gpm.sm_active_ratio == pytest.approx((5 * 0.5 + 10 * 0.02) / 15)
    backend.init()  # a re-init starts over, as NVML's sample buffers do
    assert backend.read_device(0).gpm is None
    # No GPM: nothing, nothing counted.
    plain = backend.read_device(1)
    clock.advance(5)
    plain = backend.read_device(1)
    assert plain.gpm is None and plain.field_errors == ()

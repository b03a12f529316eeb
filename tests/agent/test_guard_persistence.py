"""The idle clock across an agent restart: continued, not reset, and never fired at once by stale state."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from agent.guard_support import guard_config
from ray_agent.clock import FakeClock
from ray_agent.config import AttributionConfig, CollectionConfig, GuardConfig
from ray_agent.gpu.fake import FakeBackend, parse_scenario
from ray_agent.guard import Guard
from ray_agent.guard.audit import read_audit
from ray_agent.sampler import Sampler

INTERVAL = 10.0


def scenario(pid: int) -> str:
    # The UUID is derived from the index, so it is the same GPU in both lives of the agent.
    gpu = {
        "model": "T",
        "memory_total": "16GiB",
        "utilization": 0.0,
        "processes": [{"pid": pid, "user": "kim", "memory": 1}],
    }
    return yaml.safe_dump({"gpus": [gpu]})


class Life:
    """One run of the agent: a fresh backend, sampler and guard over the same state file and clock."""

    def __init__(self, config: GuardConfig, clock: FakeClock, pid: int = 3101) -> None:
        self.clock = clock
        self.sampler = Sampler(
            FakeBackend(parse_scenario(scenario(pid)), clock),
            None,
            CollectionConfig(INTERVAL, 1.0),
            clock,
        )
        self.guard = Guard(config, AttributionConfig(enabled=False), clock, host="node-a")
        self.guard.start()

    def run(self, seconds: float) -> None:
        end = self.clock.monotonic() + seconds
        while self.clock.monotonic() < end:
            self.guard.observe(self.sampler.collect_once())
            assert self.guard.drain(10)
            self.clock.advance(INTERVAL)

    def end(self) -> None:
        self.guard.stop()
        self.sampler.stop()


def fired(config: GuardConfig, start_wall: float) -> list[tuple[float, str]]:
    """(seconds since the first life started, stage) from the audit log."""
    from datetime import datetime

    out = []
    for record in read_audit(config.audit_log):
        at = datetime.fromisoformat(record["time"].replace("Z", "+00:00")).timestamp()
        out.append((round(at - start_wall), record["stage"]))
    return out


def test_restart_continues_the_idle_clock(tmp_path: Path) -> None:
    config = guard_config(tmp_path)
    clock = FakeClock()
    start = clock.time()
    first = Life(config, clock)
    first.run(200)  # idle since 0 s, samples at 0..190 s
    first.end()
    saved = json.loads(config.state_file.read_text())
    (run,) = saved["runs"].values()
    assert run["pids"] == [3101] and run["idle_since"] == start and run["stages_done"] == []
    clock.advance(20)  # restart takes 30 s after the last sample, under max_gap (60 s)
    second = Life(config, clock)
    second.run(300)
    second.end()
    # Idle since 0 s, so idle_held at 300 s as if there had been no restart (not at 220 + 300 s).
    assert fired(config, start)[0] == (300, "notify")


def test_stages_done_before_a_restart_are_not_repeated(tmp_path: Path) -> None:
    config = guard_config(tmp_path)
    clock = FakeClock()
    start = clock.time()
    first = Life(config, clock)
    first.run(350)  # notify at 300 s
    first.end()
    second = Life(config, clock)
    second.run(400)
    second.end()
    assert fired(config, start) == [(300, "notify"), (420, "stop"), (540, "kill")]


def test_state_older_than_max_gap_is_discarded(tmp_path: Path) -> None:
    config = guard_config(tmp_path)
    clock = FakeClock()
    start = clock.time()
    first = Life(config, clock)
    first.run(350)
    first.end()
    clock.advance(600)  # down for ten minutes: what the GPU did meanwhile is unknown
    second = Life(config, clock)
    second.run(400)
    second.end()
    restarted = 350 + 600
    # Notified once before; after the restart the clock starts again, so nothing fires at once.
    assert fired(config, start) == [(300, "notify"), (restarted + 300, "notify")]


def test_a_different_holder_after_the_restart_starts_a_new_run(tmp_path: Path) -> None:
    config = guard_config(tmp_path)
    clock = FakeClock()
    start = clock.time()
    first = Life(config, clock, pid=3101)
    first.run(280)
    first.end()
    second = Life(config, clock, pid=3102)  # same GPU, another process
    second.run(310)
    second.end()
    assert fired(config, start) == [(280 + 300, "notify")]


def test_a_corrupt_state_file_is_ignored(tmp_path: Path) -> None:
    config = guard_config(tmp_path)
    config.state_file.write_text("{not json")
    clock = FakeClock()
    start = clock.time()
    life = Life(config, clock)
    life.run(310)
    life.end()
    assert fired(config, start) == [(300, "notify")]
    assert json.loads(config.state_file.read_text())["version"] == 1  # replaced by a good one

"""Fixtures for the agent tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from agent.support import AgentProcess


@pytest.fixture
def agent_process() -> Iterator[type[AgentProcess]]:
    started: list[AgentProcess] = []

    class Tracked(AgentProcess):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            started.append(self)

    yield Tracked
    for agent in started:
        agent.stop()
        for stream in (agent.process.stdout, agent.process.stderr):
            if stream is not None:
                stream.close()

"""Fixtures for the agent tests."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

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


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test CA (ca.crt) and certificates it signed: server.crt for 127.0.0.1, client.crt for client auth."""
    openssl = shutil.which("openssl")
    assert openssl, "openssl is needed to make test certificates"
    root = tmp_path_factory.mktemp("pki")
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=root, check=True, capture_output=True)

    run(
        "req",
        "-x509",
        *key,
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=rayrack test CA",
    )
    for name, extensions in (
        ("server", "subjectAltName=IP:127.0.0.1"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        run("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        (root / f"{name}.ext").write_text(extensions + "\n")
        run(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.crt",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
        )
    return root

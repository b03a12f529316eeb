"""One real Ray head (token auth) and one TLS gateway in front of it for the whole session."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest
import required

from gateway.support import Account, Gateway, Pki, RayHead, make_accounts, make_pki, write_users


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    if importlib.util.find_spec("ray") is None:
        required.missing("ray is not importable (pip install 'ray[default]==2.60.0')")
    head = RayHead(tmp_path_factory.mktemp("ray-head"))
    head.start()
    try:
        yield head
    finally:
        head.stop()


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def accounts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Account]:
    return make_accounts(
        tmp_path_factory.mktemp("tokens"), [("alice", False, None), ("bob", False, 1), ("root", True, None)]
    )


@pytest.fixture(scope="session")
def gateway(ray_head: RayHead, pki: Pki, accounts: dict[str, Account], tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Gateway]:  # fmt: skip
    workdir = tmp_path_factory.mktemp("gateway")
    users = write_users(workdir / "users.json", accounts.values())
    gw = Gateway(workdir, ray_head.dashboard_url, users, ray_head.token_file, pki)
    gw.start()
    try:
        yield gw
    finally:
        gw.stop()


@pytest.fixture
def working_dir(tmp_path: Path) -> Path:
    (tmp_path / "hello.py").write_text('print("hello from the working dir")\n')
    return tmp_path

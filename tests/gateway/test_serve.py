"""Ray Serve through the gateway against the session's real Ray head: each user's applications, one Serve.

Serve starts once for the module (as the head's unit starts it: pinned port, here on loopback); the tests run
in order on the same applications, and the admin's shutdown comes last.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import required

from gateway.support import BIN, Account, Gateway, RayHead, call, client_env, free_ports

pytestmark = pytest.mark.slow

APPS = "/api/serve/applications/"
OWNER = "RAYRACK_USER"  # what the gateway stamps; spelled out so a renamed key fails here

# A replica answers with its application's name and the owner it sees in its environment.
APP_CODE = """
import os
from ray import serve

@serve.deployment(ray_actor_options={"num_cpus": 0})
class Hello:
    def __call__(self, request):
        return f"{serve.get_replica_context().app_name} of {os.environ.get('RAYRACK_USER', 'nobody')}"

app = Hello.bind()
"""


def ray_serve(head: RayHead, method: str = "GET", body: object = None) -> Any:
    """Ray's own Serve API, around the gateway, with the cluster token (as the head's unit and admins do)."""
    import requests

    r = requests.request(method, head.dashboard_url + APPS, json=body, timeout=120,
                         headers={"Authorization": f"Bearer {head.token}"})  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json() if method == "GET" else None


def wait_apps(head: RayHead, wanted: dict[str, str | None], timeout: float = 90) -> dict[str, Any]:
    """Ray's applications once each named one has the status given (None: gone)."""
    deadline = time.monotonic() + timeout
    while True:
        apps = ray_serve(head)["applications"]
        now = {name: apps[name]["status"] if name in apps else None for name in wanted}
        if now == wanted:
            return apps
        if time.monotonic() > deadline:
            raise AssertionError(f"applications {now}, not {wanted}: {json.dumps(apps)[:3000]}")
        time.sleep(0.3)


def answer(port: int, route: str) -> str:
    import requests

    r = requests.get(f"http://127.0.0.1:{port}{route}", timeout=30)
    assert r.status_code == 200, (route, r.status_code, r.text)
    return r.text


def serve_cli(head: RayHead, gateway: Gateway, account: Account, *args: str) -> subprocess.CompletedProcess[str]:
    """The stock `serve` command line against the gateway as `account`: token from the file, CA from the env."""
    assert gateway.pki is not None
    env = client_env(head, account)
    env["REQUESTS_CA_BUNDLE"] = str(gateway.pki.ca_cert)
    command, *rest = args
    return subprocess.run([str(BIN / "serve"), command, "-a", gateway.url, *rest], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


@pytest.fixture(scope="module")
def serve_port(ray_head: RayHead) -> Iterator[int]:
    if importlib.util.find_spec("fastapi") is None:  # one of what ray[serve] adds to ray[default]
        required.missing("Ray Serve's dependencies are not installed (pip install 'ray[default,serve]==2.60.0')")
    port = free_ports(1)[0]
    ray_serve(ray_head, "PUT", {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
                                "applications": []})  # fmt: skip
    try:
        yield port
    finally:
        ray_serve(ray_head, "DELETE")  # the session's head goes on to other modules without Serve


@pytest.fixture(scope="module")
def code_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("serve-app")
    (directory / "hello.py").write_text(APP_CODE)
    return directory


def app_config(name: str, code_dir: Path, **extra: Any) -> dict[str, Any]:
    # local://: a directory every node already has, as the shared tree is on the cluster.
    return {"name": name, "route_prefix": f"/{name}", "import_path": "hello:app",
            "runtime_env": {"working_dir": f"local://{code_dir}"}, **extra}  # fmt: skip


def owner(apps: dict[str, Any], name: str) -> str:
    return apps[name]["deployed_app_config"]["runtime_env"]["env_vars"][OWNER]


def replicas(apps: dict[str, Any], name: str) -> set[str]:
    """An application's replica ids: the same ones while it is left alone (every PUT moves its deploy time)."""
    return {r["replica_id"] for d in apps[name]["deployments"].values() for r in d["replicas"]}


def test_malformed_bodies_are_400_naming_the_key(gateway: Gateway, serve_port: int,
                                                 accounts: dict[str, Account]) -> None:  # fmt: skip
    cases: list[tuple[object, str]] = [
        (b"{not json", "the body is not JSON"),
        ([], "the body must be a JSON object"),
        ({"http_options": {}}, "applications: missing"),
        ({"applications": {"name": "a"}}, "applications: must be a list"),
        ({"applications": ["a"]}, r"applications\[0\]: must be an object"),
        ({"applications": [{"import_path": "hello:app"}]}, r"applications\[0\]\.name: must be a non-empty string"),
        ({"applications": [{"name": "a"}, {"name": ""}]}, r"applications\[1\]\.name"),
        ({"applications": [{"name": "a", "runtime_env": "x"}]}, r"applications\[0\]\.runtime_env: must be an object"),
        ({"applications": [{"name": "a", "runtime_env": {"env_vars": ["x"]}}]}, r"runtime_env\.env_vars"),
        ({"applications": [], "proxy": 1}, r"proxy: not a field .* \(allowed: applications, logging_config"),
    ]
    for body, message in cases:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = call(gateway, "PUT", APPS, accounts["alice"], data=data, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, (body, r.text)
        assert re.search(message, r.json()["error"]), (body, r.text)


def test_two_users_deploy_and_both_run(gateway: Gateway, ray_head: RayHead, serve_port: int, code_dir: Path,
                                       accounts: dict[str, Account], tmp_path: Path) -> None:  # fmt: skip
    alice, bob = accounts["alice"], accounts["bob"]
    # The stock CLI, with the cluster's own settings repeated as `serve build` writes them (allowed when equal)
    # and a top-level logging_config, which becomes her application's.
    config = tmp_path / "alice.yaml"
    config.write_text(json.dumps({"proxy_location": "HeadOnly", "http_options": {"port": serve_port},
                                  "logging_config": {"log_level": "DEBUG"},
                                  "applications": [app_config("a", code_dir)]}))  # fmt: skip
    deploy = serve_cli(ray_head, gateway, alice, "deploy", str(config))
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    r = call(gateway, "PUT", APPS, bob, json={"applications": [app_config("b", code_dir)]})
    assert r.status_code == 200, r.text
    apps = wait_apps(ray_head, {"a": "RUNNING", "b": "RUNNING"})
    assert (owner(apps, "a"), owner(apps, "b")) == ("alice", "bob")
    assert apps["a"]["deployed_app_config"]["logging_config"] == {"log_level": "DEBUG"}
    assert "logging_config" not in apps["b"]["deployed_app_config"]
    assert answer(serve_port, "/a") == "a of alice"
    assert answer(serve_port, "/b") == "b of bob"
    # Everyone reads everyone's applications, with the stock CLI too.
    listing = call(gateway, "GET", APPS, bob).json()["applications"]
    assert (owner(listing, "a"), owner(listing, "b")) == ("alice", "bob")
    status = serve_cli(ray_head, gateway, bob, "status")
    assert status.returncode == 0, status.stderr
    assert re.search(r"^  a:\n    status: RUNNING", status.stdout, re.M), status.stdout
    summary = call(gateway, "GET", "/api/rayrack/serve", headers={"Authorization": f"Bearer {ray_head.token}"})
    entries = {app["name"]: app for app in summary.json()["applications"]}
    assert entries["a"] == {"name": "a", "user": "alice", "status": "RUNNING", "route_prefix": "/a",
                            "source": "declarative"}  # fmt: skip
    assert entries["b"]["user"] == "bob"
    assert re.search(r'user=alice method=PUT path=/api/serve/applications/ status=200 duration=\S+ '
                     r'applications=\["a"\] removed=\[\] kept=\[\]', gateway.log())  # fmt: skip
    assert re.search(r'user=bob method=PUT .* applications=\["b"\] removed=\[\] kept=\["a"\]', gateway.log())


def test_others_cannot_touch_an_app_the_cluster_settings_or_a_route(
    gateway: Gateway, ray_head: RayHead, serve_port: int, code_dir: Path, accounts: dict[str, Account]
) -> None:
    alice, bob = accounts["alice"], accounts["bob"]
    before = wait_apps(ray_head, {"a": "RUNNING", "b": "RUNNING"})
    refusals: list[tuple[Account, dict[str, Any], int, str]] = [
        (bob, {"applications": [app_config("a", code_dir, args={"x": 1}), app_config("b", code_dir)]}, 403,
         "application a belongs to alice"),
        (alice, {"http_options": {"port": serve_port + 1}, "applications": [app_config("a", code_dir)]}, 403,
         f"http_options.port: {serve_port + 1} is not the cluster's {serve_port}"),
        (alice, {"proxy_location": "EveryNode", "applications": [app_config("a", code_dir)]}, 403,
         "proxy_location: 'EveryNode' is not the cluster's 'HeadOnly'"),
        (alice, {"target_capacity": 10, "applications": [app_config("a", code_dir)]}, 403, "target_capacity: 10"),
        (alice, {"controller_options": {}, "applications": [app_config("a", code_dir)]}, 403, "controller_options"),
        (alice, {"applications": [app_config("a", code_dir), app_config("c", code_dir, route_prefix="/b")]}, 409,
         "application c: route_prefix /b is taken by application b of bob"),
    ]  # fmt: skip
    for account, body, status, message in refusals:
        r = call(gateway, "PUT", APPS, account, json=body)
        assert (r.status_code, r.json()["error"][: len(message)]) == (status, message), (body, r.text)
    after = ray_serve(ray_head)["applications"]
    assert set(after) == {"a", "b"}
    for name in ("a", "b"):
        assert after[name]["last_deployed_time_s"] == before[name]["last_deployed_time_s"], name
    assert answer(serve_port, "/a") == "a of alice"


def test_a_forged_owner_is_replaced_and_an_admin_keeps_the_owner(
    gateway: Gateway, ray_head: RayHead, serve_port: int, code_dir: Path, accounts: dict[str, Account]
) -> None:
    forged = app_config("b", code_dir)
    forged["runtime_env"]["env_vars"] = {OWNER: "alice"}
    r = call(gateway, "PUT", APPS, accounts["bob"], json={"applications": [forged]})
    assert r.status_code == 200, r.text
    assert re.search(r"user=bob deployed application \"b\" with RAYRACK_USER='alice': replaced by bob", gateway.log())
    # The admin changes bob's application (its replica count): it stays bob's, and alice's stays as it was.
    r = call(gateway, "PUT", APPS, accounts["root"],
             json={"applications": [app_config("b", code_dir, deployments=[{"name": "Hello", "num_replicas": 2}])]})
    assert r.status_code == 200, r.text
    apps = wait_apps(ray_head, {"a": "RUNNING", "b": "RUNNING"})
    assert (owner(apps, "a"), owner(apps, "b")) == ("alice", "bob")
    assert apps["b"]["deployed_app_config"]["deployments"] == [{"name": "Hello", "num_replicas": 2}]
    assert answer(serve_port, "/b") == "b of bob"


def test_an_app_left_out_of_ones_config_is_deleted_others_stay(
    gateway: Gateway, ray_head: RayHead, serve_port: int, accounts: dict[str, Account]
) -> None:
    before = wait_apps(ray_head, {"a": "RUNNING", "b": "RUNNING"})
    r = call(gateway, "PUT", APPS, accounts["alice"], json={"applications": []})
    assert r.status_code == 200, r.text
    after = wait_apps(ray_head, {"a": None, "b": "RUNNING"})
    assert replicas(after, "b") == replicas(before, "b")  # bob's application was not redeployed
    assert answer(serve_port, "/b") == "b of bob"
    assert re.search(r'user=alice method=PUT .* applications=\[\] removed=\["a"\] kept=\["b"\]', gateway.log())


def test_shutdown_is_for_admins_only(gateway: Gateway, ray_head: RayHead, serve_port: int,
                                     accounts: dict[str, Account]) -> None:  # fmt: skip
    shutdown = serve_cli(ray_head, gateway, accounts["bob"], "shutdown", "-y")
    assert shutdown.returncode != 0
    # Ray's SDK prints the gateway's reason first (then its own lines on tokens, as for every 403).
    assert "only an admin may; to remove your own applications, deploy a config without them" in shutdown.stderr, (
        shutdown.stderr[-3000:])
    assert ray_serve(ray_head)["applications"]["b"]["status"] == "RUNNING"
    r = call(gateway, "DELETE", APPS, accounts["root"])
    assert r.status_code == 200, r.text
    assert ray_serve(ray_head)["applications"] == {}
    # Without Serve, a user's deploy would start it with their own settings: refused until an admin starts it.
    r = call(gateway, "PUT", APPS, accounts["alice"], json={"applications": []})
    assert (r.status_code, r.json()) == (503, {"error": "Ray Serve is not running on this cluster: an admin "
                                                        "starts it (serve start)"})  # fmt: skip

"""What Ray's side sees: only the cluster token, never a user's token or cookie (a recording upstream)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import required

from gateway.support import Gateway, free_ports, make_accounts, write_secret, write_users

if TYPE_CHECKING:
    from aiohttp import web

pytestmark = pytest.mark.slow


def need_aiohttp() -> None:
    # aiohttp and requests come with Ray, as on the head; this module needs no Ray head itself.
    for name in ("aiohttp", "requests"):
        if importlib.util.find_spec(name) is None:
            required.missing(f"{name} is not importable (pip install 'ray[default]==2.60.0')")


CLUSTER_TOKEN = "c" * 64


class Recorder:
    """A stand-in for Ray's dashboard that records every request's headers and body."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, str], bytes]] = []
        self.port = free_ports(1)[0]
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import web

        body = await request.read()
        self.seen.append((request.method, request.path, dict(request.headers), body))
        if request.path.endswith("/logs/tail"):
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            await ws.send_str("a log line\n")
            await ws.close()
            return ws
        if request.method == "GET" and request.path.startswith("/api/jobs/x"):
            document: object = {"submission_id": "alice-x", "metadata": {"rayrack.user": "alice"}}
        elif request.method == "GET" and request.path == "/api/jobs/":
            document = [{"submission_id": "alice-x", "metadata": {"rayrack.user": "alice"}}]
        elif request.method == "POST" and request.path == "/api/jobs/":
            document = {"submission_id": json.loads(body)["submission_id"]}
        elif request.method == "GET" and request.path == "/api/serve/applications/":
            document = {"http_options": {"host": "127.0.0.1", "port": 8000}, "applications": {}}  # Serve runs
        else:
            document = {}
        response = web.json_response(document)
        response.set_cookie("ray-authentication-token", CLUSTER_TOKEN)
        return response

    def _serve(self) -> None:
        from aiohttp import web

        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        runner = web.AppRunner(app)
        self.loop.run_until_complete(runner.setup())
        self.loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self.ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(runner.cleanup())

    def __enter__(self) -> Recorder:
        self.thread.start()
        self.ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def recorded(tmp_path: Path) -> Iterator[tuple[Recorder, Gateway, str]]:
    need_aiohttp()
    accounts = make_accounts(tmp_path / "tokens", [("alice", False, None)])
    users = write_users(tmp_path / "users.json", accounts.values())
    with Recorder() as recorder:
        gw = Gateway(tmp_path, f"http://127.0.0.1:{recorder.port}", users,
                     write_secret(tmp_path / "cluster.token", CLUSTER_TOKEN))  # fmt: skip
        gw.start()
        try:
            yield recorder, gw, accounts["alice"].token
        finally:
            gw.stop()


def test_upstream_sees_the_cluster_token_only(recorded: tuple[Recorder, Gateway, str]) -> None:
    import aiohttp
    import requests

    recorder, gw, token = recorded
    sent = {
        "Authorization": f"Bearer {token}",
        "X-Ray-Authorization": f"Bearer {token}",
        "Cookie": f"ray-authentication-token={token}; session=abc",
        "X-Forwarded-For": "10.0.0.1",
    }
    session = requests.Session()
    answers = [
        session.get(f"{gw.url}/api/version", headers=sent),
        session.post(f"{gw.url}/api/jobs/", headers=sent, json={"entrypoint": "true"}),
        session.get(f"{gw.url}/api/jobs/x", headers=sent),
        session.post(f"{gw.url}/api/jobs/x/stop", headers=sent),
        session.get(f"{gw.url}/api/jobs/x/logs", headers=sent),
        session.put(f"{gw.url}/api/packages/gcs/_ray_pkg_0.zip", headers=sent, data=b"PK" * 100_000),
        session.get(f"{gw.url}/api/rayrack/jobs", headers=sent),
        session.get(f"{gw.url}/api/ray/version", headers=sent),
        session.get(f"{gw.url}/api/serve/applications/", headers=sent),
        session.put(f"{gw.url}/api/serve/applications/", headers=sent, json={"applications": []}),
        session.get(f"{gw.url}/api/rayrack/serve", headers=sent),
    ]
    assert [a.status_code for a in answers] == [200] * len(answers)
    # Ray's cookie stays between the gateway and Ray.
    assert not any("Set-Cookie" in a.headers for a in answers)

    async def tail() -> list[str]:
        async with aiohttp.ClientSession() as client:
            ws = await client.ws_connect(f"{gw.url}/api/jobs/x/logs/tail", headers=sent)
            return [msg.data async for msg in ws]

    assert asyncio.run(tail()) == ["a log line\n"]
    assert len(recorder.seen) >= len(answers) + 1
    for method, path, headers, body in recorder.seen:
        assert headers["Authorization"] == f"Bearer {CLUSTER_TOKEN}", (method, path)
        lowered = {k.lower() for k in headers}
        assert not lowered & {"x-ray-authorization", "cookie", "x-forwarded-for"}, (method, path, headers)
        assert token not in json.dumps(headers) + body.decode(errors="replace")
    uploads = [body for method, path, _, body in recorder.seen if method == "PUT" and path.startswith("/api/packages/")]
    assert uploads == [b"PK" * 100_000]
    assert token not in gw.log()


def test_without_a_ray_token_nothing_is_sent(tmp_path: Path) -> None:
    need_aiohttp()
    import requests

    accounts = make_accounts(tmp_path / "tokens", [("alice", False, None)])
    with Recorder() as recorder:
        gw = Gateway(tmp_path, f"http://127.0.0.1:{recorder.port}", write_users(tmp_path / "u.json",
                     accounts.values()), None)  # fmt: skip
        gw.start()
        try:
            r = requests.get(f"{gw.url}/api/version", headers={"Authorization": f"Bearer {accounts['alice'].token}"})
            assert r.status_code == 200
        finally:
            gw.stop()
    assert [h.get("Authorization") for _, _, h, _ in recorder.seen] == [None]

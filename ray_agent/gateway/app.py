"""The aiohttp application: authenticate, apply the ownership rules, forward to Ray's Jobs and Serve APIs.

What reaches Ray is built from scratch for every request (`Upstream.headers`): a short list of content
headers copied from the client, plus the cluster token. The client's Authorization, X-Ray-Authorization and
cookies are never among them, so a user token cannot reach Ray, and Ray's answers never set cookies here
(the upstream session keeps none).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import secrets
import string
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web

from ray_agent.gateway import serve
from ray_agent.gateway.users import User, Users
from ray_agent.users import OWNER_METADATA_KEY as OWNER_KEY
from ray_agent.users import UNKNOWN_OWNER, job_owner

log = logging.getLogger("ray_agent.gateway")

# Copied from the client to Ray; everything else (auth headers, cookies, hop-by-hop headers) is dropped.
_FORWARDED_REQUEST_HEADERS = ("Content-Type", "Accept", "User-Agent")
_FORWARDED_RESPONSE_HEADERS = ("Content-Type", "Content-Encoding")
_SUBMISSION_ALPHABET = string.ascii_letters + string.digits
# Submit bodies are small; package uploads are streamed and not bound by this.
_MAX_BODY = 16 * 1024 * 1024
# Answers up to this size are read whole and sent in one piece; larger ones (logs) are streamed.
_BUFFERED = 1024 * 1024

_CALLER = "rayrack.caller"  # request key: the Caller, set once the token is checked
_DETAIL = "rayrack.detail"  # request key: what the access log line adds (the Serve applications a deploy named)
_SERVE_APPLICATIONS = "/api/serve/applications/"


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a request: a user, or a holder of the cluster token (node agents, admins)."""

    user: User | None
    cluster: bool = False

    @property
    def name(self) -> str:
        return self.user.name if self.user else "cluster"


class Upstream:
    """Ray's dashboard on loopback, reached through one client session with the cluster token."""

    def __init__(self, url: str, token: str | None, request_timeout: float) -> None:
        self.url = url
        self.token = token
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=request_timeout, sock_read=request_timeout)
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # DummyCookieJar: a cookie Ray sets for one caller must never ride along with the next one's request.
        self.session = aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=self.timeout,
            auto_decompress=False,
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    def headers(self, request: web.Request | None = None, extra: tuple[str, ...] = ()) -> dict[str, str]:
        headers = {}
        if request is not None:
            for name in (*_FORWARDED_REQUEST_HEADERS, *extra):
                if name in request.headers:
                    headers[name] = request.headers[name]
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    async def get_json(self, path: str) -> tuple[int, Any, bytes]:
        """GET a JSON document; the body is None when the answer is not 200 or not JSON."""
        assert self.session is not None
        async with self.session.get(self.url + path, headers=self.headers()) as resp:
            raw = await resp.read()
            if resp.status != 200:
                return resp.status, None, raw
            try:
                return resp.status, json.loads(raw), raw
            except ValueError:
                return resp.status, None, raw


def _json(status: int, document: Any, **headers: str) -> web.Response:
    return web.Response(status=status, text=json.dumps(document), content_type="application/json", headers=headers)


def _unauthorized() -> web.Response:
    # The same answer for a missing, malformed or unknown token: nothing tells a guesser which it was.
    return _json(401, {"error": "unauthorized"}, **{"WWW-Authenticate": "Bearer"})


def _bearer(request: web.Request) -> str | None:
    # Ray's SDK sends Authorization; proxies in front of Ray (and KubeRay) use X-Ray-Authorization.
    for header in ("Authorization", "X-Ray-Authorization"):
        value = request.headers.get(header, "")
        scheme, _, token = value.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


def _owner(job: Any) -> str:
    return job_owner(job.get("metadata") if isinstance(job, dict) else None)


def upstream_path(request: web.Request) -> str:
    """The path asked of Ray: the route's pattern with each part quoted whole, query kept.

    Built, not copied, so the job whose owner was checked is the job acted on: an id holding an encoded "/"
    or ".." cannot name one job to the check and another to Ray.
    """
    parts = {key: quote(value, safe="") for key, value in request.match_info.items()}
    path = request.match_info.route.resource.canonical.format(**parts)  # type: ignore[union-attr]
    query = request.rel_url.raw_query_string
    return f"{path}?{query}" if query else path


def new_submission_id(user: str) -> str:
    """`<user>-raysubmit_<16 alnum>`, the shape of Ray's own ids with the owner in front."""
    return f"{user}-raysubmit_" + "".join(secrets.choice(_SUBMISSION_ALPHABET) for _ in range(16))


class Gateway:
    def __init__(self, users: Users, upstream: Upstream) -> None:
        self.users = users
        self.upstream = upstream
        self.tails: set[web.WebSocketResponse] = set()
        # A deploy reads Ray's applications, merges and writes them back: two at once would each drop the
        # other's new applications.
        self.serve_lock = asyncio.Lock()

    # --- authentication -----------------------------------------------------------------------

    def authenticate(self, request: web.Request, allow_cluster: bool = False) -> Caller | None:
        token = _bearer(request)
        if token is None:
            return None
        user = self.users.lookup(token)
        if user is not None:
            return Caller(user)
        cluster = self.upstream.token
        if allow_cluster and cluster is not None and hmac.compare_digest(token.encode(), cluster.encode()):
            return Caller(None, cluster=True)
        return None

    # --- forwarding ---------------------------------------------------------------------------

    async def forward(
        self, request: web.Request, body: bytes | aiohttp.StreamReader | None = None, extra: tuple[str, ...] = ()
    ) -> web.StreamResponse:
        """Send the request to Ray as it came (path, query, method, body) and stream the answer back."""
        session = self.upstream.session
        assert session is not None
        url = self.upstream.url + upstream_path(request)
        headers = self.upstream.headers(request, extra)
        async with session.request(request.method, url, headers=headers, data=body) as resp:
            response_headers = {
                name: resp.headers[name] for name in _FORWARDED_RESPONSE_HEADERS if name in resp.headers
            }
            if resp.content_length is not None and resp.content_length <= _BUFFERED:
                # Most answers are a few kilobytes of JSON: one write is cheaper than a stream.
                return web.Response(status=resp.status, reason=resp.reason, body=await resp.read(),
                                    headers=response_headers)  # fmt: skip
            out = web.StreamResponse(status=resp.status, reason=resp.reason, headers=response_headers)
            if resp.content_length is not None:
                out.content_length = resp.content_length
            await out.prepare(request)
            async for chunk in resp.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    async def job_and_owner(self, job_id: str) -> tuple[web.Response | None, str]:
        """The owner of a job, or Ray's own answer (404 and the like) to relay when it cannot be read."""
        status, job, raw = await self.upstream.get_json(f"/api/jobs/{quote(job_id, safe='')}")
        if job is None:
            return web.Response(status=status, body=raw), UNKNOWN_OWNER
        return None, _owner(job)

    async def owner_only(self, request: web.Request) -> web.Response | None:
        """None when the caller may act on the job, else the answer to give."""
        caller: Caller = request[_CALLER]
        job_id = request.match_info["job_id"]
        failure, owner = await self.job_and_owner(job_id)
        if failure is not None:
            return failure
        assert caller.user is not None
        if owner != caller.user.name and not caller.user.admin:
            return _json(403, {"error": f"job {job_id} belongs to {owner}"})
        return None

    # --- handlers -----------------------------------------------------------------------------

    async def passthrough(self, request: web.Request) -> web.StreamResponse:
        return await self.forward(request, await request.read() if request.can_read_body else None)

    async def put_package(self, request: web.Request) -> web.StreamResponse:
        # Streamed: a working_dir can be hundreds of megabytes, none of which needs to sit in memory here.
        return await self.forward(request, request.content, extra=("Content-Length",))

    async def owned(self, request: web.Request) -> web.StreamResponse:
        refused = await self.owner_only(request)
        if refused is not None:
            return refused
        return await self.forward(request, await request.read() if request.can_read_body else None)

    async def submit(self, request: web.Request) -> web.StreamResponse:
        caller: Caller = request[_CALLER]
        assert caller.user is not None
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            # Not ours to judge: Ray's 400, with its reason, reaches the client.
            return await self.forward(request, raw)
        user = caller.user
        gpus = body.get("entrypoint_num_gpus")
        if user.max_gpus is not None and gpus is not None:
            # What Ray would read ("2" and 2.0 too: its model coerces strings); NaN and the like never pass.
            try:
                asked = float(gpus) if not isinstance(gpus, bool) else math.nan
            except (TypeError, ValueError):
                asked = math.nan
            if not math.isfinite(asked) or asked > user.max_gpus:
                return _json(
                    403,
                    {
                        "error": f"{user.name} may ask for at most {user.max_gpus:g} GPUs per job "
                        f"(max_gpus); entrypoint_num_gpus is {gpus!r}"
                    },
                )
        metadata = body.get("metadata")
        if metadata is None:
            metadata = {}
        if isinstance(metadata, dict):
            claimed = metadata.get(OWNER_KEY)
            if claimed is not None and claimed != user.name:
                log.warning(
                    "user=%s submitted metadata %s=%r: replaced by %s", user.name, OWNER_KEY, claimed, user.name
                )
            body["metadata"] = {**metadata, OWNER_KEY: user.name}
        given = body.get("submission_id")
        if given is None:
            given = body.pop("job_id", None)  # the deprecated name of the same field
        if given is None:
            body["submission_id"] = new_submission_id(user.name)
        elif isinstance(given, str):
            body["submission_id"] = given if given.startswith(f"{user.name}-") else f"{user.name}-{given}"
        # Anything else (a metadata list, a numeric id) goes on as it is: Ray names the problem in its 400.
        return await self.forward(request, json.dumps(body).encode())

    async def tail(self, request: web.Request) -> web.StreamResponse:
        refused = await self.owner_only(request)
        if refused is not None:
            return refused
        session = self.upstream.session
        assert session is not None
        url = self.upstream.url + upstream_path(request)
        try:
            upstream_ws = await session.ws_connect(
                url,
                headers=self.upstream.headers(),
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0),
                autoping=True,
            )
        except aiohttp.WSServerHandshakeError as err:
            # Ray answers before the upgrade when the job is unknown or not a submission.
            return _json(err.status, {"error": err.message})
        async with upstream_ws:
            ws = web.WebSocketResponse(autoping=True)
            await ws.prepare(request)
            self.tails.add(ws)
            try:
                await _relay(upstream_ws, ws)
            finally:
                self.tails.discard(ws)
            return ws

    async def serve_deploy(self, request: web.Request) -> web.StreamResponse:
        """`serve deploy`: the caller's applications replaced, every other owner's sent back as deployed."""
        caller: Caller = request[_CALLER]
        assert caller.user is not None
        user = caller.user
        try:
            body = json.loads(await request.read())
        except ValueError as err:
            return _json(400, {"error": f"the body is not JSON (Serve's deploy config): {err}"})
        if isinstance(body, dict) and isinstance(body.get("applications"), list):
            names = [app.get("name") for app in body["applications"] if isinstance(app, dict)]
            request[_DETAIL] = f"applications={json.dumps(names)}"
        async with self.serve_lock:
            status, details, raw = await self.upstream.get_json(_SERVE_APPLICATIONS)
            if details is None:
                return web.Response(status=status if status != 200 else 502, body=raw)
            try:
                plan = serve.plan(body, details, user.name, user.admin)
            except serve.Refusal as refusal:
                return _json(refusal.status, {"error": refusal.message})
            for name, claimed in plan.replaced_owners:
                log.warning("user=%s deployed application %s with %s=%r: replaced by %s", user.name, json.dumps(name),
                            serve.SERVE_OWNER_ENV_VAR, claimed, user.name)  # fmt: skip
            request[_DETAIL] = (f"applications={json.dumps(plan.deployed)} removed={json.dumps(plan.removed)} "
                                f"kept={json.dumps(plan.kept)}")  # fmt: skip
            return await self.forward(request, json.dumps(plan.document).encode())

    async def serve_shutdown(self, request: web.Request) -> web.StreamResponse:
        caller: Caller = request[_CALLER]
        assert caller.user is not None
        if not caller.user.admin:
            return _json(403, {"error": "serve shutdown stops Ray Serve and every user's applications, so only an "
                                        "admin may; to remove your own applications, deploy a config without them "
                                        "(applications: [] removes them all)"})  # fmt: skip
        async with self.serve_lock:
            return await self.forward(request)

    async def rayrack_serve(self, request: web.Request) -> web.Response:
        status, details, raw = await self.upstream.get_json(_SERVE_APPLICATIONS)
        if not isinstance(details, dict):
            return web.Response(status=status if status != 200 else 502, body=raw)
        apps = serve.deployed_apps(details)
        return _json(200, {"applications": [
            {"name": app.name, "user": app.owner, "status": app.status, "route_prefix": app.route_prefix,
             "source": app.source}
            for _, app in sorted(apps.items())
        ]})  # fmt: skip

    async def whoami(self, request: web.Request) -> web.Response:
        caller: Caller = request[_CALLER]
        assert caller.user is not None
        user = caller.user
        return _json(200, {"user": user.name, "admin": user.admin, "max_gpus": user.max_gpus})

    async def rayrack_jobs(self, request: web.Request) -> web.Response:
        status, jobs, raw = await self.upstream.get_json("/api/jobs/")
        if jobs is None or not isinstance(jobs, list):
            return web.Response(status=status if status != 200 else 502, body=raw)
        return _json(200, {"jobs": [_summary(job) for job in jobs if isinstance(job, dict)]})

    async def healthy(self, request: web.Request) -> web.Response:
        return web.Response(text="OK")

    async def not_found(self, request: web.Request) -> web.Response:
        return _json(404, {"error": "not found"})

    async def close_tails(self, app: web.Application) -> None:
        for ws in list(self.tails):
            await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"gateway shutting down")


def _summary(job: dict[str, Any]) -> dict[str, Any]:
    gpus = job.get("entrypoint_num_gpus")
    return {
        "job_id": job.get("job_id"),
        "submission_id": job.get("submission_id"),
        "user": _owner(job),
        "status": job.get("status"),
        "start_time": job.get("start_time"),
        "end_time": job.get("end_time"),
        "entrypoint_num_gpus": float(gpus) if isinstance(gpus, int | float) and not isinstance(gpus, bool) else None,
    }


async def _relay(upstream: aiohttp.ClientWebSocketResponse, client: web.WebSocketResponse) -> None:
    """Copy messages both ways until one side closes, then close the other with the same code."""

    async def up() -> None:
        async for msg in client:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await upstream.send_str(msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await upstream.send_bytes(msg.data)
        await upstream.close()  # the client left: this ends the loop below

    upward = asyncio.ensure_future(up())
    try:
        async for msg in upstream:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await client.send_str(msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await client.send_bytes(msg.data)
    finally:
        # No reader may be waiting on the client when it is closed: close() then waits for the client's own
        # close frame. Otherwise the TLS connection ends at once, and the client's answer fails on a closing
        # transport, which Ray's SDK reports as an abnormal closure (1006) of a job that finished well.
        upward.cancel()
        await asyncio.gather(upward, return_exceptions=True)
    if not client.closed:
        await client.close(code=upstream.close_code or aiohttp.WSCloseCode.OK)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def build_app(users: Users, upstream: Upstream) -> web.Application:
    gateway = Gateway(users, upstream)
    if not len(users):
        log.error("no users are configured: every request is refused until users.json lists some")

    # Which handlers accept which callers; a route not listed here is a 404 before any token is read.
    user_routes: list[tuple[str, str, Handler]] = [
        ("GET", "/api/version", gateway.passthrough),
        ("GET", "/api/jobs/", gateway.passthrough),
        ("POST", "/api/jobs/", gateway.submit),
        ("GET", "/api/jobs/{job_id}", gateway.passthrough),
        ("DELETE", "/api/jobs/{job_id}", gateway.owned),
        ("GET", "/api/jobs/{job_id}/logs", gateway.owned),
        ("GET", "/api/jobs/{job_id}/logs/tail", gateway.tail),
        ("POST", "/api/jobs/{job_id}/stop", gateway.owned),
        ("GET", "/api/packages/{protocol}/{name}", gateway.passthrough),
        ("PUT", "/api/packages/{protocol}/{name}", gateway.put_package),
        # Serve's CLI checks this version path before each call (the jobs SDK asks /api/version).
        ("GET", "/api/ray/version", gateway.passthrough),
        ("GET", _SERVE_APPLICATIONS, gateway.passthrough),
        ("PUT", _SERVE_APPLICATIONS, gateway.serve_deploy),
        ("DELETE", _SERVE_APPLICATIONS, gateway.serve_shutdown),
        ("GET", "/api/rayrack/whoami", gateway.whoami),
    ]
    cluster_routes: list[tuple[str, str, Handler]] = [
        ("GET", "/api/rayrack/jobs", gateway.rayrack_jobs),
        ("GET", "/api/rayrack/serve", gateway.rayrack_serve),
    ]

    def guarded(handler: Handler, allow_cluster: bool) -> Handler:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            if not len(users):
                return _json(503, {"error": "no users are configured on this gateway"})
            caller = gateway.authenticate(request, allow_cluster)
            if caller is None:
                return _unauthorized()
            if any(value in (".", "..") for value in request.match_info.values()):
                return _json(404, {"error": "not found"})  # a dot segment would climb out of the route
            request[_CALLER] = caller
            return await handler(request)

        return wrapped

    app = web.Application(middlewares=[_access_log, _upstream_errors], client_max_size=_MAX_BODY)
    for method, path, handler in user_routes:
        app.router.add_route(method, path, guarded(handler, allow_cluster=False))
    for method, path, handler in cluster_routes:
        app.router.add_route(method, path, guarded(handler, allow_cluster=True))
    app.router.add_get("/-/healthy", gateway.healthy)
    app.router.add_route("*", "/{tail:.*}", gateway.not_found)

    async def start(app: web.Application) -> None:
        await upstream.start()

    async def stop(app: web.Application) -> None:
        await upstream.close()

    app.on_startup.append(start)
    app.on_shutdown.append(gateway.close_tails)
    app.on_cleanup.append(stop)
    return app


@web.middleware
async def _access_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One line per request: who, what, the answer, how long. The path only: never a header or a query."""
    started = time.monotonic()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as err:
        status = err.status
        raise
    finally:
        caller = request.get(_CALLER)
        detail = request.get(_DETAIL)
        log.info(
            "user=%s method=%s path=%s status=%d duration=%.3fs%s",
            caller.name if isinstance(caller, Caller) else "-",
            request.method,
            request.path,
            status,
            time.monotonic() - started,
            f" {detail}" if detail else "",
        )


@web.middleware
async def _upstream_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except (TimeoutError, aiohttp.ServerTimeoutError):
        log.warning("Ray's dashboard did not answer %s %s in time", request.method, request.path)
        return _json(504, {"error": "Ray's dashboard did not answer in time"})
    except aiohttp.ClientConnectionError as err:
        log.warning("Ray's dashboard is unreachable for %s %s: %s", request.method, request.path, err)
        return _json(502, {"error": "Ray's dashboard is unreachable"})

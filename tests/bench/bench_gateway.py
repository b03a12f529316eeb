"""Benchmark of rayrack-gateway; run as `python tests/bench/bench_gateway.py` (about a minute).

One local Ray head with token auth (loopback, --num-gpus 2 counted only) and the gateway in front of it over
TLS with a throwaway CA, as a researcher reaches it. Measures, through the gateway (a user token) and direct to
the dashboard (the cluster token), in the same run:
  1. 1,000 `GET /api/jobs/` at concurrency 20 on kept-alive connections, the paths taking turns of 100:
     p50 and p99 latency.
     Goal: gateway p99 <= 1.5 x direct p99.
  2. 20 submit + status round trips (`POST /api/jobs/` of `true`, then `GET /api/jobs/{id}`), the two paths
     taking turns so both see the same job list: p50 and p99. Goal: gateway p99 <= 1.5 x direct p99.
  3. The gateway process's RSS after all that, its CPU time per proxied GET, and its start-up time to its
     first answer (goal: < 2 s).
On a machine with few cores the client, the gateway and Ray's dashboard share them, so the gateway's own CPU
per request shows in the latency ratio; the CPU figure says how much of it is the gateway's.
Exits 0 whatever the outcome; each line says PASS or MISS.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from gateway.support import Gateway, RayHead, make_accounts, make_pki, write_users  # noqa: E402

LIST_REQUESTS = 1000
LIST_CONCURRENCY = 20
LIST_TURN = 100
ROUND_TRIPS = 20
GOAL_RATIO = 1.5
RESULTS: list[tuple[str, str, bool]] = []


def report(name: str, measured: str, goal: str, ok: bool) -> None:
    RESULTS.append((name, measured, ok))
    print(f"{'PASS' if ok else 'MISS'}  {name}: {measured}   (goal: {goal})", flush=True)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def describe(values: list[float]) -> str:
    return f"p50 {percentile(values, 0.5) * 1000:.1f} ms, p99 {percentile(values, 0.99) * 1000:.1f} ms"


class Route:
    """One way to reach the Jobs API: a base URL, a token and the TLS context to verify it with."""

    def __init__(self, name: str, url: str, token: str, context: ssl.SSLContext | None) -> None:
        self.name = name
        self.url = url
        self.headers = {"Authorization": f"Bearer {token}"}
        self.context = context

    def session(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=LIST_CONCURRENCY, ssl=self.context if self.context else False)
        return aiohttp.ClientSession(connector=connector, headers=self.headers)


async def list_latencies(path: Route, count: int) -> list[float]:
    latencies: list[float] = []
    queue = iter(range(count))
    async with path.session() as session:

        async def worker() -> None:
            for _ in queue:
                started = time.perf_counter()
                async with session.get(f"{path.url}/api/jobs/") as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"{path.name}: GET /api/jobs/ answered {resp.status}")
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(worker() for _ in range(LIST_CONCURRENCY)))
    return latencies


async def round_trips(paths: list[Route], count: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {p.name: [] for p in paths}
    sessions = {p.name: p.session() for p in paths}
    try:
        for _ in range(count):
            for path in paths:
                session = sessions[path.name]
                started = time.perf_counter()
                async with session.post(f"{path.url}/api/jobs/", json={"entrypoint": "true"}) as resp:
                    body = await resp.json()
                    if resp.status != 200:
                        raise RuntimeError(f"{path.name}: submit answered {resp.status}: {body}")
                async with session.get(f"{path.url}/api/jobs/{body['submission_id']}") as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"{path.name}: status answered {resp.status}")
                times[path.name].append(time.perf_counter() - started)
    finally:
        for session in sessions.values():
            await session.close()
    return times


async def measure(direct: Route, gateway: Route, gateway_pid: int) -> None:
    for path in (direct, gateway):  # warm both: connections, Ray's caches
        await list_latencies(path, 100)
    # In turns of 100, so that whatever else runs on this machine weighs on both paths alike.
    lists: dict[str, list[float]] = {direct.name: [], gateway.name: []}
    gateway_cpu = 0.0
    for _ in range(LIST_REQUESTS // LIST_TURN):
        for path in (direct, gateway):
            cpu = cpu_seconds(gateway_pid)
            lists[path.name] += await list_latencies(path, LIST_TURN)
            if path is gateway:
                gateway_cpu += cpu_seconds(gateway_pid) - cpu
    for path in (direct, gateway):
        print(f"      GET /api/jobs/ x{LIST_REQUESTS} at {LIST_CONCURRENCY}, {path.name}: {describe(lists[path.name])}")
    print(f"      gateway CPU per GET: {gateway_cpu / LIST_REQUESTS * 1000:.2f} ms")
    ratio_p50 = percentile(lists["gateway"], 0.5) / percentile(lists["direct"], 0.5)
    ratio = percentile(lists["gateway"], 0.99) / percentile(lists["direct"], 0.99)
    report("GET /api/jobs/ gateway/direct", f"p50 {ratio_p50:.2f}x, p99 {ratio:.2f}x", f"p99 <= {GOAL_RATIO}x",
           ratio <= GOAL_RATIO)  # fmt: skip
    await round_trips([direct, gateway], 1)  # the cluster's first job starts its job agent: not a path's cost
    trips = await round_trips([direct, gateway], ROUND_TRIPS)
    for name, values in trips.items():
        print(f"      submit+status x{ROUND_TRIPS}, {name}: {describe(values)}")
    ratio_p50 = percentile(trips["gateway"], 0.5) / percentile(trips["direct"], 0.5)
    ratio = percentile(trips["gateway"], 0.99) / percentile(trips["direct"], 0.99)
    report("submit+status gateway/direct", f"p50 {ratio_p50:.2f}x, p99 {ratio:.2f}x", f"p99 <= {GOAL_RATIO}x",
           ratio <= GOAL_RATIO)  # fmt: skip


def main() -> int:
    print(f"rayrack-gateway benchmark, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        workdir = Path(tmp)
        head = RayHead(workdir / "head")
        head.start()
        gw: Gateway | None = None
        try:
            pki = make_pki(workdir / "pki")
            accounts = make_accounts(workdir / "tokens", [("alice", False, None)])
            users = write_users(workdir / "users.json", accounts.values())
            gw = Gateway(workdir / "gateway", head.dashboard_url, users, head.token_file, pki)
            gw.start()
            report("gateway start-up to first answer", f"{gw.startup_seconds:.2f} s", "< 2 s", gw.startup_seconds < 2)
            context = ssl.create_default_context(cafile=str(pki.ca_cert))
            asyncio.run(measure(Route("direct", head.dashboard_url, head.token, None),
                                Route("gateway", gw.url, accounts["alice"].token, context), gw.pid))  # fmt: skip
            rss = gw.rss_bytes() / 2**20
            print(f"      gateway RSS after the run: {rss:.1f} MiB", flush=True)
        finally:
            if gw is not None:
                gw.stop()
            head.stop()
    missed = [name for name, _, ok in RESULTS if not ok]
    print(
        f"{len(RESULTS) - len(missed)}/{len(RESULTS)} goals met" + (f"; missed: {', '.join(missed)}" if missed else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

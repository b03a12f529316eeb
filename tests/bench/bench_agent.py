"""Benchmark of the agent against its goals; run as `python tests/bench/bench_agent.py` (about a minute).

Measures, all on 127.0.0.1 with the fake backend:
  1. CPU time per scrape at 8, 64 and 256 GPUs, against bare prometheus_client serialising the same samples
     with ordinary Gauge/Counter objects. Goal: agent <= 3 x bare + 2 ms.
  2. RSS of a real agent process with 8 GPUs. Goal: <= 60 MiB.
  3. CPU share of that process with 1 s collection and a scrape every 15 s, over a 30 s window read from
     /proc/<pid>/stat. Goal: <= 1 % of one core.
  4. /metrics p99 latency while one GPU hangs for 60 s, against a healthy agent. Goal: ratio <= 2.
  5. Peers on one simulated 8-GPU node (the simulated libnvidia-ml.so.1, `make nvml-sim`, serving the
     demo-8gpu scenario; with `--nvml real`, or `make bench-agent BENCH_AGENT_NVML=real`, this machine's own
     GPUs through its libnvidia-ml.so.1): the agent with its NVML backend, nvitop-exporter and a `ray start --head
     --num-gpus 8` node's metrics endpoint (Ray's dashboard agent, which reads GPUs through pynvml too), all
     running at once with a 1 s collection interval. For each: CPU per scrape (a burst of scrapes, less the
     process's idle CPU over the same time), idle CPU share and RSS, with the ratios peer / ours.
     Goal: ours costs no more than either peer per scrape and in RSS.
Exits 0 whatever the outcome; each line says PASS or MISS.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import psutil  # noqa: E402  (a Ray dependency, present wherever the bench runs)
from prometheus_client import Counter, Gauge, disable_created_metrics, generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from prometheus_client.registry import CollectorRegistry  # noqa: E402

from ray_agent.clock import FakeClock  # noqa: E402
from ray_agent.config import CollectionConfig, ExporterConfig  # noqa: E402
from ray_agent.exporter import SnapshotCollector  # noqa: E402
from ray_agent.gpu.fake import fake_from_mapping  # noqa: E402
from ray_agent.sampler import Sampler  # noqa: E402

CPU_WINDOW_SECONDS = 30.0
SCRAPE_EVERY_SECONDS = 15.0
LATENCY_SCRAPES = 500
RESULTS: list[tuple[str, str, bool]] = []


def report(name: str, measured: str, goal: str, ok: bool) -> None:
    RESULTS.append((name, measured, ok))
    print(f"{'PASS' if ok else 'MISS'}  {name}: {measured}   (goal: {goal})", flush=True)


def gpu(index: int, hang: bool = False) -> dict:
    entry = {
        "model": "NVIDIA A100-SXM4-80GB",
        "memory_total": "80GiB",
        "utilization": [{"for": "30s", "value": 0.9}, {"for": "30s", "value": 0.1}],
        "power_watts": 300,
        "nvlink_tx_bytes_per_second": 1e10,
        "nvlink_rx_bytes_per_second": 1e10,
        "processes": [
            {"pid": 10_000 + 2 * index, "user": "alice", "memory": "30GiB"},
            {"pid": 10_001 + 2 * index, "user": "bob", "memory": "10GiB"},
        ],
    }
    if hang:
        entry["faults"] = [{"call": "memory", "error": "hang", "until": "60s"}]
    return entry


def scenario(count: int, hang_index: int | None = None) -> dict:
    return {"gpus": [gpu(i, hang=i == hang_index) for i in range(count)]}


# --- 1. scrape cost ---------------------------------------------------------------------------------


def bare_registry(exposition: str) -> CollectorRegistry:
    """The same samples held in ordinary prometheus_client metrics, as a hand-written exporter would."""
    registry = CollectorRegistry(auto_describe=False)
    for family in text_string_to_metric_families(exposition):
        labels = sorted({k for s in family.samples for k in s.labels})
        if family.type == "counter":
            metric = Counter(family.name, family.documentation or "x", labels, registry=registry)
            for s in family.samples:
                (metric.labels(**s.labels) if labels else metric).inc(s.value)
        else:
            metric = Gauge(family.name, family.documentation or "x", labels, registry=registry)
            for s in family.samples:
                (metric.labels(**s.labels) if labels else metric).set(s.value)
    return registry


def cpu_per_call(fn, minimum_seconds: float = 1.0) -> float:
    fn()  # warm caches
    calls = 0
    started = time.process_time()
    while True:
        fn()
        calls += 1
        spent = time.process_time() - started
        if spent >= minimum_seconds and calls >= 5:
            return spent / calls


def bench_scrape_cost() -> None:
    disable_created_metrics()
    for count in (8, 64, 256):
        clock = FakeClock()
        backend = fake_from_mapping(scenario(count), clock)
        sampler = Sampler(backend, None, CollectionConfig(interval=1, call_timeout=1), clock)
        sampler.collect_once()
        ours = CollectorRegistry(auto_describe=False)
        ours.register(SnapshotCollector(sampler.latest, ExporterConfig(hostname="bench"), 3600, clock))
        exposition = generate_latest(ours).decode()
        bare = bare_registry(exposition)
        series = sum(1 for line in exposition.splitlines() if line and not line.startswith("#"))
        agent_cpu = cpu_per_call(lambda ours=ours: generate_latest(ours))
        bare_cpu = cpu_per_call(lambda bare=bare: generate_latest(bare))
        sampler.stop()
        limit = 3 * bare_cpu + 0.002
        report(
            f"scrape CPU at {count} GPUs ({series} series)",
            f"{agent_cpu * 1e3:.2f} ms vs bare {bare_cpu * 1e3:.2f} ms (ratio {agent_cpu / bare_cpu:.2f})",
            "<= 3 x bare + 2 ms",
            agent_cpu <= limit,
        )


# --- real agent processes ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Agent:
    def __init__(
        self, workdir: Path, name: str, gpus: dict | None, interval: str, env: dict[str, str] | None = None
    ) -> None:
        """`gpus`: a fake-backend scenario; None reads GPUs through NVML (with `env` naming the library)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/metrics"
        gpu: dict = {"backend": "nvml"}
        if gpus is not None:
            scenario_path = workdir / f"{name}.scenario.yml"
            scenario_path.write_text(yaml.safe_dump(gpus))
            gpu = {"backend": "fake", "fake_scenario": str(scenario_path)}
        config = workdir / f"{name}.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "web": {"listen_address": f"127.0.0.1:{self.port}"},
                    "gpu": gpu,
                    "collection": {"interval": interval, "call_timeout": "500ms"},
                    # Attribution on, as deployed, against a local port where no Ray answers.
                    "attribution": {"dashboard_url": f"http://127.0.0.1:{free_port()}", "ttl": "10s"},
                }
            )
        )
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ray_agent.cli", "--config.file", str(config), "--log.level", "error"],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if b"rayrack_gpu_up" in self.scrape():
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"agent {name} did not start")

    def scrape(self) -> bytes:
        with urllib.request.urlopen(self.url, timeout=10) as response:
            return response.read()

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        utime, stime = int(fields[11]), int(fields[12])
        return (utime + stime) / os.sysconf("SC_CLK_TCK")

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def p99(latencies: list[float]) -> float:
    return statistics.quantiles(latencies, n=100)[98]


def bench_hang_latency(workdir: Path) -> None:
    # Both agents run at once and are scraped alternately, so background load hits both equally.
    healthy = Agent(workdir, "healthy", scenario(8), "1s")
    hung = Agent(workdir, "hung", scenario(8, hang_index=3), "1s")
    try:
        time.sleep(1.5)
        body = hung.scrape().decode()
        assert 'rayrack_gpu_up{gpu="3"' in body and "DEADLINE_EXCEEDED" in body, "GPU 3 should be hung"
        timings: dict[str, list[float]] = {"healthy": [], "hung": []}
        for i in range(LATENCY_SCRAPES):
            pair = [("healthy", healthy), ("hung", hung)]
            for name, agent in pair if i % 2 else reversed(pair):
                started = time.perf_counter()
                agent.scrape()
                timings[name].append(time.perf_counter() - started)
        still_hung = (
            'rayrack_gpu_read_errors_total{error="DEADLINE_EXCEEDED",gpu="3"}' in hung.scrape().decode()
        )
    finally:
        healthy.stop()
        hung.stop()
    healthy_p99, hung_p99 = p99(timings["healthy"]), p99(timings["hung"])
    ratio = hung_p99 / healthy_p99
    report(
        "/metrics p99 with one GPU hanging vs healthy (8 GPUs)",
        f"{hung_p99 * 1e3:.2f} ms vs {healthy_p99 * 1e3:.2f} ms (ratio {ratio:.2f}, "
        f"hang active: {still_hung})",
        "ratio <= 2",
        ratio <= 2 and still_hung,
    )


def bench_process_footprint(workdir: Path) -> None:
    agent = Agent(workdir, "footprint", scenario(8), "1s")
    try:
        time.sleep(3)  # past start-up work, a few collections done
        agent.scrape()
        before = agent.cpu_seconds()
        started = time.monotonic()
        next_scrape = started + SCRAPE_EVERY_SECONDS
        while (now := time.monotonic()) < started + CPU_WINDOW_SECONDS:
            if now >= next_scrape:
                agent.scrape()
                next_scrape += SCRAPE_EVERY_SECONDS
            time.sleep(min(0.5, max(0.0, started + CPU_WINDOW_SECONDS - now)))
        elapsed = time.monotonic() - started
        share = (agent.cpu_seconds() - before) / elapsed
        rss = agent.rss_bytes()
    finally:
        agent.stop()
    report(
        f"CPU share at 8 GPUs, 1 s collection, 15 s scrapes ({elapsed:.0f} s window)",
        f"{share * 100:.2f} % of a core",
        "<= 1 %",
        share <= 0.01,
    )
    report("RSS of the agent at 8 GPUs", f"{rss / 2**20:.1f} MiB", "<= 60 MiB", rss <= 60 * 2**20)


# --- 5. peers on simulated (or real) GPUs ---------------------------------------------------------------------

PEER_BURST_SCRAPES = 40
PEER_IDLE_SECONDS = 10.0
# A Ray head needs 30-60 s to come up on 2 busy cores.
PEER_START_SECONDS = 150.0


def wait_for(url: str, needle: bytes, name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if needle in response.read():
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{name}: {needle.decode()} did not appear on {url} within {timeout:.0f} s")


def listener(port: int) -> psutil.Process:
    for conn in psutil.net_connections("tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
            return psutil.Process(conn.pid)
    raise RuntimeError(f"nothing listens on port {port}")


class Peer:
    """One exporter process: the process serving `url` is the one measured."""

    def __init__(self, name: str, url: str, process: psutil.Process) -> None:
        self.name, self.url, self.process = name, url, process

    def cpu(self) -> float:
        times = self.process.cpu_times()
        return times.user + times.system

    def scrape(self) -> int:
        with urllib.request.urlopen(self.url, timeout=30) as response:
            return len(response.read())


def stop_tree(root: subprocess.Popen) -> None:
    """Stop a process we started and every process it started, by pid (never `ray stop`: it would also
    stop Ray nodes this benchmark did not start)."""
    try:
        parent = psutil.Process(root.pid)
        procs = [*parent.children(recursive=True), parent]
    except psutil.NoSuchProcess:
        procs = []
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=15)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    root.wait()


def simulated_node(workdir: Path) -> tuple[dict[str, str], int, bytes]:
    """The simulated 8-GPU node: (environment naming the library and scenario, GPU count, model name)."""
    library = REPO / "build" / "nvml-sim" / "libnvidia-ml.so.1"
    subprocess.run(["make", "--no-print-directory", "-C", str(REPO), "nvml-sim"], check=True, stdout=subprocess.DEVNULL)
    config = workdir / "nvml-sim.conf"
    subprocess.run(
        [sys.executable, "-m", "ray_agent.cli", "nvml-sim", "compile", "builtin:demo-8gpu", str(config)],
        cwd=REPO,
        check=True,
    )
    env = {**os.environ, "LD_LIBRARY_PATH": str(library.parent), "RAYRACK_NVML_SCENARIO": str(config)}
    return env, 8, b"A100-SXM4-80GB"


def real_node() -> tuple[dict[str, str], int, bytes]:
    """This machine's own GPUs through the system's libnvidia-ml.so.1."""
    import pynvml

    pynvml.nvmlInit()
    try:
        count = pynvml.nvmlDeviceGetCount()
        name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0)) if count else ""
    finally:
        pynvml.nvmlShutdown()
    if not count:
        raise RuntimeError("the system's NVML lists no GPU")
    env = {key: value for key, value in os.environ.items() if key != "RAYRACK_NVML_SCENARIO"}
    return env, count, (name.decode() if isinstance(name, bytes) else name).encode()


def bench_peers(workdir: Path, nvml: str) -> None:
    env, count, model = simulated_node(workdir) if nvml == "sim" else real_node()
    what = f"{count} {'simulated' if nvml == 'sim' else 'real'} GPUs"
    last = str(count - 1).encode()
    bin_dir = Path(sys.executable).parent
    # A peer that is not installed is a MISS line, not the end of the benchmark (a GPU machine may lack Ray).
    commands = {name: shutil.which(name, path=f"{bin_dir}:{os.environ.get('PATH', '')}")
                for name in ("ray", "nvitop-exporter")}
    for name, command in commands.items():
        if command is None:
            report(f"{what}: ray-agent vs {name}", "not installed", "a peer to compare with", False)
    nvitop_port, ray_metrics_port = free_port(), free_port()
    started: list[subprocess.Popen] = []
    ours = None
    ray_dir = Path(tempfile.mkdtemp(prefix="rb-", dir="/tmp"))  # short: Ray's socket paths must fit
    ray_log = (workdir / "ray-start.log").open("wb")
    try:
        # Ray first: it takes longest to come up.
        if commands["ray"]:
            started.append(
                subprocess.Popen(
                    [commands["ray"], "start", "--head", "--block", "--num-gpus", str(count), "--num-cpus", "1",
                     "--port", str(free_port()), "--metrics-export-port", str(ray_metrics_port),
                     "--dashboard-port", str(free_port()), "--include-dashboard", "false",
                     "--temp-dir", str(ray_dir), "--disable-usage-stats"],
                    env=env, stdout=ray_log, stderr=subprocess.STDOUT, start_new_session=True,
                )
            )
        if commands["nvitop-exporter"]:
            started.append(
                subprocess.Popen(
                    [commands["nvitop-exporter"], "--bind-address", "127.0.0.1", "--port", str(nvitop_port),
                     "--interval", "1"],
                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
            )
        ours = Agent(workdir, "peers", None, "1s", env=env)
        wait_for(ours.url, b'rayrack_gpu_up{gpu="' + last, "ray-agent", 30)
        peers = [Peer("ray-agent", ours.url, psutil.Process(ours.process.pid))]
        if commands["nvitop-exporter"]:
            nvitop_url = f"http://127.0.0.1:{nvitop_port}/metrics"
            wait_for(nvitop_url, b'index="' + last, "nvitop-exporter", 60)
            peers.append(Peer("nvitop-exporter", nvitop_url, listener(nvitop_port)))
        if commands["ray"]:
            ray_url = f"http://127.0.0.1:{ray_metrics_port}/metrics"
            wait_for(ray_url, b'GpuIndex="' + last, "ray", PEER_START_SECONDS)
            peers.append(Peer("ray (dashboard agent)", ray_url, listener(ray_metrics_port)))
        # Every endpoint reads the GPUs through NVML: the model's name, or our GPU identity series.
        for peer in peers:
            body = urllib.request.urlopen(peer.url, timeout=30).read()
            assert model in body or b"rayrack_gpu_info{" in body, f"{peer.name}: no {what}"
        time.sleep(2)
        idle_before = [p.cpu() for p in peers]
        time.sleep(PEER_IDLE_SECONDS)
        idle_rate = [(p.cpu() - b) / PEER_IDLE_SECONDS for p, b in zip(peers, idle_before, strict=True)]
        results = []
        for peer, rate in zip(peers, idle_rate, strict=True):
            peer.scrape()
            before, wall = peer.cpu(), time.monotonic()
            size = sum(peer.scrape() for _ in range(PEER_BURST_SCRAPES)) // PEER_BURST_SCRAPES
            spent = peer.cpu() - before - rate * (time.monotonic() - wall)
            results.append((peer, max(spent, 0.0) / PEER_BURST_SCRAPES, rate, peer.process.memory_info().rss, size))
    finally:
        if ours is not None:
            ours.stop()
        for proc in reversed(started):
            stop_tree(proc)
        ray_log.close()
        shutil.rmtree(ray_dir, ignore_errors=True)
    base = results[0]
    for peer, per_scrape, rate, rss, size in results:
        print(
            f"      {peer.name:22s} CPU/scrape {per_scrape * 1e3:6.2f} ms   idle CPU {rate * 100:5.2f} %   "
            f"RSS {rss / 2**20:6.1f} MiB   /metrics {size / 1024:6.1f} KiB"
            + ("" if peer is base[0] else
               f"   ratio to ours: CPU/scrape {per_scrape / max(base[1], 1e-9):.2f}, RSS {rss / base[3]:.2f}"),
            flush=True,
        )
    for peer, per_scrape, _, rss, _ in results[1:]:
        cpu_ratio = per_scrape / max(base[1], 1e-9)
        report(
            f"{what}: ray-agent vs {peer.name}",
            f"CPU/scrape {base[1] * 1e3:.2f} vs {per_scrape * 1e3:.2f} ms (ratio {cpu_ratio:.2f}), "
            f"RSS {base[3] / 2**20:.0f} vs {rss / 2**20:.0f} MiB (ratio {rss / base[3]:.2f})",
            "ours <= peer on both",
            base[1] <= per_scrape and base[3] <= rss,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="ray-agent benchmark (see the module's docstring)")
    parser.add_argument("--nvml", choices=("sim", "real"), default="sim",
                        help="the peers' GPUs: the simulated library's demo-8gpu (default), or this machine's own "
                             "through its libnvidia-ml.so.1")
    args = parser.parse_args(argv)
    started = time.monotonic()
    print(f"ray-agent benchmark, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, NVML {args.nvml}", flush=True)
    bench_scrape_cost()
    with tempfile.TemporaryDirectory(prefix="ray-agent-bench-") as tmp:
        bench_hang_latency(Path(tmp))
        bench_process_footprint(Path(tmp))
        bench_peers(Path(tmp), args.nvml)
    missed = [name for name, _, ok in RESULTS if not ok]
    print(
        f"{len(RESULTS) - len(missed)} of {len(RESULTS)} goals met in {time.monotonic() - started:.0f} s"
        + (f"; missed: {', '.join(missed)}" if missed else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

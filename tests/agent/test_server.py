"""The real HTTP(S) server on 127.0.0.1: served while a GPU hangs, port conflicts, TLS and client certs; the
default listen address from the routing table."""

from __future__ import annotations

import ipaddress
import socket
import ssl
from pathlib import Path

import pytest
import yaml
from prometheus_client.registry import CollectorRegistry

from agent.support import PROC_FIXTURE, http_get, sample_value
from ray_agent.clock import FakeClock
from ray_agent.config import CollectionConfig, ExporterConfig, TlsConfig
from ray_agent.exporter import SnapshotCollector
from ray_agent.gpu.fake import FakeBackend, parse_scenario
from ray_agent.sampler import Sampler
from ray_agent.server import ListenError, MetricsServer, default_route_address


def registry_for(sampler: Sampler, clock: FakeClock | None = None) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(sampler.latest, ExporterConfig(hostname="h"), 3600, clock))
    return registry


def test_metrics_are_served_while_a_gpu_hangs() -> None:
    clock = FakeClock()
    text = yaml.safe_dump(
        {
            "gpus": [
                {"model": "A", "memory_total": "8GiB"},
                {"model": "B", "memory_total": "8GiB", "faults": [{"call": "memory", "error": "hang"}]},
            ]
        }
    )
    backend = FakeBackend(parse_scenario(text), clock)
    sampler = Sampler(
        backend,
        None,
        CollectionConfig(interval=0.1, call_timeout=0.05, backend_retry_interval=1),
        clock,
    )
    server = MetricsServer(registry_for(sampler, clock), "127.0.0.1", 0)
    server.start()
    sampler.start()
    try:
        assert sampler.wait_for(3, timeout=10) is not None
        for _ in range(5):
            status, body = http_get(f"http://127.0.0.1:{server.bound_port}/metrics", timeout=10)
            assert status == 200
            assert sample_value(body, "rayrack_gpu_up", gpu="0") == 1
            assert sample_value(body, "rayrack_gpu_up", gpu="1") == 0
            assert (
                sample_value(body, "rayrack_gpu_read_errors_total", gpu="1", error="DEADLINE_EXCEEDED") >= 1
            )
        # Every scrape above was answered while the GPU's call was still stuck.
        assert sampler._gpu_lanes[1].busy
    finally:
        server.stop()
        sampler.stop()


def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = MetricsServer(CollectorRegistry(), "127.0.0.1", port)
        with pytest.raises(
            ListenError, match=rf"cannot listen on 127\.0\.0\.1:{port}: the port is already in use"
        ):
            server.start()


def test_default_route_address() -> None:
    with pytest.raises(ListenError, match="no default route"):
        default_route_address(PROC_FIXTURE)
    try:
        address = default_route_address()
    except ListenError:
        pytest.skip("this machine has no default route")
    assert not ipaddress.ip_address(address).is_unspecified


def test_address_not_on_this_host() -> None:
    # TEST-NET-1: never assigned to a local interface; binding fails before anything is sent.
    with pytest.raises(ListenError, match="not on this host"):
        MetricsServer(CollectorRegistry(), "192.0.2.1", 0).start()


def tls_server(pki: Path, require_client_cert: bool) -> MetricsServer:
    clock = FakeClock()
    backend = FakeBackend(parse_scenario("gpus: [{model: A, memory_total: 1GiB}]"), clock)
    sampler = Sampler(backend, None, CollectionConfig(), clock)
    sampler.collect_once()
    tls = TlsConfig(
        pki / "server.crt",
        pki / "server.key",
        pki / "ca.crt" if require_client_cert else None,
        require_client_cert,
    )
    server = MetricsServer(registry_for(sampler, clock), "127.0.0.1", 0, tls)
    server.start()
    return server


def test_tls(pki: Path) -> None:
    server = tls_server(pki, require_client_cert=False)
    try:
        context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        status, body = http_get(f"https://127.0.0.1:{server.bound_port}/metrics", context=context)
        assert status == 200 and sample_value(body, "rayrack_gpu_up", gpu="0") == 1
        with pytest.raises(OSError):
            http_get(f"http://127.0.0.1:{server.bound_port}/metrics", timeout=5)
        # The server keeps serving TLS clients after a plain-text one was turned away.
        assert http_get(f"https://127.0.0.1:{server.bound_port}/metrics", context=context)[0] == 200
    finally:
        server.stop()


def test_client_certificates(pki: Path) -> None:
    server = tls_server(pki, require_client_cert=True)
    url = f"https://127.0.0.1:{server.bound_port}/metrics"
    try:
        anonymous = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        with pytest.raises(OSError):
            http_get(url, context=anonymous, timeout=5)
        known = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        known.load_cert_chain(pki / "client.crt", pki / "client.key")
        assert http_get(url, context=known)[0] == 200
    finally:
        server.stop()


def test_unusable_certificate_is_a_listen_error(tmp_path: Path) -> None:
    (tmp_path / "bad.crt").write_text("not a certificate")
    tls = TlsConfig(tmp_path / "bad.crt", tmp_path / "bad.crt")
    with pytest.raises(ListenError, match="Cannot load server certificate"):
        MetricsServer(CollectorRegistry(), "127.0.0.1", 0, tls).start()

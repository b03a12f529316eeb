"""The nftables table the firewall role writes, rendered by Ansible from the role and checked by the real `nft -c`.

The inventory is one whose nodes talk to each other on a cluster network (ray_node_ip) apart from the address
Ansible reaches them at: the monitoring host then scrapes from its cluster address, which must be admitted.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import required

from .conftest import run_play, template_play

REPO = Path(__file__).resolve().parents[2]
ROLES = REPO / "roles"
pytestmark = pytest.mark.slow

HOSTS = {
    "head": {"ansible_host": "192.0.2.10", "ray_node_ip": "10.20.0.10"},
    "worker1": {"ansible_host": "192.0.2.11", "ray_node_ip": "10.20.0.11"},
    "worker2": {"ansible_host": "worker2.mgmt.example.org", "ray_node_ip": "10.20.0.12"},
}
PLAY = template_play("{{ firewall_render_host | default('worker1') }}", "firewall", "etc/nftables.d/rayrack.nft.j2")


def render(tmp_path: Path, monitoring: dict | None = None, nfs_server: str | None = None, **settings: object) -> str:
    inventory = {"all": {"vars": {"ansible_connection": "local"}, "children": {
        "ray_head": {"hosts": {"head": HOSTS["head"]}},
        "ray_workers": {"hosts": {name: HOSTS[name] for name in ("worker1", "worker2")}}}}}
    if monitoring:
        inventory["all"]["children"]["monitoring"] = {"hosts": monitoring}
    if nfs_server:
        inventory["all"]["children"]["nfs_server"] = {"hosts": {nfs_server: {}}}
    dest = tmp_path / "rayrack.nft"
    # nft resolves the Ray user of the head's output rule: `nobody` stands in for it, which this machine may lack.
    run_play(tmp_path, inventory, PLAY, {"dest": str(dest), "rayrack_ray_user": "nobody", **settings},
             {})
    return dest.read_text()


def elements(table: str, name: str) -> set[str]:
    match = re.search(rf"set {name} {{[^}}]*?elements = {{ ([^}}]*) }}", table)
    return set(match.group(1).split(", ")) if match else set()


def nft_accepts(table: Path) -> subprocess.CompletedProcess[str]:
    nft = required.binary("nft", "make host-deps")
    if os.geteuid() != 0:
        required.missing("nft -c needs root")
    return subprocess.run([nft, "-c", "-f", str(table)], capture_output=True, text=True, check=False)


def test_nodes_reach_each_other_on_every_tcp_port_by_default(tmp_path):
    table = render(tmp_path)
    assert elements(table, "nodes_ipv4") == {"10.20.0.10/32", "10.20.0.11/32", "10.20.0.12/32"}
    assert "ip saddr @nodes_ipv4 meta l4proto tcp accept" in table
    checked = nft_accepts(tmp_path / "rayrack.nft")
    assert checked.returncode == 0, checked.stderr


def test_pinned_admits_only_the_named_ports(tmp_path):
    table = render(tmp_path, firewall_intra_cluster="pinned")
    assert "@nodes_ipv4 meta l4proto tcp accept" not in table
    # The named ports stay open to the cluster.
    assert re.search(r"ip saddr @cluster_ipv4 tcp dport \{ [^}]*8077", table)


def test_monitoring_host_is_admitted_by_its_cluster_address_too(tmp_path):
    # Prometheus on the head scrapes workers' 10.20.0.x addresses, so its packets come from 10.20.0.10.
    table = render(tmp_path)
    assert {"10.20.0.10/32", "192.0.2.10/32"} <= elements(table, "monitoring_ipv4")


def test_a_monitoring_host_outside_the_ray_nodes_is_admitted(tmp_path):
    table = render(tmp_path, {"mon1": {"ansible_host": "192.0.2.50"}})
    assert elements(table, "monitoring_ipv4") == {"192.0.2.50/32"}
    assert "192.0.2.50/32" not in elements(table, "nodes_ipv4")


def test_gateway_port_open_on_the_head_only_to_the_cluster_and_the_nodes(tmp_path):
    worker = render(tmp_path)
    assert "8443" not in worker
    head = render(tmp_path, firewall_render_host="head")
    assert "ip saddr @cluster_ipv4 tcp dport { 8443 } accept" in head
    assert "ip saddr @nodes_ipv4 tcp dport { 8443 } accept" in head
    checked = nft_accepts(tmp_path / "rayrack.nft")
    assert checked.returncode == 0, checked.stderr
    assert "8443" not in render(tmp_path, firewall_render_host="head", rayrack_gateway_enabled=False)


def test_nfs_is_open_to_the_nodes_and_the_named_clients_only_even_with_a_cluster_network(tmp_path):
    # The allowed set is a whole network; a machine in it that is not a node must not reach NFS.
    settings = {"firewall_render_host": "head", "rayrack_cluster_cidr": "10.20.0.0/16"}
    head = render(tmp_path, nfs_server="head", **settings)
    assert elements(head, "cluster_ipv4") == {"10.20.0.0/16"}
    assert "ip saddr @nfs_clients_ipv4 tcp dport { 2049 } accept" in head
    assert not re.search(r"@cluster_ipv4 tcp dport \{[^}]*2049", head)
    assert elements(head, "nfs_clients_ipv4") == {"10.20.0.10/32", "10.20.0.11/32", "10.20.0.12/32"}
    checked = nft_accepts(tmp_path / "rayrack.nft")
    assert checked.returncode == 0, checked.stderr
    widened = render(tmp_path, nfs_server="head", rayrack_nfs_clients=["10.20.9.0/24"], **settings)
    assert "10.20.9.0/24" in elements(widened, "nfs_clients_ipv4")
    assert "2049" not in render(tmp_path, nfs_server="head", firewall_render_host="worker1")


OUTPUT_RULE = 'oif "lo" meta skuid "{user}" tcp dport {{ 9090, 9093, 3000 }} counter reject with tcp reset'


def test_jobs_are_refused_the_monitoring_ports_on_the_monitoring_host(tmp_path):
    """Jobs run as the Ray user: on the host that runs Prometheus, Alertmanager and Grafana (the head here) its
    packets to those ports through lo (loopback or the host's own addresses) are reset. nft resolves the user
    when it loads the table."""
    head = render(tmp_path, firewall_render_host="head")
    assert "type filter hook output priority filter; policy accept;" in head
    assert OUTPUT_RULE.format(user="nobody") in head
    checked = nft_accepts(tmp_path / "rayrack.nft")
    assert checked.returncode == 0, checked.stderr
    # A user nft cannot resolve fails the check that guards the write (the role checks the user exists first).
    render(tmp_path, firewall_render_host="head", rayrack_ray_user="no-such-user-here")
    assert nft_accepts(tmp_path / "rayrack.nft").returncode != 0
    # Workers run no monitoring API: no output chain there.
    assert "hook output" not in render(tmp_path)


def test_the_output_rule_follows_the_monitoring_group(tmp_path):
    monitoring = {"worker1": HOSTS["worker1"]}
    assert OUTPUT_RULE.format(user="nobody") in render(tmp_path, monitoring)
    assert "hook output" not in render(tmp_path, monitoring, firewall_render_host="head")


def test_the_gcs_store_is_open_to_the_nodes_alone_and_only_rays_user_and_root_may_connect(tmp_path):
    """Redis of the head's GCS (on the head here): its port only from the nodes, never the wider allowed set; on
    every Ray node an output rule resets a connection to it from anyone but root and the Ray user."""
    settings = {"rayrack_gcs_ft": True, "rayrack_cluster_cidr": "10.20.0.0/16"}
    head = render(tmp_path, firewall_render_host="head", **settings)
    assert "ip saddr @nodes_ipv4 tcp dport { 6380 } accept" in head
    assert not re.search(r"@cluster_ipv4 tcp dport \{[^}]*6380", head)
    assert elements(head, "gcs_store_ipv4") == {"10.20.0.10/32"}
    rule = 'ip daddr @gcs_store_ipv4 tcp dport 6380 meta skuid != { 0, "nobody" } counter reject with tcp reset'
    assert rule in head
    checked = nft_accepts(tmp_path / "rayrack.nft")
    assert checked.returncode == 0, checked.stderr
    worker = render(tmp_path, **settings)
    assert "dport { 6380 } accept" not in worker
    assert rule in worker
    assert "6380" not in render(tmp_path, firewall_render_host="head")


def test_serve_is_open_on_every_node_to_its_allowed_sources_and_the_nodes(tmp_path):
    worker = render(tmp_path, rayrack_serve_enabled=True, rayrack_serve_allowed_sources=["198.51.100.0/24"])
    for source in ("serve", "nodes"):
        assert f"ip saddr @{source}_ipv4 tcp dport {{ 8000 }} accept" in worker
    assert elements(worker, "serve_ipv4") == {"198.51.100.0/24"}
    checked = nft_accepts(tmp_path / "rayrack.nft")
    assert checked.returncode == 0, checked.stderr
    # By default the cluster's allowed sources, like the gateway's.
    default = render(tmp_path, rayrack_serve_enabled=True, rayrack_cluster_cidr="10.20.0.0/16")
    assert elements(default, "serve_ipv4") == {"10.20.0.0/16"}
    assert "8000" not in render(tmp_path)

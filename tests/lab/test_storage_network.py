"""Shared tree, sysctl and firewall checks on the converged molecule lab that read best from the lab host."""

import ipaddress
import shlex
import socket
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lab as labtool

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
LAB = labtool.Lab("molecule", 2, ipaddress.IPv4Network("10.213.1.0/24"), REPO / "inventories" / "molecule", 2)
HEAD, WORKER = LAB.nodes[0], LAB.nodes[1]
PROFILE = "/etc/sysctl.d/60-rayrack-network.conf"


@pytest.fixture(scope="module", autouse=True)
def converged_lab():
    if not LAB.known_hosts.exists():
        pytest.fail("the molecule lab is not up: run `make integration` (it converges the lab, then runs these)")


def on(node, command):
    result = labtool.ssh(LAB, node, command, check=False)
    assert result.returncode == 0, f"{node.name}: {command}: {result.stderr[-2000:]}"
    return result.stdout


def profile(node):
    return dict(line.split(" = ", 1) for line in on(node, f"cat {PROFILE}").splitlines() if " = " in line)


def test_kernel_wide_keys_are_written_but_never_reach_the_lab_host():
    written = profile(WORKER)
    for key in ("net.core.rmem_max", "net.core.wmem_max", "net.core.netdev_max_backlog"):
        assert key in written, f"{key} missing from {PROFILE}"
        host_value = Path("/proc/sys", *key.split(".")).read_text().strip()
        assert host_value != written[key], f"{key} = {written[key]} reached the lab host's kernel"


def test_per_namespace_keys_are_live_in_the_node():
    written = profile(WORKER)
    live = on(WORKER, "/usr/sbin/sysctl -n net.core.somaxconn net.ipv4.ip_local_reserved_ports").split("\n")
    assert live[0] == written["net.core.somaxconn"]
    assert live[1] == written["net.ipv4.ip_local_reserved_ports"]


def connect(address, port, timeout=3.0):
    """'open', 'refused' or 'timeout' for a TCP connection from the lab host."""
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return "open"
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "timeout"


def test_ray_ports_refused_from_outside_while_nodes_reach_them():
    started = time.monotonic()
    # The lab host is the network's gateway, outside firewall_allowed_sources (the node addresses).
    assert connect(HEAD.ip, 6379) == "refused"
    assert connect(WORKER.ip, 8077) == "refused"
    assert time.monotonic() - started < 2, "closed ports must be refused at once, not dropped"
    assert connect(HEAD.ip, 22) == "open", "SSH stays open"
    probe = "timeout 5 bash -c {}".format(shlex.quote(f"exec 3<>/dev/tcp/{HEAD.ip}/6379"))
    on(WORKER, probe)
    on(HEAD, "timeout 5 bash -c {}".format(shlex.quote(f"exec 3<>/dev/tcp/{WORKER.ip}/8077")))


def test_the_mtu_check_fails_for_packets_bigger_than_the_path():
    mtu = int(on(WORKER, "cat /sys/class/net/eth0/mtu"))
    on(WORKER, f"sudo ping -M do -c 1 -W 2 -s {mtu - 28} {HEAD.ip}")
    too_big = labtool.ssh(LAB, WORKER, f"sudo ping -M do -c 1 -W 2 -s {mtu - 27} {HEAD.ip}", check=False)
    assert too_big.returncode != 0, "a don't-fragment ping above the MTU must not cross"


def test_a_file_written_on_a_worker_is_read_over_nfs_and_on_the_head():
    name = f"scratch/.rayrack-test-{time.time_ns()}"
    token = str(time.time_ns())
    on(WORKER, f"echo {token} | sudo tee /srv/rayrack-shared/{name} >/dev/null")
    try:
        assert on(HEAD, f"cat /srv/rayrack-shared/{name}").strip() == token
        # As root: the server admits privileged source ports only.
        over_nfs = on(WORKER, f"sudo nfs-cat 'nfs://{HEAD.ip}/srv/rayrack-shared/{name}?version=4'")
        assert over_nfs.strip() == token
    finally:
        on(WORKER, f"sudo rm -f /srv/rayrack-shared/{name}")

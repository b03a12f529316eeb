"""Shared tree, sysctl and firewall checks on the converged molecule lab that read best from the lab host.

The NFS probes are what an attacker inside the cluster network would try: a machine that is not a node
mounting the export, and a user on a node speaking NFS with their own client (libnfs claims any uid).
"""

import ipaddress
import shlex
import socket
import sys
import tempfile
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
SHARED = "/srv/rayrack-shared"
USERS = {user["name"]: user["uid"] for user in labtool.LAB_USERS}


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


def nfs_url(path, **ids):
    query = "".join(f"&{key}={value}" for key, value in ids.items())
    return shlex.quote(f"nfs://{HEAD.ip}{SHARED}/{path}?version=4{query}")


def ray_ids(node):
    uid, gid = on(node, "id -u ray; id -g ray").split()
    return int(uid), int(gid)


def test_a_machine_in_the_cluster_network_that_is_not_a_node_cannot_mount_the_export():
    # An outsider on the lab network (inside rayrack_cluster_cidr), with the nodes' own libnfs client.
    with tempfile.TemporaryDirectory() as tools:
        # nfs-ls and its libnfs (the soname's path, and the file behind it), as the nodes have them.
        found = on(WORKER, "for f in /usr/bin/nfs-ls $(ldd /usr/bin/nfs-ls | awk '/libnfs/ {print $3}'); do "
                           "echo \"$f $(readlink -f \"$f\")\"; done").split("\n")
        mounts = []
        for line in filter(None, found):
            wanted, real = line.split()
            labtool.podman("cp", f"{WORKER.container}:{real}", tools)
            mounts += ["-v", f"{tools}/{Path(real).name}:{Path(real).parent / Path(wanted).name}:ro"]
        outsider = labtool.podman("run", "--rm", "--network", LAB.network, *mounts, labtool.IMAGE, "bash", "-c",
                                  f"hostname -I; timeout 20 nfs-ls {nfs_url('')} 2>&1; echo rc=$?", check=False,
                                  capture=True)
    address, *_ = outsider.stdout.split()
    assert ipaddress.ip_address(address) in LAB.subnet, outsider.stdout
    said = outsider.stdout + outsider.stderr
    # Refused by NFS itself (the firewall resets the connection), not by a client that could not start.
    assert "rc=0" not in said and "packages" not in said and "error while loading" not in said, said
    assert "mount" in said.lower(), said
    # A node reaches the same export.
    assert "packages" in on(WORKER, f"sudo nfs-ls {nfs_url('')}")


def test_a_users_own_nfs_client_cannot_act_as_another_user():
    ray_uid, ray_gid = ray_ids(WORKER)
    name = f"scratch/alice/.planted-{time.time_ns()}.py"
    plant = f"echo 'print(1)' > /tmp/planted.py && nfs-cp /tmp/planted.py {nfs_url(name, uid=ray_uid, gid=ray_gid)}"
    try:
        # Alice, no sudo, claims to be ray (whose group may write her scratch): from an unprivileged port.
        refused = labtool.ssh(LAB, WORKER, f"sudo -u alice bash -c {shlex.quote(plant)}", check=False)
        assert refused.returncode != 0, refused.stdout + refused.stderr
        assert on(HEAD, f"sudo ls -a {SHARED}/scratch/alice").count(".planted-") == 0
        # The control: root on a node (a privileged port) is trusted to tell the truth, as sec=sys does.
        on(WORKER, f"sudo bash -c {shlex.quote(plant)}")
        assert on(HEAD, f"sudo stat -c '%u:%g' {SHARED}/{name}").strip() == f"{ray_uid}:{ray_gid}"
    finally:
        on(HEAD, f"sudo rm -f {SHARED}/{name}")


def test_the_tree_is_laid_out_per_user_and_nothing_is_world_writable():
    listing = on(HEAD, f"sudo find {SHARED} -mindepth 1 -maxdepth 3 -type d -printf '%P %u %g %m\\n'")
    entries = {parts[0]: parts[1:] for parts in (line.split() for line in listing.splitlines()) if parts}
    for user in USERS:
        assert entries[f"scratch/{user}"] == [user, "ray", "2770"], entries
        assert entries[f"ray/working_dirs/{user}"] == [user, "ray", "2750"], entries
    for path in ("models", "models/huggingface", "wheelhouse", "datasets"):
        assert entries[path] == ["root", "rayrack-admins", "2775"], (path, entries)
    open_to_all = [path for path, (_, _, mode) in entries.items() if int(mode, 8) & 0o002]
    assert open_to_all == [], open_to_all


def test_caches_reach_users_logins_but_not_roots():
    user_env = on(WORKER, "sudo -u alice -i env")
    assert f"PIP_FIND_LINKS={SHARED}/packages" in user_env and f"HF_HOME={SHARED}/models/huggingface" in user_env
    root_env = on(WORKER, "sudo -i env")
    assert "PIP_FIND_LINKS" not in root_env and "HF_HOME" not in root_env, root_env

#!/usr/bin/env python3
"""The rayrack lab: Debian 12 or 13 podman containers running systemd and sshd, reached like bare metal.

`lab.py up` builds (or reuses) the node image, a podman network and N nodes, provisions an admin user
with the lab's SSH key, records every node's host key in the lab's known_hosts and writes an Ansible
inventory.  `lab.py down` removes only what `up` created (containers and network carrying the lab's
label, the generated inventory); the cached image is kept unless `--image` is given.  `--dist` picks the
Debian release of the nodes (one image, tagged with its version, per release).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import ipaddress
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Debian releases a lab can run, by codename: the major version tags the node image.
DISTS = {"bookworm": "12", "trixie": "13"}
DEFAULT_DIST = "bookworm"
ADMIN_USER = "rayadmin"
LABEL = "io.rayrack.lab"

# Everything the image is built from; a change here (or in the CA bundle) rebuilds it.
IMAGE_PACKAGES = [
    "systemd", "systemd-sysv", "dbus", "openssh-server", "python3", "python3-apt", "python3-venv",
    "iproute2", "iputils-ping", "ca-certificates", "procps", "sudo",
]
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# The same three suites for every release; non-free for the NVIDIA packages (nvidia-smi, libnvidia-ml1).
SOURCES_LIST = """\
deb http://deb.debian.org/debian {dist} main contrib non-free non-free-firmware
deb http://deb.debian.org/debian {dist}-updates main contrib non-free non-free-firmware
deb http://deb.debian.org/debian-security {dist}-security main contrib non-free non-free-firmware
"""
# Units that need a real kernel, console or udev; they only fail (and slow boot) in a container.
MASKED_UNITS = [
    "systemd-remount-fs.service", "getty.target", "console-getty.service", "systemd-logind.service",
    "dev-hugepages.mount", "sys-kernel-debug.mount", "sys-kernel-tracing.mount",
    "systemd-udevd.service", "systemd-udev-trigger.service",
    # /proc/sys is writable in nodes (for per-namespace network keys); at boot this unit would apply every
    # sysctl.d file, and global keys (vm.*, kernel.*, net.core.rmem_max) would land on the lab host.
    "systemd-sysctl.service",
]
# Arguments to each release's /sbin/init.
INIT_ARGS: dict[str, list[str]] = {"bookworm": [], "trixie": []}
# Host keys must differ per node: the image ships none and each node makes its own at first boot.
SSH_KEYGEN_DROPIN = "[Service]\nExecStartPre=\nExecStartPre=/usr/bin/ssh-keygen -A\nExecStartPre=/usr/sbin/sshd -t\n"
RECIPE_VERSION = "3"


def image_name(dist: str = DEFAULT_DIST) -> str:
    return f"localhost/rayrack-node:{DISTS[dist]}"


IMAGE = image_name()
# What researchers' jobs import on every node: Ray Train and PyTorch's CPU build (the nodes have no CUDA; PyPI's
# default torch build pulls 3 GB of CUDA wheels). pip finds the CPU wheel through the host's own pip
# configuration (a find-links or --extra-index-url https://download.pytorch.org/whl/cpu).
LAB_RAY_EXTRAS = ["default", "train"]
LAB_PYTHON_PACKAGES = ["torch==2.13.0+cpu"]
# A small package only the shared tree's package directory offers: jobs' runtime_env pip installs it offline.
LAB_SHARED_PACKAGES = ["einops==0.8.1"]
# The gateway's users: a researcher with an e-mail address and a chat member id, one held to a single GPU, an admin.
LAB_USERS = [
    {"name": "alice", "uid": 2001, "contact": "alice@example.org U0ALICE1"},
    {"name": "bob", "uid": 2002, "contact": "bob@example.org", "max_gpus": 1},
    {"name": "ops", "uid": 2003, "contact": "U0OPS001", "admin": True},
]
# Fake GPUs per worker -> the agent's shipped scenario with that many GPUs.
FAKE_SCENARIOS = {2: "builtin:lab-2gpu", 8: "builtin:demo-8gpu"}


def log(msg: str) -> None:
    print(f"lab: {msg}", flush=True)


def run(*cmd: str, check: bool = True, capture: bool = False, input_text: str | None = None
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, text=True, input=input_text,
                          stdout=subprocess.PIPE if capture else None,
                          stderr=subprocess.PIPE if capture else None)


# ----------------------------------------------------------------------------------------------------------
# Host preparation: only what this host needs, each step idempotent
# ----------------------------------------------------------------------------------------------------------
HOST_PACKAGES = {
    "podman": "podman", "crun": "crun", "runc": "runc", "netavark": "netavark",
    "aardvark-dns": "aardvark-dns", "debootstrap": "debootstrap", "ssh-keygen": "openssh-client",
    "ssh": "openssh-client", "nft": "nftables", "iptables": "iptables", "catatonit": "catatonit",
    # Not the lab's own need: promtool checks the shipped rules and the agent's exposition in the tests.
    "promtool": "prometheus",
    # The dashboards' and rules' host series are checked against what it serves (tests/monitoring).
    "prometheus-node-exporter": "prometheus-node-exporter",
    # amtool checks the alertmanager role's configuration; the tests run the real Alertmanager with it.
    "amtool": "prometheus-alertmanager",
    # memcheck runs a C client of the simulated NVML library under it (tests/nvml_sim/test_memcheck.py).
    "valgrind": "valgrind",
    # Captures what crosses the lab network's bridge (tests/lab/test_ray_tls.py).
    "tcpdump": "tcpdump",
}
# Checked by package name, installed without Recommends (vagrant-libvirt's pull in libguestfs and an NFS
# server): the tests only run `vagrant validate` on the Vagrantfile.
HOST_PACKAGES_NO_RECOMMENDS = ["vagrant", "vagrant-libvirt"]


def dpkg_installed(package: str) -> bool:
    res = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True, check=False)
    return res.stdout.strip() == "install ok installed"


def ensure_host_packages() -> None:
    missing = sorted({pkg for tool, pkg in HOST_PACKAGES.items()
                      if shutil.which(tool) is None and not Path(f"/usr/libexec/podman/{tool}").exists()
                      and not Path(f"/usr/lib/podman/{tool}").exists()})
    bare = [pkg for pkg in HOST_PACKAGES_NO_RECOMMENDS if not dpkg_installed(pkg)]
    if not missing and not bare:
        return
    if os.geteuid() != 0:
        sys.exit(f"lab: missing host packages {missing + bare}; install them "
                 f"(apt-get install -y {' '.join(missing + bare)})")
    log(f"installing host packages: {' '.join(missing + bare)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    if missing:
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing, "containernetworking-plugins", "uidmap"],
                       check=True, env=env)
    if bare:
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *bare], check=True, env=env)


def lacks_cap_sys_resource() -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return not (int(line.split()[1], 16) >> 24) & 1
    return False


def ensure_podman_ulimits() -> None:
    """Without CAP_SYS_RESOURCE podman's default ulimits fail: pin them to what this host allows."""
    if not lacks_cap_sys_resource():
        return
    conf = Path("/etc/containers/containers.conf")
    text = conf.read_text() if conf.exists() else ""
    if "default_ulimits" in text:
        return
    import resource
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    log(f"no CAP_SYS_RESOURCE here: setting podman default_ulimits (nofile={hard}) in {conf}")
    conf.parent.mkdir(parents=True, exist_ok=True)
    block = f'default_ulimits = [\n  "nofile={hard}:{hard}",\n  "nproc=32768:32768",\n]\n'
    if "[containers]" in text:
        text = text.replace("[containers]\n", "[containers]\n" + block, 1)
    else:
        text = text + ("\n" if text and not text.endswith("\n") else "") + "[containers]\n" + block
    conf.write_text(text)


def cgroup_hybrid() -> bool:
    """cgroup v1 with a v2 'unified' mount: crun refuses it, runc copes."""
    out = run("stat", "-fc", "%T", "/sys/fs/cgroup", capture=True).stdout.strip()
    return out != "cgroup2fs" and Path("/sys/fs/cgroup/unified").is_dir()


def podman(*args: str, **kw) -> subprocess.CompletedProcess[str]:
    runtime = ["--runtime", "runc"] if cgroup_hybrid() else []
    return run("podman", *runtime, *args, **kw)


# ----------------------------------------------------------------------------------------------------------
# Image
# ----------------------------------------------------------------------------------------------------------
def ca_files(ca_dir: Path | None) -> list[Path]:
    return sorted(ca_dir.glob("*.crt")) if ca_dir and ca_dir.is_dir() else []


def recipe_digest(cas: list[Path], dist: str = DEFAULT_DIST) -> str:
    h = hashlib.sha256()
    # The release enters through its sources.list (bookworm's is the text it always was: its image stays current).
    for part in (RECIPE_VERSION, DEBIAN_MIRROR, SOURCES_LIST.format(dist=dist), SSH_KEYGEN_DROPIN, *IMAGE_PACKAGES,
                 *MASKED_UNITS):
        h.update(part.encode() + b"\0")
    for ca in cas:
        h.update(ca.name.encode() + b"\0" + ca.read_bytes())
    return h.hexdigest()[:16]


def image_digest(dist: str = DEFAULT_DIST) -> str | None:
    res = podman("image", "inspect", "--format", "{{ index .Labels \"" + LABEL + ".recipe\" }}", image_name(dist),
                 check=False, capture=True)
    return res.stdout.strip() if res.returncode == 0 else None


def build_image(cas: list[Path], force: bool = False, dist: str = DEFAULT_DIST) -> None:
    digest = recipe_digest(cas, dist)
    image = image_name(dist)
    if not force and image_digest(dist) == digest:
        log(f"image {image} is current (recipe {digest})")
        return
    log(f"building {image} ({dist}) with debootstrap (recipe {digest}); this takes about a minute")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="rayrack-rootfs-") as tmp:
        root = Path(tmp) / "rootfs"
        run("debootstrap", "--variant=minbase", f"--include={','.join(IMAGE_PACKAGES)}", dist,
            str(root), DEBIAN_MIRROR, capture=True)
        (root / "etc/apt/sources.list").write_text(SOURCES_LIST.format(dist=dist))
        (root / "etc/machine-id").write_text("")
        for key in (root / "etc/ssh").glob("ssh_host_*"):
            key.unlink()
        dropin = root / "etc/systemd/system/ssh.service.d"
        dropin.mkdir(parents=True, exist_ok=True)
        (dropin / "10-rayrack-hostkeys.conf").write_text(SSH_KEYGEN_DROPIN)
        for unit in MASKED_UNITS:
            target = root / "etc/systemd/system" / unit
            target.unlink(missing_ok=True)
            target.symlink_to("/dev/null")
        if cas:
            for ca in cas:
                shutil.copy(ca, root / "usr/local/share/ca-certificates" / ca.name)
            run("chroot", str(root), "update-ca-certificates", capture=True)
        run("chroot", str(root), "apt-get", "clean")
        lists = root / "var/lib/apt/lists"
        shutil.rmtree(lists)
        (lists / "partial").mkdir(parents=True)
        # An old mtime makes the first `apt update` with cache_valid_time actually fetch the lists.
        os.utime(lists, (0, 0))
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(["podman", "import", "--change", 'CMD ["/sbin/init"]',
                        "--change", f"LABEL {LABEL}.recipe={digest}", "-", image],
                       stdin=tar.stdout, check=True, stdout=subprocess.DEVNULL)
        if tar.wait() != 0:
            sys.exit("lab: tar of the image root failed")
    log(f"built {image} in {time.monotonic() - started:.0f}s")


# ----------------------------------------------------------------------------------------------------------
# Nodes
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Node:
    name: str  # inventory hostname and container hostname
    container: str
    ip: str
    group: str  # ray_head or ray_workers


@dataclasses.dataclass(frozen=True)
class Lab:
    name: str
    workers: int
    subnet: ipaddress.IPv4Network
    inventory_dir: Path
    gpus_per_worker: int
    dist: str = DEFAULT_DIST
    python_packages: tuple[str, ...] = tuple(LAB_PYTHON_PACKAGES)

    @property
    def image(self) -> str:
        return image_name(self.dist)

    @property
    def network(self) -> str:
        return f"rayrack-{self.name}"

    @property
    def nodes(self) -> list[Node]:
        hosts = list(self.subnet.hosts())
        names = [("head", "ray_head")] + [(f"worker{i}", "ray_workers") for i in range(1, self.workers + 1)]
        # .1 is the gateway; nodes from .10 on.
        return [Node(n, f"rayrack-{self.name}-{n}", str(hosts[9 + i]), g) for i, (n, g) in enumerate(names)]

    @property
    def key(self) -> Path:
        return self.inventory_dir / ".ssh" / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.inventory_dir / ".ssh" / "known_hosts"


def ensure_network(lab: Lab) -> None:
    if podman("network", "exists", lab.network, check=False).returncode == 0:
        return
    podman("network", "create", "--subnet", str(lab.subnet), "--label", f"{LABEL}={lab.name}", lab.network,
           capture=True)


def container_state(container: str) -> str | None:
    res = podman("container", "inspect", "--format", "{{.State.Status}}", container, check=False, capture=True)
    return res.stdout.strip() if res.returncode == 0 else None


def ensure_node(lab: Lab, node: Node, shared_dir: Path) -> None:
    state = container_state(node.container)
    if state == "running":
        return
    if state is not None:
        podman("start", node.container, capture=True)
        return
    podman("run", "-d", "--name", node.container, "--hostname", node.name, "--network", lab.network,
           "--ip", node.ip, "--systemd=always", "--shm-size=1g",
           # Lets systemd build the mount namespaces that hardened units (ProtectSystem=...) need.
           "--cap-add", "SYS_ADMIN", "--label", f"{LABEL}={lab.name}",
           # nftables and the interface MTU (NET_ADMIN), nfs-ganesha serving any file (DAC_READ_SEARCH), and
           # per-network-namespace sysctl keys; global keys are never applied in the lab (see write_inventory).
           "--cap-add", "NET_ADMIN", "--cap-add", "DAC_READ_SEARCH", "--security-opt", "unmask=/proc/sys",
           "--volume", f"{shared_dir}:/srv/rayrack-shared:z", "--stop-timeout", "10",
           lab.image, "/sbin/init", *INIT_ARGS[lab.dist], capture=True)


def wait_booted(node: Node, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = podman("exec", node.container, "systemctl", "is-system-running", check=False,
                       capture=True).stdout.strip()
        if state in ("running", "degraded"):
            if state == "degraded":
                failed = podman("exec", node.container, "systemctl", "--failed", "--no-legend", check=False,
                                capture=True).stdout.strip()
                log(f"{node.name}: systemd degraded: {failed}")
            return
        time.sleep(1)
    sys.exit(f"lab: {node.name} did not finish booting in {timeout:.0f}s (systemd says {state!r})")


def ensure_key(lab: Lab) -> str:
    lab.key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not lab.key.exists():
        run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"rayrack-{lab.name}-admin", "-f", str(lab.key))
    return lab.key.with_suffix(".pub").read_text().strip()


def provision_admin(node: Node, pubkey: str) -> str:
    """What a site's OS install does for bare metal: an admin user with our key and sudo. Returns the host key."""
    script = f"""set -e
id -u {ADMIN_USER} >/dev/null 2>&1 || useradd --create-home --shell /bin/bash {ADMIN_USER}
install -d -m 0700 -o {ADMIN_USER} -g {ADMIN_USER} /home/{ADMIN_USER}/.ssh
printf '%s\\n' '{pubkey}' > /home/{ADMIN_USER}/.ssh/authorized_keys
chown {ADMIN_USER}: /home/{ADMIN_USER}/.ssh/authorized_keys && chmod 0600 /home/{ADMIN_USER}/.ssh/authorized_keys
echo '{ADMIN_USER} ALL=(ALL) NOPASSWD: ALL' > /etc/sudoers.d/90-{ADMIN_USER}
chmod 0440 /etc/sudoers.d/90-{ADMIN_USER}
systemctl is-active --quiet ssh || systemctl start ssh
# systemd on a host makes / a shared mount at boot; podman leaves it private, and then no unit's LoadCredential=
# reaches it (the credentials mount is made in a child namespace and never propagates back).
mount --make-rshared /
cat /etc/ssh/ssh_host_ed25519_key.pub
"""
    out = podman("exec", "-i", node.container, "bash", "-s", input_text=script, capture=True).stdout
    return out.strip().splitlines()[-1]


def write_inventory(lab: Lab, host_keys: dict[str, str]) -> None:
    lab.known_hosts.write_text("".join(
        f"{node.ip} {' '.join(host_keys[node.name].split()[:2])}\n" for node in lab.nodes))
    lab.known_hosts.chmod(0o600)
    ssh_args = f"-o UserKnownHostsFile={lab.known_hosts} -o StrictHostKeyChecking=yes"
    inventory = {
        "all": {
            "vars": {
                "ansible_user": ADMIN_USER,
                "ansible_ssh_private_key_file": str(lab.key),
                "ansible_ssh_common_args": ssh_args,
                "ansible_python_interpreter": "/usr/bin/python3",
            },
            "children": {
                "ray_head": {"hosts": {}},
                "ray_workers": {"hosts": {}},
                # The head serves the shared tree over NFS (nfs-ganesha: no kernel NFS in containers).
                "nfs_server": {"hosts": {lab.nodes[0].name: {}}},
            },
        }
    }
    for node in lab.nodes:
        host: dict[str, object] = {"ansible_host": node.ip}
        if node.group == "ray_workers":
            # Simulated GPUs: Ray is told the count; the node gets the simulated libnvidia-ml.so.1 serving the
            # shipped scenario, read by the agent's real NVML backend.
            host["ray_node_num_gpus"] = lab.gpus_per_worker
            host["ray_agent_gpu_backend"] = "nvml"
            host["nvml_sim_enabled"] = True
            host["nvml_sim_scenario"] = FAKE_SCENARIOS[lab.gpus_per_worker]
        inventory["all"]["children"][node.group]["hosts"][node.name] = host
    lab.inventory_dir.mkdir(parents=True, exist_ok=True)
    # JSON is valid YAML: no PyYAML needed to run the lab.
    header = "# Generated by tests/lab/lab.py: do not edit, re-run `make lab` instead.\n"
    (lab.inventory_dir / "hosts.yml").write_text(header + json.dumps(inventory, indent=2) + "\n")
    group_vars = lab.inventory_dir / "group_vars" / "all"
    group_vars.mkdir(parents=True, exist_ok=True)
    (group_vars / "lab.yml").write_text(header + json.dumps({
        "rayrack_cluster_name": lab.name,
        "rayrack_cluster_cidr": str(lab.subnet),
        "rayrack_ray_extras": LAB_RAY_EXTRAS,
        "rayrack_python_packages": list(lab.python_packages),
        "rayrack_shared_packages": LAB_SHARED_PACKAGES,
        # Nodes share one host's memory: keep each object store small instead of 30% of the host's RAM.
        "ray_node_object_store_memory": 256 * 1024 * 1024,
        # The shared tree is this lab's volume on every node; the head exports that same directory.
        "rayrack_nfs_export": "/srv/rayrack-shared",
        # Researchers through the jobs gateway (tests/lab/test_gateway.py): their tokens are generated.
        "rayrack_users": LAB_USERS,
        "nfs_server_backend": "ganesha",
        # Containers have no kernel NFS client or FS-Cache: the mount unit is written, not started.
        "nfs_client_mount": False,
        "data_cache_fscache": False,
        # /proc/sys is the host's for global keys: write them to the sysctl.d file, apply only per-namespace ones.
        "network_tuning_apply_global": False,
        "network_tuning_mtu": 1500,
        # Only the nodes, so the lab host (the network's gateway) is an outsider the firewall must refuse.
        "firewall_allowed_sources": [node.ip for node in lab.nodes],
        # Alerts go to a receiver the lab tests start on the lab host (the network's gateway), quickly.
        "alertmanager_slack_webhook_url": f"http://{next(lab.subnet.hosts())}:19093/alertmanager",
        "alertmanager_group_wait": "1s",
        "alertmanager_group_interval": "10s",
        "prometheus_scrape_interval": "5s",
        # dcgm-exporter's names and DeepOps' instance labels too, so the tests can check other projects' GPU
        # dashboards against the lab (tests/lab/test_monitoring.py).
        "ray_agent_dcgm_compat": True,
        "prometheus_instance_label": "dcgm-exporter",
        # No Grafana package can be installed here: only its provisioning files are written.
        "grafana_install": False,
        # Prometheus and Alertmanager on every address of the head (TLS, basic auth), Alertmanager's port open to
        # the nodes too, so the tests can show that another node without the password is refused.
        "prometheus_listen_address": "0.0.0.0:9090",
        "alertmanager_listen_address": "0.0.0.0:9093",
        "firewall_extra_tcp_ports": ["9093"],
        # The head may restart without ending the workers' work (its GCS in Redis on the head), and models are
        # served from every node (tests/lab/test_head_ft.py).
        "rayrack_gcs_ft": True,
        "rayrack_serve_enabled": True,
        "smoke_serve": True,
    }, indent=2) + "\n")


def up(lab: Lab, ca_dir: Path | None) -> None:
    ensure_host_packages()
    ensure_podman_ulimits()
    build_image(ca_files(ca_dir), dist=lab.dist)
    ensure_network(lab)
    shared = lab.inventory_dir / ".shared"
    shared.mkdir(parents=True, exist_ok=True)
    for node in lab.nodes:
        ensure_node(lab, node, shared)
    pubkey = ensure_key(lab)
    host_keys = {}
    for node in lab.nodes:
        wait_booted(node)
        host_keys[node.name] = provision_admin(node, pubkey)
    write_inventory(lab, host_keys)
    log(f"{len(lab.nodes)} nodes up on {lab.network} ({lab.subnet}); inventory in {lab.inventory_dir}")


def down(lab: Lab, remove_image: bool) -> None:
    containers = podman("ps", "-a", "--filter", f"label={LABEL}={lab.name}", "--format", "{{.Names}}",
                        capture=True).stdout.split()
    if containers:
        podman("rm", "-f", "-t", "0", *containers, capture=True)
    if podman("network", "exists", lab.network, check=False).returncode == 0:
        podman("network", "rm", lab.network, capture=True)
    if lab.inventory_dir.is_dir():
        shutil.rmtree(lab.inventory_dir)
    if remove_image and image_digest(lab.dist) is not None:
        podman("rmi", lab.image, capture=True)
    log(f"removed {len(containers)} containers, network {lab.network} and {lab.inventory_dir}")


# Runs as root on the monitoring host (the lab's head): answers a list of [service, path, params] requests to the
# local Prometheus or Alertmanager, over TLS checked against the cluster CA, with root's credentials there (the
# curl configuration files the monitoring roles write, mode 0600: the password never reaches a command line).
MONITORING_CLIENT = r"""
import base64, json, re, ssl, sys, urllib.parse, urllib.request
ADDRESSES = {"prometheus": "127.0.0.1:9090", "alertmanager": "127.0.0.1:9093"}
openers = {}
def opener(service):
    if service not in openers:
        text = open(f"/etc/prometheus/clients/{service}.curl").read()
        conf = {k: re.sub(r"\\(.)", r"\1", v) for k, v in re.findall(r'^(\w+) = "((?:[^"\\]|\\.)*)"$', text, re.M)}
        context = ssl.create_default_context(cafile=conf["cacert"])
        auth = "Basic " + base64.b64encode(conf["user"].encode()).decode()
        openers[service] = (urllib.request.build_opener(urllib.request.HTTPSHandler(context=context)), auth)
    return openers[service]
answers = []
for service, path, params in json.load(sys.stdin):
    client, auth = opener(service)
    url = f"https://{ADDRESSES[service]}{path}?" + urllib.parse.urlencode(params, doseq=True)
    try:
        answers.append(json.load(client.open(urllib.request.Request(url, headers={"Authorization": auth}), timeout=20)))
    except Exception as err:  # the caller reports it with the request that caused it
        answers.append({"status": "error", "error": str(getattr(err, "read", lambda: b"")() or err)})
print(json.dumps(answers))
"""


def monitoring_api(lab: Lab, requests: list[tuple[str, str, dict]]) -> list[dict]:
    """Answers of the lab's Prometheus and Alertmanager on the head to [(service, path, params)], asked there as
    root with root's credentials; an answer is {"status": "error", ...} when its request failed."""
    result = ssh(lab, lab.nodes[0], "sudo python3 -c " + shlex.quote(MONITORING_CLIENT),
                 input_text=json.dumps(requests), check=False)
    if result.returncode != 0:
        raise RuntimeError(f"the monitoring client on {lab.nodes[0].name} failed: {result.stderr[-3000:]}")
    return json.loads(result.stdout)


def prometheus(lab: Lab, requests: list[tuple[str, dict]]) -> list[dict]:
    """The head's Prometheus's answers to [(path, params)]: see monitoring_api."""
    return monitoring_api(lab, [("prometheus", path, params) for path, params in requests])


def ssh(lab: Lab, node: Node, command: str, check: bool = True, input_text: str | None = None
        ) -> subprocess.CompletedProcess[str]:
    """Run a command on a node the way Ansible reaches it: SSH as the admin user, host key checked."""
    return run("ssh", "-i", str(lab.key), "-o", f"UserKnownHostsFile={lab.known_hosts}",
               "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", f"{ADMIN_USER}@{node.ip}", command,
               check=check, capture=True, input_text=input_text)


def node_dist(container: str) -> str:
    """The Debian release a lab node runs, by the image it was made from (bookworm when it is gone)."""
    res = podman("container", "inspect", "--format", "{{.ImageName}}", container, check=False, capture=True)
    return next((dist for dist in DISTS if image_name(dist) == res.stdout.strip()), DEFAULT_DIST)


def load(name: str) -> Lab | None:
    """A lab that `up` made, as its inventory says (node count, subnet, fake GPUs per worker); None if it is not up."""
    inventory_dir = REPO / "inventories" / name
    hosts_file = inventory_dir / "hosts.yml"
    if not hosts_file.exists():
        return None
    text = "".join(line for line in hosts_file.read_text().splitlines(True) if not line.startswith("#"))
    groups = json.loads(text)["all"]["children"]
    workers = groups["ray_workers"]["hosts"]
    lab_vars = json.loads("".join(line for line in (inventory_dir / "group_vars/all/lab.yml").read_text()
                                  .splitlines(True) if not line.startswith("#")))
    gpus = next(iter(workers.values())).get("ray_node_num_gpus", 2)
    lab = Lab(name, len(workers), ipaddress.IPv4Network(lab_vars["rayrack_cluster_cidr"]), inventory_dir, gpus)
    lab = dataclasses.replace(lab, dist=node_dist(lab.nodes[0].container))
    # The Ray groups carry each node's address; other groups (nfs_server) only name nodes again.
    written = {host: spec["ansible_host"] for group in ("ray_head", "ray_workers")
               for host, spec in groups[group]["hosts"].items()}
    if {n.name: n.ip for n in lab.nodes} != written:
        raise RuntimeError(f"the inventory of lab {name!r} does not match lab.py's layout")
    return lab


@contextlib.contextmanager
def ssh_tunnel(lab: Lab, node: Node, remote_port: int, timeout: float = 30) -> Iterator[int]:
    """What a researcher does to reach the head's loopback-only Jobs API: `ssh -N -L`. Yields the local port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        local_port = probe.getsockname()[1]
    proc = subprocess.Popen(
        ["ssh", "-i", str(lab.key), "-o", f"UserKnownHostsFile={lab.known_hosts}", "-o", "StrictHostKeyChecking=yes",
         "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes", "-N",
         "-L", f"127.0.0.1:{local_port}:127.0.0.1:{remote_port}", f"{ADMIN_USER}@{node.ip}"])
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", local_port), timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"ssh tunnel to {node.name}:{remote_port} did not come up") from None
                time.sleep(0.2)
        yield local_port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def status(lab: Lab) -> int:
    """`ray status` from the head, and where to reach the dashboard, Jobs API and metrics."""
    if not lab.known_hosts.exists():
        print(f"lab: no lab named {lab.name!r} here; run `make lab` first", file=sys.stderr)
        return 1
    head = lab.nodes[0]
    # The CLI needs the cluster token like any client: read the node's Ray environment as the ray user.
    res = ssh(lab, head, "sudo -u ray sh -c 'set -a; . /etc/rayrack/ray.env; "
                         f"ray status --address {head.ip}:6379'", check=False)
    print(res.stdout.rstrip() or res.stderr.rstrip())
    token = lab.inventory_dir / ".secrets" / "ray_token"
    print(f"""
Ray dashboard and Jobs API (bound to the head's loopback; token auth on):
  ssh -i {lab.key} -o UserKnownHostsFile={lab.known_hosts} -N -L 8265:127.0.0.1:8265 {ADMIN_USER}@{head.ip} &
  RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={token} \\
    ray job submit --address http://127.0.0.1:8265 -- python -c 'import ray; ray.init(); print(ray.nodes())'
Prometheus on the head: the same tunnel with -L 9090:127.0.0.1:9090, then https://localhost:9090 with the CA
  {lab.inventory_dir / ".secrets" / "ca" / "ca.crt"}, user rayrack and the password in
  {lab.inventory_dir / ".secrets" / "monitoring" / "prometheus.password"}
Metrics on every node, reachable from the nodes (the firewall refuses this lab host, an outsider):
""" + "\n".join(f"  http://{n.ip}:9489/metrics   http://{n.ip}:8090/metrics   ({n.name})" for n in lab.nodes))
    print("\nGPUs as Prometheus sees them (rayrack_gpu_utilization_ratio):")
    try:
        (answer,) = prometheus(lab, [("/api/v1/query", {"query": "rayrack_gpu_utilization_ratio"})])
        rows = answer["data"]["result"] if answer.get("status") == "success" else []
        for r in sorted(rows, key=lambda r: (r["metric"]["node"], r["metric"]["gpu"])):
            print(f"  {r['metric']['node']:<10} gpu {r['metric']['gpu']}  {float(r['value'][1]):6.0%}  "
                  f"{r['metric']['uuid']}")
        print(f"  {len(rows)} GPUs" + ("" if answer.get("status") == "success" else f": {answer.get('error')}"))
    except RuntimeError as exc:
        print(f"  {exc}")
    return res.returncode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["up", "down", "status", "image", "host-deps"])
    p.add_argument("--name", default="lab", help="lab name: prefixes containers and network (default: lab)")
    p.add_argument("--workers", type=int, default=2, help="number of GPU worker nodes (default: 2)")
    p.add_argument("--gpus-per-worker", type=int, default=2, choices=sorted(FAKE_SCENARIOS),
                   help="fake GPUs per worker, as in the agent's shipped scenarios (default: 2)")
    p.add_argument("--subnet", default="10.213.0.0/24", help="lab network (default: 10.213.0.0/24)")
    p.add_argument("--inventory-dir", type=Path, help="where to write the inventory (default: inventories/<name>)")
    p.add_argument("--ca-dir", type=Path, default=Path("/usr/local/share/ca-certificates"),
                   help="extra CA certificates (*.crt) to trust inside nodes, e.g. a site's TLS-intercepting "
                        "proxy (default: /usr/local/share/ca-certificates; empty string for none)")
    p.add_argument("--dist", default=DEFAULT_DIST, choices=sorted(DISTS),
                   help=f"Debian release of the nodes (default: {DEFAULT_DIST})")
    p.add_argument("--python-packages", default=" ".join(LAB_PYTHON_PACKAGES), metavar="'REQ ...'",
                   help="pinned packages for every Ray venv, space-separated, '' for none (default: "
                        f"{' '.join(LAB_PYTHON_PACKAGES)}, which the controller's pip must find for the nodes' Python)")
    p.add_argument("--image", action="store_true", help="with down: also remove the node image (of --dist)")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be at least 1")
    try:
        subnet = ipaddress.IPv4Network(args.subnet)
    except ValueError as exc:
        p.error(f"--subnet: {exc}")
    if subnet.num_addresses < 16 + args.workers:
        p.error(f"--subnet {subnet} is too small for {args.workers + 1} nodes")
    lab = Lab(args.name, args.workers, subnet, (args.inventory_dir or REPO / "inventories" / args.name).resolve(),
              args.gpus_per_worker, args.dist, tuple(args.python_packages.split()))
    ca_dir = args.ca_dir if str(args.ca_dir) else None
    if args.action == "host-deps":
        ensure_host_packages()
        ensure_podman_ulimits()
    elif args.action == "up":
        up(lab, ca_dir)
    elif args.action == "status":
        return status(lab)
    elif args.action == "image":
        ensure_host_packages()
        ensure_podman_ulimits()
        build_image(ca_files(ca_dir), dist=lab.dist)
    else:
        down(lab, args.image)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The /etc/exports the nfs_server role writes for the kernel backend, checked by the real `exportfs`.

The lab serves the shared tree with nfs-ganesha (containers have no kernel NFS), so the kernel backend's file
is rendered here with Ansible from the role's own template, defaults and vars, then loaded by `exportfs -ra`
from nfs-kernel-server in a lab-image container: exportfs parses every client and option without needing a
running nfsd. A broken option must make the same check fail, or the check proves nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import required

from .conftest import run_play, template_play

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lab"))
import lab as labtool

pytestmark = pytest.mark.slow

REPO = labtool.REPO
EXPORT = "/srv/rayrack-shared"
CHECK = f"""\
set -e
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends nfs-kernel-server >/dev/null 2>&1
mkdir -p {EXPORT}
for exports in /work/*.exports; do
    cp "$exports" /etc/exports
    if exportfs -ra 2>"/work/$(basename "$exports" .exports).err"; then echo "$(basename "$exports") ok"
    else echo "$(basename "$exports") refused"; fi
    exportfs -v > "/work/$(basename "$exports" .exports).loaded" 2>&1 || true
done
"""


# Nodes in a cluster network that also holds machines that are not nodes: only the nodes may mount.
NODES = {"head": "10.213.1.10", "worker1": "10.213.1.11"}
PLAY = template_play("head", "nfs_server", "etc/exports.j2")


def render(tmp_path: Path, name: str, **overrides: object) -> Path:
    """The role's template with its defaults and vars: what the kernel backend writes on a server."""
    dest = tmp_path / f"{name}.exports"
    inventory = {"all": {"vars": {"ansible_connection": "local"}, "children": {
        "ray_head": {"hosts": {"head": {"ansible_host": NODES["head"]}}},
        "ray_workers": {"hosts": {"worker1": {"ansible_host": NODES["worker1"]}}}}}}
    work = tmp_path / f"{name}.play"
    work.mkdir()
    extra = {"dest": str(dest), "rayrack_nfs_export": EXPORT, "rayrack_cluster_cidr": "10.213.1.0/24", **overrides}
    run_play(work, inventory, PLAY, extra, {})
    return dest


@pytest.fixture(scope="module")
def checked(tmp_path_factory) -> Path:
    if labtool.image_digest() is None:
        required.missing(f"{labtool.IMAGE} is not built (`make unit` builds it, or tests/lab/lab.py image)")
    work = tmp_path_factory.mktemp("exports")
    render(work, "default")
    render(work, "clients", rayrack_nfs_clients=["192.168.40.0/22", "10.213.2.7"])
    render(work, "broken", nfs_server_export_options=["rw", "sync", "no_such_option"])
    labtool.ensure_podman_ulimits()
    res = labtool.podman("run", "--rm", "--network", "host", "-v", f"{work}:/work:z", labtool.IMAGE,
                         "bash", "-c", CHECK, check=False, capture=True)
    assert res.returncode == 0, res.stdout + res.stderr
    (work / "verdicts").write_text(res.stdout)
    return work


def verdict(work: Path, name: str) -> str:
    return dict(line.split() for line in (work / "verdicts").read_text().splitlines())[f"{name}.exports"]


def test_the_default_export_loads_with_its_options(checked):
    assert verdict(checked, "default") == "ok", (checked / "default.err").read_text()
    loaded = (checked / "default.loaded").read_text()
    # The nodes by their own addresses, never the cluster network they sit in.
    assert EXPORT in loaded and all(address in loaded for address in NODES.values()), loaded
    assert "10.213.1.0/24" not in loaded, loaded
    # The options the role documents reach the kernel's table as written. `secure` (privileged client ports
    # only) is written out, and exportfs lists only its opposite.
    for option in ("sync", "no_subtree_check", "root_squash", "sec=sys", "rw"):
        assert option in loaded, loaded
    assert "secure" in (checked / "default.exports").read_text().split("(", 1)[1].split(")")[0].split(",")
    assert "insecure" not in loaded, loaded


def test_every_listed_client_is_exported(checked):
    assert verdict(checked, "clients") == "ok", (checked / "clients.err").read_text()
    loaded = (checked / "clients.loaded").read_text()
    for client in (*NODES.values(), "192.168.40.0/22", "10.213.2.7"):
        assert client in loaded, loaded


def test_a_bad_option_is_refused_by_exportfs(checked):
    assert verdict(checked, "broken") == "refused"
    assert "no_such_option" in (checked / "broken.err").read_text()

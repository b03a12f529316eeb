"""The repo as the Ansible collection rayrack.cluster: built with ansible-galaxy, installed from the tarball
into a throwaway path, and run from there by FQCN, away from the repo (its ansible.cfg and .collections unused)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path, PurePosixPath

import pytest

from ray_agent import __version__

from .conftest import REPO

BIN = Path(sys.executable).parent
INSTALLED = PurePosixPath("ansible_collections/rayrack/cluster")
# What an admin's controller needs: the Ansible content, the sources the roles build and ship, the example.
TOP_LEVEL = {"FILES.json", "MANIFEST.json", "README.md", "CHANGELOG.md", "pyproject.toml", "requirements.txt", "meta",
             "roles", "playbooks", "plugins", "packaging", "ray_agent", "rayrack", "monitoring", "inventories"}


def outside_env(**extra: str) -> dict[str, str]:
    """The environment of an admin's own directory: no project ansible.cfg, nothing of ours on the paths."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    return {**env, "ANSIBLE_LOCALHOST_WARNING": "0", "ANSIBLE_INVENTORY_UNPARSED_WARNING": "0", **extra}


def galaxy(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(BIN / "ansible-galaxy"), "collection", *args], cwd=cwd, env=outside_env(),
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def build(source: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    galaxy(out, "build", str(source), "--output-path", str(out))
    (tarball,) = out.glob("*.tar.gz")
    return tarball


def members(tarball: Path) -> list[PurePosixPath]:
    with tarfile.open(tarball) as tar:
        return [PurePosixPath(name) for name in tar.getnames()]


@pytest.fixture(scope="module")
def tarball(tmp_path_factory) -> Path:
    return build(REPO, tmp_path_factory.mktemp("collection-build"))


@pytest.fixture(scope="module")
def installed(tarball, tmp_path_factory) -> tuple[Path, Path]:
    """(collections path, the installed collection), installed from the file alone."""
    where = tmp_path_factory.mktemp("collections")
    galaxy(where, "install", "--offline", "-p", str(where), str(tarball))
    return where, where / INSTALLED


def run_outside(collections: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    cwd = collections.parent
    return subprocess.run([str(BIN / argv[0]), *argv[1:]], cwd=cwd, capture_output=True, text=True, timeout=300,
                          check=False, env=outside_env(ANSIBLE_COLLECTIONS_PATH=str(collections)))


def test_the_tarball_is_named_after_the_kits_version(tarball):
    assert tarball.name == f"rayrack-cluster-{__version__}.tar.gz"
    with tarfile.open(tarball) as tar:
        manifest = json.load(tar.extractfile("MANIFEST.json"))["collection_info"]
    assert (manifest["namespace"], manifest["name"], manifest["version"]) == ("rayrack", "cluster", __version__)


def test_the_tarball_holds_what_an_admin_needs_and_no_checks_labs_or_hidden_paths(tarball):
    paths = members(tarball)
    assert {p.parts[0] for p in paths} == TOP_LEVEL
    for path in paths:
        assert not any(part.startswith(".") for part in path.parts), path
        assert not {"tests", "molecule", "__pycache__"} & set(path.parts), path
        assert path.suffix != ".pyc", path
    assert {p.parts[1] for p in paths if p.parts[0] == "inventories" and len(p.parts) > 1} == {"example"}
    for needed in ("playbooks/site.yml", "plugins/filter/rayrack_inventory.py", "plugins/modules/gpu_validate.py",
                   "plugins/module_utils/rayrack_gpu_check.py", "roles/rayrack/tasks/main.yml",
                   "inventories/example/hosts.yml", "meta/runtime.yml"):
        assert PurePosixPath(needed) in paths, needed


def test_an_admins_inventories_and_generated_secrets_stay_out(tmp_path):
    """Built from a checkout that has been used: its own inventories, a lab's, secrets and facts beside them."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    source = tmp_path / "checkout"
    for name in filter(None, files):
        src, dst = REPO / name, source / name
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the work tree, not yet in the index
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            dst.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, dst)
    planted = ["inventories/rack1/hosts.yml", "inventories/rack1/group_vars/all/nas.yml", "inventories/lab/hosts.yml",
               "inventories/example2/hosts.yml", "inventories/exam/hosts.yml", "inventories/examples.yml",
               "inventories/example/.secrets/ca/ca.key", "inventories/example/.facts/head01",
               "inventories/example/.reports/gpu_validate.json", ".secrets/cluster.token", ".venv/bin/python",
               ".cache/facts/head01", "build/nvml-sim/libnvidia-ml.so.1", "on-device-out/result.json",
               "roles/rayrack/.secrets/token", "rayrack-cluster-0.0.1.tar.gz"]
    for name in planted:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        # Never through a copied link into the real checkout.
        assert (source / name).parent.resolve().is_relative_to(source.resolve()), name
        (source / name).write_text("secret\n")
    paths = {str(p) for p in members(build(source, tmp_path / "out"))}
    assert "inventories/example/hosts.yml" in paths
    assert [name for name in planted if name in paths] == []
    assert not any(p.startswith(("inventories/rack1", "inventories/lab", "inventories/exam/", "inventories/example2"))
                   for p in paths)


def test_the_installed_collection_passes_the_syntax_check_by_fqcn(installed):
    collections, collection = installed
    result = run_outside(collections, "ansible-playbook", "rayrack.cluster.site", "--syntax-check",
                         "-i", str(collection / "inventories" / "example"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # The installed copy ran, not the repo's.
    assert f"playbook: {collection / 'playbooks' / 'site.yml'}" in result.stdout


def test_the_installed_collections_roles_find_its_filters(installed):
    """The validate play calls the inventory filters by FQCN: from the installed copy, it accepts the example."""
    collections, collection = installed
    result = run_outside(collections, "ansible-playbook", "rayrack.cluster.validate",
                         "-i", str(collection / "inventories" / "example"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Inventory OK: head head01" in result.stdout


def test_the_installed_module_carries_its_module_utils(installed, tmp_path):
    """gpu_validate reaches its parsers (a link to rayrack/gpu_check.py inside the collection): without nvidia-smi
    it reports that as a difference rather than an import error."""
    collections, _ = installed
    args = {"profiles": {}, "nvidia_smi": str(tmp_path / "missing-nvidia-smi"), "dcgmi": "", "nvml": "off",
            "report_path": str(tmp_path / "report.json")}
    result = subprocess.run(
        [str(BIN / "ansible"), "localhost", "-i", "localhost,", "-c", "local", "-e",
         f"ansible_python_interpreter={sys.executable}", "-m", "rayrack.cluster.gpu_validate", "-a", json.dumps(args)],
        cwd=collections.parent, capture_output=True, text=True, timeout=120, check=False,
        env=outside_env(ANSIBLE_COLLECTIONS_PATH=str(collections), ANSIBLE_STDOUT_CALLBACK="json",
                        ANSIBLE_LOAD_CALLBACK_PLUGINS="1"))
    assert result.stdout.strip(), result.stderr
    host = json.loads(result.stdout)["plays"][0]["tasks"][0]["hosts"]["localhost"]
    assert "module_stderr" not in host, host
    assert [d["check"] for d in host["differences"]] == ["input"], host


def test_the_installed_collection_ships_the_same_agent_wheel(installed):
    """The roles build the nodes' wheel from the installed copy's packaging/ray-agent (its package a link): the
    same files, so the same fingerprint, as from the repo."""
    _, collection = installed
    script = str(REPO / "roles" / "rayrack" / "files" / "dist_files.py")
    seen = [[subprocess.run([sys.executable, script, *flag, str(root / "packaging" / "ray-agent")],
                            capture_output=True, text=True, check=True).stdout for flag in (["--list"], [])]
            for root in (collection, REPO)]
    assert seen[0] == seen[1]
    assert "ray_agent/cli.py" in seen[0][0].split()


def test_the_repo_as_is_passes_the_same_syntax_check():
    result = subprocess.run([str(BIN / "ansible-playbook"), "site.yml", "--syntax-check", "-i", "inventories/example"],
                            cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
                            env={**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg")})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

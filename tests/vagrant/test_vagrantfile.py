"""The Vagrantfile, without booting a VM: `vagrant validate` (libvirt fully, VirtualBox without its binary),
the machines and Ansible inventory Vagrant's own loader builds from it, and that inventory through rayrack's
inventory validation."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import required

REPO = Path(__file__).resolve().parents[2]
DUMP = Path(__file__).with_name("dump_config.rb")
SETTINGS = ("BOX", "PROVIDER", "WORKERS", "HEAD_CPUS", "HEAD_MEMORY", "WORKER_CPUS", "WORKER_MEMORY",
            "GPUS_PER_WORKER", "NETWORK", "CLUSTER_NAME", "CONFIG")


def vagrant() -> str:
    return required.binary("vagrant", "`make host-deps` installs vagrant and vagrant-libvirt")


@pytest.fixture
def venv_env(tmp_path: Path) -> dict[str, str]:
    """Vagrant's state and home in tmp (no .vagrant/ in the project), no rayrack settings from the caller."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAYRACK_VAGRANT_") and k not in ("VAGRANT_DEFAULT_PROVIDER", "VAGRANT_NO_PARALLEL",
                                                                  "ANSIBLE_CACHE_PLUGIN_CONNECTION")}
    env.update(VAGRANT_HOME=str(tmp_path / "vagrant.d"), VAGRANT_DOTFILE_PATH=str(tmp_path / "dotfile"),
               VAGRANT_CHECKPOINT_DISABLE="1", RAYRACK_VAGRANT_CONFIG=str(tmp_path / "absent.yml"))
    return env


def run_vagrant(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([vagrant(), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def dump(env: dict[str, str]) -> dict:
    vagrant()
    res = subprocess.run(["ruby", str(DUMP), str(REPO)], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout)


def test_vagrant_validate_with_libvirt(venv_env):
    res = run_vagrant(venv_env, "validate")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "validated successfully" in res.stdout


def test_vagrant_validate_with_virtualbox(venv_env):
    # Without VirtualBox installed Vagrant cannot load its provider; the rest of the file is still checked.
    res = run_vagrant(dict(venv_env, RAYRACK_VAGRANT_PROVIDER="virtualbox"), "validate", "--ignore-provider")
    assert res.returncode == 0, res.stdout + res.stderr


def test_a_misspelt_libvirt_option_fails_validation(venv_env, tmp_path: Path):
    """validate really reads the provider block (the plugin is loaded), so the passing test above means something."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("site.yml", "ansible.cfg"):
        shutil.copy(REPO / name, project / name)
    text = (REPO / "Vagrantfile").read_text()
    assert "lv.cpu_mode = " in text
    (project / "Vagrantfile").write_text(text.replace("lv.cpu_mode = ", "lv.cpu_moed = "))
    res = subprocess.run([vagrant(), "validate"], cwd=project, env=venv_env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode != 0
    assert "cpu_moed" in res.stdout + res.stderr


def test_default_machines_network_and_provisioner(venv_env):
    config = dump(venv_env)
    machines = {m["name"]: m for m in config["machines"]}
    assert list(machines) == ["head", "worker1", "worker2"]
    assert config["default_provider"] == "libvirt" and config["no_parallel"] == "yes"
    assert config["fact_cache"] == str(REPO / ".cache" / "vagrant" / "facts")
    for index, (name, machine) in enumerate(machines.items()):
        assert machine["config_errors"] == [], machine
        assert machine["box"] == "debian/bookworm64"
        assert machine["hostname"] == name
        assert machine["primary"] == (name == "head")
        assert machine["private_ips"] == [f"192.168.56.{10 + index}"]
        assert machine["synced_folders"] == {"/vagrant": "disabled"}
        assert machine["providers"]["libvirt"] == {"cpus": 2, "memory": 4096}
        assert machine["providers"]["virtualbox"] == {"cpus": 2, "memory": 4096, "name": f"rayrack-vagrant-{name}"}
    # One Ansible run, from the last VM, for every VM.
    assert [m["name"] for m in config["machines"] if m["ansible"]] == ["worker2"]
    (ansible,) = machines["worker2"]["ansible"]
    assert ansible["playbook"] == "site.yml" and ansible["limit"] == "all" and ansible["config_file"] == "ansible.cfg"
    assert ansible["groups"] == {
        "ray_head": ["head"], "ray_workers": ["worker1", "worker2"], "nfs_server": ["head"],
        "all:vars": {"rayrack_cluster_name": "vagrant", "rayrack_cluster_cidr": "192.168.56.0/24"},
    }
    fake = {"ray_node_num_gpus": 2, "ray_agent_gpu_backend": "fake", "ray_agent_fake_scenario": "builtin:lab-2gpu"}
    assert ansible["host_vars"] == {
        "head": {"ray_node_ip": "192.168.56.10"},
        "worker1": {"ray_node_ip": "192.168.56.11", **fake},
        "worker2": {"ray_node_ip": "192.168.56.12", **fake},
    }


def test_settings_from_a_file_then_the_environment(venv_env, tmp_path: Path):
    settings = tmp_path / "vagrant.yml"
    settings.write_text("workers: 3\nworker_memory: 8192\ngpus_per_worker: 8\nbox: generic/debian12\n"
                        "network: 10.77.0.0/24\ncluster_name: rack-a\n")
    env = dict(venv_env, RAYRACK_VAGRANT_CONFIG=str(settings), RAYRACK_VAGRANT_WORKER_MEMORY="6144",
               RAYRACK_VAGRANT_HEAD_CPUS="4", RAYRACK_VAGRANT_PROVIDER="virtualbox")
    config = dump(env)
    machines = {m["name"]: m for m in config["machines"]}
    assert list(machines) == ["head", "worker1", "worker2", "worker3"]
    assert config["default_provider"] == "virtualbox"
    assert {m["box"] for m in machines.values()} == {"generic/debian12"}
    assert machines["head"]["providers"]["libvirt"] == {"cpus": 4, "memory": 4096}
    assert machines["worker3"]["providers"]["virtualbox"]["memory"] == 6144  # the environment wins over the file
    assert machines["worker3"]["private_ips"] == ["10.77.0.13"]
    (ansible,) = machines["worker3"]["ansible"]
    assert ansible["groups"]["all:vars"] == {"rayrack_cluster_name": "rack-a", "rayrack_cluster_cidr": "10.77.0.0/24"}
    assert ansible["host_vars"]["worker3"]["ray_agent_fake_scenario"] == "builtin:demo-8gpu"
    assert ansible["host_vars"]["worker3"]["ray_node_num_gpus"] == 8


@pytest.mark.parametrize(("setting", "value", "message"), [
    ("WORKERS", "0", "workers: must be at least 1"),
    ("WORKERS", "two", "workers: must be an integer"),
    ("GPUS_PER_WORKER", "3", "gpus_per_worker: one of 2, 8"),
    ("PROVIDER", "hyperv", "provider: one of libvirt, virtualbox"),
    ("NETWORK", "10.0.0.0/29", "too small"),
])
def test_bad_settings_are_named(venv_env, setting, value, message):
    res = run_vagrant(dict(venv_env, **{f"RAYRACK_VAGRANT_{setting}": value}), "validate")
    assert res.returncode != 0
    assert message in res.stdout + res.stderr


def test_an_unknown_key_in_the_settings_file_is_named(venv_env, tmp_path: Path):
    settings = tmp_path / "vagrant.yml"
    settings.write_text("worker: 3\n")
    res = run_vagrant(dict(venv_env, RAYRACK_VAGRANT_CONFIG=str(settings)), "validate")
    assert res.returncode != 0
    assert "unknown keys worker" in res.stdout + res.stderr


def vagrant_inventory(ansible: dict) -> str:
    """The INI inventory Vagrant's Ansible provisioner writes (plugins/provisioners/ansible: generate_inventory)."""
    lines = ["# Generated by Vagrant", ""]
    for port, (name, host_vars) in enumerate(ansible["host_vars"].items(), start=2222):
        extra = " ".join(f"{k}={v}" for k, v in host_vars.items())
        lines.append(f"{name} ansible_host=127.0.0.1 ansible_port={port} ansible_user='vagrant' "
                     f"ansible_ssh_private_key_file='/nonexistent/{name}/private_key' {extra}")
    for group, members in ansible["groups"].items():
        lines.append(f"\n[{group}]")
        lines.extend(f"{k}={v}" for k, v in members.items()) if isinstance(members, dict) else lines.extend(members)
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("workers", ["2", "5"])
def test_the_generated_inventory_passes_rayrack_validation(venv_env, tmp_path: Path, workers):
    """validate.yml (controller only, no host contacted) accepts what the provisioner would hand to site.yml."""
    config = dump(dict(venv_env, RAYRACK_VAGRANT_WORKERS=workers))
    (ansible,) = config["machines"][-1]["ansible"]
    inventory = tmp_path / "vagrant_ansible_inventory"
    inventory.write_text(vagrant_inventory(ansible))
    env = dict(os.environ, ANSIBLE_CACHE_PLUGIN_CONNECTION=str(tmp_path / "facts"))
    res = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(inventory),
                          "playbooks/validate.yml"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:]
    assert f"Inventory OK: head head, {workers} worker(s)" in res.stdout

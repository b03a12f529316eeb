"""The simulated libnvidia-ml on lab workers (nvml_sim role): the node's libnvidia-ml.so.1 is the simulator,
the agent reads its GPUs with the NVML backend, and Prometheus on the head has them. RAYRACK_LAB names
another lab (default: the molecule lab, whose workers set nvml_sim_enabled)."""

from __future__ import annotations

import ipaddress
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lab as labtool

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
LAB_NAME = os.environ.get("RAYRACK_LAB", "molecule")
INVENTORY = REPO / "inventories" / LAB_NAME
LIBRARY = "/opt/rayrack/nvml-sim/libnvidia-ml.so.1"
CONFIG = "/etc/rayrack/nvml-sim.conf"

# Runs on a worker as the ray user with no environment help: ld.so must find the simulator by itself.
NVML_CLIENT = r"""
import json, pynvml
pynvml.nvmlInit()
handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
print(json.dumps({"driver": pynvml.nvmlSystemGetDriverVersion(),
                  "gpus": [[pynvml.nvmlDeviceGetUUID(h), pynvml.nvmlDeviceGetName(h)] for h in handles]}))
pynvml.nvmlShutdown()
"""



def prometheus_query(lab: labtool.Lab, promql: str) -> list[dict]:
    """The head's Prometheus's answer to one instant query (tests/lab/lab.py's client: TLS and its password)."""
    (answer,) = labtool.prometheus(lab, [("/api/v1/query", {"query": promql})])
    assert answer.get("status") == "success", (promql, answer)
    return answer["data"]["result"]


def the_lab() -> labtool.Lab:
    if not (INVENTORY / ".ssh" / "known_hosts").exists():
        pytest.fail(f"the {LAB_NAME} lab is not up: run `make integration` (it converges the lab, then runs these)")
    hosts = yaml.safe_load((INVENTORY / "hosts.yml").read_text())
    workers = len(hosts["all"]["children"]["ray_workers"]["hosts"])
    cidr = {}
    for path in sorted((INVENTORY / "group_vars" / "all").glob("*.yml")):
        cidr.update(yaml.safe_load(path.read_text()) or {})
    return labtool.Lab(LAB_NAME, workers, ipaddress.IPv4Network(cidr["rayrack_cluster_cidr"]), INVENTORY, 2)


def ssh(lab: labtool.Lab, node: labtool.Node, command: str) -> str:
    result = labtool.ssh(lab, node, command, check=False)
    assert result.returncode == 0, f"{node.name}: {command}: {result.stderr[-2000:]}"
    return result.stdout


def compiled_gpus(text: str) -> tuple[str, list[tuple[str, str]]]:
    """Driver version and (uuid, model) per GPU from the node's compiled scenario."""
    driver, uuids, models = "", [], []
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "driver_version":
            driver = value
        elif key == "uuid":
            uuids.append(value)
        elif key == "model":
            models.append(value)
    return driver, list(zip(uuids, models, strict=True))


def simulated_workers(lab: labtool.Lab) -> list[labtool.Node]:
    simulated = [
        node for node in lab.nodes[1:] if labtool.ssh(lab, node, f"sudo test -f {CONFIG}", check=False).returncode == 0
    ]
    assert simulated, f"no worker of the {LAB_NAME} lab has {CONFIG}: set nvml_sim_enabled on its workers"
    return simulated


def test_workers_read_simulated_gpus_through_nvml_and_prometheus_has_them() -> None:
    lab = the_lab()
    started = time.monotonic()
    simulated = simulated_workers(lab)
    for node in simulated:
        driver, gpus = compiled_gpus(ssh(lab, node, f"sudo cat {CONFIG}"))
        assert gpus, f"{node.name}: {CONFIG} names no GPUs"
        # ld.so.cache: the simulator comes first, ahead of any driver or Debian library.
        first = next(ln for ln in ssh(lab, node, "/sbin/ldconfig -p").splitlines() if "libnvidia-ml.so.1 " in ln)
        assert first.rstrip().endswith(LIBRARY), f"{node.name}: {first.strip()}"
        seen = json.loads(ssh(lab, node, "sudo -u ray /opt/rayrack/agent/bin/python -c " + shlex.quote(NVML_CLIENT)))
        assert seen == {"driver": driver, "gpus": [list(g) for g in gpus]}, node.name

        deadline = time.monotonic() + 60
        while True:
            info = prometheus_query(
                lab,
                f'rayrack_gpu_info{{node="{node.name}"}} * on(node) group_left(backend) '
                f'rayrack_gpu_backend_info{{node="{node.name}",backend="nvml"}}',
            )
            found = sorted((r["metric"]["uuid"], r["metric"]["model"]) for r in info)
            if found == sorted(gpus) or time.monotonic() > deadline:
                break
            time.sleep(5)
        assert found == sorted(gpus), f"{node.name}: Prometheus has {found}, the scenario {gpus}"
        assert {r["metric"]["driver_version"] for r in info} == {driver}
    print(f"checked {len(simulated)} worker(s) in {time.monotonic() - started:.1f} s")


def gpm_uuids(text: str) -> set[str]:
    """UUIDs of the GPUs that answer GPM in the node's compiled scenario (`gpm 1` in their block)."""
    found, uuid = set(), ""
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "uuid":
            uuid = value
        elif key == "gpm" and value == "1":
            found.add(uuid)
    return found


def test_gpm_from_the_simulator_reaches_prometheus_only_for_gpm_gpus() -> None:
    """The lab scenarios' Hopper GPUs report GPM through NVML: SM and tensor activity for those, nothing (and
    no GPM read errors) for the others."""
    lab = the_lab()
    simulated = [
        node for node in lab.nodes[1:] if labtool.ssh(lab, node, f"sudo test -f {CONFIG}", check=False).returncode == 0
    ]
    assert simulated, f"no worker of the {LAB_NAME} lab has {CONFIG}: set nvml_sim_enabled on its workers"
    for node in simulated:
        text = ssh(lab, node, f"sudo cat {CONFIG}")
        expected = gpm_uuids(text)
        assert expected, f"{node.name}: the lab scenario has no GPU with GPM"
        assert len(expected) < len(compiled_gpus(text)[1]), f"{node.name}: every GPU has GPM; nothing to compare"

        def query(promql: str) -> list[dict]:
            return prometheus_query(lab, promql)

        deadline = time.monotonic() + 60
        while True:
            series = {
                name: query(f'rayrack_gpu_{name}_ratio{{node="{node.name}"}}')
                for name in ("sm_active", "tensor_active")
            }
            if all({r["metric"]["uuid"] for r in s} == expected for s in series.values()):
                break
            assert time.monotonic() < deadline, f"{node.name}: GPM series {series}, GPM GPUs {expected}"
            time.sleep(5)
        for rows in series.values():
            assert all(0.0 <= float(r["value"][1]) <= 1.0 for r in rows), rows
        assert query(f'rayrack_gpu_field_errors_total{{node="{node.name}",field="gpm"}}') == []


FAULT_FILE = "/tmp/rayrack-gpu-fault-{n}.conf"
# gpu_validate on one worker: each faulty scenario through RAYRACK_NVML_SCENARIO, then the node's own (the
# library's default /etc/rayrack/nvml-sim.conf). The own scenario loses GPU1 for 30 s every 10 minutes: one
# retry after that window.
GPU_VALIDATE_PLAYBOOK = """
- name: GPU acceptance check on simulated faults
  hosts: {host}
  gather_facts: false
  become: true
  vars:
    faults: {faults}
  tasks:
    - name: Copy the faulty scenarios
      ansible.builtin.copy:
        src: "{configs}/fault-{{{{ item }}}}.conf"
        dest: "{fault_file}"
        owner: root
        group: root
        mode: "0600"
      loop: "{{{{ faults }}}}"
    - name: Check the GPUs of each faulty scenario
      rayrack.cluster.gpu_validate:
        profiles: {{}}
        dcgmi: ""
      environment:
        RAYRACK_NVML_SCENARIO: "{fault_file}"
      loop: "{{{{ faults }}}}"
      register: faulty
      failed_when: false
    - name: Check the GPUs of the node's own scenario
      rayrack.cluster.gpu_validate:
        profiles: {{}}
        dcgmi: ""
      register: own
      failed_when: false
      # The lab worker mixes an H100 and an L4, which `auto` names; anything else is a fault (or GPU 1's
      # scripted loss, retried once).
      until: >-
        own.differences | default([{{'check': 'no result'}}]) | rejectattr('check', 'eq', 'GPU models')
        | list | length == 0
      retries: 1
      delay: 35
    - name: Remove the faulty scenarios
      ansible.builtin.file:
        path: "{fault_file}"
        state: absent
      loop: "{{{{ faults }}}}"
"""


def test_gpu_validate_reads_nvml_on_a_worker_and_names_each_fault(tmp_path: Path) -> None:
    from gpu_faults import FAULTS, faulty

    lab = the_lab()
    worker = simulated_workers(lab)[0]
    # What this checks: the module on NVML alone, as on a node whose nvidia-smi cannot read the GPUs.
    assert labtool.ssh(lab, worker, "command -v nvidia-smi", check=False).returncode != 0, \
        f"{worker.name} has an nvidia-smi: this test expects a lab worker without one"
    before = ssh(lab, worker, f"sudo stat -c %Y:%s {CONFIG} && sudo sha256sum {CONFIG}")
    _, gpus = compiled_gpus(ssh(lab, worker, f"sudo cat {CONFIG}"))
    faults = list(FAULTS)
    for n, fault in enumerate(faults):
        scenario = tmp_path / f"fault-{n}.yml"
        scenario.write_text(yaml.safe_dump(faulty(fault)), encoding="utf-8")
        compiled = subprocess.run([sys.executable, "-m", "ray_agent.cli", "nvml-sim", "compile", str(scenario),
                                   str(tmp_path / f"fault-{n}.conf")], cwd=REPO, capture_output=True, text=True,
                                  check=False)
        assert compiled.returncode == 0, compiled.stderr
    playbook = tmp_path / "gpu_validate.yml"
    playbook.write_text(GPU_VALIDATE_PLAYBOOK.format(host=worker.name, faults=json.dumps(list(range(len(faults)))),
                                                     configs=tmp_path, fault_file=FAULT_FILE.format(n="{{ item }}")))
    env = dict(os.environ, ANSIBLE_CACHE_PLUGIN_CONNECTION=str(INVENTORY / ".facts"),
               ANSIBLE_STDOUT_CALLBACK="json", ANSIBLE_LOAD_CALLBACK_PLUGINS="1")
    run = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(INVENTORY),
                          str(playbook)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    tasks = {t["task"]["name"]: t["hosts"][worker.name] for t in json.loads(run.stdout)["plays"][0]["tasks"]}

    results = tasks["Check the GPUs of each faulty scenario"]["results"]
    assert len(results) == len(faults)
    for fault, result in zip(faults, results, strict=True):
        check = FAULTS[fault][1]
        # failed_when: false keeps the loop going; the module's failure is its differences and its table.
        assert [(d["check"], d["gpu"]) for d in result["differences"]] == [(check, "GPU1")], (fault, result["msg"])
        assert f"| {check}" in result["msg"], fault
        observed = result["report"]["observed"]
        # No nvidia-smi on a lab worker: NVML alone, and the report says the topology was not read.
        assert observed["read"] == ["NVML"] and "not found" in observed["unread"]["topology"], fault
        assert result["report"]["profile"] is None

    own = tasks["Check the GPUs of the node's own scenario"]
    assert [(d["check"], d["gpu"]) for d in own["differences"]] == [("GPU models", "-")], own.get("msg")
    assert own["report"]["observed"]["read"] == ["NVML"]
    assert [(g["uuid"], g["name"]) for g in own["report"]["observed"]["gpus"]] == gpus

    # The node's own configuration (and so the agent's and Ray's GPUs, and their scenario clock) is untouched.
    assert ssh(lab, worker, f"sudo stat -c %Y:%s {CONFIG} && sudo sha256sum {CONFIG}") == before
    assert ssh(lab, worker, "ls /tmp").count("rayrack-gpu-fault-") == 0

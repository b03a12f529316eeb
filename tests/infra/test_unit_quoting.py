"""Inventory values in units' command lines reach the program as one argument each, whatever they hold.

The roles' unit templates are rendered with Ansible from their own defaults and vars, with hostile values in
every inventory value that reaches an Exec*= line (an address with an IPv6 scope id and a command substitution,
spaces, quotes, backslashes, systemd's %-specifiers and $VARIABLES), and read back by systemd itself
(`systemd --test` dumps each unit's command lines as it parsed them). Validation refuses these values; the
templates must not depend on it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import required

from .conftest import ROLES, run_play

pytestmark = pytest.mark.slow

HOSTILE = "fe80::1%$(touch pwned-subst)`touch pwned-tick` \"q\" 'q' \\ %h %% $HOME ${HOME};touch pwned-semi"
# The worker's wait for the head, as the unit runs it: address and port are the script's arguments.
WAIT_SCRIPT = 'until (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; do sleep 0.5; done'
RESOURCES = {"nvme$(id)%h": 1, "x\" 'y": 2}

PLAY = f"""
- hosts: all
  gather_facts: false
  vars_files:
    - {ROLES}/rayrack/defaults/main.yml
    - {ROLES}/rayrack/vars/main.yml
    - {ROLES}/ray_node/defaults/main.yml
    - {ROLES}/ray_node/vars/main.yml
    - {ROLES}/data_cache/defaults/main.yml
    - {ROLES}/data_cache/vars/main.yml
    - {ROLES}/network_tuning/defaults/main.yml
  tasks:
    - name: The Ray unit
      ansible.builtin.template:
        src: {ROLES}/ray_node/templates/etc/systemd/system/ray.service.j2
        dest: "{{{{ out }}}}/{{{{ inventory_hostname }}}}-ray.service"
        mode: "0644"
      delegate_to: localhost
    - name: The scratch eviction unit
      ansible.builtin.template:
        src: {ROLES}/data_cache/templates/etc/systemd/system/rayrack-scratch-evict.service.j2
        dest: "{{{{ out }}}}/{{{{ inventory_hostname }}}}-evict.service"
        mode: "0644"
      delegate_to: localhost
    - name: The NIC tuning unit
      ansible.builtin.template:
        src: {ROLES}/network_tuning/templates/etc/systemd/system/rayrack-nic-tuning.service.j2
        dest: "{{{{ out }}}}/{{{{ inventory_hostname }}}}-nic.service"
        mode: "0644"
      delegate_to: localhost
      vars:
        __network_tuning_interface: "{{{{ hostile }}}}"
        network_tuning_mtu: 9000
"""


@pytest.fixture(scope="module")
def units(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("units")
    inventory = {"all": {"vars": {"ansible_connection": "local"}, "children": {
        "ray_head": {"hosts": {"head": {"ansible_host": "10.0.0.10"}}},
        "ray_workers": {"hosts": {"worker1": {"ansible_host": "10.0.0.11", "ray_node_num_gpus": 0}}}}}}
    run_play(out, inventory, PLAY, {
        "out": str(out), "hostile": HOSTILE,
        # What the inventory decides, each hostile: the head's address, a node's own, the dashboard's, a
        # resource name and the scratch limit.
        "rayrack_head_address": HOSTILE, "ray_node_ip": HOSTILE, "rayrack_ray_dashboard_host": HOSTILE,
        "ray_node_resources": RESOURCES, "_ray_node_accelerator_type": "", "data_cache_scratch_max_size": HOSTILE,
    }, {})
    return out


def _unescape(word: str) -> str:
    """One word of systemd's dump of a command line (its quote_command_line: C escapes in double quotes)."""
    if not word.startswith('"'):
        return word
    out, i, body = [], 0, word[1:-1]
    controls = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}
    while i < len(body):
        char = body[i]
        if char != "\\":
            out.append(char)
            i += 1
        elif body[i + 1] in controls:
            out.append(controls[body[i + 1]])
            i += 2
        elif body[i + 1] == "x":
            out.append(chr(int(body[i + 2:i + 4], 16)))
            i += 4
        elif body[i + 1:i + 4].isdigit():
            out.append(chr(int(body[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(body[i + 1])
            i += 2
    return "".join(out)


def _at_exec(arg: str) -> str:
    """What systemd passes when it runs the command: $$ is one $, and any other $NAME / ${NAME} would be the
    environment's (which no inventory value may cause)."""
    assert not re.search(r"(?<!\$)(\$\$)*\$(?=[A-Za-z_{])", arg), f"systemd would expand a variable in {arg!r}"
    return arg.replace("$$", "$")


def systemd_commands(unit: Path) -> dict[str, list[list[str]]]:
    """Exec*= directive -> the argv of each of its commands, as systemd parses UNIT."""
    binary = next((p for p in ("/lib/systemd/systemd", "/usr/lib/systemd/systemd") if Path(p).exists()), None)
    if binary is None:
        required.missing("systemd is not installed")
    with tempfile.TemporaryDirectory() as directory:
        # `systemd --test` refuses root; it runs as nobody, who must read the unit.
        os.chmod(directory, 0o755)
        shutil.copy(unit, Path(directory) / unit.name)
        os.chmod(Path(directory) / unit.name, 0o644)
        command = [binary, "--test", "--system", f"--unit={unit.name}", "--no-pager"]
        if os.geteuid() == 0:
            command = [required.binary("setpriv", "util-linux"), "--reuid=65534", "--regid=65534", "--clear-groups",
                       *command]
        dump = subprocess.run(command, env={**os.environ, "SYSTEMD_UNIT_PATH": f"{directory}:"},
                              capture_output=True, text=True, timeout=120).stdout
    block = re.search(rf"^\t-> Unit {re.escape(unit.name)}:\n(.*?)(?=^\t-> Unit |\Z)", dump, re.M | re.S)
    assert block, f"systemd did not load {unit.name}: {dump[-2000:]}"
    commands: dict[str, list[list[str]]] = {}
    for directive, line in re.findall(r"^\t\t-> (Exec\w+):\n((?:\t\t\t.*\n)+)", block.group(1), re.M):
        for command_line in re.findall(r"^\t\t\tCommand Line: (.*)$", line, re.M):
            words = re.findall(r'"(?:[^"\\]|\\.)*"|\S+', command_line)
            commands.setdefault(directive, []).append([_at_exec(_unescape(w)) for w in words])
    return commands


def test_worker_waits_for_the_head_with_the_address_as_an_argument(units, tmp_path):
    (wait,) = systemd_commands(units / "worker1-ray.service")["ExecStartPre"]
    assert wait == ["/usr/bin/timeout", "60", "/bin/bash", "-c", WAIT_SCRIPT, "rayrack-wait-head", HOSTILE, "6379"]
    # Run as the unit would (briefly): bash only tries to connect; no part of the address runs.
    subprocess.run(["timeout", "1", *wait[2:-1], "1"], cwd=tmp_path, capture_output=True, check=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    # The check can fail: the address inside the script's text (as the unit had it) runs its substitutions.
    inline = f"until (exec 3<>/dev/tcp/{HOSTILE}/1) 2>/dev/null; do sleep 0.5; done"
    subprocess.run(["timeout", "1", "/bin/bash", "-c", inline], cwd=tmp_path, capture_output=True, check=False)
    assert "pwned-subst" in {p.name for p in tmp_path.iterdir()}


def test_ray_start_gets_each_value_as_one_argument(units):
    (worker,) = systemd_commands(units / "worker1-ray.service")["ExecStart"]
    assert worker[:2] == ["/opt/rayrack/venv/bin/ray", "start"]
    assert f"--node-ip-address={HOSTILE}" in worker
    assert f"--address={HOSTILE}:6379" in worker
    assert f"--resources={json.dumps(RESOURCES)}" in worker
    (head,) = systemd_commands(units / "head-ray.service")["ExecStart"]
    assert f"--dashboard-host={HOSTILE}" in head and f"--node-ip-address={HOSTILE}" in head
    assert "--head" in head and not any(arg.startswith("--address=") for arg in head)


def test_scratch_eviction_gets_the_limit_verbatim(units):
    (evict,) = systemd_commands(units / "worker1-evict.service")["ExecStart"]
    assert evict[:3] == ["/usr/local/sbin/rayrack-scratch-evict", "/var/cache/rayrack", HOSTILE]
    assert set(evict[3::2]) <= {"--keep"}  # then directories it leaves alone, each one argument


def test_nic_tuning_names_the_interface_as_one_argument(units):
    (mtu,) = systemd_commands(units / "worker1-nic.service")["ExecStart"]
    assert mtu == ["/usr/sbin/ip", "link", "set", "dev", HOSTILE, "mtu", "9000"]

#!/usr/bin/env python3
"""Cluster benchmark on a dedicated lab (`bench`), every figure measured in this run.

1. site.yml from empty nodes to all nodes alive (plus the smoke job), with the project's ansible.cfg.
2. The same site.yml again (idempotent, changed=0), tuned settings.
3. The same re-run with stock Ansible settings (no ansible.cfg: no pipelining, facts gathered every play,
   5 forks). Goal: tuned / stock <= 0.5.
4. Cluster-ready time: all Ray units stopped, then started as systemd starts them, until the head sees every
   node alive; against a plain `ray start` (head, then workers, same arguments and token) on the same
   nodes. Goal: units / plain <= 1.5.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lab"))
import lab as labtool

from rayrack import inventory

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
LAB = labtool.Lab("bench", 2, labtool.ipaddress.IPv4Network("10.213.2.0/24"), REPO / "inventories" / "bench", 2)
ROUNDS = 3


@functools.cache
def lab_inventory() -> inventory.Inventory:
    return inventory.load(LAB.inventory_dir)


def ray_unit(node: labtool.Node) -> str:
    """The node's Ray unit, as the lab's inventory names it."""
    return lab_inventory().get(node.name).ray_unit

# Polls the head's state API from inside the head until `want` nodes are ALIVE; prints the wall clock then.
ALIVE_POLLER = r"""
import json, sys, time, urllib.request
want, deadline = int(sys.argv[1]), time.time() + 180
token = open("/etc/rayrack/ray_token").read().strip()
req = urllib.request.Request("http://127.0.0.1:8265/api/v0/nodes?limit=1000&detail=false",
                             headers={"Authorization": "Bearer " + token})
while time.time() < deadline:
    try:
        rows = json.load(urllib.request.urlopen(req, timeout=2))["data"]["result"]["result"]
        if len({r["node_ip"] for r in rows if r["state"] == "ALIVE"}) >= want:
            print(time.time()); sys.exit(0)
    except Exception:
        pass
    time.sleep(0.1)
sys.exit("not all nodes alive in time")
"""


def playbook(env_extra: dict[str, str]) -> tuple[float, int]:
    env = dict(os.environ, ANSIBLE_STDOUT_CALLBACK="ansible.posix.json",
               ANSIBLE_CACHE_PLUGIN_CONNECTION=str(LAB.inventory_dir / ".facts"), **env_extra)
    started = time.monotonic()
    res = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(LAB.inventory_dir), "site.yml"], cwd=REPO,
                         env=env, capture_output=True, text=True)
    elapsed = time.monotonic() - started
    if res.returncode != 0:
        sys.exit(f"site.yml failed:\n{res.stdout[-3000:]}\n{res.stderr[-2000:]}")
    stats = json.loads(res.stdout)["stats"]
    return elapsed, sum(host["changed"] for host in stats.values())


def node_exec(node: labtool.Node, *cmd: str) -> str:
    return labtool.podman("exec", node.container, *cmd, capture=True).stdout


def all_alive_at(head: labtool.Node) -> float:
    return float(labtool.podman("exec", "-i", head.container, "python3", "-", str(len(LAB.nodes)),
                                input_text=ALIVE_POLLER, capture=True).stdout.strip())


def stop_units() -> None:
    for node in LAB.nodes:
        node_exec(node, "systemctl", "stop", ray_unit(node))


def unit_start_time() -> float:
    stop_units()
    head = LAB.nodes[0]
    units = {n.name: ray_unit(n) for n in LAB.nodes}
    t0 = time.time()
    procs = [subprocess.Popen(["podman", "exec", n.container, "systemctl", "start", "--no-block",
                               units[n.name]]) for n in LAB.nodes]
    for p in procs:
        p.wait()
    return all_alive_at(head) - t0


def unit_command(node: labtool.Node) -> list[str]:
    """The unit's own `ray start` arguments, without --block: what an admin would type."""
    unit = ray_unit(node)
    text = node_exec(node, "systemctl", "cat", unit)
    exec_start = text.split("ExecStart=", 1)[1].split("\n# ", 1)[0]
    args = [a.strip().strip("'\"") for a in exec_start.replace("\\\n", " ").split()]
    return [a for a in args if a and a != "--block"]


def plain_start_time(commands: dict[str, list[str]]) -> float:
    stop_units()
    head, workers = LAB.nodes[0], LAB.nodes[1:]
    # The units' own environment (token, TLS, PATH, HOME), as a shell on the node gets it.
    as_ray = ["runuser", "-u", "ray", "--", "sh", "-c", 'set -a; . /etc/rayrack/ray.env; set +a; exec "$@"', "sh"]
    t0 = time.time()
    node_exec(head, *as_ray, *commands[head.name])
    procs = [subprocess.Popen(["podman", "exec", w.container, *as_ray, *commands[w.name]],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for w in workers]
    for p in procs:
        p.wait()
    ready = all_alive_at(head) - t0
    for node in LAB.nodes:
        node_exec(node, *as_ray, "ray", "stop", "--force")
    return ready


def main() -> int:
    labtool.down(LAB, remove_image=False)
    labtool.up(LAB, ca_dir=Path("/usr/local/share/ca-certificates"))
    try:
        cold, cold_changed = playbook({})
        reruns = [playbook({}) for _ in range(ROUNDS)]
        with tempfile.NamedTemporaryFile("w", suffix=".cfg") as stock_cfg:
            # Only what finds the kit's content: its roles, and its plugins as rayrack.cluster.
            stock_cfg.write(f"[defaults]\nroles_path = {REPO / 'roles'}\ncollections_path = {REPO / '.collections'}\n")
            stock_cfg.flush()
            stock = [playbook({"ANSIBLE_CONFIG": stock_cfg.name}) for _ in range(ROUNDS)]
        if any(changed for _, changed in reruns + stock):
            sys.exit(f"re-runs were not idempotent: {reruns} {stock}")
        commands = {n.name: unit_command(n) for n in LAB.nodes}
        units = sorted(unit_start_time() for _ in range(ROUNDS))
        plain = sorted(plain_start_time(commands) for _ in range(ROUNDS))
        # Leave the lab as site.yml made it.
        for node in LAB.nodes:
            node_exec(node, "systemctl", "start", ray_unit(node))
    finally:
        labtool.down(LAB, remove_image=False)

    rerun = sorted(t for t, _ in reruns)[ROUNDS // 2]
    stock_rerun = sorted(t for t, _ in stock)[ROUNDS // 2]
    unit_ready, plain_ready = units[ROUNDS // 2], plain[ROUNDS // 2]
    rows = [
        ("site.yml, empty nodes to all alive + smoke", f"{cold:.1f} s", f"changed={cold_changed}"),
        ("site.yml re-run, tuned (median of 3)", f"{rerun:.1f} s", "changed=0"),
        ("site.yml re-run, stock Ansible (median of 3)", f"{stock_rerun:.1f} s", "changed=0"),
        ("  ratio tuned / stock (goal <= 0.5)", f"{rerun / stock_rerun:.2f}",
         "PASS" if rerun / stock_rerun <= 0.5 else "MISS"),
        ("cluster ready, systemd units (median of 3)", f"{unit_ready:.1f} s", ""),
        ("cluster ready, plain ray start (median of 3)", f"{plain_ready:.1f} s", ""),
        ("  ratio units / plain (goal <= 1.5)", f"{unit_ready / plain_ready:.2f}",
         "PASS" if unit_ready / plain_ready <= 1.5 else "MISS"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>8}  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Cluster benchmark on a dedicated lab (`bench`), every figure measured in this run.

1. site.yml from empty nodes to all nodes alive (plus the smoke job), with the project's ansible.cfg. Goal: <= 120 s.
2. The same site.yml again (idempotent, changed=0), tuned settings. Goal: <= 45 s.
3. The same re-run with rayrack_smoke=on_change (the smoke job skipped: no Ray node restarted), and with the opt-in
   Mitogen strategy (rayrack.cluster.mitogen_linear), whose deprecation warning is reported.
4. The same re-run with stock Ansible settings (no ansible.cfg: no pipelining, facts gathered every play,
   5 forks). Goal: tuned / stock <= 0.5.
5. Drift: one file changed and one unit stopped on one node; the re-run must change them back.
6. Cluster-ready time: all Ray units stopped, then started as systemd starts them, until the head sees every
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
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))


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


MITOGEN = {"ANSIBLE_STRATEGY": "rayrack.cluster.mitogen_linear"}
# What the drift step changes on its node, and must find put back.
DRIFT_FILE = "/etc/rayrack/ray-agent.yml"
DRIFT_UNIT = "prometheus-node-exporter.service"
LAST_OUTPUT = {"stdout": "", "stderr": ""}
# What the smoke role says when rayrack_smoke=on_change skips the job.
SMOKE_SKIPPED = "nothing changed since the last smoke job"


def playbook(env_extra: dict[str, str], *args: str) -> tuple[float, int]:
    env = dict(os.environ, ANSIBLE_STDOUT_CALLBACK="ansible.posix.json",
               ANSIBLE_CACHE_PLUGIN_CONNECTION=str(LAB.inventory_dir / ".facts"), **env_extra)
    started = time.monotonic()
    res = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(LAB.inventory_dir), "site.yml", *args], cwd=REPO,
                         env=env, capture_output=True, text=True)
    elapsed = time.monotonic() - started
    if res.returncode != 0:
        sys.exit(f"site.yml failed:\n{res.stdout[-3000:]}\n{res.stderr[-2000:]}")
    LAST_OUTPUT.update(stdout=res.stdout, stderr=res.stderr)
    stats = json.loads(res.stdout)["stats"]
    return elapsed, sum(host["changed"] for host in stats.values())


def median(runs: list[tuple[float, int]]) -> float:
    return sorted(t for t, _ in runs)[len(runs) // 2]


def drift_rerun() -> tuple[float, int, bool]:
    """Change DRIFT_FILE and stop DRIFT_UNIT on the last node, re-run: (seconds, changed, both put back)."""
    node = LAB.nodes[-1]
    before = node_exec(node, "sha256sum", DRIFT_FILE)
    node_exec(node, "sh", "-c", f"echo '# drift' >> {DRIFT_FILE}")
    node_exec(node, "systemctl", "stop", DRIFT_UNIT)
    elapsed, changed = playbook({})
    state = labtool.podman("exec", node.container, "systemctl", "is-active", DRIFT_UNIT, capture=True,
                           check=False).stdout.strip()
    return elapsed, changed, node_exec(node, "sha256sum", DRIFT_FILE) == before and state == "active"


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


# A head with rayrack_gcs_ft starts through the unit's wrapper, which reads Redis' password from the unit's
# credential: the plain start gets the same file, the ray user's alone, while it runs.
CREDENTIALS = "/run/rayrack-bench-credentials"


def plain_start_time(commands: dict[str, list[str]]) -> float:
    stop_units()
    head, workers = LAB.nodes[0], LAB.nodes[1:]
    # The units' own environment (token, TLS, PATH, HOME), as a shell on the node gets it.
    as_ray = ["runuser", "-u", "ray", "--", "sh", "-c", 'set -a; . /etc/rayrack/ray.env; set +a; exec "$@"', "sh"]
    head_env = []
    password = LAB.inventory_dir / ".secrets" / "gcs_store.password"
    if any(arg.endswith("ray-start-with-store") for arg in commands[head.name]):
        labtool.podman("exec", "-i", head.container, "sh", "-c",
                       f"install -d -o ray -m 0500 {CREDENTIALS} && install -o ray -m 0400 /dev/stdin "
                       f"{CREDENTIALS}/gcs_store", input_text=password.read_text(), capture=True)
        head_env = ["env", f"CREDENTIALS_DIRECTORY={CREDENTIALS}"]
    try:
        t0 = time.time()
        node_exec(head, *as_ray, *head_env, *commands[head.name])
        procs = [subprocess.Popen(["podman", "exec", w.container, *as_ray, *commands[w.name]],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for w in workers]
        for p in procs:
            p.wait()
        ready = all_alive_at(head) - t0
    finally:
        node_exec(head, "rm", "-rf", CREDENTIALS)
    for node in LAB.nodes:
        node_exec(node, *as_ray, "ray", "stop", "--force")
    return ready


def report(name: str, value: str, note: str = "") -> None:
    """One row, printed as soon as it is measured: a later step that fails keeps the earlier figures."""
    print(f"{name:<66}  {value:>8}  {note}", flush=True)


def main() -> int:
    print(f"load average (1, 5, 15 min) at the start {os.getloadavg()}; {os.cpu_count()} CPUs", flush=True)
    of = f"(median of {ROUNDS})"
    labtool.down(LAB, remove_image=False)
    labtool.up(LAB, ca_dir=Path("/usr/local/share/ca-certificates"))
    try:
        cold, cold_changed = playbook({})
        report("site.yml, empty nodes to all alive + smoke (goal <= 120 s)", f"{cold:.1f} s",
               f"changed={cold_changed} {'PASS' if cold <= 120 else 'MISS'}")
        reruns = [playbook({}) for _ in range(ROUNDS)]
        rerun = median(reruns)
        report(f"site.yml re-run, tuned {of} (goal <= 45 s)", f"{rerun:.1f} s",
               f"changed={max(c for _, c in reruns)} {'PASS' if rerun <= 45 else 'MISS'}")
        on_change = [playbook({}, "-e", "rayrack_smoke=on_change") for _ in range(ROUNDS)]
        skipped = SMOKE_SKIPPED in LAST_OUTPUT["stdout"]
        report(f"  with rayrack_smoke=on_change {of}", f"{median(on_change):.1f} s",
               f"changed={max(c for _, c in on_change)}, smoke job {'skipped' if skipped else 'RAN (not skipped)'}")
        mitogen = [playbook(MITOGEN) for _ in range(ROUNDS)]
        report(f"  with rayrack.cluster.mitogen_linear {of}", f"{median(mitogen):.1f} s",
               f"changed={max(c for _, c in mitogen)}, ratio to tuned {median(mitogen) / rerun:.2f}"
               + (", ansible-core's deprecation warning printed" if "deprecated" in LAST_OUTPUT["stderr"] else ""))
        with tempfile.NamedTemporaryFile("w", suffix=".cfg") as stock_cfg:
            # Only what finds the kit's content: its roles, and its plugins as rayrack.cluster.
            stock_cfg.write(f"[defaults]\nroles_path = {REPO / 'roles'}\ncollections_path = {REPO / '.collections'}\n")
            stock_cfg.flush()
            stock = [playbook({"ANSIBLE_CONFIG": stock_cfg.name}) for _ in range(ROUNDS)]
        stock_rerun = median(stock)
        report(f"site.yml re-run, stock Ansible {of}", f"{stock_rerun:.1f} s", f"changed={max(c for _, c in stock)}")
        report("  ratio tuned / stock (goal <= 0.5)", f"{rerun / stock_rerun:.2f}",
               "PASS" if rerun / stock_rerun <= 0.5 else "MISS")
        if any(changed for _, changed in reruns + on_change + mitogen + stock):
            sys.exit("re-runs were not idempotent")
        drift_secs, drift_changed, drift_fixed = drift_rerun()
        report(f"re-run after drift ({DRIFT_FILE} edited, {DRIFT_UNIT} stopped)", f"{drift_secs:.1f} s",
               f"changed={drift_changed} {'PASS: both put back' if drift_fixed else 'FAIL: not put back'}")
        commands = {n.name: unit_command(n) for n in LAB.nodes}
        unit_ready = sorted(unit_start_time() for _ in range(ROUNDS))[ROUNDS // 2]
        report(f"cluster ready, systemd units {of}", f"{unit_ready:.1f} s")
        plain_ready = sorted(plain_start_time(commands) for _ in range(ROUNDS))[ROUNDS // 2]
        report(f"cluster ready, plain ray start {of}", f"{plain_ready:.1f} s")
        report("  ratio units / plain (goal <= 1.5)", f"{unit_ready / plain_ready:.2f}",
               "PASS" if unit_ready / plain_ready <= 1.5 else "MISS")
        # Leave the lab as site.yml made it.
        for node in LAB.nodes:
            node_exec(node, "systemctl", "start", ray_unit(node))
    finally:
        labtool.down(LAB, remove_image=False)
    print(f"load average (1, 5, 15 min) at the end {os.getloadavg()}", flush=True)
    return 0 if drift_fixed else 1


if __name__ == "__main__":
    sys.exit(main())

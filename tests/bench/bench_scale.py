#!/usr/bin/env python3
"""How site.yml's cost grows with the node count, every figure measured in this run (`make bench-scale`).

For labs of 2, 4 and 8 workers (lighter nodes: one CPU for Ray, a small object store, the simulated GPUs), in
one dedicated lab (`scale`) rebuilt per size:
- the cold converge (empty nodes to all alive plus the smoke job) and the idempotent re-run, wall time and the
  controller's CPU;
- the marginal cost per added node (least squares over the sizes), and a projection to 100 and 500 nodes at the
  shipped `forks` (past `forks` nodes each task runs in waves of `forks`: the projection adds those waves);
- every task whose wall time grows faster than the node count between the smallest and largest lab (on a
  host whose CPUs the nodes share, a task with work linear in the nodes takes wall time linear in them too; one
  whose work grows with the square, e.g. every node pinging every other, stands out above that);
- the size of what the converge generates per node count: Prometheus' configuration and targets, the firewall's
  rules, the NFS exports.
"""

from __future__ import annotations

import argparse
import configparser
import json
import math
import os
import resource
import subprocess
import sys
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lab"))
import lab as labtool

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SUBNET = labtool.ipaddress.IPv4Network("10.213.5.0/24")
SIZES = (2, 4, 8)
PROJECT = (100, 500)
# A task is named when its time grows by more than this factor over the node count's growth (noise allowance).
SUPERLINEAR_SLACK = 1.5
# Tasks shorter than this in the largest lab are left out of the growth table: their ratio is noise.
MIN_TASK_SECONDS = 0.5
LIGHT = {
    # One CPU and a small object store per node: the 2-core lab host carries up to 9 of them.
    "ray_node_num_cpus": 1,
    "ray_node_object_store_memory": 100 * 1024 * 1024,
}
# What the converge generates, on the head (Prometheus, NFS server) and on a worker (firewall).
GENERATED = {
    "Prometheus configuration": ("head", "cat /etc/prometheus/prometheus.yml /etc/prometheus/file_sd/*"),
    "firewall rules": ("worker", "cat /etc/nftables.d/rayrack.nft"),
    "NFS exports": ("head", "cat /etc/ganesha/ganesha.conf /etc/exports 2>/dev/null; true"),
}


def shipped_forks() -> int:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "ansible.cfg")
    return cfg.getint("defaults", "forks")


def playbook(lab: labtool.Lab) -> dict:
    """site.yml on LAB: wall seconds, controller CPU seconds, changed, and each task's wall seconds by name."""
    env = dict(os.environ, ANSIBLE_STDOUT_CALLBACK="ansible.posix.json",
               ANSIBLE_CACHE_PLUGIN_CONNECTION=str(lab.inventory_dir / ".facts"))
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    res = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(lab.inventory_dir), "site.yml"], cwd=REPO,
                         env=env, capture_output=True, text=True)
    wall = time.monotonic() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode != 0:
        sys.exit(f"site.yml failed on {len(lab.nodes)} nodes:\n{res.stdout[-3000:]}\n{res.stderr[-2000:]}")
    report = json.loads(res.stdout)
    tasks: dict[str, float] = defaultdict(float)
    for play in report["plays"]:
        for task in play["tasks"]:
            span = task["task"]["duration"]
            tasks[task["task"]["name"]] += duration(span)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return {"wall": wall, "cpu": cpu,
            "changed": sum(h["changed"] for h in report["stats"].values()), "tasks": dict(tasks)}


def duration(span: dict) -> float:
    """Seconds between the json callback's ISO 8601 start and end (a skipped play has no end)."""
    if not span.get("end"):
        return 0.0
    return (datetime.fromisoformat(span["end"]) - datetime.fromisoformat(span["start"])).total_seconds()


def generated_sizes(lab: labtool.Lab) -> dict[str, int]:
    head, worker = lab.nodes[0], lab.nodes[-1]
    sizes = {}
    for name, (where, command) in GENERATED.items():
        node = head if where == "head" else worker
        out = labtool.podman("exec", node.container, "sh", "-c", command, capture=True, check=False).stdout
        sizes[name] = len(out.encode())
    return sizes


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least squares: (intercept, slope)."""
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return my - slope * mx, slope


def project(intercept: float, slope: float, nodes: int, forks: int) -> float:
    """The fitted line, plus the waves past `forks`: each wave repeats the per-task floor (the intercept's share
    that is per task, not per node), which the line measured below `forks` cannot show."""
    waves = math.ceil(nodes / forks)
    return intercept * waves + slope * nodes


def measure(workers: int) -> dict:
    lab = labtool.Lab("scale", workers, SUBNET, REPO / "inventories" / "scale", 2)
    labtool.down(lab, remove_image=False)
    labtool.up(lab, ca_dir=Path("/usr/local/share/ca-certificates"))
    try:
        light = lab.inventory_dir / "group_vars" / "all" / "scale.yml"
        light.write_text("# Lighter nodes for tests/bench/bench_scale.py.\n" + json.dumps(LIGHT, indent=2) + "\n")
        cold = playbook(lab)
        rerun = playbook(lab)
        if rerun["changed"]:
            sys.exit(f"the re-run on {len(lab.nodes)} nodes changed {rerun['changed']} task(s)")
        sizes = generated_sizes(lab)
    finally:
        labtool.down(lab, remove_image=False)
    return {"nodes": len(lab.nodes), "cold": cold, "rerun": rerun, "sizes": sizes, "load": os.getloadavg()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=list(SIZES),
                        help="worker counts to measure (default: %(default)s)")
    args = parser.parse_args()
    if len(args.workers) < 2 or min(args.workers) < 1:
        parser.error("--workers: at least two sizes, each at least 1")
    forks = shipped_forks()
    results = [measure(w) for w in sorted(args.workers)]

    print(f"{os.cpu_count()} CPUs; forks={forks} (ansible.cfg)")
    print(f"{'nodes':>5}  {'cold s':>7}  {'re-run s':>8}  {'re-run CPU s':>12}  load after")
    for r in results:
        print(f"{r['nodes']:>5}  {r['cold']['wall']:>7.1f}  {r['rerun']['wall']:>8.1f}  {r['rerun']['cpu']:>12.1f}  "
              f"{' '.join(f'{x:.1f}' for x in r['load'])}")
    for phase in ("cold", "rerun"):
        intercept, slope = fit([(r["nodes"], r[phase]["wall"]) for r in results])
        cpu_slope = fit([(r["nodes"], r[phase]["cpu"]) for r in results])[1]
        projections = ", ".join(f"{n} nodes ~{project(intercept, slope, n, forks) / 60:.0f} min" for n in PROJECT)
        print(f"{phase}: {slope:.1f} s wall and {cpu_slope:.1f} s controller CPU per added node; {projections}")

    small, large = results[0], results[-1]
    growth = large["nodes"] / small["nodes"]
    print(f"\nTasks of the re-run growing faster than the node count ({small['nodes']} -> {large['nodes']} nodes, "
          f"x{growth:.1f}; named above x{growth * SUPERLINEAR_SLACK:.1f}):")
    named = 0
    for name, seconds in sorted(large["rerun"]["tasks"].items(), key=lambda kv: -kv[1]):
        before = small["rerun"]["tasks"].get(name, 0.0)
        if seconds >= MIN_TASK_SECONDS and before > 0 and seconds / before > growth * SUPERLINEAR_SLACK:
            print(f"  {seconds:6.2f} s (x{seconds / before:.1f})  {name}")
            named += 1
    if not named:
        print("  none")

    print("\nGenerated configuration, bytes:")
    names = list(GENERATED)
    print(f"{'nodes':>5}  " + "  ".join(f"{n:>24}" for n in names))
    for r in results:
        print(f"{r['nodes']:>5}  " + "  ".join(f"{r['sizes'][n]:>24}" for n in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())

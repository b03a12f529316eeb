"""rayrack smoke job: one num_gpus=1 task pinned to each GPU node, reporting where it ran and what it got.

The driver writes a marker file with a fresh token into the shared tree's smoke directory (--markers); every
task must read it back there, which shows that node sees the head's writes to the shared tree.

Prints one line `RAYRACK_SMOKE <json>` and exits non-zero when any expected node ran nothing or could not read
the marker.
"""

import argparse
import json
import os
import socket
import sys
import uuid
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


@ray.remote(num_gpus=1)
def probe(marker: str) -> dict:
    try:
        shared = Path(marker).read_text().strip()
    except OSError as exc:
        shared = f"unreadable: {exc}"
    return {
        "node_ip": ray.util.get_node_ip_address(),
        "hostname": socket.gethostname(),
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "cwd": os.getcwd(),
        "shared": shared,
        "hf_home": os.environ.get("HF_HOME"),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--expect", nargs="*", default=[], help="node IPs that must run a GPU task")
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--markers", type=Path, required=True, help="a directory on the shared tree")
    args = parser.parse_args()

    marker = args.markers / f"rayrack-smoke-{uuid.uuid4().hex}.marker"
    token = uuid.uuid4().hex
    marker.write_text(token + "\n")
    try:
        return run(args, str(marker), token)
    finally:
        marker.unlink(missing_ok=True)


def run(args: argparse.Namespace, marker: str, token: str) -> int:
    ray.init()
    gpu_nodes = {n["NodeManagerAddress"]: n["NodeID"] for n in ray.nodes()
                 if n["Alive"] and n["Resources"].get("GPU", 0) >= 1}
    missing = sorted(set(args.expect) - set(gpu_nodes))
    refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote(marker)
            for ip, node_id in sorted(gpu_nodes.items()) if not args.expect or ip in args.expect]
    results = ray.get(refs, timeout=args.timeout)
    ran_on = {r["node_ip"] for r in results}
    missing += sorted(set(args.expect) - ran_on - set(missing))
    unshared = sorted(r["hostname"] for r in results if r["shared"] != token)
    print("RAYRACK_SMOKE " + json.dumps({"results": results, "missing": missing, "unshared": unshared,
                                          "markers": str(args.markers)}), flush=True)
    return 1 if missing or unshared or any(not r["gpu_ids"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

"""rayrack smoke job: one num_gpus=1 task pinned to each GPU node, reporting where it ran and what it got.

Prints one line `RAYRACK_SMOKE <json>` and exits non-zero when any expected node ran nothing.
"""

import argparse
import json
import os
import socket
import sys

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


@ray.remote(num_gpus=1)
def probe() -> dict:
    return {
        "node_ip": ray.util.get_node_ip_address(),
        "hostname": socket.gethostname(),
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--expect", nargs="*", default=[], help="node IPs that must run a GPU task")
    parser.add_argument("--timeout", type=float, default=120)
    args = parser.parse_args()

    ray.init()
    gpu_nodes = {n["NodeManagerAddress"]: n["NodeID"] for n in ray.nodes()
                 if n["Alive"] and n["Resources"].get("GPU", 0) >= 1}
    missing = sorted(set(args.expect) - set(gpu_nodes))
    refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote()
            for ip, node_id in sorted(gpu_nodes.items()) if not args.expect or ip in args.expect]
    results = ray.get(refs, timeout=args.timeout)
    ran_on = {r["node_ip"] for r in results}
    missing += sorted(set(args.expect) - ran_on - set(missing))
    print("RAYRACK_SMOKE " + json.dumps({"results": results, "missing": missing}), flush=True)
    return 1 if missing or any(not r["gpu_ids"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

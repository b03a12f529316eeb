"""rayrack smoke job: one num_gpus=1 task pinned to each GPU node, reporting where it ran and what it got.

The driver writes a marker file with a fresh token into the shared tree's smoke directory (--markers); every
task must read it back there, which shows that node sees the head's writes to the shared tree.

With --serve-port it also deploys a small Serve application with one replica per GPU node and asks every
Serve proxy for it (the head's, and each node's that holds a replica), then deletes it.

Prints one line `RAYRACK_SMOKE <json>` and exits non-zero when any expected node ran nothing or could not read
the marker, or a proxy did not answer.
"""

import argparse
import json
import os
import socket
import sys
import urllib.request
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
    parser.add_argument("--serve-port", type=int, help="also check Ray Serve's proxies on this port")
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
    serve = check_serve(args.serve_port, len(gpu_nodes) or 1) if args.serve_port else {}
    print("RAYRACK_SMOKE " + json.dumps({"results": results, "missing": missing, "unshared": unshared,
                                          "markers": str(args.markers), "serve": serve}), flush=True)
    failed = missing or unshared or any(not r["gpu_ids"] for r in results)
    return 1 if failed or not all(serve.values()) else 0


SMOKE_APP = "rayrack-smoke"


def check_serve(port: int, replicas: int) -> dict[str, bool]:
    """Every Serve proxy's answer (node IP -> it answered from a replica) for a throwaway application."""
    from ray import serve

    @serve.deployment(num_replicas=replicas, max_replicas_per_node=1, ray_actor_options={"num_cpus": 0})
    class Where:
        def __call__(self, request) -> str:
            return ray.util.get_node_ip_address()

    serve.run(Where.bind(), name=SMOKE_APP, route_prefix=f"/{SMOKE_APP}")
    try:
        ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
        answers = {}
        for node_id in serve.status().proxies:
            ip = ips.get(node_id, node_id)
            try:
                with urllib.request.urlopen(f"http://{ip}:{port}/{SMOKE_APP}", timeout=10) as reply:
                    answers[ip] = reply.status == 200 and bool(reply.read().strip())
            except OSError:
                answers[ip] = False
        return answers or {"no proxy": False}
    finally:
        serve.delete(SMOKE_APP)


if __name__ == "__main__":
    sys.exit(main())

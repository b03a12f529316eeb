"""A researcher's multi-node training job, as submitted with `ray job submit --working-dir`.

Two Ray Train workers on two GPU nodes (placed by Ray's accelerator type, one per node) join one gloo process
group: the same rendezvous and sockets as NCCL. They all-reduce, train a small model with DDP and write a
checkpoint to the shared tree (storage_path). A second run, on the other node alone, resumes from it.

argv: STORAGE_PATH RUN_NAME ACCELERATOR_TYPE RENDEZVOUS_TIMEOUT_S
Prints one line `RESULT {json}`.
"""

import json
import os
import sys
import tempfile

import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer, prepare_model

STEPS = 20


def weights(net):
    return [round(w, 6) for w in net.weight.detach().flatten().tolist()]


def train_loop(config):
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(rank)
    model = prepare_model(torch.nn.Linear(4, 1))
    net = getattr(model, "module", model)
    start, restored = 0, None
    # A run of the same name restarting finds its own checkpoint; a new run is told where to start from.
    checkpoint = ray.train.get_checkpoint() or (Checkpoint(config["resume_from"]) if config["resume_from"] else None)
    if checkpoint:
        with checkpoint.as_directory() as path:
            state = torch.load(os.path.join(path, "state.pt"))
        net.load_state_dict(state["model"])
        start = state["step"]
        restored = weights(net)
    # Every rank adds rank + 1: with two ranks the sum is 3 only if both took part.
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)
    nodes = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, ray.util.get_node_ip_address())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loss = torch.tensor(0.0)
    for _ in range(STEPS):
        x = torch.randn(32, 4)
        loss = ((model(x) - x.sum(dim=1, keepdim=True)) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    metrics = {"allreduce": total.item(), "world": dist.get_world_size(), "nodes": nodes, "started_at": start,
               "step": start + STEPS, "loss": loss.item(), "restored": restored, "weights": weights(net)}
    with tempfile.TemporaryDirectory() as path:
        saved = None
        if rank == 0:
            torch.save({"model": net.state_dict(), "step": start + STEPS}, os.path.join(path, "state.pt"))
            saved = Checkpoint.from_directory(path)
        ray.train.report(metrics, checkpoint=saved)


def fit(name, storage, scaling, timeout, resume=None):
    trainer = TorchTrainer(
        train_loop, train_loop_config={"resume_from": resume.path if resume else None}, scaling_config=scaling,
        torch_config=TorchConfig(backend="gloo", timeout_s=timeout),
        run_config=RunConfig(name=name, storage_path=storage, failure_config=FailureConfig(max_failures=0)))
    return trainer.fit()


def main():
    storage, name, accelerator, timeout = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    ray.init()
    # One worker on each node that has this accelerator type.
    first = fit(name, storage, ScalingConfig(num_workers=2, placement_strategy="STRICT_SPREAD",
                                             resources_per_worker={"CPU": 1, f"accelerator_type:{accelerator}": 0.01}),
                timeout)
    rank0, other = first.metrics["nodes"]
    # The other node alone resumes from the checkpoint rank 0 wrote to the shared tree.
    resumed = fit(name + "-resumed", storage, ScalingConfig(num_workers=1, resources_per_worker={
        "CPU": 1, f"node:{other}": 0.01}), timeout, resume=first.checkpoint)
    print("RESULT " + json.dumps({"first": first.metrics, "resumed": resumed.metrics,
                                  "checkpoint": first.checkpoint.path, "rank0": rank0, "other": other}), flush=True)


if __name__ == "__main__":
    main()

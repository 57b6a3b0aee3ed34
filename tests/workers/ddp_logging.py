"""Launched by tests/test_distributed.py, with torchrun (2 processes, gloo) or plainly (1).

    python ddp_logging.py ROOT MODE      MODE: log | crash | fsdp | resume
Logs a small MLP over 40 examples (each rank takes every world-th batch), queries influence,
and saves what the test compares to ROOT/result-<mode>-<world>.pt (rank 0). The model is
wrapped in DDP, or with MODE fsdp in FSDP2 (`fully_shard` on each Linear and on the root).
MODE resume logs the first half of the batches, finalizes, then a second session reopens the
log with initialize_from_log() and logs the rest.
"""

import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

import logix

N, BATCH = 40, 4


def main(root: str, mode: str) -> None:
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in (model[0], model[2]):
            fully_shard(layer)
        wrapped = fully_shard(model)  # the same object, its parameters now sharded DTensors
        assert type(model[0].weight).__name__ == "DTensor"
    else:
        wrapped = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, 6, generator=g), torch.randint(0, 3, (N,), generator=g)

    batches = [list(range(s, s + BATCH)) for s in range(0, N, BATCH)]
    # DDP needs the same number of steps on every rank: 4 batches, then 6
    sessions = [batches[:4], batches[4:]] if mode == "resume" else [batches]
    for session, part in enumerate(sessions):
        run = logix.init(f"ddp-{mode}-{world}", root_dir=root, rank=3, shard_rows=3)
        run.watch(wrapped)
        run.add_lora()
        if session:
            run.initialize_from_log()
        run.setup({"grad": ["log", "covariance"], "forward": ["covariance"],
                   "backward": ["covariance"]})
        run.save(True)
        for step, ids in enumerate(part[rank::world]):
            with run(data_id=ids):
                F.cross_entropy(wrapped(x[ids]), y[ids], reduction="sum").backward()
            wrapped.zero_grad()
            if mode == "crash" and rank == 1 and step == 3:
                run.flush()  # three steps' shards are complete and indexed, the fourth's not
                os._exit(3)
        run.finalize()

    run.eval()
    with run(data_id=["q0", "q1", "q2"]):
        F.cross_entropy(model(x[:3]), y[:3], reduction="sum").backward()
    test = run.get_log()
    full = run.compute_influence_all(test, hessian="ekfac", block_rows=8)
    top = run.compute_influence_all(test, hessian="ekfac", topk=4, block_rows=8)
    only_rank0 = run.compute_influence_all(test, hessian="kfac", gather="rank0")
    rows = {f"hessian-{kind}": run.compute_influence_all(test, hessian=kind, block_rows=8)
            for kind in ("full", "lissa")}  # curvatures fitted from the rows
    if rank == 0:
        stats = {f"{m}::{k}": run.statistics.get(m, k) for m in run.projections
                 for k in ("forward", "backward", "grad", "ekfac", "grad_peak", "ekfac_peak")}
        torch.save({"full": full, "top": top, "stats": stats, "rank0": only_rank0, **rows},
                   os.path.join(root, f"result-{mode}-{world}.pt"))
    elif only_rank0 is not None:
        raise AssertionError("gather='rank0' returned scores on another rank")


if __name__ == "__main__":
    from teardown import exit_cleanly

    main(sys.argv[1], sys.argv[2])
    exit_cleanly()

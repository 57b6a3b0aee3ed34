"""Speed-up of 2 torchrun processes over 1, for logging and for influence, on this machine.

    python benchmarks/distributed_speedup.py [--examples 8192] [--processes 2]

Each arm runs this file as a worker (`--worker`), plainly for 1 process and under
`torch.distributed.run` (gloo, CPU) for more; each process uses one intra-op thread, so the
2-process arm uses the same cores a 1-process arm with 2 threads would. Printed: seconds for
the logging pass (to finalize) and for one compute_influence_all, and the ratios.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

WIDTH, RANK, BATCH, QUERIES = 512, 32, 64, 256


def worker(root: str, examples: int, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn import functional as F

    import logix

    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(),
                          nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 10))
    wrapped = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(examples, WIDTH, generator=g), torch.randint(0, 10, (examples,), generator=g)
    run = logix.init(f"speedup-{world}", root_dir=root, rank=RANK)
    run.watch(wrapped)
    run.add_lora()
    run.setup({"grad": ["log"]})
    run.save(True)
    if dist.is_initialized():
        dist.barrier()
    start = time.perf_counter()
    for s in range(rank * BATCH, examples, BATCH * world):
        ids = list(range(s, min(s + BATCH, examples)))
        with run(data_id=ids):
            F.cross_entropy(wrapped(x[ids]), y[ids], reduction="sum").backward()
        wrapped.zero_grad()
    run.finalize()
    logging_s = time.perf_counter() - start

    run.eval()
    with run(data_id=[f"q{i}" for i in range(QUERIES)]):
        F.cross_entropy(model(x[:QUERIES]), y[:QUERIES], reduction="sum").backward()
    test = run.get_log()
    if dist.is_initialized():
        dist.barrier()
    start = time.perf_counter()
    run.compute_influence_all(test, hessian="none", topk=10, progress=False)
    influence_s = time.perf_counter() - start
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"logging_s": logging_s, "influence_s": influence_s}, f)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def launch(processes: int, root: str, examples: int) -> dict:
    out = os.path.join(root, f"result-{processes}.json")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [os.path.abspath(__file__), "--worker", root, str(examples), out]
    if processes == 1:
        command = [sys.executable] + args
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={processes}"] + args
    subprocess.run(command, check=True, env=env)
    with open(out) as f:
        return json.load(f)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=8192)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="logix-speedup-")
    one = launch(1, root, args.examples)
    many = launch(args.processes, root, args.examples)
    print(f"{args.examples} examples, 4-layer {WIDTH}-wide MLP, LoGra rank {RANK}, "
          f"{QUERIES} queries, one thread per process")
    print(f"{'':12s} {'1 process':>10s} {f'{args.processes} processes':>12s} {'speed-up':>9s}")
    for key, label in (("logging_s", "logging"), ("influence_s", "influence")):
        print(f"{label:12s} {one[key]:9.2f}s {many[key]:11.2f}s {one[key] / many[key]:8.2f}x")


if __name__ == "__main__":
    main()

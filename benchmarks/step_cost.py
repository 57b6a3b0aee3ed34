"""Per-step cost of the hooks and start()/end() on the training thread, in ms/step.

    python benchmarks/step_cost.py [--steps 200] [--rounds 7] [--threads 1] [--json out.json]

The MLP of logging_overhead.py (4 tracked 512 x 512 Linear layers, batch 64, LoGra rank 32).
Four arms, interleaved round by round in one process: a plain step (zero_grad, forward,
backward), the same step inside start()/end() with save(False) (hooks, projections, row
assembly; nothing queued for disk), with save(True) (plus handing the rows to the shard buffer;
the writer's disk work is replaced by a no-op so that only the training thread's part is
counted), and `BareMath`: the same projections and outer products with no library around them
(the floor of a hook-based logger). Each arm reports the median over rounds of the training
thread's CPU time per step (`time.thread_time`, which other processes' load barely moves), of
the wall time per step and of the minor page faults per step (fresh memory touched: each costs
about a microsecond).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _common as C  # noqa: E402


class BareMath:
    """The floor of a hook-based logger of this workload: forward hooks attached at start() and
    removed at end() (as a run does) that only project each layer's input and output gradient
    into preallocated buffers (two [64, 512] x [512, 32] GEMMs per layer), and one multiply at
    end() for the four outer products; no checks, no bookkeeping, nothing kept. Same
    start()/end() as a run."""

    def __init__(self, model, rank: int, batch: int) -> None:
        import torch

        self.layers = [m for m in model.body if isinstance(m, torch.nn.Linear)]
        g = torch.Generator().manual_seed(0)
        self.p_in = [torch.randn(rank, m.in_features, generator=g) for m in self.layers]
        self.p_out = [torch.randn(rank, m.out_features, generator=g) for m in self.layers]
        self.x = torch.empty(len(self.layers), batch, rank)
        self.dy = torch.empty(len(self.layers), batch, rank)
        self.rows = torch.empty(batch, len(self.layers), rank, rank)
        self.handles = []

    def _hook(self, i: int):
        import torch

        def backward(dy):
            torch.mm(dy, self.p_out[i].T, out=self.dy[i])

        def forward(module, inputs, output):
            with torch.no_grad():
                torch.mm(inputs[0], self.p_in[i].T, out=self.x[i])
            output.register_hook(backward)

        return forward

    def start(self, data_id) -> None:
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.layers)]

    def end(self) -> None:
        import torch

        for handle in self.handles:
            handle.remove()
        torch.mul(self.dy.transpose(0, 1).unsqueeze(3), self.x.transpose(0, 1).unsqueeze(2),
                  out=self.rows)

    def finalize(self) -> None:
        pass


def measure(steps: int, rounds: int, threads: int, rank: int = 32, batch: int = 64) -> dict:
    import torch

    import logix
    from logix.storage.writer import ShardWriter

    if threads:
        torch.set_num_threads(threads)
    model = C.make_mlp(512, 4, 10)
    g = torch.Generator().manual_seed(1)
    data = [(list(range(i * batch, (i + 1) * batch)), torch.randn(batch, 512, generator=g),
             torch.randint(0, 10, (batch,), generator=g)) for i in range(steps)]
    root = tempfile.mkdtemp(prefix="logix-step-")
    ShardWriter._write = lambda self, seq, ids, rows, tag: None  # training thread's part only

    def new_run(save: bool, project: str):
        run = logix.init(project, root_dir=root, seed=0, on_duplicate="allow")
        run.watch(model, name_filter=["body"])
        run.add_lora(rank=rank)
        run.setup({"grad": ["log"]})
        run.save(save)
        return run

    runs = {"hooks, save(False)": new_run(False, "nosave"),
            "hooks + append, save(True)": new_run(True, "save"),
            "bare math (floor)": BareMath(model, rank, batch)}

    def epoch(run):
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        cpu, wall = time.thread_time(), time.perf_counter()
        for ids, x, y in data:
            if run is not None:
                run.start(data_id=ids)
            model.zero_grad(set_to_none=True)
            C.mlp_loss(model, x, y).backward()
            if run is not None:
                run.end()
        return ((time.thread_time() - cpu) / steps * 1e3, (time.perf_counter() - wall) / steps * 1e3,
                (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps)

    arms = ["plain"] + list(runs)
    for arm in arms:  # warm-up
        epoch(runs.get(arm))
    samples = {arm: [] for arm in arms}
    for r in range(rounds):
        for arm in arms[r % len(arms):] + arms[:r % len(arms)]:
            samples[arm].append(epoch(runs.get(arm)))
    for run in runs.values():
        run.finalize()
    out = {}
    for arm, values in samples.items():
        out[arm] = {"cpu_ms": statistics.median(v[0] for v in values),
                    "wall_ms": statistics.median(v[1] for v in values),
                    "faults": statistics.median(v[2] for v in values)}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = default)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    load = os.getloadavg()
    res = measure(args.steps, args.rounds, args.threads)
    plain = res["plain"]
    print(f"MLP 4 x 512, batch 64, rank 32, {args.steps} steps x {args.rounds} rounds, torch "
          f"threads {args.threads or 'default'}; load average at start {load[0]:.2f}")
    print(f"{'arm':28s} {'cpu ms/step':>12s} {'added':>8s} {'wall ms/step':>13s} {'added':>8s} "
          f"{'page faults/step':>17s}")
    for arm, v in res.items():
        print(f"{arm:28s} {v['cpu_ms']:12.3f} {v['cpu_ms'] - plain['cpu_ms']:+8.3f} "
              f"{v['wall_ms']:13.3f} {v['wall_ms'] - plain['wall_ms']:+8.3f} {v['faults']:17.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"load": load, "args": vars(args), "results": res}, f, indent=1)


if __name__ == "__main__":
    main()

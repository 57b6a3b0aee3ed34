"""A post-hoc logging pass with and without weight gradients, against a plain forward+backward.

    python benchmarks/frozen_pass.py [--rounds 7] [--steps 20] [--threads 2] [--json out.json]

The language-model example's model (GPT-2, 6 layers x 256, eager attention, dropout off), batches
of 32 sequences of 32 tokens, LoGra rank 16 on the blocks' 24 Conv1D layers, rows saved to disk
(`save(True)`; the writer's final flush is inside the timed pass). Three arms, interleaved round by
round (the order rotating) in one process:

  plain          forward + backward with weight gradients, no LogIX
  logged         a LogIX step around forward + backward, weights needing gradients
  logged-frozen  the same inside logix.frozen(model): no weight gradient

Each arm reports the median over rounds of seconds per step; ratios are against `plain`. The
rows of `logged` and `logged-frozen` are compared bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _common import gpt2_loss, make_gpt2, median, rotate, set_threads, table  # noqa: E402

ARMS = ["plain", "logged", "logged-frozen"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=20, help="steps per arm and round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the raw numbers here")
    args = ap.parse_args()
    set_threads(args.threads)

    import torch

    import logix

    model = make_gpt2(n_layer=6, n_embd=256, n_head=4, n_positions=64, vocab_size=2048)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 2048, (32, 32), generator=g) for _ in range(args.steps)]
    root = tempfile.mkdtemp(prefix="logix-frozen-")
    runs = {}

    def new_run(arm: str, r: int):
        run = logix.init(f"{arm}-{r}", root_dir=root)
        run.watch(model, name_filter="transformer.h.")
        run.add_lora(rank=16)
        run.setup({"grad": ["log"]})
        run.save(True)
        return run

    def one_round(arm: str, r: int) -> float:
        frozen = logix.frozen(model) if arm.endswith("frozen") else _nothing()
        run = new_run(arm, r) if arm.startswith("logged") else None
        start = time.perf_counter()
        with frozen:
            for step, ids in enumerate(batches):
                if run is None:
                    gpt2_loss(model, ids).backward()
                else:
                    with run(data_id=list(range(32 * step, 32 * step + 32))):
                        gpt2_loss(model, ids).backward()
            if run is not None:
                run.finalize()
        seconds = (time.perf_counter() - start) / len(batches)
        model.zero_grad(set_to_none=True)
        if run is not None:
            runs[arm] = run
        return seconds

    one_round("plain", -1), one_round("logged", -1)  # warm-up
    times = {arm: [] for arm in ARMS}
    for r in range(args.rounds):
        for arm in rotate(ARMS, r):
            times[arm].append(one_round(arm, r))
    rows_equal = torch.equal(runs["logged"].reader().read_all()[1],
                             runs["logged-frozen"].reader().read_all()[1])
    base = median(times["plain"])
    print(table(["arm", "s / step", "vs plain"],
                [[arm, f"{median(times[arm]):.4f}", f"{median(times[arm]) / base:.3f}x"]
                 for arm in ARMS],
                title=f"GPT-2 6x256, batch 32 x 32 tokens, {args.steps} steps x {args.rounds} "
                      f"rounds, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}"))
    print(f"rows of logged and logged-frozen bit-identical: {rows_equal}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"times": times, "rows_equal": rows_equal}, f, indent=1)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    main()

"""Logging cost as the model grows: time per step and bytes per example against model width,
LoGra rank, batch size and sequence length, each beside the plain step in the same run.

    python benchmarks/scaling.py [--steps 30] [--rounds 3] [--plot DIR] [--json out.json]

Sweeps (one parameter varies, the others stay at the default in brackets):
* MLP (4 tracked width x width Linear layers + an untracked head): width 128..1024 [512],
  rank 8..64 [32], batch 16..128 [64];
* GPT-2 (2 layers, 128 wide, every Conv1D layer of the blocks tracked, rank 16): sequence length
  32..256 at batch 8.
Each point: `--steps` training steps (zero_grad, forward, backward, SGD step) plain and with
logging (fp32 logs written to disk), interleaved over `--rounds`, median milliseconds per step;
`run.finalize()` (the last flush and its fsyncs) is timed apart, since on a shared disk its
fsync can outweigh a short epoch; bytes = shard bytes on disk per logged example.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _common as C  # noqa: E402

MLP = dict(width=512, rank=32, batch=64)
SWEEPS = {
    "width": [128, 256, 512, 1024],
    "rank": [8, 16, 32, 64],
    "batch": [16, 32, 64, 128],
    "seq": [32, 64, 128, 256],
}


def point(kind: str, width: int, rank: int, batch: int, seq: int, steps: int, rounds: int,
          root: str) -> dict:
    import torch

    import logix

    g = torch.Generator().manual_seed(0)
    if kind == "mlp":
        model = C.make_mlp(width, 4, 10)
        data = [(torch.randn(batch, width, generator=g), torch.randint(0, 10, (batch,), generator=g))
                for _ in range(steps)]
        loss_fn, name_filter = C.mlp_loss, ["body"]
    else:
        model = C.make_gpt2(n_layer=2, n_embd=128, n_head=2, n_positions=seq, vocab_size=500)
        data = [(torch.randint(0, 500, (batch, seq), generator=g), None) for _ in range(steps)]
        loss_fn, name_filter = C.gpt2_loss, ["transformer.h."]
    opt = torch.optim.SGD(model.parameters(), lr=1e-5)
    counter = iter(range(10**9))

    def epoch(log: bool) -> dict:
        run, project = None, None
        if log:
            project = f"p{next(counter)}"
            run = logix.init(project, root_dir=root, seed=0)
            run.watch(model, name_filter=name_filter)
            run.add_lora(rank=rank)
            run.setup({"grad": ["log"]})
            run.save(True)
        start = time.perf_counter()
        for k, (x, y) in enumerate(data):
            if run is not None:
                run.start(data_id=[f"{k}-{i}" for i in range(batch)])
            opt.zero_grad(set_to_none=True)
            loss_fn(model, x, y).backward()
            if run is not None:
                run.end()
            opt.step()
        seconds = (time.perf_counter() - start) / steps
        out = {"s_per_step": seconds}
        if run is not None:
            start = time.perf_counter()
            run.finalize()
            out["finalize_s"] = time.perf_counter() - start
            out["bytes_per_example"] = C.dir_bytes(os.path.join(root, project, "logs"),
                                                   ".safetensors") / (steps * batch)
            shutil.rmtree(os.path.join(root, project))
        return out

    epoch(False), epoch(True)  # warm-up
    arms = {"plain": [], "logged": []}
    for r in range(rounds):
        for arm in C.rotate(list(arms), r):
            arms[arm].append(epoch(arm == "logged"))
    return {"plain_ms": statistics.median(a["s_per_step"] for a in arms["plain"]) * 1e3,
            "logged_ms": statistics.median(a["s_per_step"] for a in arms["logged"]) * 1e3,
            "ratio": statistics.median(b["s_per_step"] / a["s_per_step"]
                                       for a, b in zip(arms["plain"], arms["logged"])),
            "finalize_ms": statistics.median(a["finalize_s"] for a in arms["logged"]) * 1e3,
            "bytes_per_example": arms["logged"][0]["bytes_per_example"]}


def measure(steps: int, rounds: int, sweeps) -> dict:
    root = tempfile.mkdtemp(prefix="logix-scaling-")
    results = {}
    try:
        for name in sweeps:
            results[name] = []
            for value in SWEEPS[name]:
                if name == "seq":
                    p = point("gpt2", 128, 16, 8, value, steps, rounds, root)
                else:
                    cfg = dict(MLP, **{name: value})
                    p = point("mlp", cfg["width"], cfg["rank"], cfg["batch"], 0, steps, rounds,
                              root)
                p[name] = value
                results[name].append(p)
                print(name, json.dumps(p), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return results


def plot(results: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"width": "MLP width (rank 32, batch 64)", "rank": "LoGra rank (MLP 512, batch 64)",
              "batch": "batch size (MLP 512, rank 32)", "seq": "sequence length (GPT-2 2x128, r 16)"}
    cols = 2 if len(results) > 1 else 1
    rows = -(-len(results) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.4 * rows), squeeze=False)
    axes = axes.flatten()
    for ax in axes[len(results):]:
        ax.axis("off")
    for ax, (name, points) in zip(axes, results.items()):
        xs = [p[name] for p in points]
        ax.plot(xs, [p["plain_ms"] for p in points], "k--o", label="plain step")
        ax.plot(xs, [p["logged_ms"] for p in points], "-o", color="C0",
                label="with logging (finalize apart)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(titles[name], fontsize=8)
        ax.set_ylabel("ms / step")
        ax.grid(True, which="both", alpha=0.3)
        right = ax.twinx()
        right.plot(xs, [p["bytes_per_example"] / 1024 for p in points], ":s", color="C3",
                   label="KiB / example (fp32)")
        kib = [p["bytes_per_example"] / 1024 for p in points]
        right.set_yscale("log")
        right.set_ylim(min(kib) / 2, max(kib) * 2)
        right.set_ylabel("KiB / example on disk", color="C3")
        if name == list(results)[0]:
            lines = ax.get_lines() + right.get_lines()
            ax.legend(lines, [ln.get_label() for ln in lines], fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sweeps", default=",".join(SWEEPS))
    ap.add_argument("--plot", default=None, help="folder for logging_scaling.png")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    load = os.getloadavg()
    results = measure(args.steps, args.rounds, args.sweeps.split(","))
    print(f"\nload average at start {load[0]:.2f}")
    print(f"{'sweep':6s} {'value':>6s} {'plain ms':>9s} {'logged ms':>10s} {'ratio':>6s} "
          f"{'finalize ms':>11s} {'B/example':>10s}")
    for name, points in results.items():
        for p in points:
            print(f"{name:6s} {p[name]:6d} {p['plain_ms']:9.2f} {p['logged_ms']:10.2f} "
                  f"{p['ratio']:6.2f} {p['finalize_ms']:11.1f} {p['bytes_per_example']:10.0f}")
    if args.plot:
        os.makedirs(args.plot, exist_ok=True)
        print("plot:", plot(results, os.path.join(args.plot, "logging_scaling.png")))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"load": load, "args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()

"""GPU figures for LogIX, in one run of under 10 minutes on one CUDA device.

    python benchmarks/gpu_suite.py [--size gpt2-124m] [--parts train,influence,writer]
        [--batch 8] [--seq 512] [--rank 64] [--steps 20] [--rounds 3] [--json out.json]

Run it through `benchmarks/gpu_suite.sh`, which skips (exit 0) on a machine without CUDA.

* train: tokens/s of a GPT-2 (124M: 12 layers, 768 wide, vocab 50257) in bf16, SGD steps with
  and without LoGra logging (rank 64 per side on every Conv1D layer of the blocks, bf16 logs,
  `run.finalize()` included), interleaved rounds, the median ratio; peak GPU memory of each arm
  (`torch.cuda.max_memory_allocated`).
* influence: (train, query) pairs/s of `Attributor.compute_influence_all` (full matrix and
  top-10) on a log written directly as bf16 shards, beside the cuBLAS matmul of the same shapes
  with the rows resident on the device.
* writer: GB/s of `ShardWriter.append` from device rows (device-to-host copies into pinned
  shard buffers, non-blocking), with the disk write replaced by a no-op, and whether the
  buffers are pinned.

`--device cpu --size tiny` runs the same code at a toy size on CPU (tests use it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import _common as C  # noqa: E402

SIZES = {  # GPT-2 shapes
    "gpt2-124m": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257),
    "tiny": dict(n_layer=2, n_embd=64, n_head=2, vocab_size=128),
}
PARTS = ("train", "influence", "writer")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="gpt2-124m")
    ap.add_argument("--parts", default=",".join(PARTS),
                    help=f"comma list among: {', '.join(PARTS)}")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rank", type=int, default=64, help="LoGra rank per side")
    ap.add_argument("--steps", type=int, default=20, help="training steps per timed epoch")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--train-rows", type=int, default=262144, help="log size for influence")
    ap.add_argument("--queries", type=int, default=256)
    ap.add_argument("--writer-rows", type=int, default=4096)
    ap.add_argument("--writer-dim", type=int, default=65536)
    ap.add_argument("--root", default=None, help="where logs go (default: a temp dir)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    args.parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        ap.error(f"unknown parts {unknown}; allowed: {', '.join(PARTS)}")
    return args


def build_model(size: str, seq: int, device: str, dtype=None):
    """A GPT2LMHeadModel of the named size (eager attention, dropout off) on `device`."""
    import torch

    model = C.make_gpt2(n_positions=seq, **SIZES[size]).to(device)
    return model.to(dtype or (torch.bfloat16 if device != "cpu" else torch.float32))


def _sync(device: str) -> None:
    import torch

    if device != "cpu":
        torch.cuda.synchronize()


def _peak_reset(device: str) -> None:
    import torch

    if device != "cpu":
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device != "cpu" else float("nan")


def train_throughput(args, root: str) -> dict:
    """tokens/s with and without logging, median over interleaved rounds."""
    import torch

    import logix

    model = build_model(args.size, args.seq, args.device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    vocab = SIZES[args.size]["vocab_size"]
    batches = [torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(args.device)
               for _ in range(args.steps)]
    counter = iter(range(10**9))

    def epoch(log: bool) -> dict:
        run = None
        if log:
            run = logix.init(f"train{next(counter)}", root_dir=root, log_dtype="bfloat16",
                             seed=0)
            run.watch(model, name_filter=["transformer.h."])
            run.add_lora(rank=args.rank)
            run.setup({"grad": ["log"]})
            run.save(True)
        _peak_reset(args.device)
        _sync(args.device)
        start = time.perf_counter()
        for k, ids in enumerate(batches):
            if run is not None:
                run.start(data_id=[f"{k}-{i}" for i in range(args.batch)])
            opt.zero_grad(set_to_none=True)
            C.gpt2_loss(model, ids).backward()
            if run is not None:
                run.end()
            opt.step()
        if run is not None:
            run.finalize()
        _sync(args.device)
        seconds = time.perf_counter() - start
        return {"s": seconds, "tokens_per_s": args.steps * args.batch * args.seq / seconds,
                "peak_gib": _peak_gib(args.device),
                "row_dim": sum(p.dim for p in run.projections.values()) if run else 0}

    epoch(False), epoch(True)  # warm-up (kernels, allocator)
    rounds = {"plain": [], "logged": []}
    for r in range(args.rounds):
        for arm in C.rotate(["plain", "logged"], r):
            rounds[arm].append(epoch(arm == "logged"))
    ratio = statistics.median(b["s"] / a["s"] for a, b in zip(rounds["plain"], rounds["logged"]))
    return {"plain_tokens_per_s": statistics.median(x["tokens_per_s"] for x in rounds["plain"]),
            "logged_tokens_per_s": statistics.median(x["tokens_per_s"] for x in rounds["logged"]),
            "ratio": ratio, "plain_peak_gib": max(x["peak_gib"] for x in rounds["plain"]),
            "logged_peak_gib": max(x["peak_gib"] for x in rounds["logged"]),
            "row_dim": rounds["logged"][0]["row_dim"]}


def influence_throughput(args, root: str) -> dict:
    """Streamed scoring on the device against the matmul of the same shapes."""
    import torch

    import logix
    from benchmarks.influence_curve import queries, write_log

    run = write_log(root, args.train_rows, "bfloat16")
    q = queries(run, args.queries)
    q.grads = q.grads.to(args.device)
    attributor = logix.Attributor(run.project_dir)
    kw = dict(hessian="none", progress=False)
    attributor.compute_influence_all(q, topk=10, **kw)  # warm: page cache, sha256 check

    def timed(fn) -> float:
        _sync(args.device)
        start = time.perf_counter()
        fn()
        _sync(args.device)
        return time.perf_counter() - start

    pairs = args.train_rows * args.queries
    rows = torch.randn(min(args.train_rows, 65536), q.grads.shape[1], device=args.device)
    q.grads @ rows.T
    matmul = min(timed(lambda: q.grads @ rows.T) for _ in range(3))
    out = {"rows": args.train_rows, "queries": args.queries,
           "matmul_pairs_per_s": rows.shape[0] * args.queries / matmul}
    _peak_reset(args.device)
    out["full_pairs_per_s"] = pairs / timed(lambda: attributor.compute_influence_all(q, **kw))
    out["topk_pairs_per_s"] = pairs / timed(
        lambda: attributor.compute_influence_all(q, topk=10, **kw))
    out["peak_gib"] = _peak_gib(args.device)
    return out


def writer_throughput(args, root: str) -> dict:
    """GB/s of ShardWriter.append from device rows into pinned shard buffers."""
    import torch

    rows, dim = args.writer_rows, args.writer_dim
    from logix.storage.writer import ShardWriter

    writer = ShardWriter(root, 0, rows_per_shard=rows // 2, dim=dim, dtype=torch.bfloat16,
                         on_shard=lambda entry: None)
    writer._write = lambda *a: None  # the device-to-host path only; the disk is measured apart
    data = torch.randn(rows // 8, dim, device=args.device, dtype=torch.bfloat16)
    pinned = writer._current().is_pinned()
    writer.append(list(range(data.shape[0])), data)  # warm
    writer.flush()
    _sync(args.device)
    start = time.perf_counter()
    for k in range(8):
        writer.append(list(range(k * data.shape[0], (k + 1) * data.shape[0])), data)
    writer.flush()
    _sync(args.device)
    seconds = time.perf_counter() - start
    writer.close()
    return {"append_GBps": 8 * data.numel() * data.element_size() / seconds / 1e9,
            "pinned": pinned}


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    if args.device != "cpu" and not torch.cuda.is_available():
        print("gpu_suite: no CUDA device, skipped")
        return {}
    root = args.root or tempfile.mkdtemp(prefix="logix-gpu-")
    device_name = torch.cuda.get_device_name() if args.device != "cpu" else "cpu"
    result = {"device": device_name, "torch": torch.__version__, "args": vars(args)}
    work = {"train": train_throughput, "influence": influence_throughput,
            "writer": writer_throughput}
    for part in args.parts:
        start = time.perf_counter()
        result[part] = work[part](args, os.path.join(root, part))
        result[part]["seconds"] = time.perf_counter() - start
        print(part, json.dumps(result[part]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()

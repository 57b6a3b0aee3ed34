"""`logix build` over a small corpus against a plain training epoch of the same model on the same
batches.

    python benchmarks/build_vs_epoch.py [--files 12] [--rounds 3] [--threads 2] [--json out.json]

Corpus: the first N top-level modules of Python's standard library (shipped with Python, nothing
downloaded), one jsonl row each, cut by `logix build` into windows of 128 tokens (byte-level BPE,
vocab 2048). Model: GPT-2 4 layers x 128, eager attention, saved with save_pretrained and loaded
from that folder. Batches: 4096 padded tokens, sorted (the build's `batch_tokens`/`batching`).

  epoch   forward + mean next-token loss + backward + AdamW step over the build's batches
          (train mode, no LogIX)
  build   `logix.build.build`: LoGra rank 16 on every layer, EK-FAC statistics, frozen pass,
          texts described, finalize (flush + EK-FAC fit); reported in all and by phase

Rounds alternate which arm goes first; before each arm the benchmark waits up to 5 s for other
processes to calm down and records the cores they still keep busy. It prints every round's
times and ratio, the median of the per-round ratios (each round's two arms ran seconds apart,
under about the same load) and the load average (uptime) before and after: on a shared machine
read the ratio together with them.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import sysconfig
import tempfile
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _common import make_gpt2, quiesce, set_threads  # noqa: E402


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    set_threads(args.threads)

    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from logix.build import BuildConfig, batches, build, make_examples, read_rows
    from logix.build.commands import load_tokenizer, pad_id
    from logix.build.data import summed_nll

    root = tempfile.mkdtemp(prefix="logix-build-bench-")
    stdlib = sysconfig.get_paths()["stdlib"]
    files = [f for f in sorted(glob.glob(os.path.join(stdlib, "*.py")))
             if 20_000 < os.path.getsize(f) < 60_000][:args.files]
    data = os.path.join(root, "train.jsonl")
    with open(data, "w") as out:
        for f in files:
            out.write(json.dumps({"text": open(f, encoding="utf-8", errors="replace").read()})
                      + "\n")
    bpe = ByteLevelBPETokenizer()
    bpe.train(files, vocab_size=2048, min_frequency=2, special_tokens=["<|endoftext|>"],
              show_progress=False)
    PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                            pad_token="<|endoftext|>").save_pretrained(os.path.join(root, "tok"))
    make_gpt2(n_layer=4, n_embd=128, n_head=4, n_positions=128,
              vocab_size=2048).save_pretrained(os.path.join(root, "model"))

    def config(r):
        return BuildConfig(project=os.path.join(root, "logs", f"b{r}"),
                           model=os.path.join(root, "model"), tokenizer=os.path.join(root, "tok"),
                           data=data, max_length=128, batch_tokens=4096, batching="sorted",
                           rank=16, hessian="ekfac", device="cpu")

    cfg = config(0)
    tok = load_tokenizer(cfg.tokenizer)
    examples = make_examples(read_rows(data), tok, cfg.columns, cfg.max_length)
    planned = list(batches(examples, cfg.batch_size, cfg.batch_tokens, cfg.batching, pad_id(tok)))
    tokens = sum(len(e) for e in examples)
    print(f"corpus: {len(files)} stdlib modules -> {len(examples)} windows, {tokens} tokens, "
          f"{len(planned)} batches; load before: {load()}")

    def epoch() -> float:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(cfg.model, attn_implementation="eager")
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        start = time.perf_counter()
        for batch in planned:
            n = batch["in_loss"][:, 1:].sum()
            loss = summed_nll(model, batch) / n
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    results = {"epoch": [], "build": [], "prepare": [], "log": [], "finalize": [],
               "others_busy": []}
    for r in range(args.rounds):
        arms = ["epoch", "build"] if r % 2 == 0 else ["build", "epoch"]
        busy = {}
        for arm in arms:
            busy[arm] = quiesce()
            if arm == "epoch":
                results["epoch"].append(epoch())
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    report = build(config(r), progress=False)
                assert report.logged == len(examples)
                results["build"].append(report.seconds)
                results["prepare"].append(report.prepare_seconds)
                results["log"].append(report.log_seconds)
                results["finalize"].append(report.finalize_seconds)
        results["others_busy"].append(busy)
        print(f"round {r}: epoch {results['epoch'][-1]:6.2f} s, build {results['build'][-1]:6.2f}"
              f" s (log pass {results['log'][-1]:6.2f} s), ratio "
              f"{results['build'][-1] / results['epoch'][-1]:.2f}; cores busy with other work "
              f"before each arm: {busy}", flush=True)
    ratios = [b / e for b, e in zip(results["build"], results["epoch"])]
    log_ratios = [b / e for b, e in zip(results["log"], results["epoch"])]
    med = {k: statistics.median(v) for k, v in results.items() if k != "others_busy"}
    print(f"load after: {load()}  (threads {args.threads}, {os.cpu_count()} cores)")
    print(f"plain epoch          {med['epoch']:7.2f} s (median)")
    print(f"logix build, in all  {med['build']:7.2f} s   median ratio "
          f"{statistics.median(ratios):.2f} (rounds: {', '.join(f'{x:.2f}' for x in ratios)})")
    print(f"  the logging pass   {med['log']:7.2f} s   median ratio "
          f"{statistics.median(log_ratios):.2f}")
    for part in ("prepare", "finalize"):
        print(f"  {part:<18} {med[part]:7.2f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"raw": results, "median": med, "ratios": ratios, "examples": len(examples),
                       "tokens": tokens, "batches": len(planned), "load": load()}, f, indent=1)


if __name__ == "__main__":
    main()

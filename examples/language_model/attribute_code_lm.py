"""Which training code made the model write this? A GPT-2-style causal LM (6 layers x 256) trained
from scratch with the Hugging Face Trainer on the Python standard library's own source (shipped
with Python: nothing is downloaded), logged with LogIXCallback (LoGra rank 16, EK-FAC), then:

  1. completions generated for a few prompts, attributed: top training sequences and per-token
     heat maps (terminal, HTML, PNG, and a score file the dashboard draws);
  2. a retrieval check: 100 training sequences queried verbatim, how often each finds itself
     first, for dot and cosine scores.

    python examples/language_model/attribute_code_lm.py            # the full run (README.md)
    python examples/language_model/attribute_code_lm.py --quick    # a 1-minute smoke test
"""

from __future__ import annotations

import argparse
import glob
import os
import random
import resource
import sysconfig
import time

import torch

import logix
from logix.storage.scores import save_scores
from logix.text import heatmap_html, heatmap_png, print_heatmap, query_log, token_influence

PROMPTS = ["def __init__(self", "import os\nimport", "    for i in range(", "        raise ValueError("]


def corpus_files():
    stdlib = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(stdlib, "*.py")))  # top-level modules only
    return [f for f in files if os.path.getsize(f) < 200_000]


def build_tokenizer(files, vocab: int):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train(files, vocab_size=vocab, min_frequency=2, special_tokens=["<|endoftext|>"],
              show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def build_sequences(files, tokenizer, length: int, count: int, seed: int):
    """`count` distinct windows of `length` tokens cut from the corpus, shuffled (seeded)."""
    seen, sequences = set(), []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            ids = tokenizer(f.read())["input_ids"]
        for start in range(0, len(ids) - length + 1, length):
            window = tuple(ids[start:start + length])
            if window not in seen:
                seen.add(window)
                sequences.append(list(window))
    random.Random(seed).shuffle(sequences)
    if len(sequences) < count:
        raise SystemExit(f"the corpus gives {len(sequences)} sequences, fewer than {count}")
    return sequences[:count]


class Sequences(torch.utils.data.Dataset):
    def __init__(self, sequences):
        self.sequences = sequences

    def __len__(self):
        return len(self.sequences)

    def __getitem__(self, i):
        ids = torch.tensor(self.sequences[i])
        return {"input_ids": ids, "labels": ids, "idx": i}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check it runs")
    parser.add_argument("--root", default="logix_lm", help="LogIX root_dir (default ./logix_lm)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import (GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback,
                              TrainingArguments)
    from transformers.utils import logging as hf_logging

    from logix.integrations.huggingface import LogIXCallback

    hf_logging.set_verbosity_error()
    size = dict(n_layer=2, n_embd=64, n_seq=640, vocab=512) if args.quick else \
        dict(n_layer=6, n_embd=256, n_seq=10_000, vocab=2048)
    length, rank, seed = 32, 16, 0
    times = {}
    clock = time.perf_counter()

    files = corpus_files()
    tokenizer = build_tokenizer(files, size["vocab"])
    sequences = build_sequences(files, tokenizer, length, size["n_seq"], seed)
    times["data"] = time.perf_counter() - clock
    print(f"corpus: {len(files)} stdlib modules -> {len(sequences):,} distinct sequences of "
          f"{length} tokens (BPE vocab {size['vocab']}), {times['data']:.0f}s")

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=size["n_layer"], n_embd=size["n_embd"], n_head=4,
                        vocab_size=size["vocab"], n_positions=64, bos_token_id=0, eos_token_id=0,
                        attn_implementation="eager")
    model = GPT2LMHeadModel(config)
    print(f"model: GPT-2, {config.n_layer} layers x {config.n_embd}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")

    run = logix.init("stdlib_lm", root_dir=args.root)
    run.watch(model, name_filter="transformer.h.")  # the blocks' Conv1D layers
    run.add_lora(rank=rank)
    run.setup({"grad": ["log"], "forward": ["covariance"], "backward": ["covariance"]})
    run.save(True)
    batch = 32
    plan = run.resource_plan(examples=len(sequences), tokens_per_example=length, model=model,
                             batch_size=batch)

    epoch_times = []

    class EpochTimer(TrainerCallback):
        def on_epoch_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_epoch_end(self, *a, **k):
            epoch_times.append(time.perf_counter() - self.start)

    trainer = Trainer(model=model, train_dataset=Sequences(sequences),
                      callbacks=[EpochTimer(), LogIXCallback(run, data_id_column="idx")],
                      args=TrainingArguments(
                          output_dir=os.path.join(args.root, "trainer"), num_train_epochs=2,
                          per_device_train_batch_size=batch, learning_rate=1e-3,
                          warmup_steps=30, weight_decay=0.01, lr_scheduler_type="cosine",
                          logging_steps=100, save_strategy="no", report_to=[], seed=seed,
                          use_cpu=True, remove_unused_columns=False, disable_tqdm=True))
    clock = time.perf_counter()
    trainer.train()  # epoch 1 plain, epoch 2 logged (LogIXCallback logs the last epoch)
    times["train"] = time.perf_counter() - clock
    times["epoch_plain"], times["epoch_logged"] = epoch_times
    times["finalize"] = times["train"] - sum(epoch_times)  # on_train_end: flush + EK-FAC fit
    reader = run.reader()
    disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(run.project_dir)
               for f in fs)
    print(f"training: epoch 1 (no logging) {times['epoch_plain']:.0f}s, epoch 2 (logged) "
          f"{times['epoch_logged']:.0f}s, finalize (flush + EK-FAC fit) {times['finalize']:.0f}s;"
          f" {reader.rows:,} rows x {reader.dim} numbers, log on disk {disk / 2**20:.0f} MiB")
    low, planned, high = plan.logging_seconds
    print(f"the plan's logged pass: {planned:.0f}s (middle half {low:.0f}-{high:.0f}s), "
          f"{planned / times['epoch_logged'] - 1:+.0%} against the logged epoch")

    # ---------------------------------------------------------------- generated completions
    model.eval()
    run.eval()
    clock = time.perf_counter()
    completions = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0)
        completions.append(out[0, ids.shape[1]:])
    log = query_log(run, model, PROMPTS, completions, tokenizer=tokenizer, per_token=True,
                    data_ids=[f"prompt{i}" for i in range(len(PROMPTS))])
    result = token_influence(run, log, hessian="ekfac", progress=False)
    times["query"] = time.perf_counter() - clock
    print(f"\n{len(PROMPTS)} completions attributed (generation, query log, per-token EK-FAC "
          f"scores against {reader.rows:,} rows): {times['query']:.1f}s")
    out_dir = os.path.join(run.project_dir, "scores")
    os.makedirs(out_dir, exist_ok=True)
    for q, prompt in enumerate(PROMPTS):
        text = tokenizer.decode(completions[q])
        print(f"\n=== prompt {prompt!r} -> completion {text!r}")
        top = result["influence"][q].topk(3)
        for score, column in zip(top.values.tolist(), top.indices.tolist()):
            train_id = result["tgt_ids"][column]
            print(f"  {score:+.3e}  #{train_id}: {tokenizer.decode(sequences[train_id])!r}")
        print_heatmap(result, query=q)
    heatmap_html(result, query=0, path=os.path.join(out_dir, "prompt0.html"))
    heatmap_png(result, os.path.join(out_dir, "prompt0.png"), query=0, width=60)
    save_scores(os.path.join(out_dir, "completions.safetensors"), result)
    run.describe(list(range(len(sequences))), texts=[tokenizer.decode(s) for s in sequences])

    # ---------------------------------------------------------------- verbatim retrieval
    picks = random.Random(1).sample(range(len(sequences)), 100)
    clock = time.perf_counter()
    verbatim = query_log(run, model, [sequences[i][:1] for i in picks],
                         [sequences[i][1:] for i in picks], data_ids=picks, batch_size=50)
    for mode in ("dot", "cosine"):
        scores = run.compute_influence_all(verbatim, mode=mode, hessian="ekfac",
                                           progress=False)
        tgt = scores["tgt_ids"]
        hits = sum(tgt[int(scores["influence"][n].argmax())] == i for n, i in enumerate(picks))
        print(f"verbatim retrieval ({mode}, EK-FAC): {hits}/100 queries find themselves first")
    times["retrieval"] = time.perf_counter() - clock
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(f"\nwall times (s): {', '.join(f'{k} {v:.1f}' for k, v in times.items())}; "
          f"peak RSS {peak:.0f} MiB; torch threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()

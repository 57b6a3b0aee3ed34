"""Which training code made the model write this? A GPT-2-style causal LM (6 layers x 256) trained
from scratch with the Hugging Face Trainer on the Python standard library's own source (shipped
with Python: nothing is downloaded), its training corpus logged afterwards with `logix build`
(LoGra rank 16, EK-FAC; timed against a plain training epoch), then:

  1. completions generated for a few prompts, attributed: top training sequences, per-token heat
     maps of the completion (terminal, HTML, PNG) and of the best training sequence's own tokens
     (`train_token_scores`), in a score file the dashboard draws;
  2. a retrieval check: 100 training sequences queried verbatim, how often each finds itself
     first, for dot and cosine scores.

    python examples/language_model/attribute_code_lm.py            # the full run (README.md)
    python examples/language_model/attribute_code_lm.py --quick    # a 1-minute smoke test
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import resource
import sysconfig
import time

import torch

import logix
from logix.storage.scores import save_scores
from logix.text import (attach_train_tokens, heatmap_html, heatmap_png, print_heatmap, query_log,
                        token_influence, train_token_scores)

PROMPTS = ["def __init__(self", "import os\nimport", "    for i in range(", "        raise ValueError("]
PROJECT = "stdlib_lm"


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
    """`count` distinct windows of `length` tokens cut from the corpus, shuffled (seeded); only
    windows whose text tokenizes back to them, so that `logix build` (which tokenizes the
    text) logs exactly the sequences the model was trained on."""
    seen, sequences = set(), []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            ids = tokenizer(f.read())["input_ids"]
        for start in range(0, len(ids) - length + 1, length):
            window = tuple(ids[start:start + length])
            if window not in seen and \
                    tokenizer(tokenizer.decode(window))["input_ids"] == list(window):
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
        return {"input_ids": ids, "labels": ids}


def logix_build(project: str, model_dir: str, corpus: str, length: int, batch: int,
                rank: int) -> float:
    """`logix build` over the corpus file (the command's own entry point, run in this process so
    that the time is the build's, not an interpreter start); its wall time: model load, the
    frozen logging pass, EK-FAC fit, texts described."""
    from logix.cli import main as logix_command

    argv = ["build", project, "--model", model_dir, "--data", corpus, "--id-column", "id",
            "--max-length", str(length), "--batch-size", str(batch), "--rank", str(rank),
            "--hessian", "ekfac", "--name-filter", "transformer.h.", "--no-progress"]
    print("$ logix " + " ".join(argv))
    clock = time.perf_counter()
    if logix_command(argv) != 0:
        raise SystemExit("logix build failed")
    return time.perf_counter() - clock


def sequence_of(data_id: str) -> int:
    """The sequence number of a built example id: row "<id>:<window>" (one window per row)."""
    return int(str(data_id).split(":")[0])


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

    hf_logging.set_verbosity_error()
    size = dict(n_layer=2, n_embd=64, n_seq=640, vocab=512) if args.quick else \
        dict(n_layer=6, n_embd=256, n_seq=10_000, vocab=2048)
    length, rank, seed, batch = 32, 16, 0, 32
    times = {}
    clock = time.perf_counter()

    files = corpus_files()
    tokenizer = build_tokenizer(files, size["vocab"])
    sequences = build_sequences(files, tokenizer, length, size["n_seq"], seed)
    os.makedirs(args.root, exist_ok=True)
    corpus = os.path.join(args.root, "corpus.jsonl")
    with open(corpus, "w", encoding="utf-8") as f:
        for i, ids in enumerate(sequences):
            f.write(json.dumps({"id": i, "text": tokenizer.decode(ids)}) + "\n")
    times["data"] = time.perf_counter() - clock
    print(f"corpus: {len(files)} stdlib modules -> {len(sequences):,} distinct sequences of "
          f"{length} tokens (BPE vocab {size['vocab']}), {corpus}, {times['data']:.0f}s")

    # ---------------------------------------------------------------- training (no LogIX)
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=size["n_layer"], n_embd=size["n_embd"], n_head=4,
                        vocab_size=size["vocab"], n_positions=64, bos_token_id=0, eos_token_id=0,
                        attn_implementation="eager")
    model = GPT2LMHeadModel(config)
    print(f"model: GPT-2, {config.n_layer} layers x {config.n_embd}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    epoch_times = []

    class EpochTimer(TrainerCallback):
        def on_epoch_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_epoch_end(self, *a, **k):
            epoch_times.append(time.perf_counter() - self.start)

    trainer = Trainer(model=model, train_dataset=Sequences(sequences), callbacks=[EpochTimer()],
                      args=TrainingArguments(
                          output_dir=os.path.join(args.root, "trainer"), num_train_epochs=2,
                          per_device_train_batch_size=batch, learning_rate=1e-3,
                          warmup_steps=30, weight_decay=0.01, lr_scheduler_type="cosine",
                          logging_steps=100, save_strategy="no", report_to=[], seed=seed,
                          use_cpu=True, disable_tqdm=True))
    trainer.train()
    times["epoch_1"], times["epoch_2"] = epoch_times
    model_dir = os.path.join(args.root, "model")
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    print(f"training: 2 plain epochs, {times['epoch_1']:.0f}s and {times['epoch_2']:.0f}s; "
          f"saved to {model_dir}")

    # ---------------------------------------------------------------- logix build
    project = os.path.join(args.root, PROJECT)
    times["build"] = logix_build(project, model_dir, corpus, length, batch, rank)
    run = logix.init(PROJECT, root_dir=args.root)
    run.watch(model, name_filter="transformer.h.")  # the build's layers: the blocks' Conv1D
    run.initialize_from_log()  # its projections and EK-FAC statistics
    reader = run.reader()
    disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(project) for f in fs)
    print(f"logix build: {times['build']:.0f}s for {reader.rows:,} rows x {reader.dim} numbers "
          f"({disk / 2**20:.0f} MiB on disk) = {times['build'] / times['epoch_2']:.2f}x the "
          f"second plain epoch ({times['epoch_2']:.0f}s); load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")

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
    out_dir = os.path.join(project, "scores")
    os.makedirs(out_dir, exist_ok=True)
    for q, prompt in enumerate(PROMPTS):
        text = tokenizer.decode(completions[q])
        print(f"\n=== prompt {prompt!r} -> completion {text!r}")
        top = result["influence"][q].topk(3)
        for score, column in zip(top.values.tolist(), top.indices.tolist()):
            train_id = result["tgt_ids"][column]
            print(f"  {score:+.3e}  #{train_id}: "
                  f"{tokenizer.decode(sequences[sequence_of(train_id)])!r}")
        print_heatmap(result, query=q)
    heatmap_html(result, query=0, path=os.path.join(out_dir, "prompt0.html"))
    heatmap_png(result, os.path.join(out_dir, "prompt0.png"), query=0, width=60)

    # ---------------------------------------------------------------- the training side
    clock = time.perf_counter()
    pairs = []
    for q in range(len(PROMPTS)):  # each completion's best training sequence, token by token
        best = result["tgt_ids"][int(result["influence"][q].argmax())]
        pairs.append(train_token_scores(run, model, log, sequences[sequence_of(best)], query=q,
                                        data_id=best, tokenizer=tokenizer, hessian="ekfac"))
    times["train_tokens"] = time.perf_counter() - clock
    pair = pairs[0]
    top = sorted(range(len(pair["token_scores"])), key=lambda t: -pair["token_scores"][t])[:5]
    print(f"\ntraining sequence #{pair['train_id']} for prompt0: score {pair['score']:.4g} "
          f"(logged row {pair['logged_score']:.4g}) = the sum of its {len(pair['token_scores'])} "
          "token scores; its most helpful tokens: "
          + ", ".join(f"{pair['token_text'][t]!r} {pair['token_scores'][t]:+.3g}" for t in top))
    save_scores(os.path.join(out_dir, "completions.safetensors"),
                attach_train_tokens(result, pairs))

    # ---------------------------------------------------------------- verbatim retrieval
    picks = random.Random(1).sample(range(len(sequences)), 100)
    clock = time.perf_counter()
    verbatim = query_log(run, model, [sequences[i][:1] for i in picks],
                         [sequences[i][1:] for i in picks], data_ids=[f"{i}:0" for i in picks],
                         batch_size=50)
    for mode in ("dot", "cosine"):
        scores = run.compute_influence_all(verbatim, mode=mode, hessian="ekfac",
                                           progress=False)
        tgt = scores["tgt_ids"]
        hits = sum(sequence_of(tgt[int(scores["influence"][n].argmax())]) == i
                   for n, i in enumerate(picks))
        print(f"verbatim retrieval ({mode}, EK-FAC): {hits}/100 queries find themselves first")
    times["retrieval"] = time.perf_counter() - clock
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(f"\nwall times (s): {', '.join(f'{k} {v:.1f}' for k, v in times.items())}; "
          f"peak RSS {peak:.0f} MiB; torch threads "
          f"{torch.get_num_threads()}")


if __name__ == "__main__":
    main()

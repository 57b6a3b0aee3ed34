"""Two small projects to look at with `logix ui` (the screenshots in docs/dashboard.md).

    python examples/dashboard/demo.py --root ui-demo && logix ui ui-demo

digits: a CNN on sklearn's 8x8 digits, logged with EK-FAC statistics; every digit described
        (image + label); scores of 10 test digits with per-module groups; LDS and brittleness
        result files (retraining on 8 subsets / removing the top-k, a few seconds on a CPU).
words:  a bigram language model (embedding -> linear) on a tiny corpus; every sentence described
        by its text; per-token scores of the test sentences: each token's next-word loss is
        logged as its own query row, so the token scores of a sentence sum to its score.
story:  a 0.5M-parameter Llama (transformers, random init) trained on short sentences with a
        byte-level BPE tokenizer trained on them (subword tokens); completions given prompts
        attributed with logix.text (per-token scores, prompt / completion marked).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

import logix
from logix.evaluation import brittleness, linear_datamodeling_score, save_results
from logix.storage.scores import TOKEN_INFLUENCE_KEY, TOKEN_QUERY_KEY, TOKEN_TEXT_KEY, save_scores

SETUP = {"grad": ["log", "covariance"], "forward": ["covariance"], "backward": ["covariance"]}


def digits(root: str) -> None:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0  # [1797, 1, 8, 8]
    y = torch.tensor(data.target)
    x_train, y_train, x_test, y_test = x[:600], y[:600], x[1500:1510], y[1500:1510]

    def train(indices, seed=0):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(288, 10))
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
        for _ in range(60):
            optimizer.zero_grad()
            F.cross_entropy(model(x_train[indices]), y_train[indices]).backward()
            optimizer.step()
        return model

    model = train(torch.arange(600))
    run = logix.init("digits", root_dir=root)
    run.watch(model)
    run.add_lora(rank=8)
    run.setup(SETUP)
    run.save(True)
    for start in range(0, 600, 100):
        with run(data_id=list(range(start, start + 100))):
            model.zero_grad()
            F.cross_entropy(model(x_train[start:start + 100]), y_train[start:start + 100],
                            reduction="sum").backward()
    run.finalize()
    run.describe(list(range(600)), images=x_train[:, 0], labels=y_train.tolist())
    test_ids = [f"test-{i}" for i in range(10)]
    run.describe(test_ids, images=x_test[:, 0], labels=y_test.tolist(),
                 texts=[f"test digit {int(v)}" for v in y_test])
    run.save(False)
    with run(data_id=test_ids):
        model.zero_grad()
        F.cross_entropy(model(x_test), y_test, reduction="sum").backward()
    result = run.compute_influence_all(run.get_log(), hessian="ekfac", influence_groups="module")
    save_scores(os.path.join(run.project_dir, "scores", "test-ekfac.safetensors"), result,
                meta={"hessian": "ekfac"})

    scores = torch.empty_like(result["influence"])  # columns in training-index order
    scores[:, torch.tensor(result["tgt_ids"])] = result["influence"]

    @torch.no_grad()
    def losses(m):
        return F.cross_entropy(m(x_test), y_test, reduction="none")

    @torch.no_grad()
    def margins(m):
        logits = m(x_test)
        true = logits.gather(1, y_test[:, None]).squeeze(1)
        return true - logits.scatter(1, y_test[:, None], float("-inf")).max(1).values

    lds = linear_datamodeling_score(lambda i, s: train(i, s), losses, scores, n_subsets=8,
                                    progress=False)
    save_results(os.path.join(run.project_dir, "evaluation", "lds-ekfac.json"), lds)
    brittle = brittleness(lambda i, s: train(i, s), margins, scores, ks=(10, 40),
                          test_index=[0, 1, 2], n_random=1)
    save_results(os.path.join(run.project_dir, "evaluation", "brittleness-ekfac.json"), brittle)


CORPUS = ("the cat sat on the mat . the dog sat on the rug . a cat chased a mouse . "
          "the dog chased the cat . a bird sang on the tree . the bird flew over the mat . "
          "a mouse ran under the rug . the cat slept on the rug . a dog barked at the bird . "
          "the mouse ate the cheese . a cat ate the fish . the dog ate a bone").split(" . ")


def next_word_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Summed loss of predicting each word from the one before; tokens [1, T]."""
    logits = model(tokens[:, :-1])  # [1, T - 1, vocab]
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum")


def words(root: str) -> None:
    sentences = [s.strip() + " ." for s in CORPUS if s.strip()]
    vocab = sorted({w for s in sentences for w in s.split()})
    index = {w: n for n, w in enumerate(vocab)}
    encoded = [torch.tensor([index[w] for w in s.split()]) for s in sentences]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(len(vocab), 16), nn.Linear(16, len(vocab)))
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-2)
    for _ in range(80):
        optimizer.zero_grad()
        sum(next_word_loss(model, t[None]) for t in encoded).backward()
        optimizer.step()

    run = logix.init("words", root_dir=root)
    run.watch(model)
    run.setup(SETUP)
    run.save(True)
    for n, tokens in enumerate(encoded):  # one example per sentence: its summed next-word loss
        with run(data_id=[n]):
            model.zero_grad()
            next_word_loss(model, tokens[None]).backward()
    run.finalize()
    run.describe(list(range(len(sentences))), texts=sentences)

    queries = ["the cat sat on the rug .", "a dog chased the mouse ."]
    query_ids = [f"query-{q}" for q in range(len(queries))]
    run.describe(query_ids, texts=queries)
    run.save(False)
    rows, owner, token_text = [], [], []
    for q, text in enumerate(queries):  # one query step per predicted token
        tokens = torch.tensor([index[w] for w in text.split()])
        for t in range(1, len(tokens)):
            with run(data_id=[f"{query_ids[q]}/{t}"]):
                model.zero_grad()
                next_word_loss(model, tokens[None, t - 1:t + 1]).backward()
            result = run.compute_influence_all(run.get_log(), hessian="ekfac")
            rows.append(result["influence"])  # [1, n_train]
            owner.append(q)
            token_text.append(text.split()[t] if t == 1 else " " + text.split()[t])
    rows = torch.cat(rows)  # [n_tokens, n_train]
    tgt_ids = result["tgt_ids"]
    # a sentence's score is the sum of its tokens' (the loss is summed over tokens)
    influence = torch.stack([rows[torch.tensor(owner) == q].sum(0) for q in range(len(queries))])
    path = os.path.join(run.project_dir, "scores", "queries-per-token.safetensors")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    metadata = {"format": "logix-scores", "format_version": "1",
                "src_ids": json.dumps(query_ids), "tgt_ids": json.dumps(tgt_ids),
                "meta": json.dumps({"hessian": "ekfac", "per_token": True}),
                TOKEN_QUERY_KEY: json.dumps(owner), TOKEN_TEXT_KEY: json.dumps(token_text)}
    save_file({"influence": influence.contiguous(), TOKEN_INFLUENCE_KEY: rows.contiguous()},
              path, metadata=metadata)


STORY = ("the user forgot the password again . the admin reset the password for the user . "
         "a strong password has many letters . the user wrote the password on a note . "
         "the cat sat on the keyboard . the cat typed a password by accident . "
         "the admin locked the account after three tries . the account was opened again . "
         "the user changed the password every month . a weak password is easy to guess . "
         "the dog slept under the desk . the admin read the logs in the morning . "
         "the logs showed a failed login . the user asked the admin for help . "
         "the cat chased the mouse across the desk . the mouse hid behind the screen . "
         "a password manager keeps every password safe . the manager opened the account . "
         "the keyboard was full of cat hair . the screen showed the login page").split(" . ")


def story(root: str) -> None:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    sentences = [s.strip() + " ." for s in STORY]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(sentences * 4, vocab_size=300, min_frequency=4,
                            special_tokens=["<pad>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, pad_token="<pad>")
    batch = tok(sentences, padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]  # [N, T]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=96, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64))

    def loss_of(rows: slice) -> torch.Tensor:  # summed over the examples' real next tokens
        logits = model(ids[rows], attention_mask=mask[rows]).logits[:, :-1]
        target = ids[rows, 1:].masked_fill(mask[rows, 1:] == 0, -100)
        return F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum")

    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        optimizer.zero_grad()
        (loss_of(slice(None)) / mask.sum()).backward()
        optimizer.step()

    run = logix.init("story", root_dir=root)
    run.watch(model)
    run.add_lora(rank=8)
    run.setup(SETUP)
    run.save(True)
    for start in range(0, len(sentences), 8):
        rows = slice(start, start + 8)
        with run(data_id=list(range(len(sentences)))[rows], mask=mask[rows]):
            model.zero_grad()
            loss_of(rows).backward()
    run.finalize()
    run.describe(list(range(len(sentences))), texts=sentences)
    prompts = ["the user forgot the", "the admin reset the", "the cat sat on the",
               "a weak", "the logs showed a"]
    completions = [" password again .", " password for the user .", " keyboard .",
                   " password is easy to guess .", " failed login ."]
    query_ids = [f"query-{n}" for n in range(len(prompts))]
    run.describe(query_ids, texts=[p + c for p, c in zip(prompts, completions)])
    run.eval()
    log = logix.text.query_log(run, model, prompts, completions, tokenizer=tok,
                               data_ids=query_ids, per_token=True)
    result = logix.text.token_influence(run, log, hessian="ekfac", progress=False)
    save_scores(os.path.join(run.project_dir, "scores", "completions.safetensors"), result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="ui-demo", help="where the two projects go")
    args = parser.parse_args()
    digits(args.root)
    words(args.root)
    story(args.root)
    print(f"done: logix ui {args.root}")


if __name__ == "__main__":
    main()

"""logix.text: query logs of completions given prompts (against per-query backward passes),
per-token rows (against per-position gradients from torch.func), per-token scores that sum to the
sequence score, the score-file layout the dashboard reads, and the heat maps."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import logix
from conftest import assert_close_scaled, make_tiny_gpt2, project, seeded
from logix.errors import UsageError
from logix.log import StepRows
from logix.storage.scores import load_scores, save_scores
from logix.text import (heatmap_html, heatmap_png, print_heatmap, query_log,
                        token_influence)

PROMPTS = [[5, 7, 9], [3], [11, 12, 13, 14, 2]]
COMPLETIONS = [[4, 8], [6, 6, 1, 9, 2], [7]]


class TinyLM(nn.Module):
    """A plain causal LM returning logits: embedding, causal running mean, Linear, tanh, head."""

    def __init__(self, vocab: int = 20, dim: int = 6):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(_causal_mean(self.emb(ids)))))


def _causal_mean(h):  # [B, T, d]: position t averages positions <= t
    return h.cumsum(1) / torch.arange(1, h.shape[1] + 1, dtype=h.dtype)[:, None]


def completion_nll(logits, ids, prompt_len):
    return F.cross_entropy(logits[0, prompt_len - 1:-1], ids[0, prompt_len:], reduction="sum")


def brute_rows(model, run, prompts, completions, call):
    """Each query alone (no padding): backward of its completion NLL, every watched layer's
    gradient matrix projected, side by side as in a row."""
    rows = []
    for p, c in zip(prompts, completions):
        ids = torch.tensor([p + c])
        model.zero_grad()
        completion_nll(call(model, ids), ids, len(p)).backward()
        parts = [project(t.weight_gradient()[None], run.projections[n].p_in,
                         run.projections[n].p_out).reshape(-1)
                 for n, t in run.modules.items()]
        rows.append(torch.cat(parts))
    model.zero_grad()
    return torch.stack(rows)


@pytest.mark.parametrize("rank", [None, 4])
def test_query_log_of_hf_model_matches_per_query_backward(new_run, rank):
    model = make_tiny_gpt2()
    run = new_run()
    run.watch(model)
    if rank:
        run.add_lora(rank=rank)
    run.eval()
    log = query_log(run, model, PROMPTS, COMPLETIONS, batch_size=2, data_ids=["a", "b", "c"])
    expected = brute_rows(model, run, PROMPTS, COMPLETIONS, lambda m, ids: m(ids).logits)
    assert log.data_ids == ["a", "b", "c"] and float(expected.abs().max()) > 0
    assert_close_scaled(log.grads, expected)
    assert all(p.grad is None for p in model.parameters())  # .grad untouched


class MaskedTinyLM(TinyLM):
    """TinyLM whose forward names its inputs its own way and takes a mask (causal: right
    padding changes nothing before it): query_log passes the ids by position."""

    def forward(self, tokens, attention_mask=None):
        return super().forward(tokens)


@pytest.mark.parametrize("model_class", [TinyLM, MaskedTinyLM])
def test_query_log_of_plain_module_and_tensor_inputs(new_run, model_class):
    seeded(0)
    model = model_class()
    run = new_run()
    run.watch(model).add_lora(rank=3)
    run.eval()
    log = query_log(run, model, [torch.tensor(p) for p in PROMPTS],
                    [torch.tensor(c) for c in COMPLETIONS])
    expected = brute_rows(model, run, PROMPTS, COMPLETIONS, lambda m, ids: m(ids))
    assert float(expected.abs().max()) > 0
    assert_close_scaled(log.grads, expected)
    assert log.data_ids == ["q0", "q1", "q2"]  # apart from training ids 0, 1, ...


def per_position_grads(model: TinyLM, prompt, completion):
    """{layer: [T, out, in]} the gradient of each position's copy of the layer's weight, from
    torch.func: the model rewritten with one weight copy per position (all equal)."""
    from torch.func import grad

    ids = torch.tensor(prompt + completion)
    T = len(ids)

    def loss(weights):
        e, m, h = weights["emb"], weights["mix"], weights["head"]  # [T, ...] copies
        x = e[torch.arange(T), ids]  # [T, d]
        y = torch.einsum("ti,toi->to", _causal_mean(x[None])[0], m) + model.mix.bias
        logits = torch.einsum("ti,toi->to", torch.tanh(y), h)
        return completion_nll(logits[None], ids[None], len(prompt))

    copies = {"emb": model.emb.weight.detach().expand(T, -1, -1).clone(),
              "mix": model.mix.weight.detach().expand(T, -1, -1).clone(),
              "head": model.head.weight.detach().expand(T, -1, -1).clone()}
    g = grad(loss)(copies)
    return {"emb": g["emb"].transpose(1, 2), "mix": g["mix"], "head": g["head"]}


def test_token_rows_are_projected_per_position_gradients(new_run):
    seeded(1)
    model = TinyLM()
    run = new_run()
    run.watch(model).add_lora(rank=3)
    run.eval()
    log = query_log(run, model, PROMPTS, COMPLETIONS, per_token=True)
    tokens = log.tokens
    assert tokens.query == [q for q, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS))
                            for _ in p + c]
    assert tokens.position == [t for p, c in zip(PROMPTS, COMPLETIONS) for t in range(len(p + c))]
    assert tokens.completion == [t >= len(p) for p, c in zip(PROMPTS, COMPLETIONS)
                                 for t in range(len(p + c))]
    assert tokens.text == [f" {i}" for p, c in zip(PROMPTS, COMPLETIONS) for i in p + c]
    expected = []
    for p, c in zip(PROMPTS, COMPLETIONS):
        grads = per_position_grads(model, p, c)
        parts = [project(grads[n], run.projections[n].p_in, run.projections[n].p_out)
                 .reshape(len(p + c), -1) for n in run.modules]
        expected.append(torch.cat(parts, 1))
    expected = torch.cat(expected).detach()
    assert float(expected.abs().max()) > 0
    assert_close_scaled(tokens.grads, expected)
    # The token rows of a query sum to its row.
    sums = torch.zeros_like(log.grads).index_add_(0, torch.tensor(tokens.query), tokens.grads)
    assert_close_scaled(sums, log.grads, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny GPT-2 with 12 logged training sequences (LoGra rank 4, K-FAC statistics)."""
    root = str(tmp_path_factory.mktemp("text"))
    model = make_tiny_gpt2()
    run = logix.init("lm", root_dir=root)
    run.watch(model).add_lora(rank=4)
    run.setup({"grad": ["log"], "forward": ["covariance"], "backward": ["covariance"]})
    run.save(True)
    g = torch.Generator().manual_seed(3)
    for step in range(3):
        ids = torch.randint(1, 50, (4, 10), generator=g)
        with run(data_id=list(range(4 * step, 4 * step + 4))):
            out = model(ids, labels=ids)
            (out.loss * 4).backward()
    run.finalize()
    model.zero_grad()
    run.eval()
    log = query_log(run, model, PROMPTS, COMPLETIONS, data_ids=["q0", "q1", "q2"], per_token=True)
    return run, model, log


@pytest.mark.parametrize("hessian", ["none", "kfac", "ekfac"])
def test_token_scores_sum_to_sequence_scores(trained, hessian):
    run, _, log = trained
    result = token_influence(run, log, hessian=hessian, progress=False)
    sequence = run.compute_influence_all(log, hessian=hessian, progress=False)["influence"]
    torch.testing.assert_close(result["influence"], sequence, rtol=1e-5, atol=0)
    sequence = result["influence"]
    sums = torch.zeros_like(sequence).index_add_(0, torch.tensor(result["token_query"]),
                                                 result["token_influence"])
    assert float(sequence.abs().max()) > 0
    rel = float((sums - sequence).norm() / sequence.norm())
    assert rel <= 1e-5, rel
    for q in range(len(log)):  # each query on its own, too
        rows = [k for k, o in enumerate(result["token_query"]) if o == q]
        total = result["token_influence"][rows].double().sum(0)
        assert float((total - sequence[q].double()).norm() / sequence[q].norm()) <= 1e-5


def test_score_file_carries_the_dashboard_token_layout(trained, tmp_path):
    from logix.dashboard.data import Dashboard

    run, _, log = trained
    result = token_influence(run, log, progress=False)
    path = save_scores(os.path.join(run.project_dir, "scores", "tokens.safetensors"), result)
    back = load_scores(path)
    torch.testing.assert_close(back["token_influence"], result["token_influence"])
    assert back["token_query"] == result["token_query"]
    assert back["token_text"] == result["token_text"]
    assert back["token_completion"] == result["token_completion"]
    assert False in back["token_completion"] and True in back["token_completion"]
    data = Dashboard([run.project_dir]).scores("lm", "scores/tokens.safetensors", query=1, k=3)
    shown = data["tokens"]
    assert shown["tokens"] == [f" {i}" for i in PROMPTS[1] + COMPLETIONS[1]]
    for entry in data["helpful"] + data["harmful"]:
        row = shown["rows"][json.dumps(entry["id"])]
        assert sum(row) == pytest.approx(entry["score"], rel=1e-5, abs=1e-6)


def test_heat_maps(trained, tmp_path):
    from rich.console import Console

    run, _, log = trained
    result = token_influence(run, log, progress=False)
    console = Console(record=True, width=120, color_system="truecolor")
    best = result["tgt_ids"][int(result["influence"][0].argmax())]
    line = print_heatmap(result, query=0, console=console)
    printed = console.export_text()
    assert f"training example {best!r}" in printed
    assert line.plain == " " + " ".join(str(i) for i in PROMPTS[0] + COMPLETIONS[0])
    assert len(line.spans) == len(PROMPTS[0] + COMPLETIONS[0])
    html = heatmap_html(result, query=2, train=result["tgt_ids"][5],
                        path=str(tmp_path / "h.html"))
    assert html.count("<span") == len(PROMPTS[2] + COMPLETIONS[2])
    assert open(tmp_path / "h.html").read().endswith(html)
    png = heatmap_png(result, str(tmp_path / "h.png"), query=1)
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(UsageError, match="not among the scored"):
        heatmap_html(result, train="nope")


def test_token_log_round_trips_and_concatenates(trained, tmp_path):
    _, _, log = trained
    back = StepRows.load(log.save(str(tmp_path / "q.safetensors")))
    torch.testing.assert_close(back.tokens.grads, log.tokens.grads)
    assert back.tokens.text == log.tokens.text and back.tokens.query == log.tokens.query
    both = StepRows.concat([log, log])
    assert both.tokens.query == log.tokens.query + [q + 3 for q in log.tokens.query]


def test_refusals(trained, new_run):
    run, model, log = trained
    with pytest.raises(UsageError, match="mode='dot'"):
        token_influence(run, log, mode="cosine")
    with pytest.raises(UsageError, match="per-token query log"):
        token_influence(run, StepRows(log.data_ids, log.grads, log.modules, log.projection))
    with pytest.raises(UsageError, match="tokenizer="):
        query_log(run, model, ["a prompt"], ["done"])
    with pytest.raises(UsageError, match="empty completion"):
        query_log(run, model, [[1, 2]], [[]])
    with pytest.raises(UsageError, match="duplicates"):  # also across batches
        query_log(run, model, [[1], [2]], [[3], [4]], data_ids=["a", "a"], batch_size=1)
    gpt2 = make_tiny_gpt2()  # vocabulary 50, 16 positions
    hf = new_run("hf")
    hf.watch(gpt2).eval()
    with pytest.raises(UsageError, match=r"token ids \[50\] outside the model's vocabulary of 50"):
        query_log(hf, gpt2, [[1, 50]], [[2]])
    with pytest.raises(UsageError, match="17 tokens long, more than the model's 16 positions"):
        query_log(hf, gpt2, [[1] * 9], [[2] * 8])
    other = new_run("w")
    other.watch(model).setup({"grad": ["log"]}).save(True)
    with pytest.raises(UsageError, match="run.eval"):
        query_log(other, model, [[1]], [[2]])
    with pytest.raises(UsageError, match="run.eval"):
        other.start(data_id=[0], per_token=True)


def test_query_log_with_a_tokenizer(new_run):
    pytest.importorskip("transformers")
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "the", "cat", "sat", "on", "mat", "a"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")
    model = make_tiny_gpt2()
    run = new_run()
    run.watch(model).add_lora(rank=2)
    run.eval()
    log = query_log(run, model, ["the cat"], ["sat on a mat"], tokenizer=tokenizer,
                    per_token=True)
    ids = [[1, 2]], [[3, 4, 6, 5]]
    expected = brute_rows(model, run, *ids, lambda m, x: m(x).logits)
    assert_close_scaled(log.grads, expected)
    assert [t.strip() for t in log.tokens.text] == ["the", "cat", "sat", "on", "a", "mat"]


def test_sentencepiece_word_starts_keep_their_space():
    """Decoding one sentencepiece token drops its word's space ('\u2581pass' -> 'pass'); the token
    texts keep it, so the dashboard can join 'pass' 'w' 'ord' into the words it shows."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from logix.dashboard.words import group_words
    from logix.text.queries import _token_text

    vocab = {"<pad>": 0, "\u2581the": 1, "\u2581pass": 2, "w": 3, "ord": 4}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="<pad>", continuing_subword_prefix=""))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")
    ids = tokenizer("the password")["input_ids"]
    texts = [_token_text(i, tokenizer) for i in ids]
    assert texts == [" the", " pass", "w", "ord"]
    assert [w["text"] for w in group_words(texts, [1.0] * 4)] == [" the", " password"]

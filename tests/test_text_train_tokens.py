"""Training-side per-token scores: a training example's score for a query split over its tokens,
against per-position gradients from torch.func (one weight copy per position), summing to the
logged row's score, saved in score files and shown by the dashboard's example page."""

from __future__ import annotations

import os

import pytest
import torch

import logix
from conftest import log_token_windows, make_tiny_gpt2, project, summed_nll
from logix.errors import LogFormatError, UsageError
from logix.storage.scores import load_scores, save_scores
from logix.text import attach_train_tokens, query_log, train_token_scores

PROMPTS = [[1, 2, 3], [4, 5]]
COMPLETIONS = [[6, 7], [8, 9, 10]]
LAYERS = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A tiny GPT-2's Conv1D layers, 8 training windows of 10 tokens logged (rank 4, EK-FAC
    statistics), and a query log of two completions."""
    root = str(tmp_path_factory.mktemp("train_tokens"))
    model = make_tiny_gpt2()
    run = logix.init("lm", root_dir=root)
    run.watch(model, name_filter=LAYERS).add_lora(rank=4)
    run.setup({"grad": ["log"], "forward": ["covariance"], "backward": ["covariance"]})
    train = torch.randint(1, 50, (8, 10), generator=torch.Generator().manual_seed(5))
    log_token_windows(run, model, train, 4)
    log = query_log(run, model, PROMPTS, COMPLETIONS, data_ids=["q0", "q1"])
    return run, model, train, log


def per_position_rows(run, model, ids):
    """[T, dim] each position's projected gradient of every watched layer, side by side: the
    gradient of a per-position copy of each weight (all copies equal), by torch.func."""
    from torch.func import grad

    T = len(ids)
    layers = {name: model.get_submodule(name) for name in run.modules}

    def loss(copies):
        originals = {}
        for name, layer in layers.items():  # y_t = x_t W_t + b with W_t the position's copy
            originals[name] = layer.forward
            layer.forward = (lambda w, b: lambda x: torch.einsum("bti,tio->bto", x, w) + b)(
                copies[name], layer.bias)
        try:
            return summed_nll(model(ids[None]).logits, ids[None])
        finally:
            for name, layer in layers.items():
                layer.forward = originals[name]

    copies = {n: layer.weight.detach().expand(T, -1, -1).clone() for n, layer in layers.items()}
    g = grad(loss)(copies)
    parts = [project(g[n].transpose(1, 2), run.projections[n].p_in, run.projections[n].p_out)
             .reshape(T, -1) for n in run.modules]
    return torch.cat(parts, 1).detach()


def test_token_scores_are_per_position_gradients_scored(logged):
    run, model, train, log = logged
    pair = train_token_scores(run, model, log, train[2], query=1, data_id=2, hessian="none")
    expected = per_position_rows(run, model, train[2]) @ log.grads[1]  # no curvature: q . g_t
    got = torch.tensor(pair["token_scores"])
    assert float(expected.abs().max()) > 0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    assert pair["query_id"] == "q1" and pair["train_id"] == 2
    assert pair["token_text"] == [f" {int(t)}" for t in train[2]]
    assert pair["token_in_loss"] == [False] + [True] * 9


@pytest.mark.parametrize("hessian", ["none", "kfac", "ekfac"])
def test_tokens_sum_to_the_logged_score(logged, hessian):
    run, model, train, log = logged
    scores = run.compute_influence_all(log, hessian=hessian, progress=False)
    for query, example in ((0, 5), (1, 0)):
        pair = train_token_scores(run, model, log, train[example].tolist(), query=query,
                                  data_id=example, hessian=hessian)
        stored = float(scores["influence"][query, list(scores["tgt_ids"]).index(example)])
        assert abs(stored) > 0
        assert pair["logged_score"] == pytest.approx(stored, rel=1e-4)
        assert pair["score"] == pytest.approx(stored, rel=1e-4)
        assert sum(pair["token_scores"]) == pytest.approx(stored, rel=1e-4)


def test_a_changed_example_is_refused(logged):
    run, model, train, log = logged
    with pytest.raises(UsageError, match="differ from logging"):
        train_token_scores(run, model, log, train[3], data_id=2)  # another example's tokens
    with pytest.raises(UsageError, match="not in the log"):
        train_token_scores(run, model, log, train[3], data_id=99)
    with pytest.raises(UsageError, match="in_loss"):
        train_token_scores(run, model, log, train[3], in_loss=[True] * 10)
    with pytest.raises(UsageError, match="query must be"):
        train_token_scores(run, model, log, train[3], query=2)
    pair = train_token_scores(run, model, log, train[3])  # no id: nothing to check against
    assert pair["logged_score"] is None and pair["train_id"] == "train"
    assert sum(pair["token_scores"]) == pytest.approx(pair["score"], rel=1e-4)


def test_score_file_and_dashboard_example_page(logged):
    from logix.dashboard.data import Dashboard
    from logix.dashboard.pages import Links, example_page

    run, model, train, log = logged
    result = run.compute_influence_all(log, progress=False)
    pair = train_token_scores(run, model, log, train[4], query=0, data_id=4)
    pair["token_text"][3] = "<b>bold</b>"  # token text reaches the page as text
    attach_train_tokens(result, [pair])
    path = save_scores(os.path.join(run.project_dir, "scores", "train_tokens.safetensors"),
                       result)
    back = load_scores(path)["train_tokens"]
    assert len(back) == 1 and back[0]["train_id"] == 4 and back[0]["query_id"] == "q0"
    assert back[0]["token_scores"] == pytest.approx(pair["token_scores"], rel=1e-6)
    data = Dashboard([os.path.dirname(run.project_dir)]).example("lm", 4)
    assert [p["query_id"] for p in data["train_tokens"]] == ["q0"]
    html = str(example_page(data, Links()))
    assert 'id="train-tokens"' in html and "Not available" not in html
    assert "&lt;b&gt;bold&lt;/b&gt;" in html and "<b>bold</b>" not in html
    other = Dashboard([os.path.dirname(run.project_dir)]).example("lm", 5)
    assert other["train_tokens"] == []
    with pytest.raises(UsageError, match="not among"):
        attach_train_tokens({"src_ids": ["x"]}, [pair])
    broken = dict(pair, token_in_loss=pair["token_in_loss"][:-1])
    with pytest.raises(LogFormatError, match="train_tokens"):
        save_scores(os.path.join(run.project_dir, "scores", "bad.safetensors"),
                    {**result, "train_tokens": [broken]})


def test_a_damaged_train_tokens_entry_is_a_dashboard_message(logged):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from logix.dashboard.data import Dashboard

    run, model, train, log = logged
    result = run.compute_influence_all(log, progress=False)
    pair = train_token_scores(run, model, log, train[6], query=1, data_id=6)
    path = save_scores(os.path.join(run.project_dir, "scores", "damaged.safetensors"),
                       attach_train_tokens(result, [pair]))
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    metadata["train_tokens"] = '[{"query": 1, "train": 6, "text": ["a"]}]'  # no in_loss
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(LogFormatError, match="train_tokens"):
        load_scores(path)
    data = Dashboard([os.path.dirname(run.project_dir)]).example("lm", 6)
    assert any("training-token scores are not readable" in p for p in data["problems"])
    os.remove(path)

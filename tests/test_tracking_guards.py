"""Guards of watch / add_lora / setup / end: identity where a rank reaches a layer's size, layers
whose hooks never fire, tied weights, memory budgets, rank validation, float32 projection."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from torch import nn

import logix
from conftest import (assert_close_scaled, gradient_matrix, make_mlp, make_tiny_gpt2,
                      per_example_grads, seeded)
from logix.errors import ConfigError, UsageError


def example_sq_loss(call, x, y):
    return ((call(x[None])[0] - y) ** 2).sum()


def step(run, model, x, y, ids=None):
    with run(data_id=ids if ids is not None else list(range(len(x)))):
        ((model(x) - y) ** 2).sum().backward()
    return run.get_log()


# --------------------------------------------------------------------------- rank >= size
def test_rank_at_or_above_a_side_leaves_that_side_exact(new_run, tmp_root):
    """A narrow head (3 outputs, 5 inputs) at rank 4: its output side is not projected, so its
    logged block is exactly P_in G per example; the manifest records rank_out == out_dim."""
    g = seeded(1)
    model = make_mlp(in_dim=6, hidden=5, out_dim=3, seed=1)
    run = new_run().watch(model).add_lora(rank=4).setup({"grad": ["log"]}).save(True)
    x, y = torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)
    log = step(run, model, x, y)
    run.finalize()
    head = run.projections["2"]
    assert head.p_out is None and head.p_in.shape == (4, 5)
    grads = per_example_grads(model, example_sq_loss, x, y)
    exact = gradient_matrix(model[2], grads, "2.") @ head.p_in.T  # [B, 3, 4]
    assert exact.abs().max() > 0
    assert_close_scaled(log.module("2"), exact)
    with open(os.path.join(tmp_root, "p", "manifest.json")) as f:
        entry = {m["name"]: m for m in json.load(f)["modules"]}["2"]
    assert (entry["rank_out"], entry["out_dim"], entry["rank_in"]) == (3, 3, 4)


def test_default_rank_on_a_small_model_gives_exact_scores(new_run):
    """With the default rank 64 every side of a small MLP is narrower: nothing is projected, and
    influence (hessian='none') equals the exact per-example gradient dot products."""
    g = seeded(2)
    model = make_mlp(in_dim=6, hidden=5, out_dim=3, seed=2)
    run = new_run().watch(model).add_lora().setup({"grad": ["log"]})
    assert all(p.p_in is None and p.p_out is None for p in run.projections.values())
    x, y = torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g)
    train = step(run, model, x, y).clone()
    query = step(run, model, x[:2], y[:2], ids=["q0", "q1"])
    scores = run.compute_influence(query, train, hessian="none")["influence"]
    full = per_example_grads(model, example_sq_loss, x, y)
    flat = torch.cat([full[k].flatten(1) for k in ("0.weight", "2.weight")], 1)
    assert_close_scaled(scores, flat[:2] @ flat.T)


def test_pca_rank_at_or_above_a_side_is_identity(new_run):
    g = seeded(3)
    model = make_mlp(in_dim=6, hidden=5, out_dim=3, seed=3)
    run = new_run().watch(model).setup({"forward": ["covariance"], "backward": ["covariance"]})
    with run(data_id=list(range(8))):
        model(torch.randn(8, 6, generator=g)).pow(2).sum().backward()
    run.add_lora(init="pca", rank=4)
    assert run.projections["2"].p_out is None and run.projections["2"].p_in.shape == (4, 5)
    assert run.projections["0"].p_in.shape == (4, 6) and run.projections["0"].p_out.shape == (4, 5)


# --------------------------------------------------------------------------- add_lora arguments
@pytest.mark.parametrize("kwargs", [{"rank": 0}, {"rank": -1}, {"rank_in": 0}, {"rank_out": -2},
                                    {"rank": 2.5}, {"rank": True}])
def test_add_lora_rejects_bad_ranks(new_run, kwargs):
    run = new_run().watch(make_mlp(seed=4))
    key, value = next(iter(kwargs.items()))
    with pytest.raises(ConfigError, match=f"{key}={value!r}.*positive integer"):
        run.add_lora(**kwargs)


def test_manifest_config_snapshot_records_the_ranks_used(new_run, tmp_root):
    g = seeded(5)
    model = make_mlp(in_dim=9, hidden=8, out_dim=7, seed=5)
    run = new_run().watch(model).add_lora(rank=2, rank_out=3).setup({"grad": ["log"]}).save(True)
    step(run, model, torch.randn(2, 9, generator=g), torch.randn(2, 7, generator=g))
    run.finalize()
    with open(os.path.join(tmp_root, "p", "manifest.json")) as f:
        lora = json.load(f)["config"]["lora"]
    assert lora == {"init": "random", "rank": 2, "rank_in": 2, "rank_out": 3}
    assert [(m.rank_in, m.rank_out) for m in run.layout()] == [(2, 3), (2, 3)]


# --------------------------------------------------------------------------- hooks that never fire
class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0]).sum(1)


def test_watch_skips_multihead_attention_out_proj_with_a_warning(new_run):
    seeded(6)
    model = Attention()
    run = new_run()
    with pytest.warns(UserWarning, match=r"'attn\.out_proj'.*never calls its forward"):
        run.watch(model)
    assert list(run.modules) == ["head"]
    step(run, model, torch.randn(3, 4, 8), torch.randn(3, 2))  # every watched layer fires


class Branchy(nn.Module):
    """`used` always runs; `spare` only when asked; `detached` runs but its output is cut off
    from the loss."""

    def __init__(self):
        super().__init__()
        self.used, self.spare, self.detached = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x, spare=False):
        out = self.used(x) + 0 * self.detached(x).detach()
        return out + self.spare(x) if spare else out


@pytest.mark.parametrize("setup", [{"grad": ["log"]}, {"backward": ["covariance"]}])
def test_end_refuses_a_layer_without_forward_or_gradient(new_run, setup):
    g = seeded(7)
    model = Branchy()
    run = new_run().watch(model).setup(setup)
    x = torch.randn(2, 4, generator=g)
    run.start(data_id=[0, 1])
    model(x).sum().backward()
    with pytest.raises(UsageError) as info:
        run.end()
    message = str(info.value)
    assert "no forward pass: ['spare']" in message
    assert "no gradient" in message and "['detached']" in message
    assert "on_unused_layer" in message
    assert not run.statistics.sums  # nothing of the refused step was kept


def test_end_refuses_a_layer_that_never_ran_in_a_forward_only_pass(new_run):
    g = seeded(8)
    model = Branchy()
    run = new_run().watch(model, name_filter=["used", "spare"]).setup(
        {"forward": ["covariance"]})
    with pytest.raises(UsageError, match=r"no forward pass: \['spare'\]"):
        with run(data_id=[0, 1]), torch.no_grad():
            model(torch.randn(2, 4, generator=g))


def test_on_unused_layer_zero_logs_zeros_for_the_unused_layer(new_run):
    g = seeded(9)
    model = Branchy()
    run = new_run(on_unused_layer="zero").watch(model).setup({"grad": ["log"]})
    x = torch.randn(2, 4, generator=g)
    with run(data_id=[0, 1]):
        model(x).sum().backward()
    log = run.get_log()
    assert log.module("used").abs().max() > 0
    assert not log.module("spare").any() and not log.module("detached").any()
    with run(data_id=[2, 3]):
        model(x, spare=True).sum().backward()
    assert run.get_log().module("spare").abs().max() > 0


# --------------------------------------------------------------------------- tied weights
def test_watch_warns_about_tied_weights_naming_both_layers(new_run):
    model = make_tiny_gpt2(seed=10, tie_word_embeddings=True)
    with pytest.warns(UserWarning, match=r"'transformer\.wte' and 'lm_head' share one weight"):
        new_run().watch(model, name_filter=["wte", "lm_head"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new_run("untied").watch(make_tiny_gpt2(seed=10), name_filter=["wte", "lm_head"])


# --------------------------------------------------------------------------- memory budget
def test_setup_refuses_a_grad_covariance_beyond_the_budget(new_run):
    model = nn.Sequential(nn.Linear(2048, 2048, bias=False))
    run = new_run().watch(model)
    with pytest.raises(ConfigError) as info:
        run.setup({"grad": ["log", "covariance"]})
    message = str(info.value)
    assert "grad covariance of '0' (4194304x4194304)" in message and "64.0 TiB" in message
    assert "add_lora" in message and "drop 'covariance'" in message
    run.add_lora(rank=16).setup({"grad": ["log", "covariance"]})  # the fix works


def test_add_lora_rechecks_the_budget(new_run):
    model = nn.Sequential(nn.Linear(64, 64))
    run = new_run(max_statistics_bytes=1 << 20, shard_rows=16).watch(model).add_lora(rank=8)
    run.setup({"grad": ["covariance"]})  # (8 x 8)^2 floats: 16 KiB
    with pytest.raises(ConfigError, match=r"grad covariance of '0' \(1024x1024\).*4\.0 MiB"):
        run.add_lora(rank=32)


def test_a_large_statistic_warns_below_the_budget(new_run):
    model = nn.Sequential(nn.Linear(128, 128))
    run = new_run(max_statistics_bytes=1 << 34).watch(model)
    with pytest.warns(UserWarning, match=r"1\.0 GiB.*grad covariance of '0'"):
        run.setup({"grad": ["log", "covariance"]})


def test_max_statistics_bytes_is_validated(tmp_root):
    with pytest.raises(ConfigError, match="max_statistics_bytes"):
        logix.init("p", root_dir=tmp_root, max_statistics_bytes=0)


# --------------------------------------------------------------------------- float32 projection
def test_bfloat16_layers_are_projected_in_float32(new_run):
    """x and dy of a bfloat16 layer are projected in float32: the logged block is P_out dy x^T
    P_in^T of the bf16 values without rounding the projected vectors to bfloat16."""
    g = seeded(11)
    model = nn.Sequential(nn.Linear(32, 24)).to(torch.bfloat16)
    run = new_run().watch(model).add_lora(rank=8).setup({"grad": ["log"]})
    x = torch.randn(3, 5, 32, generator=g).to(torch.bfloat16)
    captured = {}
    run.start(data_id=[0, 1, 2])
    out = model(x)
    out.register_hook(lambda dy: captured.setdefault("dy", dy))
    (out.float() ** 2).sum().backward()
    run.end()
    p = run.projections["0"]
    x_proj = x.double() @ p.p_in.double().T  # [B, T, 8]
    dy_proj = captured["dy"].double() @ p.p_out.double().T
    exact = torch.einsum("bto,bti->boi", dy_proj, x_proj).float()
    torch.testing.assert_close(run.get_log().module("0"), exact, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- reopening
def test_initialize_from_log_names_the_layer_whose_shape_differs(new_run):
    g = seeded(12)
    model = make_mlp(hidden=5, seed=12)
    run = new_run().watch(model).setup({"grad": ["log"]}).save(True)
    step(run, model, torch.randn(2, 6, generator=g), torch.randn(2, 3, generator=g))
    run.finalize()
    other = new_run().watch(make_mlp(hidden=7, seed=12))
    with pytest.raises(UsageError, match=r"'0' differs.*out_dim=7.*logged.*out_dim=5"):
        other.initialize_from_log()

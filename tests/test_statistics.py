"""Statistics and projections: covariances equal their definitions (logix/statistics/covariance.py)
computed by brute force, PCA projections are the covariances' top eigenvectors, and random
projections are reproducible, stored, and scaled so that E[P^T P] = I.

    forward  = sum over real tokens of x~ x~^T          / number of real tokens
    backward = sum over tokens of dy~ dy~^T              / number of examples
    grad     = sum over examples of vec(G~) vec(G~)^T    / number of examples
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from torch.utils.checkpoint import checkpoint

from conftest import (assert_close_scaled, gradient_matrix, make_conv_model, make_mlp,
                      make_shared, per_example_grads, project, seeded)
from logix import logra
from logix.errors import UsageError
from logix.statistics.covariance import BACKWARD, FORWARD, GRAD, CovarianceState

ALL_STATS = {"grad": ["covariance"], "forward": ["covariance"], "backward": ["covariance"]}


def outer_mean(rows, count):
    """sum_i rows_i rows_i^T / count, in float64 for the reference."""
    rows = rows.double().reshape(-1, rows.shape[-1])
    return (rows.T @ rows / count).float()


def mlp_pass(model, x, y, mask):
    """Layer inputs, output grads and the masked loss (summed) of make_mlp on x [B, T, in]."""
    h = model[0](x)
    a = torch.tanh(h)
    out = model[2](a)
    loss = (((out - y) ** 2).sum(-1) * mask).sum()
    dh, dout = torch.autograd.grad(loss, [h, out])
    return {"0": (x, dh), "2": (a.detach(), dout)}


def example_loss(call, x, y, mask):
    return (((call(x[None])[0] - y) ** 2).sum(-1) * mask).sum()


def with_bias(x, include_bias):
    return torch.cat([x, torch.ones(*x.shape[:-1], 1)], -1) if include_bias else x


def check_mlp_statistics(run, model, batches, include_bias, use_mask):
    """Brute-force forward / backward / grad covariances over several steps."""
    sums = {}
    for x, y, mask in batches:
        tensors = mlp_pass(model, x, y, mask)
        grads = per_example_grads(model, example_loss, x, y, mask)
        for name, (inp, dy) in tensors.items():
            p = run.projections[name]
            xt = with_bias(inp, include_bias)
            xt = xt if p.p_in is None else xt @ p.p_in.T
            dyt = dy if p.p_out is None else dy @ p.p_out.T
            m = mask if use_mask else torch.ones_like(mask)
            xt = xt * m[..., None]  # only real tokens count
            module = dict(model.named_modules())[name]
            gt = project(gradient_matrix(module, grads, name + ".", include_bias), p.p_in,
                         p.p_out).flatten(1)
            for kind, rows, count in ((FORWARD, xt, m.sum()), (BACKWARD, dyt, x.shape[0]),
                                      (GRAD, gt, x.shape[0])):
                rows = rows.double().reshape(-1, rows.shape[-1])
                s, c = sums.get((name, kind), (0, 0))
                sums[(name, kind)] = (s + rows.T @ rows, c + float(count))
    for (name, kind), (s, c) in sums.items():
        got = run.statistics.get(name, kind)
        assert got is not None, (name, kind)
        expected = (s / c).float()
        assert expected.abs().max() > 0
        assert_close_scaled(got, expected)


@pytest.mark.parametrize("rank", [None, 3])
@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("include_bias", [False, True])
def test_linear_covariances_match_definitions(new_run, rank, use_mask, include_bias):
    g = seeded(30)
    model = make_mlp(seed=30)
    run = new_run(include_bias=include_bias)
    run.watch(model)
    if rank is not None:
        run.add_lora(rank=rank)
    run.setup(ALL_STATS)
    batches = []
    for step, lengths in enumerate([[4, 2, 3], [1, 4, 4]]):
        x, y = torch.randn(3, 4, 6, generator=g), torch.randn(3, 4, 3, generator=g)
        mask = (torch.arange(4)[None] < torch.tensor(lengths)[:, None]).float()
        with run(data_id=[f"{step}-{i}" for i in range(3)], mask=mask if use_mask else None):
            (((model(x) - y) ** 2).sum(-1) * mask).sum().backward()
        batches.append((x, y, mask))
    check_mlp_statistics(run, model, batches, include_bias, use_mask)


def test_forward_only_statistics_under_no_grad(new_run):
    """A forward-only pass (no backward at all) still collects the forward covariance."""
    g = seeded(31)
    model = make_mlp(seed=31)
    run = new_run()
    run.watch(model).setup({"forward": ["covariance"]})
    x = torch.randn(5, 6, generator=g)
    with torch.no_grad(), run(data_id=list(range(5))):
        model(x)
    assert_close_scaled(run.statistics.get("0", FORWARD), outer_mean(x, 5))
    a = torch.tanh(model[0](x)).detach()
    assert_close_scaled(run.statistics.get("2", FORWARD), outer_mean(a, 5))
    assert run.statistics.get("0", BACKWARD) is None and run.statistics.get("0", GRAD) is None


class CheckpointedMLP(nn.Module):
    def __init__(self, use_reentrant):
        super().__init__()
        self.inp = nn.Linear(6, 5)
        self.block = nn.Linear(5, 5)
        self.use_reentrant = use_reentrant

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return checkpoint(self.block, h, use_reentrant=self.use_reentrant)


@pytest.mark.parametrize("stats", [["forward"], ["forward", "backward"]])
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_statistics_with_gradient_checkpointing(new_run, use_reentrant, stats):
    g = seeded(32)
    model = CheckpointedMLP(use_reentrant)
    run = new_run()
    run.watch(model).setup({s: ["covariance"] for s in stats})
    x = torch.randn(4, 6, generator=g)
    with run(data_id=list(range(4))):
        model(x).pow(2).sum().backward()
    h = torch.tanh(model.inp(x)).detach()
    # (A reentrant checkpoint's recomputation may add the same rows and count twice with a
    # forward-only plan; the covariance itself, a ratio, is unchanged.)
    assert_close_scaled(run.statistics.get("block", FORWARD), outer_mean(h, 4))


def test_conv2d_grouped_covariances_match_definitions(new_run):
    """Conv tokens are (group, position) pairs: x~ is a group's input patch, dy~ the output
    gradient of that group's channels (zero elsewhere)."""
    g = seeded(33)
    model = make_conv_model(dims=2, size=5, seed=33, padding=1, stride=2, groups=2)
    conv = model.conv
    run = new_run()
    run.watch(model, type_filter=[nn.Conv2d]).setup(ALL_STATS)
    x, y = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 3, generator=g)
    with run(data_id=[0, 1, 2]):
        ((model(x) - y) ** 2).sum().backward()

    out = conv(x)
    loss = ((model.head(torch.tanh(out).flatten(1)) - y) ** 2).sum()
    (dy,) = torch.autograd.grad(loss, [out])
    patches = F.unfold(x, 3, padding=1, stride=2)  # [B, C*9, N], channel-major
    B, _, N = patches.shape
    patches = patches.reshape(B, 2, 18, N).permute(0, 1, 3, 2)  # [B, g, N, C/g*9]
    assert_close_scaled(run.statistics.get("conv", FORWARD), outer_mean(patches, B * 2 * N))
    dy = dy.reshape(B, 6, -1)  # [B, out, N]
    blocks = torch.zeros(B, 2, N, 6)
    blocks[:, 0, :, :3] = dy[:, :3].transpose(1, 2)
    blocks[:, 1, :, 3:] = dy[:, 3:].transpose(1, 2)
    assert_close_scaled(run.statistics.get("conv", BACKWARD), outer_mean(blocks, B))

    def ex_loss(call, x, y):
        return ((call(x[None])[0] - y) ** 2).sum()

    grads = per_example_grads(model, ex_loss, x, y)
    gt = gradient_matrix(conv, grads, "conv.").flatten(1)
    assert_close_scaled(run.statistics.get("conv", GRAD), outer_mean(gt, B))


@pytest.mark.parametrize("passes", [1, 2])
def test_a_layer_called_twice_counts_its_examples_once(new_run, passes):
    """Backward = sum over every call's output gradients, divided by the number of examples
    (as for tokens): a second call, or a second backward pass in the step, adds no examples.
    Forward = E over calls, each call's input a token."""
    model = make_shared(seed=35)
    x = torch.randn(4, 5, generator=seeded(35))
    run = new_run()
    run.watch(model, name_filter=["shared"]).add_lora(rank=3)
    run.setup(ALL_STATS)
    said = pytest.warns(UserWarning, match="passes in one step") if passes > 1 else \
        contextlib.nullcontext()  # two whole-model passes over the same examples: said once
    with said, run(data_id=list(range(4))):
        for _ in range(passes):
            model(x).pow(2).sum().backward()
    h1 = model.shared(x)
    a = torch.tanh(h1)
    h2 = model.shared(a)
    dy1, dy2 = torch.autograd.grad(model.head(h2).pow(2).sum(), [h1, h2])
    p = run.projections["shared"]
    dyt = torch.cat([dy1, dy2]) @ p.p_out.T
    xt = torch.cat([x, a.detach()]) @ p.p_in.T
    backward = outer_mean(dyt, 4) * passes
    assert run.statistics.counts[("shared", BACKWARD)] == 4
    assert_close_scaled(run.statistics.get("shared", BACKWARD), backward)
    assert run.statistics.counts[("shared", FORWARD)] == 8 * passes
    assert_close_scaled(run.statistics.get("shared", FORWARD), outer_mean(xt, 8))


def test_finalize_reduces_forward_backward_only_statistics(new_run, monkeypatch):
    """A statistics-only pass (no grad plan) must still be all-reduced at finalize (DDP)."""
    calls = []
    monkeypatch.setattr(CovarianceState, "all_reduce", lambda self: calls.append(self))
    g = seeded(34)
    model = make_mlp(seed=34)
    run = new_run()
    run.watch(model).setup({"forward": ["covariance"], "backward": ["covariance"]})
    x = torch.randn(3, 6, generator=g)
    with run(data_id=[0, 1, 2]):
        model(x).pow(2).sum().backward()
    run.finalize()
    assert len(calls) == 1


def test_skipped_nonfinite_step_leaves_statistics_untouched(new_run):
    """logging.nonfinite="skip" drops the whole step: its forward and backward statistics too."""
    g = seeded(39)
    model = make_mlp(seed=39)
    run = new_run(nonfinite="skip")
    run.watch(model).setup({**ALL_STATS, "grad": ["log", "covariance"]})
    x = torch.randn(3, 6, generator=g)
    with run(data_id=[0, 1, 2]):
        model(x).pow(2).sum().backward()
    before = {k: (v.clone(), run.statistics.counts[k]) for k, v in run.statistics.sums.items()}
    assert len(before) == 8  # 2 modules x (forward, backward, grad, grad_peak)
    bad = x.clone()
    bad[1, 0] = float("inf")
    with pytest.warns(UserWarning, match="NaN or inf"), run(data_id=[3, 4, 5]):
        model(bad).pow(2).sum().backward()
    for key, (total, count) in before.items():
        assert torch.equal(run.statistics.sums[key], total), key
        assert run.statistics.counts[key] == count, key


# --------------------------------------------------------------------------- PCA
def test_pca_projection_rows_are_top_eigenvectors(new_run):
    g = seeded(35)
    model = make_mlp(in_dim=8, hidden=7, out_dim=6, seed=35)
    run = new_run()
    run.watch(model).setup({"forward": ["covariance"], "backward": ["covariance"]})
    mix = torch.randn(8, 8, generator=g)  # correlated inputs: a well-separated spectrum
    batches = []
    for step in range(3):
        x, y = torch.randn(16, 8, generator=g) @ mix, torch.randn(16, 6, generator=g)
        with run(data_id=[f"{step}-{i}" for i in range(16)]):
            ((model(x) - y) ** 2).sum().backward()
        batches.append((x, y))
    forward, backward = {}, {}
    for name in ("0", "2"):
        forward[name] = run.statistics.get(name, FORWARD).clone()
        backward[name] = run.statistics.get(name, BACKWARD).clone()
    # Brute-force covariances from the layer inputs and output gradients.
    xs, dys = {"0": [], "2": []}, {"0": [], "2": []}
    for x, y in batches:
        for name, (inp, dy) in mlp_pass(model, x, y, torch.ones(16)).items():
            xs[name].append(inp)
            dys[name].append(dy)
    r = 3
    run.add_lora(init="pca", rank=r)
    assert run.projection_meta["init"] == "pca"
    assert run.statistics.get("0", FORWARD) is None  # statistics of the old space are reset
    for name in ("0", "2"):
        fwd = outer_mean(torch.cat(xs[name]), 48)
        bwd = outer_mean(torch.cat(dys[name]), 48)
        assert_close_scaled(forward[name], fwd)
        assert_close_scaled(backward[name], bwd)
        for cov, p in ((fwd, run.projections[name].p_in), (bwd, run.projections[name].p_out)):
            values, vectors = torch.linalg.eigh(cov.double())
            assert (values[-r:].diff().abs() > 1e-3 * values[-1]).all()  # distinct: unique
            top = vectors[:, -r:].flip(-1).T.float()  # [r, d], largest first
            assert p.shape == (r, cov.shape[0])
            signs = torch.sign((p * top).sum(1, keepdim=True))
            torch.testing.assert_close(p, top * signs, rtol=1e-3, atol=1e-3)
            assert_close_scaled(p @ p.T, torch.eye(r))


def test_pca_needs_covariances_first(new_run):
    model = make_mlp(seed=36)
    run = new_run()
    run.watch(model)
    with pytest.raises(UsageError, match="covariance"):
        run.add_lora(init="pca")


# --------------------------------------------------------------------------- random projections
def test_random_projections_reproducible_from_seed_and_name(new_run):
    model = make_mlp(in_dim=9, hidden=7, seed=37)
    a = new_run("a", seed=5).watch(model).add_lora(rank=4)
    b = new_run("b", seed=5).watch(make_mlp(in_dim=9, hidden=7, seed=99)).add_lora(rank=4)
    c = new_run("c", seed=6).watch(model).add_lora(rank=4)
    for name in ("0", "2"):
        pa, pb, pc = a.projections[name], b.projections[name], c.projections[name]
        ref = logra.random_projection(name, pa.in_dim, pa.out_dim, 4, 4, seed=5)
        assert torch.equal(pa.p_in, pb.p_in) and torch.equal(pa.p_in, ref.p_in)
        assert not torch.equal(pa.p_in, pc.p_in)
        if name == "0":  # layer "2" has 3 outputs: rank 4 leaves that side unprojected
            assert torch.equal(pa.p_out, pb.p_out) and torch.equal(pa.p_out, ref.p_out)
    # Two layers of the same shape get different projections (the name is mixed in).
    same = logra.random_projection("x", 7, 7, 3, 3, 0), logra.random_projection("y", 7, 7, 3, 3, 0)
    assert not torch.equal(same[0].p_in, same[1].p_in)
    assert a.projections["2"].p_out is None and a.projections["2"].rank_out == 3  # identity


def test_random_projections_stored_in_state_file(new_run, tmp_root):
    g = seeded(38)
    model = make_mlp(seed=38)
    run = new_run("stored", seed=3)
    run.watch(model).add_lora(rank=2).setup({"grad": ["log"]}).save(True)
    with run(data_id=[0, 1]):
        model(torch.randn(2, 6, generator=g)).sum().backward()
    run.finalize()
    path = os.path.join(tmp_root, "stored", "state", "projections.safetensors")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == {"0::p_in", "0::p_out", "2::p_in", "2::p_out"}
        for name in ("0", "2"):
            assert torch.equal(f.get_tensor(f"{name}::p_in"), run.projections[name].p_in)
            assert torch.equal(f.get_tensor(f"{name}::p_out"), run.projections[name].p_out)
    assert '"seed": 3' in meta["meta"] and '"init": "random"' in meta["meta"]


@pytest.mark.parametrize("rank", [2, 6])
def test_random_projection_scaling_expectation_is_identity(rank):
    """Entries of variance 1/rank: the mean of P^T P over many seeds is close to I, whatever the
    rank (projected inner products estimate the full ones without bias)."""
    dim, seeds = 8, 600
    total_in, total_out = torch.zeros(dim, dim), torch.zeros(dim + 1, dim + 1)
    for seed in range(seeds):
        p = logra.random_projection("layer", dim, dim + 1, rank, rank, seed)
        total_in += p.p_in.T @ p.p_in
        total_out += p.p_out.T @ p.p_out
    torch.testing.assert_close(total_in / seeds, torch.eye(dim), rtol=0, atol=0.15)
    torch.testing.assert_close(total_out / seeds, torch.eye(dim + 1), rtol=0, atol=0.15)
    # And not the unscaled Gaussian (whose mean would be rank * I).
    assert ((total_in / seeds).diagonal() - 1).abs().mean() < 0.1


def test_covariance_state_roundtrip_and_counts():
    state = CovarianceState()
    rows = torch.randn(5, 3)
    state.update("m", FORWARD, rows, 5)
    state.update("m", FORWARD, 2 * rows, 10)
    assert_close_scaled(state.get("m", FORWARD), (rows.T @ rows) * 5 / 15)
    other = CovarianceState()
    other.load_state_dict(state.state_dict())
    assert torch.equal(other.get("m", FORWARD), state.get("m", FORWARD))
    assert other.counts == state.counts
    assert other.get("m", BACKWARD) is None


def test_statistics_pass_then_logging_pass_keeps_its_factors(new_run):
    """The true-Fisher recipe of docs/concepts.md: forward/backward covariances from a statistics
    pass (there on sampled labels), then a logging pass on the data's labels, which must leave
    them as the first pass measured them."""
    g = seeded(35)
    model = make_mlp(seed=35)
    run = new_run()
    run.watch(model)
    x = torch.randn(3, 4, 6, generator=g)
    y_stats, y_log = torch.randn(3, 4, 3, generator=g), torch.randn(3, 4, 3, generator=g)
    run.setup({"forward": ["covariance"], "backward": ["covariance"]})
    run.save(False)
    with run(data_id=[0, 1, 2]):
        ((model(x) - y_stats) ** 2).sum().backward()
    model.zero_grad()
    run.setup({"grad": ["log"]})
    run.save(True)
    with run(data_id=[0, 1, 2]):
        ((model(x) - y_log) ** 2).sum().backward()
    run.finalize()
    assert run.get_log().grads.abs().max() > 0  # the logging pass logged
    ones = torch.ones(3, 4)
    logged = mlp_pass(model, x, y_log, ones)
    for name, (inp, dy) in mlp_pass(model, x, y_stats, ones).items():
        assert_close_scaled(run.statistics.get(name, FORWARD), outer_mean(inp, 12))
        assert_close_scaled(run.statistics.get(name, BACKWARD), outer_mean(dy, 3))
        other = outer_mean(logged[name][1], 3)  # what the logging pass's labels would give
        assert not torch.allclose(run.statistics.get(name, BACKWARD), other, rtol=0.05)

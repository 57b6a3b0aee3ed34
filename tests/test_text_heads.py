"""Attention heads scored apart: per-head influence groups of a tiny GPT-2 against per-example
gradients of each head's slice of the weight (torch.func), projected the same way, and the heads
summing to their layer."""

from __future__ import annotations

import pytest
import torch

import logix
from conftest import log_token_windows, make_tiny_gpt2, summed_nll
from logix.errors import ConfigError, UsageError
from logix.logra import NO_HEAD, HeadSplit
from logix.text import attention_heads, head_groups

LAYERS = ("transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_proj")
N_HEADS = 2


def per_example_grads(model, ids, name):
    """[B, out, in(+1)] each example's gradient of layer `name` (weight as [out, in], bias
    column last), from torch.func.vmap(grad(...))."""
    from torch.func import functional_call, grad, vmap

    layer = model.get_submodule(name)
    params = {f"{name}.weight": layer.weight.detach(), f"{name}.bias": layer.bias.detach()}

    def loss(p, seq):
        logits = functional_call(model, p, (seq[None],), strict=False).logits
        return summed_nll(logits, seq[None])

    g = vmap(grad(loss), in_dims=(None, 0))(params, ids)
    g = {k: v.detach() for k, v in g.items()}
    return torch.cat([g[f"{name}.weight"].transpose(1, 2), g[f"{name}.bias"][..., None]], 2)


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("heads"))
    model = make_tiny_gpt2()
    run = logix.init("heads", root_dir=root, logging={"include_bias": True})
    heads = attention_heads(model)
    run.watch(model, name_filter=list(LAYERS), heads={n: heads[n] for n in LAYERS})
    run.add_lora(rank=6)
    run.setup({"grad": ["log"]})
    g = torch.Generator().manual_seed(4)
    train = torch.randint(1, 50, (6, 8), generator=g)
    log_token_windows(run, model, train, 3)
    query = torch.randint(1, 50, (2, 8), generator=g)
    with run(data_id=["q0", "q1"]):
        summed_nll(model(query).logits, query).backward()
    return run, model, train, query, run.get_log(copy=True)


def test_attention_heads_of_gpt2():
    model = make_tiny_gpt2()
    heads = attention_heads(model)
    assert heads["transformer.h.0.attn.c_attn"] == HeadSplit(N_HEADS, "out", 3)
    assert heads["transformer.h.1.attn.c_proj"] == HeadSplit(N_HEADS, "in", 1)
    assert not any("mlp" in name for name in heads)
    # c_attn is q | k | v, each split over the heads: 96 outputs, heads of 16
    index = heads["transformer.h.0.attn.c_attn"].head_of(96, True)
    assert index.tolist() == ([0] * 16 + [1] * 16) * 3
    assert heads["transformer.h.1.attn.c_proj"].head_of(33, True).tolist() == \
        [0] * 16 + [1] * 16 + [NO_HEAD]


def test_split_projections_are_block_diagonal(logged):
    run = logged[0]
    c_attn, c_proj = (run.projections[n] for n in LAYERS)
    heads = HeadSplit(N_HEADS, "out", 3).head_of(96, True)
    assert c_attn.p_out.shape == (6, 96)  # 3 rows per head
    for h in range(N_HEADS):
        rows = c_attn.p_out[3 * h:3 * h + 3]
        assert float(rows[:, heads != h].abs().max()) == 0
        assert float(rows[:, heads == h].abs().min()) > 0
    assert c_proj.p_in.shape == (7, 33)  # 3 rows per head, then the bias column kept whole
    assert c_proj.p_in[6].tolist() == [0.0] * 32 + [1.0]
    assert run.projection_meta["heads"]["transformer.h.0.attn.c_attn"] == \
        {"heads": N_HEADS, "side": "out", "parts": 3, "rank": 3}


def test_head_scores_match_per_head_gradients_and_sum_to_the_layer(logged):
    run, model, train, query, log = logged
    groups = head_groups(run)
    assert sorted(groups) == sorted([f"{LAYERS[0]}/head0", f"{LAYERS[0]}/head1",
                                     f"{LAYERS[1]}/head0", f"{LAYERS[1]}/head1",
                                     f"{LAYERS[1]}/bias"])
    result = run.influence.influence(log, hessian="none", influence_groups=groups,
                                     progress=False)
    layers = run.influence.influence(log, hessian="none", influence_groups="module",
                                     progress=False)
    assert list(result["tgt_ids"]) == list(range(6))
    for name in LAYERS:
        split = run.layers.splits[name]
        p = run.projections[name]
        g_train = per_example_grads(model, train, name).double()
        g_query = per_example_grads(model, query, name).double()
        width = p.out_dim if split.side == "out" else p.in_dim
        heads = split.head_of(width, True)
        parts = list(range(N_HEADS)) + ([NO_HEAD] if (heads == NO_HEAD).any() else [])
        total = torch.zeros(2, 6, dtype=torch.float64)
        for h in parts:
            keep = heads == h
            if split.side == "out":  # the head's rows of G, the head's block of P_out
                p_out = p.p_out.double()[:, keep]
                rows = p_out.abs().sum(1) > 0
                project = lambda g: p_out[rows] @ g[:, keep] @ p.p_in.double().T  # noqa: E731
            else:  # the head's columns of G, the head's block of P_in
                p_in = p.p_in.double()[:, keep]
                rows = p_in.abs().sum(1) > 0
                project = lambda g: p.p_out.double() @ g[:, :, keep] @ p_in[rows].T  # noqa: E731
            expected = project(g_query).flatten(1) @ project(g_train).flatten(1).T
            got = result["groups"][f"{name}/{'bias' if h == NO_HEAD else f'head{h}'}"].double()
            assert float(expected.detach().abs().max()) > 0
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(
                expected.abs().max()))
            total += got
        layer = layers["groups"][name].double()
        torch.testing.assert_close(total, layer, rtol=1e-5, atol=1e-5 * float(layer.abs().max()))


def test_heads_survive_a_new_process(logged):
    run = logged[0]
    attributor = logix.Attributor(run.project_dir)
    mine, theirs = head_groups(run), head_groups(attributor)
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_unprojected_heads_and_kfac_sum_to_the_layer(new_run):
    model = make_tiny_gpt2()
    run = new_run()
    run.watch(model, name_filter=[LAYERS[0]], heads={LAYERS[0]: HeadSplit(N_HEADS, "out", 3)})
    run.setup({"grad": ["log"], "forward": ["covariance"], "backward": ["covariance"]})
    run.save(True)
    ids = torch.randint(1, 50, (4, 8), generator=torch.Generator().manual_seed(0))
    with run(data_id=[0, 1, 2, 3]):
        summed_nll(model(ids).logits, ids).backward()
    run.finalize()
    run.eval()
    with run(data_id=["q"]):
        summed_nll(model(ids[:1]).logits, ids[:1]).backward()
    log = run.get_log(copy=True)
    groups = head_groups(log)
    # identity projection: a head's columns are its 48 output rows of G [96, 32]
    assert [int(m.sum()) for m in groups.values()] == [48 * 32, 48 * 32]
    for hessian in ("none", "kfac"):
        result = run.influence.influence(log, hessian=hessian, influence_groups=groups,
                                         progress=False)
        total = sum(result["groups"][k] for k in groups)
        torch.testing.assert_close(total, result["influence"], rtol=1e-5,
                                   atol=1e-5 * float(result["influence"].abs().max()))


def test_refusals(new_run):
    model = make_tiny_gpt2()
    run = new_run()
    with pytest.raises(UsageError, match="not a watched layer"):
        run.watch(model, name_filter=["c_attn"], heads={"transformer.h.0.mlp.c_fc": 2})
    with pytest.raises(ConfigError, match="does not split"):
        run.watch(model, heads={"transformer.h.0.attn.c_attn": 5})
    with pytest.raises(ConfigError, match="side"):
        HeadSplit(2, side="query")
    run.watch(model, heads={"transformer.h.0.attn.c_attn": HeadSplit(2, "out", 3)})
    with pytest.raises(ConfigError, match="no row to each"):
        run.add_lora(rank=1)
    plain = new_run("plain")
    plain.watch(model)
    with pytest.raises(UsageError, match="split over heads"):
        head_groups(plain)


def test_pca_blocks_are_each_heads_top_eigenvectors(new_run):
    model = make_tiny_gpt2()
    run = new_run()
    run.watch(model, name_filter=[LAYERS[0]], heads={LAYERS[0]: HeadSplit(N_HEADS, "out", 3)})
    run.setup({"forward": ["covariance"], "backward": ["covariance"]})
    ids = torch.randint(1, 50, (4, 8), generator=torch.Generator().manual_seed(1))
    with run(data_id=[0, 1, 2, 3]):
        summed_nll(model(ids).logits, ids).backward()
    backward = run.statistics.get(LAYERS[0], "backward").double()
    run.add_lora(init="pca", rank=6)
    p_out = run.projections[LAYERS[0]].p_out
    heads = HeadSplit(N_HEADS, "out", 3).head_of(96, False)
    for h in range(N_HEADS):
        keep = heads == h
        block = p_out[3 * h:3 * h + 3]
        assert float(block[:, ~keep].abs().max()) == 0
        values, vectors = torch.linalg.eigh(backward[keep][:, keep])
        top = vectors[:, -3:].flip(-1).T  # the head's top 3 eigenvectors, largest first
        overlap = (block[:, keep].double() @ top.T).abs()
        torch.testing.assert_close(overlap, torch.eye(3, dtype=torch.float64), atol=1e-4,
                                   rtol=0)
    assert run.projection_meta["heads"][LAYERS[0]]["rank"] == 3

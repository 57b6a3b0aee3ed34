"""Projected per-example gradients (DESIGN.md 4.1): the logged row of example n is, per module,
P_out @ G_n @ P_in^T with G_n the gradient of that example's loss, checked against
torch.func.vmap(grad(...)) for every supported module type, masks, accumulation, weight sharing
and gradient checkpointing. Logging must not change training (bit-identical grads and outputs).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from conftest import (assert_close_scaled, gradient_matrix, make_conv_model, make_embedding_model,
                      make_hf_conv1d_model, make_mlp, make_shared, make_tiny_bert, make_tiny_gpt2,
                      padded_tokens, per_example_grads, per_example_grads_loop, project, seeded)

RANKS = [None, 3]  # None: no add_lora (full gradients); 3: random LoGra projection


# --------------------------------------------------------------------------- helpers
def example_sq_loss(call, x, y):
    """One example's loss: squared error of the model output (batch of one)."""
    return ((call(x[None])[0] - y) ** 2).sum()


def batch_sq_loss(out, y):
    """The batch loss: per-example losses SUMMED over the batch."""
    return ((out - y) ** 2).sum()


def watched_run(new_run, model, rank=None, include_bias=False, **watch_kwargs):
    run = new_run(include_bias=include_bias)
    run.watch(model, **watch_kwargs)
    if rank is not None:
        run.add_lora(rank=rank)
    run.setup({"grad": ["log"]})
    return run


def expected_rows(run, model, grads, include_bias=False):
    """The log rows [B, dim] the brute-force per-example grads predict, module by module."""
    modules = dict(model.named_modules())
    parts = []
    for entry in run.layout():
        g = gradient_matrix(modules[entry.name], grads, entry.name + ".", include_bias)
        assert g.shape[1:] == (entry.out_dim, entry.in_dim), entry
        p = run.projections[entry.name]
        parts.append(project(g, p.p_in, p.p_out).flatten(1))
    return torch.cat(parts, 1)


def check_log(run, model, expected_grads, include_bias=False):
    """The last step's log matches the brute force, per module and as whole rows."""
    log = run.get_log()
    assert len(log) > 0 and log.grads.numel() > 0, "nothing was logged"
    expected = expected_rows(run, model, expected_grads, include_bias)
    assert log.grads.shape == expected.shape
    for entry in run.layout():
        exp = expected[:, entry.columns].reshape(-1, entry.rank_out, entry.rank_in)
        assert exp.abs().max() > 0, f"{entry.name}: brute-force gradient is zero; weak test"
        assert_close_scaled(log.module(entry.name), exp)
    assert_close_scaled(log.grads, expected)
    return log


def log_and_check(new_run, model, x, y, rank=None, include_bias=False, **watch_kwargs):
    run = watched_run(new_run, model, rank, include_bias, **watch_kwargs)
    with run(data_id=list(range(len(x)))):
        batch_sq_loss(model(x), y).backward()
    grads = per_example_grads(model, example_sq_loss, x, y)
    log = check_log(run, model, grads, include_bias)
    assert log.data_ids == list(range(len(x)))
    return run, log


# --------------------------------------------------------------------------- module types
@pytest.mark.parametrize("rank", RANKS)
def test_linear_2d_input(new_run, rank):
    g = seeded(1)
    model = make_mlp(seed=1)
    x, y = torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)
    run, _ = log_and_check(new_run, model, x, y, rank)
    assert [e.name for e in run.layout()] == ["0", "2"]  # watch order = model order
    if rank is None:
        assert all(p.p_in is None and p.p_out is None for p in run.projections.values())
    else:
        assert run.projections["0"].p_in.shape == (3, 6)
        assert run.projections["0"].p_out.shape == (3, 5)


@pytest.mark.parametrize("rank", RANKS)
def test_linear_3d_input(new_run, rank):
    g = seeded(2)
    model = make_mlp(seed=2)
    x, y = torch.randn(3, 5, 6, generator=g), torch.randn(3, 5, 3, generator=g)
    log_and_check(new_run, model, x, y, rank)


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("geometry", [
    dict(stride=2, padding=1, dilation=2),
    dict(groups=2, padding=2),
], ids=["stride-pad-dilation", "groups"])
def test_conv1d(new_run, rank, geometry):
    g = seeded(3)
    model = make_conv_model(dims=1, size=9, seed=3, **geometry)
    x, y = torch.randn(3, 4, 9, generator=g), torch.randn(3, 3, generator=g)
    log_and_check(new_run, model, x, y, rank, type_filter=[nn.Conv1d])


CONV2D_GEOMETRIES = {
    "stride-padding": dict(stride=2, padding=1),
    "dilation": dict(padding=2, dilation=2),
    "groups-asymmetric": dict(groups=2, stride=(2, 1), padding=(1, 0)),
    "all": dict(stride=2, padding=1, dilation=2, groups=2),
    "reflect": dict(padding=1, padding_mode="reflect", groups=2),
    "same": dict(padding="same", dilation=(1, 2)),
    "circular": dict(padding=(1, 2), padding_mode="circular"),
}


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("name", list(CONV2D_GEOMETRIES))
def test_conv2d(new_run, rank, name):
    g = seeded(4)
    model = make_conv_model(dims=2, size=7, seed=4, **CONV2D_GEOMETRIES[name])
    x, y = torch.randn(3, 4, 7, 7, generator=g), torch.randn(3, 3, generator=g)
    run, _ = log_and_check(new_run, model, x, y, rank, type_filter=[nn.Conv2d])
    groups = CONV2D_GEOMETRIES[name].get("groups", 1)
    assert run.layout()[0].in_dim == 4 // groups * 9 and run.layout()[0].out_dim == 6


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("padding_idx", [None, 0])
def test_embedding(new_run, rank, padding_idx):
    g = seeded(5)
    model = make_embedding_model(padding_idx=padding_idx, seed=5)
    ids = torch.randint(0, 11, (4, 6), generator=g)
    ids[:, 0] = 0  # every example uses token 0 (the padding index when set)
    y = torch.randn(4, 3, generator=g)
    run, log = log_and_check(new_run, model, ids, y, rank, type_filter=[nn.Embedding])
    if padding_idx is not None and rank is None:
        assert log.module("embed")[:, :, padding_idx].abs().max() == 0


@pytest.mark.parametrize("rank", RANKS)
def test_hf_conv1d(new_run, rank):
    g = seeded(6)
    model = make_hf_conv1d_model(seed=6)
    x, y = torch.randn(3, 4, 6, generator=g), torch.randn(3, 3, generator=g)
    run, _ = log_and_check(new_run, model, x, y, rank)
    assert [e.type for e in run.layout()] == ["Conv1D", "Conv1D"]
    assert run.layout()[0].in_dim == 6 and run.layout()[0].out_dim == 5


@pytest.mark.parametrize("rank", RANKS)
def test_include_bias_linear(new_run, rank):
    g = seeded(7)
    model = make_mlp(seed=7)
    x, y = torch.randn(3, 2, 6, generator=g), torch.randn(3, 2, 3, generator=g)
    run, _ = log_and_check(new_run, model, x, y, rank, include_bias=True)
    assert run.layout()[0].in_dim == 7 and run.layout()[0].bias


@pytest.mark.parametrize("rank", RANKS)
def test_include_bias_conv2d(new_run, rank):
    g = seeded(8)
    model = make_conv_model(dims=2, size=7, seed=8, stride=2, padding=1, groups=2)
    x, y = torch.randn(3, 4, 7, 7, generator=g), torch.randn(3, 3, generator=g)
    run, _ = log_and_check(new_run, model, x, y, rank, include_bias=True,
                           type_filter=[nn.Conv2d])
    assert run.layout()[0].in_dim == 2 * 9 + 1


def test_inplace_activation_after_tracked_layer(new_run):
    """ReLU(inplace=True) rewrites the tracked layer's output after the hook saw it."""
    g = seeded(22)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(inplace=True), nn.Linear(5, 3))
    x, y = torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g)
    log_and_check(new_run, model, x, y, rank=3)


class KeywordCall(nn.Module):
    """Calls its layers by keyword: `layer(input=x)`."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(input=torch.tanh(self.fc(input=x)))


def test_layer_called_with_keyword_input(new_run):
    g = seeded(24)
    model = KeywordCall()
    x, y = torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)
    log_and_check(new_run, model, x, y)


def test_separate_input_and_output_ranks(new_run):
    g = seeded(23)
    model = make_mlp(in_dim=8, hidden=7, out_dim=6, seed=23)
    x, y = torch.randn(4, 8, generator=g), torch.randn(4, 6, generator=g)
    run = new_run().watch(model).add_lora(rank_in=2, rank_out=4)
    assert [(e.rank_out, e.rank_in) for e in run.layout()] == [(4, 2), (4, 2)]
    with run(data_id=[0, 1, 2, 3]):
        batch_sq_loss(model(x), y).backward()
    check_log(run, model, per_example_grads(model, example_sq_loss, x, y))


# --------------------------------------------------------------------------- transformers
def lm_labels(ids, mask):
    """Next-token targets, -100 where the target is padding."""
    return ids[..., 1:].masked_fill(mask[..., 1:] == 0, -100)


def lm_example_loss(call, ids, mask):
    logits = call(input_ids=ids[None], attention_mask=mask[None]).logits[0, :-1]
    return F.cross_entropy(logits, lm_labels(ids, mask), reduction="sum", ignore_index=-100)


def lm_batch_loss(model, ids, mask):
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), lm_labels(ids, mask).reshape(-1),
                           reduction="sum", ignore_index=-100)


def no_position_embeddings(name: str) -> bool:
    # Position embeddings see position ids [1, T] (broadcast over the batch); they are tested on
    # their own in test_watch_whole_gpt2_default_filters.
    return "wpe" not in name and "position_embeddings" not in name


def log_lm(run, model, ids, mask, ids_names=None):
    with run(data_id=ids_names or list(range(len(ids))), mask=mask):
        lm_batch_loss(model, ids, mask).backward()
    return run.get_log().clone()


@pytest.mark.parametrize("rank", RANKS)
def test_tiny_gpt2_with_padding_mask(new_run, rank):
    model = make_tiny_gpt2(seed=9)
    ids, mask = padded_tokens([8, 5, 3], 8, seed=9)
    run = watched_run(new_run, model, rank, name_filter=no_position_embeddings)
    assert {e.type for e in run.layout()} == {"Embedding", "Conv1D", "Linear"}
    log = log_lm(run, model, ids, mask)
    grads = per_example_grads(model, lm_example_loss, ids, mask)
    check_log(run, model, grads)

    # Padding does not change the real tokens' result: garbage in the padded positions, or the
    # example alone without any padding, gives the same rows.
    garbage = torch.where(mask.bool(), ids, torch.randint(1, 50, ids.shape))
    assert not torch.equal(garbage, ids)
    model.zero_grad()
    assert_close_scaled(log_lm(run, model, garbage, mask).grads, log.grads)
    for i, n in enumerate([8, 5, 3]):
        alone = log_lm(run, model, ids[i:i + 1, :n], mask[i:i + 1, :n], ids_names=[i])
        assert_close_scaled(alone.grads[0], log.grads[i])


@pytest.mark.parametrize("rank", RANKS)
def test_tiny_bert_classifier_with_padding_mask(new_run, rank):
    model = make_tiny_bert(seed=10)
    ids, mask = padded_tokens([7, 4, 2], 7, seed=10)
    labels = torch.tensor([0, 2, 1])

    def logged(ids, mask, labels, names):
        with run(data_id=names, mask=mask):
            logits = model(input_ids=ids, attention_mask=mask).logits
            F.cross_entropy(logits, labels, reduction="sum").backward()
        return run.get_log().clone()

    run = watched_run(new_run, model, rank, name_filter=no_position_embeddings)
    log = logged(ids, mask, labels, [0, 1, 2])
    # BERT's mask code branches on the mask's values, which vmap cannot batch: brute force with
    # one autograd.grad per example of the padded batch instead.
    logits = model(input_ids=ids, attention_mask=mask).logits
    grads = per_example_grads_loop(model, F.cross_entropy(logits, labels, reduction="none"))
    check_log(run, model, grads)
    for i, n in enumerate([7, 4, 2]):
        alone = logged(ids[i:i + 1, :n], mask[i:i + 1, :n], labels[i:i + 1], [i])
        assert_close_scaled(alone.grads[0], log.grads[i])


def test_tied_gpt2_embeddings_sum_to_the_shared_gradient(new_run):
    """wte and lm_head share one weight: their logged parts add up to its gradient."""
    model = make_tiny_gpt2(seed=11, tie_word_embeddings=True)
    assert model.lm_head.weight is model.transformer.wte.weight
    ids, mask = padded_tokens([6, 4], 6, seed=11)
    run = watched_run(new_run, model, name_filter=["wte", "lm_head"])
    log = log_lm(run, model, ids, mask)
    grads = per_example_grads(model, lm_example_loss, ids, mask)
    shared = grads["transformer.wte.weight"]  # [B, vocab, n_embd]
    total = log.module("transformer.wte").transpose(1, 2) + log.module("lm_head")
    assert shared.abs().max() > 0
    assert_close_scaled(total, shared)


def test_watch_whole_gpt2_default_filters(new_run):
    """Position embeddings see position ids [1, T] shared by the batch; the hooks expand them so
    that their per-example gradients are logged too, and training is unchanged."""
    model = make_tiny_gpt2(seed=12)
    ids, mask = padded_tokens([4, 3, 2], 4, seed=12)
    run = watched_run(new_run, model)
    assert any("wpe" in e.name for e in run.layout())
    lm_batch_loss(model, ids, mask).backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    log_lm(run, model, ids, mask)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, reference[n]), n
    check_log(run, model, per_example_grads(model, lm_example_loss, ids, mask))


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gpt2_gradient_checkpointing_matches_plain(new_run, use_reentrant):
    model = make_tiny_gpt2(seed=13)
    ids, mask = padded_tokens([6, 4], 6, seed=13)
    run = watched_run(new_run, model, 4, name_filter=no_position_embeddings)
    plain = log_lm(run, model, ids, mask)
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:  # transformers >= 5
        enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    else:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model.train()
    assert model.transformer.gradient_checkpointing
    model.zero_grad()
    checkpointed = log_lm(run, model, ids, mask)
    assert plain.grads.abs().max() > 0
    assert_close_scaled(checkpointed.grads, plain.grads)


# --------------------------------------------------------------------------- training patterns
@pytest.mark.parametrize("rank", RANKS)
def test_gradient_accumulation(new_run, rank):
    """Two micro-batches per optimizer step: each step's rows are its own examples' gradients,
    while the parameters' .grad keeps accumulating as without LogIX."""
    g = seeded(14)
    model = make_mlp(seed=14)
    run = watched_run(new_run, model, rank)
    batches = [(torch.randn(3, 6, generator=g), torch.randn(3, 3, generator=g)) for _ in range(2)]
    total = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for step, (x, y) in enumerate(batches):
        with run(data_id=[f"{step}-{i}" for i in range(3)]):
            batch_sq_loss(model(x), y).backward()
        grads = per_example_grads(model, example_sq_loss, x, y)
        check_log(run, model, grads)
        for k in total:
            total[k] += grads[k].sum(0)
        for k, p in model.named_parameters():
            assert_close_scaled(p.grad, total[k])


@pytest.mark.parametrize("rank", RANKS)
def test_module_called_twice_in_one_forward(new_run, rank):
    g = seeded(15)
    model = make_shared(seed=15)
    x, y = torch.randn(4, 5, generator=g), torch.randn(4, 3, generator=g)
    run, _ = log_and_check(new_run, model, x, y, rank)
    assert [e.name for e in run.layout()] == ["shared", "head"]


class EqualWidthMLP(nn.Module):
    """Four 8 -> 8 linear layers: projected on both sides they form one run of equally shaped
    layers, whose outer products the hooks write with one multiply; `repeat` calls one layer
    twice (its two calls sum, and the run falls back to one multiply per layer)."""

    def __init__(self, repeat=None):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
        self.repeat = repeat

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = torch.tanh(layer(x))
            if i == self.repeat:
                x = torch.tanh(layer(x))
        return x


@pytest.mark.parametrize("include_bias", [False, True])
@pytest.mark.parametrize("repeat", [None, 1])
def test_a_run_of_equal_layers_matches_brute_force(new_run, include_bias, repeat):
    g = seeded(17)
    torch.manual_seed(17)
    model = EqualWidthMLP(repeat)
    x, y = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    run, _ = log_and_check(new_run, model, x, y, rank=3, include_bias=include_bias)
    assert run.layers.row_layout().runs == [[f"layers.{i}" for i in range(4)]]
    with run(data_id=list(range(5, 10))):  # the step buffers of the step before are reused
        batch_sq_loss(model(x * 2), y).backward()
    check_log(run, model, per_example_grads(model, example_sq_loss, x * 2, y), include_bias)


def test_two_backward_passes_in_one_step_sum_on_a_run_of_equal_layers(new_run):
    """Two losses backpropagated separately inside one step: the hooks of each call fire twice
    and the rows are the gradients of the summed loss, as .grad is."""
    g = seeded(18)
    torch.manual_seed(18)
    model = EqualWidthMLP()
    x, y = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    run = watched_run(new_run, model, rank=3)
    with run(data_id=list(range(5))):
        out = model(x)
        batch_sq_loss(out, y).backward(retain_graph=True)
        (0.1 * out ** 2).sum().backward()

    def both_losses(call, x, y):
        out = call(x[None])[0]
        return ((out - y) ** 2).sum() + 0.1 * (out ** 2).sum()

    check_log(run, model, per_example_grads(model, both_losses, x, y))


class CheckpointedMLP(nn.Module):
    """Linear -> [checkpointed Linear-Tanh-Linear] -> Linear."""

    def __init__(self, use_reentrant=None):
        super().__init__()
        self.inp = nn.Linear(6, 5)
        self.block = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 5))
        self.head = nn.Linear(5, 3)
        self.use_reentrant = use_reentrant  # None: no checkpointing (the brute force)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        if self.use_reentrant is None:
            h = self.block(h)
        else:
            h = checkpoint(self.block, h, use_reentrant=self.use_reentrant)
        return self.head(h)


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing(new_run, rank, use_reentrant):
    g = seeded(16)
    model = CheckpointedMLP(use_reentrant)
    x, y = torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)
    run = watched_run(new_run, model, rank)
    with run(data_id=list(range(4))):
        batch_sq_loss(model(x), y).backward()
    model.use_reentrant = None
    grads = per_example_grads(model, example_sq_loss, x, y)
    check_log(run, model, grads)
    assert [e.name for e in run.layout()] == ["inp", "block.0", "block.2", "head"]


def test_random_projection_is_the_projected_full_gradient(new_run):
    """add_lora(rank) rows = P_out @ (rows without add_lora) @ P_in^T, on the same batch."""
    g = seeded(17)
    model = make_conv_model(dims=2, size=6, seed=17, padding=1)
    x, y = torch.randn(3, 4, 6, 6, generator=g), torch.randn(3, 3, generator=g)
    full_run = watched_run(new_run, model)
    with full_run(data_id=[0, 1, 2]):
        batch_sq_loss(model(x), y).backward()
    full = full_run.get_log()
    assert full.grads.shape[1] == 6 * 36 + 3 * 6 * 36
    proj_run = watched_run(new_run, model, rank=4)
    with proj_run(data_id=[0, 1, 2]):
        batch_sq_loss(model(x), y).backward()
    projected = proj_run.get_log()
    assert projected.grads.shape[1] == 4 * 4 + 3 * 4  # head: rank_out clipped to 3
    for entry in proj_run.layout():
        p = proj_run.projections[entry.name]
        assert_close_scaled(projected.module(entry.name),
                            project(full.module(entry.name), p.p_in, p.p_out))


# --------------------------------------------------------------------------- no side effects
def _train(model, batches, run=None, steps_per_log=1):
    """A few SGD steps; returns the outputs and grads of every step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    outputs, grads = [], []
    for step, (ids, mask) in enumerate(batches):
        opt.zero_grad()
        if run is not None:
            run.start(data_id=[f"{step}-{i}" for i in range(len(ids))], mask=mask)
        out = model(input_ids=ids, attention_mask=mask).logits
        loss = F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]),
                               lm_labels(ids, mask).reshape(-1), ignore_index=-100)
        loss.backward()
        if run is not None:
            run.end()
        outputs.append(out.detach().clone())
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
        opt.step()
    return outputs, grads


def test_logging_does_not_change_training(new_run):
    """Outputs, parameter .grad and weights after SGD steps are bit-identical with logging on
    (projections, every statistic, saving to disk) and off."""
    plain = make_tiny_gpt2(seed=18)
    logged = copy.deepcopy(plain)
    batches = [padded_tokens([6, 3, 5], 6, seed=s) for s in range(3)]
    run = new_run(shard_rows=2)
    run.watch(logged, name_filter=no_position_embeddings)
    run.add_lora(rank=4)
    run.setup({"grad": ["log", "covariance"], "forward": ["covariance"],
               "backward": ["covariance"]})
    run.save(True)
    out_a, grads_a = _train(plain, batches)
    out_b, grads_b = _train(logged, batches, run)
    run.finalize()
    assert run.reader().rows == 9
    for a, b in zip(out_a, out_b):
        assert torch.equal(a, b)
    for a, b in zip(grads_a, grads_b):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    for (k, a), (_, b) in zip(plain.named_parameters(), logged.named_parameters()):
        assert torch.equal(a, b), k
    assert not all(torch.equal(a, b) for a, b in
                   zip(plain.parameters(), make_tiny_gpt2(seed=18).parameters()))


def test_logging_conv_model_is_bit_identical(new_run):
    g = seeded(19)
    plain = make_conv_model(dims=2, size=7, seed=19, stride=2, padding=1, groups=2)
    logged = copy.deepcopy(plain)
    x, y = torch.randn(4, 4, 7, 7, generator=g), torch.randn(4, 3, generator=g)
    run = new_run(include_bias=True)
    run.watch(logged).add_lora(rank=3)
    out_a = plain(x)
    batch_sq_loss(out_a, y).backward()
    with run(data_id=[0, 1, 2, 3]):
        out_b = logged(x)
        batch_sq_loss(out_b, y).backward()
    assert run.get_log().grads.abs().max() > 0
    assert torch.equal(out_a, out_b)
    for a, b in zip(plain.parameters(), logged.parameters()):
        assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("factory, x_shape, type_filter", [
    (lambda: make_mlp(seed=20), (3, 2, 6), None),
    (lambda: make_conv_model(dims=2, size=6, seed=20, padding=1, groups=2), (3, 4, 6, 6), None),
    (lambda: make_hf_conv1d_model(seed=20), (3, 2, 6), None),
], ids=["linear", "conv2d", "hf-conv1d"])
def test_weight_gradient_is_the_sum_of_logged_full_gradients(new_run, factory, x_shape,
                                                             type_filter):
    """TrackedModule.weight_gradient() (the layer's .grad in LogIX's [out, in] convention,
    bias column included) equals the sum over the batch of the logged full gradients."""
    g = seeded(20)
    model = factory()
    x = torch.randn(*x_shape, generator=g)
    y = torch.randn(3, *model(x).shape[1:], generator=g)
    run = watched_run(new_run, model, include_bias=True)
    with run(data_id=[0, 1, 2]):
        batch_sq_loss(model(x), y).backward()
    log = run.get_log()
    for name, tracked in run.modules.items():
        summed = log.module(name).sum(0)
        assert summed.abs().max() > 0
        assert_close_scaled(tracked.weight_gradient(), summed)


def test_embedding_weight_gradient_convention(new_run):
    g = seeded(21)
    model = make_embedding_model(padding_idx=0, seed=21)
    ids, y = torch.randint(0, 11, (3, 5), generator=g), torch.randn(3, 3, generator=g)
    run = watched_run(new_run, model, type_filter=[nn.Embedding])
    with run(data_id=[0, 1, 2]):
        batch_sq_loss(model(ids), y).backward()
    tracked = run.modules["embed"]
    assert torch.equal(tracked.weight_gradient(), model.embed.weight.grad.T)
    assert_close_scaled(tracked.weight_gradient(), run.get_log().module("embed").sum(0))


@pytest.mark.parametrize("make_input", [lambda g: torch.randn(4, 5, 6, generator=g),
                                        lambda g: torch.randn(4, 6, generator=g)],
                         ids=["tokens", "rows"])
def test_a_float32_model_under_autocast_logs_float32_rows(new_run, make_input):
    """Under torch.autocast the hooks project in float32 (a layer fed a bfloat16 activation
    crashed when its bfloat16 input projection met a float32 output gradient): rows are those
    of the same model without autocast, to bfloat16's precision."""
    g = seeded(71)
    model = make_mlp(seed=71)
    x = make_input(g)
    run = new_run()
    run.watch(model).add_lora(rank=3)
    run.setup({"grad": ["log"], "forward": ["covariance"], "backward": ["covariance"]})
    logs = []
    for autocast in (False, True):
        with run(data_id=[0, 1, 2, 3]):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = model(x)
            out.float().pow(2).sum().backward()
        logs.append(run.get_log(copy=True).grads)
    plain, autocast = logs
    assert autocast.dtype == torch.float32 and float(plain.abs().max()) > 0
    assert_close_scaled(autocast, plain, rtol=5e-2, atol=2e-2)  # bfloat16 activations


def test_micro_batches_inside_one_step_are_warned_of_once(new_run):
    """Two whole-model passes in one step add up by position: right for two views of the same
    examples, wrong for micro-batches of other examples; said once per run."""
    g = seeded(72)
    model = make_mlp(seed=72)
    x = torch.randn(8, 6, generator=g)
    run = new_run().watch(model)
    with pytest.warns(UserWarning, match="ran 2 forward and backward passes in one step") as said:
        with run(data_id=[0, 1, 2, 3]):
            for part in (x[:4], x[4:]):
                model(part).pow(2).sum().backward()
    assert sum("passes in one step" in str(w.message) for w in said) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with run(data_id=[0, 1, 2, 3]):  # said once per run
            for part in (x[:4], x[4:]):
                model(part).pow(2).sum().backward()
        shared_model = make_shared(dim=6, seed=72)
        shared = new_run("shared").watch(shared_model)
        with shared(data_id=[0, 1, 2, 3]):  # one layer called twice in one pass: no warning
            shared_model(x[:4]).pow(2).sum().backward()

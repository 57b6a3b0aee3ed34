"""Logging without weight gradients: a step through a frozen model (every requires_grad off)
logs the rows of the weight-gradient path bit for bit, for every layer type; `logix.frozen`
restores each flag; a saved PEFT adapter reloaded the usual way (frozen) can be queried; the
integrations' post-hoc passes compute no weight gradient."""

from __future__ import annotations

import pytest
import torch

import logix
from conftest import (make_conv_model, make_embedding_model, make_hf_conv1d_model, make_mlp,
                      make_tiny_gpt2, seeded)
from logix.errors import UsageError

CASES = {
    "linear": (make_mlp, lambda g: torch.randn(4, 6, generator=g)),
    "conv2d": (make_conv_model, lambda g: torch.randn(4, 4, 7, 7, generator=g)),
    "embedding": (make_embedding_model, lambda g: torch.randint(0, 11, (4, 5), generator=g)),
    "hf_conv1d": (make_hf_conv1d_model, lambda g: torch.randn(4, 6, generator=g)),
}


def _loss(out, targets):
    """A summed loss of any output shape: squared error against fixed targets."""
    return ((out.reshape(len(out), -1) - targets) ** 2).sum()


def _rows(new_run, model, inputs, targets, freeze: bool, project: str):
    run = new_run(project=project)
    run.watch(model).add_lora(rank=2)
    run.setup({"grad": ["log"]})
    run.eval()
    context = logix.frozen(model) if freeze else torch.enable_grad()
    with context, run(data_id=list(range(len(inputs)))):
        _loss(model(inputs), targets).backward()
    return run.get_log(copy=True)


@pytest.mark.parametrize("case", sorted(CASES))
def test_frozen_rows_equal_the_weight_gradient_rows(new_run, case):
    make, inputs = CASES[case]
    g = torch.Generator().manual_seed(0)
    x = inputs(g)
    model = make()
    y = torch.randn(model(x).reshape(len(x), -1).shape, generator=g)
    want = _rows(new_run, model, x, y, False, "trained")
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.zero_grad(set_to_none=True)
    got = _rows(new_run, model, x, y, True, "frozen")
    assert want.grads.abs().sum() > 0
    assert torch.equal(got.grads, want.grads)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_frozen_gpt2_per_token_rows_equal_the_weight_gradient_rows(new_run):
    model = make_tiny_gpt2()
    ids = torch.randint(1, 50, (3, 8), generator=torch.Generator().manual_seed(1))
    logs = []
    for freeze in (False, True):
        run = new_run(project=f"gpt2-{freeze}")
        run.watch(model).add_lora(rank=4)
        run.setup({"grad": ["log"]})
        run.eval()
        context = logix.frozen(model) if freeze else torch.enable_grad()
        with context, run(data_id=[0, 1, 2], per_token=True):
            (model(ids, labels=ids).loss * 3).backward()
        logs.append(run.get_log(copy=True))
        model.zero_grad(set_to_none=True)
    assert len(logs[0].data_ids) == 3 and logs[0].tokens is not None
    assert torch.equal(logs[0].grads, logs[1].grads)
    assert torch.equal(logs[0].tokens.grads, logs[1].tokens.grads)


def test_frozen_restores_every_flag_even_on_an_error():
    model = make_mlp()
    model[0].bias.requires_grad_(False)
    before = [p.requires_grad for p in model.parameters()]
    with pytest.raises(RuntimeError, match="boom"):
        with logix.frozen(model):
            assert not any(p.requires_grad for p in model.parameters())
            raise RuntimeError("boom")
    assert [p.requires_grad for p in model.parameters()] == before
    with pytest.raises(TypeError, match="torch.nn.Module"):
        with logix.frozen("model"):
            pass


def test_a_wholly_frozen_model_is_watched_whole(new_run):
    model = make_mlp()
    for p in model.parameters():
        p.requires_grad_(False)
    run = new_run()
    run.watch(model)  # no warning: nothing trains, so nothing is skipped
    assert sorted(run.modules) == ["0", "2"]


def test_frozen_pass_keeps_training_unchanged(new_run):
    """Training steps after a frozen logging pass compute the same gradients as without it."""
    model = make_mlp()
    x, y = torch.randn(4, 6), torch.randn(4, 3)
    _loss(model(x), y).backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    _rows(new_run, model, x, y, True, "frozen")
    _loss(model(x), y).backward()
    assert all(torch.equal(p.grad, w) for p, w in zip(model.parameters(), want))


peft = pytest.importorskip("peft")


def test_a_reloaded_peft_adapter_is_queried_without_is_trainable(new_run, tmp_path):
    from test_adapters import make_lora_llama

    model = make_lora_llama()
    model.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(1, 40, (2, 6), generator=torch.Generator().manual_seed(2))
    rows = []
    for trainable in (True, False):
        reloaded = peft.PeftModel.from_pretrained(_plain_llama(), tmp_path / "adapter",
                                                  is_trainable=trainable)
        assert any(p.requires_grad for p in reloaded.parameters()) == trainable
        run = new_run(project=f"peft-{trainable}")
        run.watch(reloaded)
        assert len(run.modules) == 8 and all("lora_" in n for n in run.modules)
        run.setup({"grad": ["log"]})
        run.eval()
        with run(data_id=["a", "b"]):
            (reloaded(input_ids=ids, labels=ids).loss * 2).backward()
        rows.append(run.get_log(copy=True).grads)
    assert rows[0].abs().sum() > 0 and torch.equal(rows[0], rows[1])


def _plain_llama():
    """make_lora_llama's base model (same seed, same weights) without adapters."""
    from transformers import LlamaConfig, LlamaForCausalLM

    seeded(0)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                         attn_implementation="eager")
    return LlamaForCausalLM(config)


def test_post_hoc_passes_compute_no_weight_gradient(new_run):
    from logix.integrations._common import log_batches

    model = make_mlp()
    x, y = torch.randn(6, 6), torch.randn(6, 3)
    want = _rows(new_run, model, x, y, False, "reference")
    model.zero_grad(set_to_none=True)
    run = new_run(project="post-hoc")
    run.watch(model).add_lora(rank=2)
    run.setup({"grad": ["log"]})
    run.eval()
    seen = []

    def loss_of(batch, _):
        seen.append([p.requires_grad for p in model.parameters()])
        xb, yb, _ = batch
        return _loss(model(xb), yb)

    def describe(batch):
        return [int(i) for i in batch[2]], None, 1.0

    batches = [(x[:3], y[:3], torch.arange(3)), (x[3:], y[3:], torch.arange(3, 6))]
    log = log_batches(run, model, batches, describe, loss_of)
    assert seen == [[False] * 4, [False] * 4]
    assert torch.equal(log.grads, want.grads)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    with pytest.raises(UsageError, match="does not depend on any watched layer"):
        log_batches(run, model, batches[:1], describe, lambda batch, _: torch.ones(()) * 2)

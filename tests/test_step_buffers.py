"""The hooks write each step's rows into a buffer that a later step reuses (no fresh memory per
step). Reuse must never change a log the user holds, and every reused step must still equal the
brute-force per-example gradients."""

from __future__ import annotations

import torch

from conftest import assert_close_scaled, make_mlp, per_example_grads, seeded
from test_gradients import batch_sq_loss, example_sq_loss, expected_rows


def _run(new_run, model, **overrides):
    run = new_run(**overrides)
    run.watch(model)
    run.add_lora(rank=3)
    run.setup({"grad": ["log"]})
    return run


def _batches(n, seed=1):
    g = seeded(seed)
    return [(torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)) for _ in range(n)]


def _step(run, model, x, y, ids):
    run.start(data_id=ids)
    model.zero_grad()
    batch_sq_loss(model(x), y).backward()
    run.end()


def test_every_step_matches_brute_force_while_buffers_are_reused(new_run):
    model = make_mlp()
    run = _run(new_run, model)
    buffers = set()
    for k, (x, y) in enumerate(_batches(5)):
        _step(run, model, x, y, [f"{k}-{i}" for i in range(4)])
        expected = expected_rows(run, model, per_example_grads(model, example_sq_loss, x, y))
        log = run.get_log(copy=True)  # a copy: the buffer stays free for reuse
        buffers.add(run._last_log.grads.data_ptr())
        assert expected.abs().max() > 0
        assert_close_scaled(log.grads, expected)
    assert len(buffers) == 2, "steps should alternate between two row buffers"


def test_a_log_handed_out_is_never_overwritten(new_run):
    model = make_mlp()
    run = _run(new_run, model)
    batches = _batches(4)
    _step(run, model, *batches[0], ids=list(range(4)))
    held = run.get_log()
    snapshot = held.grads.clone()
    for k, (x, y) in enumerate(batches[1:], 1):
        _step(run, model, x, y, ids=list(range(4 * k, 4 * k + 4)))
    assert not torch.equal(run.get_log().grads, snapshot)
    assert torch.equal(held.grads, snapshot)


def test_get_log_during_a_step_returns_the_previous_step_intact(new_run):
    model = make_mlp()
    run = _run(new_run, model)
    batches = _batches(3)
    for k, (x, y) in enumerate(batches[:2]):
        _step(run, model, x, y, ids=list(range(4 * k, 4 * k + 4)))
    before = run.get_log(copy=True).grads
    x, y = batches[2]
    run.start(data_id=list(range(8, 12)))
    model.zero_grad()
    batch_sq_loss(model(x), y).backward()
    during = run.get_log()  # the hooks have written this step's rows by now
    assert torch.equal(during.grads, before)
    run.end()
    assert torch.equal(during.grads, before)
    assert not torch.equal(run.get_log().grads, before)

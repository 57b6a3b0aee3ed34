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
        buffers.add(run._steps.last.grads.data_ptr())
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


# With float32 logs on disk the hooks write a step's rows straight into the shard being filled
# (no copy at append); the rows must still be each step's own, on disk and in get_log(), when
# shards fill up, are flushed and their buffers recycled.
def _saving_run(new_run, model, shard_rows):
    run = _run(new_run, model, shard_rows=shard_rows)
    run.save(True)
    return run


def _disk_rows(run):
    ids, rows = run.reader().read_all()
    return list(ids), rows


def test_saved_rows_written_in_place_match_every_step(new_run):
    model = make_mlp()
    run = _saving_run(new_run, model, shard_rows=10)  # 4-row steps straddle shard ends
    expected = []
    for k, (x, y) in enumerate(_batches(7)):
        _step(run, model, x, y, [f"{k}-{i}" for i in range(4)])
        expected.append(expected_rows(run, model, per_example_grads(model, example_sq_loss, x, y)))
        assert_close_scaled(run.get_log().grads, expected[-1])
    ids, rows = _disk_rows(run)
    assert ids == [f"{k}-{i}" for k in range(7) for i in range(4)]
    assert_close_scaled(rows, torch.cat(expected))


def test_a_flush_between_steps_never_lets_a_step_overwrite_the_last_log(new_run):
    """Step 1's rows sit in a shard buffer; a flush writes and recycles it, and step 2 would
    reserve the same rows: get_log() during step 2 must still return step 1."""
    model = make_mlp()
    run = _saving_run(new_run, model, shard_rows=16)
    (x1, y1), (x2, y2), (x3, y3) = _batches(3, seed=2)
    _step(run, model, x1, y1, ids=list(range(4)))
    first = expected_rows(run, model, per_example_grads(model, example_sq_loss, x1, y1))
    run.flush()
    run.start(data_id=list(range(4, 8)))
    model.zero_grad()
    batch_sq_loss(model(x2), y2).backward()
    assert_close_scaled(run.get_log().grads, first)
    run.end()
    run.start(data_id=list(range(8, 12)))
    model.zero_grad()
    batch_sq_loss(model(x3), y3).backward()
    run.flush()  # in the middle of a step: the reserved rows' buffer is written and recycled
    run.end()
    third = expected_rows(run, model, per_example_grads(model, example_sq_loss, x3, y3))
    assert_close_scaled(run.get_log().grads, third)
    ids, rows = _disk_rows(run)
    assert ids == list(range(12))
    second = expected_rows(run, model, per_example_grads(model, example_sq_loss, x2, y2))
    assert_close_scaled(rows, torch.cat([first, second, third]))


def test_a_log_handed_out_from_a_shard_is_never_overwritten(new_run):
    model = make_mlp()
    run = _saving_run(new_run, model, shard_rows=8)
    batches = _batches(6, seed=3)
    _step(run, model, *batches[0], ids=list(range(4)))
    held = run.get_log()
    snapshot = held.grads.clone()
    for k, (x, y) in enumerate(batches[1:], 1):
        run.flush()  # the buffer holding the rows is written and recycled for the next step
        _step(run, model, x, y, ids=list(range(4 * k, 4 * k + 4)))
    assert torch.equal(held.grads, snapshot)


def test_a_second_backward_through_an_earlier_step_leaves_the_current_rows_alone(new_run):
    """The hot path's projected factors live in buffers the next step reuses: a backward
    through the previous step's graph (retain_graph) must not write into them."""
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh(), torch.nn.Linear(6, 6))
    run = _run(new_run, model)
    (x1, y1), (x2, y2) = [(torch.randn(4, 6, generator=seeded(s)),
                           torch.randn(4, 6, generator=seeded(s + 1))) for s in (5, 7)]
    run.start(data_id=list(range(4)))
    loss1 = batch_sq_loss(model(x1), y1)
    loss1.backward(retain_graph=True)
    run.end()
    run.start(data_id=list(range(4, 8)))
    model.zero_grad()
    batch_sq_loss(model(x2), y2).backward()
    loss1.backward()  # step 1's graph again, before step 2 ends
    run.end()
    expected = expected_rows(run, model, per_example_grads(model, example_sq_loss, x2, y2))
    assert_close_scaled(run.get_log().grads, expected)


def test_a_flush_in_the_middle_of_a_step_keeps_its_rows_in_get_log(new_run):
    """The step's rows were reserved behind 2 rows of the shard; the flush writes those 2 rows
    out and recycles the buffer, and end() must not hand get_log() rows the append overwrites."""
    model = make_mlp()
    run = _saving_run(new_run, model, shard_rows=64)
    g = seeded(6)
    x1, y1 = torch.randn(2, 6, generator=g), torch.randn(2, 3, generator=g)
    x2, y2 = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
    _step(run, model, x1, y1, ids=[0, 1])
    run.start(data_id=list(range(2, 10)))
    model.zero_grad()
    batch_sq_loss(model(x2), y2).backward()
    run.flush()
    run.end()
    second = expected_rows(run, model, per_example_grads(model, example_sq_loss, x2, y2))
    assert_close_scaled(run.get_log().grads, second)
    ids, rows = _disk_rows(run)
    assert ids == list(range(10))
    assert_close_scaled(rows[2:], second)

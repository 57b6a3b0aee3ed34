"""run.resource_plan / `logix plan`: row and disk sizes against a real log, statistics memory
against the collected covariances, the recommended rank against a search over every rank, the
timed steps without side effects, and the CLI."""

from __future__ import annotations

import contextlib
import json
import os

import pytest
import torch

from conftest import make_tiny_gpt2
from logix.cli import main
from logix.errors import UsageError
from logix import planning
from logix.planning import parse_bytes, recommend_rank
from logix.storage.reader import LogReader


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_plan_sizes_match_a_real_log(new_run, dtype):
    model = make_tiny_gpt2()
    run = new_run(log_dtype=dtype)
    run.watch(model).add_lora(rank=4)
    run.setup({"grad": ["log"], "forward": ["covariance"], "backward": ["covariance"]})
    plan = run.resource_plan(examples=12, tokens_per_example=10, show=False)
    run.save(True)
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        ids = torch.randint(1, 50, (4, 10), generator=g)
        with run(data_id=list(range(4 * step, 4 * step + 4))):
            (model(ids, labels=ids).loss * 4).backward()
    sums = {key: t.numel() * 4 for key, t in run.statistics.sums.items()}
    run.finalize()
    reader = LogReader(run.project_dir)
    itemsize = 4 if dtype == "float32" else 2
    assert reader.rows == 12 and plan.width == reader.dim
    assert plan.row_bytes == reader.dim * itemsize
    assert plan.disk_bytes == 12 * reader.dim * itemsize
    for m in plan.modules:
        assert m.statistics_bytes == sum(v for (name, _), v in sums.items() if name == m.name)
    assert plan.statistics_bytes == sum(sums.values()) > 0


def test_recommended_rank_is_the_largest_that_fits():
    dims = [(32, 96), (32, 32), (128, 32), (50, 32)]
    for budget in (10_000, 200_000, 1_000_000, 10**8):
        def disk(r):
            return 100 * 2 * sum(min(r, i) * min(r, o) for i, o in dims)

        fitting = [r for r in range(1, 129) if disk(r) <= budget]
        assert recommend_rank(dims, 100, 2, budget) == (max(fitting) if fitting else None)
    assert recommend_rank(dims, 100, 2, 10) is None


def test_timed_steps_leave_no_trace(new_run, capsys):
    model = make_tiny_gpt2()
    run = new_run()
    run.watch(model).add_lora(rank=4)
    run.setup({"grad": ["log"], "forward": ["covariance"], "backward": ["covariance"]})
    plan = run.resource_plan(examples=1000, tokens_per_example=12, disk_budget="1MB",
                             model=model, batch_size=2, timed_steps=2, timing_budget=0)
    assert plan.step_seconds > 0 and plan.logged_step_seconds > 0
    assert len(plan.timing.plain_times) == len(plan.timing.logged_times) == 2
    low, mid, high = plan.logging_seconds
    assert low <= mid <= high and mid == pytest.approx(500 * plan.logged_step_seconds)
    assert plan.disk_budget == 10**6 and plan.recommended_rank is not None
    assert not run.statistics.sums and not os.path.exists(run.project_dir)
    assert all(p.grad is None for p in model.parameters())
    printed = capsys.readouterr().out
    assert "total (" in printed and "overhead" in printed and "largest rank" in printed
    assert "a logged pass over 1,000 examples (500 steps of 2)" in printed


class _Clock:
    """A fake perf_counter: each step advances it by the time the test scripts for it."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_timing_interleaves_and_stops_once_stable(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(planning.time, "perf_counter", clock)
    order = []

    class Hooks:
        def __enter__(self):
            order.append("logged")

        def __exit__(self, *exc):
            clock.now += 0.5  # the hooks cost half a second

    def step():
        if not order or order[-1] != "logged":
            order.append("plain")
        clock.now += 1.0
        order.append("done")

    timing = planning.time_steps(step, Hooks, min_pairs=3, budget=1e9)
    kinds = [k for k in order if k != "done"]
    pairs = [tuple(kinds[i:i + 2]) for i in range(2, len(kinds), 2)]  # past the warm-up pair
    assert pairs[0] == ("plain", "logged") and pairs[1] == ("logged", "plain")
    assert set(pairs[::2]) == {("plain", "logged")} and set(pairs[1::2]) == {("logged", "plain")}
    # identical timings are stable as soon as the confidence interval of a median exists
    assert timing.stable and len(pairs) == 6
    assert timing.plain == 1.0 and timing.logged == 1.5 and timing.overhead == pytest.approx(0.5)


def test_noisy_timing_runs_to_its_budget_and_says_so(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(planning.time, "perf_counter", clock)
    noise = iter([1.0, 3.0] * 1000)

    def step():
        clock.now += next(noise)

    timing = planning.time_steps(step, contextlib.nullcontext, min_pairs=2, budget=40)
    assert not timing.stable and 2 <= len(timing.plain_times) <= 12
    assert "did not settle" in "\n".join(timing.render())


def test_plan_refusals(new_run):
    run = new_run()
    with pytest.raises(UsageError, match="run.watch"):
        run.resource_plan(examples=10, show=False)
    run.watch(make_tiny_gpt2())
    with pytest.raises(UsageError, match="examples must be a positive integer, got 0"):
        run.resource_plan(examples=0, show=False)
    with pytest.raises(UsageError, match="'50 parsecs'"):
        parse_bytes("50 parsecs")
    assert parse_bytes("1.5 GiB") == int(1.5 * 2**30) and parse_bytes(4096) == 4096


def test_logix_plan_cli(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2,
                                  "vocab_size": 30, "n_positions": 16, "bos_token_id": 0,
                                  "eos_token_id": 0, "tie_word_embeddings": False}))
    code = main(["plan", str(config), "--examples", "1000", "--tokens", "8", "--rank", "4",
                 "--disk-budget", "100KB", "--steps", "1", "--batch-size", "2",
                 "--timing-budget", "0"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "transformer.h.0.mlp.c_fc" in out and "1,000 examples x 8 tokens" in out
    assert "largest rank that fits" in out and "overhead" in out
    assert main(["plan", str(tmp_path / "missing.json"), "--examples", "3"]) == 2

"""choose_damping: each damping's LDS is the one computed by hand from the run's scores and the
retrained subsets; the bootstrap spread, the grid and the misuse errors."""

import math

import pytest
import torch
from torch.nn import functional as F

from logix.errors import UsageError
from logix.evaluation import (align_scores, choose_damping, lds, linear_datamodeling_score)
from logix.evaluation.damping_choice import default_grid

from conftest import log_classifier, make_mlp, seeded

N, STEPS = 24, 60


def data():
    g = seeded(3)
    x = torch.randn(N, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y


def train_fn(indices, seed):
    x, y = data()
    torch.manual_seed(seed)
    model = make_mlp(seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for _ in range(STEPS):
        opt.zero_grad()
        F.cross_entropy(model(x[indices]), y[indices]).backward()
        opt.step()
    return model


def eval_fn(model):
    x, y = data()
    with torch.no_grad():
        return F.cross_entropy(model(x[:3]), y[:3], reduction="none")


@pytest.fixture
def logged(new_run):
    x, y = data()
    model = train_fn(torch.arange(N), 0)
    run = new_run("choice")
    run.watch(model)
    run.setup({"grad": ["log", "covariance"]})
    return log_classifier(run, model, x, y, batch=6, query_scale=1.0)


def test_each_dampings_lds_is_the_hand_computed_one(logged, tmp_path):
    run, query = logged
    dampings = [1e-3, 1e-1, 10.0]
    choice = choose_damping(run, query, train_fn, eval_fn, range(N), dampings=dampings,
                            n_subsets=8, seeds=(1,), cache_dir=tmp_path / "cache",
                            progress=False)
    auto = align_scores(run.compute_influence_all(query, progress=False), range(N))
    retrained = linear_datamodeling_score(train_fn, eval_fn, auto, n_subsets=8, seeds=(1,),
                                          cache_dir=tmp_path / "cache", progress=False)
    masks, outputs = retrained["subset_masks"], retrained["subset_outputs"]
    for damping in dampings:
        scores = align_scores(run.compute_influence_all(query, damping=damping,
                                                        progress=False), range(N))
        expected = lds(scores, masks, outputs)["lds"]
        assert choice.lds[damping] == pytest.approx(expected, abs=1e-12)
        assert choice.spread[damping] > 0 and math.isfinite(choice.spread[damping])
    assert choice.lds["auto"] == pytest.approx(lds(auto, masks, outputs)["lds"], abs=1e-12)
    assert choice.best == max(choice.lds, key=choice.lds.get)
    gap = choice.bootstrap[choice.best] - choice.bootstrap["auto"]  # paired, per resample
    within = choice.lds["auto"] >= choice.lds[choice.best] - 2 * float(gap.std())
    assert choice.auto_is_within_noise == (choice.best == "auto" or within)
    assert choice.n_subsets == 8 and tuple(choice.seeds) == (1,)
    text = str(choice)
    assert "<- best" in text
    used = sorted(v for v in choice.auto_damping.values())  # the row says what auto used
    assert f"  auto      {choice.lds['auto']:+.3f} +- {choice.spread['auto']:.3f}" in text
    assert f"(damping {used[0]:.3g} to {used[-1]:.3g} across modules)" in text


def test_the_default_grid_spans_auto():
    grid = default_grid({"a": 0.01, "b": {"c": 1.0}})  # nested, as SOURCE reports per segment
    assert len(grid) == 11
    assert grid[6] == pytest.approx(0.1)  # the geometric mean of 0.01 and 1
    assert grid[0] == pytest.approx(1e-4) and grid[-1] == pytest.approx(10.0)


def test_misuse_is_refused_before_any_retraining(logged):
    run, query = logged

    def never(indices, seed):
        raise AssertionError("retrained")

    with pytest.raises(UsageError, match="n_subsets"):
        choose_damping(run, query, never, eval_fn, range(N), n_subsets=3)
    with pytest.raises(UsageError, match="positive finite"):
        choose_damping(run, query, never, eval_fn, range(N), dampings=[0.1, -1.0])
    with pytest.raises(UsageError, match="no damping"):
        choose_damping(run, query, never, eval_fn, range(N), hessian="none")
    with pytest.raises(UsageError, match="logix Run"):
        choose_damping(object(), query, never, eval_fn, range(N))


def test_a_damping_the_curvature_refuses_is_reported_not_raised(logged, tmp_path):
    run, query = logged  # 24 rows of 45 numbers: the raw covariance is singular
    choice = choose_damping(run, query, train_fn, eval_fn, range(N), dampings=[1e-30, 0.1],
                            n_subsets=6, cache_dir=tmp_path / "cache", progress=False)
    assert "singular" in choice.refused[1e-30]
    assert math.isnan(choice.lds[1e-30]) and not math.isnan(choice.lds[0.1])
    assert choice.best in ("auto", 0.1)
    assert "refused: " in str(choice)


def test_the_benchmark_table_summarises_gaps_per_k():
    from benchmarks import damping_choice as bench

    def row(k, chosen, auto):
        return {"case": "c", "kind": "auto", "rows": "full", "k": k, "chosen": 0.1,
                "best": 0.1, "best_lds": 0.5, "chosen_lds": chosen, "auto_lds": auto}

    table = bench.render([row(10, 0.45, 0.49), row(10, 0.5, 0.40)])
    assert "| 10 | chosen | 0.025 | 0.050 | 1 of 2 |" in table
    assert "| 10 | auto | 0.055 | 0.100 | 1 of 2 |" in table


def synthetic(n, n_query, noise_auto, noise_outputs):
    """A scorer whose damping=1 scores are the exact influence and whose "auto" scores add
    noise, and retrained outputs that follow the exact influence plus noise of their own."""
    g = torch.Generator().manual_seed(0)
    exact, noise = torch.randn(n_query, n, generator=g), torch.randn(n_query, n, generator=g)

    class Scorer:
        def compute_influence_all(self, query, hessian=None, damping=None, progress=False):
            scores = exact + (noise_auto * noise if damping == "auto" else 0.0)
            return {"influence": scores, "tgt_ids": list(range(n)),
                    "src_ids": [f"q{i}" for i in range(n_query)],
                    "meta": {"damping": {"layer": 0.1}}}

    def train_mask(indices, seed):
        mask = torch.zeros(n)
        mask[indices] = 1.0
        return mask

    def outputs(mask):
        own = torch.Generator().manual_seed(int(mask @ torch.arange(n, dtype=torch.float32)))
        return -(exact @ mask) + noise_outputs * torch.randn(n_query, generator=own)

    return Scorer(), train_mask, outputs


def test_auto_is_judged_on_its_paired_gap_to_the_best():
    # Each candidate's LDS moves a lot across resamples, but both move together, so their
    # difference is measured far more tightly.
    n = 40
    scorer, train_mask, outputs = synthetic(n, 12, noise_auto=0.3, noise_outputs=3.0)
    choice = choose_damping(scorer, None, train_mask, outputs, range(n), dampings=[1.0],
                            n_subsets=12, progress=False)
    gap = choice.lds[1.0] - choice.lds["auto"]
    assert choice.best == 1.0
    assert gap <= 2 * max(choice.spread[1.0], choice.spread["auto"])  # unpaired: "noise"
    paired = choice.bootstrap[1.0] - choice.bootstrap["auto"]
    assert choice.gap_spread == pytest.approx(float(paired.std()))
    assert choice.spread["auto"] == pytest.approx(float(choice.bootstrap["auto"].std()))
    assert gap > 2 * choice.gap_spread and not choice.auto_is_within_noise
    assert str(choice).endswith(f"pass damping=1: auto is {gap:.3f} below the best, +- "
                                f"{choice.gap_spread:.3f} paired bootstrap std")


def test_arguments_that_would_measure_the_wrong_thing_are_refused_before_retraining(logged):
    run, query = logged

    def never(indices, seed):
        raise AssertionError("retrained")

    refused = {  # the message says what was wrong and what to pass
        "not among them": dict(train_ids=range(N - 4)),  # 4 logged examples never retrained
        "were not logged": dict(train_ids=range(N + 2)),
        "train_ids=range": dict(train_ids=N),
        "e.g. n_subsets=20": dict(n_subsets="20"),
        "e.g. seeds=": dict(seeds=1),
        "list of positive numbers": dict(dampings=1e-3),
        "got '0.1'": dict(dampings="0.1"),  # not read as the dampings '0', '.' and '1'
        "leaves only 'auto'": dict(dampings=[]),
    }
    for message, arguments in refused.items():
        arguments = {"train_ids": range(N), **arguments}
        with pytest.raises(UsageError, match=message):
            choose_damping(run, query, never, eval_fn, progress=False, **arguments)
    with pytest.raises(UsageError, match=r"4 logged examples .* \[20, 21, 22, 23\]"):
        choose_damping(run, query, never, eval_fn, range(N - 4))


def test_a_cache_of_other_queries_is_refused(new_run, tmp_path):
    x, y = data()
    run = new_run("choice-cache")
    model = train_fn(torch.arange(N), 0)
    run.watch(model)
    run.setup({"grad": ["log", "covariance"]})
    run, first = log_classifier(run, model, x, y, batch=6, query_scale=1.0)
    with run(data_id=["other0", "other1", "other2"]):  # as many queries, other examples
        F.cross_entropy(model(x[3:6]), y[3:6], reduction="sum").backward()
    other = run.get_log(copy=True)
    cache = tmp_path / "cache"
    choose_damping(run, first, train_fn, eval_fn, range(N), dampings=[0.1], n_subsets=5,
                   cache_dir=cache, progress=False)

    def never(indices, seed):
        raise AssertionError("retrained")

    with pytest.raises(UsageError, match=r"other queries .*'q0'.*'other0'.*another cache_dir"):
        choose_damping(run, other, never, eval_fn, range(N), dampings=[0.1], n_subsets=5,
                       cache_dir=cache, progress=False)
    again = choose_damping(run, first, never, eval_fn, range(N), dampings=[0.1], n_subsets=5,
                           cache_dir=cache, progress=False)  # the same queries: all cached
    assert math.isfinite(again.lds[0.1])


def test_no_damping_is_recommended_when_no_lds_is_clearly_positive():
    n = 40
    scorer, train_mask, outputs = synthetic(n, 12, noise_auto=0.3, noise_outputs=3.0)
    shuffled = torch.randperm(n, generator=torch.Generator().manual_seed(1)).tolist()
    with pytest.warns(UserWarning, match="order train_fn indexes"):  # scores misaligned
        choice = choose_damping(scorer, None, train_mask, outputs, shuffled, dampings=[1.0],
                                n_subsets=12, progress=False)
    best = choice.lds[choice.best]
    assert best <= 2 * choice.spread[choice.best] and not choice.best_is_above_noise
    assert str(choice).splitlines()[-1].startswith(
        f"no candidate's LDS is clearly above 0 (the best: {best:+.3f} +- "
        f"{choice.spread[choice.best]:.3f})")
    aligned = choose_damping(scorer, None, train_mask, outputs, range(n), dampings=[1.0],
                             n_subsets=12, progress=False)
    assert aligned.best_is_above_noise


def test_the_example_runs_and_names_a_damping(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "examples" / "choose_damping.py"
    out = subprocess.run([sys.executable, str(example), "--root", str(tmp_path), "--subsets",
                          "6"], capture_output=True, text=True, check=True).stdout
    assert "LDS over 6 retrained subsets" in out and "<- best" in out
    assert "its most helpful training wines are" in out

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
    noise = max(choice.spread[choice.best], choice.spread["auto"])
    within = choice.lds["auto"] >= choice.lds[choice.best] - noise
    assert choice.recommended == ("auto" if within else choice.best)
    assert choice.n_subsets == 8 and tuple(choice.seeds) == (1,)
    text = str(choice)
    assert "<- best" in text and "auto" in text


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

    def row(k, recommended, chosen, auto):
        return {"case": "c", "kind": "auto", "rows": "full", "k": k, "recommended": "auto",
                "best": 0.1, "best_lds": 0.5, "recommended_lds": recommended,
                "chosen_lds": chosen, "auto_lds": auto}

    table = bench.render([row(10, 0.49, 0.45, 0.49), row(10, 0.47, 0.5, 0.40)])
    assert "| 10 | recommended | 0.020 | 0.030 | 1 of 2 |" in table
    assert "| 10 | chosen | 0.025 | 0.050 | 1 of 2 |" in table
    assert "| 10 | auto | 0.055 | 0.100 | 1 of 2 |" in table

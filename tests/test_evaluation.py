"""Tests for logix.evaluation: LDS, the retraining driver with its cache, brittleness."""

from __future__ import annotations

import math
import sys
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import spearmanr

from logix.evaluation import (
    BrittlenessResult,
    brittleness,
    lds,
    linear_datamodeling_score,
    make_subsets,
    spearman,
)


# --------------------------------------------------------------------------- #
# make_subsets
# --------------------------------------------------------------------------- #
def test_make_subsets_exact_size_reproducible_and_prefix_stable():
    masks = make_subsets(11, 20, fraction=0.3, seed=3)
    assert masks.dtype == torch.bool and masks.shape == (20, 11)
    assert (masks.sum(dim=1) == round(0.3 * 11)).all()
    assert torch.equal(masks, make_subsets(11, 20, fraction=0.3, seed=3))
    assert not torch.equal(masks, make_subsets(11, 20, fraction=0.3, seed=4))
    # More subsets extend the list (what lets a cache grow).
    assert torch.equal(make_subsets(11, 25, fraction=0.3, seed=3)[:20], masks)
    # Rows are not all the same subset.
    assert len({tuple(row.tolist()) for row in masks}) > 10
    assert torch.equal(make_subsets(np.int64(11), 20, fraction=0.3, seed=np.int64(3)), masks)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 0.01])
def test_make_subsets_rejects_degenerate_fraction(fraction):
    with pytest.raises(ValueError, match="fraction"):
        make_subsets(10, 5, fraction=fraction)


# --------------------------------------------------------------------------- #
# lds on given outputs
# --------------------------------------------------------------------------- #
def test_lds_hand_computed_example():
    # One informative query (row 0) and one with constant outputs (row 1).
    scores = torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]])
    masks = torch.tensor(
        [
            [True, True, False],  # sum row 0: 1+2 = 3
            [False, True, True],  # 2+3 = 5
            [True, False, True],  # 1+3 = 4
            [True, False, False],  # 1
        ]
    )
    outputs = torch.tensor([[0.1, 7.0], [0.3, 7.0], [0.3, 7.0], [0.0, 7.0]])
    # outputs_are="score" (no negation), query 0:
    #   predicted 3, 5, 4, 1        -> ranks a = 2, 4, 3, 1
    #   measured 0.1, 0.3, 0.3, 0.0 -> ranks b = 2, 3.5, 3.5, 1  (tie at ranks 3,4 -> 3.5)
    #   mean(a) = mean(b) = 2.5; a - 2.5 = -.5, 1.5, .5, -1.5; b - 2.5 = -.5, 1, 1, -1.5
    #   cov = .25 + 1.5 + .5 + 2.25 = 4.5; ss_a = 5; ss_b = 4.5
    #   rho = 4.5 / sqrt(5 * 4.5) = sqrt(0.9)
    expected = math.sqrt(0.9)
    with pytest.warns(RuntimeWarning, match="undefined for 1 of 2"):
        res = lds(scores, masks, outputs, outputs_are="score")
    assert res["per_query"][0].item() == pytest.approx(expected, abs=1e-12)
    assert math.isnan(res["per_query"][1].item())
    assert res["lds"] == pytest.approx(expected, abs=1e-12)  # NaN query left out

    # outputs_are="loss": predictions are negated, ranks a become 3, 1, 2, 4.
    with pytest.warns(RuntimeWarning):
        res = lds(scores, masks, outputs, outputs_are="loss")
    assert res["per_query"][0].item() == pytest.approx(-expected, abs=1e-12)


def test_lds_all_queries_undefined_is_nan_with_warning():
    masks = make_subsets(6, 5, seed=0)
    with pytest.warns(RuntimeWarning, match="every query"):
        res = lds(torch.randn(2, 6), masks, torch.ones(5, 2))
    assert math.isnan(res["lds"])


@pytest.mark.parametrize("outputs_are", ["loss", "margin"])
def test_lds_matches_scipy_spearman_with_ties(outputs_are):
    gen = torch.Generator().manual_seed(1)
    n_test, n_train, n_subsets = 7, 40, 30
    scores = torch.randn(n_test, n_train, generator=gen, dtype=torch.float64)
    # Integer-valued scores and outputs create ties on both sides.
    scores[3] = torch.randint(-1, 2, (n_train,), generator=gen).double()
    masks = make_subsets(n_train, n_subsets, seed=2)
    outputs = torch.randint(0, 5, (n_subsets, n_test), generator=gen).double()
    res = lds(scores, masks, outputs, outputs_are=outputs_are)

    sign = -1.0 if outputs_are == "loss" else 1.0
    predicted = sign * (masks.double() @ scores.T).numpy()
    expected = [spearmanr(predicted[:, q], outputs[:, q].numpy())[0] for q in range(n_test)]
    np.testing.assert_allclose(res["per_query"].numpy(), expected, rtol=0, atol=1e-6)
    assert res["lds"] == pytest.approx(float(np.mean(expected)), abs=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(-3, 3), st.floats(-5, 5, allow_nan=False, width=32)),
        min_size=3,
        max_size=25,
    )
)
def test_spearman_matches_scipy_property(pairs):
    x = np.array([p[0] for p in pairs], dtype=np.float64)
    y = np.array([p[1] for p in pairs], dtype=np.float64)
    got = spearman(torch.from_numpy(x)[None], torch.from_numpy(y)[None])[0].item()
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        assert math.isnan(got)
    else:
        assert got == pytest.approx(spearmanr(x, y)[0], abs=1e-9)


def test_lds_perfect_scores_near_one_random_scores_near_zero():
    gen = torch.Generator().manual_seed(0)
    n_test, n_train, n_subsets = 5, 200, 200
    w = torch.randn(n_test, n_train, generator=gen, dtype=torch.float64)
    masks = make_subsets(n_train, n_subsets, seed=0)
    noise = 1e-3 * torch.randn(n_subsets, n_test, generator=gen, dtype=torch.float64)
    losses = -(masks.double() @ w.T) + noise  # [n_subsets, n_test]: helpful lowers loss

    perfect = lds(w, masks, losses, outputs_are="loss")
    assert perfect["lds"] > 0.95
    assert perfect["per_query"].shape == (n_test,)
    # The same measurements read as higher-is-better scores are anti-correlated.
    assert lds(w, masks, losses, outputs_are="score")["lds"] < -0.95

    random_scores = torch.randn(n_test, n_train, generator=gen, dtype=torch.float64)
    assert abs(lds(random_scores, masks, losses)["lds"]) < 0.15


def test_lds_validation_messages():
    scores = torch.randn(3, 10)
    masks = make_subsets(10, 6)
    outputs = torch.randn(6, 3)
    with pytest.raises(ValueError, match=r"subset_masks .*n_train=10.*\(6, 9\)"):
        lds(scores, masks[:, :9], outputs)
    with pytest.raises(ValueError, match=r"subset_outputs .*n_test=3.*\(6, 2\)"):
        lds(scores, masks, outputs[:, :2])
    with pytest.raises(ValueError, match=r"scores must be 2-D.*\(10,\)"):
        lds(scores[0], masks, outputs)
    with pytest.raises(ValueError, match="outputs_are"):
        lds(scores, masks, outputs, outputs_are="accuracyy")
    with pytest.raises(ValueError, match="subset_outputs contains NaN"):
        lds(scores, masks, outputs.masked_fill(torch.eye(6, 3, dtype=torch.bool), math.nan))
    with pytest.raises(ValueError, match="scores contains NaN"):
        lds(scores.masked_fill(torch.eye(3, 10, dtype=torch.bool), math.inf), masks, outputs)
    with pytest.raises(ValueError, match="only 0 and 1"):
        lds(scores, masks.int() * 2, outputs)
    with pytest.raises(ValueError, match="at least 3 subsets"):
        lds(scores, masks[:2], outputs[:2])
    with pytest.raises(TypeError, match="scores"):
        lds(object(), masks, outputs)
    # 0/1 integer masks are accepted and equal to bool masks.
    assert lds(scores, masks.int(), outputs)["lds"] == lds(scores, masks, outputs)["lds"]


# --------------------------------------------------------------------------- #
# linear_datamodeling_score: the retraining driver and its cache
# --------------------------------------------------------------------------- #
class LinearDatamodel:
    """'Training' returns the kept set; its loss on query q is -sum of w[q, kept] + seed noise."""

    def __init__(self, n_test=4, n_train=30, noise=0.05):
        gen = torch.Generator().manual_seed(7)
        self.w = torch.randn(n_test, n_train, generator=gen, dtype=torch.float64)
        self.noise = noise
        self.calls: list[tuple[tuple[int, ...], int]] = []

    def train(self, indices, seed):
        assert indices.dtype == torch.long
        self.calls.append((tuple(indices.tolist()), seed))
        return indices, seed

    def eval(self, model):
        indices, seed = model
        gen = torch.Generator().manual_seed(1000 + seed)
        jitter = self.noise * torch.randn(self.w.shape[0], generator=gen, dtype=torch.float64)
        return -self.w[:, indices].sum(dim=1) + jitter  # [n_test]


def test_lds_driver_averages_seeds_and_matches_lds():
    dm = LinearDatamodel()
    res = linear_datamodeling_score(
        dm.train, dm.eval, dm.w, n_subsets=12, seeds=(0, 1), progress=False
    )
    assert len(dm.calls) == 24
    masks = res["subset_masks"]
    assert torch.equal(masks, make_subsets(30, 12, 0.5, seed=0))
    # Each train_fn call got the sorted indices of one subset.
    assert dm.calls[0] == (tuple(torch.nonzero(masks[0]).flatten().tolist()), 0)
    expected = torch.stack(
        [
            (dm.eval((torch.nonzero(m).flatten(), 0)) + dm.eval((torch.nonzero(m).flatten(), 1))) / 2
            for m in masks
        ]
    )
    torch.testing.assert_close(res["subset_outputs"], expected)
    assert res["lds"] == lds(dm.w, masks, expected)["lds"]
    assert res["lds"] > 0.9


def test_lds_driver_cache_reuse_resume_extend_and_mismatch(tmp_path):
    cache = tmp_path / "lds_cache"
    dm = LinearDatamodel()
    first = linear_datamodeling_score(
        dm.train, dm.eval, dm.w, n_subsets=8, seeds=(0, 1), cache_dir=cache, progress=False
    )
    assert len(dm.calls) == 16
    assert len(list(cache.glob("*.pt"))) == 16
    assert not list(cache.glob("*.tmp"))

    # A second identical call trains nothing and returns the same numbers.
    dm.calls.clear()
    second = linear_datamodeling_score(
        dm.train, dm.eval, dm.w, n_subsets=8, seeds=(0, 1), cache_dir=cache, progress=False
    )
    assert dm.calls == []
    torch.testing.assert_close(second["subset_outputs"], first["subset_outputs"], rtol=0, atol=0)
    assert second["lds"] == first["lds"]

    # More subsets: only the new ones are trained.
    linear_datamodeling_score(
        dm.train, dm.eval, dm.w, n_subsets=10, seeds=(0, 1), cache_dir=cache, progress=False
    )
    assert len(dm.calls) == 4

    # Settings that change the subsets or the test set are refused.
    for kwargs, key in [
        ({"fraction": 0.4}, "fraction"),
        ({"subset_seed": 1}, "subset_seed"),
    ]:
        with pytest.raises(ValueError, match=key):
            linear_datamodeling_score(
                dm.train, dm.eval, dm.w, n_subsets=8, cache_dir=cache, progress=False, **kwargs
            )
    with pytest.raises(ValueError, match="n_train"):
        linear_datamodeling_score(
            dm.train, dm.eval, dm.w[:, :20], n_subsets=8, cache_dir=cache, progress=False
        )


def test_lds_driver_resumes_after_interruption(tmp_path):
    dm = LinearDatamodel()
    budget = {"left": 5}

    def flaky_train(indices, seed):
        if budget["left"] == 0:
            raise KeyboardInterrupt
        budget["left"] -= 1
        return dm.train(indices, seed)

    with pytest.raises(KeyboardInterrupt):
        linear_datamodeling_score(
            flaky_train, dm.eval, dm.w, n_subsets=6, cache_dir=tmp_path, progress=False
        )
    assert len(dm.calls) == 5
    dm.calls.clear()
    budget["left"] = 100
    res = linear_datamodeling_score(
        flaky_train, dm.eval, dm.w, n_subsets=6, cache_dir=tmp_path, progress=False
    )
    assert len(dm.calls) == 1  # only the subset that was interrupted
    assert res["subset_outputs"].shape == (6, 4)


def test_lds_driver_checks_eval_output(tmp_path):
    dm = LinearDatamodel()
    with pytest.raises(ValueError, match=r"eval_fn\(model\) must have shape \(4,\)"):
        linear_datamodeling_score(
            dm.train, lambda m: dm.eval(m)[:3], dm.w, n_subsets=4, progress=False
        )
    with pytest.raises(ValueError, match="seeds"):
        linear_datamodeling_score(dm.train, dm.eval, dm.w, n_subsets=4, seeds=(), progress=False)


@pytest.mark.parametrize("rich_available", [True, False])
def test_lds_driver_progress_bar_optional(monkeypatch, rich_available):
    if rich_available:
        pytest.importorskip("rich.progress")
    else:
        monkeypatch.setitem(sys.modules, "rich.progress", None)  # import raises ImportError
    dm = LinearDatamodel()
    res = linear_datamodeling_score(dm.train, dm.eval, dm.w, n_subsets=4, progress=True)
    assert len(dm.calls) == 4 and res["subset_outputs"].shape == (4, 4)


def test_lds_driver_ridge_influence_sign_end_to_end():
    """Real retraining: influence scores of ridge regression, losses measured as outputs."""
    gen = torch.Generator().manual_seed(0)
    n, d, n_test, lam = 60, 8, 6, 1.0
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    w_true = torch.randn(d, generator=gen, dtype=torch.float64)
    y = x @ w_true + 0.5 * torch.randn(n, generator=gen, dtype=torch.float64)
    xt = torch.randn(n_test, d, generator=gen, dtype=torch.float64)
    yt = xt @ w_true + 0.5 * torch.randn(n_test, generator=gen, dtype=torch.float64)

    def train(indices, seed):
        a = x[indices].T @ x[indices] + lam * torch.eye(d, dtype=torch.float64)  # [d, d]
        return torch.linalg.solve(a, x[indices].T @ y[indices])  # [d]

    def losses_on_test(theta):
        return 0.5 * (xt @ theta - yt) ** 2  # [n_test]

    theta = train(torch.arange(n), 0)
    g_train = (x @ theta - y)[:, None] * x  # [n, d] loss gradients
    g_test = (xt @ theta - yt)[:, None] * xt  # [n_test, d]
    hessian = x.T @ x + lam * torch.eye(d, dtype=torch.float64)  # [d, d]
    scores = g_test @ torch.linalg.solve(hessian, g_train.T)  # [n_test, n]

    good = linear_datamodeling_score(train, losses_on_test, scores, n_subsets=60, progress=False)
    assert good["lds"] > 0.5
    flipped = linear_datamodeling_score(train, losses_on_test, -scores, n_subsets=60, progress=False)
    assert flipped["lds"] < -0.5


# --------------------------------------------------------------------------- #
# brittleness
# --------------------------------------------------------------------------- #
def _nearest_neighbour_task():
    """1-D, two classes, 1-nearest-neighbour classifier.

    Query 0 sits at x=0 with label +1.  Its 15 supporting +1 points lie at
    0.1 .. 1.5; the nearest -1 point is at -1.6.  The margin is
    (distance to nearest -1) - (distance to nearest +1), so it stays positive
    until all 15 supporting points are gone (the next +1 point is at 5.0):
    removing them flips the prediction at exactly k=15.
    Query 1 sits at x=3 with label -1 and is misclassified by the full model.
    """
    pos = torch.cat(
        [
            0.1 * torch.arange(1, 16),  # +1 support near query 0
            -1.6 - 0.1 * torch.arange(15),  # -1 near query 0
            5.0 + 0.1 * torch.arange(35),  # far +1
            -5.0 - 0.1 * torch.arange(35),  # far -1
        ]
    ).double()
    label = torch.cat([torch.ones(15), -torch.ones(15), torch.ones(35), -torch.ones(35)])
    q_pos = torch.tensor([0.0, 3.0], dtype=torch.float64)
    q_label = torch.tensor([1.0, -1.0])
    calls = []

    def train(indices, seed):
        calls.append(tuple(indices.tolist()))
        return pos[indices], label[indices]

    def margin(model):
        p, lab = model
        dist = (q_pos[:, None] - p[None, :]).abs()  # [n_test, n_kept]
        same = lab[None, :] == q_label[:, None]  # [n_test, n_kept]
        d_same = torch.where(same, dist, math.inf).min(dim=1).values  # [n_test]
        d_other = torch.where(~same, dist, math.inf).min(dim=1).values  # [n_test]
        return d_other - d_same

    # Hand-made attribution: same label helps, more so when close.
    scores = (q_label[:, None] * label[None, :]) / (
        1 + (q_pos[:, None] - pos[None, :]).abs()
    )  # [n_test, n_train]
    return train, margin, scores, calls


def test_brittleness_flips_at_known_k_and_random_control_does_not():
    train, margin, scores, calls = _nearest_neighbour_task()
    (res,) = brittleness(train, margin, scores, test_index=0, ks=(5, 10, 15, 20), n_random=3)
    assert isinstance(res, BrittlenessResult)
    assert res.base_margin == pytest.approx(1.5)
    assert res.initially_correct and res.flipped
    assert res.k_flip == 15
    assert res.margins[5] == pytest.approx(1.0)  # nearest +1 now at 0.6
    assert res.margins[10] == pytest.approx(0.5)  # nearest +1 now at 1.1
    assert res.margins[15] == pytest.approx(1.6 - 5.0)
    assert res.random_flip_fraction == {5: 0.0, 10: 0.0, 15: 0.0, 20: 0.0}
    assert all(len(v) == 3 and min(v) > 0 for v in res.random_margins.values())
    # full model + 4 top-k sets + 4 * 3 random sets, each trained once
    assert len(calls) == 1 + 4 + 12
    assert len(calls[1]) == 100 - 5


def test_brittleness_bad_scores_do_not_flip_and_caching_across_queries():
    train, margin, scores, calls = _nearest_neighbour_task()
    # Reversed scores remove the harmful -1 points first: the margin never drops.
    (res,) = brittleness(train, margin, -scores, test_index=[0], ks=(5, 15), n_random=0)
    assert res.k_flip is None and not res.flipped
    assert res.margins[15] > res.base_margin
    assert res.random_flip_fraction == {}

    calls.clear()
    results = brittleness(train, margin, scores, test_index=None, ks=(15,), n_random=2, seed=4)
    n_first = len(calls)
    assert n_first == 1 + 1 + 2  # query 1 needs no retrain: it is wrong to begin with
    wrong = results[1]
    assert wrong.test_index == 1 and not wrong.initially_correct
    assert wrong.k_flip is None and wrong.margins == {}
    # Repeating a query reuses every retrain made for it within the call.
    calls.clear()
    brittleness(train, margin, scores, test_index=[0, 0], ks=(15,), n_random=2, seed=4)
    assert len(calls) == n_first


def test_brittleness_validation():
    train, margin, scores, _ = _nearest_neighbour_task()
    with pytest.raises(ValueError, match="n_train=100"):
        brittleness(train, margin, scores, ks=(100,))
    with pytest.raises(ValueError, match="test_index 2 out of range"):
        brittleness(train, margin, scores, test_index=2)
    with pytest.raises(ValueError, match=r"eval_fn\(model\) must have shape \(2,\)"):
        brittleness(train, lambda m: margin(m)[:1], scores, ks=(5,))
    with pytest.raises(ValueError, match="NaN"):
        brittleness(train, lambda m: margin(m) * math.nan, scores, ks=(5,))
    with pytest.raises(TypeError, match="n_random"):
        brittleness(train, margin, scores, n_random=1.5)
    with pytest.raises(TypeError, match="test_index must be an int"):
        brittleness(train, margin, scores, test_index=0.5)
    # NumPy and torch integers are ints: the same answer as Python's.
    plain = brittleness(train, margin, scores, ks=(5,), test_index=1)
    assert brittleness(train, margin, scores, ks=(np.int64(5),), test_index=np.int64(1)) == plain
    assert brittleness(train, margin, scores, ks=(5,), test_index=torch.tensor([1])) == plain


def test_no_warnings_on_well_posed_lds():
    masks = make_subsets(20, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = lds(torch.randn(3, 20), masks, torch.randn(10, 3))
    assert torch.isfinite(result["per_query"]).all() and -1 <= result["lds"] <= 1


def test_align_scores_reorders_columns_by_id():
    from logix.evaluation import align_scores

    result = {"tgt_ids": [2, 0, 1], "influence": torch.tensor([[20.0, 0.0, 10.0]])}
    assert torch.equal(align_scores(result, range(3)), torch.tensor([[0.0, 10.0, 20.0]]))
    assert torch.equal(align_scores(result, torch.arange(3)), align_scores(result, range(3)))
    assert torch.equal(align_scores(result, np.arange(3)), align_scores(result, range(3)))
    with pytest.raises(ValueError, match="not in the scores"):
        align_scores(result, [0, 7])

"""hessian='full': one covariance of the whole saved rows (every module, cross-layer blocks
included), against F = G^T G / N formed here from the rows of a real logged run and a dense
solve."""

import pytest
import torch
from torch import nn

import logix
from conftest import log_classifier
from logix.errors import UsageError
from logix.influence import full
from logix.storage.reader import LogReader

N = 30


def logged_run(tmp_path, width_in=5, covariance=True):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width_in, 4), nn.Tanh(), nn.Linear(4, 3))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(N, width_in, generator=g), torch.randint(0, 3, (N,), generator=g)
    run = logix.init("full", root_dir=str(tmp_path), shard_rows=7)
    run.watch(model)
    run.setup({"grad": ["log", "covariance"] if covariance else ["log"]})
    return log_classifier(run, model, x, y, 5, 1.5)


def dense(run, damping="auto"):
    """(rows G [N, dim], F + lambda I, lambda) with F = G^T G / N over the whole rows; lambda by
    the auto rule (0.3 x the RMS eigenvalue of F), the relative one (0.1 x the mean) or given."""
    _, rows = LogReader(run.project_dir).read_all()
    rows = rows.double()
    fisher = rows.T @ rows / rows.shape[0]
    if damping == "auto":
        lam = 0.3 * float((fisher.square().sum() / fisher.shape[0]).sqrt())
    elif damping == "relative":
        lam = 0.1 * float(fisher.diagonal().mean())
    else:
        lam = damping
    return rows, fisher + lam * torch.eye(rows.shape[1], dtype=torch.float64), lam


def relative_error(got, expected):
    return float((got.double() - expected).norm() / expected.norm())


@pytest.mark.parametrize("damping", ["auto", "relative", 1e-3])
def test_full_equals_a_dense_solve_with_the_cross_layer_fisher(tmp_path, damping):
    run, query = logged_run(tmp_path)
    rows, system, lam = dense(run, damping)
    q = query.grads.double()
    assert len(query.modules) == 2
    # the cross-layer block is not zero: this is not raw's block-diagonal curvature
    first = query.modules[0].columns
    assert system[first, query.modules[1].columns].abs().max() > 1e-3
    solved = torch.linalg.solve(system, q.T).T
    preconditioner = run.influence.preconditioner("full", damping)
    assert relative_error(preconditioner.apply(q), solved) <= 1e-10  # float64 queries
    result = run.compute_influence_all(query, hessian="full", damping=damping, progress=False)
    assert relative_error(result["influence"], solved @ rows.T) <= 1e-6  # float32 scores
    assert result["meta"]["hessian"] == "full"
    assert result["meta"]["damping"] == {m.name: pytest.approx(lam, rel=1e-9)
                                         for m in query.modules}
    raw = run.compute_influence_all(query, hessian="raw", damping=damping, progress=False)
    assert relative_error(raw["influence"], solved @ rows.T) > 1e-3  # a different curvature


def test_full_modes_self_influence_and_groups(tmp_path):
    run, query = logged_run(tmp_path)
    rows, system, _ = dense(run)
    q = query.grads.double()
    inverse = torch.linalg.inv(system)
    q_norms, g_norms = (q @ inverse * q).sum(1), (rows @ inverse * rows).sum(1)
    dot = q @ inverse @ rows.T
    cosine = run.compute_influence_all(query, hessian="full", mode="cosine", progress=False)
    assert relative_error(cosine["influence"], dot / (q_norms[:, None] * g_norms).sqrt()) <= 1e-5
    l2 = run.compute_influence_all(query, hessian="full", mode="l2", progress=False)
    assert relative_error(l2["influence"], 2 * dot - q_norms[:, None] - g_norms) <= 1e-5
    every = run.compute_self_influence(hessian="full", progress=False)
    assert relative_error(every["influence"], g_norms) <= 1e-6
    queries = run.influence.self_influence(query, hessian="full", progress=False)
    assert relative_error(queries["influence"], q_norms) <= 1e-6
    # groups: each module's share of the total, (H^-1 q)_m . g_m, summing to it
    grouped = run.compute_influence_all(query, hessian="full", influence_groups="module",
                                        progress=False)
    solved = q @ inverse
    for m in query.modules:
        expected = solved[:, m.columns] @ rows[:, m.columns].T
        assert relative_error(grouped["groups"][m.name], expected) <= 1e-5
    assert relative_error(sum(grouped["groups"].values()), dot) <= 1e-5
    with pytest.raises(UsageError, match="couples the modules.*mode='dot' with influence_groups"):
        run.compute_influence_all(query, hessian="full", mode="cosine",
                                  influence_groups="module", progress=False)


def test_full_is_decomposed_once_per_log(tmp_path):
    run, query = logged_run(tmp_path)
    first = run.influence.preconditioner("full", None, progress=False)
    again = run.influence.preconditioner("full", 0.5, progress=False)
    assert again.inverse.vectors is first.inverse.vectors  # cached, only the damping differs
    assert again.inverse.damping == 0.5 != first.inverse.damping
    assert "full" in run.influence.available_hessians()  # ready from the saved rows alone


def test_full_refuses_rows_over_its_width_and_source(tmp_path):
    run, query = logged_run(tmp_path, width_in=full.MAX_WIDTH // 4 + 1, covariance=False)
    width = query.grads.shape[1]
    assert width > full.MAX_WIDTH
    with pytest.raises(UsageError, match=rf"rows of {width} numbers are over its limit of "
                                         rf"{full.MAX_WIDTH}.*smaller LoGra rank.*'raw' or "
                                         "'ekfac'"):
        run.compute_influence_all(query, hessian="full", progress=False)
    with pytest.raises(UsageError, match="method='source' takes hessian in.*got 'full'"):
        run.influence.source(query, hessian="full")

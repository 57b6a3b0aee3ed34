"""Checkpoint ensembles and TracIn-CP equal their formulas with explicit matrices, per checkpoint
its own rows, curvature and query gradient."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import logix
from logix.errors import UsageError
from logix.influence.damping import AUTO_FACTOR
from logix.storage.reader import LogReader

N = 12
PLAN = [("c0", 0, 0.1, 20, None), ("c1", 1, 0.05, 40, list(range(4, N)))]


def logged_checkpoints(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(N, 4, generator=g), torch.randint(0, 3, (N,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    run = logix.init("ensemble", root_dir=str(tmp_path))
    run.watch(model)
    run.setup({"grad": ["log", "covariance"]})
    run.save(True)
    snapshots = {}
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    for name, segment, lr, steps, train_ids in PLAN:
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        members = list(range(N)) if train_ids is None else train_ids
        with run.checkpoint(name, segment=segment, lr=lr, steps=steps, train_ids=train_ids):
            with run(data_id=members):
                F.cross_entropy(model(x[members]), y[members], reduction="sum").backward()
        snapshots[name] = {k: v.clone() for k, v in model.state_dict().items()}
    run.finalize()
    run.eval()
    queries = {}
    for name, weights in snapshots.items():  # each checkpoint's query gradient at its weights
        model.load_state_dict(weights)
        with run(data_id=["q0", "q1"]):
            F.cross_entropy(model(x[:2] + 1), y[:2], reduction="sum").backward()
        queries[name] = run.get_log(copy=True)
    return run, queries


def explicit(run, queries, name, precondition):
    """[2, N] q^T (F + 0.1 mean-eig I)^-1 g per module (or q^T g), zero where not logged."""
    ids, rows = LogReader(run.project_dir, checkpoint=name).read_all()
    rows, q = rows.double(), queries[name].grads.double()
    scores = torch.zeros(2, N, dtype=torch.float64)
    for m in queries[name].modules:
        g = rows[:, m.columns]
        inverse = torch.eye(m.dim, dtype=torch.float64)
        if precondition:
            fisher = g.T @ g / g.shape[0]
            damping = AUTO_FACTOR * torch.linalg.matrix_norm(fisher) / m.dim ** 0.5  # the default
            inverse = torch.linalg.inv(fisher + damping * inverse)
        scores[:, ids] += q[:, m.columns] @ inverse @ g.T
    return scores


def by_id(result):
    return result["influence"].double()[:, [result["tgt_ids"].index(i) for i in range(N)]]


def test_ensemble_averages_each_checkpoints_preconditioned_scores(tmp_path):
    run, queries = logged_checkpoints(tmp_path)
    result = run.compute_influence_all(queries, method="ensemble", hessian="raw", progress=False)
    expected = (explicit(run, queries, "c0", True) + explicit(run, queries, "c1", True)) / 2
    torch.testing.assert_close(by_id(result), expected, rtol=1e-4,
                               atol=1e-5 * expected.abs().max().item())
    assert result["meta"]["method"] == "ensemble" and set(result["meta"]["damping"]) == {"c0",
                                                                                        "c1"}
    # One query log for every checkpoint: each checkpoint scores that log.
    single = run.compute_influence_all(queries["c1"], method="ensemble", hessian="raw",
                                       progress=False)
    same = {"c0": queries["c1"], "c1": queries["c1"]}
    expected = (explicit(run, same, "c0", True) + explicit(run, same, "c1", True)) / 2
    torch.testing.assert_close(by_id(single), expected, rtol=1e-4,
                               atol=1e-5 * expected.abs().max().item())


def test_ensemble_with_the_full_curvature_uses_each_checkpoints_cross_layer_fisher(tmp_path):
    run, queries = logged_checkpoints(tmp_path)
    result = run.compute_influence_all(queries, method="ensemble", hessian="full", progress=False)
    expected = torch.zeros(2, N, dtype=torch.float64)
    for name in ("c0", "c1"):  # F over whole rows: both modules, cross-layer blocks included
        ids, rows = LogReader(run.project_dir, checkpoint=name).read_all()
        rows, q = rows.double(), queries[name].grads.double()
        fisher = rows.T @ rows / rows.shape[0]
        auto = 0.3 * (fisher.square().sum() / rows.shape[1]).sqrt()  # damping="auto"
        system = fisher + auto * torch.eye(rows.shape[1], dtype=torch.float64)
        expected[:, ids] += torch.linalg.solve(system, q.T).T @ rows.T / 2
    torch.testing.assert_close(by_id(result), expected, rtol=1e-4,
                               atol=1e-5 * expected.abs().max().item())


def test_tracin_is_the_lr_weighted_sum_of_dot_products_and_topk_agrees(tmp_path):
    run, queries = logged_checkpoints(tmp_path)
    result = run.influence.compute_influence_all(queries, method="tracin", progress=False)
    expected = 0.1 * explicit(run, queries, "c0", False) + 0.05 * explicit(run, queries, "c1",
                                                                             False)
    torch.testing.assert_close(by_id(result), expected, rtol=1e-4,
                               atol=1e-5 * expected.abs().max().item())
    assert by_id(result)[:, :4].abs().max() > 0  # ids 0-3: from c0 only
    top = run.compute_influence_all(queries, method="tracin", topk=3, progress=False)
    values, index = result["influence"].topk(3, dim=1)
    torch.testing.assert_close(top["top_scores"], values)
    assert top["top_ids"] == [[result["tgt_ids"][i] for i in row] for row in index.tolist()]
    assert top["meta"]["weights"] == {"c0": 0.1, "c1": 0.05}


def test_checkpoint_methods_name_their_requirements(tmp_path):
    run, queries = logged_checkpoints(tmp_path)
    with pytest.raises(UsageError, match="missing \\['c1'\\]"):
        run.compute_influence_all({"c0": queries["c0"]}, method="ensemble", progress=False)
    with pytest.raises(UsageError, match="'tracin'"):
        run.compute_influence_all(queries["c0"], method="tracn", progress=False)
    with pytest.raises(UsageError, match="influence_groups"):
        run.compute_influence_all(queries, method="tracin", out=str(tmp_path / "s"))

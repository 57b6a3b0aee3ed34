"""LiSSA equals the explicit inverse: the `lissa` curvature kind against (F + lambda I)^-1 built
from the saved rows, and logix.influence.lissa against the model's Hessian / Gauss-Newton matrix
from torch.func."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian
from torch.nn import functional as F

import logix
from conftest import log_classifier
from logix.errors import ConfigError, UsageError
from logix.influence.lissa import lissa
from logix.storage.manifest import Manifest
from logix.storage.reader import LogReader

N = 24


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, 5, generator=g), torch.randint(0, 3, (N,), generator=g)


def logged_run(tmp_path, rank=None, **config):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = data()
    run = logix.init("lissa", root_dir=str(tmp_path), shard_rows=7, rank=rank, **config)
    run.watch(model)
    if rank:
        run.add_lora()
    run.setup({"grad": ["log", "covariance"]})
    return log_classifier(run, model, x, y, 6, 1.5)


def explicit_scores(run, query, damping="relative"):
    """q^T (F_m + lambda_m I)^-1 g summed over modules, F_m = G_m^T G_m / N from the rows;
    lambda_m by the relative rule (0.1 x mean eigenvalue), the auto one (0.3 x the RMS
    eigenvalue) or given."""
    _, rows = LogReader(run.project_dir).read_all()
    rows, q = rows.double(), query.grads.double()
    total = torch.zeros(q.shape[0], rows.shape[0], dtype=torch.float64)
    for m in query.modules:
        g = rows[:, m.columns]
        fisher = g.T @ g / g.shape[0]
        if damping == "relative":
            lam = 0.1 * fisher.diagonal().mean()
        elif damping == "auto":
            lam = 0.3 * (fisher.square().sum() / m.dim).sqrt()
        else:
            lam = damping
        total += q[:, m.columns] @ torch.linalg.inv(fisher + lam * torch.eye(m.dim,
                                                                              dtype=torch.float64)) @ g.T
    return total


def relative_error(got, expected):
    return float((got.double() - expected).norm() / expected.norm())


@pytest.mark.parametrize("rank", [None, 2])
def test_lissa_kind_equals_the_explicit_inverse_of_the_rows_fisher(tmp_path, rank):
    run, query = logged_run(tmp_path, rank=rank, lissa_tol=1e-6, lissa_depth=5000)
    result = run.compute_influence_all(query, hessian="lissa", damping="relative",
                                       progress=False)
    expected = explicit_scores(run, query)
    assert relative_error(result["influence"], expected) <= 1e-3
    raw = run.compute_influence_all(query, hessian="raw", damping="relative", progress=False)
    assert result["meta"]["damping"] == pytest.approx(raw["meta"]["damping"], rel=1e-6)
    solver = result["meta"]["solver"]
    assert solver["converged"] and solver["residuals"][-1] <= 1e-6
    assert solver["residuals"][-1] < solver["residuals"][0]


@pytest.mark.parametrize("damping", ["auto", "relative", 1e-3])
def test_lissa_kind_solves_raws_system_to_its_tolerance(tmp_path, damping):
    """Conjugate gradients (the default solver) solve (F + lambda I) x = g_q to lissa_tol, so the
    scores are raw's (the same F, from the logged covariance) to round-off, even at a small
    damping where the recursion would need thousands of steps."""
    run, query = logged_run(tmp_path, lissa_tol=1e-10)
    result = run.compute_influence_all(query, hessian="lissa", damping=damping, progress=False)
    solver = result["meta"]["solver"]
    assert solver["solver"] == "cg" and solver["converged"] and solver["residuals"][-1] <= 1e-10
    # in exact arithmetic at most one step per distinct eigenvalue (<= d_m + 1); round-off adds some
    assert solver["iterations"] <= 2 * (max(m.dim for m in query.modules) + 1)
    # float32 scores: round-off is all that is left
    assert relative_error(result["influence"], explicit_scores(run, query, damping)) <= 1e-6
    raw = run.compute_influence_all(query, hessian="raw", damping=damping, progress=False)
    assert relative_error(result["influence"], raw["influence"].double()) <= 1e-4


def test_lissa_kind_reports_an_unconverged_solve(tmp_path):
    run, query = logged_run(tmp_path)
    with pytest.warns(UserWarning, match="conjugate gradients stopped at depth 3 with relative "
                                         "residual"):
        result = logix.Attributor(run.project_dir, logix.config.InfluenceConfig(
            lissa_depth=3)).compute_influence_all(query, hessian="lissa", progress=False)
    solver = result["meta"]["solver"]
    assert solver["iterations"] == 3 and not solver["converged"]
    assert solver["residuals"][-1] > 1e-4
    # the recursion's depth is known before it runs: refused up front, with the depth it needs
    neumann = logix.Attributor(run.project_dir, logix.config.InfluenceConfig(
        lissa_solver="neumann", lissa_depth=50))
    with pytest.raises(UsageError, match=r"takes at least \d+ steps.*lissa_depth=50.*"
                                         r"lissa_solver='cg'.*lissa_depth >= \d+"):
        neumann.compute_influence_all(query, hessian="lissa", progress=False)
    with pytest.raises(ConfigError, match="lissa_scale=1.0 is the scale of lissa_solver="):
        logix.config.InfluenceConfig(lissa_scale=1.0)


def test_lissa_kind_with_absolute_damping_scale_and_topk(tmp_path):
    run, query = logged_run(tmp_path)
    attributor = logix.Attributor(run.project_dir, logix.config.InfluenceConfig(
        lissa_solver="neumann", lissa_scale=1.0, lissa_tol=1e-7, lissa_depth=5000))
    expected = explicit_scores(run, query, damping=0.05)
    full = attributor.compute_influence_all(query, hessian="lissa", damping=0.05, progress=False)
    assert relative_error(full["influence"], expected) <= 1e-3
    assert set(full["meta"]["solver"]["scale"].values()) == {1.0}
    top = attributor.compute_influence_all(query, hessian="lissa", damping=0.05, topk=3,
                                           progress=False)
    torch.testing.assert_close(top["top_scores"], full["influence"].topk(3, dim=1).values)


def test_lissa_kind_refuses_train_side_modes_and_reports_divergence(tmp_path):
    run, query = logged_run(tmp_path)
    with pytest.raises(UsageError, match="mode='dot'"):
        run.compute_influence_all(query, hessian="lissa", mode="cosine", progress=False)
    with pytest.raises(UsageError, match="src_log="):
        run.compute_self_influence(hessian="lissa", progress=False)
    tiny = logix.Attributor(run.project_dir, logix.config.InfluenceConfig(
        lissa_solver="neumann", lissa_scale=1e-4))
    with pytest.raises(UsageError, match="diverged.*larger scale"):
        tiny.compute_influence_all(query, hessian="lissa", progress=False)
    with pytest.warns(UserWarning, match="depth 2"):
        logix.Attributor(run.project_dir, logix.config.InfluenceConfig(lissa_depth=2)) \
            .compute_influence_all(query, hessian="lissa", progress=False)


def model_and_loss():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = data()
    batch = (x[:16, :3].double(), y[:16] % 2)
    return model, batch, lambda out, b: F.cross_entropy(out, b[1])


def explicit_curvature(model, batch, loss_fn, gauss_newton):
    names = [n for n, _ in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    shapes = [p.shape for p in model.parameters()]

    def unflat(v):
        out, i = {}, 0
        for n, s in zip(names, shapes):
            out[n] = v[i:i + s.numel()].reshape(s)
            i += s.numel()
        return out

    def outputs(v):
        return functional_call(model, unflat(v), (batch[0],))

    if not gauss_newton:
        return hessian(lambda v: loss_fn(outputs(v), batch))(flat)
    jac = torch.func.jacrev(outputs)(flat).reshape(-1, flat.numel())  # [B*C, P]
    out = outputs(flat)
    h_out = hessian(lambda o: loss_fn(o.reshape(out.shape), batch))(out.reshape(-1))
    return jac.T @ h_out @ jac


@pytest.mark.parametrize("gauss_newton", [False, True])
def test_model_lissa_equals_the_explicit_inverse(gauss_newton):
    model, batch, loss_fn = model_and_loss()
    h = explicit_curvature(model, batch, loss_fn, gauss_newton)
    damping = 0.1 if gauss_newton else 0.3 + max(0.0, -float(torch.linalg.eigvalsh(h)[0]))
    vectors = torch.randn(3, h.shape[0], generator=torch.Generator().manual_seed(2),
                          dtype=torch.float64)
    out = lissa(model, loss_fn, [batch], vectors, damping=damping, depth=5000, tol=1e-7,
                gauss_newton=gauss_newton)
    expected = torch.linalg.solve(h + damping * torch.eye(h.shape[0], dtype=h.dtype), vectors.T).T
    assert relative_error(out["solution"], expected) <= 1e-3
    assert out["converged"] and out["residuals"][-1] <= 1e-7 and out["scale"] > 0


def test_model_lissa_refuses_up_front_what_cannot_converge():
    model, batch, loss_fn = model_and_loss()
    h = explicit_curvature(model, batch, loss_fn, gauss_newton=True)
    vectors = torch.ones(1, h.shape[0], dtype=torch.float64)
    with pytest.raises(UsageError, match=r"takes at least (\d+) steps.*over depth=20.*depth >="):
        lissa(model, loss_fn, [batch], vectors, damping=1e-3, depth=20, gauss_newton=True)
    eigenvalues = torch.linalg.eigvalsh(explicit_curvature(model, batch, loss_fn, False))
    assert eigenvalues[0] < -1e-3  # the Hessian is indefinite here: damping 0 cannot converge
    with pytest.raises(UsageError, match="eigenvalue <= 0.*gauss_newton=True"):
        lissa(model, loss_fn, [batch], vectors, damping=0.0, depth=10 ** 6)


def test_model_lissa_argument_errors_and_divergence():
    model, batch, loss_fn = model_and_loss()
    total = sum(p.numel() for p in model.parameters())
    with pytest.raises(UsageError, match=rf"\[k, {total}\]"):
        lissa(model, loss_fn, [batch], torch.zeros(2, 3))
    with pytest.raises(UsageError, match="not parameters"):
        lissa(model, loss_fn, [batch], torch.zeros(1, 3), params=["nope"])
    with pytest.raises(UsageError, match="diverged"):
        lissa(model, loss_fn, [batch], torch.ones(1, total, dtype=torch.float64), scale=1e-3)


def test_a_log_whose_snapshot_set_a_lissa_scale_keeps_the_recursion(tmp_path):
    """Logs from before influence.lissa_solver existed: a snapshot with lissa_scale meant the
    recursion at that scale."""
    run, query = logged_run(tmp_path)
    manifest = Manifest.load(run.project_dir)
    snapshot = {k: v for k, v in manifest.config["influence"].items() if k != "lissa_solver"}
    manifest.config["influence"] = {**snapshot, "lissa_scale": 1.0}
    manifest.save(run.project_dir)
    attributor = logix.Attributor(run.project_dir)
    assert attributor.influence_config.lissa_solver == "neumann"
    assert attributor.influence_config.lissa_scale == 1.0

"""SOURCE at its exact value: with `raw` curvature on unprojected logs of a one-module model the
library's SOURCE equals the full-matrix formula to round-off, momentum included; and the
optimizer conventions (eta = lr / (1 - momentum), K steps) match unrolled heavy-ball training."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

import logix
from logix.influence.source import _f_r, _segment_step

N, D, CLASSES = 16, 4, 3
# (checkpoint, segment, lr, steps, momentum, train_ids)
PLAN = [("a0", 0, 0.05, 30, 0.9, list(range(8))), ("a1", 0, 0.05, 30, 0.9, list(range(8))),
        ("b0", 1, 0.02, 50, 0.5, None)]


def data():
    g = torch.Generator().manual_seed(3)
    return torch.randn(N, D, generator=g), torch.randint(0, CLASSES, (N,), generator=g)


def per_example_grads(model, x, y):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None], reduction="sum")

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)["weight"].reshape(N, -1)


def test_source_raw_unprojected_equals_full_matrix_source_with_momentum(tmp_path):
    x, y = data()
    torch.manual_seed(0)
    model = nn.Linear(D, CLASSES, bias=False)  # one module: block diagonal = the full matrix
    run = logix.init("exact", root_dir=str(tmp_path))
    run.watch(model)
    run.setup({"grad": ["log", "covariance"]})
    run.save(True)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    grads = {}
    for name, segment, lr, steps, momentum, train_ids in PLAN:
        for _ in range(4):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        members = list(range(N)) if train_ids is None else train_ids
        grads[name] = per_example_grads(model, x, y).double()
        with run.checkpoint(name, segment=segment, lr=lr, steps=steps, momentum=momentum,
                            train_ids=train_ids):
            with run(data_id=members):
                F.cross_entropy(model(x[members]), y[members], reduction="sum").backward()
    run.finalize()
    run.eval()
    with run(data_id=["q"]):
        F.cross_entropy(model(x[:1] * 2), y[:1], reduction="sum").backward()
    result = run.compute_influence_all(run.get_log(), method="source", hessian="raw", damping=0,
                                       progress=False)

    q = vmap(grad(lambda p, xi, yi: F.cross_entropy(functional_call(model, p, (xi[None],)),
                                                    yi[None], reduction="sum")),
             in_dims=(None, 0, 0))({"weight": model.weight.detach()}, x[:1] * 2,
                                   y[:1])["weight"].reshape(1, -1).double()
    expected = torch.zeros(1, N, dtype=torch.float64)
    for segment in (1, 0):
        members = [p for p in PLAN if p[1] == segment]
        trained = members[0][5] if members[0][5] is not None else list(range(N))
        h = sum(grads[p[0]][trained].T @ grads[p[0]][trained] / len(trained)
                for p in members) / len(members)
        g = sum(grads[p[0]] for p in members) / len(members)
        a = sum(p[2] / (1 - p[4]) * p[3] for p in members) / len(members)
        values, vectors = torch.linalg.eigh(h)
        values = values.clamp_min(0)
        f = torch.where(values * a < 1e-12, torch.full_like(values, a),
                        -torch.expm1(-a * values) / values.clamp_min(1e-300))
        mask = torch.zeros(N, dtype=torch.float64)
        mask[trained] = 1.0
        expected += (q @ vectors @ torch.diag(f) @ vectors.T @ g.T) * mask / len(trained)
        q = q @ torch.linalg.matrix_exp(-a * h)
    got = result["influence"].double()[:, [result["tgt_ids"].index(i) for i in range(N)]]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())
    assert [s["eta_k"] for s in result["segments"]] == pytest.approx([0.05 / 0.1 * 30,
                                                                     0.02 / 0.5 * 50])


def test_step_and_momentum_conventions_match_unrolled_heavy_ball():
    """On a quadratic 1/2 theta^T H theta - eps c^T theta, heavy ball with lr, momentum beta and K
    steps moves theta_K by d theta_K / d eps ~ F_r(H) c with F_r from SOURCE's eta K."""
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))[0]
    h = basis @ torch.diag(torch.tensor([3.0, 1.0, 0.3, 0.05, 0.0], dtype=torch.float64)) \
        @ basis.T
    c = torch.randn(5, generator=g, dtype=torch.float64)
    lr, beta, steps = 0.002, 0.9, 400

    theta, velocity = torch.zeros(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    for _ in range(steps):  # torch.optim.SGD's heavy ball: v = beta v + grad; theta -= lr v
        velocity = beta * velocity + (h @ theta - c)
        theta = theta - lr * velocity
    # theta is linear in c (eps = 1): theta_K = F_r(H) c in the continuous-time limit.
    a = _segment_step(["x"], {"x": {"lr": lr, "steps": steps, "momentum": beta}})
    assert a == lr / (1 - beta) * steps
    values, vectors = torch.linalg.eigh(h)
    predicted = vectors @ (_f_r(values.clamp_min(0), a) * (vectors.T @ c))
    error = float((theta - predicted).norm() / theta.norm())
    assert error < 0.05
    without_momentum = vectors @ (_f_r(values.clamp_min(0), lr * steps) * (vectors.T @ c))
    assert error < 0.2 * float((theta - without_momentum).norm() / theta.norm())


def _adam_source_log(tmp_path, add_state=True):
    """A one-module model trained by Adam through PLAN; each checkpoint block logs the rows
    at that checkpoint and (add_state) the optimizer's state there. Returns the run, the
    per-checkpoint per-example gradients and second moments, the query gradient and log."""
    x, y = data()
    torch.manual_seed(0)
    model = nn.Linear(D, CLASSES, bias=False)
    run = logix.init("adam", root_dir=str(tmp_path))
    run.watch(model)
    run.setup({"grad": ["log"]})
    run.save(True)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    grads, moments = {}, {}
    for name, segment, lr, steps, momentum, train_ids in PLAN:
        for _ in range(4 if segment == 0 else 9):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        members = list(range(N)) if train_ids is None else train_ids
        grads[name] = per_example_grads(model, x, y).double()
        moments[name] = opt.state[model.weight]["exp_avg_sq"].double().clone()
        with run.checkpoint(name, segment=segment, lr=lr, steps=steps, momentum=momentum,
                            train_ids=train_ids):
            with run(data_id=members):
                F.cross_entropy(model(x[members]), y[members], reduction="sum").backward()
            if add_state:
                run.add_optimizer_state(opt)
    run.finalize()
    q = per_example_grads(model, x * 2, y)[:1].double()
    run.eval()
    with run(data_id=["q"]):
        F.cross_entropy(model(x[:1] * 2), y[:1], reduction="sum").backward()
    return run, grads, moments, q, run.get_log(copy=True)


def test_source_with_optimizer_normalizers_equals_the_elementwise_formula(tmp_path):
    """hessian="optimizer" with SOURCE: each segment's H is sqrt(v) of the Adam states added in
    its checkpoint blocks, factored as Adafactor does (v ~ outer(row means, column means) /
    mean) and averaged per side over the segment's checkpoints; unprojected, H is diagonal, so
    the formula is elementwise."""
    run, grads, moments, q, query = _adam_source_log(tmp_path)
    result = run.compute_influence_all(query, method="source", hessian="optimizer", damping=0,
                                       progress=False)  # the undamped form below
    expected = torch.zeros(1, N, dtype=torch.float64)
    for segment in (1, 0):
        members = [p for p in PLAN if p[1] == segment]
        trained = members[0][5] if members[0][5] is not None else list(range(N))
        sides = [(v.mean(1).sqrt() / v.mean() ** 0.25, v.mean(0).sqrt() / v.mean() ** 0.25)
                 for v in (moments[p[0]] for p in members)]
        h = torch.outer(sum(s[0] for s in sides) / len(sides),
                        sum(s[1] for s in sides) / len(sides)).reshape(-1)
        g = sum(grads[p[0]] for p in members) / len(members)
        a = sum(p[2] / (1 - p[4]) * p[3] for p in members) / len(members)
        mask = torch.zeros(N, dtype=torch.float64)
        mask[trained] = 1.0
        expected += ((q * -torch.expm1(-a * h) / h) @ g.T) * mask / len(trained)
        q = q * torch.exp(-a * h)
    got = result["influence"].double()[:, [result["tgt_ids"].index(i) for i in range(N)]]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())
    assert result["meta"]["hessian"] == "optimizer"
    # the segments' states differ, so one state for both would give other scores
    assert not torch.allclose(moments["a0"], moments["b0"])


def test_source_with_optimizer_needs_the_state_in_every_checkpoint_block(tmp_path):
    run, _, _, _, query = _adam_source_log(tmp_path, add_state=False)
    with pytest.raises(logix.errors.UsageError,
                       match=r"add_optimizer_state\(optimizer\) inside each checkpoint block"):
        run.compute_influence_all(query, method="source", hessian="optimizer", progress=False)
    with pytest.raises(logix.errors.UsageError, match="method='source' takes hessian in"):
        run.compute_influence_all(query, method="source", hessian="none", progress=False)

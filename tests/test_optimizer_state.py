"""The `optimizer` curvature: Adam / AdamW / Adafactor second moments as per-layer Kronecker
factors. Scores equal an explicit elementwise computation (unprojected) and an explicit Kronecker
solve (projected); Adafactor's factors are the ones its own update uses; state_dicts map to
parameters by the optimizer's order (a Hugging Face Trainer's included)."""

from __future__ import annotations

import pytest
import torch

import logix
from conftest import make_mlp, seeded
from logix.errors import UsageError
from logix.tracking.optimizer_state import second_moments, trainer_parameter_order

DAMPING = 1e-3


def _trained(optimizer_class, steps=5, **kwargs):
    model = make_mlp(seed=3)
    optimizer = optimizer_class(model.parameters(), **kwargs)
    g = seeded(3)
    for _ in range(steps):
        x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def _log(new_run, model, rank=None, include_bias=False):
    run = new_run(include_bias=include_bias)
    run.watch(model)
    if rank:
        run.add_lora(rank=rank)
    run.setup({"grad": ["log"]})
    run.save(True)
    g = seeded(4)
    x, y = torch.randn(10, 6, generator=g), torch.randint(0, 3, (10,), generator=g)
    with run(data_id=list(range(10))):
        torch.nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    run.finalize()
    run.eval()
    with run(data_id=["q0", "q1"]):
        torch.nn.functional.cross_entropy(model(x[:2] * 2), y[:2], reduction="sum").backward()
    return run, run.get_log(copy=True)


def test_unprojected_scores_equal_the_elementwise_formula(new_run):
    model, optimizer = _trained(torch.optim.AdamW, lr=1e-2)
    run, query = _log(new_run, model)
    with pytest.raises(UsageError, match="add_optimizer_state"):
        run.compute_influence_all(query, hessian="optimizer", progress=False)
    assert "optimizer" not in run.influence.available_hessians()
    run.add_optimizer_state(optimizer)
    assert "optimizer" in run.influence.available_hessians()
    got = run.compute_influence_all(query, hessian="optimizer", damping=DAMPING,
                                    progress=False)["influence"].double()
    _, train = run.reader().read_all()
    expected = torch.zeros(2, 10, dtype=torch.float64)
    for entry in run.layout():
        v = optimizer.state[model[int(entry.name)].weight]["exp_avg_sq"].double()
        # Adafactor's factoring of v, then its square root, elementwise
        d = (torch.outer(v.mean(1), v.mean(0)) / v.mean()).sqrt().reshape(-1)
        q = query.grads[:, entry.columns].double()
        t = train[:, entry.columns].double()
        expected += (q / (d + DAMPING)) @ t.T
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    assert got.abs().max() > 0


def test_projected_scores_equal_an_explicit_kronecker_solve(new_run):
    model, optimizer = _trained(torch.optim.Adam, lr=1e-2)
    run, query = _log(new_run, model, rank=2, include_bias=True)
    run.add_optimizer_state(optimizer)
    got = run.compute_influence_all(query, hessian="optimizer", damping=DAMPING,
                                    progress=False)["influence"].double()
    _, train = run.reader().read_all()
    expected = torch.zeros(2, 10, dtype=torch.float64)
    for entry in run.layout():
        layer = model[int(entry.name)]
        v = torch.cat([optimizer.state[layer.weight]["exp_avg_sq"],
                       optimizer.state[layer.bias]["exp_avg_sq"][:, None]], 1).double()
        scale = v.mean() ** 0.25
        s_out, s_in = v.mean(1).sqrt() / scale, v.mean(0).sqrt() / scale
        p = run.projections[entry.name]
        p_out = torch.eye(len(s_out), dtype=torch.float64) if p.p_out is None else p.p_out.double()
        p_in = torch.eye(len(s_in), dtype=torch.float64) if p.p_in is None else p.p_in.double()
        h = torch.kron(p_out @ torch.diag(s_out) @ p_out.T, p_in @ torch.diag(s_in) @ p_in.T)
        inverse = torch.linalg.inv(h + DAMPING * torch.eye(len(h), dtype=torch.float64))
        q, t = query.grads[:, entry.columns].double(), train[:, entry.columns].double()
        expected += q @ inverse @ t.T
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=0)


def test_adafactor_moments_are_the_ones_its_update_divides_by():
    transformers = pytest.importorskip("transformers")
    from transformers.optimization import Adafactor

    from logix.tracking.modules import tracked_class

    model, optimizer = _trained(Adafactor, lr=1e-2, relative_step=False, scale_parameter=False,
                                warmup_init=False)
    layer = model[0]
    tracked = tracked_class(layer)("0", layer, False)
    v = second_moments({"0": tracked}, optimizer)["0"]
    state = optimizer.state[layer.weight]
    update_scale = Adafactor._approx_sq_grad(state["exp_avg_sq_row"], state["exp_avg_sq_col"])
    torch.testing.assert_close(v.rsqrt(), update_scale.double(), rtol=1e-5, atol=0)
    assert transformers is not None


def test_torch_adafactor_and_state_dicts(new_run):
    model, optimizer = _trained(torch.optim.Adafactor, lr=1e-2)
    run, query = _log(new_run, model)
    run.add_optimizer_state(optimizer)
    live = run.compute_influence_all(query, hessian="optimizer", progress=False)["influence"]
    saved = optimizer.state_dict()
    run.add_optimizer_state(saved, params=list(model.parameters()))
    again = run.compute_influence_all(query, hessian="optimizer", progress=False)["influence"]
    assert torch.equal(live, again)
    with pytest.raises(UsageError, match="pass params="):
        run.add_optimizer_state(saved)
    with pytest.raises(UsageError, match="not in the optimizer's order"):
        run.add_optimizer_state(saved, params=list(model.parameters())[::-1])
    sgd = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    sgd.step()
    with pytest.raises(UsageError, match="supported: Adam, AdamW and Adafactor"):
        run.add_optimizer_state(sgd)


def test_a_finalized_log_keeps_the_optimizer_state_for_a_new_process(new_run):
    model, optimizer = _trained(torch.optim.AdamW, lr=1e-2)
    run, query = _log(new_run, model, rank=2)
    run.add_optimizer_state(optimizer)
    want = run.compute_influence_all(query, hessian="optimizer", progress=False)["influence"]
    got = logix.Attributor(run.project_dir).compute_influence_all(
        query, hessian="optimizer", progress=False)["influence"]
    assert torch.equal(want, got)


def test_trainer_parameter_order_is_the_trainers(tmp_path):
    pytest.importorskip("transformers")
    from transformers import Trainer, TrainingArguments

    from conftest import make_tiny_gpt2

    model = make_tiny_gpt2()
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[],
                                                          use_cpu=True))
    trainer.create_optimizer()
    given = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    ours = trainer_parameter_order(model)
    assert len(given) == len(ours) and all(a is b for a, b in zip(given, ours))

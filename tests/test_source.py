"""SOURCE equals its closed form computed with explicit matrices (matrix_exp, eigh)."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

import logix
from logix.cli import main
from logix.storage.verify import verify

N, D_IN, D_HID, CLASSES = 12, 4, 5, 3


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, D_IN, generator=g), torch.randint(0, CLASSES, (N,), generator=g)


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, D_HID, bias=False), nn.Tanh(),
                         nn.Linear(D_HID, CLASSES, bias=False))


def per_example_grads(model, x, y):
    """{layer: [n, out, in]} by torch.func, independent of LogIX's hooks."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None], reduction="sum")

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return {"0": g["0.weight"], "2": g["2.weight"]}


def train_steps(model, x, y, steps, lr):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def log_checkpoints(tmp_path, plan, hessian_setup, rank=None):
    """plan: [(name, segment, lr, steps, train_ids)]; trains between checkpoints and logs each."""
    x, y = data()
    model = make_model()
    run = logix.init("source", root_dir=str(tmp_path), rank=rank)
    run.watch(model)
    if rank:
        run.add_lora()
    run.setup(hessian_setup)
    run.save(True)
    snapshots = {}
    for name, segment, lr, steps, train_ids in plan:
        train_steps(model, x, y, steps=3, lr=0.3)
        snapshots[name] = {k: v.clone() for k, v in model.state_dict().items()}
        members = list(range(N)) if train_ids is None else list(train_ids)
        with run.checkpoint(name, segment=segment, lr=lr, steps=steps, train_ids=train_ids):
            for start in range(0, len(members), 4):  # only the examples the segment trained on
                ids = members[start:start + 4]
                with run(data_id=ids):
                    F.cross_entropy(model(x[ids]), y[ids], reduction="sum").backward()
    run.finalize()
    train_steps(model, x, y, steps=3, lr=0.3)
    run.eval()
    with run(data_id=["q0", "q1"]):
        F.cross_entropy(model(x[:2]), y[:2], reduction="sum").backward()
    return run, model, snapshots, run.get_log(copy=True)


def explicit_source(model, snapshots, plan, query_grads, curvature):
    """sum_l 1/N_l (S_{l+1}..S_L q)^T F_r(H_l) g_l with dense per-layer matrices."""
    x, y = data()
    grads = {}
    for name, *_ in plan:
        model.load_state_dict(snapshots[name])
        grads[name] = {k: v.reshape(N, -1).double() for k, v in
                       per_example_grads(model, x, y).items()}
    segments = sorted({p[1] for p in plan}, reverse=True)
    total = torch.zeros(query_grads["0"].shape[0], N, dtype=torch.float64)
    for layer in ("0", "2"):
        q = query_grads[layer].reshape(query_grads[layer].shape[0], -1).double()
        for segment in segments:
            members = [p for p in plan if p[1] == segment]
            trained = members[0][4] if members[0][4] is not None else list(range(N))
            h = sum(curvature(grads[p[0]][layer][trained]) for p in members) / len(members)
            g = sum(grads[p[0]][layer] for p in members) / len(members)
            a = sum(p[2] * p[3] for p in members) / len(members)
            values, vectors = torch.linalg.eigh(h)
            values = values.clamp_min(0)
            f_r = torch.where(values * a < 1e-12, torch.full_like(values, a),
                              -torch.expm1(-a * values) / values.clamp_min(1e-300))
            mask = torch.zeros(N, dtype=torch.float64)
            mask[trained] = 1.0
            total += (q @ vectors @ torch.diag(f_r) @ vectors.T @ g.T) * mask / len(trained)
            q = q @ torch.linalg.matrix_exp(-a * h)
    return total


def raw_fisher(g):
    return g.T @ g / g.shape[0]


def query_grads_of(model):
    x, y = data()
    return per_example_grads(model, x[:2], y[:2])


def test_source_matches_closed_form_with_two_segments(tmp_path):
    plan = [("c0", 0, 0.1, 20, None), ("c1", 0, 0.1, 20, None),
            ("c2", 1, 0.05, 40, None), ("c3", 1, 0.05, 40, None)]
    run, model, snapshots, test = log_checkpoints(
        tmp_path, plan, {"grad": ["log", "covariance"]})
    result = run.compute_influence_all(test, method="source", hessian="raw", damping=0)
    expected = explicit_source(model, snapshots, plan, query_grads_of(model), raw_fisher)
    assert result["tgt_ids"] == list(range(N)) and result["influence"].shape == (2, N)
    torch.testing.assert_close(result["influence"].double(), expected, rtol=1e-4,
                               atol=1e-5 * expected.abs().max().item())
    assert [s["segment"] for s in result["segments"]] == [0, 1]


def test_examples_absent_from_a_segment_lose_exactly_its_contribution(tmp_path):
    plan = [("c0", 0, 0.1, 20, list(range(4, N))), ("c1", 1, 0.05, 40, None)]
    run, model, snapshots, test = log_checkpoints(
        tmp_path, plan, {"grad": ["log", "covariance"]})
    result = run.compute_influence_all(test, method="source", hessian="raw", damping=0)
    # Columns come in order of first appearance: ids 4.. (segment 0) before 0-3 (segment 1 only).
    got = result["influence"].double()[:, [result["tgt_ids"].index(i) for i in range(N)]]
    final_query = query_grads_of(model)  # explicit_source loads checkpoint weights into model
    expected = explicit_source(model, snapshots, plan, final_query, raw_fisher)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
    # Ids 0-3 only have the last segment's contribution: recompute with that segment alone.
    late_only = explicit_source(model, snapshots, plan[1:], final_query, raw_fisher)
    torch.testing.assert_close(got[:, :4], late_only[:, :4], rtol=1e-4,
                               atol=1e-5 * expected.abs().max().item())
    assert not torch.allclose(got[:, 4:], late_only[:, 4:])


def test_one_checkpoint_ekfac_matches_explicit_ekfac_spectrum(tmp_path):
    plan = [("only", 0, 0.2, 50, None)]
    setup = {"grad": ["log"], "forward": ["covariance"], "backward": ["covariance"]}
    run, model, snapshots, test = log_checkpoints(tmp_path, plan, setup, rank=3)
    result = run.compute_influence_all(test, method="source", hessian="ekfac",
                                       damping=0)["influence"]
    from logix.storage.reader import LogReader

    reader = LogReader(run.project_dir, checkpoint="only")
    _, rows = reader.read_all()
    tensors, _ = logix.storage.state.load_checkpoint_statistics(run.project_dir, "only")
    expected = torch.zeros(2, N, dtype=torch.float64)
    a = 0.2 * 50
    for m in run.layout():
        fwd = tensors[f"{m.name}::forward"] / tensors[f"{m.name}::forward::count"]
        bwd = tensors[f"{m.name}::backward"] / tensors[f"{m.name}::backward::count"]
        _, q_in = torch.linalg.eigh(fwd.double())
        _, q_out = torch.linalg.eigh(bwd.double())
        g = rows[:, m.columns].double()
        basis = torch.kron(q_out, q_in)
        sigma = ((g @ basis) ** 2).mean(0)  # corrected eigenvalues, row-major [out, in]
        f_r = -torch.expm1(-a * sigma) / sigma
        q = test.grads[:, m.columns].double()
        expected += q @ basis @ torch.diag(f_r) @ basis.T @ g.T / N
    torch.testing.assert_close(result.double(), expected, rtol=1e-4,
                               atol=1e-5 * expected.abs().max().item())


def test_small_steps_reduce_to_scaled_gradient_dot_products(tmp_path):
    """F_r(s) -> eta K as eta K s -> 0: SOURCE becomes (eta K / N) q . g (TracIn-like)."""
    plan = [("tiny", 0, 1e-9, 1, None)]
    run, model, snapshots, test = log_checkpoints(tmp_path, plan, {"grad": ["log", "covariance"]})
    result = run.compute_influence_all(test, method="source", hessian="raw",
                                       damping=0)["influence"]
    from logix.storage.reader import LogReader

    _, rows = LogReader(run.project_dir, checkpoint="tiny").read_all()
    expected = 1e-9 / N * test.grads.double() @ rows.double().T
    torch.testing.assert_close(result.double(), expected, rtol=1e-5, atol=0)


def test_checkpoint_bookkeeping_and_errors(tmp_path, capsys):
    plan = [("c0", 0, 0.1, 5, None)]
    run, model, _, test = log_checkpoints(tmp_path, plan, {"grad": ["log", "covariance"]})
    manifest = run.reader().manifest
    assert manifest.checkpoints["c0"] == {"segment": 0, "lr": 0.1, "steps": 5, "momentum": 0.0}
    assert all(s.checkpoint == "c0" for s in manifest.shards)
    assert manifest.rows == 0  # no plain rows: checkpoint rows are kept apart
    assert main(["verify", run.project_dir]) == 0 and main(["show", run.project_dir]) == 0
    assert f"0 rows, and {N} in SOURCE checkpoints" in capsys.readouterr().out
    top = run.compute_influence_all(test, method="source", hessian="raw", damping=0, topk=3)
    full = run.compute_influence_all(test, method="source", hessian="raw",
                                     damping=0)["influence"]
    torch.testing.assert_close(top["top_scores"], full.topk(3, dim=1).values)
    with pytest.raises(logix.UsageError, match="already in this log"):
        with run.checkpoint("c0", segment=0, lr=0.1, steps=5):
            pass
    with pytest.raises(logix.UsageError, match="momentum"):
        with run.checkpoint("c9", segment=0, lr=0.1, steps=5, momentum=1.0):
            pass
    with pytest.raises(logix.UsageError, match=r"segment 0 steps=2, but checkpoint 'c0' of that "
                                               r"segment gave steps=5"):
        with run.checkpoint("c1", segment=0, lr=0.1, steps=2):
            pass
    with pytest.raises(logix.UsageError, match="hessian"):
        run.compute_influence_all(test, method="source", hessian="none")
    for method, ignored in (("source", {"mode": "cosine"}), ("source", {"precondition": False}),
                            ("tracin", {"mode": "l2"}),
                            ("tracin", {"hessian": "kfac"}), ("tracin", {"damping": 0.1})):
        name, value = next(iter(ignored.items()))
        with pytest.raises(logix.UsageError, match=f"does not take {name}={value!r}"):
            run.compute_influence_all(test, method=method, **ignored)
    run.compute_influence_all(test, method="tracin", mode="dot", hessian="none")  # the defaults


def grad_run(tmp_path, **overrides):
    """(x, y, model, run): a run logging gradients and their covariance, saving."""
    x, y = data()
    model = make_model()
    run = logix.init("source", root_dir=str(tmp_path), **overrides)
    run.watch(model)
    run.setup({"grad": ["log", "covariance"]})
    return x, y, model, run.save(True)


def test_rows_outside_train_ids_are_refused(tmp_path):
    x, y, model, run = grad_run(tmp_path)
    with pytest.raises(logix.UsageError, match="outside them"):
        with run.checkpoint("c0", segment=0, lr=0.1, steps=5, train_ids=[0, 1, 2, 3]):
            with run(data_id=[2, 3, 4, 5]):
                F.cross_entropy(model(x[2:6]), y[2:6], reduction="sum").backward()


def test_a_failed_checkpoint_block_keeps_its_rows_out_of_the_plain_log(tmp_path):
    """Rows still buffered when an exception leaves a checkpoint block go to disk under its
    name (they were written untagged, as plain rows); the name cannot be reused."""
    x, y, model, run = grad_run(tmp_path, shard_rows=100)
    with pytest.raises(RuntimeError, match="interrupted"):
        with run.checkpoint("c0", segment=0, lr=0.1, steps=5):
            with run(data_id=[0, 1, 2, 3]):
                F.cross_entropy(model(x[:4]), y[:4], reduction="sum").backward()
            raise RuntimeError("interrupted")
    with run(data_id=[4, 5]):
        F.cross_entropy(model(x[4:6]), y[4:6], reduction="sum").backward()
    run.finalize()
    manifest = run.reader().manifest
    assert manifest.rows == 2 and manifest.checkpoints == {}
    assert [s.checkpoint for s in manifest.shards] == ["c0", None]
    assert run.reader().read_all()[0] == [4, 5]
    with pytest.raises(logix.UsageError, match="did not finish"):
        with run.checkpoint("c0", segment=0, lr=0.1, steps=5):
            pass
    report = verify(run.project_dir)
    assert report.ok and any("'c0', whose block did not finish" in w for w in report.warnings)


def test_an_empty_or_unsaved_checkpoint_block_is_named(tmp_path):
    x, y, model, run = grad_run(tmp_path)
    with run.checkpoint("c0", segment=0, lr=0.1, steps=5):
        with run(data_id=[0, 1]):
            F.cross_entropy(model(x[:2]), y[:2], reduction="sum").backward()
    with run.checkpoint("c1", segment=1, lr=0.1, steps=5):
        pass
    run.finalize()
    run.eval()
    with pytest.raises(logix.UsageError, match="does not save"):
        with run.checkpoint("c2", segment=2, lr=0.1, steps=5):
            pass
    with run(data_id=["q"]):
        F.cross_entropy(model(x[:1]), y[:1], reduction="sum").backward()
    with pytest.raises(logix.UsageError, match=r"logged no rows \(checkpoints \['c1'\]\)"):
        run.compute_influence_all(run.get_log(), method="source", hessian="raw", damping=0)

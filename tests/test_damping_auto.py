"""damping='auto' (the default) against a brute-force evaluation of its formula, lambda =
AUTO_FACTOR * ||H||_F / sqrt(d), with H built as an explicit matrix for every curvature kind and
for SOURCE's segments; the relative and absolute settings; the chosen values in meta; bad
settings refused."""

import pytest
import torch
from torch import nn

import logix
from conftest import log_classifier
from logix.errors import ConfigError, UsageError
from logix.influence import curvature
from logix.influence import damping as damping_rules
from logix.influence import lissa as lissa_module
from logix.statistics.covariance import BACKWARD, FORWARD
from logix.storage.reader import LogReader
from test_source import explicit_source, log_checkpoints, query_grads_of, raw_fisher

N = 30


def logged_run(tmp_path, rank=None, **config):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, 6, generator=g), torch.randint(0, 3, (N,), generator=g)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    run = logix.init("auto", root_dir=str(tmp_path), rank=rank, **config)
    run.watch(model)
    if rank:
        run.add_lora()
    run.setup({"grad": ["log", "covariance"], "forward": ["covariance"],
               "backward": ["covariance"]})
    return log_classifier(run, model, x, y, 5, 1.3)


def auto_of(h):
    """The auto rule evaluated on an explicit [d, d] curvature matrix."""
    return damping_rules.AUTO_FACTOR * float(torch.linalg.matrix_norm(h)) / h.shape[0] ** 0.5


def rows_fisher(run, module):
    _, rows = LogReader(run.project_dir).read_all()
    g = rows[:, module.columns].double()
    return g.T @ g / g.shape[0], g


def explicit_matrix(run, kind, module):
    """H of one module as a dense [d, d] matrix, built without the library's eigensolvers."""
    if kind in ("raw", "lissa"):
        return rows_fisher(run, module)[0]
    stats = run.statistics
    kfac = torch.kron(stats.get(module.name, BACKWARD).double(),
                      stats.get(module.name, FORWARD).double())
    if kind == "kfac":
        return kfac
    inverse = curvature.get("ekfac").spectrum(module.name, curvature.Spectra(stats))
    basis = torch.kron(inverse.q_out, inverse.q_in)
    return basis @ torch.diag(inverse.values.flatten()) @ basis.T


@pytest.mark.parametrize("rank", [None, 2])
@pytest.mark.parametrize("kind", ["raw", "kfac", "ekfac", "lissa"])
def test_auto_damping_is_the_formula_on_the_explicit_curvature(tmp_path, kind, rank):
    run, query = logged_run(tmp_path, rank, lissa_tol=1e-7, lissa_depth=20000)
    result = run.compute_influence_all(query, hessian=kind, progress=False)
    assert result["meta"]["damping_rule"] == "auto"
    chosen = result["meta"]["damping"]
    expected_scores = torch.zeros(len(query), N, dtype=torch.float64)
    for m in query.modules:
        h = explicit_matrix(run, kind, m)
        assert chosen[m.name] == pytest.approx(auto_of(h), rel=1e-6)
        assert chosen[m.name] > 0
        _, g = rows_fisher(run, m)
        q = query.grads[:, m.columns].double()
        expected_scores += q @ torch.linalg.solve(h + chosen[m.name] * torch.eye(m.dim,
                                                  dtype=torch.float64), g.T)
    torch.testing.assert_close(result["influence"].double(), expected_scores, rtol=1e-3,
                               atol=1e-3 * expected_scores.abs().max().item())


def test_none_has_no_damping_and_auto_keeps_every_mode(tmp_path):
    run, query = logged_run(tmp_path)
    assert run.compute_influence_all(query, hessian="none", progress=False)["meta"][
        "damping"] == {}
    dot = run.compute_influence_all(query, hessian="ekfac", progress=False)
    cosine = run.compute_influence_all(query, hessian="ekfac", mode="cosine", progress=False)
    assert dot["meta"]["damping"] == cosine["meta"]["damping"]  # a log's choice, any query


def test_relative_and_absolute_settings(tmp_path):
    run, query = logged_run(tmp_path)
    mean = {m.name: float(torch.diagonal(explicit_matrix(run, "raw", m)).mean())
            for m in query.modules}
    relative = run.compute_influence_all(query, hessian="raw", damping="relative",
                                         progress=False)["meta"]
    assert relative["damping_rule"] == "relative"
    assert relative["damping"] == pytest.approx({k: 0.1 * v for k, v in mean.items()})
    absolute = run.compute_influence_all(query, hessian="raw", damping=0.25, progress=False)
    assert absolute["meta"]["damping_rule"] == "absolute"
    assert set(absolute["meta"]["damping"].values()) == {0.25}
    # relative_damping set alone selects the relative rule (code written before auto keeps it)
    run.config.influence.relative_damping = 0.5
    half = run.compute_influence_all(query, hessian="raw", progress=False)["meta"]
    assert half["damping_rule"] == "relative"
    assert half["damping"] == pytest.approx({k: 0.5 * v for k, v in mean.items()})
    assert run.compute_influence_all(query, hessian="raw", damping="auto", progress=False)[
        "meta"]["damping_rule"] == "auto"


def test_lissa_estimates_the_squared_trace_of_wide_modules(tmp_path, monkeypatch):
    run, query = logged_run(tmp_path)
    exact = run.compute_influence_all(query, hessian="raw", progress=False)["meta"]["damping"]
    monkeypatch.setattr(lissa_module, "EXACT_DIM", 0)  # every module takes the estimate
    run.config.influence.lissa_depth = 1
    run.config.influence.lissa_tol = 1e9
    estimated = run.compute_influence_all(query, hessian="lissa", progress=False)
    for name, value in estimated["meta"]["damping"].items():
        assert value == pytest.approx(exact[name], rel=0.25)  # 64 Hutchinson probes


def test_source_damps_each_segment_by_the_formula(tmp_path):
    plan = [("c0", 0, 0.1, 20, None), ("c1", 1, 0.05, 40, None)]  # one checkpoint a segment
    run, model, snapshots, test = log_checkpoints(tmp_path, plan,
                                                  {"grad": ["log", "covariance"]})
    result = run.compute_influence_all(test, method="source", hessian="raw")
    meta = result["meta"]
    assert meta["damping_rule"] == "auto" and set(meta["damping"]) == {"0", "1"}
    chosen = sorted(v for segment in meta["damping"].values() for v in segment.values())
    brute = []

    def damped(g):  # each segment's curvature is its one checkpoint's Fisher, plus auto
        h = raw_fisher(g)
        brute.append(auto_of(h))
        return h + brute[-1] * torch.eye(h.shape[0], dtype=torch.float64)

    expected = explicit_source(model, snapshots, plan, query_grads_of(model), damped)
    assert chosen == pytest.approx(sorted(brute), rel=1e-5)
    torch.testing.assert_close(result["influence"].double(), expected, rtol=1e-4,
                               atol=1e-5 * expected.abs().max().item())
    undamped = run.compute_influence_all(test, method="source", hessian="raw", damping=0)
    assert not torch.allclose(undamped["influence"], result["influence"])


@pytest.mark.parametrize("bad", ["automatic", -1.0, float("inf"), True, [0.1]])
def test_bad_damping_settings_are_refused(bad):
    with pytest.raises(ConfigError, match="damping"):
        logix.load_config(influence={"damping": bad})


def test_bad_relative_damping_and_query_arguments_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="relative_damping"):
        logix.load_config(influence={"relative_damping": -0.1})
    run, query = logged_run(tmp_path)
    with pytest.raises(UsageError, match="damping"):
        run.compute_influence_all(query, hessian="raw", damping="big", progress=False)
    assert logix.load_config(influence={"damping": "relative"}).influence.damping == "relative"
    assert logix.load_config(influence={"damping": 1}).influence.damping == 1.0

"""The estimators' own entry points, their one result type (Scores), LogIX's compatibility names,
the run's mode and the module-level shortcuts."""

import ast
import inspect
import pathlib

import pytest
import torch
from torch.nn import functional as F

import logix
from conftest import make_mlp, seeded
from logix.errors import UsageError
from logix.mode import TRANSITIONS, Mode
from test_ensemble import logged_checkpoints


def equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    return a == b


def assert_same(a, b):
    assert type(a) is type(b) is logix.Scores
    assert equal(a, b)


def logged(new_run):
    model = make_mlp(seed=0)
    g = seeded(1)
    x, y = torch.randn(12, 6, generator=g), torch.randint(0, 3, (12,), generator=g)
    run = new_run(rank=2)
    run.watch(model)
    run.add_lora()
    run.setup({"grad": ["log", "covariance"]})
    run.save(True)
    for start in range(0, 12, 4):
        with run(data_id=list(range(start, start + 4))):
            F.cross_entropy(model(x[start:start + 4]), y[start:start + 4],
                            reduction="sum").backward()
    run.finalize()
    run.eval()
    with run(data_id=["q0", "q1"]):
        F.cross_entropy(model(x[:2]), y[:2], reduction="sum").backward()
    return run, run.get_log(copy=True)


def test_influence_entry_point_is_compute_influence_all(new_run, tmp_path):
    run, query = logged(new_run)
    a = run.influence
    for kwargs in ({}, {"mode": "cosine", "hessian": "raw"}, {"topk": 3},
                   {"influence_groups": "module"}):
        new = a.influence(query, progress=False, **kwargs)
        assert_same(new, run.compute_influence_all(query, progress=False, **kwargs))
    full = a.influence(query, progress=False)
    assert full.influence.shape == (2, 12) and full.src_ids == ["q0", "q1"]
    assert full.tgt_ids == list(range(12)) and full.meta["method"] == "influence"
    assert full.top_ids is None and full.path is None and not full.is_topk
    top = a.influence(query, topk=2, progress=False)
    assert top.is_topk and top.influence is None and len(top.top_ids[0]) == 2
    out = a.influence(query, out=str(tmp_path / "s.safetensors"), progress=False)
    assert isinstance(out, logix.Scores) and out.path.endswith("s.safetensors")
    assert dict(full)["influence"] is full["influence"]  # still LogIX's dict


def test_self_influence_uses_the_same_key_names(new_run):
    run, query = logged(new_run)
    mine = run.influence.self_influence(query)
    assert mine.src_ids == mine.tgt_ids == mine["ids"] == ["q0", "q1"]
    assert_same(mine, run.compute_self_influence(query))
    every = run.influence.self_influence(progress=False)
    assert every.influence.shape == (12,) and every["ids"] == every.tgt_ids


def test_checkpoint_estimators(tmp_path):
    run, queries = logged_checkpoints(tmp_path)
    a = logix.Attributor(run.project_dir)
    assert_same(a.tracin(queries, progress=False),
                a.compute_influence_all(queries, method="tracin", progress=False))
    assert_same(a.ensemble(queries, mode="cosine", progress=False),
                a.compute_influence_all(queries, method="ensemble", mode="cosine",
                                        progress=False))
    one = queries["c1"]
    assert_same(a.source(one, hessian="raw", topk=2),
                a.compute_influence_all(one, method="source", hessian="raw", topk=2))
    for method, name in (("source", "mode"), ("tracin", "hessian")):
        params = inspect.signature(getattr(a, method)).parameters
        assert name not in params  # each entry point takes only its own arguments
    with pytest.raises(UsageError, match="does not take"):
        a.compute_influence_all(one, method="tracin", hessian="kfac")


def test_mode_transitions(new_run):
    run, _ = logged(new_run)
    assert run.mode is Mode.QUERY and not run.saving
    run.save(True)
    assert run.mode is Mode.LOGGING
    run.finalize()
    assert run.mode is Mode.FINALIZED and run.finalized and run.saving
    with pytest.raises(UsageError, match="finalized mode"):
        run.start(data_id=[0])
    run.save(False)
    assert run.mode is Mode.SETUP
    run.eval()
    assert run.mode is Mode.QUERY and run.capture_spec == logix.run.QUERY_SPEC
    assert set(TRANSITIONS) == {"save(True)", "save(False)", "eval()", "finalize()"}


def test_shortcuts_are_listed_statically():
    """Each shortcut is an assignment in logix/__init__.py, named in __all__, with the run
    method's docstring."""
    source = pathlib.Path(logix.__file__).read_text()
    assigned = {t.id for node in ast.parse(source).body if isinstance(node, ast.Assign)
                for t in node.targets if isinstance(t, ast.Name)}
    shortcuts = [n for n in logix.__all__ if callable(getattr(logix.Run, n, None))
                 and not isinstance(getattr(logix, n), type)]
    assert len(shortcuts) == 17 and set(shortcuts) <= assigned
    for name in shortcuts:
        assert getattr(logix, name).__doc__ == getattr(logix.Run, name).__doc__


def test_scores_load_back_with_torch_load(new_run, tmp_path):
    """torch.load reads weights only by default: a saved result must still load (as Scores)."""
    run, query = logged(new_run)
    result = run.influence.influence(query, progress=False)
    torch.save(result, tmp_path / "result.pt")
    assert_same(torch.load(tmp_path / "result.pt"), result)

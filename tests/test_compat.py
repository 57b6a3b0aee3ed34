"""logix.compat: every older name still works, the ones this SDK renamed warn once
(DeprecationWarning), and LogIX 0.1's own names do not warn."""

import re
import warnings

import pytest
import torch
from torch.nn import functional as F

import logix
from logix import compat
from logix.errors import UsageError
from logix.influence.scoring import Scorer
from logix.statistics.eigen import EKFAC as EKFAC_STATISTIC
from logix.tracking.capture import CaptureSpec, spec_from_setup
from conftest import make_mlp, seeded
from test_query_api import logged


@pytest.fixture(autouse=True)
def _fresh_warnings():
    compat._warned.clear()
    yield
    compat._warned.clear()


def warns_once(old: str, call):
    """call() twice: the first warns that `old` is deprecated, the second says nothing."""
    with pytest.warns(DeprecationWarning, match=re.escape(old)):
        first = call()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        second = call()
    return first, second


def silent(call):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        return call()


@pytest.mark.parametrize("old, new", [("StepLog", logix.StepRows), ("Plan", CaptureSpec),
                                      ("plan_from_setup", spec_from_setup),
                                      ("ScorePlan", Scorer)])
def test_old_module_level_names(old, new):
    first, second = warns_once(old, lambda: getattr(compat, old))
    assert first is second is new
    compat._warned.clear()
    assert warns_once(old, lambda: getattr(logix, old))[0] is new
    with pytest.raises(AttributeError):
        compat.NoSuchName  # noqa: B018


def test_every_old_name_is_in_the_table():
    table = compat.__doc__
    for old in [*compat.RENAMED, "run.plan", "score_plan", "fit_ekfac", "clear=True",
                "build_log_dataloader", "compute_self_influence", "compute_influence_all",
                "patch_trainer", "LogIXArguments", "src_log=", "logix.huggingface",
                "logix.lightning"]:
        assert old in table, old


def test_run_plan_is_the_capture_spec(new_run):
    run = new_run()
    run.setup({"grad": ["log"], "forward": ["covariance"]})
    first, second = warns_once("run.plan", lambda: run.plan)
    assert first is second is run.capture_spec
    spec = CaptureSpec(log_grad=True)
    run.plan = spec
    assert run.capture_spec is spec


def test_add_lora_clear(new_run):
    run = new_run(rank=2)
    run.watch(torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)))
    with pytest.raises(UsageError, match="clear=False"):
        run.add_lora(clear=False)
    with pytest.warns(DeprecationWarning, match=re.escape("add_lora(clear=True)")):
        run.add_lora(clear=True)
    assert run.projection_meta["init"] == "random"
    silent(run.add_lora)


def test_old_attributor_names(new_run):
    run, query = logged(new_run)
    a = run.influence
    old, new = warns_once("Attributor.score_plan", lambda: a.score_plan(query, mode="cosine"))
    plan = a.scorer(query, mode="cosine")
    assert isinstance(old, Scorer) and old.mode == plan.mode == "cosine"
    rows = torch.randn(5, query.grads.shape[1], generator=torch.Generator().manual_seed(0))
    assert torch.equal(old.score(rows, plan.norms_of(rows)), plan.score(rows, plan.norms_of(rows)))
    assert torch.equal(
        silent(lambda: a.compute_self_influence(query, hessian="raw"))["influence"],
        a.self_influence(query, hessian="raw")["influence"])


def test_fit_ekfac_is_fit_ekfac(new_run):
    model, g = make_mlp(seed=0), seeded(1)
    x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    run = new_run(rank=2)
    run.watch(model).add_lora()
    run.setup({"grad": ["log"], "forward": ["covariance"], "backward": ["covariance"]})
    run.save(True)
    for start in (0, 4):
        with run(data_id=list(range(start, start + 4))):
            F.cross_entropy(model(x[start:start + 4]), y[start:start + 4],
                            reduction="sum").backward()
    run.finalize()
    fresh, again = logix.Attributor(run.project_dir), logix.Attributor(run.project_dir)
    fresh.statistics.drop(EKFAC_STATISTIC)  # finalize() fitted them
    assert not fresh.statistics.has(EKFAC_STATISTIC)
    warns_once("Attributor.fit_ekfac()", lambda: fresh.fit_ekfac(progress=False))
    assert fresh.statistics.has(EKFAC_STATISTIC)
    again.fit("ekfac", progress=False)
    mine, theirs = fresh.statistics.state_dict(), again.statistics.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)


def test_logix_names_do_not_warn(new_run):
    run, query = logged(new_run)
    blocks = silent(lambda: list(run.build_log_dataloader(batch_size=5)))
    assert [len(ids) for ids, _ in blocks] == [5, 5, 2]
    ids, rows = run.reader().read_all()
    assert [i for block, _ in blocks for i in block] == ids
    assert torch.equal(torch.cat([r for _, r in blocks]), rows)
    assert torch.equal(silent(lambda: run.compute_influence_all(query, progress=False))
                       ["influence"], run.influence.influence(query, progress=False)["influence"])
    assert torch.equal(silent(lambda: logix.compute_self_influence(query))["influence"],
                       run.influence.self_influence(query)["influence"])


def test_search_takes_query_and_src_log(new_run):
    run, query = logged(new_run)
    exact = run.search(query=query, k=3, fallback=True)
    assert len(exact["top_ids"][0]) == 3
    old, _ = warns_once("search(src_log=...)", lambda: run.search(src_log=query, k=3))
    assert old["top_ids"] == exact["top_ids"]
    assert torch.equal(torch.as_tensor(old["top_scores"]), torch.as_tensor(exact["top_scores"]))
    assert run.search(k=3)["top_ids"] == exact["top_ids"]  # no query: the last step
    with pytest.raises(UsageError, match="query= only"):
        run.search(query=query, src_log=query)


def test_old_integration_modules_are_the_integrations():
    pytest.importorskip("transformers")
    pytest.importorskip("lightning")
    import logix.huggingface as old_hf
    import logix.lightning as old_pl
    from logix.integrations import huggingface, lightning

    for old, new in ((old_hf, huggingface), (old_pl, lightning)):
        assert old.__all__ == new.__all__
        assert all(getattr(old, name) is getattr(new, name) for name in new.__all__)
    assert {"patch_trainer", "LogIXArguments"} <= set(old_hf.__all__)
    assert {"patch", "LogIXArguments"} <= set(old_pl.__all__)

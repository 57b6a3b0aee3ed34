"""LogIXScheduler: its passes do exactly what the equivalent manual sequence of calls does."""

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import logix
from logix.errors import ConfigError, UsageError
from logix.scheduler import LogIXScheduler


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def make_batches(n_batches=4, batch=5, seed=1, first_id=0):
    g = torch.Generator().manual_seed(seed)
    return [(list(range(first_id + i * batch, first_id + (i + 1) * batch)),
             torch.randn(batch, 6, generator=g),
             torch.randint(0, 3, (batch,), generator=g)) for i in range(n_batches)]


def one_pass(run, model, batches):
    for ids, x, y in batches:
        with run(data_id=ids):
            F.cross_entropy(model(x), y, reduction="sum").backward()
    model.zero_grad()


def new_run(tmp_path, name, model):
    run = logix.init(name, root_dir=str(tmp_path), lora={"rank": 3})
    run.watch(model)
    return run


def saved(run):
    ids, rows = run.reader().read_all()
    statistics = run.statistics.state_dict()
    return ids, rows, statistics


def test_pca_ekfac_matches_the_manual_sequence(tmp_path):
    model, batches = make_model(), make_batches()

    manual = new_run(tmp_path, "manual", model)
    manual.setup({"forward": ["covariance"], "backward": ["covariance"]})
    one_pass(manual, model, batches)
    manual.add_lora(init="pca")
    manual.setup({"grad": ["log"], "forward": ["covariance"], "backward": ["covariance"]})
    manual.save(True)
    one_pass(manual, model, batches)
    manual.finalize()
    manual.save(False)

    scheduled = new_run(tmp_path, "scheduled", model)
    scheduler = LogIXScheduler(scheduled, lora="pca", hessian="ekfac", save="grad")
    assert len(scheduler) == 2
    passes = []
    for index in scheduler:
        passes.append(index)
        one_pass(scheduled, model, batches)
    assert passes == [0, 1]

    m_ids, m_rows, m_stats = saved(manual)
    s_ids, s_rows, s_stats = saved(scheduled)
    assert len(s_ids) == 20 and s_ids == m_ids
    assert torch.equal(s_rows, m_rows)
    assert sorted(s_stats) == sorted(m_stats) and s_stats
    assert any(key.endswith("::forward") for key in s_stats)
    assert any(key.endswith("::backward") for key in s_stats)
    for key in m_stats:
        assert torch.equal(s_stats[key], m_stats[key]), key
    assert scheduled.projection_meta["init"] == "pca"
    assert manual.projections["2"].p_out is None  # 3 outputs at rank 3: the identity
    for name, p in manual.projections.items():
        for side in ("p_in", "p_out"):
            mine, theirs = getattr(p, side), getattr(scheduled.projections[name], side)
            assert (mine is None and theirs is None) or torch.equal(theirs, mine), (name, side)
    for run in (manual, scheduled):
        with open(os.path.join(run.project_dir, "state", "statistics.safetensors"), "rb") as f:
            on_disk = f.read()
        assert on_disk, "finalize saved the statistics"

    # saving was on for the logging pass only: later steps (new ids) are not written
    one_pass(scheduled, model, make_batches(1, first_id=100))
    scheduled.flush()
    assert scheduled.reader().rows == 20
    assert list(scheduler) == []  # exhausted for good; no second finalize pass


@pytest.mark.parametrize("lora,hessian,save,plans", [
    ("none", "none", "grad", [{"grad"}]),
    ("random", "raw", "grad", [{"grad"}]),
    ("random", "raw", "none", [{"grad"}]),
    ("none", "kfac", "none", [{"forward", "backward"}]),
    ("pca", "kfac", "grad", [{"forward", "backward"}, {"grad", "forward", "backward"}]),
])
def test_each_pass_collects_what_its_choices_need(tmp_path, lora, hessian, save, plans):
    model, batches = make_model(), make_batches(2)
    run = new_run(tmp_path, "p", model)
    scheduler = LogIXScheduler(run, lora=lora, hessian=hessian, save=save)
    seen = []
    for _ in scheduler:
        plan = run.capture_spec
        seen.append({stage for stage, on in (("grad", plan.log_grad or plan.grad_covariance),
                                             ("forward", plan.forward_covariance),
                                             ("backward", plan.backward_covariance)) if on})
        one_pass(run, model, batches)
    assert seen == plans
    assert run.projection_meta["init"] == lora
    assert run.capture_spec.grad_covariance == (hessian == "raw")
    assert run.capture_spec.log_grad == (save == "grad")
    rows = run.reader().rows if os.path.isfile(os.path.join(run.project_dir, "manifest.json")) \
        else 0
    assert rows == (10 if save == "grad" else 0)


def test_saving_is_restored_to_what_it_was(tmp_path):
    model, batches = make_model(), make_batches(1)
    run = new_run(tmp_path, "p", model)
    run.save(True)
    for _ in LogIXScheduler(run, save="grad"):
        one_pass(run, model, batches)
    assert run.saving  # as the user had it, but the scheduler finalized the log: a later step
    with pytest.raises(UsageError, match=r"finalize\(\) closed this training log.*run.eval\(\)"):
        one_pass(run, model, make_batches(1, first_id=100))  # a forgotten run.eval() for a query
    run.eval()
    one_pass(run, model, make_batches(1, first_id=100))
    assert run.reader().rows == 5
    run.setup({"grad": ["log"]}).save(True)  # more training rows, said explicitly
    one_pass(run, model, make_batches(1, first_id=100))
    run.flush()
    assert run.reader().rows == 10


def test_invalid_choices_are_refused():
    run = logix.init("p")
    with pytest.raises(ConfigError, match="allowed values"):
        LogIXScheduler(run, hessian="diag")
    with pytest.raises(ConfigError, match="allowed values"):
        LogIXScheduler(run, lora="svd")
    with pytest.raises(ConfigError, match="save='grad'"):
        LogIXScheduler(run, hessian="ekfac", save="none")
    with pytest.raises(UsageError, match="watch"):
        next(iter(LogIXScheduler(run)))


def test_the_declared_curvature_is_what_a_plain_query_uses(tmp_path):
    """After LogIXScheduler(hessian="kfac") the saved rows would let `auto` pick EK-FAC; the
    declared K-FAC is used instead, here and in a new run that reopens the log."""
    model, batches = make_model(), make_batches()
    run = new_run(tmp_path, "declared", model)
    for _ in LogIXScheduler(run, lora="random", hessian="kfac", save="grad"):
        one_pass(run, model, batches)
    assert "ekfac" in run.influence.available_hessians()
    ids, x, y = batches[0]
    run.eval()
    with run(data_id=["q0", "q1"]):
        F.cross_entropy(model(x[:2]), y[:2], reduction="sum").backward()
    query = run.get_log(copy=True)

    result = run.compute_influence_all(query, progress=False)
    kfac = run.compute_influence_all(query, hessian="kfac", progress=False)
    ekfac = run.compute_influence_all(query, hessian="ekfac", progress=False)
    assert result["meta"]["hessian"] == "kfac" and ekfac["meta"]["hessian"] == "ekfac"
    assert torch.equal(result["influence"], kfac["influence"])
    assert not torch.allclose(result["influence"], ekfac["influence"])
    assert set(result["meta"]["damping"]) == {"0", "2"}
    assert result["meta"]["mode"] == "dot"
    assert result["meta"]["projection"]["init"] == "random"

    reopened = logix.init("declared", root_dir=str(tmp_path), lora={"rank": 3})
    reopened.watch(model)
    reopened.initialize_from_log()
    again = reopened.compute_influence_all(query, progress=False)
    assert again["meta"]["hessian"] == "kfac"
    assert torch.equal(again["influence"], result["influence"])


def test_an_argument_overrides_the_declared_curvature_and_score_files_keep_meta(tmp_path):
    from logix.storage.scores import load_scores

    model, batches = make_model(), make_batches()
    run = new_run(tmp_path, "meta", model)
    for _ in LogIXScheduler(run, lora="random", hessian="raw", save="grad"):
        one_pass(run, model, batches)
    run.eval()
    ids, x, y = batches[1]
    with run(data_id=["q"]):
        F.cross_entropy(model(x[:1]), y[:1], reduction="sum").backward()
    path = str(tmp_path / "scores.safetensors")
    written = run.compute_influence_all(hessian="none", mode="cosine", out=path, progress=False)
    assert written["meta"]["hessian"] == "none" and written["meta"]["mode"] == "cosine"
    meta = load_scores(path)["meta"]
    assert meta["hessian"] == "none" and meta["mode"] == "cosine"
    assert meta["projection"]["checksum"] == run.projection_meta["checksum"]
    top = run.compute_influence_all(topk=2, progress=False)
    assert top["meta"]["hessian"] == "raw"

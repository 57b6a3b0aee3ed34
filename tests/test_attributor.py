"""logix.Attributor scores a saved log without the model or a Run: in a new process it gives the
bits the Run that wrote the log gives, for every curvature, mode, full matrix and top-k."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import logix
from logix.errors import UsageError
from logix.log import StepRows

HESSIANS = ["none", "raw", "kfac", "ekfac"]
MODES = ["dot", "cosine", "l2"]


def logged_run(root, project="train"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 6, generator=g), torch.randint(0, 4, (40,), generator=g)
    run = logix.init(project, root_dir=str(root), rank=3, shard_rows=16)
    run.watch(model)
    run.add_lora()
    run.setup({"grad": ["log", "covariance"], "forward": ["covariance"],
               "backward": ["covariance"]})
    run.save(True)
    for start in range(0, 40, 8):
        ids = list(range(start, start + 8))
        with run(data_id=ids):
            F.cross_entropy(model(x[ids]), y[ids], reduction="sum").backward()
    run.finalize()
    run.eval()
    with run(data_id=["q0", "q1", "q2"]):
        F.cross_entropy(model(x[:3] + 0.5), y[:3], reduction="sum").backward()
    return run, run.get_log(copy=True)


def every_result(scorer, query):
    out = {}
    for hessian in HESSIANS:
        for mode in MODES:
            full = scorer.compute_influence_all(query, hessian=hessian, mode=mode, progress=False)
            top = scorer.compute_influence_all(query, hessian=hessian, mode=mode, topk=4,
                                               progress=False)
            out[f"{hessian}-{mode}"] = full["influence"]
            out[f"{hessian}-{mode}-top"] = top["top_scores"]
            out[f"{hessian}-{mode}-bottom"] = top["bottom_scores"]
        out[f"{hessian}-self"] = scorer.compute_self_influence(hessian=hessian,
                                                               progress=False)["influence"]
    return out


def test_a_new_process_scores_a_saved_log_bit_identically(tmp_path):
    run, query = logged_run(tmp_path)
    expected = every_result(run, query)
    query_file = query.save(tmp_path / "query.safetensors")
    script = textwrap.dedent(f"""
        import sys, torch, logix
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_attributor import every_result
        attributor = logix.Attributor({run.project_dir!r})
        torch.save(every_result(attributor, {query_file!r}), {str(tmp_path / 'out.pt')!r})
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    actual = torch.load(tmp_path / "out.pt", weights_only=True)
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert value.numel() > 0
        assert torch.equal(actual[key], value), key


def test_queries_from_a_file_or_a_logged_query_project(tmp_path):
    run, query = logged_run(tmp_path)
    attributor = logix.Attributor(run.project_dir)
    from_memory = attributor.compute_influence_all(query, progress=False)
    loaded = StepRows.load(query.save(tmp_path / "q.safetensors"))
    assert loaded.data_ids == ["q0", "q1", "q2"] and torch.equal(loaded.grads, query.grads)
    assert torch.equal(attributor.compute_influence_all(loaded, progress=False)["influence"],
                       from_memory["influence"])
    # every row of a training log as a query: its self-scores sit on the diagonal
    as_queries = attributor.compute_influence_all(run.project_dir, hessian="raw", progress=False)
    self_scores = attributor.compute_self_influence(hessian="raw", progress=False)["influence"]
    torch.testing.assert_close(torch.diagonal(as_queries["influence"]), self_scores,
                               rtol=1e-4, atol=1e-6)
    assert from_memory["meta"]["hessian"] == "ekfac"  # auto: the best the statistics allow


def test_bad_inputs_are_named(tmp_path):
    run, query = logged_run(tmp_path)
    with pytest.raises(UsageError, match="no LogIX log"):
        logix.Attributor(tmp_path / "nowhere")
    attributor = logix.Attributor(run.project_dir)
    with pytest.raises(UsageError, match="Pass the query log"):
        attributor.compute_influence_all(None)
    with pytest.raises(UsageError, match="does not exist"):
        attributor.compute_influence_all(str(tmp_path / "missing.safetensors"))
    not_a_log = tmp_path / "scores.safetensors"
    run.compute_influence_all(query, out=str(not_a_log), progress=False)
    with pytest.raises(UsageError, match="not a saved StepRows"):
        attributor.compute_influence_all(str(not_a_log))
    with pytest.raises(UsageError, match="config must be"):
        logix.Attributor(run.project_dir, config={"hessian": "raw"})


def test_an_unfinalized_log_warns_that_only_plain_dot_products_are_possible(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    run = logix.init("open", root_dir=str(tmp_path))
    run.watch(model).setup({"grad": ["log", "covariance"]}).save(True)
    with run(data_id=[0, 1]):
        model(torch.randn(2, 4)).pow(2).sum().backward()
    run.flush()  # rows on disk, no finalize: no statistics saved
    with pytest.warns(UserWarning, match="no saved statistics.*finalize"):
        attributor = logix.Attributor(run.project_dir)
    assert not {"raw", "kfac", "ekfac"} & set(attributor.available_hessians())


def test_score_files_keep_the_results_meta_and_logix_text_is_reachable(tmp_path):
    from logix.storage.scores import load_scores, save_scores

    run, query = logged_run(tmp_path)
    result = run.compute_influence_all(query, hessian="kfac", progress=False)
    path = save_scores(str(tmp_path / "s.safetensors"), result, meta={"project": "train"})
    meta = load_scores(path)["meta"]
    assert meta["hessian"] == "kfac" and meta["project"] == "train"
    assert meta["damping"] == result["meta"]["damping"]
    assert callable(logix.text.query_log)

"""Vector search (logix.index): a flat index with exact re-ranking returns exactly the streaming
top-k; approximate kinds return exact scores; stale indexes are refused; bad inputs are named."""

import json
import os
import shutil

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import logix
from logix import cli
from logix.errors import LogFormatError, UsageError
from logix.index import store

pytest.importorskip("faiss")

N_TRAIN = 400


def log_project(root, project="train", rank=3, seed=0, steps=(0, N_TRAIN), run=None, model=None):
    """A small MLP logged in shards of 64 rows; returns (run, model, query log)."""
    if run is None:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
        run = logix.init(project, root_dir=str(root), rank=rank, shard_rows=64)
        run.watch(model)
        run.add_lora()
        run.setup({"grad": ["log", "covariance"], "forward": ["covariance"],
                   "backward": ["covariance"]})
        run.save(True)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(N_TRAIN, 6, generator=g), torch.randint(0, 4, (N_TRAIN,), generator=g)
    for start in range(steps[0], steps[1], 40):
        ids = list(range(start, start + 40))
        with run(data_id=ids):
            F.cross_entropy(model(x[ids]), y[ids], reduction="sum").backward()
    return run, model, x, y


def finalize_with_query(run, model, x, y):
    run.finalize()
    run.eval()
    with run(data_id=[f"q{i}" for i in range(5)]):
        F.cross_entropy(model(x[:5] * 1.5), y[:5], reduction="sum").backward()
    return run.get_log(copy=True)


@pytest.fixture
def logged(tmp_path):
    run, model, x, y = log_project(tmp_path)
    query = finalize_with_query(run, model, x, y)
    return logix.Attributor(run.project_dir), query


def exact(att, query, k, **kw):
    return att.compute_influence_all(query, topk=k, progress=False, **kw)


@pytest.mark.parametrize("hessian", ["none", "raw", "kfac", "ekfac"])
def test_flat_index_with_rerank_returns_exactly_the_streaming_topk(logged, hessian):
    att, query = logged
    att.build_index("flat", progress=False)
    want = exact(att, query, 7, hessian=hessian)
    got = att.search(query, k=7, candidates=20, bottom=True, hessian=hessian)
    assert len(got["top_ids"]) == 5 and all(len(ids) == 7 for ids in got["top_ids"])
    for side in ("top", "bottom"):
        assert got[f"{side}_ids"] == want[f"{side}_ids"]
        assert torch.equal(got[f"{side}_scores"], want[f"{side}_scores"])
    assert got["meta"]["search"]["index"] == "flat-dot"
    assert got["meta"]["hessian"] == want["meta"]["hessian"]


def test_cosine_index_serves_its_curvature_exactly_and_falls_back_for_another(logged):
    att, query = logged
    att.build_index("flat", mode="cosine", hessian="ekfac", progress=False)
    want = exact(att, query, 5, hessian="ekfac", mode="cosine")
    got = att.search(query, k=5, candidates=20, hessian="ekfac", mode="cosine")
    assert got["top_ids"] == want["top_ids"]
    assert torch.equal(got["top_scores"], want["top_scores"])
    with pytest.warns(UserWarning, match="no index for mode 'cosine'.*kfac"):
        other = att.search(query, k=5, hessian="kfac", mode="cosine")
    assert other["meta"]["search"]["exact"] is True
    assert other["top_ids"] == exact(att, query, 5, hessian="kfac", mode="cosine")["top_ids"]


@pytest.mark.parametrize("options", [
    {"kind": "ivf"}, {"kind": "ivf", "quantize": "sq8"}, {"kind": "ivf", "quantize": "pq"},
    {"kind": "hnsw"}, {"kind": "hnsw", "quantize": "sq8"}, {"kind": "flat", "sketch": 8},
    {"kind": "flat", "quantize": "pq"}])
def test_approximate_kinds_give_exact_scores_of_their_candidates(logged, options):
    att, query = logged
    m = att.build_index(progress=False, **options)
    assert m.rows == N_TRAIN and m.bytes > 0
    want = exact(att, query, 5, hessian="kfac")
    full = att.compute_influence_all(query, hessian="kfac", progress=False)
    column = {tid: i for i, tid in enumerate(full["tgt_ids"])}
    got = att.search(query, k=5, candidates=40, hessian="kfac")
    for q, ids in enumerate(got["top_ids"]):  # each returned score is that row's exact score
        exact_scores = full["influence"][q, [column[i] for i in ids]]
        assert torch.equal(got["top_scores"][q], exact_scores)
    # with every row a candidate, any index finds the exact top-k
    everything = att.search(query, k=5, candidates=N_TRAIN, hessian="kfac", nprobe=10_000)
    assert everything["top_ids"] == want["top_ids"]


def test_without_rerank_an_unsketched_flat_index_gives_the_scores_up_to_roundoff(logged):
    att, query = logged
    att.build_index("flat", progress=False)
    want = exact(att, query, 5, hessian="ekfac")
    got = att.search(query, k=5, rerank=False, hessian="ekfac")
    assert got["top_ids"] == want["top_ids"]
    torch.testing.assert_close(got["top_scores"], want["top_scores"], rtol=1e-4, atol=1e-6)


def test_incremental_update_reads_only_new_shards_and_matches_a_fresh_build(tmp_path,
                                                                            monkeypatch):
    run, model, x, y = log_project(tmp_path, steps=(0, 200))
    run.flush()
    att = run.influence
    first = att.build_index("flat", progress=False)
    assert 0 < first.rows < N_TRAIN
    log_project(tmp_path, run=run, model=model, steps=(200, N_TRAIN))
    query = finalize_with_query(run, model, x, y)
    att = logix.Attributor(run.project_dir)
    with pytest.raises(UsageError, match="behind|logged after it was built"):
        att.search(query, k=5)
    read = []
    original = logix.storage.reader.LogReader.fixed_blocks

    def spy(self, block_rows, shards=None, prefetch=2):
        read.extend(s.file for s in shards or self.shards)
        return original(self, block_rows, shards, prefetch)

    monkeypatch.setattr(logix.storage.reader.LogReader, "fixed_blocks", spy)
    second = att.build_index("flat", progress=False)
    monkeypatch.undo()
    held = {s["file"] for s in first.shards}
    assert read and not held & set(read)  # only the shards logged since the first build
    assert second.rows == N_TRAIN
    got = att.search(query, k=5, candidates=20, bottom=True)
    want = exact(att, query, 5)
    assert got["top_ids"] == want["top_ids"] and got["bottom_ids"] == want["bottom_ids"]


def test_a_stale_index_is_refused_then_rebuilt(tmp_path):
    run, model, x, y = log_project(tmp_path)
    finalize_with_query(run, model, x, y)
    logix.Attributor(run.project_dir).build_index("flat", progress=False)
    shutil.rmtree(os.path.join(run.project_dir, "logs"))  # the log is written again, new data
    os.remove(os.path.join(run.project_dir, "manifest.json"))
    run, model, x, y = log_project(tmp_path, seed=5)
    query = finalize_with_query(run, model, x, y)
    att = logix.Attributor(run.project_dir)
    with pytest.raises(UsageError, match="flat-dot.*stale.*changed"):
        att.search(query, k=5)
    with pytest.warns(UserWarning, match="Rebuilding index 'flat-dot'"):
        att.build_index("flat", progress=False)
    assert att.search(query, k=5, candidates=20)["top_ids"] == exact(att, query, 5)["top_ids"]


def test_a_shard_corrupted_after_indexing_is_refused_not_scored(tmp_path):
    """The index's manifest still matches the log's, but the bytes changed: the exact
    re-ranking reads verified rows only, as every other reader does."""
    run, model, x, y = log_project(tmp_path)
    query = finalize_with_query(run, model, x, y)
    att = logix.Attributor(run.project_dir)
    att.build_index("flat", progress=False)
    shard = os.path.join(run.project_dir, att.reader().shards[0].file)
    with open(shard, "r+b") as f:
        f.seek(-16, os.SEEK_END)
        f.write(b"\x7f" * 16)
    with pytest.raises(LogFormatError, match="corrupt"):
        att.search(query, k=5)


def test_search_prefers_an_exact_index_to_a_newer_approximate_one(logged):
    att, query = logged
    att.build_index("flat", progress=False)
    att.build_index("ivf", progress=False)
    assert att.search(query, k=3)["meta"]["search"]["index"] == "flat-dot"
    assert att.search(query, k=3, index="ivf-dot")["meta"]["search"]["index"] == "ivf-dot"


def test_an_index_built_for_another_layout_is_refused(logged):
    att, query = logged
    att.build_index("flat", progress=False)
    m = store.load(att.project_dir, "flat-dot")
    m.layout = {**m.layout, "modules": [["other", 2, 2]], "projection": "another-seed"}
    store.save(att.project_dir, m)
    with pytest.raises(UsageError, match="flat-dot.*another row layout or projection"):
        att.search(query, k=3)


def test_bad_inputs_are_named(logged, tmp_path):
    att, query = logged
    att.build_index("flat", progress=False)
    with pytest.raises(UsageError, match=f"k=401 is larger than the log.*{N_TRAIN} rows"):
        att.search(query, k=N_TRAIN + 1)
    with pytest.raises(UsageError, match="k must be a positive integer"):
        att.search(query, k=0)
    with pytest.raises(UsageError, match="mode='l2' is not served"):
        att.search(query, k=3, mode="l2")
    with pytest.raises(UsageError, match="no index named 'nope'"):
        att.search(query, k=3, index="nope")
    with pytest.raises(UsageError, match="kind='tree' is not supported"):
        att.build_index("tree", progress=False)
    with pytest.raises(UsageError, match="sketch=0 must be an integer"):
        att.build_index("flat", sketch=0, progress=False)
    with pytest.raises(UsageError, match="quantize='int4' is not supported"):
        att.build_index("flat", quantize="int4", progress=False)
    other = logix.StepLog(query.data_ids, query.grads[:, :-1], query.modules[:1],
                          query.projection)
    with pytest.raises(UsageError, match="modules/ranks"):
        att.search(other, k=3)


def test_an_empty_log_is_refused(tmp_path):
    model = nn.Linear(3, 2)
    run = logix.init("empty", root_dir=str(tmp_path))
    run.watch(model)
    run.setup({"grad": ["log"]})
    run.save(True)
    run.finalize()
    att = logix.Attributor(run.project_dir)
    with pytest.raises(UsageError, match="no logged rows to index"):
        att.build_index(progress=False)
    query = logix.StepLog(["q"], torch.zeros(1, 6), att.modules(),
                          dict(att.reader().manifest.projection))
    with pytest.raises(UsageError, match="no logged rows to search"):
        att.search(query, k=1)


def test_without_faiss_build_is_refused_and_search_falls_back_to_the_exact_stream(
        logged, monkeypatch):
    att, query = logged
    monkeypatch.setitem(__import__("sys").modules, "faiss", None)  # import faiss fails
    with pytest.raises(UsageError, match=r'pip install "logix\[search\]"'):
        att.build_index(progress=False)
    with pytest.warns(UserWarning, match="FAISS is not installed.*exact streaming top-k"):
        got = att.search(query, k=4, bottom=True)
    want = exact(att, query, 4)
    assert got["top_ids"] == want["top_ids"] and got["bottom_ids"] == want["bottom_ids"]
    with pytest.warns(UserWarning):
        assert "bottom_ids" not in att.search(query, k=4)


def test_run_search_and_cli_index_search_show(tmp_path, capsys):
    run, model, x, y = log_project(tmp_path)
    query = finalize_with_query(run, model, x, y)
    queries = str(tmp_path / "queries.safetensors")
    query.save(queries)
    assert cli.main(["index", run.project_dir, "--kind", "flat"]) == 0
    assert "flat-dot" in capsys.readouterr().out
    assert run.search(query, k=3)["top_ids"] == exact(run.influence, query, 3)["top_ids"]
    assert cli.main(["search", run.project_dir, "--queries", queries, "--k", "3", "--bottom",
                     "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    want = exact(run.influence, query, 3)
    assert [[e["id"] for e in q["top"]] for q in printed["queries"]] == want["top_ids"]
    assert [[e["id"] for e in q["bottom"]] for q in printed["queries"]] == want["bottom_ids"]
    assert cli.main(["search", run.project_dir, "--queries", queries, "--k", "2"]) == 0
    assert "most helpful" in capsys.readouterr().out
    assert cli.main(["show", run.project_dir, "--json"]) == 0
    indexes = json.loads(capsys.readouterr().out)["indexes"]
    assert [(i["name"], i["state"], i["rows"]) for i in indexes] == [("flat-dot", "fresh",
                                                                       N_TRAIN)]
    assert cli.main(["show", run.project_dir]) == 0
    assert "flat-dot" in capsys.readouterr().out
    assert cli.main(["search", run.project_dir, "--queries", queries, "--k", "999"]) == 2
    assert "larger than the log" in capsys.readouterr().err

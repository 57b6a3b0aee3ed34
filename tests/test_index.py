"""Vector search (logix.index): a flat index with exact re-ranking returns exactly the streaming
top-k; approximate kinds return exact scores; stale indexes are refused; bad inputs are named."""

import json
import os
import shutil
import subprocess
import sys

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
RANK_WORKER = os.path.join(os.path.dirname(__file__), "workers", "index_search.py")


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


def assert_stream_scores(got, want):
    """A batch's re-ranked scores: the stream's to float32 round-off (they are summed in
    another order than the stream's fixed-shape GEMMs; a single query's carry its bits)."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


def test_stream_scores_closeness_fails_on_a_changed_score(logged):
    att, query = logged
    att.build_index("flat", progress=False)
    got = att.search(query, k=5, candidates=20, hessian="kfac")["top_scores"]
    want = exact(att, query, 5, hessian="kfac")["top_scores"]
    assert_stream_scores(got, want)
    changed = got.clone()
    changed[2, 3] *= 1 + 1e-4  # one row's score off by more than round-off
    with pytest.raises(AssertionError):
        assert_stream_scores(changed, want)


@pytest.mark.parametrize("hessian", ["none", "raw", "kfac", "ekfac"])
def test_flat_index_with_rerank_returns_exactly_the_streaming_topk(logged, hessian):
    att, query = logged
    att.build_index("flat", progress=False)
    want = exact(att, query, 7, hessian=hessian)
    got = att.search(query, k=7, candidates=20, bottom=True, hessian=hessian)
    assert len(got["top_ids"]) == 5 and all(len(ids) == 7 for ids in got["top_ids"])
    for side in ("top", "bottom"):
        assert got[f"{side}_ids"] == want[f"{side}_ids"]
        assert_stream_scores(got[f"{side}_scores"], want[f"{side}_scores"])
    assert got["meta"]["search"]["index"] == "flat-dot"
    assert got["meta"]["hessian"] == want["meta"]["hessian"]


def test_cosine_index_serves_its_curvature_exactly_and_falls_back_for_another(logged):
    att, query = logged
    # every list probed: exact candidates through the index's batch re-rank (a flat index
    # would hand the batch to the stream)
    att.build_index("ivf", mode="cosine", hessian="ekfac", nlist=4, nprobe=4, progress=False)
    want = exact(att, query, 5, hessian="ekfac", mode="cosine")
    got = att.search(query, k=5, candidates=20, hessian="ekfac", mode="cosine")
    assert "stream" not in got["meta"]["search"] and got["top_ids"] == want["top_ids"]
    assert_stream_scores(got["top_scores"], want["top_scores"])
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
        assert_stream_scores(got["top_scores"][q], exact_scores)
    # with every row a candidate, any index finds the exact top-k
    everything = att.search(query, k=5, candidates=N_TRAIN, hessian="kfac", nprobe=10_000)
    assert everything["top_ids"] == want["top_ids"]


@pytest.mark.parametrize("options", [{"kind": "flat"}, {"kind": "ivf", "sketch": 8}])
def test_a_batched_search_equals_per_query_searches(logged, options):
    """All queries' candidates are re-ranked together (their union read once); each query still
    gets its own candidates' exact scores: a single query's with the stream's bits, a batch's
    equal to them to round-off."""
    att, query = logged
    m = att.build_index(progress=False, **options)
    batched = att.search(query, k=6, candidates=30, bottom=True, hessian="ekfac", index=m.name)
    for q in range(len(query)):
        one = query_subset(query, q)
        alone = att.search(one, k=6, candidates=30, bottom=True, hessian="ekfac", index=m.name)
        full = att.compute_influence_all(one, hessian="ekfac", progress=False)
        column = {tid: i for i, tid in enumerate(full["tgt_ids"])}
        for side in ("top", "bottom"):
            ids = alone[f"{side}_ids"][0]
            assert batched[f"{side}_ids"][q] == ids
            # exact: the bits of the stream for the same queries (a GEMM of one query sums in
            # another order than a GEMM of five, so the two differ by round-off only)
            assert torch.equal(alone[f"{side}_scores"][0],
                               full["influence"][0, [column[i] for i in ids]])
            torch.testing.assert_close(batched[f"{side}_scores"][q], alone[f"{side}_scores"][0],
                                       rtol=1e-6, atol=1e-7)


def query_subset(log, q):
    from logix.log import StepRows

    return StepRows(log.data_ids[q:q + 1], log.grads[q:q + 1], log.modules, log.projection)


def write_clustered_log(project_dir, rows=4096, dim=32, clusters=64, seed=0):
    """Shards of rows as gradients look: a few directions (clusters), norms spread over orders
    of magnitude (log-normal); returns queries drawn the same way."""
    from logix.log import StepRows
    from logix.storage.format import (DATA_IDS_KEY, GRAD_KEY, LOGS_DIR, atomic_write,
                                      safetensors_header, shard_name, tensor_bytes)
    from logix.storage.manifest import Manifest, ModuleEntry, ShardEntry

    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(clusters, dim, generator=g)

    def draw(n):
        x = centers[torch.randint(0, clusters, (n,), generator=g)] + 0.3 * torch.randn(n, dim,
                                                                                  generator=g)
        return x * torch.exp(torch.randn(n, 1, generator=g))

    module = ModuleEntry("body", "Linear", 64, 64, 4, dim // 4, 0)
    manifest = Manifest(project=os.path.basename(project_dir), dtype="float32",
                        modules=[module], projection={"init": "random", "seed": 0})
    os.makedirs(os.path.join(project_dir, LOGS_DIR))
    for seq, start in enumerate(range(0, rows, 1024)):
        block, ids = draw(1024), list(range(start, start + 1024))
        header = safetensors_header({GRAD_KEY: (torch.float32, [1024, dim])},
                                    {DATA_IDS_KEY: json.dumps(ids)})
        rel = os.path.join(LOGS_DIR, shard_name(0, seq))
        sha = atomic_write(os.path.join(project_dir, rel), header, tensor_bytes(block))
        manifest.shards.append(ShardEntry(rel, 1024, len(header) + block.numel() * 4, sha, 0,
                                          seq))
    manifest.save(project_dir)
    return StepRows([f"q{i}" for i in range(32)], draw(32), manifest.modules,
                   dict(manifest.projection))


@pytest.mark.parametrize("options", [{"kind": "ivf", "nlist": 64, "nprobe": 16},
                                     {"kind": "hnsw", "ef": 32}])
def test_ivf_and_hnsw_find_the_largest_inner_products_when_norms_vary(tmp_path, options):
    """Rows whose norms span orders of magnitude (as gradients do): the top inner products
    are rows of large norm near the query's direction. IVF lists by direction (spherical
    k-means) and HNSW over inner products find them with few lists / a small ef."""
    query = write_clustered_log(str(tmp_path / "clustered"))
    att = logix.Attributor(str(tmp_path / "clustered"))
    att.build_index(progress=False, **options)
    want = exact(att, query, 10, hessian="none")["top_ids"]
    got = att.search(query, k=10, candidates=20, hessian="none")["top_ids"]
    recall = sum(len(set(a) & set(b)) for a, b in zip(got, want)) / (10 * len(want))
    assert recall >= 0.95


def test_without_rerank_an_unsketched_flat_index_gives_the_scores_up_to_roundoff(logged):
    att, query = logged
    att.build_index("flat", progress=False)
    want = exact(att, query, 5, hessian="ekfac")
    got = att.search(query, k=5, rerank=False, hessian="ekfac")
    assert got["meta"]["search"]["exact"] is False  # the scores; reranked ones are exact
    assert att.search(query, k=5, hessian="ekfac")["meta"]["search"]["exact"] is True
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
    with pytest.raises(UsageError, match="flat-dot.*stale.*changed.*kind='flat'.*"
                                         "name='flat-dot'.*--kind flat --mode dot --name flat-dot"):
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


def test_an_index_written_by_an_older_format_is_rebuilt(logged):
    att, query = logged
    m = att.build_index("flat", progress=False)
    path = os.path.join(store.folder(att.project_dir, m.name), store.INDEX_MANIFEST)
    data = json.load(open(path))
    data["format_version"] = store.INDEX_VERSION - 1
    with open(path, "w") as f:
        json.dump(data, f)
    with pytest.raises(LogFormatError, match="build the index again"):
        att.search(query, k=3)
    with pytest.warns(UserWarning, match="Rebuilding index 'flat-dot'"):
        att.build_index("flat", progress=False)
    assert att.search(query, k=3)["top_ids"] == exact(att, query, 3)["top_ids"]


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
    other = logix.StepRows(query.data_ids, query.grads[:, :-1], query.modules[:1],
                          query.projection)
    with pytest.raises(UsageError, match="tracked layers differ"):
        att.search(other, k=3)
    narrow = logix.StepRows(query.data_ids, query.grads[:, :5], query.modules, query.projection)
    with pytest.raises(UsageError, match=r"rows are \(\d+, 5\), but the saved log's layers"):
        att.search(narrow, k=3)
    with pytest.raises(UsageError, match=r"rows are \(\d+, 5\)"):
        att.compute_influence_all(narrow, progress=False)
    for setting in ({"nprobe": 0}, {"ef": -1}, {"nprobe": 2.5}, {"candidates": 0},
                    {"candidates": -5}):
        with pytest.raises(UsageError, match=f"{next(iter(setting))} must be a positive integer"):
            att.search(query, k=3, **setting)
    with pytest.raises(UsageError, match="nprobe must be a positive integer"):
        att.build_index("ivf", nprobe=0, progress=False)


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
    query = logix.StepRows(["q"], torch.zeros(1, 6), att.modules(),
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
    assert cli.main(["index", run.project_dir, "--kind", "hnsw", "--ef", "16"]) == 0
    assert store.load(run.project_dir, "hnsw-dot").faiss["ef"] == 16
    assert cli.main(["index", run.project_dir, "--kind", "ivf", "--nprobe", "3"]) == 0
    assert store.load(run.project_dir, "ivf-dot").faiss["nprobe"] == 3
    capsys.readouterr()
    for name in ("hnsw-dot", "ivf-dot"):
        shutil.rmtree(store.folder(run.project_dir, name))
    assert run.search(query, k=3)["top_ids"] == exact(run.influence, query, 3)["top_ids"]
    assert cli.main(["search", run.project_dir, "--queries", queries, "--k", "3", "--bottom",
                     "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    want = exact(run.influence, query, 3)
    assert [[e["id"] for e in q["top"]] for q in printed["queries"]] == want["top_ids"]
    assert [[e["id"] for e in q["bottom"]] for q in printed["queries"]] == want["bottom_ids"]
    assert cli.main(["search", run.project_dir, "--queries", queries, "--k", "2"]) == 0
    printed = capsys.readouterr().out
    assert "most helpful" in printed and "exact scores" in printed
    scores = str(tmp_path / "scores.safetensors")
    run.compute_influence_all(query, out=scores, progress=False)
    assert cli.main(["search", run.project_dir, "--queries", scores, "--k", "2"]) == 2
    assert "is not a saved StepRows" in capsys.readouterr().err
    assert cli.main(["search", run.project_dir, "--queries", queries, "--k", "2",
                     "--no-rerank"]) == 0
    printed = capsys.readouterr().out
    assert "approximate scores" in printed and "exact scores" not in printed
    assert cli.main(["show", run.project_dir, "--json"]) == 0
    indexes = json.loads(capsys.readouterr().out)["indexes"]
    assert [(i["name"], i["state"], i["rows"]) for i in indexes] == [("flat-dot", "fresh",
                                                                       N_TRAIN)]
    assert cli.main(["show", run.project_dir]) == 0
    assert "flat-dot" in capsys.readouterr().out
    assert cli.main(["search", run.project_dir, "--queries", queries, "--k", "999"]) == 2
    assert "larger than the log" in capsys.readouterr().err


@pytest.mark.slow  # torchrun
def test_under_torchrun_each_rank_indexes_its_shards_and_search_merges_them(tmp_path):
    """Two processes (gloo, CPU): each rank indexes its own round-robin share of the shards; a
    search re-ranks each rank's candidates exactly and merges them into the top-k of one
    process."""
    run, model, x, y = log_project(tmp_path)
    query = finalize_with_query(run, model, x, y)
    queries, out = str(tmp_path / "queries.safetensors"), tmp_path / "result.pt"
    query.save(queries)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", RANK_WORKER, run.project_dir, queries, str(out)],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    result = torch.load(out)
    assert result["index_names"] == ["flat-dot-r0of2", "ivf-dot-s8-r0of2"]
    assert sorted(store.names(run.project_dir)) == [
        "flat-dot-r0of2", "flat-dot-r1of2", "ivf-dot-s8-r0of2", "ivf-dot-s8-r1of2"]
    assert sum(store.load(run.project_dir, f"flat-dot-r{r}of2").rows for r in (0, 1)) == N_TRAIN
    want = exact(logix.Attributor(run.project_dir), query, 6, hessian="ekfac")
    for name in ("flat", "ivf"):
        assert result[name]["meta"]["search"]["index"].endswith("-r0of2")
        for side in ("top", "bottom"):
            assert result[name][f"{side}_ids"] == want[f"{side}_ids"]
            # the distributed stream's and the single-process scores, to round-off
            assert_stream_scores(result[name][f"{side}_scores"],
                                 result["stream"][f"{side}_scores"])
            assert_stream_scores(result[name][f"{side}_scores"], want[f"{side}_scores"])


def test_auto_on_a_large_log_builds_ivf_with_sq8_codes_and_scores_exactly(logged, monkeypatch):
    from logix.index import backend

    att, query = logged
    monkeypatch.setattr(backend, "AUTO_FLAT_ROWS", 100)  # the 400-row log counts as large
    monkeypatch.setattr(backend, "AUTO_HNSW_BYTES", 0)  # ... and as too large for HNSW
    monkeypatch.setattr(backend, "AUTO_RECALL", 0.0)  # keep the IVF whatever it measures
    monkeypatch.setattr(backend, "AUTO_MIN_SPEEDUP", -1.0)
    manifest = att.build_index(progress=False)
    assert manifest.kind == "ivf" and manifest.faiss["factory"].endswith(",SQ8")
    assert manifest.calibration["queries"] == 64 and 0 <= manifest.calibration["recall_at_10"]
    got = att.search(query, k=5, candidates=20, hessian="ekfac")
    full = att.compute_influence_all(query, hessian="ekfac", progress=False)
    for q, ids in enumerate(got["top_ids"]):
        columns = [full["tgt_ids"].index(i) for i in ids]
        assert torch.allclose(got["top_scores"][q], full["influence"][q, columns],
                              rtol=1e-5, atol=1e-6)


def test_an_index_that_lost_its_file_is_refused_naming_the_rebuild(logged):
    att, query = logged
    manifest = att.build_index("ivf", nlist=4, progress=False)
    os.remove(os.path.join(store.folder(att.project_dir, manifest.name), store.INDEX_FILE))
    with pytest.raises(UsageError, match="lost its file.*--kind ivf --mode dot --name "
                                         "ivf-dot --rebuild"):
        att.search(query, k=5, index=manifest.name)


def test_cli_search_shows_what_describe_stored(tmp_path, capsys):
    run, model, x, y = log_project(tmp_path)
    run.describe(list(range(N_TRAIN)), texts=[f"example text {i}" for i in range(N_TRAIN)],
                 labels=[int(v) for v in y])
    query = finalize_with_query(run, model, x, y)
    queries = str(tmp_path / "queries.safetensors")
    query.save(queries)
    assert cli.main(["search", run.project_dir, "--queries", queries, "--k", "2",
                     "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    for q in printed["queries"]:
        for entry in q["top"]:
            assert entry["text"] == f"example text {entry['id']}"
            assert entry["label"] == int(y[entry["id"]])
    assert cli.main(["search", run.project_dir, "--queries", queries, "--k", "2"]) == 0
    best = printed["queries"][0]["top"][0]
    assert f"{best['label']} example text {best['id']}" in capsys.readouterr().out


def test_row_store_reads_rows_in_asked_order_and_advises_the_missing_pages(tmp_path,
                                                                          monkeypatch):
    """RowStore.read returns the rows at the asked positions, in the asked order (sorted or
    not, across shards); when its resident sample says pages are out it advises one range per
    run of touching pages."""
    import mmap

    from logix.index import rows as rowstore

    project = str(tmp_path / "rows")
    write_clustered_log(project, rows=3072, dim=1024)  # 4 KiB rows: one page each
    manifest = logix.Attributor(project).reader().manifest
    every = logix.Attributor(project).reader().read_all()[1].float()
    store = rowstore.RowStore(project, [{"file": s.file, "checksum": s.checksum,
                                         "rows": s.rows} for s in manifest.shards],
                              manifest.dim)
    for positions in ([5, 3000, 0, 1024, 6], [0, 1, 2, 1500, 3071]):
        at = torch.tensor(positions)
        assert torch.equal(store.read(at), every[at])
    class Recorder:  # stands in for a shard's mmap: records the advice
        def __init__(self):
            self.calls = []

        def madvise(self, advice, start, length):
            self.calls.append((advice, start, length))

    mapped = rowstore._shard_map(*store._version(0), manifest.dim)
    kept, mapped.map = mapped.map, Recorder()
    try:
        monkeypatch.setattr(rowstore, "_resident", lambda *_: True)  # warm: no advice
        store.read(torch.tensor([10, 11, 12, 40]))
        assert mapped.map.calls == []
        monkeypatch.setattr(rowstore, "_resident", lambda *_: False)
        store.read(torch.tensor([40, 12, 11, 10]))
        calls = mapped.map.calls
    finally:
        mapped.map = kept
    page = mmap.PAGESIZE
    first = [(mapped.first + r * mapped.row_bytes) // page for r in (10, 40)]
    last = [(mapped.first + (r + 1) * mapped.row_bytes - 1) // page for r in (12, 40)]
    assert calls == [(mmap.MADV_WILLNEED, f * page, (l - f + 1) * page)
                     for f, l in zip(first, last)]


def test_auto_builds_hnsw_while_its_index_fits_in_memory_then_ivf():
    from logix.index import backend

    width = backend.auto_sketch(928, None)  # LoGra rank 16 on a 4x512 MLP: a 256-wide sketch
    assert backend.resolve_kind("auto", 9_999, width) == "flat"
    assert backend.resolve_kind("auto", 10_000, width) == "hnsw"
    assert backend.resolve_kind("auto", 1_000_000, width) == "hnsw"  # 1.3 GB
    assert backend.resolve_kind("auto", 2_000_000, width) == "ivf"  # 2.6 GB
    assert backend.resolve_kind("auto", 1_000_000, 512) == "ivf"  # unsketched 512-wide rows
    assert backend.resolve_kind("hnsw", 10 ** 8, width) == "hnsw"  # asked for: built


def test_a_batch_on_an_exact_flat_index_is_answered_by_the_stream(logged):
    from logix.index.search import STREAM_BATCH

    att, query = logged
    att.build_index("flat", progress=False)
    assert len(query) >= STREAM_BATCH
    want = exact(att, query, 5, hessian="ekfac")
    got = att.search(query, k=5, hessian="ekfac", bottom=True)
    assert got["meta"]["search"]["stream"] and got["meta"]["search"]["index"] == "flat-dot"
    assert got["top_ids"] == want["top_ids"] and got["bottom_ids"] == want["bottom_ids"]
    assert torch.equal(got["top_scores"], want["top_scores"])
    unranked = att.search(query, k=5, hessian="ekfac", rerank=False)  # the index's own scores
    assert "stream" not in unranked["meta"]["search"]
    assert unranked["top_ids"] == want["top_ids"]


def test_cli_show_states_a_measured_speed_up_below_one(tmp_path, capsys):
    from logix.cli.inspect import _times

    assert (_times(0.17), _times(2.345), _times(27.4)) == ("0.17x", "2.3x", "27x")
    run, model, x, y = log_project(tmp_path)
    finalize_with_query(run, model, x, y)
    calibration = run.influence.build_index(progress=False).calibration  # auto: measured
    assert cli.main(["show", run.project_dir]) == 0
    assert f"({_times(calibration['speedup'])})" in capsys.readouterr().out


def test_an_index_that_needs_more_rows_to_train_is_refused_before_faiss(tmp_path):
    run, model, x, y = log_project(tmp_path, steps=(0, 120))
    finalize_with_query(run, model, x, y)
    with pytest.raises(UsageError, match="quantize='pq'.*at least 256 rows; the log holds 120"):
        run.influence.build_index("flat", quantize="pq", progress=False)
    with pytest.raises(UsageError, match="quantize='pq'.*the log holds 120"):
        run.influence.build_index("ivf", quantize="pq", nlist=2, progress=False)
    with pytest.raises(UsageError, match="nlist=200 IVF lists.*the log holds 120.*nlist <= 120"):
        run.influence.build_index("ivf", nlist=200, progress=False)
    assert store.names(run.project_dir) == []  # nothing half-built left behind
    assert run.influence.build_index("ivf", nlist=3, progress=False).rows == 120

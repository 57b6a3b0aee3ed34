"""Warm searches, kind="auto"'s measured recall, and `logix serve`: warm (same Attributor),
cold (new Attributor, new process) and served searches return the stream's ids and scores; the
service refuses what the dashboard refuses; auto's recorded recall is what brute force measures.
"""

import http.client
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

import logix
from logix.dashboard.server import url_of
from logix.errors import UsageError
from logix.index import backend, client, store
from logix.index.service import make_service
from logix.log import StepRows

pytest.importorskip("faiss")
sys.path.insert(0, os.path.dirname(__file__))
from test_index import (assert_stream_scores, finalize_with_query, log_project,  # noqa: E402
                        write_clustered_log)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    run, model, x, y = log_project(root)
    query = finalize_with_query(run, model, x, y)
    queries_dir = root / "queries"
    queries_dir.mkdir()
    query.save(str(queries_dir / "q.safetensors"))
    att = logix.Attributor(run.project_dir)
    att.build_index("flat", progress=False)
    return att, query, str(queries_dir)


def _stream(att, query, k):
    return att.compute_influence_all(query, hessian="ekfac", topk=k, progress=False)


def _one(query, q):
    return StepRows(query.data_ids[q:q + 1], query.grads[q:q + 1], query.modules,
                    query.projection)


def test_warm_and_cold_searches_return_the_streams_ids_and_scores(project, tmp_path):
    att, query, queries_dir = project
    want = _stream(att, query, 5)
    warm = logix.Attributor(att.project_dir)
    for q in range(3):  # the first call opens everything, the next ones reuse it
        got = warm.search(_one(query, q), k=5, hessian="ekfac")
        assert got["top_ids"] == want["top_ids"][q:q + 1]
        assert_stream_scores(got["top_scores"], want["top_scores"][q:q + 1])
        assert "stream" not in got["meta"]["search"]
    assert len(warm.index_cache._indexes) == 1
    seconds = got["meta"]["search"]["seconds"]
    assert set(seconds) == {"index", "read", "rerank", "total"}
    assert seconds["total"] >= seconds["index"] + seconds["read"] + seconds["rerank"]
    # a batch on an exact flat index: the stream answers it
    batch = warm.search(query, k=5, hessian="ekfac")
    assert batch["meta"]["search"]["stream"] and batch["meta"]["search"]["index"] == "flat-dot"
    assert batch["top_ids"] == want["top_ids"]
    assert torch.equal(batch["top_scores"], want["top_scores"])
    # cold: a new process
    out = tmp_path / "cold.json"
    code = ("import json, sys, logix, warnings; warnings.simplefilter('ignore');"
            "from logix.log import StepRows;"
            f"q = StepRows.load({os.path.join(queries_dir, 'q.safetensors')!r});"
            f"r = logix.Attributor({att.project_dir!r}).search("
            "StepRows(q.data_ids[:1], q.grads[:1], q.modules, q.projection), k=5, "
            "hessian='ekfac');"
            f"json.dump([r['top_ids'], r['top_scores'].tolist()], open({str(out)!r}, 'w'))")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    ids, scores = json.load(open(out))
    assert ids == want["top_ids"][:1]
    assert_stream_scores(torch.tensor(scores, dtype=torch.float32), want["top_scores"][:1])


def test_a_batch_keeps_the_stream_scores_with_an_approximate_index(project):
    att, query, _ = project
    att.build_index("ivf", name="ivf-bits", progress=False, nlist=4, nprobe=4)
    got = att.search(query, k=5, index="ivf-bits", hessian="ekfac", bottom=True)
    want = _stream(att, query, 5)
    assert got["top_ids"] == want["top_ids"] and got["bottom_ids"] == want["bottom_ids"]
    assert_stream_scores(got["top_scores"], want["top_scores"])
    assert_stream_scores(got["bottom_scores"], want["bottom_scores"])


def test_a_rebuilt_index_is_opened_again_by_a_warm_attributor(project):
    att, query, _ = project
    warm = logix.Attributor(att.project_dir)
    warm.search(query, k=3, index="flat-dot", hessian="ekfac")
    before = warm.index_cache.index(
        os.path.join(store.folder(att.project_dir, "flat-dot"), store.INDEX_FILE), "flat")[0]
    att.build_index("flat", rebuild=True, progress=False)
    warm.search(query, k=3, index="flat-dot", hessian="ekfac")
    after = warm.index_cache.index(
        os.path.join(store.folder(att.project_dir, "flat-dot"), store.INDEX_FILE), "flat")[0]
    assert after is not before


@pytest.mark.parametrize("kind,hnsw_bytes", [("hnsw", 1 << 40), ("ivf", 0)])
def test_auto_records_the_recall_a_brute_force_check_measures(tmp_path, monkeypatch, kind,
                                                               hnsw_bytes):
    project = str(tmp_path / "clustered")
    write_clustered_log(project, rows=3072, dim=48)
    monkeypatch.setattr(backend, "AUTO_FLAT_ROWS", 1000)
    monkeypatch.setattr(backend, "AUTO_HNSW_BYTES", hnsw_bytes)
    monkeypatch.setattr(backend, "AUTO_MIN_SPEEDUP", -1.0)  # keep the index, whatever its speed
    att = logix.Attributor(project)
    manifest = att.build_index(progress=False)
    cal = manifest.calibration
    assert manifest.kind == kind
    assert (manifest.faiss["nprobe"], manifest.faiss["ef"]) == (cal["nprobe"], cal["ef"])
    # brute force: every row, exact inner products; the index searched as the build did
    reader = att.reader()
    _, rows = reader.read_all()
    rows = rows.float()
    positions = torch.tensor(cal["positions"])
    queries = rows[positions]
    exact = queries @ rows.T
    exact[torch.arange(len(positions)), positions] = -float("inf")  # not its own row
    truth = torch.topk(exact, 10, dim=1).indices
    index = backend.read(os.path.join(store.folder(project, manifest.name), store.INDEX_FILE),
                         manifest.kind)
    backend.set_search_params(index, cal["nprobe"], cal["ef"])
    _, found = index.search(np.ascontiguousarray(queries.numpy()), cal["candidates"])
    found = torch.from_numpy(found).long()
    scores = torch.einsum("qd,qcd->qc", queries, rows[found.clamp_min(0)])
    scores[(found < 0) | (found == positions[:, None])] = -float("inf")
    got = torch.gather(found, 1, torch.topk(scores, 10, dim=1).indices)
    recall = sum(len(set(g.tolist()) & set(t.tolist())) for g, t in zip(got, truth)) / \
        (10 * len(positions))
    assert cal["recall_at_10"] == round(recall, 4)
    assert cal["recall_at_10"] >= backend.AUTO_RECALL  # this log reaches it
    assert cal["speedup"] > 0 and cal["exact_scan_ms"] > 0
    # the setting kept is the first tried, cheapest first, that reaches the target
    assert [t["recall_at_10"] >= backend.AUTO_RECALL_TARGET for t in cal["tried"]][:-1] == \
        [False] * (len(cal["tried"]) - 1)
    assert manifest.faiss["candidates"] == cal["candidates"]
    assert att.search(queries_log(att, queries), k=10, hessian="none")["meta"]["search"][
        "candidates"] == cal["candidates"]


def queries_log(att, rows):
    from logix.log import StepRows

    manifest = att.reader().manifest
    return StepRows([f"q{i}" for i in range(len(rows))], rows, manifest.modules,
                   dict(manifest.projection))


def test_auto_falls_back_to_flat_when_the_index_does_not_pay_off(tmp_path, monkeypatch):
    project = str(tmp_path / "clustered")
    write_clustered_log(project, rows=2048, dim=32)
    monkeypatch.setattr(backend, "AUTO_FLAT_ROWS", 1000)
    monkeypatch.setattr(backend, "AUTO_MIN_SPEEDUP", 1e9)  # nothing is that fast
    manifest = logix.Attributor(project).build_index(progress=False)
    assert manifest.kind == "flat" and manifest.faiss["factory"] == "Flat"
    assert manifest.calibration["recall_at_10"] == 1.0
    assert manifest.calibration["rejected"]["measured"].startswith("HNSW")
    assert "did not pay off" in manifest.calibration["why"]


# ----------------------------------------------------------------------------- the service
@pytest.fixture(scope="module")
def service(project):
    att, query, queries_dir = project
    server = make_service(att.project_dir, query_dirs=[queries_dir], index="flat-dot")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, url_of(server)
    server.shutdown()
    server.server_close()


def _raw(server, method, path, body=None, host="127.0.0.1"):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    conn.putrequest(method, path, skip_host=True)
    if host is not None:
        conn.putheader("Host", host)
    data = json.dumps(body).encode() if body is not None else b""
    if method == "POST":
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(data)))
    conn.endheaders(data)
    response = conn.getresponse()
    out = response.status, json.loads(response.read() or b"{}")
    conn.close()
    return out


def test_served_searches_return_the_streams_ids_and_scores(project, service):
    att, query, queries_dir = project
    server, url = service
    want = _stream(att, query, 5)
    by_rows = client.search(url, query, k=5, hessian="ekfac", index="flat-dot")
    by_path = client.search(url, os.path.join(queries_dir, "q.safetensors"), k=5,
                            hessian="ekfac", index="flat-dot")
    for got in (by_rows, by_path):
        assert got["top_ids"] == want["top_ids"]
        assert_stream_scores(got["top_scores"], want["top_scores"])
    status, health = _raw(server, "GET", "/api/health")
    assert status == 200 and health["read_only"] and health["rows"] == att.reader().rows
    status, got = _raw(server, "GET", "/api/search?path=" + os.path.join(
        queries_dir, "q.safetensors") + "&k=3&hessian=ekfac&bottom=1")
    assert status == 200 and got["top_ids"] == _stream(att, query, 3)["top_ids"]
    assert "bottom_ids" in got


def test_the_service_refuses_what_the_dashboard_refuses(project, service, tmp_path):
    att, query, queries_dir = project
    server, url = service
    assert _raw(server, "GET", "/api/health", host="evil.example")[0] == 421
    assert _raw(server, "POST", "/api/search", {"rows": [[0.0]]}, host="evil.example")[0] == 421
    assert _raw(server, "GET", "/api/health", host=None)[0] == 400
    for method in ("PUT", "DELETE", "PATCH"):
        assert _raw(server, method, "/api/search")[0] == 405
    # paths: only files inside --queries-dir, whatever the spelling
    outside = str(tmp_path / "q.safetensors")
    query.save(outside)
    link = os.path.join(queries_dir, "link.safetensors")
    os.symlink(outside, link)
    for path in (outside, os.path.join(queries_dir, "..", os.path.basename(outside)),
                 os.path.join(queries_dir, "../../../../etc/passwd"), link,
                 os.path.join(att.project_dir, "manifest.json")):
        status, body = _raw(server, "POST", "/api/search", {"path": path, "k": 3})
        assert status == 403, (path, body)
        assert "outside the folders" in body["error"]
    # bad requests are named
    dim = att.reader().dim
    for body, status in (({"rows": [[1.0] * (dim - 1)]}, 400), ({"rows": "x"}, 400),
                         ({"k": 3}, 400), ({"rows": [[1.0] * dim], "k": 0}, 400),
                         ({"rows": [[1.0] * dim], "drop": 1}, 400),
                         ({"rows": [[1.0] * dim], "k": 10 ** 6}, 400),
                         ({"rows": [[1.0] * dim], "index": "nope"}, 409),
                         ({"rows": [[1.0] * dim], "mode": "cosine"}, 409)):
        got, answer = _raw(server, "POST", "/api/search", body)
        assert got == status and answer["error"], (body, got, answer)
    with pytest.raises(UsageError, match="503|409|answered"):
        client.search(url, query, k=3, mode="cosine")
    # non-loopback only when asked for
    with pytest.raises(UsageError, match="--allow-remote"):
        make_service(att.project_dir, host="0.0.0.0", warm=False)
    # read-only: nothing written under the project by any of the above
    assert not os.path.exists(os.path.join(att.project_dir, "cache"))


def test_cli_serve_refuses_a_remote_host_and_missing_folders(project, capsys):
    from logix import cli

    att, _, _ = project
    assert cli.main(["serve", att.project_dir, "--host", "0.0.0.0"]) == 2
    assert "--allow-remote" in capsys.readouterr().err
    assert cli.main(["serve", att.project_dir, "--queries-dir", "/no/such/folder"]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_a_search_on_one_thread_keeps_the_bits_of_a_stream_on_two(tmp_path):
    """A search runs on one thread (logix.index.threads), except the products that carry a
    single query's stream bits: they run on the stream's thread count where a GEMM's bits
    depend on it, on one where a probe finds they do not. A batch's scores are the stream's to
    round-off. The counts are restored."""
    from logix.log import StepRows

    project = str(tmp_path / "wide")
    query = write_clustered_log(project, rows=2048, dim=928)
    queries = StepRows([f"q{i}" for i in range(64)], torch.cat([query.grads, -query.grads.flip(1)]),
                      query.modules, query.projection)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        att = logix.Attributor(project)
        att.build_index("flat", progress=False)
        for n in (1, 4, 64):
            some = StepRows(queries.data_ids[:n], queries.grads[:n], query.modules,
                           query.projection)
            got = att.search(some, k=10, hessian="none")
            assert torch.get_num_threads() == 2
            want = att.compute_influence_all(some, hessian="none", topk=10, progress=False)
            assert got["top_ids"] == want["top_ids"]
            if n == 1:
                assert torch.equal(got["top_scores"], want["top_scores"])
            else:
                assert_stream_scores(got["top_scores"], want["top_scores"])
    finally:
        torch.set_num_threads(before)


def test_calibration_tries_settings_cheapest_first():
    """IVF: nprobe first, then candidates; HNSW: by max(ef, candidates) + 2 candidates, each
    (walk, candidates) pair once (FAISS walks at least as wide as the candidates asked)."""
    from logix.index import calibrate
    from logix.index.store import IndexManifest

    ivf = IndexManifest(name="i", kind="ivf", mode="dot", faiss={"nlist": 20}, layout={})
    assert calibrate.settings(ivf, 10_000) == [(n, c) for n in (8, 16, 20)
                                               for c in calibrate.CANDIDATE_LADDER]
    hnsw = calibrate.settings(IndexManifest(name="h", kind="hnsw", mode="dot", faiss={}, layout={}),
                              10_000)
    assert hnsw[:4] == [(16, 20), (32, 20), (16, 30), (32, 30)]
    cost = [max(ef, c) + 2 * c for ef, c in hnsw]
    assert cost == sorted(cost)
    assert len({(max(ef, c), c) for ef, c in hnsw}) == len(hnsw)
    assert hnsw[-1] == (512, 100)
    assert calibrate.settings(IndexManifest(name="f", kind="flat", mode="dot", faiss={}, layout={}), 25) \
        == [(None, 20)]

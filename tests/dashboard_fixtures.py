"""A small but complete project for the dashboard tests: a logged MLP with statistics, example
content (texts, images, labels), a score file with influence groups, a score file with per-token
scores, evaluation results, a corrupt score file, and a folder that is not a log; and a
hostile root (`build_hostile`) whose every field read from disk is markup or script."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from typing import Dict

import pytest
import torch
from torch.nn import functional as F

import logix
from logix.evaluation import BrittlenessResult, save_results
from logix.storage.scores import (TOKEN_COMPLETION_KEY, TOKEN_INFLUENCE_KEY, TOKEN_QUERY_KEY,
                                  TOKEN_TEXT_KEY, save_scores)

N_TRAIN, N_TEST = 24, 3
# query tokens with subwords ("pass" "w" "ord"), and which of them are the completion
TOKENS = [["The", " pass", "w", "ord", " is"], ["A", " dog"], ["Hi"]]
WORDS = [["The", " password", " is"], ["A", " dog"], ["Hi"]]
COMPLETION = [[False, False, False, False, True], [False, True], [True]]


def build_root(root: str) -> Dict:
    """Write the project `demo` (and the non-log folder `notes`) under `root`."""
    from conftest import make_mlp

    model = make_mlp(in_dim=6, hidden=5, out_dim=3, seed=0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(N_TRAIN + N_TEST, 6, generator=g), torch.arange(N_TRAIN + N_TEST) % 3
    run = logix.init("demo", root_dir=root)
    run.watch(model)
    run.add_lora(rank=2)
    run.setup({"grad": ["log", "covariance"], "forward": ["covariance"],
               "backward": ["covariance"]})
    run.save(True)
    for start in range(0, N_TRAIN, 8):
        with run(data_id=list(range(start, start + 8))):
            model.zero_grad()
            F.cross_entropy(model(x[start:start + 8]), y[start:start + 8],
                            reduction="sum").backward()
    run.finalize()
    images = torch.rand(N_TRAIN, 4, 4, generator=g)  # [N, H, W] in [0, 1]
    run.describe(list(range(N_TRAIN)), texts=[f"train example {i}" for i in range(N_TRAIN)],
                 images=images, labels=[int(v) for v in y[:N_TRAIN]])
    test_ids = [f"q{i}" for i in range(N_TEST)]
    run.describe(test_ids, texts=["".join(t) for t in TOKENS],
                 labels=["cat", "dog", "hi"])
    run.save(False)
    with run(data_id=test_ids):
        model.zero_grad()
        F.cross_entropy(model(x[N_TRAIN:]), y[N_TRAIN:], reduction="sum").backward()
    result = run.compute_influence_all(run.get_log(), influence_groups="module")
    scores_path = save_scores(os.path.join(run.project_dir, "scores", "test.safetensors"),
                              result, meta={"mode": "dot"})
    token_path = _token_scores(os.path.join(run.project_dir, "scores", "tokens.safetensors"),
                               result)
    bad = os.path.join(run.project_dir, "scores", "broken.safetensors")
    with open(bad, "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    lds_path = save_results(os.path.join(run.project_dir, "evaluation", "lds.json"),
                            {"lds": 0.4, "per_query": torch.tensor([0.2, float("nan"), 0.6])})
    brittle_path = save_results(
        os.path.join(run.project_dir, "evaluation", "brittle.json"),
        [BrittlenessResult(0, 1.5, 4, {2: 0.5, 4: -0.1}, {2: 0.0, 4: 0.5}, {2: (1.4,), 4: (1.2,)})])
    os.makedirs(os.path.join(root, "notes"))
    with open(os.path.join(root, "notes", "readme.txt"), "w") as f:
        f.write("not a log")
    return {"run": run, "result": result, "scores": scores_path, "tokens": token_path,
            "broken": bad, "lds": lds_path, "brittle": brittle_path, "images": images,
            "test_ids": test_ids}


def _token_scores(path: str, result: Dict) -> str:
    """A score file carrying per-token scores whose rows sum to each query's scores (synthetic:
    the query's scores split over its tokens in fixed proportions)."""
    from safetensors.torch import save_file

    influence = result["influence"]  # [n_test, n_train]
    rows, owner, text = [], [], []
    for q, tokens in enumerate(TOKENS):
        weights = torch.arange(1, len(tokens) + 1, dtype=torch.float32)
        weights = weights / weights.sum()
        rows.append(weights[:, None] * influence[q][None, :])  # [T, n_train]
        owner += [q] * len(tokens)
        text += tokens
    metadata = {"format": "logix-scores", "format_version": "1",
                "src_ids": json.dumps(result["src_ids"]), "tgt_ids": json.dumps(result["tgt_ids"]),
                TOKEN_QUERY_KEY: json.dumps(owner), TOKEN_TEXT_KEY: json.dumps(text),
                TOKEN_COMPLETION_KEY: json.dumps([c for row in COMPLETION for c in row])}
    save_file({"influence": influence.contiguous(),
               TOKEN_INFLUENCE_KEY: torch.cat(rows).contiguous()}, path, metadata=metadata)
    return path


def snapshot(root: str) -> Dict[str, tuple]:
    """(size, mtime_ns) of every file under root: compared before and after to prove that the
    dashboard wrote nothing."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in files:
            st = os.stat(os.path.join(folder, name))
            out[os.path.join(folder, name)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """The projects of `build_root` in a fresh folder (one per test module)."""
    path = str(tmp_path_factory.mktemp("ui"))
    info = build_root(path)
    info["root"] = path
    return info


@pytest.fixture(scope="module")
def server(root):
    """`logix ui` over `root` on a free local port; its base URL."""
    from logix.dashboard import make_server

    srv = make_server([root["root"]], port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


# --------------------------------------------------------------------------- hostile content
X_SCRIPT = "<script>window.__xss=1</script>"
X_ATTR = '"><img src=x onerror=__xss=1>'
X_MODULE = "<img src=x onerror=__xss=1>"  # a module name cannot hold "."
X_URL = "javascript:__xss=1"
X_JSON = '</script><script>window.__xss=1</script>{"a": "<!--"}'
BAD_ID = os.fsdecode(b"img_\xff.png")  # non-UTF-8 bytes: a str with the lone surrogate \udcff
BAD_QUERY = os.fsdecode(b"q_\xfe")
HOSTILE = (X_SCRIPT, X_ATTR, X_MODULE, X_URL, X_JSON)


def build_hostile(base: str) -> Dict:
    """A root whose every field read from disk is hostile markup: the root's and the project's
    folder names, a module name, data ids (some not UTF-8), texts, labels, token texts, group
    names, score and result file names, score meta, every field of the result files; plus a
    damaged score file and a corrupt project whose names are hostile too. Real logging code
    writes all of it."""
    from safetensors.torch import save_file

    root = os.path.join(base, X_MODULE)
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module(X_MODULE, torch.nn.Linear(4, 3))
    run = logix.init(X_ATTR, root_dir=root)
    run.watch(model)
    run.add_lora(rank=2)
    run.setup({"grad": ["log", "covariance"], "forward": ["covariance"],
               "backward": ["covariance"]})
    run.save(True)
    train = [X_SCRIPT, X_ATTR, BAD_ID, X_URL, X_JSON, 7]
    x, y = torch.randn(len(train), 4), torch.arange(len(train)) % 3
    with run(data_id=train):
        model.zero_grad()
        F.cross_entropy(model(x), y, reduction="sum").backward()
    run.finalize()
    run.describe(train, texts=[X_JSON, X_SCRIPT, X_ATTR, X_URL, X_SCRIPT, BAD_ID],
                 labels=[X_ATTR, X_SCRIPT, BAD_ID, X_JSON, X_URL, X_SCRIPT],
                 images=torch.rand(len(train), 3, 3))
    queries = [X_SCRIPT + "q", BAD_QUERY]
    run.describe(queries, texts=[X_ATTR, BAD_ID], labels=[X_SCRIPT, X_JSON])
    run.save(False)
    with run(data_id=queries):
        model.zero_grad()
        F.cross_entropy(model(x[:2]), y[:2], reduction="sum").backward()
    result = run.compute_influence_all(run.get_log(), influence_groups={X_SCRIPT: [X_MODULE]})
    project = run.project_dir
    scores = save_scores(os.path.join(project, "scores", X_ATTR + ".safetensors"), result,
                         meta={X_SCRIPT: X_ATTR, "config": {"lr": X_JSON, X_URL: BAD_ID}})
    tokens = [[X_SCRIPT, X_ATTR], [BAD_ID]]
    owner = [q for q, t in enumerate(tokens) for _ in t]
    influence = result["influence"]
    save_file({"influence": influence.contiguous(),
               TOKEN_INFLUENCE_KEY: influence[owner].contiguous()},
              os.path.join(project, "scores", X_MODULE + "tokens.safetensors"),
              metadata={"format": "logix-scores", "format_version": "1",
                        "src_ids": json.dumps(queries), "tgt_ids": json.dumps(train),
                        TOKEN_QUERY_KEY: json.dumps(owner),
                        TOKEN_TEXT_KEY: json.dumps([t for row in tokens for t in row]),
                        TOKEN_COMPLETION_KEY: json.dumps([False, True, True])})
    with open(os.path.join(project, "scores", X_MODULE + ".safetensors"), "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    evaluation = os.path.join(project, "evaluation")
    os.makedirs(evaluation)
    result_files = {
        X_ATTR + ".json": {"kind": "brittleness", "name": X_SCRIPT, "results": [
            {"test_index": X_SCRIPT, "base_margin": 1.5, "k_flip": X_ATTR,
             "margins": {"2": 0.5, X_SCRIPT: X_ATTR}, "random_flip_fraction": {X_ATTR: X_JSON},
             "random_margins": {X_URL: [X_SCRIPT]}},
            {"test_index": BAD_ID, "base_margin": X_ATTR, "k_flip": None, "margins": X_SCRIPT,
             "random_flip_fraction": {}, "random_margins": {}}]},
        X_MODULE + "flip.json": {"kind": "brittleness", "name": "flip", "results": [
            {"test_index": X_SCRIPT, "base_margin": 1.5, "k_flip": X_ATTR, "margins": {"2": 0.5},
             "random_flip_fraction": {"2": 0.0}, "random_margins": {"2": [0.1]}}]},
        X_MODULE + "lds.json": {"kind": "lds", "name": X_ATTR, "lds": X_SCRIPT,
                                "per_query": [0.5, X_ATTR, None]},
    }
    for name, body in result_files.items():
        with open(os.path.join(evaluation, name), "w") as f:
            json.dump({"format": "logix-evaluation", "format_version": 1, **body}, f)
    os.makedirs(os.path.join(root, X_SCRIPT.replace("/", "")))  # a corrupt project
    with open(os.path.join(root, X_SCRIPT.replace("/", ""), "manifest.json"), "w") as f:
        f.write(X_SCRIPT)
    return {"root": root, "key": X_ATTR, "scores": os.path.relpath(scores, project),
            "train": train, "queries": queries, "result": result}


def hostile_paths(key: str) -> list:
    """Every page of the hostile root (server paths, quoted as the pages' own links are)."""
    from urllib.parse import quote

    def q(value: str) -> str:
        return quote(value, errors="surrogateescape")

    scores = f"/scores/{q(key)}/scores/{q(X_ATTR)}.safetensors"
    return ["/", f"/project/{q(key)}", scores, scores + "?query=1",
            scores + f"?query=0&group={q(X_SCRIPT)}",
            f"/scores/{q(key)}/scores/{q(X_MODULE)}tokens.safetensors?query=0",
            f"/scores/{q(key)}/scores/{q(X_MODULE)}.safetensors",
            f"/evaluation/{q(key)}/evaluation/{q(X_ATTR)}.json",
            f"/evaluation/{q(key)}/evaluation/{q(X_MODULE)}lds.json",
            f"/evaluation/{q(key)}/evaluation/{q(X_MODULE)}flip.json",
            f"/project/{q(X_SCRIPT)}", f"/project/{q(X_SCRIPT.replace('/', ''))}",
            f"/scores/{q(key)}/{q(X_URL)}"] + [
            f"/example/{q(key)}?id={q(json.dumps(i))}{norm}" for i in (X_SCRIPT, BAD_ID, 7)
            for norm in ("", "&norm=raw")] + [
            f"/example/{q(key)}?id={q(X_ATTR)}",
            f"/example/{q(key)}?id={q(X_JSON)}&norm={q(X_URL)}",
            f"/example/{q(key)}?id={q(json.dumps(X_SCRIPT + 'q'))}"]


@contextlib.contextmanager
def serving(roots, **kwargs):
    """`logix ui` over `roots` on a free loopback port, for one test; its base URL."""
    from logix.dashboard import make_server

    srv = make_server(list(roots), port=0, **kwargs)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    info = build_hostile(str(tmp_path_factory.mktemp("hostile")))
    with serving([info["root"]]) as url:
        info["server"] = url
        yield info

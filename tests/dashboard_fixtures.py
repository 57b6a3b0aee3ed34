"""A small but complete project for the dashboard tests: a logged MLP with statistics, example
content (texts, images, labels), a score file with influence groups, a score file with per-token
scores, evaluation results, a corrupt score file, and a folder that is not a log."""

from __future__ import annotations

import json
import os
import threading
from typing import Dict

import pytest
import torch
from torch.nn import functional as F

import logix
from logix.evaluation import BrittlenessResult, save_results
from logix.storage.scores import (TOKEN_INFLUENCE_KEY, TOKEN_QUERY_KEY, TOKEN_TEXT_KEY,
                                  save_scores)

N_TRAIN, N_TEST = 24, 3
TOKENS = [["The", " cat", " sat"], ["A", " dog"], ["Hi"]]


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
    run.describe(test_ids, texts=[" ".join(t).replace("  ", " ") for t in TOKENS],
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
                TOKEN_QUERY_KEY: json.dumps(owner), TOKEN_TEXT_KEY: json.dumps(text)}
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

"""Fingerprints of reference logs and their scores, to show a refactor changed no number.

    python scripts/score_fingerprint.py [ROOT] > before.txt    # on the old code
    python scripts/score_fingerprint.py [ROOT] > after.txt     # on the new code
    diff before.txt after.txt                           # empty: bit-identical

Logs tiny seeded models (MLP with random LoGra and every statistic, a conv net, an embedding
model, a PCA scheduler run, SOURCE checkpoints), then scores each with every estimator, mode,
curvature, top-k and score file, and prints one SHA-256 per log and per result (the bytes of
every tensor, the ids and the metadata). Only the public, long-standing names are used, so the
same script runs before and after.
"""

import hashlib
import json
import os
import shutil
import sys
import tempfile
import warnings

import torch
from safetensors import safe_open
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import logix  # noqa: E402
from conftest import make_conv_model, make_embedding_model, make_mlp  # noqa: E402
from logix.storage.scores import load_scores  # noqa: E402


def digest(value, h=None):
    h = h or hashlib.sha256()
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, dict):
        for k in sorted(value, key=str):
            if k == "fingerprint":  # of the files' sizes and times
                continue
            h.update(repr(k).encode())
            digest(value[k], h)
    elif isinstance(value, (list, tuple)):
        h.update(b"[")
        for v in value:
            digest(v, h)
        h.update(b"]")
    else:
        h.update(json.dumps(value, sort_keys=True, default=str).encode())
    return h


def show(name, value):
    print(f"{name:58s} {digest(value).hexdigest()[:24]}")


def self_keys(result):
    """Self-influence under its LogIX keys (later versions add src_ids / tgt_ids beside ids)."""
    return {k: result[k] for k in ("ids", "influence", "meta")}


def project_files(project_dir):
    """The tensors of every safetensors file of the log (shards, statistics, projections) and
    the shards' data ids; not the metadata that names files, times or checksums of them."""
    out = {}
    for folder, _, files in os.walk(project_dir):
        for f in files:
            path = os.path.join(folder, f)
            rel = os.path.relpath(path, project_dir)
            if not f.endswith(".safetensors") or rel.startswith("cache"):
                continue
            with safe_open(path, "pt") as fh:
                out[rel] = {k: fh.get_tensor(k) for k in fh.keys()}
                if rel.startswith("logs"):
                    out[rel]["ids"] = fh.metadata()
    return out


def log_mlp(root):
    model = make_mlp(seed=0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g)
    run = logix.init("mlp", root_dir=root, rank=2, shard_rows=16)
    run.watch(model)
    run.add_lora()
    run.setup({"grad": ["log", "covariance"], "forward": ["covariance"],
               "backward": ["covariance"]})
    run.save(True)
    for start in range(0, 40, 8):
        with run(data_id=list(range(start, start + 8))):
            F.cross_entropy(model(x[start:start + 8]), y[start:start + 8],
                            reduction="sum").backward()
    run.finalize()
    run.eval()
    with run(data_id=["q0", "q1", "q2"]):
        F.cross_entropy(model(x[:3] + 0.1), y[:3], reduction="sum").backward()
    return run, run.get_log(copy=True)


def log_conv(root):
    model = make_conv_model(dims=2, seed=0)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(12, 4, 7, 7, generator=g), torch.randint(0, 3, (12,), generator=g)
    run = logix.init("conv", root_dir=root)
    run.watch(model)
    run.setup({"grad": ["log", "covariance"]})
    run.save(True)
    for start in range(0, 12, 4):
        with run(data_id=[f"c{i}" for i in range(start, start + 4)], scale=2.0):
            F.cross_entropy(model(x[start:start + 4]), y[start:start + 4]).backward()
    run.finalize()
    run.eval()
    with run(data_id=["cq"]):
        F.cross_entropy(model(x[:1]), y[:1], reduction="sum").backward()
    return run, run.get_log(copy=True)


def log_embedding(root):
    model = make_embedding_model(seed=0)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 11, (10, 6), generator=g)
    mask = torch.ones(10, 6)
    mask[::2, 4:] = 0
    y = torch.randint(0, 3, (10,), generator=g)
    run = logix.init("emb", root_dir=root, rank=2)
    run.watch(model)
    run.add_lora()
    run.setup({"grad": ["log", "covariance"], "forward": ["covariance"],
               "backward": ["covariance"]})
    run.save(True)
    for start in range(0, 10, 5):
        with run(data_id=[f"e{i}" for i in range(start, start + 5)],
                 mask=mask[start:start + 5]):
            F.cross_entropy(model(ids[start:start + 5]), y[start:start + 5],
                            reduction="sum").backward()
    run.finalize()
    run.eval()
    with run(data_id=["eq0", "eq1"], mask=mask[:2]):
        F.cross_entropy(model(ids[:2]), y[:2], reduction="sum").backward()
    return run, run.get_log(copy=True)


def log_pca(root):
    model = make_mlp(seed=4)
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(24, 6, generator=g), torch.randint(0, 3, (24,), generator=g)
    run = logix.init("pca", root_dir=root, rank=2)
    run.watch(model)
    for _ in logix.LogIXScheduler(run, lora="pca", hessian="ekfac"):
        for start in range(0, 24, 6):
            with run(data_id=list(range(start, start + 6))):
                F.cross_entropy(model(x[start:start + 6]), y[start:start + 6],
                                reduction="sum").backward()
    run.eval()
    with run(data_id=["pq"]):
        F.cross_entropy(model(x[:1]), y[:1], reduction="sum").backward()
    return run, run.get_log(copy=True)


def log_checkpoints(root):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5, bias=False), nn.Tanh(), nn.Linear(5, 3, bias=False))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 4, generator=g), torch.randint(0, 3, (12,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    run = logix.init("ckpt", root_dir=root)
    run.watch(model)
    run.setup({"grad": ["log", "covariance"], "forward": ["covariance"],
               "backward": ["covariance"]})
    run.save(True)
    for name, segment in (("a", 0), ("b", 1)):
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        with run.checkpoint(name, segment=segment, lr=0.1, steps=5):
            for start in range(0, 12, 4):
                ids = list(range(start, start + 4))
                with run(data_id=ids):
                    F.cross_entropy(model(x[ids]), y[ids], reduction="sum").backward()
    run.finalize()
    run.eval()
    with run(data_id=["k0", "k1"]):
        F.cross_entropy(model(x[:2]), y[:2], reduction="sum").backward()
    return run, run.get_log(copy=True)


def main():
    torch.use_deterministic_algorithms(True)
    warnings.simplefilter("ignore")
    # A fixed folder: paths and project fingerprints are part of the results' meta.
    root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(tempfile.gettempdir(),
                                                              "logix-fingerprint")
    shutil.rmtree(root, ignore_errors=True)
    kw = {"progress": False}
    for maker in (log_mlp, log_conv, log_embedding, log_pca):
        run, query = maker(root)
        name = run.project
        show(f"{name} files", project_files(run.project_dir))
        show(f"{name} query log", {"ids": query.data_ids, "grads": query.grads})
        show(f"{name} statistics", run.statistics.state_dict())
        for hessian in run.influence.available_hessians():
            for mode in ("dot", "cosine", "l2"):
                if hessian == "lissa" and mode != "dot":
                    continue
                r = run.compute_influence_all(query, hessian=hessian, mode=mode, **kw)
                show(f"{name} all {hessian} {mode}", dict(r))
        show(f"{name} groups", dict(run.compute_influence_all(query, influence_groups="module",
                                                              **kw)))
        show(f"{name} topk", dict(run.compute_influence_all(query, topk=2, **kw)))
        show(f"{name} no precondition", dict(run.compute_influence_all(query,
                                                                        precondition=False,
                                                                        **kw)))
        out = os.path.join(root, f"{name}-scores.safetensors")
        r = run.compute_influence_all(query, out=out, **kw)
        show(f"{name} out", {k: v for k, v in dict(r).items() if k != "path"})
        show(f"{name} out file", dict(load_scores(out)))
        show(f"{name} pairwise", dict(run.compute_influence(query, query)))
        show(f"{name} self of query", self_keys(run.compute_self_influence(query)))
        show(f"{name} self of log", self_keys(run.compute_self_influence(**kw)))
        attributor = logix.Attributor(run.project_dir)
        show(f"{name} Attributor all", dict(attributor.compute_influence_all(query, **kw)))
    run, query = log_checkpoints(root)
    show("ckpt files", project_files(run.project_dir))
    attributor = logix.Attributor(run.project_dir)
    for method, extra in (("source", {}), ("source", {"hessian": "kfac"}), ("tracin", {}),
                          ("ensemble", {}), ("ensemble", {"mode": "cosine"}),
                          ("tracin", {"topk": 3}), ("source", {"topk": 3})):
        r = attributor.compute_influence_all(query, method=method, **extra, **kw)
        show(f"ckpt {method} {extra}", dict(r))
    print(f"(logs under {root})", file=sys.stderr)


if __name__ == "__main__":
    main()

"""Cost of the model-Hessian curvature kinds (``ggn``, ``hessian``: CG with Hessian-vector products
over the training loader) against ``raw`` (eigendecomposition of the logged rows' covariance),
for one block of queries, on two MLPs.

    python benchmarks/hessian_cost.py [--train 1000] [--queries 32] [--batch 100]
                                      [--damping 0.1 | relative]

* small: 16-32-32-4 tanh MLP, ~1.7k weights, every layer watched, unprojected (the exact Hessian).
* medium: 64-192-192-10 tanh MLP, ~51k weights, LoGra rank 16 (the projected Hessian M H M^T).
Both are trained for 100 full-batch SGD steps first. Damping: absolute 0.1 for every kind (the
peer comparison's regularisation; the trained models' Hessians are indefinite at the default
relative damping, which `--damping relative` uses). Prints seconds per query block, CG
iterations, loader passes and seconds per pass; ratios are against ``raw`` in the same run (the
machine is shared: report `uptime` with them).
"""

import argparse
import json
import os
import sys
import tempfile
import time

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import logix  # noqa: E402
from logix.errors import UsageError  # noqa: E402

MODELS = {"small": ((16, 32, 32, 4), None), "medium": ((64, 192, 192, 10), 16)}


def make_model(widths):
    torch.manual_seed(0)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def make_data(widths, n):
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(widths[-1], widths[0], generator=g) * 1.5
    y = torch.randint(0, widths[-1], (n,), generator=g)
    return centers[y] + torch.randn(n, widths[0], generator=g), y


def train(model, x, y, steps=100, lr=0.1):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def measure(name, n_train, n_query, batch, damping, root):
    widths, rank = MODELS[name]
    model = make_model(widths)
    x, y = make_data(widths, n_train + n_query)
    train(model, x[:n_train], y[:n_train])
    run = logix.init(name, root_dir=root)
    run.watch(model)
    if rank:
        run.add_lora(rank=rank)
    run.setup({"grad": ["log", "covariance"]})
    run.save(True)
    for start in range(0, n_train, batch):
        ids = list(range(start, min(start + batch, n_train)))
        with run(data_id=ids):
            F.cross_entropy(model(x[ids]), y[ids], reduction="sum").backward()
        model.zero_grad()
    run.finalize()
    run.eval()
    with run(data_id=[f"q{i}" for i in range(n_query)]):
        F.cross_entropy(model(x[n_train:]), y[n_train:], reduction="sum").backward()
    model.zero_grad()
    query = run.get_log(copy=True)
    loader = [(x[i:i + batch], y[i:i + batch]) for i in range(0, n_train, batch)]
    run.add_curvature_source(model, lambda out, b: F.cross_entropy(out, b[1]), loader,
                             max_iterations=1000, query_block=n_query)
    params = sum(p.numel() for p in model.parameters())
    rows = {}
    for kind in ("raw", "ggn", "hessian"):
        t0 = time.perf_counter()
        try:
            result = run.compute_influence_all(query, hessian=kind, damping=damping,
                                               progress=False)
        except UsageError as e:
            rows[kind] = {"refused": str(e)[:160]}
            continue
        seconds = time.perf_counter() - t0
        row = {"seconds": round(seconds, 3)}
        solver = result["meta"].get("solver")
        if solver:
            row.update(iterations=solver["iterations"][0], passes=solver["passes"],
                       seconds_per_pass=round(seconds / solver["passes"], 4),
                       final_residual=max(solver["final_residuals"]))
        rows[kind] = row
    for row in rows.values():
        if "seconds" in row:
            row["x_raw"] = round(row["seconds"] / rows["raw"]["seconds"], 1)
    return {"model": name, "params": params, "rank": rank or "full",
            "row_width": sum(m.dim for m in query.modules), "train": n_train,
            "queries": n_query, "batch": batch, "damping": damping or "relative", **rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--models", default="small,medium")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--damping", default="0.1", help="absolute damping, or 'relative'")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("load:", os.getloadavg(), flush=True)
    with tempfile.TemporaryDirectory() as root:
        for name in args.models.split(","):
            damping = None if args.damping == "relative" else float(args.damping)
            print(json.dumps(measure(name, args.train, args.queries, args.batch, damping, root)),
                  flush=True)
    print("load:", os.getloadavg(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

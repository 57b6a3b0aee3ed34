"""Attribution quality per byte logged: LDS (and brittleness) for every curvature, projection,
mode and method on four small cases.

    python benchmarks/quality.py                      # everything (~15-25 min on 2 shared cores)
    python benchmarks/quality.py --cases mlp,staged   # some cases
    python benchmarks/quality.py --out DIR --subsets 50 --brittle 5

Cases (synthetic data, so nothing is downloaded; seeds fixed):
* mlp: tabular, 4 Gaussian classes in 16 dimensions with label noise; MLP 16-32-32-4 (tanh),
  full-batch SGD (momentum 0.9).
* cnn: 8x8 single-channel "images" (a class-specific stroke pattern + noise, 4 classes);
  Conv2d(1,6,3) -> Conv2d(6,8,3) -> Linear(128,4).
* lm: a character language model on sequences of a small synthetic grammar (vocabulary 12,
  length 12); one causal self-attention block (q, k, v, o and a 2-layer MLP, all nn.Linear),
  d_model 24; loss summed over next-token predictions; Adam.
* staged: the mlp data, trained in two stages (stage 1: classes 0-1 only, 150 steps at lr 0.1;
  stage 2: every class, 40 steps at lr 0.02; momentum 0.9), two checkpoints per stage, so the
  final model is not converged on classes 2-3. Adds methods ensemble, tracin and source.

Every case: 240 training and 40 query examples. Logging passes: unprojected (full per-example
gradients of every tracked layer), random LoGra rank 8, PCA LoGra ranks 8 and 4; each with
the gradient covariance (raw) and forward/backward covariances (kfac, ekfac). Configurations:
curvature none / raw / kfac / ekfac / lissa x mode dot / cosine (lissa: dot only, depth 300).
LDS: `logix.evaluation.linear_datamodeling_score`, 50 random half subsets (--subsets), one
retraining seed, per-query losses, retrained outputs cached under --out/cache (resumable: a
rerun trains nothing). Brittleness: for the best configuration of each case and for random
scores, the first --brittle queries the model gets right; the fraction whose prediction flips
after removing their k = 10 / 20 / 40 most helpful examples. Results: --out/results.json, a
markdown table (printed, and --out/table.md) and --out/lds_vs_bytes.png (matplotlib, if
installed).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import logix
from logix.evaluation import brittleness, linear_datamodeling_score

N_TRAIN, N_QUERY = 240, 40
CURVATURES = ("none", "raw", "kfac", "ekfac", "lissa")
PROJECTIONS = (("none", None), ("random", 8), ("pca", 8), ("pca", 4))


# ============================================================================ cases
class Case:
    name = ""
    steps, lr, momentum = 200, 0.1, 0.9

    def __init__(self) -> None:
        self.x, self.y, self.qx, self.qy = self.data()

    def loss(self, model, x, y, reduction="sum"):
        return F.cross_entropy(model(x), y, reduction=reduction)

    def per_example_loss(self, model, x, y):
        return F.cross_entropy(model(x), y, reduction="none")

    def margin(self, model, x, y):
        logits = model(x)
        true = logits.gather(1, y[:, None])[:, 0]
        other = logits.scatter(1, y[:, None], -math.inf).max(1).values
        return true - other

    def train(self, indices, seed):
        torch.manual_seed(seed)
        model = self.model()
        opt = torch.optim.SGD(model.parameters(), lr=self.lr, momentum=self.momentum)
        for _ in range(self.steps):
            opt.zero_grad()
            self.loss(model, self.x[indices], self.y[indices], "mean").backward()
            opt.step()
        return model

    def eval_loss(self, model):
        with torch.no_grad():
            return self.per_example_loss(model, self.qx, self.qy)

    def eval_margin(self, model):
        with torch.no_grad():
            return self.margin(model, self.qx, self.qy)


def gaussian_tabular(seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, 16, generator=g) * 1.2
    y = torch.randint(0, 4, (N_TRAIN + N_QUERY,), generator=g)
    x = centers[y] + torch.randn(N_TRAIN + N_QUERY, 16, generator=g) * 1.5
    flip = torch.rand(N_TRAIN + N_QUERY, generator=g) < 0.1
    y = torch.where(flip, torch.randint(0, 4, y.shape, generator=g), y)
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


class MLPCase(Case):
    name = "mlp"

    def data(self):
        return gaussian_tabular()

    def model(self):
        return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                             nn.Linear(32, 4))


class CNNCase(Case):
    name = "cnn"
    steps, lr = 150, 0.05

    def data(self):
        g = torch.Generator().manual_seed(1)
        patterns = (torch.rand(4, 1, 8, 8, generator=g) > 0.6).float()
        n = N_TRAIN + N_QUERY
        y = torch.randint(0, 4, (n,), generator=g)
        shift = torch.randint(-1, 2, (n,), generator=g)
        x = torch.stack([torch.roll(patterns[c], int(s), dims=2) for c, s in zip(y, shift)])
        x = x + torch.randn(x.shape, generator=g) * 0.8
        return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]

    def model(self):
        return nn.Sequential(nn.Conv2d(1, 6, 3), nn.Tanh(), nn.Conv2d(6, 8, 3), nn.Tanh(),
                             nn.Flatten(), nn.Linear(128, 4))


class TinyLM(nn.Module):
    def __init__(self, vocab=12, d=24, length=12):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(length, d) * 0.1)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down, self.head = nn.Linear(d, 2 * d), nn.Linear(2 * d, d), nn.Linear(d,
                                                                                         vocab)

    def forward(self, ids):  # [B, T] -> [B, T, vocab]
        h = self.embed(ids) + self.pos[:ids.shape[1]]
        att = self.q(h) @ self.k(h).transpose(1, 2) / math.sqrt(h.shape[-1])
        causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).triu(1)
        h = h + self.o(att.masked_fill(causal, -math.inf).softmax(-1) @ self.v(h))
        h = h + self.down(torch.tanh(self.up(h)))
        return self.head(h)


class LMCase(Case):
    name = "lm"
    steps, lr = 120, 0.01

    def data(self):
        g = torch.Generator().manual_seed(2)
        n, length = N_TRAIN + N_QUERY, 12
        transition = torch.rand(12, 12, generator=g) ** 4  # a sparse Markov grammar
        seqs = torch.zeros(n, length, dtype=torch.long)
        seqs[:, 0] = torch.randint(0, 12, (n,), generator=g)
        for t in range(1, length):
            seqs[:, t] = torch.multinomial(transition[seqs[:, t - 1]], 1, generator=g)[:, 0]
        return seqs[:N_TRAIN], None, seqs[N_TRAIN:], None

    def model(self):
        return TinyLM()

    def per_example_loss(self, model, x, y):
        logits = model(x[:, :-1])
        return F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none").sum(1)

    def loss(self, model, x, y, reduction="sum"):
        per = self.per_example_loss(model, x, y)
        return per.sum() if reduction == "sum" else per.mean()

    def margin(self, model, x, y):  # the last token's prediction
        logits = model(x[:, :-1])[:, -1]
        target = x[:, -1]
        true = logits.gather(1, target[:, None])[:, 0]
        return true - logits.scatter(1, target[:, None], -math.inf).max(1).values

    def train(self, indices, seed):
        torch.manual_seed(seed)
        model = self.model()
        opt = torch.optim.Adam(model.parameters(), lr=self.lr)
        for _ in range(self.steps):
            opt.zero_grad()
            self.loss(model, self.x[indices], None, "mean").backward()
            opt.step()
        return model


class StagedCase(MLPCase):
    name = "staged"
    # (segment, classes trained on, steps, lr); two checkpoints per stage
    stages = ((0, (0, 1), 150, 0.1), (1, (0, 1, 2, 3), 40, 0.02))

    def train(self, indices, seed, checkpoints=None):
        torch.manual_seed(seed)
        model = self.model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=self.momentum)
        for segment, classes, steps, lr in self.stages:
            members = self.members(indices, classes)
            for group in opt.param_groups:
                group["lr"] = lr
            for step in range(steps):
                opt.zero_grad()
                self.loss(model, self.x[members], self.y[members], "mean").backward()
                opt.step()
                if checkpoints is not None and step + 1 in (steps // 2, steps):
                    checkpoints.append((f"s{segment}-{step + 1}", segment, lr, steps,
                                        members.tolist(),
                                        {k: v.clone() for k, v in model.state_dict().items()}))
        return model

    def members(self, indices, classes):
        keep = torch.isin(self.y[indices], torch.tensor(classes))
        return indices[keep]


CASES = {c.name: c for c in (MLPCase, CNNCase, LMCase, StagedCase)}


# ============================================================================ logging
def log_pass(case, model, root, project, init, rank):
    """One logging pass at the model's weights; returns (run, query log, bytes per example)."""
    run = logix.init(project, root_dir=str(root))
    run.watch(model)
    everything = {"grad": ["log", "covariance"], "forward": ["covariance"],
                  "backward": ["covariance"]}
    if init == "pca":
        run.setup({"forward": ["covariance"], "backward": ["covariance"]})
        run.save(False)
        steps(run, case, model, range(N_TRAIN))
        run.add_lora(init="pca", rank=rank)
    elif init == "random":
        run.add_lora(init="random", rank=rank)
    run.setup(everything)
    run.save(True)
    steps(run, case, model, range(N_TRAIN))
    run.finalize()
    return run


def steps(run, case, model, ids, batch=40):
    ids = list(ids)
    for start in range(0, len(ids), batch):
        part = ids[start:start + batch]
        with run(data_id=part):
            case.loss(model, case.x[part], None if case.y is None else case.y[part]).backward()
        model.zero_grad()


def query_log(run, case, model):
    run.eval()
    with run(data_id=[f"q{i}" for i in range(N_QUERY)]):
        case.loss(model, case.qx, case.qy).backward()
    model.zero_grad()
    return run.get_log(copy=True)


def row_bytes(run) -> int:
    return sum(m.dim for m in run.layout()) * 4


# ============================================================================ scoring
def score_grid(case, model, root):
    """{config name: (scores [n_query, n_train], bytes per example, extra)}."""
    out = {}
    for init, rank in PROJECTIONS:
        label = "full" if init == "none" else f"{init}{rank}"
        run = log_pass(case, model, root, f"{case.name}-{label}", init, rank)
        test = query_log(run, case, model)
        run.config.influence.lissa_depth = 300
        for hessian in CURVATURES:
            for mode in ("dot", "cosine"):
                if hessian == "lissa" and mode == "cosine":
                    continue
                t0 = time.time()
                result = run.compute_influence_all(test, hessian=hessian, mode=mode,
                                                   progress=False)
                extra = {"seconds": time.time() - t0}
                if "solver" in result["meta"]:
                    extra["lissa_residual"] = result["meta"]["solver"]["residuals"][-1]
                out[f"influence {hessian} {mode} {label}"] = (
                    aligned(result), row_bytes(run), extra)
    return out


def aligned(result):
    ids = result["tgt_ids"]
    order = torch.tensor([ids.index(i) for i in range(N_TRAIN)])
    return result["influence"][:, order].double()


def staged_methods(case, root):
    """Ensemble, TracIn and SOURCE over logged checkpoints of the staged procedure."""
    checkpoints = []
    model = case.train(torch.arange(N_TRAIN), 0, checkpoints)
    out = {}
    for init, rank in (("none", None), ("random", 8)):
        label = "full" if init == "none" else f"{init}{rank}"
        run = logix.init(f"staged-ckpt-{label}", root_dir=str(root))
        run.watch(model)
        if init == "random":
            run.add_lora(init="random", rank=rank)
        run.setup({"grad": ["log", "covariance"], "forward": ["covariance"],
                   "backward": ["covariance"]})
        run.save(True)
        final = {k: v.clone() for k, v in model.state_dict().items()}
        for name, segment, lr, n_steps, members, weights in checkpoints:
            model.load_state_dict(weights)
            with run.checkpoint(name, segment=segment, lr=lr, steps=n_steps // 2,
                                momentum=case.momentum, train_ids=members):
                steps(run, case, model, members)
        run.finalize()
        queries = {}
        for name, *_, weights in checkpoints:
            model.load_state_dict(weights)
            queries[name] = query_log(run, case, model)
        model.load_state_dict(final)
        test = query_log(run, case, model)
        size = row_bytes(run) * len(checkpoints)
        for hessian in ("raw", "kfac", "ekfac"):
            out[f"source {hessian} dot {label}"] = (aligned(run.compute_influence_all(
                test, method="source", hessian=hessian, progress=False)), size, {})
            out[f"ensemble {hessian} dot {label}"] = (aligned(run.compute_influence_all(
                queries, method="ensemble", hessian=hessian, progress=False)), size, {})
        out[f"tracin none dot {label}"] = (aligned(run.compute_influence_all(
            queries, method="tracin", progress=False)), size, {})
    return model, out


# ============================================================================ main
def evaluate(case, scores, cache, subsets):
    result = linear_datamodeling_score(case.train, case.eval_loss, scores, n_subsets=subsets,
                                       cache_dir=cache, progress=False)
    return float(result["lds"])


def run_case(case, out_dir, subsets, n_brittle):
    root = out_dir / "logs" / case.name
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.time()
    if case.name == "staged":
        model, grid = staged_methods(case, root)
        grid.update(score_grid(case, model, root))
    else:
        model = case.train(torch.arange(N_TRAIN), 0)
        grid = score_grid(case, model, root)
    grid["random"] = (torch.randn(N_QUERY, N_TRAIN, generator=torch.Generator().manual_seed(9),
                                  dtype=torch.float64), 0, {})
    cache = out_dir / "cache" / case.name
    rows = []
    for name, (scores, size, extra) in grid.items():
        rows.append({"case": case.name, "config": name, "bytes": size,
                     "lds": evaluate(case, scores, cache, subsets), **extra})
    best = max((r for r in rows if r["config"] != "random"), key=lambda r: r["lds"])
    if n_brittle:
        base = case.eval_margin(model)
        right = [i for i in range(N_QUERY) if base[i] > 0][:n_brittle]
        for r in rows:
            if r is best or r["config"] == "random":
                found = brittleness(case.train, case.eval_margin, grid[r["config"]][0].float(),
                                    test_index=right, ks=(10, 20, 40), n_random=0)
                r["brittle_flipped"] = sum(f.k_flip is not None for f in found) / len(found)
    print(f"{case.name}: {len(rows)} configurations in {time.time() - t0:.0f} s; best "
          f"{best['config']} LDS {best['lds']:.3f}", flush=True)
    return rows


def render(rows):
    lines = ["| case | configuration | bytes/example | LDS | brittleness (flipped at k<=40) |",
             "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["case"], -r["lds"])):
        flip = f"{r['brittle_flipped']:.0%}" if "brittle_flipped" in r else ""
        lines.append(f"| {r['case']} | {r['config']} | {r['bytes']} | {r['lds']:.3f} | {flip} |")
    return "\n".join(lines)


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot.")
        return
    cases = sorted({r["case"] for r in rows})
    fig, axes = plt.subplots(1, len(cases), figsize=(4 * len(cases), 3.6), squeeze=False)
    for ax, case in zip(axes[0], cases):
        for r in rows:
            if r["case"] != case or r["config"] == "random":
                continue
            method, hessian = r["config"].split()[:2]
            marker = {"influence": "o", "source": "*", "ensemble": "s", "tracin": "^"}[method]
            color = {"none": "gray", "raw": "C0", "kfac": "C1", "ekfac": "C2",
                     "lissa": "C3"}[hessian]
            ax.scatter(r["bytes"], r["lds"], marker=marker, color=color, s=30)
        ax.set_xscale("log")
        ax.set_title(case)
        ax.set_xlabel("bytes logged per example")
        ax.set_ylabel("LDS")
    handles = [plt.Line2D([], [], color=c, marker="o", ls="", label=h) for h, c in
               (("none", "gray"), ("raw", "C0"), ("kfac", "C1"), ("ekfac", "C2"),
                ("lissa", "C3"))]
    handles += [plt.Line2D([], [], color="k", marker=m, ls="", label=k) for k, m in
                (("influence", "o"), ("source", "*"), ("ensemble", "s"), ("tracin", "^"))]
    fig.legend(handles=handles, loc="lower center", ncol=9, fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--subsets", type=int, default=50)
    parser.add_argument("--brittle", type=int, default=5, help="queries per brittleness test")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/quality"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.cases.split(","):
        if name not in CASES:
            parser.error(f"unknown case {name!r}; cases: {list(CASES)}")
        rows += run_case(CASES[name](), args.out, args.subsets, args.brittle)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    table = render(rows)
    (args.out / "table.md").write_text(table + "\n")
    print(table)
    plot(rows, args.out / "lds_vs_bytes.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

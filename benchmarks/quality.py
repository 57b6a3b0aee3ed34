"""Attribution quality per byte logged: LDS (and brittleness) for every curvature, projection,
mode and method on four small cases.

    python benchmarks/quality.py                      # everything (~15-25 min on 2 shared cores)
    python benchmarks/quality.py --cases mlp,staged   # some cases
    python benchmarks/quality.py --out DIR --subsets 50 --brittle 5
    python benchmarks/quality.py --make-peer-venv DIR  # also the original LogIX 0.1.1 (a venv)

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

The original LogIX (PyPI logix-ai 0.1.1, whose import name `logix` clashes with this library's)
runs in a subprocess under a separate venv: `--peer-venv PATH` uses an existing one,
`--make-peer-venv PATH` creates it first. `_peer_logix.py` gets each case's trained weights and
data, logs and scores with every projection (its own LoRA), curvature (none, raw, kfac, ekfac)
and mode that 0.1.1 has, and hands back the score matrices; LDS is computed here with the same
cached retrainings (rows `logix0.1.1 ...`). A configuration that fails keeps its error text in
results.json and the table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import logix
from logix.evaluation import brittleness, linear_datamodeling_score

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _quality_cases import CASES, N_QUERY, N_TRAIN  # noqa: E402  (shared with _peer_logix.py)

PEER = "logix0.1.1"
PEER_PACKAGES = ("torch==2.13.0", "numpy", "einops", "pyyaml", "tqdm", "safetensors", "rich")
CURVATURES = ("none", "raw", "kfac", "ekfac", "lissa")
PROJECTIONS = (("none", None), ("random", 8), ("pca", 8), ("pca", 4))


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


# ============================================================================ LogIX 0.1.1
def make_peer_venv(path: Path) -> None:
    """Create a venv with LogIX 0.1.1 at `path` (kept if it already imports logix 0.1.1)."""
    python = path / "bin" / "python"
    check = [str(python), "-I", "-c", "import logix, sys; sys.exit(logix.__version__ != '0.1.1')"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
    # 0.1.1 declares requirements (an old torch, a python range) that this setup replaces
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps",
                    "--ignore-requires-python", "logix-ai==0.1.1"], check=True)


def peer_grid(case, model, python, root):
    """LogIX 0.1.1's scores on this case: {config: (scores, bytes, extra)} and
    {config: error text} for configurations that failed (or all, if the worker did)."""
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        inp, outp = Path(tmp) / "in.pt", Path(tmp) / "out.pt"
        torch.save({"case": case.name, "state": model.state_dict(), "x": case.x, "y": case.y,
                    "qx": case.qx, "qy": case.qy, "projections": PROJECTIONS,
                    "root": str(root)}, inp)
        t0 = time.time()
        proc = subprocess.run([str(python), str(HERE / "_peer_logix.py"), str(inp), str(outp)],
                              capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0 or not outp.exists():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
            return {}, {f"{PEER} (worker)": f"rc={proc.returncode}: {tail}"}
        found = torch.load(outp)
    print(f"{case.name}: LogIX {found['version']} scored in {time.time() - t0:.0f} s",
          flush=True)
    grid, errors = {}, {}
    for name, c in found["configs"].items():
        if "error" in c:
            errors[name] = c["error"]
        else:
            grid[name] = (c["scores"], c["bytes"], {"seconds": c["seconds"]})
    return grid, errors


# ============================================================================ main
def evaluate(case, scores, cache, subsets):
    result = linear_datamodeling_score(case.train, case.eval_loss, scores, n_subsets=subsets,
                                       cache_dir=cache, progress=False)
    return float(result["lds"])


def run_case(case, out_dir, subsets, n_brittle, peer_python=None):
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
    errors = {}
    if peer_python is not None:
        found, errors = peer_grid(case, model, peer_python, root / "peer")
        grid.update(found)
    cache = out_dir / "cache" / case.name
    rows = []
    for name, (scores, size, extra) in grid.items():
        rows.append({"case": case.name, "config": name, "bytes": size,
                     "lds": evaluate(case, scores, cache, subsets), **extra})
    rows += [{"case": case.name, "config": name, "bytes": None, "lds": None, "error": text}
             for name, text in errors.items()]
    best = best_of(rows, ours=True)
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


def best_of(rows, ours):
    """The best row among this library's configurations (ours=True) or LogIX 0.1.1's."""
    pool = [r for r in rows if r["lds"] is not None and r["config"] != "random"
            and r["config"].startswith(PEER) != ours]
    return max(pool, key=lambda r: r["lds"]) if pool else None


def render(rows):
    lines = ["| case | configuration | bytes/example | LDS | brittleness (flipped at k<=40) |",
             "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["case"], r["lds"] is None, -(r["lds"] or 0))):
        flip = f"{r['brittle_flipped']:.0%}" if "brittle_flipped" in r else ""
        lds = f"{r['lds']:.3f}" if r["lds"] is not None else "failed: " + one_line(r["error"])
        size = "-" if r["bytes"] is None else r["bytes"]
        lines.append(f"| {r['case']} | {r['config']} | {size} | {lds} | {flip} |")
    return "\n".join(lines)


def one_line(text):
    return text.strip().splitlines()[-1].replace("|", "/")[:160]


def render_summary(rows):
    """Per case: this library's best LDS, LogIX 0.1.1's best, exact full-gradient influence."""
    lines = ["| case | ours: best | LDS | LogIX 0.1.1: best | LDS | exact (influence raw dot "
             "full) |", "|---|---|---|---|---|---|"]
    for case in sorted({r["case"] for r in rows}):
        part = [r for r in rows if r["case"] == case]
        cells = []
        for best in (best_of(part, ours=True), best_of(part, ours=False)):
            cells += [best["config"], f"{best['lds']:.3f}"] if best else ["-", "-"]
        exact = [r["lds"] for r in part if r["config"] == "influence raw dot full"]
        cells.append(f"{exact[0]:.3f}" if exact else "-")
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
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
            if r["case"] != case or r["config"] == "random" or r["lds"] is None:
                continue
            method, hessian = r["config"].split()[:2]
            marker = {"influence": "o", "source": "*", "ensemble": "s", "tracin": "^",
                      PEER: "x"}[method]
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
                (("influence", "o"), ("source", "*"), ("ensemble", "s"), ("tracin", "^"),
                 ("LogIX 0.1.1", "x"))]
    fig.legend(handles=handles, loc="lower center", ncol=10, fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--subsets", type=int, default=50)
    parser.add_argument("--brittle", type=int, default=5, help="queries per brittleness test")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/quality"))
    peer = parser.add_mutually_exclusive_group()
    peer.add_argument("--peer-venv", type=Path, help="a venv with LogIX 0.1.1 (logix-ai)")
    peer.add_argument("--make-peer-venv", type=Path, help="create that venv here, then use it")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.cases.split(","):
        if name not in CASES:
            parser.error(f"unknown case {name!r}; cases: {list(CASES)}")
    if args.make_peer_venv:
        make_peer_venv(args.make_peer_venv)
    venv = args.make_peer_venv or args.peer_venv
    peer_python = None
    if venv is not None:
        peer_python = venv.resolve() / "bin" / "python"
        if not peer_python.exists():
            parser.error(f"--peer-venv {venv}: no bin/python there; create it with "
                         f"--make-peer-venv {venv}")
    rows = []
    for name in args.cases.split(","):
        rows += run_case(CASES[name](), args.out, args.subsets, args.brittle, peer_python)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    table = render(rows) + "\n\n" + render_summary(rows)
    (args.out / "table.md").write_text(table + "\n")
    print(table)
    plot(rows, args.out / "lds_vs_bytes.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

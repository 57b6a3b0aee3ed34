"""Attribution quality per byte logged: LDS (and brittleness) for every curvature, projection,
mode, damping and method on thirteen small cases, next to the original LogIX, Kronfluence, TRAK
and dattri.

    python benchmarks/quality.py                      # ours only, 10 seeds (see below)
    python benchmarks/quality.py --cases mlp,staged   # some cases
    python benchmarks/quality.py --out DIR --subsets 50 --seeds 0,1,2 --brittle 5
    python benchmarks/quality.py --make-peer-venv DIR --make-kronfluence-venv DIR2 \\
        --make-trak-venv DIR3 --make-dattri-venv DIR4   # + peers (then --peer-venv DIR ...)
    python benchmarks/quality.py --cases mlp,staged --magic-cases mlp,staged --seeds 0,1,2
                                        # MAGIC and the single-model ground truth on both
    python benchmarks/quality.py --magic-cases ""   # without MAGIC (default: on mlp, which
                                        # adds 3 x 50 single-model retrainings per seed)
    python benchmarks/quality.py --include-bias     # our logging passes log the bias
                                        # gradients too (logging.include_bias)

Cases (synthetic data, or scikit-learn's bundled data sets, so nothing is downloaded; seeds
fixed):
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
* attn: a transformer classifier: sequences of 10 tokens (vocabulary 16) whose class's 3 marker
  tokens fill each position with probability 0.25 (else uniform), 10% label noise; one
  bidirectional self-attention block (q, k, v, o, a 2-layer MLP), d_model 16, mean-pooled, a
  linear head; Adam.
* breast_cancer: scikit-learn's Wisconsin breast cancer (30 features, 2 classes, standardised);
  MLP 30-32-32-2 (tanh), trained as mlp.
* digits: scikit-learn's 8x8 handwritten digits (10 classes); the cnn's layers with 10 outputs.
* digits_early, digits_mlp: held out of the fit of the ggn / hessian kinds' auto damping:
  digits' CNN stopped after 20 of its 150 Adam steps (short of convergence), and the digits
  pixels into an MLP 64-32-32-10 (tanh, fitted).
* diabetes3, moons, bc_adamw, digits_relu: a second set held out of every damping rule's fit:
  scikit-learn's diabetes table with its target cut into tertiles (MLP 10-32-32-3, ReLU, Adam;
  memorises its training rows), make_moons with noise 0.3 (MLP 2-32-32-2, tanh, SGD; short of
  a perfect fit), breast_cancer drawn with another seed into a ReLU MLP trained by AdamW
  (weight decay 0.05), and the digits pixels into a ReLU MLP 64-48-10 (Adam, 60 steps).

MAGIC (--magic-cases, default mlp): the attributed run is recorded with `logix.MagicRecorder`
(a checkpoint every 20 steps) and the queries are scored by exact metagradients
(`logix.magic_scores`, row "magic exact dot replay"; its bytes/example are the record's bytes
over the 240 examples). On these cases every estimator is also scored against a single-model
ground truth: the attributed run itself (seed 0, same full-batch steps) retrained with the
examples outside each subset given weight 0 (`Case.train_removed`), at 50%, 95% and 99% of the
examples kept (columns "single-model LDS, ...% kept"; seed s draws the subsets, the run keeps seed
0). The MAGIC table compares it with the best other configuration on each ground truth and
gives its cost beside a plain training run.

Every case: 240 training and 40 query examples; the attributed model is trained with seed 0.
Logging passes: unprojected (full per-example gradients of every tracked layer), random LoGra
rank 8, PCA LoGra ranks 8 and 4; each with the gradient covariance (raw) and forward/backward
covariances (kfac, ekfac). Configurations: curvature none / raw / kfac / ekfac / lissa / full x
mode dot / cosine at the default damping, `auto` (lissa: dot only, depth 300), and raw / kfac /
ekfac with dot at relative damping 1e-4 ... 10 (rows suffixed " dX"; the default has no suffix);
on the labelled cases the model's own ggn / hessian (CG over the training set) at the default
damping and at absolute damping 0.01, 0.1 and 1 (rows suffixed " aX"). The auto table puts each
auto row beside the best swept damping of the same curvature and projection; on staged, SOURCE
also runs undamped (" d0", its form before auto).
LDS: `logix.evaluation.linear_datamodeling_score`, 50 random half subsets (--subsets) per
retraining seed (--seeds): seed s draws its own subsets (subset_seed=s) and retrains with seed
s, cached under --out/cache/CASE/seed{s} (resumable: a rerun trains nothing). A seed is 50
trainings per case (one training, one thread, on the shared 2-core VM at load 3: mlp 0.1 s, cnn
0.4 s, attn 0.8 s, lm 2.8 s), ~3.5 min for the five cases, so 10 seeds take ~35 min there; the
peers add ~2 (mlp) to ~20 (attn: dattri's explicit Hessian, once per regularisation) min per
case on the busy VM. Rows report the mean and std over seeds; the summary compares this
library's best with each peer's best by a one-sided paired t-test over the same seeds (95%).
(Each tool's best is picked by its mean over the same seeds, which favours tools with more
configurations a little.) Brittleness: for the best configuration of each case and for random
scores, the first --brittle queries the model gets right; the fraction whose prediction flips
after removing their k = 10 / 20 / 40 most helpful examples. Results: --out/results.json,
markdown tables (printed, and --out/table.md: every row, the per-case summary, each tool's
default configuration beside its tuned best (ours and LogIX 0.1.1 per projection, dattri per
method), the damping sweep averaged over cases) and --out/lds_vs_bytes.png (matplotlib, if
installed).

Peers run in subprocesses under venvs of their own (their import names can clash with this
library's, and their requirements with its pins); `--peer-venv PATH` / `--kronfluence-venv
PATH` use existing ones, `--make-peer-venv PATH` / `--make-kronfluence-venv PATH` create them
first (torch==2.13.0 installed first, so no CUDA build is pulled). Each worker gets the trained
weights and data and hands back score matrices; LDS is computed here with the same cached
retrainings. `_peer_logix.py` (PyPI logix-ai 0.1.1, rows `logix0.1.1 ...`): every projection
(its own LoRA), curvature (none, raw, kfac, ekfac) and mode that 0.1.1 has.
`_peer_kronfluence.py` (PyPI kronfluence 1.0.1, rows `kronfluence ...`): EK-FAC and K-FAC with
its defaults (true Fisher, damping 1e-8) and with its damping heuristic (0.1 x mean eigenvalue,
" d0.1"). `_peer_trak.py` (PyPI traker 0.3.2, rows `trak ...`; its CPU projector, one checkpoint):
its defaults (proj_dim 2048, float16, lambda 0), then proj_dim 128 / 512 / 2048 in float32 with
lambda 0 and 1e-3 ... 1000 x the mean eigenvalue of XᵀX. `_peer_dattri.py` (PyPI dattri 0.3.0,
rows `dattri ...`): explicit-inverse and CG influence on the exact Hessian, EK-FAC (nn.Linear)
and TRAK (proj_dim 512), each at its default regularisation 0 and at 1e-3 ... 100 (absolute).
Their workers take only classification cases' TRAK (the lm case gets error rows there). A
configuration that fails keeps its error text in results.json and the table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

import logix
from logix.errors import UsageError
from logix.evaluation import brittleness, linear_datamodeling_score

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _quality_cases import CASES, N_QUERY, N_TRAIN  # noqa: E402  (shared with _peer_logix.py)

CURVATURES = ("auto", "none", "raw", "kfac", "ekfac", "lissa", "full")
PROJECTIONS = (("none", None), ("random", 8), ("pca", 8), ("pca", 4))
# also logged with true-Fisher K-FAC factors (a statistics pass on sampled labels; rows "-tf")
FISHER_PROJECTIONS = (("none", None), ("pca", 8))
DEFAULT_DAMPING = "auto"  # influence.damping's default; its rows carry no " d..." suffix
DAMPINGS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # relative damping swept: raw, kfac, ekfac, dot
MAGIC_EVERY = 20  # training steps between MAGIC's replay checkpoints
MAGIC_CONFIG = "magic exact dot replay"
SINGLE_FRACTIONS = (0.5, 0.95, 0.99)  # fractions kept in the single-model ground truth's subsets
# one-sided 95% Student t quantiles by degrees of freedom, for the paired seed comparison
T95 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860,
       9: 1.833}


@dataclass(frozen=True)
class Peer:
    """Another tool run in its own venv: `install` is a list of pip argument lists, run in
    order (torch first, so that nothing pulls a CUDA build); `check` imports it there."""
    name: str
    worker: str
    install: tuple
    check: str


PEERS = {
    "logix0.1.1": Peer(
        "logix0.1.1", "_peer_logix.py",
        (("torch==2.13.0",),
         ("torch==2.13.0", "numpy", "einops", "pyyaml", "tqdm", "safetensors", "rich"),
         # 0.1.1 declares requirements (an old torch, a python range) that this replaces
         ("--no-deps", "--ignore-requires-python", "logix-ai==0.1.1")),
        "import logix, sys; sys.exit(logix.__version__ != '0.1.1')"),
    "kronfluence": Peer(
        "kronfluence", "_peer_kronfluence.py",
        (("torch==2.13.0",),
         # what kronfluence 1.0.1 imports, pinned; torch stays the CPU build (its torchvision
         # requirement is never imported)
         ("torch==2.13.0", "accelerate==1.15.0", "einops==0.8.2", "einconv==0.1.0",
          "opt-einsum==3.4.0", "safetensors", "tqdm", "numpy"),
         ("--no-deps", "kronfluence==1.0.1")),
        "import kronfluence, sys; sys.exit(kronfluence.__version__ != '1.0.1')"),
    "trak": Peer(
        "trak", "_peer_trak.py",
        (("torch==2.13.0",),
         ("torch==2.13.0", "numpy", "tqdm"),
         # its CPU projector needs nothing else (fast_jl, the GPU one, is an extra)
         ("--no-deps", "traker==0.3.2")),
        "import importlib.metadata as m, sys, trak; sys.exit(m.version('traker') != '0.3.2')"),
    "dattri": Peer(
        "dattri", "_peer_dattri.py",
        (("torch==2.13.0",),
         # what dattri.algorithm imports; its pretty_midi requirement (a music data set's
         # loader) is never imported
         ("torch==2.13.0", "numpy", "scipy", "pyyaml", "tqdm"),
         ("--no-deps", "dattri==0.3.0")),
        "import dattri.algorithm, importlib.metadata as m, sys; "
        "sys.exit(m.version('dattri') != '0.3.0')"),
}
# each peer's command-line flags (--FLAG-venv, --make-FLAG-venv) and what its venv holds
PEER_FLAGS = {"logix0.1.1": ("peer", "LogIX 0.1.1 (logix-ai)"),
              "kronfluence": ("kronfluence", "kronfluence 1.0.1"),
              "trak": ("trak", "TRAK (traker 0.3.2)"), "dattri": ("dattri", "dattri 0.3.0")}


# ============================================================================ logging
def log_pass(case, model, root, project, init, rank, fisher=False, log_dtype="float32",
             include_bias=False):
    """One logging pass at the model's weights; returns the run. include_bias: the layers' bias
    gradients are logged too (logging.include_bias). fisher=True: the forward and
    backward covariances (K-FAC's factors, EK-FAC's basis) come from a statistics pass whose
    labels are sampled from the model's predictions (the true Fisher, as Kronfluence does by
    default) instead of the logging pass's true labels (the empirical Fisher)."""
    run = logix.init(project, root_dir=str(root), log_dtype=log_dtype, include_bias=include_bias)
    run.watch(model)
    factors = {"forward": ["covariance"], "backward": ["covariance"]}
    if init == "pca":
        run.setup(factors)
        run.save(False)
        steps(run, case, model, range(N_TRAIN), sampled=fisher)
        run.add_lora(init="pca", rank=rank)
    elif init == "random":
        run.add_lora(init="random", rank=rank)
    if fisher:
        run.setup(factors)
        run.save(False)
        steps(run, case, model, range(N_TRAIN), sampled=True)
        run.setup({"grad": ["log", "covariance"]})
    else:
        run.setup({"grad": ["log", "covariance"], **factors})
    run.save(True)
    steps(run, case, model, range(N_TRAIN))
    run.finalize()
    return run


def steps(run, case, model, ids, batch=40, sampled=False):
    """Forward and backward over `ids` in batches under the run; sampled=True: with labels drawn
    from the model's predictions (seeded), for true-Fisher statistics."""
    ids = list(ids)
    generator = torch.Generator().manual_seed(0)
    for start in range(0, len(ids), batch):
        part = ids[start:start + batch]
        with run(data_id=part):
            if sampled:
                loss = case.sampled_loss(model, case.x[part], generator)
            else:
                loss = case.loss(model, case.x[part], None if case.y is None else case.y[part])
            loss.backward()
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
def score_grid(case, model, root, include_bias=False):
    """{config name: (scores [n_query, n_train], bytes per example, extra)}."""
    out = {}
    passes = [(init, rank, False) for init, rank in PROJECTIONS]
    passes += [(init, rank, True) for init, rank in FISHER_PROJECTIONS]
    for init, rank, fisher in passes:
        label = ("full" if init == "none" else f"{init}{rank}") + ("-tf" if fisher else "")
        run = log_pass(case, model, root, f"{case.name}-{label}", init, rank, fisher,
                       include_bias=include_bias)
        test = query_log(run, case, model)
        run.config.influence.lissa_depth = 300
        for hessian, mode, damping in grid_configs(("kfac", "ekfac") if fisher else CURVATURES):
            run.config.influence.relative_damping = None if damping == "auto" else damping
            t0 = time.time()
            result = run.compute_influence_all(test, hessian=hessian, mode=mode, progress=False)
            extra = {"seconds": time.time() - t0}
            if "solver" in result["meta"]:
                extra["lissa_residual"] = result["meta"]["solver"]["residuals"][-1]
            suffix = "" if damping == DEFAULT_DAMPING else f" d{damping:g}"
            out[f"influence {hessian} {mode} {label}{suffix}"] = (
                aligned(result), row_bytes(run), extra)
        if not fisher and case.y is not None:
            out.update(model_hessian_rows(case, model, run, test, label))
    return out


MODEL_HESSIAN_DAMPINGS = ("auto", 0.01, 0.1, 1.0)


def add_curvature_source(run, case, model):
    """The case's training set as the run's curvature source (one batch, its mean
    cross-entropy), for the hessian / ggn kinds."""
    run.add_curvature_source(model, lambda out, batch: F.cross_entropy(out, batch[1]),
                             [(case.x, case.y)], forward=lambda f, b: case.logits(f, b[0]))


def model_hessian_rows(case, model, run, test, label):
    """hessian / ggn (CG with Hessian-vector products over the training set, one batch) at the
    default damping and at absolute dampings 0.01, 0.1 (the peers' default sweep point) and 1
    (rows " aX"). A setting the solver refuses (an indefinite Hessian, no convergence in 500
    iterations) gives no row; the reason is printed."""
    add_curvature_source(run, case, model)
    out = {}
    for hessian in ("ggn", "hessian"):
        for damping in MODEL_HESSIAN_DAMPINGS:
            name = f"influence {hessian} dot {label}" + (
                "" if damping == "auto" else f" a{damping:g}")
            t0 = time.time()
            try:
                result = run.compute_influence_all(test, hessian=hessian, damping=damping,
                                                   progress=False)
            except UsageError as error:
                print(f"{case.name}: {name}: refused: {str(error)[:160]}")
                continue
            extra = {"seconds": time.time() - t0,
                     "cg_iterations": result["meta"]["solver"]["iterations"]}
            out[name] = (aligned(result), row_bytes(run), extra)
    return out


def grid_configs(curvatures):
    """(hessian, mode, relative damping): each curvature and mode at the default damping
    (lissa: dot only), and the damping sweep for raw, kfac and ekfac with dot."""
    for hessian in curvatures:
        for mode in ("dot", "cosine"):
            if not (hessian == "lissa" and mode == "cosine"):
                yield hessian, mode, DEFAULT_DAMPING
    for hessian in ("raw", "kfac", "ekfac"):
        if hessian not in curvatures:
            continue
        for damping in DAMPINGS:
            yield hessian, "dot", damping


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
            for damping, suffix in ((None, ""), (0.0, " d0")):
                out[f"source {hessian} dot {label}{suffix}"] = (aligned(run.compute_influence_all(
                    test, method="source", hessian=hessian, damping=damping, progress=False)),
                    size, {})
            out[f"ensemble {hessian} dot {label}"] = (aligned(run.compute_influence_all(
                queries, method="ensemble", hessian=hessian, progress=False)), size, {})
        out[f"tracin none dot {label}"] = (aligned(run.compute_influence_all(
            queries, method="tracin", progress=False)), size, {})
    return model, out


def magic_method(case, root):
    """MAGIC: record the attributed run (seed 0, the steps of case.train), then score the
    queries by exact metagradients. extra: its cost beside a plain training run."""
    folder = root / "magic"
    shutil.rmtree(folder, ignore_errors=True)
    everything = torch.arange(N_TRAIN)
    t0 = time.perf_counter()
    plain = case.train(everything, 0)
    train_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = case.train(everything, 0, record=lambda m, opt: logix.MagicRecorder(
        folder, m, opt, every=MAGIC_EVERY, seed=0))
    record_seconds = time.perf_counter() - t0
    result = logix.magic_scores(folder, case.model(), case.magic_loss, case.per_example_batch,
                                (case.qx, case.qy), progress=False)
    meta = result["meta"]
    disk = sum(f.stat().st_size for f in folder.iterdir())
    extra = {"seconds": meta["seconds"], "train_seconds": train_seconds,
             "record_seconds": record_seconds, "steps": meta["steps"],
             "replays": meta["replays"], "states_held": meta["states_held"],
             "record_bytes": disk, "replay_error": meta["replay_error"],
             "same_as_plain": all(torch.equal(a, b) for a, b in
                                  zip(plain.parameters(), model.parameters()))}
    print(f"{case.name}: MAGIC {meta['steps']} steps, {N_QUERY} queries in "
          f"{meta['seconds']:.1f} s (plain training {train_seconds:.2f} s)", flush=True)
    return {MAGIC_CONFIG: (aligned(result), disk // N_TRAIN, extra)}


# ============================================================================ peers
def make_venv(path: Path, peer: Peer) -> None:
    """Create a venv with `peer` at `path` (kept if `peer.check` already passes there)."""
    python = path / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-I", "-c", peer.check],
                                          capture_output=True).returncode == 0:
        return
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    for args in peer.install:
        subprocess.run([str(python), "-m", "pip", "install", "-q", *args], check=True)


def peer_grid(case, model, peer, python, root):
    """A peer tool's scores on this case: {config: (scores, bytes, extra)} and
    {config: error text} for configurations that failed (or all, if the worker did)."""
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        inp, outp = Path(tmp) / "in.pt", Path(tmp) / "out.pt"
        torch.save({"case": case.name, "state": model.state_dict(), "x": case.x, "y": case.y,
                    "qx": case.qx, "qy": case.qy, "projections": PROJECTIONS,
                    "root": str(root)}, inp)
        t0 = time.time()
        proc = subprocess.run([str(python), str(HERE / peer.worker), str(inp), str(outp)],
                              capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0 or not outp.exists():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
            if proc.returncode < 0:  # last, as the tables show the last line
                tail += f"\nkilled by signal {-proc.returncode} (9: out of memory?)"
            return {}, {f"{peer.name} (worker)": f"rc={proc.returncode}: {tail}"}
        found = torch.load(outp)
    print(f"{case.name}: {peer.name} ({found['version']}) scored in {time.time() - t0:.0f} s",
          flush=True)
    grid, errors = {}, {}
    for name, c in found["configs"].items():
        if "error" in c:
            errors[name] = c["error"]
        else:
            grid[name] = (c["scores"], c["bytes"], {"seconds": c["seconds"]})
    return grid, errors


# ============================================================================ main
def evaluate(case, scores, cache, subsets, seeds, train=None, fraction=0.5):
    """LDS per seed: seed s draws its own subsets (subset_seed=s) and retrains with seed s
    (train: default case.train; case.train_removed keeps seed 0); each seed has its own
    retraining cache (cache/seed{s})."""
    return [float(linear_datamodeling_score(
        train or case.train, case.eval_loss, scores, n_subsets=subsets, fraction=fraction,
        seeds=(s,), subset_seed=s, cache_dir=cache / f"seed{s}", progress=False)["lds"])
        for s in seeds]


def single_key(fraction):
    """The row key of the single-model LDS at this kept fraction, e.g. "lds_single50"."""
    return f"lds_single{round(fraction * 100)}"


def tool_of(config: str) -> str:
    """'ours', or the peer whose worker produced the configuration."""
    first = config.split()[0]
    return first if first in PEERS else "ours"


def run_case(case, out_dir, subsets, seeds, n_brittle, peers, magic=False, include_bias=False):
    """peers: {peer name: its venv's python}. magic: add MAGIC and the single-model ground
    truth. include_bias: every logging pass logs the bias gradients too."""
    root = out_dir / "logs" / case.name
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.time()
    if case.name == "staged":
        model, grid = staged_methods(case, root)
        grid.update(score_grid(case, model, root, include_bias))
    else:
        model = case.train(torch.arange(N_TRAIN), 0)
        grid = score_grid(case, model, root, include_bias)
    if magic:
        grid.update(magic_method(case, root))
    grid["random"] = (torch.randn(N_QUERY, N_TRAIN, generator=torch.Generator().manual_seed(9),
                                  dtype=torch.float64), 0, {})
    errors = {}
    for name, python in peers.items():
        found, failed = peer_grid(case, model, PEERS[name], python, root / name)
        grid.update(found)
        errors.update(failed)
    cache = out_dir / "cache" / case.name
    rows = []
    for name, (scores, size, extra) in grid.items():
        if not torch.isfinite(scores).all():  # a peer's (or a setting's) failure, not a crash
            errors[name] = "its scores contain NaN or inf"
            print(f"{case.name}: {name}: {errors[name]}")
            continue
        per_seed = evaluate(case, scores, cache, subsets, seeds)
        row = {"case": case.name, "config": name, "bytes": size,
               "lds": sum(per_seed) / len(per_seed), "lds_std": std(per_seed),
               "lds_seeds": per_seed, **extra}
        for fraction in SINGLE_FRACTIONS if magic else ():
            key = single_key(fraction)
            found = evaluate(case, scores, out_dir / "cache" / f"{case.name}-{key[4:]}",
                             subsets, seeds, case.train_removed, fraction)
            row.update({key: sum(found) / len(found), key + "_std": std(found),
                        key + "_seeds": found})
        rows.append(row)
    rows += [{"case": case.name, "config": name, "bytes": None, "lds": None, "error": text}
             for name, text in errors.items()]
    best = best_of(rows, "ours")
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


def std(values):
    """Sample standard deviation (0 for one value)."""
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def paired(a, b):
    """(mean of a - b, its std over seeds, significant): one-sided paired t-test at 95% that
    a is ahead of b, over the same seeds (same subsets and retrainings); None if one seed."""
    diff = [x - y for x, y in zip(a, b)]
    mean, spread = sum(diff) / len(diff), std(diff)
    if len(diff) < 2:
        return mean, spread, None
    t_crit = T95.get(len(diff) - 1, 1.645)
    return mean, spread, mean > 0 and (spread == 0 or mean / (spread / len(diff) ** 0.5) > t_crit)


def best_of(rows, tool):
    """The row with the best mean LDS among one tool's configurations ('ours' or a peer)."""
    pool = [r for r in rows if r["lds"] is not None and r["config"] != "random"
            and tool_of(r["config"]) == tool]
    return max(pool, key=lambda r: r["lds"]) if pool else None


def fmt(r, key="lds"):
    return f"{r[key]:.3f} ± {r[key + '_std']:.3f}"


def render(rows):
    singles = [single_key(f) for f in SINGLE_FRACTIONS if any(single_key(f) in r for r in rows)]
    extra = "".join(f" single-model LDS, {k[10:]}% kept |" for k in singles)
    lines = ["| case | configuration | bytes/example | LDS (mean ± std over seeds) |" + extra +
             " brittleness (flipped at k<=40) |", "|---|---|---|---|" + "---|" * len(singles)
             + "---|"]
    for r in sorted(rows, key=lambda r: (r["case"], r["lds"] is None, -(r["lds"] or 0))):
        flip = f"{r['brittle_flipped']:.0%}" if "brittle_flipped" in r else ""
        lds = fmt(r) if r["lds"] is not None else "failed: " + one_line(r["error"])
        size = "-" if r["bytes"] is None else r["bytes"]
        cells = "".join(f" {fmt(r, k)} |" if k in r else " - |" for k in singles)
        lines.append(f"| {r['case']} | {r['config']} | {size} | {lds} |{cells} {flip} |")
    return "\n".join(lines)


def render_magic(rows):
    """Per case with MAGIC: its LDS on each ground truth beside the best other configuration
    of this library (picked per ground truth), exact influence and random scores; then its
    cost beside a plain training run."""
    cases = sorted({r["case"] for r in rows if r["config"] == MAGIC_CONFIG})
    if not cases:
        return ""
    keys = ["lds"] + [single_key(f) for f in SINGLE_FRACTIONS]
    names = ["resampled (seed s retrains)"] + [f"single-model, {k[10:]}% kept" for k in keys[1:]]
    lines = ["| case | ground truth | MAGIC | best other (ours) | LDS | influence raw dot full |"
             " random |", "|---|---|---|---|---|---|---|"]
    costs = ["| case | steps | plain training s | recorded training s | MAGIC scoring s "
             f"({N_QUERY} queries) | scoring / plain training | replays | states held | "
             "record bytes |", "|---|---|---|---|---|---|---|---|---|"]
    for case in cases:
        part = {r["config"]: r for r in rows if r["case"] == case and r["lds"] is not None}
        magic = part[MAGIC_CONFIG]
        for key, name in zip(keys, names):
            others = [r for c, r in part.items() if c not in (MAGIC_CONFIG, "random")
                      and tool_of(c) == "ours" and key in r]
            best = max(others, key=lambda r: r[key]) if others else None
            exact = part.get("influence raw dot full")
            cells = [fmt(magic, key), best["config"] if best else "-",
                     fmt(best, key) if best else "-", fmt(exact, key) if exact else "-",
                     fmt(part["random"], key)]
            lines.append(f"| {case} | {name} | " + " | ".join(cells) + " |")
        costs.append(f"| {case} | {magic['steps']} | {magic['train_seconds']:.2f} | "
                     f"{magic['record_seconds']:.2f} | {magic['seconds']:.1f} | "
                     f"{magic['seconds'] / magic['train_seconds']:.0f}x | "
                     f"{magic['replays']:g} | {magic['states_held']} | "
                     f"{magic['record_bytes']} |")
    return "\n".join(lines) + "\n\n" + "\n".join(costs)


def one_line(text):
    return text.strip().splitlines()[-1].replace("|", "/")[:160]


def render_summary(rows):
    """Per case: each tool's best mean LDS, exact full-gradient influence, and whether this
    library's best is significantly ahead of each peer's best (paired over seeds)."""
    tools = ["ours"] + [p for p in PEERS if any(tool_of(r["config"]) == p for r in rows)]
    head = "| case | " + " | ".join(f"{t}: best | LDS" for t in tools) + \
        " | exact (influence raw dot full) | " + \
        " | ".join(f"ours - {t} (paired)" for t in tools[1:]) + " |"
    lines = [head, "|" + "---|" * (2 * len(tools) + len(tools))]
    for case in sorted({r["case"] for r in rows}):
        part = [r for r in rows if r["case"] == case]
        bests = [best_of(part, t) for t in tools]
        cells = []
        for best in bests:
            cells += [best["config"], fmt(best)] if best else ["-", "-"]
        exact = [r for r in part if r["config"] == "influence raw dot full"]
        cells.append(fmt(exact[0]) if exact else "-")
        for best in bests[1:]:
            if bests[0] is None or best is None:
                cells.append("-")
                continue
            mean, spread, significant = paired(bests[0]["lds_seeds"], best["lds_seeds"])
            verdict = {True: "significant", False: "not significant", None: "one seed"}
            cells.append(f"{mean:+.3f} ± {spread:.3f} ({verdict[significant]})")
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def family_of(config: str):
    """(tool, family): the group a configuration's tuned best is picked in, beside that
    family's default. Ours and LogIX 0.1.1: the projection ("full", "pca8", ...; true-Fisher
    rows belong to theirs); dattri: the method (explicit, cg, ekfac, trak); the others: one."""
    tool, words = tool_of(config), config.split()
    if tool in ("ours", "logix0.1.1"):
        return tool, words[3].removesuffix("-tf") if len(words) > 3 else ""
    return tool, words[1] if tool == "dattri" else ""


def default_config(tool: str, family: str) -> str:
    """The configuration a tool runs with nothing set, in that family: ours hessian "auto" (EK-FAC
    when its statistics are logged, K-FAC where one example dominates EK-FAC's Fisher), LogIX
    0.1.1 EK-FAC; dot, their default damping; Kronfluence EK-FAC
    at damping 1e-8; TRAK proj_dim 2048, float16, lambda 0; dattri regularisation 0."""
    return {"ours": f"influence auto dot {family}",
            "logix0.1.1": f"logix0.1.1 ekfac dot {family}",
            "kronfluence": "kronfluence ekfac dot full",
            "trak": "trak xtx dot p2048",
            "dattri": f"dattri {family} dot " + ("p512" if family == "trak" else "full")}[tool]


def render_defaults(rows):
    """Per case, tool and family: the default configuration's LDS beside the family's tuned
    best (picked by mean LDS over the same seeds)."""
    lines = ["| case | tool | family | default | LDS | tuned best | LDS | best - default |",
             "|---|---|---|---|---|---|---|---|"]
    for case in sorted({r["case"] for r in rows}):
        groups = {}
        for r in rows:
            if r["case"] == case and r["lds"] is not None and r["config"] != "random":
                groups.setdefault(family_of(r["config"]), []).append(r)
        order = ["ours"] + list(PEERS)
        for (tool, family), members in sorted(groups.items(),
                                              key=lambda g: (order.index(g[0][0]), g[0][1])):
            default = next((r for r in members
                            if r["config"] == default_config(tool, family)), None)
            if default is None:
                continue
            best = max(members, key=lambda r: r["lds"])
            lines.append(f"| {case} | {tool} | {family or '-'} | {default['config']} | "
                         f"{fmt(default)} | {best['config']} | {fmt(best)} | "
                         f"{best['lds'] - default['lds']:+.3f} |")
    return "\n".join(lines)


def render_damping(rows):
    """Mean LDS over the cases per curvature, projection and relative damping (dot), and auto."""
    lines = ["| curvature | projection | " + " | ".join(f"{d:g}" for d in DAMPINGS) + " | auto |",
             "|---|---|" + "---|" * (len(DAMPINGS) + 1)]
    cases = sorted({r["case"] for r in rows})
    by_name = {(r["case"], r["config"]): r for r in rows if r["lds"] is not None}
    for hessian in ("raw", "kfac", "ekfac"):
        for init, rank in PROJECTIONS:
            label = "full" if init == "none" else f"{init}{rank}"
            cells = []
            for d in DAMPINGS + (DEFAULT_DAMPING,):
                suffix = "" if d == DEFAULT_DAMPING else f" d{d:g}"
                found = [by_name.get((c, f"influence {hessian} dot {label}{suffix}"))
                         for c in cases]
                found = [r["lds"] for r in found if r is not None]
                cells.append(f"{sum(found) / len(found):.3f}" if found else "-")
            lines.append(f"| {hessian} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_auto(rows):
    """Per case, curvature and projection (dot): the default damping (auto) beside the best
    swept damping (relative for raw / kfac / ekfac, absolute for ggn / hessian) of the same
    curvature and projection, and the gap."""
    lines = ["| case | curvature | projection | auto | best swept | best LDS | auto - best |",
             "|---|---|---|---|---|---|---|"]
    by_name = {(r["case"], r["config"]): r for r in rows if r["lds"] is not None}
    for case in sorted({r["case"] for r in rows}):
        for hessian in ("raw", "kfac", "ekfac", "ggn", "hessian"):
            prefix, sweep = ("a", MODEL_HESSIAN_DAMPINGS[1:]) if hessian in ("ggn", "hessian") \
                else ("d", DAMPINGS)
            for init, rank in PROJECTIONS:
                label = "full" if init == "none" else f"{init}{rank}"
                auto = by_name.get((case, f"influence {hessian} dot {label}"))
                swept = [(d, by_name.get((case, f"influence {hessian} dot {label} {prefix}{d:g}")))
                         for d in sweep]
                swept = [(d, r) for d, r in swept if r is not None]
                if auto is None or not swept:
                    continue
                d, best = max(swept, key=lambda x: x[1]["lds"])
                lines.append(f"| {case} | {hessian} | {label} | {fmt(auto)} | {d:g} | "
                             f"{fmt(best)} | {auto['lds'] - best['lds']:+.3f} |")
    return "\n".join(lines)


def swept(config: str) -> bool:
    """Whether a configuration is a damping-sweep row (a last word like "d0.01")."""
    last = config.split()[-1]
    return last.startswith("d") and last[1:2].isdigit()


def plot(rows, path):
    try:
        import matplotlib
        import matplotlib.ticker
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot.")
        return
    cases = sorted({r["case"] for r in rows})
    fig, axes = plt.subplots(1, len(cases), figsize=(4 * len(cases), 3.6), squeeze=False)
    markers = {"influence": "o", "source": "*", "ensemble": "s", "tracin": "^",
               "logix0.1.1": "x", "kronfluence": "D", "magic": "P", "trak": "v", "dattri": "h"}
    colors = {"auto": "tab:olive", "none": "gray", "raw": "C0", "kfac": "C1", "ekfac": "C2", "lissa": "C3",
              "full": "C7", "ggn": "C8", "hessian": "C9", "exact": "k", "xtx": "C4",
              "explicit": "C5", "cg": "C6", "trak": "C4"}
    for ax, case in zip(axes[0], cases):
        for r in rows:
            if r["case"] != case or r["config"] == "random" or r["lds"] is None:
                continue
            if swept(r["config"]):  # only the default damping is drawn
                continue
            method, hessian = r["config"].split()[:2]
            ax.errorbar(r["bytes"], r["lds"], yerr=r["lds_std"], marker=markers[method],
                        color=colors[hessian], ms=5, ls="", elinewidth=0.6,
                        mfc="none" if method == "kronfluence" else None)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(case)
        ax.set_xlabel("bytes logged per example")
        ax.set_ylabel("LDS (mean ± std over seeds)")
    handles = [plt.Line2D([], [], color=c, marker="o", ls="", label=h) for h, c in
               colors.items()]
    handles += [plt.Line2D([], [], color="k", marker=m, ls="", label=k) for k, m in
                markers.items()]
    fig.legend(handles=handles, loc="lower center", ncol=10, fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--subsets", type=int, default=50)
    parser.add_argument("--seeds", default=",".join(map(str, range(10))),
                        help="retraining seeds: each draws its own subsets and retrains")
    parser.add_argument("--brittle", type=int, default=5, help="queries per brittleness test")
    parser.add_argument("--magic-cases", default="mlp",
                        help="cases that add MAGIC and the single-model ground truth ('' none)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/quality"))
    parser.add_argument("--include-bias", action="store_true",
                        help="log the bias gradients too (logging.include_bias; ours only)")
    for flag, holds in PEER_FLAGS.values():
        group = parser.add_mutually_exclusive_group()
        group.add_argument(f"--{flag}-venv", type=Path, help=f"a venv with {holds}")
        group.add_argument(f"--make-{flag}-venv", type=Path,
                           help="create that venv here, then use it")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    magic_cases = [c for c in args.magic_cases.split(",") if c]
    for name in args.cases.split(",") + magic_cases:
        if name not in CASES:
            parser.error(f"unknown case {name!r}; cases: {list(CASES)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: expected comma-separated ints, e.g. 0,1,2")
    peers = {}
    for name, (flag, _) in PEER_FLAGS.items():
        made = getattr(args, f"make_{flag}_venv")
        if made:
            make_venv(made, PEERS[name])
        venv = made or getattr(args, f"{flag}_venv")
        if venv is None:
            continue
        peers[name] = venv.resolve() / "bin" / "python"
        if not peers[name].exists():
            parser.error(f"--{flag}-venv {venv}: no bin/python there; create it with "
                         f"--make-{flag}-venv {venv}")
    rows = []
    for name in args.cases.split(","):
        rows += run_case(CASES[name](), args.out, args.subsets, seeds, args.brittle, peers,
                         magic=name in magic_cases, include_bias=args.include_bias)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    table = "\n\n".join(t for t in (render(rows), render_summary(rows), render_defaults(rows),
                                     render_damping(rows), render_auto(rows), render_magic(rows))
                          if t)
    (args.out / "table.md").write_text(table + "\n")
    print(table)
    plot(rows, args.out / "lds_vs_bytes.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

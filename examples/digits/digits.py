"""Which training digits made a small CNN say what it says? A picture, then a check that the
answer is right.

    python examples/digits/digits.py [--quick] [--out DIR] [--subsets N] [--seeds N]

1. Train a small CNN on sklearn's 8x8 handwritten digits (1,500 train / 297 test, seeded split).
2. Log one pass over the training set with LogIX: LoGra-projected per-example gradients plus
   forward, backward and gradient covariances, so every preconditioner (none / raw / kfac /
   ekfac) is available from the same log. One pass per LoGra rank (8, 16, 32) and one without
   LoGra (the full per-example gradient).
3. Score every test digit against every training digit and save a PNG grid (--out/
   digits_influence.png): each row a test digit with its 5 most helpful and 5 most harmful
   training digits (EK-FAC, rank 16). Needs matplotlib: `pip install logix[viz]`.
4. Check the scores against retraining: the linear datamodeling score (LDS, retraining on random
   50% subsets; the outputs are per-test-example losses) and the brittleness test (remove the
   top-k most helpful training digits of a correctly classified test digit, retrain, does the
   prediction flip?), for every method and for random scores. Print one table.

Retrained models and their outputs are cached under --out/cache, keyed by the training recipe, so
a second run retrains nothing. Sign convention: a positive score means training on that digit
lowers the test digit's loss (helpful); negative means it raises it (harmful).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import inspect
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.nn import functional as F

import logix
from logix.evaluation import brittleness, lds, linear_datamodeling_score

HERE = Path(__file__).resolve().parent
SETUP = {"grad": ["log", "covariance"], "forward": ["covariance"], "backward": ["covariance"]}

# The training recipe: full-batch Adam, deterministic for a given (subset, seed). Retrained models
# are cached under a hash of these values and of the model / training source code.
N_TRAIN = 1500
SPLIT_SEED = 0
STEPS = 100
LR = 2e-2
WEIGHT_DECAY = 1e-3


@dataclass
class Digits:
    x_train: Tensor  # [1500, 1, 8, 8], pixels in [0, 1]
    y_train: Tensor  # [1500]
    x_test: Tensor  # [297, 1, 8, 8]
    y_test: Tensor  # [297]


@dataclass(frozen=True)
class Method:
    """One way of scoring: a LoGra rank (None: the full gradient) and a preconditioner."""

    label: str
    hessian: str  # "none" | "raw" | "kfac" | "ekfac" | "random" (random scores, no LogIX)
    rank: Optional[int] = 16


METHODS = (
    Method("random scores", "random", None),
    Method("gradient dot (none)", "none"),
    Method("raw (grad covariance)", "raw"),
    Method("kfac", "kfac"),
    Method("ekfac", "ekfac"),
    Method("ekfac", "ekfac", 8),
    Method("ekfac", "ekfac", 32),
    Method("ekfac", "ekfac", None),
)
PICTURE_METHOD = Method("ekfac", "ekfac", 16)


@dataclass
class Settings:
    out: Path = HERE / "out"
    subsets: int = 50  # LDS retraining subsets (50% of the training set each)
    seeds: int = 1  # LDS retraining seeds per subset (outputs averaged over them)
    brittle_queries: int = 10  # correctly classified test digits in the brittleness test (0: skip)
    ks: Tuple[int, ...] = (10, 40, 160)  # brittleness removal sizes
    n_random: int = 2  # random-removal control draws per (query, k)
    picture_queries: int = 4  # rows of the PNG
    methods: Tuple[Method, ...] = METHODS
    relative_damping: Optional[float] = None  # None: the library default (damping="auto")
    progress: bool = True
    plot: bool = True
    results_file: str = "results.json"  # written to `out`: the table and every number in it


def quick_settings(**overrides) -> Settings:
    """A smoke run (40 s on a quiet machine, under 2 minutes on a busy one): few subsets, few
    brittleness queries and sizes."""
    return Settings(**{"subsets": 8, "brittle_queries": 2, "ks": (10, 160), "n_random": 1,
                       **overrides})


# ----------------------------------------------------------------------------- data and model
def load_data() -> Digits:
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # [1797, 1, 8, 8]
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    train, test = order[:N_TRAIN], order[N_TRAIN:]
    return Digits(x[train], y[train], x[test], y[test])


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.ReLU(),  # [B, 8, 6, 6]
        nn.Conv2d(8, 16, 3), nn.ReLU(),  # [B, 16, 4, 4]
        nn.Flatten(), nn.Linear(256, 10),
    )


def train_model(data: Digits, indices: Optional[Tensor] = None, seed: int = 0) -> nn.Module:
    """Full-batch Adam on the training digits `indices` (default: all); deterministic."""
    model = make_model(seed)
    x, y = data.x_train, data.y_train
    if indices is not None:
        x, y = x[indices], y[indices]
    optimizer = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    for _ in range(STEPS):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def test_losses(model: nn.Module, data: Digits) -> Tensor:
    """Per-test-example cross-entropy [n_test] (the LDS output), in float64 and written as
    softplus(logsumexp_j(z_j - z_y)) so a confident example's tiny loss does not round to 0."""
    logits = model(data.x_test).double()  # [n_test, 10]
    true = logits.gather(1, data.y_test[:, None])  # [n_test, 1]
    others = logits.scatter(1, data.y_test[:, None], float("-inf"))
    return F.softplus(torch.logsumexp(others - true, 1))


@torch.no_grad()
def test_margins(model: nn.Module, data: Digits) -> Tensor:
    """logit[true class] - max other logit [n_test]: > 0 iff the prediction is right."""
    logits = model(data.x_test)  # [n_test, 10]
    true = logits.gather(1, data.y_test[:, None]).squeeze(1)
    others = logits.scatter(1, data.y_test[:, None], float("-inf")).max(1).values
    return true - others


def recipe_key() -> str:
    """Names a cache: changes when the split, the recipe or the model/training code changes."""
    recipe = {"n_train": N_TRAIN, "split_seed": SPLIT_SEED, "steps": STEPS, "lr": LR,
              "weight_decay": WEIGHT_DECAY, "torch": torch.__version__.split("+")[0],
              "code": inspect.getsource(make_model) + inspect.getsource(train_model)}
    return hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]


def source_key(fn) -> str:
    return hashlib.sha1(inspect.getsource(fn).encode()).hexdigest()[:8]


class CachedTrainer:
    """`train(indices, seed) -> model`, each retrained model's weights kept on disk (15 KB)."""

    def __init__(self, data: Digits, folder: Path) -> None:
        self.data, self.folder = data, folder
        self.trained = 0
        folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, indices: Tensor, seed: int) -> nn.Module:
        digest = hashlib.sha1(indices.to(torch.int64).numpy().tobytes()).hexdigest()
        path = self.folder / f"{digest}-seed{seed}.pt"
        if path.exists():
            model = make_model(seed)
            model.load_state_dict(torch.load(path, weights_only=True))
            return model.eval()
        model = train_model(self.data, indices, seed)
        self.trained += 1
        fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        os.close(fd)
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, path)
        return model


# ----------------------------------------------------------------------------- LogIX
def log_training(model: nn.Module, data: Digits, rank: Optional[int], root: Path,
                 relative_damping: Optional[float] = None, project: Optional[str] = None,
                 **options) -> logix.Run:
    """One logging pass over the training set: projected (or, rank None, full) per-example
    gradients and every statistic the four preconditioners need. `options` go to logix.init."""
    project = project or (f"digits-rank{rank}" if rank else "digits-full")
    shutil.rmtree(Path(root) / project, ignore_errors=True)  # a fresh log for this model
    run = logix.init(project, root_dir=str(root), rank=rank, relative_damping=relative_damping,
                     **options)
    run.watch(model)
    if rank:
        run.add_lora()
    run.setup(SETUP)
    run.save(True)
    for batch in torch.arange(len(data.x_train)).split(250):
        with run(data_id=batch.tolist()):
            model.zero_grad()
            F.cross_entropy(model(data.x_train[batch]), data.y_train[batch],
                            reduction="sum").backward()
    run.finalize()
    return run


def influence_scores(run: logix.Run, model: nn.Module, data: Digits,
                     hessians: Sequence[str]) -> Dict[str, Tensor]:
    """{hessian: scores [n_test, n_train]}, columns in training-index order."""
    run.eval()
    with run(data_id=[f"test-{i}" for i in range(len(data.x_test))]):
        model.zero_grad()
        F.cross_entropy(model(data.x_test), data.y_test, reduction="sum").backward()
    query = run.get_log(copy=True)
    model.zero_grad()
    out = {}
    for hessian in hessians:
        result = run.compute_influence_all(query, hessian=hessian, progress=False)
        columns = torch.tensor(result["tgt_ids"])  # training index of each column
        scores = torch.empty_like(result["influence"])
        scores[:, columns] = result["influence"]
        out[hessian] = scores
    return out


def all_scores(model: nn.Module, data: Digits, methods: Sequence[Method], root: Path,
               relative_damping: Optional[float] = None) -> Dict[Method, Tensor]:
    """Scores of every method; one logging pass per LoGra rank serves all its preconditioners."""
    by_rank: Dict[Optional[int], List[str]] = {}
    for m in methods:
        if m.hessian != "random":
            by_rank.setdefault(m.rank, []).append(m.hessian)
    scores: Dict[Method, Tensor] = {}
    for rank, hessians in by_rank.items():
        run = log_training(model, data, rank, root, relative_damping)
        for hessian, s in influence_scores(run, model, data, hessians).items():
            scores[next(m for m in methods if m.rank == rank and m.hessian == hessian)] = s
    generator = torch.Generator().manual_seed(1234)
    for m in methods:
        if m.hessian == "random":
            scores[m] = torch.randn(len(data.x_test), len(data.x_train), generator=generator)
    return scores


def describe(method: Method) -> str:
    rank = "full gradient" if method.rank is None else f"LoGra rank {method.rank}"
    return method.label if method.hessian == "random" else f"{method.label}, {rank}"


# ----------------------------------------------------------------------------- evaluation
def measure_lds(data: Digits, scores: Dict[Method, Tensor], settings: Settings,
                cache: Path) -> Tuple[Dict[Method, float], float]:
    """LDS per method; the retraining (and its on-disk cache) is shared by all methods."""
    any_scores = next(iter(scores.values()))
    start = time.perf_counter()
    measured = linear_datamodeling_score(
        train_fn=lambda indices, seed: train_model(data, indices, seed),
        eval_fn=lambda model: test_losses(model, data),
        scores=any_scores, n_subsets=settings.subsets, fraction=0.5,
        seeds=tuple(range(settings.seeds)), cache_dir=cache, outputs_are="loss",
        progress=settings.progress)
    elapsed = time.perf_counter() - start
    result = {m: lds(s, measured["subset_masks"], measured["subset_outputs"],
                     outputs_are="loss")["lds"] for m, s in scores.items()}
    return result, elapsed


@dataclass
class Brittle:
    """Brittleness of one method over the same queries, per removal size k."""

    queries: int
    flipped: Dict[int, int] = field(default_factory=dict)  # queries whose prediction flipped
    drop: Dict[int, float] = field(default_factory=dict)  # mean margin drop (base - after)


def measure_brittleness(data: Digits, scores: Dict[Method, Tensor], queries: List[int],
                        settings: Settings, trainer: CachedTrainer
                        ) -> Tuple[Dict[Method, Brittle], Optional[Brittle]]:
    """Per method, remove each query's top-k scored training digits and retrain; plus the
    random-removal control (the same draws for every method, so retrained once). Random
    *scores* would only remove random digits again: they get the control, not a test."""
    out, control = {}, None
    for method, s in scores.items():
        if method.hessian == "random":
            continue
        results = brittleness(trainer, lambda model: test_margins(model, data), s,
                              test_index=queries, ks=settings.ks, n_random=settings.n_random)
        b = Brittle(queries=len(results))
        control = Brittle(queries=len(results))
        for k in settings.ks:
            b.flipped[k] = sum(r.margins[k] <= 0 for r in results)
            b.drop[k] = sum(r.base_margin - r.margins[k] for r in results) / len(results)
            control.flipped[k] = sum(r.random_flip_fraction[k] for r in results)
            control.drop[k] = sum(r.base_margin - m for r in results
                                  for m in r.random_margins[k]) / (len(results) * settings.n_random)
        out[method] = b
    return out, control


def format_table(methods: Sequence[Method], lds_by_method: Dict[Method, float],
                 brittle: Dict[Method, Brittle], control: Optional[Brittle],
                 ks: Sequence[int]) -> str:
    """One row per method: LDS, then per k the queries flipped and the mean margin drop."""
    width = 40
    if control is None:  # LDS only
        lines = [f"{'method':<{width}} {'LDS':>6}"]
        lines.append("-" * len(lines[-1]))
        lines += [f"{describe(m):<{width}} {lds_by_method[m]:>6.3f}" for m in methods]
        return "\n".join(lines)

    def cells(b: Optional[Brittle], fmt: str) -> str:
        if b is None:
            return " ".join(f"{'-':>12}" for _ in ks)
        return " ".join(f"{format(b.flipped[k], fmt)} ({b.drop[k]:>4.1f})".rjust(12) for k in ks)

    header = " ".join(f"{'k=' + str(k):>12}" for k in ks)
    lines = [f"{'':<{width}} {'':>6}   brittleness, top-k helpful removed:",
             f"{'':<{width}} {'':>6}   flipped/{control.queries} (mean margin drop)",
             f"{'method':<{width}} {'LDS':>6}   {header}"]
    lines.append("-" * len(lines[-1]))
    for method in methods:
        lines.append(f"{describe(method):<{width}} {lds_by_method[method]:>6.3f}   "
                     + cells(brittle.get(method), "d"))
    lines.append(f"{'random removal (control, mean of draws)':<{width}} {'':>6}   "
                 + cells(control, ".1f"))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- picture
def save_picture(path: Path, data: Digits, scores: Tensor, queries: List[int],
                 predictions: Tensor, top: int = 5) -> None:
    """Rows: a test digit, its `top` most helpful and `top` most harmful training digits."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    # columns: query | gap | top helpful | gap | top harmful
    ratios = [1.0, 0.2] + [1.0] * top + [0.2] + [1.0] * top
    fig, axes = plt.subplots(len(queries), len(ratios), squeeze=False,
                             figsize=(1.2 * sum(ratios), 1.45 * len(queries) + 0.45),
                             gridspec_kw={"width_ratios": ratios, "wspace": 0.12, "hspace": 0.7,
                                          "left": 0.01, "right": 0.99, "bottom": 0.02,
                                          "top": 1 - 0.75 / (1.45 * len(queries) + 0.45)})
    helpful_cols = list(range(2, 2 + top))
    harmful_cols = list(range(3 + top, 3 + 2 * top))
    for row, q in enumerate(queries):
        helpful = torch.topk(scores[q], top)
        harmful = torch.topk(-scores[q], top)
        cells = {0: (data.x_test[q], f"test #{q}\nlabel {data.y_test[q].item()}, "
                                     f"pred {predictions[q].item()}", "black")}
        for col, i, v in zip(helpful_cols, helpful.indices.tolist(), helpful.values.tolist()):
            cells[col] = (data.x_train[i], f"#{i} y={data.y_train[i].item()}\n{v:+.3g}",
                          "tab:green")
        for col, i, v in zip(harmful_cols, harmful.indices.tolist(), harmful.values.tolist()):
            cells[col] = (data.x_train[i], f"#{i} y={data.y_train[i].item()}\n{-v:+.3g}",
                          "tab:red")
        for col, ax in enumerate(axes[row]):
            if col not in cells:
                ax.axis("off")
                continue
            image, title, color = cells[col]
            ax.imshow(image.reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
            ax.set_title(title, fontsize=8, color=color)
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(1.5 if color != "black" else 0.8)
    for cols, text, color in ((helpful_cols, "most helpful: training on it lowers the test loss",
                               "tab:green"),
                              (harmful_cols, "most harmful: training on it raises the test loss",
                               "tab:red")):
        left, right = axes[0][cols[0]].get_position(), axes[0][cols[-1]].get_position()
        fig.text((left.x0 + right.x1) / 2, 0.995, text, ha="center", va="top", color=color,
                 fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def picture_queries(predictions: Tensor, data: Digits, n: int) -> List[int]:
    """The first n-1 test digits and the first misclassified one (the interesting row)."""
    wrong = (predictions != data.y_test).nonzero().flatten().tolist()
    chosen = list(range(n - 1 if wrong else n))
    return chosen + [q for q in wrong[:1] if q not in chosen]


# ----------------------------------------------------------------------------- main
def run_experiment(settings: Settings) -> dict:
    torch.set_num_threads(1)  # a tiny model: threads cost more than they give
    started = time.perf_counter()
    out = Path(settings.out)
    cache = out / "cache" / f"recipe-{recipe_key()}"
    data = load_data()

    model = train_model(data)
    with torch.no_grad():
        predictions = model(data.x_test).argmax(1)
    accuracy = (predictions == data.y_test).float().mean().item()
    print(f"Trained the CNN on {len(data.x_train)} digits: test accuracy {accuracy:.1%}")

    t = time.perf_counter()
    scores = all_scores(model, data, settings.methods, out / "logs", settings.relative_damping)
    passes = len({m.rank for m in settings.methods if m.hessian != "random"})
    print(f"Logged {passes} pass{'es' if passes != 1 else ''} over the training set "
          f"and scored {len(data.x_test)} test x {len(data.x_train)} train digits with "
          f"{len(scores)} methods in {time.perf_counter() - t:.1f}s")

    png = None
    if settings.plot and importlib.util.find_spec("matplotlib") is None:
        print("matplotlib is not installed (pip install 'logix[viz]'): skipping the PNG")
    elif settings.plot and PICTURE_METHOD in scores:
        png = out / "digits_influence.png"
        save_picture(png, data, scores[PICTURE_METHOD],
                     picture_queries(predictions, data, settings.picture_queries), predictions)
        print(f"Saved {png}")

    lds_cache = cache / f"lds-{source_key(test_losses)}"  # outputs depend on eval code too
    lds_by_method, lds_seconds = measure_lds(data, scores, settings, lds_cache)
    print(f"LDS: {settings.subsets} subsets x {settings.seeds} seed(s), "
          f"{lds_seconds:.0f}s of retraining (cached in {lds_cache})")

    brittle, control, queries = {}, None, []
    if settings.brittle_queries > 0:
        margins = test_margins(model, data)
        queries = (margins > 0).nonzero().flatten()[:settings.brittle_queries].tolist()
        trainer = CachedTrainer(data, cache / "models")
        t = time.perf_counter()
        brittle, control = measure_brittleness(data, scores, queries, settings, trainer)
        print(f"Brittleness: the first {len(queries)} correctly classified test digits, k in "
              f"{list(settings.ks)}, {settings.n_random} random draw(s) per k; {trainer.trained} "
              f"retrains ({time.perf_counter() - t:.0f}s, cached in {cache / 'models'})")
    print()

    methods = [m for m in settings.methods if m in scores]
    table = format_table(methods, lds_by_method, brittle, control, settings.ks)
    print(table)
    elapsed = time.perf_counter() - started
    print(f"\nTotal {elapsed:.0f}s. Positive score = helpful (training on it lowers the test "
          f"loss). LDS: 1 is perfect, 0 is chance.")
    results = {
        "accuracy": accuracy, "table": table, "seconds": elapsed, "png": str(png),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()
                     if k != "methods"},
        "methods": [{"method": describe(m), "lds": lds_by_method[m],
                     **({"flipped": brittle[m].flipped, "margin_drop": brittle[m].drop}
                        if m in brittle else {})} for m in methods],
        "brittleness_queries": queries,
        "random_removal": control and {"flipped": control.flipped, "margin_drop": control.drop},
    }
    (out / settings.results_file).write_text(json.dumps(results, indent=1, default=str))
    return results


def parse_args(argv=None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 8 LDS subsets, 2 brittleness queries, k in {10, 160}")
    parser.add_argument("--out", type=Path, default=HERE / "out",
                        help="where the PNG, logs and retraining cache go (default: %(default)s)")
    parser.add_argument("--subsets", type=int, default=None,
                        help="LDS retraining subsets (default 50; 8 with --quick)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="retraining seeds per LDS subset, outputs averaged (default 1)")
    parser.add_argument("--relative-damping", type=float, default=None,
                        help="damping as a fraction of each module's mean eigenvalue "
                             "(default: the library's 0.1)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib)")
    args = parser.parse_args(argv)
    overrides = {"out": args.out, "seeds": args.seeds, "relative_damping": args.relative_damping,
                 "plot": not args.no_plot}
    if args.subsets is not None:
        overrides["subsets"] = args.subsets
    return quick_settings(**overrides) if args.quick else Settings(**overrides)


def main(argv=None) -> dict:
    return run_experiment(parse_args(argv))


if __name__ == "__main__":
    main()

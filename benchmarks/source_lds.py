"""SOURCE vs. single-checkpoint EK-FAC influence vs. TracIn, scored by the LDS, on staged training.

    python benchmarks/source_lds.py            # full: 50 subsets x 2 seeds, variants (~1 min)
    python benchmarks/source_lds.py --quick    # 20 subsets x 1 seed, no variants (~20 s)
    python benchmarks/source_lds.py --steps 600,30 --rank 0 --json out.json --keep-logs DIR

(Times on a shared 2-core machine with an empty retraining cache; with the cache filled a rerun
takes ~20 s. Each retraining of the staged procedure takes ~0.3 s at one thread.)

Setup. sklearn's bundled handwritten digits (1,797 8x8 images), 1,000 training and 200 query
examples (a fixed random split), an MLP 64-64-64-10 (tanh), SGD with momentum 0.9, batch 32:

* stage 1 (segment 0): only the digits 0-4 of the training set, 600 steps at lr 0.05;
* stage 2 (segment 1): every class, 300 steps at lr 0.01 (a sharp drop; the model ends short of
  convergence on the digits 5-9, which it has seen for 300 steps only). --steps / --lr change
  the schedule (e.g. --steps 600,30 for a stage 2 of 30 steps).

Three checkpoints per stage, at the midpoints of three equal stretches of its steps. Every
method reads LogIX logs with LoGra rank 16 (seeded random projections) of all three Linear layers:

* SOURCE: one `run.checkpoint(name, segment, lr, steps, momentum, train_ids)` logging pass per
  checkpoint, over the examples that stage trained on, with forward/backward covariances;
  `compute_influence_all(test_log, method="source", hessian="ekfac")` with the query gradient at
  the final weights.
* EK-FAC: one ordinary logging pass at the final weights, `compute_influence_all(
  hessian="ekfac")` with the default damping (0.1 x mean eigenvalue, per module); also with the
  absolute damping 1 / (eta K) of the last stage (what SOURCE's F_r resembles, see docs/source.md).
* TracIn: sum over the same checkpoints of lr * q_c . g_{i,c}, q_c the query gradient at that
  checkpoint (logged in eval mode with its weights loaded) and g_{i,c} the checkpoint's logged rows
  (`LogReader(project_dir, checkpoint=name)`); an example not trained on in a stage gets nothing
  from that stage's checkpoints. Also weighted as SOURCE weighs its segments in the small-step
  limit: eta K / (checkpoints x N_stage), eta = lr / (1 - momentum).
* Random scores (a baseline near 0).

Variants of SOURCE (full run, or --variants): K-FAC instead of EK-FAC eigenvalues; one checkpoint
per segment; stage 2 alone as one segment; stage 1 cut into two segments after 10% of its steps
(3 segments); eta K under- and over-reported 3x (the optimizer summary passed with wrong steps).
Also a check of docs/source.md's claim: SOURCE with one segment and one checkpoint at the final
weights is close to (not equal to) EK-FAC influence with damping 1/(eta K), divided by N.

LDS: `logix.evaluation.linear_datamodeling_score` retrains the whole staged procedure on random
50% subsets of the training set (stage 1 on the digits 0-4 of the subset, the same schedule), for
each seed (seed = initialisation and batch order), and measures the per-query cross-entropy at the
end; outputs are averaged over seeds and correlated (Spearman, per query) with the summed scores
of each subset. Retraining results are cached on disk (--cache-dir), so a rerun trains nothing.
The seed-to-seed row is a noise ceiling: the Spearman correlation, across subsets, between the
losses of two retraining seeds (only with two seeds or more).

Costs: logging passes and rows, shard bytes (sum over the manifest's shards), statistics bytes
(the project's state/ folder), and seconds for logging (every pass + finalize) and for querying
(logging the queries + scoring every training example). Timings are wall-clock on a shared
machine: read them as rough ratios.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

import logix
from logix.evaluation import lds, linear_datamodeling_score
from logix.evaluation.lds import spearman
from logix.storage.reader import LogReader


# ============================================================================ configuration
@dataclass
class Setup:
    n_train: int = 1000
    n_test: int = 200
    hidden: int = 64
    stage1_classes: Tuple[int, ...] = (0, 1, 2, 3, 4)
    steps: Tuple[int, int] = (600, 300)  # optimizer steps per stage
    lr: Tuple[float, float] = (0.05, 0.01)
    momentum: float = 0.9
    batch: int = 32
    checkpoints_per_stage: int = 3
    rank: int = 16
    split_seed: int = 0

    def key(self) -> str:
        """Names the retraining cache: any change of data, model or schedule gets a new one
        (checkpoints and rank change the logs only, not the retraining)."""
        fields = {k: v for k, v in asdict(self).items()
                  if k not in ("checkpoints_per_stage", "rank")}
        text = json.dumps(fields, sort_keys=True) + "|v1"
        return hashlib.sha1(text.encode()).hexdigest()[:12]


@dataclass
class Budget:
    subsets: int = 50
    seeds: Tuple[int, ...] = (0, 1)


QUICK = Budget(subsets=20, seeds=(0,))
FULL = Budget()


# ============================================================================ data and model
@dataclass
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_data(setup: Setup) -> Data:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(setup.split_seed))
    train, test = perm[:setup.n_train], perm[setup.n_train:setup.n_train + setup.n_test]
    return Data(x[train], y[train], x[test], y[test])


def make_model(setup: Setup, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    h = setup.hidden
    return nn.Sequential(nn.Linear(64, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh(), nn.Linear(h, 10))


def stage_members(setup: Setup, data: Data, indices: torch.Tensor) -> List[torch.Tensor]:
    """The training indices each stage draws its batches from."""
    first = torch.isin(data.y_train[indices], torch.tensor(setup.stage1_classes))
    return [indices[first], indices]


def checkpoint_steps(setup: Setup, stage: int) -> List[int]:
    """Midpoints of C equal stretches of the stage's steps (a midpoint rule for the segment)."""
    k, c = setup.steps[stage], setup.checkpoints_per_stage
    return [max(1, round((j + 0.5) * k / c)) for j in range(c)]


def default_marks(setup: Setup) -> Dict[Tuple[int, int], str]:
    """(stage, step) -> checkpoint name, for the checkpoints of the default plan."""
    return {(stage, step): f"s{stage}c{j}" for stage in range(2)
            for j, step in enumerate(checkpoint_steps(setup, stage))}


def train(setup: Setup, data: Data, indices: torch.Tensor, seed: int,
          snapshots: Optional[Dict[str, dict]] = None,
          marks: Optional[Dict[Tuple[int, int], str]] = None) -> nn.Module:
    """The staged procedure on `indices` (seed: init and batch order). With `snapshots`, the
    weights after step `step` of stage `stage` are stored there under marks[(stage, step)]
    (default: the default plan's checkpoints, "s{stage}c{j}")."""
    model = make_model(setup, seed)
    gen = torch.Generator().manual_seed(10_000 + seed)
    marks = default_marks(setup) if marks is None else marks
    for stage, members in enumerate(stage_members(setup, data, indices)):
        optimizer = torch.optim.SGD(model.parameters(), lr=setup.lr[stage],
                                    momentum=setup.momentum)
        order, pos = members[torch.randperm(len(members), generator=gen)], 0
        for step in range(1, setup.steps[stage] + 1):
            if pos + setup.batch > len(order):  # a new epoch, reshuffled
                order, pos = members[torch.randperm(len(members), generator=gen)], 0
            batch = order[pos:pos + setup.batch]
            pos += setup.batch
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(data.x_train[batch]), data.y_train[batch]).backward()
            optimizer.step()
            if snapshots is not None and (stage, step) in marks:
                snapshots[marks[(stage, step)]] = copy.deepcopy(model.state_dict())
    return model


def test_losses(model: nn.Module, data: Data) -> torch.Tensor:
    with torch.no_grad():
        return F.cross_entropy(model(data.x_test), data.y_test, reduction="none")


# ============================================================================ logging
def new_run(root: str, project: str, model: nn.Module, setup: Setup):
    run = logix.init(project, root_dir=root, rank=max(setup.rank, 1))
    run.watch(model)
    if setup.rank > 0:  # rank 0: no projection, full per-layer gradients
        run.add_lora()
    run.setup({"grad": ["log"], "forward": ["covariance"], "backward": ["covariance"]})
    run.save(True)
    return run


def log_examples(run, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ids: List,
                 batch: int = 256) -> None:
    """One logging pass: per-example gradients of the summed loss."""
    for start in range(0, len(ids), batch):
        with run(data_id=ids[start:start + batch]):
            F.cross_entropy(model(x[start:start + batch]), y[start:start + batch],
                            reduction="sum").backward()
        model.zero_grad(set_to_none=True)


def query_log(run, model: nn.Module, data: Data):
    run.eval()
    with run(data_id=[f"q{i}" for i in range(len(data.y_test))]):
        F.cross_entropy(model(data.x_test), data.y_test, reduction="sum").backward()
    model.zero_grad(set_to_none=True)
    return run.get_log(copy=True)


def log_costs(run, passes: int) -> dict:
    manifest = run.reader().manifest
    state_dir = os.path.join(run.project_dir, "state")
    state_bytes = sum(os.path.getsize(os.path.join(state_dir, f)) for f in os.listdir(state_dir))
    return {"passes": passes, "rows": sum(s.rows for s in manifest.shards),
            "shard_bytes": sum(s.bytes for s in manifest.shards), "state_bytes": state_bytes}


def columns(tgt_ids: List, n_train: int) -> torch.Tensor:
    """Scores come in log order: the permutation that puts them in training-index order."""
    index = torch.full((n_train,), -1, dtype=torch.long)
    for col, i in enumerate(tgt_ids):
        index[int(i)] = col
    if (index < 0).any():
        raise RuntimeError(f"{int((index < 0).sum())} training examples have no score")
    return index


# ============================================================================ methods
def default_plan(setup: Setup, data: Data) -> List[dict]:
    """SOURCE's checkpoints: every snapshot, one segment per stage, the stage's optimizer
    summary, and the examples the stage trained on."""
    members = stage_members(setup, data, torch.arange(setup.n_train))
    return [{"name": f"s{stage}c{j}", "segment": stage, "lr": setup.lr[stage],
             "steps": setup.steps[stage], "ids": members[stage].tolist()}
            for stage in range(2) for j in range(setup.checkpoints_per_stage)]


def split_point(setup: Setup) -> int:
    """Where the "stage 1 split" variant cuts stage 1: after its first 10% of steps."""
    return max(setup.checkpoints_per_stage, setup.steps[0] // 10)


def variant_marks(setup: Setup) -> Dict[Tuple[int, int], str]:
    """Extra snapshots for the split variant: C midpoints in [0, E] and C in [E, K_1]."""
    cut, k, c = split_point(setup), setup.steps[0], setup.checkpoints_per_stage
    marks = {(0, max(1, round((j + 0.5) * cut / c))): f"s0early{j}" for j in range(c)}
    marks.update({(0, cut + round((j + 0.5) * (k - cut) / c)): f"s0late{j}" for j in range(c)})
    return marks


def variant_plans(setup: Setup, data: Data) -> Dict[str, List[dict]]:
    """SOURCE with other choices (sensitivity study, each logged as its own project)."""
    plan = default_plan(setup, data)
    c = setup.checkpoints_per_stage
    middle = f"c{c // 2}"
    every = list(range(setup.n_train))
    stage1_ids, cut = plan[0]["ids"], split_point(setup)
    split = [{"name": f"s0early{j}", "segment": 0, "lr": setup.lr[0], "steps": cut,
              "ids": stage1_ids} for j in range(c)]
    split += [{"name": f"s0late{j}", "segment": 1, "lr": setup.lr[0],
               "steps": setup.steps[0] - cut, "ids": stage1_ids} for j in range(c)]
    split += [{**p, "segment": 2} for p in plan if p["segment"] == 1]
    return {
        "1 checkpoint per segment (middle)": [p for p in plan if p["name"].endswith(middle)],
        "1 segment: stage-2 checkpoints only": [{**p, "segment": 0, "ids": every}
                                                for p in plan if p["segment"] == 1],
        f"3 segments: stage 1 cut at step {cut}": split,
        "eta K x 1/3 (steps under-reported)": [{**p, "steps": max(1, round(p["steps"] / 3))}
                                               for p in plan],
        "eta K x 3 (steps over-reported)": [{**p, "steps": p["steps"] * 3} for p in plan],
    }


def log_source(root: str, project: str, setup: Setup, data: Data, snapshots: Dict[str, dict],
               plan: List[dict]):
    """One run.checkpoint(...) logging pass per planned checkpoint. Returns (run, the model it
    watches, seconds)."""
    shutil.rmtree(os.path.join(root, project), ignore_errors=True)
    model = make_model(setup, 0)
    run = new_run(root, project, model, setup)
    t0 = time.perf_counter()
    for c in plan:
        model.load_state_dict(snapshots[c["name"]])
        ids = c["ids"]
        with run.checkpoint(c["name"], segment=c["segment"], lr=c["lr"], steps=c["steps"],
                            momentum=setup.momentum, train_ids=ids):
            log_examples(run, model, data.x_train[ids], data.y_train[ids], ids)
    run.finalize()
    return run, model, time.perf_counter() - t0


def query_source(run, model: nn.Module, setup: Setup, data: Data, final: nn.Module,
                 hessian: str = "ekfac") -> Tuple[torch.Tensor, dict, float]:
    t0 = time.perf_counter()
    model.load_state_dict(final.state_dict())
    test = query_log(run, model, data)
    result = run.compute_influence_all(test, method="source", hessian=hessian, progress=False)
    query_s = time.perf_counter() - t0
    scores = result["influence"][:, columns(result["tgt_ids"], setup.n_train)]
    return scores, result, query_s


def run_source(root: str, setup: Setup, data: Data, snapshots: Dict[str, dict],
               final: nn.Module) -> Tuple[Dict[str, torch.Tensor], dict, object]:
    plan = default_plan(setup, data)
    run, model, log_s = log_source(root, "source", setup, data, snapshots, plan)
    scores, result, query_s = query_source(run, model, setup, data, final)
    kfac, _, _ = query_source(run, model, setup, data, final, hessian="kfac")
    costs = {**log_costs(run, passes=len(plan)), "log_s": log_s, "query_s": query_s,
             "segments": result["segments"]}
    return {"ekfac": scores, "kfac": kfac}, costs, (run, model)


def run_variants(root: str, setup: Setup, data: Data, snapshots: Dict[str, dict],
                 final: nn.Module) -> Dict[str, Tuple[torch.Tensor, int]]:
    out = {}
    for k, (label, plan) in enumerate(variant_plans(setup, data).items()):
        run, model, _ = log_source(root, f"source_variant{k}", setup, data, snapshots, plan)
        scores, _, _ = query_source(run, model, setup, data, final)
        out[label] = (scores, len(plan))
    return out


def one_segment_check(root: str, setup: Setup, data: Data, final: nn.Module,
                      ekfac_matched: torch.Tensor) -> dict:
    """SOURCE with one checkpoint (the final weights) and one segment (lr and steps of stage 2,
    every example) against EK-FAC influence with damping 1/(eta K), divided by N: close, not
    equal (F_r(s) lies between 1/(s + 1/a) and 1.3 times that)."""
    plan = [{"name": "final", "segment": 0, "lr": setup.lr[1], "steps": setup.steps[1],
             "ids": list(range(setup.n_train))}]
    run, model, _ = log_source(root, "source_final", setup, data,
                               {"final": final.state_dict()}, plan)
    one, _, _ = query_source(run, model, setup, data, final)
    one, inf = one.double(), ekfac_matched.double() / setup.n_train
    pearson = torch.stack([torch.corrcoef(torch.stack([a, b]))[0, 1] for a, b in zip(one, inf)])
    return {"max_abs_diff_rel": float((one - inf).abs().max() / inf.abs().max()),
            "pearson_min": float(pearson.min()), "spearman_mean": float(spearman(one, inf).mean()),
            "ratio_median": float((one / inf).median())}


def run_ekfac(root: str, setup: Setup, data: Data, final: nn.Module
              ) -> Tuple[Dict[str, torch.Tensor], dict]:
    model = make_model(setup, 0)
    model.load_state_dict(final.state_dict())
    shutil.rmtree(os.path.join(root, "ekfac"), ignore_errors=True)
    run = new_run(root, "ekfac", model, setup)
    ids = list(range(setup.n_train))
    t0 = time.perf_counter()
    log_examples(run, model, data.x_train, data.y_train, ids)
    run.finalize()  # fits EK-FAC's eigenvalues from the saved rows
    log_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    test = query_log(run, model, data)
    result = run.compute_influence_all(test, hessian="ekfac", progress=False)
    query_s = time.perf_counter() - t0
    eta_k = setup.lr[1] / (1 - setup.momentum) * setup.steps[1]
    matched = run.compute_influence_all(test, hessian="ekfac", damping=1.0 / eta_k,
                                        progress=False)
    scores = {"default": result["influence"][:, columns(result["tgt_ids"], setup.n_train)],
              "matched": matched["influence"][:, columns(matched["tgt_ids"], setup.n_train)]}
    return scores, {**log_costs(run, passes=1), "log_s": log_s, "query_s": query_s}


def run_tracin(setup: Setup, data: Data, snapshots: Dict[str, dict], source
               ) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Query gradients at each checkpoint against that checkpoint's logged rows (reused from the
    SOURCE project: the same passes). `source`: the SOURCE run and the model it watches."""
    source_run, model = source
    n_q = len(data.y_test)
    plain = torch.zeros(n_q, setup.n_train, dtype=torch.float64)
    weighted = torch.zeros_like(plain)
    eta = [lr / (1 - setup.momentum) for lr in setup.lr]
    t0 = time.perf_counter()
    for c in default_plan(setup, data):
        stage = c["segment"]
        model.load_state_dict(snapshots[c["name"]])
        q = query_log(source_run, model, data).grads.double()
        ids, rows = LogReader(source_run.project_dir, checkpoint=c["name"]).read_all()
        dots = q @ rows.double().T  # [n_q, rows of this checkpoint]
        index = torch.tensor([int(i) for i in ids])
        plain[:, index] += setup.lr[stage] * dots
        scale = eta[stage] * setup.steps[stage] / (setup.checkpoints_per_stage * len(ids))
        weighted[:, index] += scale * dots
    query_s = time.perf_counter() - t0
    return {"lr": plain.float(), "etak": weighted.float()}, {"query_s": query_s}


# ============================================================================ evaluation
def retrain_outputs(setup: Setup, data: Data, budget: Budget, cache_dir: str,
                    dummy_scores: torch.Tensor) -> Tuple[torch.Tensor, Dict[int, torch.Tensor]]:
    """Subset masks and per-seed test losses [subsets, n_test] (cached)."""

    def train_fn(indices, seed):
        return train(setup, data, indices, seed)

    def eval_fn(model):
        return test_losses(model, data)

    per_seed, masks = {}, None
    for seed in budget.seeds:
        out = linear_datamodeling_score(train_fn, eval_fn, dummy_scores, n_subsets=budget.subsets,
                                        fraction=0.5, seeds=(seed,), cache_dir=cache_dir,
                                        outputs_are="loss", progress=False)
        per_seed[seed] = out["subset_outputs"]
        masks = out["subset_masks"]
    return masks, per_seed


def evaluate(scores: torch.Tensor, masks: torch.Tensor, outputs: torch.Tensor,
             labels: torch.Tensor, stage1: Tuple[int, ...]) -> dict:
    """LDS over every query, its standard error over queries, and over each class group."""
    per_query = lds(scores, masks, outputs)["per_query"]
    early = torch.isin(labels, torch.tensor(stage1))

    def mean(mask):
        values = per_query[mask & ~torch.isnan(per_query)]
        return float(values.mean()), float(values.std() / math.sqrt(max(len(values), 1)))

    (all_m, all_se), (early_m, _), (late_m, _) = mean(torch.ones_like(early)), mean(early), \
        mean(~early)
    return {"lds": all_m, "se": all_se, "lds_early": early_m, "lds_late": late_m}


def paired_difference(a: torch.Tensor, b: torch.Tensor, masks: torch.Tensor,
                      outputs: torch.Tensor, boots: int = 1000, seed: int = 0) -> dict:
    """LDS(a) - LDS(b) with a 95% bootstrap interval that resamples subsets and queries
    together (both sources of noise, the two methods paired)."""
    m = masks.double()
    pred_a, pred_b = -(m @ a.double().T), -(m @ b.double().T)  # [subsets, queries]; loss: negate
    gen = torch.Generator().manual_seed(seed)
    n_sub, n_q = outputs.shape

    def diff(rows, cols):
        out = outputs[rows][:, cols].T
        ra, rb = spearman(pred_a[rows][:, cols].T, out), spearman(pred_b[rows][:, cols].T, out)
        return float((ra - rb).nanmean())

    point = diff(torch.arange(n_sub), torch.arange(n_q))
    draws = torch.tensor([diff(torch.randint(n_sub, (n_sub,), generator=gen),
                               torch.randint(n_q, (n_q,), generator=gen)) for _ in range(boots)])
    low, high = torch.quantile(draws, torch.tensor([0.025, 0.975], dtype=draws.dtype)).tolist()
    return {"diff": point, "low": low, "high": high}


def seed_ceiling(per_seed: Dict[int, torch.Tensor], labels, stage1) -> Optional[dict]:
    """Spearman, across subsets, between two seeds' losses: how far retraining noise alone lets
    a perfect single-seed predictor go."""
    if len(per_seed) < 2:
        return None
    a, b = list(per_seed.values())[:2]
    rho = spearman(a.T, b.T)
    early = torch.isin(labels, torch.tensor(stage1))
    ok = ~torch.isnan(rho)
    return {"lds": float(rho[ok].mean()), "se": float(rho[ok].std() / math.sqrt(int(ok.sum()))),
            "lds_early": float(rho[ok & early].mean()), "lds_late": float(rho[ok & ~early].mean())}


# ============================================================================ output
def table(headers: List[str], rows: List[List[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [headers] + rows) for i in range(len(headers))]
    lines = [" | ".join(str(h).ljust(w) for h, w in zip(headers, widths)),
             "-+-".join("-" * w for w in widths)]
    for row in rows:
        lines.append(" | ".join(str(c).ljust(w) if k == 0 else str(c).rjust(w)
                                for k, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


def lds_row(name: str, r: dict) -> List[str]:
    return [name, f"{r['lds']:.3f}", f"{r['se']:.3f}", f"{r['lds_early']:.3f}",
            f"{r['lds_late']:.3f}"]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 subsets x 1 seed, no variants")
    parser.add_argument("--subsets", type=int, default=None, help="LDS subsets (50; quick 20)")
    parser.add_argument("--seeds", type=int, default=None, help="retraining seeds (2; quick 1)")
    parser.add_argument("--steps", default=None, help="steps of stage 1,2 (default 600,300)")
    parser.add_argument("--lr", default=None, help="learning rates of stage 1,2 (0.05,0.01)")
    parser.add_argument("--checkpoints", type=int, default=None, help="checkpoints per stage (3)")
    parser.add_argument("--rank", type=int, default=None,
                        help="LoGra rank (16); 0 logs unprojected gradients")
    parser.add_argument("--variants", dest="variants", action="store_true", default=None,
                        help="also score SOURCE variants (default: on unless --quick)")
    parser.add_argument("--no-variants", dest="variants", action="store_false")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed repetitions of logging and querying (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (shared machine)")
    parser.add_argument("--cache-dir", default=None,
                        help="retraining cache (default: <tmp>/logix-source-lds/<setup hash>)")
    parser.add_argument("--keep-logs", default=None, help="write the LogIX logs here, keep them")
    parser.add_argument("--json", default=None, help="also write the results as JSON")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    setup = Setup()
    if args.steps:
        setup.steps = tuple(int(v) for v in args.steps.split(","))
    if args.lr:
        setup.lr = tuple(float(v) for v in args.lr.split(","))
    if args.checkpoints:
        setup.checkpoints_per_stage = args.checkpoints
    if args.rank is not None:
        setup.rank = args.rank
    budget = copy.copy(QUICK if args.quick else FULL)
    if args.subsets:
        budget.subsets = args.subsets
    if args.seeds:
        budget.seeds = tuple(range(args.seeds))
    variants = (not args.quick) if args.variants is None else args.variants
    cache_dir = args.cache_dir or os.path.join(tempfile.gettempdir(), "logix-source-lds",
                                               setup.key())
    data = load_data(setup)
    print(f"digits: {setup.n_train} train, {setup.n_test} queries; MLP 64-{setup.hidden}-"
          f"{setup.hidden}-10; stage 1 (classes {list(setup.stage1_classes)}): {setup.steps[0]} "
          f"steps lr {setup.lr[0]}; stage 2 (all): {setup.steps[1]} steps lr {setup.lr[1]}; "
          f"momentum {setup.momentum}, batch {setup.batch}; {setup.checkpoints_per_stage} "
          f"checkpoints per stage; LoGra rank {setup.rank or 'none (full gradients)'}; "
          f"LDS: {budget.subsets} subsets x {len(budget.seeds)} seed(s)", flush=True)

    t0 = time.perf_counter()
    snapshots: Dict[str, dict] = {}
    final = train(setup, data, torch.arange(setup.n_train), seed=0, snapshots=snapshots,
                  marks={**default_marks(setup), **variant_marks(setup)})
    train_s = time.perf_counter() - t0
    losses = test_losses(final, data)
    early = torch.isin(data.y_test, torch.tensor(setup.stage1_classes))
    with torch.no_grad():
        acc = (final(data.x_test).argmax(1) == data.y_test).float()
    print(f"trained in {train_s:.1f} s: test loss {losses.mean():.3f} (digits 0-4: "
          f"{losses[early].mean():.3f}, 5-9: {losses[~early].mean():.3f}), accuracy "
          f"{acc.mean():.3f}", flush=True)

    root = args.keep_logs or tempfile.mkdtemp(prefix="source_lds_")
    os.makedirs(root, exist_ok=True)
    for project in os.listdir(root):
        if project == "ekfac" or project.startswith("source"):
            shutil.rmtree(os.path.join(root, project), ignore_errors=True)
    try:
        # Logging and querying take seconds: repeat them, alternating the order, and keep the
        # median time (the scores are the same every time).
        timings = {"source": [], "ekfac": [], "tracin": []}
        for r in range(args.repeats):
            for arm in (("source", "ekfac") if r % 2 == 0 else ("ekfac", "source")):
                if arm == "source":
                    source_scores, source_cost, source_run = run_source(root, setup, data,
                                                                        snapshots, final)
                    timings["source"].append((source_cost["log_s"], source_cost["query_s"]))
                else:
                    ekfac_scores, ekfac_cost = run_ekfac(root, setup, data, final)
                    timings["ekfac"].append((ekfac_cost["log_s"], ekfac_cost["query_s"]))
            tracin_scores, tracin_cost = run_tracin(setup, data, snapshots, source_run)
            timings["tracin"].append((0.0, tracin_cost["query_s"]))
        for arm, cost in (("source", source_cost), ("ekfac", ekfac_cost), ("tracin", tracin_cost)):
            cost["log_s"] = statistics.median(t[0] for t in timings[arm])
            cost["query_s"] = statistics.median(t[1] for t in timings[arm])
        variant_scores = run_variants(root, setup, data, snapshots, final) if variants else {}
        check = one_segment_check(root, setup, data, final, ekfac_scores["matched"]) \
            if variants else None
    finally:
        if args.keep_logs is None:
            shutil.rmtree(root, ignore_errors=True)
    print("SOURCE segments:", ", ".join(
        f"{s['segment']}: eta K = {s['eta_k']:g}, N = {s['examples']}"
        for s in source_cost["segments"]), flush=True)

    t0 = time.perf_counter()
    random_scores = torch.randn(setup.n_test, setup.n_train,
                                generator=torch.Generator().manual_seed(123))
    masks, per_seed = retrain_outputs(setup, data, budget, cache_dir, random_scores)
    retrain_s = time.perf_counter() - t0
    outputs = torch.stack(list(per_seed.values())).mean(0)

    C = setup.checkpoints_per_stage
    methods = [(f"SOURCE (2 segments x {C} ckpts, EK-FAC)", source_scores["ekfac"]),
               ("EK-FAC influence, final weights", ekfac_scores["default"]),
               ("EK-FAC influence, damping 1/(eta K)", ekfac_scores["matched"]),
               ("TracIn, sum_c lr q_c.g_c", tracin_scores["lr"]),
               ("TracIn, sum_c eta K/(C N) q_c.g_c", tracin_scores["etak"]),
               ("random scores", random_scores)]
    results = {name: evaluate(s, masks, outputs, data.y_test, setup.stage1_classes)
               for name, s in methods}
    ceiling = seed_ceiling(per_seed, data.y_test, setup.stage1_classes)
    versus = paired_difference(source_scores["ekfac"], ekfac_scores["default"], masks, outputs)

    rows = [lds_row(name, r) for name, r in results.items()]
    if ceiling:
        rows.append(lds_row("(seed-to-seed noise ceiling)", ceiling))
    print()
    print(f"LDS ({budget.subsets} subsets of 50%, losses averaged over {len(budget.seeds)} "
          f"seed(s); {setup.n_test} queries; s.e. over queries)")
    print(table(["method", "LDS", "+- s.e.", "queries 0-4", "queries 5-9"], rows))
    print(f"SOURCE - EK-FAC: {versus['diff']:+.3f} (95% bootstrap over subsets and queries: "
          f"{versus['low']:+.3f} .. {versus['high']:+.3f})")

    variant_results = {}
    if variant_scores:
        variant_scores = {f"SOURCE, K-FAC eigenvalues ({2 * C} ckpts)":
                          (source_scores["kfac"], 2 * C), **variant_scores}
        for name, (s, _) in variant_scores.items():
            variant_results[name] = evaluate(s, masks, outputs, data.y_test,
                                             setup.stage1_classes)
        print()
        print("SOURCE variants (sensitivity; each its own logging passes)")
        print(table(["variant", "LDS", "+- s.e.", "queries 0-4", "queries 5-9", "passes"],
                    [lds_row(name, variant_results[name]) + [str(passes)]
                     for name, (_, passes) in variant_scores.items()]))
        print(f"One segment, one checkpoint at the final weights vs EK-FAC influence with damping "
              f"1/(eta K), / N: max |difference| = {check['max_abs_diff_rel']:.1%} of the largest "
              f"score, per-query Pearson >= {check['pearson_min']:.4f}, mean Spearman "
              f"{check['spearman_mean']:.4f}, median ratio {check['ratio_median']:.3f}")

    ratio = {k: source_cost[k] / ekfac_cost[k] for k in ("passes", "rows", "shard_bytes",
                                                         "log_s", "query_s")}
    cost_rows = [
        ["SOURCE", str(source_cost["passes"]), str(source_cost["rows"]),
         kib(source_cost["shard_bytes"]), kib(source_cost["state_bytes"]),
         f"{source_cost['log_s']:.2f}", f"{source_cost['query_s']:.2f}"],
        ["EK-FAC influence", str(ekfac_cost["passes"]), str(ekfac_cost["rows"]),
         kib(ekfac_cost["shard_bytes"]), kib(ekfac_cost["state_bytes"]),
         f"{ekfac_cost['log_s']:.2f}", f"{ekfac_cost['query_s']:.2f}"],
        ["TracIn (SOURCE's logs)", "(same)", "(same)", "(same)", "-", "(same)",
         f"{tracin_cost['query_s']:.2f}"],
        ["SOURCE / EK-FAC", f"{ratio['passes']:.0f}x", f"{ratio['rows']:.1f}x",
         f"{ratio['shard_bytes']:.1f}x", "", f"{ratio['log_s']:.1f}x",
         f"{ratio['query_s']:.1f}x"],
    ]
    print()
    print(f"Cost (median wall-clock seconds of {args.repeats} repetitions on a shared machine, "
          f"torch threads = {args.threads}; logging = every pass + finalize; query = logging "
          "the queries + scoring)")
    print(table(["method", "logging passes", "rows logged", "shard bytes", "state bytes",
                 "logging s", "query s"], cost_rows))
    total_s = time.perf_counter() - start
    print(f"\ntraining {train_s:.1f} s; retraining for the LDS {retrain_s:.1f} s "
          f"(cache: {cache_dir}); total {total_s:.1f} s")

    report = {"setup": asdict(setup), "budget": asdict(budget), "lds": results,
              "variants": variant_results, "one_segment_check": check if variants else None,
              "seed_ceiling": ceiling,
              "source_minus_ekfac": versus,
              "costs": {"source": source_cost, "ekfac": ekfac_cost, "tracin": tracin_cost},
              "train_s": train_s, "retrain_s": retrain_s, "total_s": total_s}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return report


if __name__ == "__main__":
    main()

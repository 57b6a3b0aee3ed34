"""How well `logix.evaluation.choose_damping` picks the damping from a few retrainings: per
case, curvature and projection, the damping it chooses from K retrained subsets (seed 101, not
one the evaluation uses), scored by the LDS of quality.py (50 half subsets x the evaluation
seeds) against the best damping of the same grid and against damping="auto".

    python benchmarks/damping_choice.py                          # 12 cases, K = 20
    python benchmarks/damping_choice.py --cases mlp,moons --subsets-for-choice 10,20
    python benchmarks/damping_choice.py --kinds auto,ggn          # + the model's own GGN

--kinds: "auto" is the log's default curvature (EK-FAC / K-FAC); "ggn" the model's Gauss-Newton
matrix through run.add_curvature_source (not for the lm case, whose loss is per token).
Retrainings are cached under --out (shared with quality.py's layout: cache/CASE/seedS).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as Q  # noqa: E402
from _quality_cases import CASES, N_TRAIN  # noqa: E402

from logix.evaluation import choose_damping  # noqa: E402

DEFAULT_CASES = ("mlp,cnn,breast_cancer,digits,staged,attn,digits_early,digits_mlp,diabetes3,"
                 "moons,digits_relu,lm")
CHOICE_SEED = 101


def mean(values):
    return sum(values) / len(values)


def name(damping):
    return damping if isinstance(damping, str) else f"{damping:.3g}"


def measure(case, kind, label, init, rank, out, ks, seeds):
    """Rows (one per K) comparing the chosen damping with the grid's best and with auto."""
    model = case.train(torch.arange(N_TRAIN), 0)
    root = out / "logs" / f"{case.name}-{kind}-{label}"
    shutil.rmtree(root, ignore_errors=True)
    run = Q.log_pass(case, model, root, f"{case.name}-{label}", init, rank)
    test = Q.query_log(run, case, model)
    hessian = None
    if kind == "ggn":
        Q.add_curvature_source(run, case, model)
        hessian = "ggn"
    cache = out / "cache" / case.name

    measured = {}

    def evaluated(damping):
        if damping not in measured:
            result = run.compute_influence_all(test, hessian=hessian, damping=damping,
                                               progress=False)
            measured[damping] = mean(Q.evaluate(case, Q.aligned(result), cache, 50, seeds))
        return measured[damping]

    rows = []
    for k in ks:
        t0 = time.time()
        choice = choose_damping(run, test, case.train, case.eval_loss, range(N_TRAIN),
                                hessian=hessian, n_subsets=k, seeds=(CHOICE_SEED,),
                                cache_dir=out / "choice-cache" / case.name, progress=False)
        seconds = time.time() - t0
        grid = {d: evaluated(d) for d in choice.lds if d not in choice.refused}
        auto = grid["auto"]
        best = max(grid, key=grid.get)
        rows.append({"case": case.name, "kind": kind, "rows": label, "k": k,
                     "chosen": choice.best, "chosen_lds": grid[choice.best],
                     "best": best, "best_lds": grid[best], "auto_lds": auto,
                     "auto_within_noise": choice.auto_is_within_noise,
                     "choice_lds": {name(d): v for d, v in choice.lds.items()},
                     "choice_spread": {name(d): v for d, v in choice.spread.items()},
                     "eval_lds": {name(d): v for d, v in grid.items()},
                     "choice_seconds": seconds})
        r = rows[-1]
        print(f"{case.name:13s} {kind:4s} {label:8s} K={k:<3d} chosen {name(r['chosen'])} "
              f"{r['chosen_lds']:.3f} | best {name(best)} {r['best_lds']:.3f} | auto "
              f"{auto:.3f} | chosen-best {r['chosen_lds'] - r['best_lds']:+.3f} auto-best "
              f"{auto - r['best_lds']:+.3f}", flush=True)
    return rows


def render(rows):
    """Per row, the evaluated LDS of the damping choose_damping chose (its best on K subsets)
    and of auto, each minus the best of the grid on the evaluation; then a summary per K."""
    lines = ["| case | curvature | rows | K | chosen - best | auto - best | chosen | best |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['kind']} | {r['rows']} | {r['k']} | "
                     f"{r['chosen_lds'] - r['best_lds']:+.3f} | "
                     f"{r['auto_lds'] - r['best_lds']:+.3f} | {name(r['chosen'])} | "
                     f"{name(r['best'])} ({r['best_lds']:.3f}) |")
    lines += ["", "| K | what | mean gap to the best | largest | gaps > 0.02 |",
              "|---|---|---|---|---|"]
    for k in sorted({r["k"] for r in rows}):
        for what in ("chosen", "auto"):
            gaps = [r["best_lds"] - r[f"{what}_lds"] for r in rows if r["k"] == k]
            lines.append(f"| {k} | {what} | {mean(gaps):.3f} | {max(gaps):.3f} | "
                         f"{sum(g > 0.02 for g in gaps)} of {len(gaps)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=DEFAULT_CASES)
    parser.add_argument("--kinds", default="auto", help="comma-separated: auto, ggn")
    parser.add_argument("--projections", default="full,random8",
                        help="comma-separated: full, random8, pca8, pca4")
    parser.add_argument("--subsets-for-choice", default="20",
                        help="K: retrained subsets choose_damping sees (comma-separated)")
    parser.add_argument("--seeds", default="0,1,2", help="the evaluation's retraining seeds")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/damping_choice"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    projections = {("full" if init == "none" else f"{init}{rank}"): (init, rank)
                   for init, rank in Q.PROJECTIONS}
    wanted = args.projections.split(",")
    for name in wanted:
        if name not in projections:
            parser.error(f"unknown projection {name!r}; choose from {list(projections)}")
    kinds = args.kinds.split(",")
    if set(kinds) - {"auto", "ggn"}:
        parser.error(f"--kinds {args.kinds!r}: choose from auto, ggn")
    ks = [int(k) for k in args.subsets_for_choice.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    if CHOICE_SEED in seeds:
        parser.error(f"--seeds must not include {CHOICE_SEED}, the seed the choice retrains with")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.cases.split(","):
        if name not in CASES:
            parser.error(f"unknown case {name!r}; cases: {list(CASES)}")
        case = CASES[name]()
        for kind in kinds:
            if kind == "ggn" and case.y is None:
                continue
            for label in wanted:
                rows += measure(case, kind, label, *projections[label], args.out, ks, seeds)
                (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    table = render(rows)
    (args.out / "table.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

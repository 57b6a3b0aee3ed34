"""What storing the logged rows in bfloat16 (`logging.log_dtype: bfloat16`) does to the scores,
against float32 storage of the same rows.

    python benchmarks/bf16_scores.py [--case digits|lm] [--subsets 50] [--rank R] [--out DIR]

`--case digits` (default): the setup of benchmarks/lds_digits.py (examples/digits: a small CNN
trained on 1,500 of sklearn's 8x8 digits, LoGra rank 16, all 297 test digits as queries).
`--case lm`: the language-model case of benchmarks/quality.py (a one-block causal transformer
on 240 sequences of a synthetic Markov grammar, 40 query sequences; each row sums every token's
gradient over nine layers), random LoGra rank 8 (`--rank`). The model is logged twice, with
float32 and with bfloat16 shards (the same projections; covariances are accumulated in float32
either way, EK-FAC's eigenvalues are fitted from the stored rows). Per preconditioner it prints
the Spearman rank correlation between the two score matrices (per query: mean and minimum), the
overlap of each query's 10 most helpful training examples, and the LDS of each (retraining
`--subsets` 50% subsets, cached in --out; the logs go to a temporary folder).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "digits"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import digits  # noqa: E402  (examples/digits/digits.py)

from logix.evaluation import lds, linear_datamodeling_score, spearman  # noqa: E402

HESSIANS = ("none", "kfac", "ekfac")


def digits_case(rank: int, out: Path, subsets: int):
    """(description, {dtype: {hessian: scores}}, LDS measurement) of the digits CNN."""
    data = digits.load_data()
    model = digits.train_model(data)
    scores = {}
    for dtype in ("float32", "bfloat16"):
        run = digits.log_training(model, data, rank, Path(tempfile.mkdtemp()),
                                  project=f"digits-{dtype}", log_dtype=dtype, seed=0)
        scores[dtype] = digits.influence_scores(run, model, data, HESSIANS)
    measured = linear_datamodeling_score(
        train_fn=lambda indices, seed: digits.train_model(data, indices, seed),
        eval_fn=lambda m: digits.test_losses(m, data), scores=scores["float32"]["none"],
        n_subsets=subsets, fraction=0.5, seeds=(0,), cache_dir=out / "cache",
        outputs_are="loss", progress=False)
    return (f"digits CNN, LoGra rank {rank}, {len(data.x_test)} queries x {len(data.x_train)} "
            f"training digits", scores, measured)


def lm_case(rank: int, out: Path, subsets: int):
    """The same for quality.py's language-model case."""
    import quality
    from _quality_cases import CASES, N_QUERY, N_TRAIN

    case = CASES["lm"]()
    model = case.train(list(range(N_TRAIN)), seed=0)
    scores = {}
    for dtype in ("float32", "bfloat16"):
        run = quality.log_pass(case, model, Path(tempfile.mkdtemp()), f"lm-{dtype}", "random",
                               rank, log_dtype=dtype)
        test = quality.query_log(run, case, model)
        scores[dtype] = {h: quality.aligned(run.compute_influence_all(test, hessian=h,
                                                                      progress=False))
                         for h in HESSIANS}
    measured = linear_datamodeling_score(
        train_fn=case.train, eval_fn=case.eval_loss, scores=scores["float32"]["none"],
        n_subsets=subsets, fraction=0.5, seeds=(0,), cache_dir=out / "cache-lm",
        outputs_are="loss", progress=False)
    return (f"tiny causal LM (quality.py's lm case), random LoGra rank {rank}, {N_QUERY} "
            f"query sequences x {N_TRAIN} training sequences", scores, measured)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", choices=("digits", "lm"), default="digits")
    ap.add_argument("--subsets", type=int, default=50, help="LDS retraining subsets")
    ap.add_argument("--rank", type=int, default=None, help="LoGra rank (digits 16, lm 8)")
    ap.add_argument("--out", type=Path, default=digits.HERE / "out")
    args = ap.parse_args(argv)
    if args.case == "digits":
        title, scores, measured = digits_case(args.rank or 16, args.out, args.subsets)
    else:
        title, scores, measured = lm_case(args.rank or 8, args.out, args.subsets)
    print(f"{title}; LDS over {args.subsets} subsets")
    print(f"{'hessian':8s} {'spearman mean':>13s} {'min':>6s} {'top-10 overlap':>14s} "
          f"{'LDS fp32':>8s} {'LDS bf16':>8s}")
    for hessian in HESSIANS:
        a, b = scores["float32"][hessian], scores["bfloat16"][hessian]
        rho = spearman(a, b)
        top_a, top_b = a.topk(10, dim=1).indices, b.topk(10, dim=1).indices
        overlap = sum(len(set(x) & set(y)) for x, y in zip(top_a.tolist(), top_b.tolist()))
        lds_of = {dtype: lds(scores[dtype][hessian], measured["subset_masks"],
                             measured["subset_outputs"], outputs_are="loss")["lds"]
                  for dtype in scores}
        print(f"{hessian:8s} {float(rho.mean()):13.4f} {float(rho.min()):6.3f} "
              f"{overlap / top_a.numel():14.3f} {lds_of['float32']:8.3f} "
              f"{lds_of['bfloat16']:8.3f}")


if __name__ == "__main__":
    main()

"""What storing the logged rows in bfloat16 (`logging.log_dtype: bfloat16`) does to the scores,
against float32 storage of the same rows.

    python benchmarks/bf16_scores.py [--subsets 50] [--rank 16] [--out DIR]

The setup of benchmarks/lds_digits.py (examples/digits: a small CNN trained on 1,500 of sklearn's
8x8 digits, LoGra rank 16, all 297 test digits as queries). The model is logged twice, with
float32 and with bfloat16 shards (the same projections; covariances are accumulated in float32
either way, EK-FAC's eigenvalues are fitted from the stored rows). Per preconditioner it prints
the Spearman rank correlation between the two score matrices (per query: mean and minimum), the
overlap of each query's 10 most helpful training digits, and the LDS of each (retraining
`--subsets` 50% subsets, cached in --out/cache and shared with the example).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "digits"))

import digits  # noqa: E402  (examples/digits/digits.py)

from logix.evaluation import lds, linear_datamodeling_score, spearman  # noqa: E402

HESSIANS = ("none", "ekfac")


def scores_with(dtype: str, model, data, rank: int, root: Path) -> dict:
    """{hessian: scores [n_test, n_train]} of a log stored in `dtype`, columns in training
    order."""
    run = digits.log_training(model, data, rank, root, project=f"digits-{dtype}",
                              log_dtype=dtype, seed=0)
    return digits.influence_scores(run, model, data, HESSIANS)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subsets", type=int, default=50, help="LDS retraining subsets")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--out", type=Path, default=digits.HERE / "out")
    args = ap.parse_args(argv)
    data = digits.load_data()
    model = digits.train_model(data)
    logs = args.out / "bf16_scores"
    scores = {dtype: scores_with(dtype, model, data, args.rank, logs)
              for dtype in ("float32", "bfloat16")}
    measured = linear_datamodeling_score(
        train_fn=lambda indices, seed: digits.train_model(data, indices, seed),
        eval_fn=lambda m: digits.test_losses(m, data), scores=scores["float32"]["none"],
        n_subsets=args.subsets, fraction=0.5, seeds=(0,), cache_dir=args.out / "cache",
        outputs_are="loss", progress=False)
    print(f"digits CNN, LoGra rank {args.rank}, {len(data.x_test)} queries x "
          f"{len(data.x_train)} training digits; LDS over {args.subsets} subsets")
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

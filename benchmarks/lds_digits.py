"""Attribution quality on sklearn's digits: linear datamodeling score (LDS) of LoGra + EK-FAC
against random scores and plain gradient dot products.

    python benchmarks/lds_digits.py [--subsets 50] [--seeds 1] [--out examples/digits/out]

Setup (from the influence issue, shared with examples/digits/digits.py, whose code this calls):
a small CNN (Conv2d(1,8,3) -> Conv2d(8,16,3) -> Linear(256,10)) trained full-batch on 1,500 of
the 1,797 8x8 digits; one LogIX logging pass with LoGra rank 16; scores of all 297 test digits
against all 1,500 training digits. The LDS retrains the CNN on `--subsets` random 50% subsets
(same seed as the attributed model, outputs averaged over `--seeds` seeds) and takes, per test
digit, the Spearman correlation between the measured test loss and the loss the scores predict
(minus the sum of the subset's scores), averaged over test digits (see docs/evaluation.md).

Retrained outputs are cached under --out/cache (the example's cache by default), so after the
example has run this takes seconds; from an empty cache, about a minute on 2 shared cores. Exit status 1 when LoGra + EK-FAC does not beat both
baselines by at least 0.05 LDS.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "digits"))

import digits  # noqa: E402  (examples/digits/digits.py)

METHODS = (
    digits.Method("random scores", "random", None),
    digits.Method("gradient dot (none)", "none", 16),
    digits.Method("ekfac", "ekfac", 16),
)
MARGIN = 0.05


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subsets", type=int, default=50, help="LDS retraining subsets")
    parser.add_argument("--seeds", type=int, default=1, help="retraining seeds per subset")
    parser.add_argument("--out", type=Path, default=digits.HERE / "out",
                        help="logs and retraining cache (default: the example's, %(default)s)")
    args = parser.parse_args(argv)
    settings = digits.Settings(out=args.out, subsets=args.subsets, seeds=args.seeds,
                               methods=METHODS, brittle_queries=0, plot=False,
                               results_file="lds_benchmark.json")
    results = digits.run_experiment(settings)
    score = {row["method"]: row["lds"] for row in results["methods"]}
    ekfac, dot, random = (score[digits.describe(m)] for m in reversed(METHODS))
    ok = ekfac >= max(dot, random) + MARGIN
    print(f"\nLoGra + EK-FAC {ekfac:.3f} vs gradient dot {dot:.3f} vs random {random:.3f}: "
          f"{'OK' if ok else 'FAIL'} (needs a lead of {MARGIN} over both)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

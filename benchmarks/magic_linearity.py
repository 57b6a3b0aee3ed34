"""How far the exact metagradient's first-order prediction holds on a quality.py case: record
the attributed run, score its queries with MAGIC, then retrain the same run (seed 0, same
steps) with one example's weight lowered by delta and compare the measured change of the query
losses with the predicted one, delta x score.

    python benchmarks/magic_linearity.py                  # mlp, examples 0 and 5
    python benchmarks/magic_linearity.py --case staged --examples 0,1,2
    python benchmarks/magic_linearity.py --lr 0.02 --lds-subsets 50   # a smoother run, + LDS

Prints, per example and delta, the correlation across queries of measured and predicted
changes and the ratio of their norms (1, 1 for an exact prediction). --lr replaces the case's
learning rate (mlp, cnn, lm); --lds-subsets N adds MAGIC's single-model LDS (the run retrained
with the examples outside each of N subsets given weight 0, subsets drawn with seeds 0, 1, 2)
at 99%, 95% and 50% kept.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

import logix
from logix.evaluation import linear_datamodeling_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _quality_cases import CASES, N_TRAIN  # noqa: E402

DELTAS = (1e-3, 1e-2, 0.1, 1.0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", default="mlp", choices=sorted(CASES))
    parser.add_argument("--examples", default="0,5")
    parser.add_argument("--lr", type=float, help="replace the case's learning rate")
    parser.add_argument("--lds-subsets", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    case = CASES[args.case]()
    if args.lr is not None:
        case.lr = args.lr
    everything = torch.arange(N_TRAIN)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "replay"
        model = case.train(everything, 0, record=lambda m, opt: logix.MagicRecorder(
            folder, m, opt, every=20))
        result = logix.magic_scores(folder, case.model(), case.magic_loss,
                                    case.per_example_batch, (case.qx, case.qy), progress=False)
    scores = result["influence"][:, [result["tgt_ids"].index(i) for i in range(N_TRAIN)]]
    base = case.eval_loss(model).double()
    print(f"{args.case}: MAGIC scores in {result['meta']['seconds']:.1f} s")
    print("| example | delta | correlation across queries | measured / predicted norm |")
    print("|---|---|---|---|")
    for example in (int(e) for e in args.examples.split(",")):
        for delta in DELTAS:
            weights = torch.ones(N_TRAIN)
            weights[example] -= delta
            measured = case.eval_loss(case.train(everything, 0, weights=weights)).double() - base
            predicted = delta * scores[:, example]  # Q(w - delta e_i) - Q(w) = delta * score
            corr = float(torch.corrcoef(torch.stack([measured, predicted]))[0, 1])
            ratio = float(measured.norm() / predicted.norm())
            print(f"| {example} | {delta:g} | {corr:.4f} | {ratio:.3f} |")
    if args.lds_subsets:
        print("| kept | MAGIC single-model LDS per subset seed | mean |\n|---|---|---|")
        for fraction in (0.99, 0.95, 0.5):
            found = [linear_datamodeling_score(
                case.train_removed, case.eval_loss, scores, n_subsets=args.lds_subsets,
                fraction=fraction, subset_seed=s, progress=False)["lds"] for s in (0, 1, 2)]
            print(f"| {fraction:.0%} | {', '.join(f'{v:.3f}' for v in found)} | "
                  f"{sum(found) / len(found):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Which damping should the influence query use? Measure it on your own model: train a small
classifier on sklearn's wine table, log its per-example gradients, then let
`logix.evaluation.choose_damping` score the test wines at "auto" and at a grid of dampings and
check each against 20 retrainings on random halves of the training set.

    python examples/choose_damping.py [--root ./logix_examples] [--subsets 20]
"""

import argparse
import os

import torch
from sklearn.datasets import load_wine
from torch import nn
from torch.nn import functional as F

import logix
from logix.evaluation import choose_damping

N_QUERY = 20


def load_data():
    features, labels = load_wine(return_X_y=True)
    x, y = torch.tensor(features, dtype=torch.float32), torch.tensor(labels)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = order[:120], order[120:120 + N_QUERY]
    mean, std = x[train].mean(0), x[train].std(0)
    return (x[train] - mean) / std, y[train], (x[test] - mean) / std, y[test]


X, Y, X_TEST, Y_TEST = load_data()


def train_fn(indices, seed):
    """The training run, on the examples `indices` only: what choose_damping repeats."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(13, 16), nn.Tanh(), nn.Linear(16, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(150):
        optimizer.zero_grad()
        F.cross_entropy(model(X[indices]), Y[indices]).backward()
        optimizer.step()
    return model


@torch.no_grad()
def test_loss(model):  # one number per query: what the LDS predicts
    return F.cross_entropy(model(X_TEST), Y_TEST, reduction="none")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="./logix_examples")
    parser.add_argument("--subsets", type=int, default=20)
    args = parser.parse_args()

    model = train_fn(torch.arange(len(X)), seed=0)
    run = logix.init("choose_damping", root_dir=args.root)
    run.watch(model)
    run.setup({"grad": ["log"], "forward": ["covariance"], "backward": ["covariance"]})
    run.save(True)
    for batch in torch.arange(len(X)).split(30):
        with run(data_id=batch.tolist()):
            F.cross_entropy(model(X[batch]), Y[batch], reduction="sum").backward()
    run.finalize()
    model.zero_grad()
    run.eval()
    with run(data_id=[f"test{i}" for i in range(N_QUERY)]):
        F.cross_entropy(model(X_TEST), Y_TEST, reduction="sum").backward()
    queries = run.get_log(copy=True)

    # seeds other than the logged run's (0): the LDS asks about retraining from a new start
    choice = choose_damping(run, queries, train_fn, test_loss, train_ids=range(len(X)),
                            n_subsets=args.subsets, seeds=(1,),
                            cache_dir=os.path.join(args.root, "damping-cache"))
    print(choice)
    scores = run.compute_influence_all(queries, damping=choice.best, progress=False)
    top = scores["influence"][0].topk(3).indices.tolist()
    print(f"test wine 0 (class {int(Y_TEST[0])}): its most helpful training wines are "
          f"{[scores['tgt_ids'][i] for i in top]} (damping {choice.best:.3g})")


if __name__ == "__main__":
    main()

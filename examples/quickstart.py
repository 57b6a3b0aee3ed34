"""LogIX in one screen: train a classifier on sklearn's handwritten digits, log LoGra-projected
per-example gradients with EK-FAC statistics in one pass, then ask which training digits made the
model say what it says about a test digit.

    python examples/quickstart.py [--root ./logix_logs] [--queries 3]
"""

import argparse
import os
import shutil

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

import logix

SHADES = " .:-=+*#%@"


def load_data(seed: int = 0):
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0  # [1797, 64], pixels in [0, 1]
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, test = order[:1500], order[1500:]
    return x[train], y[train], x[test], y[test]


def train_model(x, y, epochs: int = 40, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                          nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(x)).split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    return model


def ascii_digit(pixels: torch.Tensor) -> list:
    """Eight lines of text for one 8x8 digit."""
    levels = (pixels.reshape(8, 8) * (len(SHADES) - 1)).round().long().clamp(0, len(SHADES) - 1)
    return ["".join(SHADES[v] * 2 for v in row) for row in levels.tolist()]


def show_row(title: str, images: list, captions: list) -> None:
    print(title)
    art = [ascii_digit(img) for img in images]
    for line in range(8):
        print("   ".join(a[line] for a in art))
    print("   ".join(f"{c:<16}" for c in captions))
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="./logix_logs", help="where logs are written")
    parser.add_argument("--queries", type=int, default=3, help="test digits to explain")
    parser.add_argument("--rank", type=int, default=16, help="LoGra rank per layer side")
    args = parser.parse_args()

    x_train, y_train, x_test, y_test = load_data()
    model = train_model(x_train, y_train)
    accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    print(f"Trained an MLP on {len(x_train)} digits: test accuracy {accuracy:.1%}\n")

    # 1. Log: one pass over the training set, per-example gradients of the summed loss.
    shutil.rmtree(os.path.join(args.root, "digits-demo"), ignore_errors=True)  # a fresh demo
    run = logix.init("digits-demo", root_dir=args.root, rank=args.rank)
    run.watch(model)
    run.add_lora()
    run.setup({"grad": ["log"], "forward": ["covariance"], "backward": ["covariance"]})
    run.save(True)
    for batch in torch.arange(len(x_train)).split(100):
        with run(data_id=batch.tolist()):
            model.zero_grad()
            F.cross_entropy(model(x_train[batch]), y_train[batch], reduction="sum").backward()
    run.finalize()  # flushes shards, saves statistics, fits EK-FAC eigenvalues from the logs
    run.summary()

    # 2. Query: the same hooks give the test example's projected gradient.
    run.eval()
    queries = list(range(args.queries))
    with run(data_id=[f"test-{i}" for i in queries]):
        model.zero_grad()
        F.cross_entropy(model(x_test[queries]), y_test[queries], reduction="sum").backward()
    result = run.compute_influence_all(run.get_log(), hessian="ekfac", topk=5)

    # 3. Show: a positive score means training on that digit lowered this test digit's loss.
    predictions = model(x_test[queries]).argmax(1)
    for q in queries:
        print(f"=== test digit {q}: label {y_test[q].item()}, "
              f"model says {predictions[q].item()} ===")
        show_row("query", [x_test[q]], [f"label {y_test[q].item()}"])
        for kind, ids, scores in (("most helpful", result["top_ids"], result["top_scores"]),
                                  ("most harmful", result["bottom_ids"],
                                   result["bottom_scores"])):
            show_row(f"{kind} training digits (EK-FAC influence)",
                     [x_train[i] for i in ids[q]],
                     [f"#{i} y={y_train[i].item()} {s:+.2g}" for i, s in
                      zip(ids[q], scores[q].tolist())])
    print(f"Logs, statistics and manifest: {run.project_dir} "
          f"(try: logix show {run.project_dir})")


if __name__ == "__main__":
    main()

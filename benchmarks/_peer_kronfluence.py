"""Kronfluence (PyPI kronfluence 1.0.1, the EK-FAC reference implementation) on one quality.py
case. quality.py runs it under the Kronfluence venv's python (`--kronfluence-venv`):

    KRONFLUENCE_VENV/bin/python benchmarks/_peer_kronfluence.py IN.pt OUT.pt

IN.pt: {"case", "state" (trained state_dict), "x", "y", "qx", "qy", "root"}.
OUT.pt: {"version", "configs": {"kronfluence STRATEGY dot full[ DAMPING]": {"scores" [n_query,
n_train] (training examples in index order), "bytes", "seconds"} or {"error": text}}}.

Kronfluence's own API with its defaults: a `Task` whose training loss is summed over the batch
(and over tokens for the LM), with labels sampled from the model's predictions when Kronfluence
asks for a sample (its default: the true Fisher, `use_empirical_fisher=False`); the measurement
is the query's summed loss, so a positive score means helpful, as in this library.
`Analyzer.fit_all_factors` with `FactorArguments(strategy=...)` for "ekfac" and "kfac", then
`compute_pairwise_scores` at its default damping (`damping_factor=1e-8`) and at its heuristic
(`damping_factor=None`: 0.1 x the mean eigenvalue, named "d0.1"). Kronfluence tracks every
nn.Linear and nn.Conv2d (not nn.Embedding) and stores no per-example rows: it recomputes the
training gradients when it scores. "bytes" is the float32 size of those gradients, the rows
an equivalent log would hold.
"""

import os
import sys
import time
import traceback

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

import kronfluence
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.task import Task

from _quality_cases import CASES, N_TRAIN

BATCH = 40
DAMPINGS = (("", 1e-8), (" d0.1", None))  # (name suffix, damping_factor)


class CaseTask(Task):
    """Classification cases: batches are (x, y); the LM case: (tokens,), next-token loss."""

    def __init__(self, lm: bool) -> None:
        super().__init__()
        self.lm = lm

    def logits_and_targets(self, batch, model):
        if self.lm:
            (tokens,) = batch
            return model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()
        x, y = batch
        return model(x), y

    def compute_train_loss(self, batch, model, sample=False):
        logits, targets = self.logits_and_targets(batch, model)
        if sample:
            with torch.no_grad():
                targets = torch.multinomial(logits.detach().softmax(-1), 1)[:, 0]
        return F.cross_entropy(logits, targets, reduction="sum")

    def compute_measurement(self, batch, model):
        logits, targets = self.logits_and_targets(batch, model)
        return F.cross_entropy(logits, targets, reduction="sum")


def gradient_bytes(model) -> int:
    return 4 * sum(p.numel() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))
                   for p in m.parameters(recurse=False))


def main(inp, outp):
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the sampled labels of the Fisher
    job = torch.load(inp)
    case = CASES[job["case"]](data=(job["x"], job["y"], job["qx"], job["qy"]))
    lm = job["y"] is None
    train = TensorDataset(job["x"]) if lm else TensorDataset(job["x"], job["y"])
    query = TensorDataset(job["qx"]) if lm else TensorDataset(job["qx"], job["qy"])
    model = case.model()
    model.load_state_dict(job["state"])
    size = gradient_bytes(model)
    task = CaseTask(lm)
    model = prepare_model(model, task)
    analyzer = Analyzer(analysis_name=job["case"], model=model, task=task, cpu=True,
                        disable_tqdm=True, output_dir=os.path.join(job["root"], "kronfluence"))
    configs = {}
    for strategy in ("ekfac", "kfac"):
        try:
            t0 = time.time()
            analyzer.fit_all_factors(strategy, dataset=train, per_device_batch_size=BATCH,
                                     factor_args=FactorArguments(strategy=strategy),
                                     overwrite_output_dir=True)
            fitted = time.time() - t0
        except Exception:
            for suffix, _ in DAMPINGS:
                configs[f"kronfluence {strategy} dot full{suffix}"] = {"error": error_text()}
            continue
        for suffix, damping in DAMPINGS:
            name = f"kronfluence {strategy} dot full{suffix}"
            t0 = time.time()
            try:
                analyzer.compute_pairwise_scores(
                    name.replace(" ", "_"), strategy, query_dataset=query, train_dataset=train,
                    per_device_query_batch_size=BATCH, per_device_train_batch_size=BATCH,
                    score_args=ScoreArguments(damping_factor=damping), overwrite_output_dir=True)
                scores = analyzer.load_pairwise_scores(name.replace(" ", "_"))["all_modules"]
                assert scores.shape[1] == N_TRAIN, scores.shape
                configs[name] = {"scores": scores.double(), "bytes": size,
                                 "seconds": fitted + time.time() - t0}
            except Exception:
                configs[name] = {"error": error_text()}
    torch.save({"version": kronfluence.__version__, "configs": configs}, outp)


def error_text():
    return traceback.format_exc(limit=-2).strip()


if __name__ == "__main__":
    main(*sys.argv[1:])

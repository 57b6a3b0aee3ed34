"""dattri (PyPI dattri 0.3.0) on one quality.py case. quality.py runs it under the dattri venv's
python (`--dattri-venv`):

    DATTRI_VENV/bin/python benchmarks/_peer_dattri.py IN.pt OUT.pt

IN.pt: {"case", "state" (trained state_dict), "x", "y", "qx", "qy", "root"}.
OUT.pt: {"version", "configs": {"dattri METHOD dot LABEL[ dR]": {"scores" [n_query, n_train]
(training examples in index order), "bytes", "seconds"} or {"error": text}}}.

dattri's own API on the one trained model: an `AttributionTask` whose loss is the batch's mean
cross-entropy written with `torch.func.functional_call` (next-token loss summed over tokens for
the LM case), then per method an attributor, `cache` on the whole training set in one batch
(its docs' advice for the influence functions) and `attribute(train, test)`:

* `IFAttributorExplicit` ("explicit"): the exact Hessian of the mean training loss over every
  parameter, inverted with `regularization` x I added (not run above 2,000 parameters, i.e.
  on attn and lm: it ran out of memory on attn);
* `IFAttributorCG` ("cg"): the same system solved by conjugate gradients (its defaults:
  max_iter 10, tol 1e-7);
* `IFAttributorEKFAC` ("ekfac"): EK-FAC on every nn.Linear (its default modules; the CNN's
  convolutions are not covered), empirical Fisher, `damping` added to the eigenvalues; 0.3.0
  fails on a Linear whose input has a sequence dimension (the attn and lm cases: an error row);
* `TRAKAttributor` ("trak", classification cases): the task's loss is TRAK's margin
  log p / (1 - p), `correct_probability_func` gives p, its CPU random projection (proj_dim 512,
  its default), `regularization` on XᵀX.

Each at its default regularisation / damping 0 (rows without a suffix) and swept over 1e-3 ... 100
(rows " dR"; dattri's values are absolute, on the mean loss's curvature, unlike this
library's relative damping). Scores come back [n_train, n_query] and are transposed; positive
means helpful, as in this library. "bytes": the float32 gradient (or projected gradient) per
example these methods recompute.
"""

import resource
import sys
import time
import traceback
from importlib.metadata import version

import torch
from torch.func import functional_call
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from dattri.algorithm import (IFAttributorCG, IFAttributorEKFAC, IFAttributorExplicit,
                              TRAKAttributor)
from dattri.task import AttributionTask

from _quality_cases import CASES

REGULARIZATIONS = (0.0, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # 0: dattri's default
TRAK_PROJ_DIM = 512  # TRAKAttributor's default
# IFAttributorExplicit forms the Hessian with torch.func over the whole training batch at once;
# on attn (2,644 parameters) that worker was killed for memory on a 24 GiB machine
EXPLICIT_MAX_PARAMS = 2000
# address space the worker may use: an attributor that needs more fails with an error row
# (dattri's CG held 20 GB after 10 min on attn) instead of taking the machine's memory
MEMORY_LIMIT = 6 << 30


def mean_loss(model, lm):
    """The mean loss of a batch, in dattri's (params, data) form."""
    def loss(params, data):
        if lm:
            (tokens,) = data
            logits = functional_call(model, params, (tokens[..., :-1],))
            return F.cross_entropy(logits.transpose(-1, -2), tokens[..., 1:],
                                   reduction="none").sum(-1).mean()
        x, y = data
        return F.cross_entropy(functional_call(model, params, (x,)), y)
    return loss


def margin(model):
    """TRAK's margin log p / (1 - p) of one example's true class (no batch dimension)."""
    def f(params, data):
        x, y = data
        log_p = -F.cross_entropy(functional_call(model, params, (x[None],)), y[None])
        return log_p - torch.log1p(-torch.exp(log_p))
    return f


def probability(model):
    def p(params, data):
        x, y = data
        return torch.exp(-F.cross_entropy(functional_call(model, params, (x[None],)), y[None]))
    return p


def attributor(case, state, lm, method, r):
    """A new attributor on a fresh copy of the trained model: EK-FAC's hooks stay on its model
    when its statistics fail, and would break every later attributor on a shared one."""
    model = case.model()
    model.load_state_dict(state)
    if method == "trak":
        return TRAKAttributor(
            task=AttributionTask(loss_func=margin(model), model=model, checkpoints=state),
            correct_probability_func=probability(model), device="cpu", regularization=r,
            projector_kwargs={"proj_dim": TRAK_PROJ_DIM, "proj_max_batch_size": 32,
                              "proj_seed": 0, "device": "cpu"})
    task = AttributionTask(loss_func=mean_loss(model, lm), model=model, checkpoints=state)
    if method == "ekfac":
        return IFAttributorEKFAC(task=task, device="cpu", damping=r)
    solver = {"explicit": IFAttributorExplicit, "cg": IFAttributorCG}[method]
    return solver(task=task, device="cpu", regularization=r)


def grid(model, lm):
    """{config name: (method, regularisation, bytes per example)}."""
    n_params = sum(p.numel() for p in model.parameters())
    linear = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)
                 for p in m.parameters(recurse=False))
    sizes = {"explicit": 4 * n_params, "cg": 4 * n_params, "ekfac": 4 * linear,
             "trak": 4 * TRAK_PROJ_DIM}
    out = {}
    for r in REGULARIZATIONS:
        suffix = "" if r == 0 else f" d{r:g}"
        for method, size in sizes.items():
            if method == "trak" and lm:
                continue
            label = f"p{TRAK_PROJ_DIM}" if method == "trak" else "full"
            out[f"dattri {method} dot {label}{suffix}"] = (method, r, size)
    return out


def main(inp, outp):
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    torch.set_num_threads(1)
    job = torch.load(inp)
    case = CASES[job["case"]](data=(job["x"], job["y"], job["qx"], job["qy"]))
    lm = job["y"] is None
    train = TensorDataset(job["x"]) if lm else TensorDataset(job["x"], job["y"])
    query = TensorDataset(job["qx"]) if lm else TensorDataset(job["qx"], job["qy"])
    full = DataLoader(train, batch_size=len(train))
    configs = {}
    n_params = sum(p.numel() for p in case.model().parameters())
    for name, (method, r, size) in grid(case.model(), lm).items():
        t0 = time.time()
        if method == "explicit" and n_params > EXPLICIT_MAX_PARAMS:
            configs[name] = {"error": f"not run: the explicit Hessian of {n_params} parameters "
                                      f"(over {EXPLICIT_MAX_PARAMS}) runs out of memory here; "
                                      "cg solves the same system"}
            continue
        try:
            scorer = attributor(case, job["state"], lm, method, r)
            scorer.cache(full)
            if method == "trak":
                scores = scorer.attribute(DataLoader(query, batch_size=len(query)))
            else:
                scores = scorer.attribute(full, DataLoader(query, batch_size=len(query)))
            scores = scores.detach().double().T
            if scores.shape != (len(query), len(train)) or not torch.isfinite(scores).all():
                raise FloatingPointError(f"scores of shape {tuple(scores.shape)}, finite: "
                                         f"{bool(torch.isfinite(scores).all())}")
            configs[name] = {"scores": scores, "bytes": size, "seconds": time.time() - t0}
        except Exception:
            configs[name] = {"error": traceback.format_exc(limit=-2).strip()}
    torch.save({"version": version("dattri"), "configs": configs}, outp)


if __name__ == "__main__":
    main(*sys.argv[1:])

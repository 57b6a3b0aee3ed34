"""TRAK (PyPI traker 0.3.2, the MadryLab implementation) on one quality.py case. quality.py runs
it under the TRAK venv's python (`--trak-venv`):

    TRAK_VENV/bin/python benchmarks/_peer_trak.py IN.pt OUT.pt

IN.pt: {"case", "state" (trained state_dict), "x", "y", "qx", "qy", "root"}.
OUT.pt: {"version", "configs": {"trak xtx dot pK[ dR]": {"scores" [n_query, n_train] (training
examples in index order), "bytes", "seconds"} or {"error": text}}}.

TRAK's own API on the one trained model (no ensemble over checkpoints): a `TRAKer` on
device="cpu", which picks its CPU projector (`BasicProjector`, normal entries; its
`CudaProjector` needs a GPU), with task "image_classification" (the margin log p / (1 - p) of
the true class; it only needs (input, label) batches, so it serves every classification case;
the LM case has no labels and gets an error row). `load_checkpoint`, `featurize` the training
set, `finalize_features`, then `start_scoring_checkpoint` / `score` the queries and
`finalize_scores`. Its scores are [n_train, n_query], positive meaning helpful, as in this
library. Its defaults: proj_dim 2048, float16 storage, lambda_reg 0 (row "trak xtx dot
p2048"). Swept, with float32 storage (rows "-fp32"): proj_dim 128, 512 and 2048, each with
lambda_reg 0 and R x the mean eigenvalue of the training features' XᵀX (R = 1e-3 ... 1000, rows
" dR"; the mean eigenvalue is read from the features TRAK stored, before it inverts). "bytes":
the stored features per example.
"""

import sys
import tempfile
import time
import traceback
from importlib.metadata import version

import torch
from torch.utils.data import DataLoader, TensorDataset

from trak import TRAKer

from _quality_cases import CASES

BATCH = 40
PROJ_DIMS = (128, 512, 2048)
DEFAULT_PROJ_DIM = 2048  # TRAKer's default
RELATIVE_LAMBDAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)


def trak_scores(model, state, job, root, proj_dim, lambda_reg, half, scale):
    """TRAK scores [n_query, n_train]; scale[proj_dim] is set to the mean eigenvalue of XᵀX
    over the features TRAK stored (before it inverts, which may fail)."""
    traker = TRAKer(model=model, task="image_classification", train_set_size=len(job["x"]),
                    save_dir=tempfile.mkdtemp(dir=root), device="cpu", proj_dim=proj_dim,
                    lambda_reg=lambda_reg, use_half_precision=half, logging_level=40)
    traker.load_checkpoint(state, model_id=0)
    for x, y in DataLoader(TensorDataset(job["x"], job["y"]), batch_size=BATCH):
        traker.featurize(batch=(x, y), num_samples=len(x))
    features = torch.as_tensor(traker.saver.current_store["grads"]).float()
    scale.setdefault(proj_dim, float((features ** 2).sum() / proj_dim))
    traker.finalize_features()
    traker.start_scoring_checkpoint("queries", state, model_id=0, num_targets=len(job["qx"]))
    for x, y in DataLoader(TensorDataset(job["qx"], job["qy"]), batch_size=BATCH):
        traker.score(batch=(x, y), num_samples=len(x))
    scores = torch.as_tensor(traker.finalize_scores("queries")).double().T
    return scores


def main(inp, outp):
    torch.set_num_threads(1)
    job = torch.load(inp)
    case = CASES[job["case"]](data=(job["x"], job["y"], job["qx"], job["qy"]))
    configs = {}
    # (proj_dim, relative lambda, float16 storage): TRAKer's defaults, then the float32 sweep
    grid = [(DEFAULT_PROJ_DIM, 0.0, True)]
    grid += [(p, r, False) for p in PROJ_DIMS for r in (0.0, *RELATIVE_LAMBDAS)]
    names = {(p, r, half): f"trak xtx dot p{p}" + ("" if half else "-fp32")
             + ("" if r == 0 else f" d{r:g}") for p, r, half in grid}
    if job["y"] is None:
        for name in names.values():
            configs[name] = {"error": "TRAK's classification margin needs labels; this case "
                                      "has none (a language model)"}
        torch.save({"version": version("traker"), "configs": configs}, outp)
        return
    scale = {}  # proj_dim: mean eigenvalue of XᵀX, from its lambda 0 run
    with tempfile.TemporaryDirectory(dir=job["root"]) as root:
        for proj_dim, relative, half in grid:
            name = names[proj_dim, relative, half]
            try:
                if relative > 0 and proj_dim not in scale:
                    raise RuntimeError("no lambda 0 features to scale lambda by")
                model = case.model()
                model.load_state_dict(job["state"])
                t0 = time.time()
                scores = trak_scores(model, job["state"], job, root, proj_dim,
                                     relative * scale.get(proj_dim, 0.0), half, scale)
                if not torch.isfinite(scores).all():
                    raise FloatingPointError("TRAK returned non-finite scores")
                configs[name] = {"scores": scores, "bytes": (2 if half else 4) * proj_dim,
                                 "seconds": time.time() - t0}
            except Exception:
                configs[name] = {"error": traceback.format_exc(limit=-2).strip()}
    torch.save({"version": version("traker"), "configs": configs}, outp)


if __name__ == "__main__":
    main(*sys.argv[1:])

"""The original LogIX (PyPI logix-ai 0.1.1) on one quality.py case. quality.py runs it under the
peer venv's python (`--peer-venv`), where `import logix` is that package, not this repository's:

    PEER_VENV/bin/python benchmarks/_peer_logix.py IN.pt OUT.pt

IN.pt: {"case", "state" (trained state_dict), "x", "y", "qx", "qy", "projections", "root"}.
OUT.pt: {"version", "configs": {"logix0.1.1 HESSIAN MODE LABEL": {"scores" [n_query, n_train]
(training examples in index order), "bytes" (float32 row bytes per example), "seconds"} or
{"error": text}}}.

Per projection (unprojected, random LoGra, PCA LoGra; its own LoRA, rank min(rank, in, out) per
layer) one run logs the training set with the gradient covariance and scores with hessian none
(precondition=False) and raw; K-FAC and EK-FAC each get a run on a copy of the same model
(forward/backward covariances; for EK-FAC then a pass with the `corrected_eigval` statistic),
scored with hessian="kfac" against the first run's logs. Separate runs keep a failure in one
statistic (0.1.1's Conv2d forward covariance fails after Tanh) from taking the others along. Damping is 0.1.1's default (None: 0.1 x the mean
eigenvalue, raw: 0.1 x the mean diagonal).
"""

import copy
import os
import sys
import time
import traceback

import torch

import logix  # LogIX 0.1.1 under the peer venv
from logix.config import LoRAConfig

from _quality_cases import CASES, N_QUERY, N_TRAIN

HESSIANS = ("none", "raw", "kfac", "ekfac")
MODES = ("dot", "cosine")
BATCH = 40


def new_run(root, project):
    config = os.path.join(root, f"{project}.yaml")
    with open(config, "w") as f:
        f.write(f"root_dir: {root}\nlogging:\n  num_workers: 1\n")
    return logix.LogIX(project, config=config)


def log_train(run, case, model):
    for start in range(0, N_TRAIN, BATCH):
        part = list(range(start, min(start + BATCH, N_TRAIN)))
        with run(data_id=part):
            case.loss(model, case.x[part], None if case.y is None else case.y[part]).backward()
        model.zero_grad()


def prepare(case, job, init, rank, label):
    """Logs the training set with its gradient covariance (none, raw); returns the run, the
    query log and the (LoRA-patched) model before any hooks ran, for the K-FAC runs."""
    model = case.model()
    model.load_state_dict(job["state"])
    run = new_run(job["root"], label)
    run.watch(model)
    if init == "pca":
        run.setup({"forward": ["covariance"], "backward": ["covariance"]})
        log_train(run, case, model)
        run.finalize()
    if init != "none":
        torch.manual_seed(0)
        run.add_lora(lora_config=LoRAConfig(init=init, rank=rank))
    pristine = copy.deepcopy(model)
    run.setup({"grad": ["log", "covariance"]})
    run.save(True)
    log_train(run, case, model)
    run.finalize()
    run.setup({"grad": ["log"]})
    run.eval()
    with run(data_id=[f"q{i}" for i in range(N_QUERY)]):
        case.loss(model, case.qx, case.qy).backward()
    model.zero_grad()
    return run, run.get_log(copy=True), pristine


def kfac_run(case, job, model, label, hessian):
    """A run with forward/backward covariances (and for ekfac a second pass with the
    corrected_eigval statistic). Its own run: 0.1.1 computes EK-FAC eigenvalues only where no
    K-FAC eigenvectors exist yet, and a covariance pass after the query would change them."""
    model = copy.deepcopy(model)
    run = new_run(job["root"], f"{label}-{hessian}")
    run.watch(model)
    run.setup({"forward": ["covariance"], "backward": ["covariance"]})
    log_train(run, case, model)
    run.finalize()
    if hessian == "ekfac":
        run.setup({"grad": ["log", "corrected_eigval"]})
        log_train(run, case, model)
        run.finalize()
    return run


def score(run, loader, test, hessian, mode):
    if hessian == "ekfac":
        # 0.1.1 adds the damping to its stored EK-FAC eigenvalues in place on every
        # preconditioning call; restore them so that each configuration starts from the same
        # state (within one cosine call the damping still accumulates, as in 0.1.1).
        saved = {k: v.clone() for k, v in run.state.ekfac_eigval_state.items()}
        try:
            result = run.compute_influence_all(test, loader, mode=mode, hessian="kfac")
        finally:
            for k, v in saved.items():
                run.state.ekfac_eigval_state[k] = v
    elif hessian == "none":
        result = run.compute_influence_all(test, loader, mode=mode, precondition=False)
    else:
        result = run.compute_influence_all(test, loader, mode=mode, hessian=hessian)
    position = {int(i): j for j, i in enumerate(result["tgt_ids"])}
    order = torch.tensor([position[i] for i in range(N_TRAIN)])
    return result["influence"][:, order].double()


def error_text():
    return traceback.format_exc(limit=-2).strip()


def main(inp, outp):
    torch.set_num_threads(1)
    job = torch.load(inp)
    case = CASES[job["case"]](data=(job["x"], job["y"], job["qx"], job["qy"]))
    configs = {}
    for init, rank in job["projections"]:
        label = "full" if init == "none" else f"{init}{rank}"
        names = {(h, m): f"logix0.1.1 {h} {m} {label}" for h in HESSIANS for m in MODES}
        try:
            run, test, model = prepare(case, job, init, rank, label)
        except Exception:
            failed = {"error": "logging: " + error_text()}
            configs.update({name: failed for name in names.values()})
            continue
        loader = run.build_log_dataloader()
        size = sum(v["grad"][0].numel() for v in test[1].values()) * 4
        for hessian in HESSIANS:
            scorer = run
            if hessian in ("kfac", "ekfac"):
                try:
                    scorer = kfac_run(case, job, model, label, hessian)
                except Exception:
                    for mode in MODES:
                        configs[names[hessian, mode]] = {"error": "logging: " + error_text()}
                    continue
            for mode in MODES:
                t0 = time.time()
                try:
                    configs[names[hessian, mode]] = {
                        "scores": score(scorer, loader, test, hessian, mode), "bytes": size,
                        "seconds": time.time() - t0}
                except Exception:
                    configs[names[hessian, mode]] = {"error": error_text()}
    torch.save({"version": logix.__version__, "configs": configs}, outp)


if __name__ == "__main__":
    main(*sys.argv[1:])

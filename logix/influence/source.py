"""SOURCE: attribution across checkpoints and training stages (approximate unrolled
differentiation, Bae et al.), on the projected gradients of several logged checkpoints.

Training is split into segments l = 1..L. Each segment is summarised by its checkpoints: the
average curvature H_l (per module, EK-FAC / K-FAC / raw, eigendecomposed once), the average
per-example gradient g_l,i, an effective step eta_l = lr / (1 - momentum) and K_l steps. With
a = eta_l K_l, and f applied to H's eigenvalues:

    F_r(s) = (1 - exp(-a s)) / s   (a at s = 0)       S_l = exp(-a H_l)
    score_i = sum_l 1/N_l * (S_{l+1} ... S_L q)^T F_r(H_l) g_l,i

with q the query gradient at the final weights and N_l the number of examples segment l trained
on; an example a segment did not train on contributes nothing to that segment. As for influence
functions, a positive score means training on example i lowered the query's loss. With
hessian="optimizer", H_l is the factored sqrt(v) of the optimizer states added in segment l's
checkpoint blocks (run.add_optimizer_state), averaged per side like K-FAC's factors. H_l is
damped like an influence query's curvature, per module (`logix.influence.damping`; damping=0
gives the undamped form above), and meta["damping"] holds each segment's values.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Optional

import torch
from torch import Tensor

from logix.errors import UsageError
from logix.influence import curvature
from logix.influence import damping as damping_rules
from logix.influence.preconditioner import ModuleInverse
from logix.log import StepRows
from logix.statistics.covariance import CovarianceState
from logix.storage import state
from logix.storage.reader import LogReader



def source_influence(base: LogReader, src: StepRows, hessian: str = "ekfac",
                     block_rows: int = 8192, damping: damping_rules.Setting = None,
                     relative_damping: Optional[float] = None) -> dict:
    """SOURCE scores of the queries `src` against the checkpoints logged in `base`'s project:
    {"src_ids", "tgt_ids", "influence" [n_query, n_train], "segments", "meta"}; see module doc.
    damping, relative_damping: as influence.damping / relative_damping (default: auto)."""
    if hessian == curvature.AUTO:
        hessian = "ekfac"
    if not curvature.get(hessian).checkpoint_statistics():
        allowed = [k for k in curvature.names() if curvature.get(k).checkpoint_statistics()]
        raise UsageError(f"method='source' takes hessian in {allowed}, got {hessian!r}: SOURCE "
                         "averages each segment's curvature from statistics collected at its "
                         "checkpoints, and this kind has none.")
    manifest = base.manifest
    if not manifest.checkpoints:
        raise UsageError("method='source' needs checkpoints: log each one inside `with "
                         "run.checkpoint(name, segment=..., lr=..., steps=...)` (the Hugging "
                         "Face and Lightning callbacks log none; docs/source.md).")
    if list(src.modules) != list(manifest.modules) or \
            src.projection.get("checksum") not in (None, manifest.projection.get("checksum")):
        raise UsageError("The query's modules, ranks or projections differ from the saved log's; "
                         "in a new process call run.watch(model) then run.initialize_from_log().")
    segments: Dict[int, List[str]] = defaultdict(list)
    for name, info in manifest.checkpoints.items():
        segments[info["segment"]].append(name)
    readers = {name: LogReader(base.project_dir, manifest, block_rows, checkpoint=name,
                                 verify=base.verify)
               for name in manifest.checkpoints}
    stats, infos = {}, {}
    for name in manifest.checkpoints:
        tensors, infos[name] = state.load_checkpoint_statistics(base.project_dir, name)
        stats[name] = CovarianceState()
        stats[name].load_state_dict(tensors)

    columns: Dict = {}
    for name in manifest.checkpoints:
        for i in readers[name].data_ids():
            columns.setdefault(i, len(columns))
    tgt_ids = list(columns)
    scores = torch.zeros(len(src), len(tgt_ids), dtype=torch.float64)
    query = src.grads.double().cpu()  # carried back through the segments
    summary = []
    for segment in sorted(segments, reverse=True):
        names = segments[segment]
        spectra = _segment_spectra(manifest.modules, [stats[n] for n in names], hessian,
                                   [readers[n] for n in names])
        spectra = {m: _damped(spec, damping, relative_damping) for m, spec in spectra.items()}
        a = _segment_step(names, manifest.checkpoints)
        weighted = _apply(manifest.modules, spectra, query, lambda s: _f_r(s, a)).float()
        trained = _trained_ids(names, infos, readers)
        scale = 1.0 / (len(names) * len(trained))
        for name in names:
            for ids, rows in readers[name].fixed_blocks(block_rows):
                keep = [k for k, i in enumerate(ids) if i in trained]
                if not keep:
                    continue
                index = torch.tensor([columns[ids[k]] for k in keep])
                contribution = (weighted @ rows[keep].T).double() * scale
                scores.index_add_(1, index, contribution)
        query = _apply(manifest.modules, spectra, query, lambda s: torch.exp(-a * s))
        summary.append({"segment": segment, "checkpoints": names, "eta_k": a,
                        "examples": len(trained),
                        "damping": {m: spec.damping for m, spec in spectra.items()}})
    meta = {"method": "source", "hessian": hessian, "mode": "dot",
            "damping": {str(s["segment"]): s["damping"] for s in summary[::-1]},
            "damping_rule": damping_rules.describe(damping, relative_damping),
            "projection": dict(src.projection)}
    return {"src_ids": list(src.data_ids), "tgt_ids": tgt_ids, "influence": scores.float(),
            "segments": summary[::-1], "meta": meta}


def _damped(spectrum: ModuleInverse, damping, relative_damping) -> ModuleInverse:
    """H + lambda I for one module's undamped spectrum (its eigenvalues shifted by lambda)."""
    value = damping_rules.resolve(spectrum.values, damping, relative_damping)
    return ModuleInverse(spectrum.kind, value, values=spectrum.values + value,
                         vectors=spectrum.vectors, q_out=spectrum.q_out, q_in=spectrum.q_in)


def _f_r(values: Tensor, a: float) -> Tensor:
    """(1 - exp(-a s)) / s, with its limit a where a s is tiny."""
    small = values * a < 1e-12
    safe = torch.where(small, torch.ones_like(values), values)
    return torch.where(small, torch.full_like(values, a), -torch.expm1(-a * safe) / safe)


def _segment_step(names: List[str], checkpoints: Dict[str, dict]) -> float:
    """eta K of a segment, averaged over its checkpoints' summaries."""
    values = [checkpoints[n]["lr"] / (1 - checkpoints[n]["momentum"]) * checkpoints[n]["steps"]
              for n in names]
    return sum(values) / len(values)


def _trained_ids(names: List[str], infos: Dict[str, dict], readers: Dict[str, LogReader]) -> set:
    given = [infos[n]["train_ids"] for n in names if infos[n]["train_ids"] is not None]
    if given:
        return {i for ids in given for i in ids}
    return {i for n in names for i in readers[n].data_ids()}


def _segment_spectra(modules, stats: List[CovarianceState], hessian: str,
                     readers: List[LogReader]) -> Dict[str, ModuleInverse]:
    """Per module, the eigendecomposition of the segment's average curvature (undamped)."""
    kind = curvature.get(hessian)
    average = CovarianceState()
    for name, cov in ((m.name, c) for m in modules for c in kind.checkpoint_statistics()):
        covs = [s.get(name, cov) for s in stats]
        if any(c is None for c in covs):
            if any(reader.rows == 0 for reader in readers):
                raise UsageError(f"A checkpoint block of this log logged no rows (checkpoints "
                                 f"{[r.checkpoint for r in readers if r.rows == 0]}), so it has "
                                 "no curvature: log its segment's examples inside the block.")
            raise UsageError(f"SOURCE with hessian={hessian!r} needs {cov} statistics at every "
                             f"checkpoint: {kind.how_to_collect()} inside each checkpoint "
                             "block.")
        average.accumulate(name, cov, sum(c.double() for c in covs) / len(covs), 1)
    spectra = curvature.Spectra(average)
    if kind.needs_rows:
        blocks = (block for reader in readers for block in reader.fixed_blocks(reader.block_rows))
        kind.fit(average, spectra, blocks, modules)
    return {m.name: kind.spectrum(m.name, spectra) for m in modules}


def _apply(modules, spectra: Dict[str, ModuleInverse], rows: Tensor, fn) -> Tensor:
    parts = []
    for m in modules:
        grads = rows[:, m.columns].reshape(-1, m.rank_out, m.rank_in)
        parts.append(spectra[m.name].transform(grads, fn).reshape(rows.shape[0], m.dim))
    return torch.cat(parts, 1)

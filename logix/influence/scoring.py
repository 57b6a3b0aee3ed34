"""Scoring math: preconditioned queries stacked per influence group, one GEMM per fixed-shape
chunk of training rows, and the score modes (dot, cosine, l2)."""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
from torch import Tensor

from logix.errors import UsageError
from logix.influence.preconditioner import Preconditioner
from logix.influence.topk import TopK
from logix.log import StepRows

MODES = ("dot", "cosine", "l2")
TOTAL = "total"
SCORE_CHUNK = 1024  # training rows per matrix multiply; fixed so that scores are reproducible
BLOCK_BYTES = 256 << 20  # float32 bytes of training rows per streamed block, at most


class Scorer:
    """Preconditioned queries stacked per group: one GEMM scores every group of every query
    (`Attributor.scorer`; `logix.index` builds on it)."""

    def __init__(self, src: StepRows, mode: str, preconditioner: Preconditioner,
                 groups: Dict[str, Tensor]) -> None:
        self.mode = mode
        self.preconditioner = preconditioner
        self.groups = groups  # name -> bool column mask [dim]; TOTAL first
        self.n_query = len(src)
        self.projection = dict(src.projection)
        self.device = src.grads.device
        precond = preconditioner.apply(src.grads.double()).float()  # [n_query, dim]
        self._check_finite(precond, src.grads, "The preconditioned query gradients")
        self.queries = torch.cat([precond * mask.to(precond.device) for mask in groups.values()]
                                 ) if len(groups) > 1 else precond
        self.needs_norms = mode != "dot"
        if self.needs_norms:
            query_norms = (precond * src.grads.float()) @ self._mask_matrix().T  # [n_query, G]
            self.query_norms = query_norms.T.reshape(-1)  # group-major, as the query rows

    @property
    def meta(self) -> dict:
        """What these scores are: curvature, damping per module (and the rule that chose it),
        mode and projection used."""
        meta = {"method": "influence", "hessian": self.preconditioner.kind,
                "damping": self.preconditioner.dampings, "mode": self.mode,
                "projection": self.projection}
        if self.preconditioner.damping_rule:
            meta["damping_rule"] = self.preconditioner.damping_rule
        if self.preconditioner.concentration:
            meta["fisher_concentration"] = dict(self.preconditioner.concentration)
        diagnostics = getattr(self.preconditioner, "diagnostics", None)
        if diagnostics:
            meta["solver"] = diagnostics  # lissa: iterations, residual per step, scale
        return meta

    @property
    def group_names(self) -> List[str]:
        return list(self.groups)

    def _mask_matrix(self) -> Tensor:
        return torch.stack(list(self.groups.values())).float().to(self.device)  # [G, dim]

    def norms_of(self, rows: Tensor) -> Tensor:
        """[n, G] g^T (H + lambda I)^-1 g restricted to each group's columns."""
        masks = self._mask_matrix()

        def norms(chunk):
            return ((self.preconditioner.apply(chunk) * chunk) @ masks.T).T

        out = fixed_chunks(rows, norms).T
        self._check_finite(out, rows, "The training rows' g^T (H + lambda I)^-1 g")
        return out

    def score(self, rows: Tensor, train_norms: Optional[Tensor],
              out: Optional[Tensor] = None) -> Tensor:
        """Scores of `rows` [n, dim] against every (group, query): [n, G * n_query], written
        into `out` when given. Scores are laid out query-major (`out` is the transpose of a
        contiguous [G * n_query, n'] matrix, see `score_buffer`): the GEMM writes them in place
        with that leading dimension, and the full matrix, top-k and score files read contiguous
        rows per query without a transposing copy."""
        return self.finish(self.products(rows, out), rows, train_norms)

    def products(self, rows: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """The inner products of `score` ([n, G * n_query], before the mode): the GEMMs alone,
        whose bits depend on the thread count (`logix.index.search` runs them on the stream's)."""
        return products(rows, self.queries, out)

    def finish(self, out: Tensor, rows: Tensor, train_norms: Optional[Tensor]) -> Tensor:
        """`products` -> scores of the mode, in place (elementwise: the same bits on any thread
        count), checked finite."""
        if self.mode != "dot":
            train = train_norms.to(out.device).repeat_interleave(self.n_query, 1)  # [n, G*nq]
            query = self.query_norms.to(out.device)[None, :]
            if self.mode == "cosine":
                out.div_(query.clamp_min(1e-30).sqrt() * train.clamp_min(1e-30).sqrt())
            else:
                out.mul_(2).sub_(query).sub_(train)
        self._check_finite(out, rows, "Scores")
        return out

    def _check_finite(self, values: Tensor, rows: Tensor, what: str) -> None:
        """Raise a UsageError naming the module to blame when `values` hold NaN or inf:
        modules whose input `rows` [n, dim] are not finite, else the module whose preconditioned
        query is largest (float32 overflow)."""
        # A finite sum means no NaN or inf (one pass, no mask); an overflowing sum of finite
        # values falls through to the exact check.
        if bool(torch.isfinite(values.sum())) or bool(torch.isfinite(values).all()):
            return
        modules = self.preconditioner.modules
        bad = [m.name for m in modules if not torch.isfinite(rows[:, m.columns]).all()]
        if bad:
            raise UsageError(f"{what} are not finite: the gradients of module(s) {bad} hold NaN "
                             "or inf. Check the log with `logix verify` and the query step's "
                             "loss; rows of a damaged log must be logged again.")
        queries = getattr(self, "queries", values)
        worst = max(modules, key=lambda m: float(
            queries[:, m.columns].abs().nan_to_num(nan=math.inf, posinf=math.inf).max()))
        raise UsageError(f"{what} overflow float32 (NaN/inf); the largest preconditioned "
                         f"values are in module {worst.name!r}: (H + damping I)^-1 is nearly "
                         f"singular there. Pass a larger damping (now "
                         f"{self.preconditioner.dampings.get(worst.name, 0.0):g}).")

    def result(self, src: StepRows, tgt_ids: List, scores: Tensor) -> dict:
        out = {"src_ids": list(src.data_ids), "tgt_ids": tgt_ids,
               "influence": scores[:self.n_query], "meta": self.meta}
        if len(self.groups) > 1:
            out["groups"] = {name: scores[g * self.n_query:(g + 1) * self.n_query]
                             for g, name in enumerate(self.groups) if name != TOTAL}
        return out

    def topk_result(self, src: StepRows, tgt_ids: List, top: TopK) -> dict:
        best, best_idx, worst, worst_idx = top.result()
        nq = self.n_query

        def ids(index: Tensor) -> List[List]:
            return [[tgt_ids[i] for i in row] for row in index.tolist()]

        out = {"src_ids": list(src.data_ids), "top_ids": ids(best_idx[:nq]),
               "top_scores": best[:nq], "bottom_ids": ids(worst_idx[:nq]),
               "bottom_scores": worst[:nq], "meta": self.meta}
        if len(self.groups) > 1:
            out["groups"] = {
                name: {"top_ids": ids(best_idx[g * nq:(g + 1) * nq]),
                       "top_scores": best[g * nq:(g + 1) * nq],
                       "bottom_ids": ids(worst_idx[g * nq:(g + 1) * nq]),
                       "bottom_scores": worst[g * nq:(g + 1) * nq]}
                for g, name in enumerate(self.groups) if name != TOTAL}
        return out


def products(rows: Tensor, queries: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """rows [n, dim] x queries [width, dim] -> [n, width] in `score_buffer`'s layout, one GEMM
    of the same shape per SCORE_CHUNK rows (the last padded): each row's products have the same
    bits wherever it is scored (for one thread count)."""
    n, width = rows.shape[0], queries.shape[0]
    out = out if out is not None else score_buffer(n, width, rows.device)
    queries_t = queries.T  # [dim, width]
    for start in range(0, n, SCORE_CHUNK):
        chunk = rows[start:start + SCORE_CHUNK]
        k = chunk.shape[0]
        if k == SCORE_CHUNK:
            torch.mm(chunk, queries_t, out=out[start:start + k])
        else:  # pad: the same matrix shape and layout as every chunk, see fixed_chunks
            padded = torch.cat([chunk, chunk.new_zeros(SCORE_CHUNK - k, chunk.shape[1])])
            full = score_buffer(SCORE_CHUNK, width, rows.device)
            torch.mm(padded, queries_t, out=full)
            out[start:start + k] = full[:k]
    return out


def score_buffer(n: int, width: int, device) -> Tensor:
    """[n, width] scores stored query-major: the transpose of a contiguous [width, n]."""
    return torch.empty(width, n, device=device).T


def aligned(block_rows: int, dim: int) -> int:
    """`block_rows`, at most BLOCK_BYTES of float32 rows `dim` wide (wide language-model rows
    would otherwise make one block several GiB), in whole SCORE_CHUNKs: blocks start at
    multiples of SCORE_CHUNK, so every row sits at the same position of the same chunk shape
    whatever block size was asked for."""
    block_rows = min(block_rows, BLOCK_BYTES // (4 * max(dim, 1)))
    return max(SCORE_CHUNK, -(-block_rows // SCORE_CHUNK) * SCORE_CHUNK)


def fixed_chunks(rows: Tensor, fn) -> Tensor:
    """fn over zero-padded chunks of exactly SCORE_CHUNK rows, concatenated along columns.

    BLAS picks kernels (and so rounding) by matrix shape and a row's position in it; with one
    shape for every call and blocks aligned to chunks (`aligned`), a row's score is the same
    bits whatever the shard size or block size it was read with.
    """
    parts = []
    for start in range(0, rows.shape[0], SCORE_CHUNK):
        chunk = rows[start:start + SCORE_CHUNK]
        n = chunk.shape[0]
        if n < SCORE_CHUNK:
            chunk = torch.cat([chunk, chunk.new_zeros(SCORE_CHUNK - n, chunk.shape[1])])
        parts.append(fn(chunk)[:, :n])
    if not parts:
        return fn(rows.new_zeros(0, rows.shape[1]))
    return torch.cat(parts, 1) if len(parts) > 1 else parts[0]


def group_masks(modules, groups) -> Dict[str, Tensor]:
    dim = sum(m.dim for m in modules)
    masks = {TOTAL: torch.ones(dim, dtype=torch.bool)}
    if groups is None:
        return masks
    if groups == "module" or groups == "modules":
        groups = {m.name: [m.name] for m in modules}
    if isinstance(groups, (list, tuple)):
        groups = {f"group{i}": list(g) if not isinstance(g, str) else [g]
                  for i, g in enumerate(groups)}
    if not isinstance(groups, dict):
        raise UsageError("influence_groups must be 'module', a list of lists of module names, "
                         "or a dict name -> [module-name substrings] or a boolean column mask "
                         f"of the row (logix.text.head_groups); got {groups!r}.")
    for name, patterns in groups.items():
        if isinstance(patterns, Tensor):
            mask = _column_mask(name, patterns, dim)
        else:
            patterns = [patterns] if isinstance(patterns, str) else list(patterns)
            mask = torch.zeros(dim, dtype=torch.bool)
            for m in modules:
                if any(m.name == p or p in m.name for p in patterns):
                    mask[m.columns] = True
        if not mask.any():
            what = "an empty column mask" if isinstance(patterns, Tensor) else patterns
            raise UsageError(f"influence group {name!r} ({what}) matches no logged module; "
                             f"modules: {[m.name for m in modules]}.")
        if name == TOTAL:
            raise UsageError(f"influence group name {TOTAL!r} is reserved for the sum.")
        masks[name] = mask
    return masks


def _column_mask(name: str, mask: Tensor, dim: int) -> Tensor:
    if mask.dtype != torch.bool or tuple(mask.shape) != (dim,):
        raise UsageError(f"influence group {name!r} is a tensor of {mask.dtype} {tuple(mask.shape)}"
                         f"; a column mask must be bool [{dim}] (the row's width).")
    return mask.cpu()


"""Eigendecompositions of curvature statistics, and EK-FAC's corrected eigenvalues.

EK-FAC keeps K-FAC's eigenbasis (Q_out, Q_in: eigenvectors of the backward and forward
covariances) and replaces the Kronecker product of their eigenvalues by the second moment of the
per-example gradients in that basis: Lambda[o, i] = E_n[(Q_out^T G_n Q_in)[o, i]^2]. Since logs
hold the projected G_n of every example, one streaming pass over the logs fits them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Tuple

import torch
from torch import Tensor

from logix.storage.manifest import ModuleEntry

EKFAC = "ekfac"


@dataclass(frozen=True)
class Eigen:
    """cov = vectors @ diag(values) @ vectors.T, in float64."""

    values: Tensor
    vectors: Tensor


def eigh64(cov: Tensor) -> Eigen:
    """Symmetric eigendecomposition in float64; tiny negative round-off is clipped to zero."""
    cov = cov.double()
    values, vectors = torch.linalg.eigh((cov + cov.T) / 2)
    return Eigen(values.clamp_min(0.0), vectors)


def fit_ekfac(blocks: Iterable[Tuple[list, Tensor]], modules: List[ModuleEntry],
              bases: Dict[str, Tuple[Tensor, Tensor]]
              ) -> Tuple[Dict[str, Tensor], Dict[str, Tensor], int]:
    """Sums over logged rows of (Q_out^T G_n Q_in)^2 per module, the largest ||G_n||^2 per
    module (the rotation keeps norms, so over the sum's total it is one row's share of the
    Fisher), and the number of rows.

    bases: module name -> (Q_out [r_out, r_out], Q_in [r_in, r_in]).
    """
    sums = {m.name: torch.zeros(m.rank_out, m.rank_in, dtype=torch.float64) for m in modules}
    peaks = {m.name: torch.zeros((), dtype=torch.float64) for m in modules}
    count = 0
    for _, rows in blocks:
        rows = rows.to(torch.float32)
        count += rows.shape[0]
        for m in modules:
            q_out, q_in = (b.to(rows.device, torch.float32) for b in bases[m.name])
            grads = rows[:, m.columns].reshape(-1, m.rank_out, m.rank_in)
            rotated = q_out.T @ grads @ q_in  # [n, r_out, r_in]
            sums[m.name] += rotated.square().sum(0).double().cpu()
            if len(grads):
                peak = grads.square().sum((1, 2)).max().double().cpu()
                peaks[m.name] = torch.maximum(peaks[m.name], peak)
    return sums, peaks, count

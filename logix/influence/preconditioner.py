"""Block-diagonal preconditioners: per module, g -> (H_m + lambda_m I)^-1 g on projected grads.

Each module's H is kept as an eigendecomposition: [d] values and [d, d] vectors (``raw``) or
[r_out, r_in] values in a Kronecker eigenbasis (``kfac``, ``ekfac``); `logix.influence.curvature`
says how each kind builds it. Each module's damping comes from `logix.influence.damping` (auto,
relative or absolute). Stored statistics are never modified: every call builds new tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Dict, List, Optional

import torch
from torch import Tensor

from logix.errors import UsageError
from logix.influence import damping as damping_rules


@dataclass(frozen=True)
class ModuleInverse:
    """(H + lambda I)^-1 for one module, kept as an eigendecomposition."""

    kind: str
    damping: float
    values: Optional[Tensor] = None  # raw, full: [d]; kfac/ekfac: [r_out, r_in]
    vectors: Optional[Tensor] = None  # raw, full: [d, d]
    q_out: Optional[Tensor] = None  # kfac/ekfac: [r_out, r_out]
    q_in: Optional[Tensor] = None  # kfac/ekfac: [r_in, r_in]

    def apply(self, grads: Tensor) -> Tensor:
        """grads [n, r_out, r_in] -> (H + lambda I)^-1 grads, in grads' dtype."""
        if self.kind == "none":
            return grads
        return self.transform(grads, lambda values: 1 / (values + self.damping))

    def transform(self, grads: Tensor, fn) -> Tensor:
        """grads [n, r_out, r_in] -> f(H) grads, f applied to H's eigenvalues (float64)."""
        dtype = grads.dtype
        factor = fn(self.values).to(grads.device, dtype)
        if self.vectors is not None:  # raw, full: one dense eigenbasis
            vectors = self.vectors.to(grads.device, dtype)
            flat = grads.reshape(grads.shape[0], grads.shape[1] * grads.shape[2])
            return ((flat @ vectors) * factor @ vectors.T).reshape(grads.shape)
        q_out, q_in = self.q_out.to(grads.device, dtype), self.q_in.to(grads.device, dtype)
        rotated = q_out.T @ grads @ q_in * factor  # [n, r_out, r_in] in the eigenbasis
        return q_out @ rotated @ q_in.T

    def matrix(self) -> Tensor:
        """(H + lambda I)^-1 as an explicit [d, d] matrix (row-major vec of [r_out, r_in])."""
        if self.vectors is not None:
            return self.vectors @ torch.diag(1 / (self.values + self.damping)) @ self.vectors.T
        basis = torch.kron(self.q_out, self.q_in)
        return basis @ torch.diag(1 / (self.values + self.damping).flatten()) @ basis.T


def resolve_damping(values: Tensor, damping: damping_rules.Setting,
                    relative_damping: Optional[float]) -> float:
    """The damping of one module whose undamped curvature has eigenvalues `values`."""
    return damping_rules.resolve(values, damping, relative_damping)


@dataclass
class Preconditioner:
    """One ModuleInverse per module of a row layout."""

    queries_only: ClassVar[bool] = False  # a query-side solve (lissa): no train-side inverse
    cross_layer: ClassVar[bool] = False  # one inverse across modules (full), not one per module

    kind: str
    inverses: Dict[str, ModuleInverse]
    modules: List  # ModuleEntry in row order
    damping_rule: str = ""  # "auto", "relative" or "absolute" (logix.influence.damping.describe)
    # module -> share of its Fisher one example carries, where over CONCENTRATED (curvature.py)
    concentration: Dict[str, float] = field(default_factory=dict)

    def apply(self, rows: Tensor) -> Tensor:
        """rows [n, dim] -> preconditioned rows [n, dim]."""
        if not self.inverses:
            return rows
        parts = []
        for m in self.modules:
            grads = rows[:, m.columns].reshape(-1, m.rank_out, m.rank_in)
            parts.append(self.inverses[m.name].apply(grads).reshape(rows.shape[0], m.dim))
        return torch.cat(parts, 1)

    @property
    def dampings(self) -> Dict[str, float]:
        return {name: inv.damping for name, inv in self.inverses.items()}


class QuerySolver(Preconditioner):
    """A query-side solve (lissa, hessian, ggn): no per-module inverse to apply to training
    rows, so only the queries are preconditioned (mode 'dot'). A subclass sets `_dampings`
    (module -> the damping it resolved) before `dampings` is read."""

    queries_only = True
    _dampings: Dict[str, float]

    @property
    def dampings(self) -> Dict[str, float]:
        return dict(self._dampings)


def check_invertible(module: str, inverse: ModuleInverse) -> None:
    """Refuse a curvature that is singular once damped (smallest eigenvalue of H + lambda I at
    or below round-off of the largest, as numpy's matrix_rank): its inverse, and every score,
    would be inf/NaN or round-off noise."""
    shifted = inverse.values + inverse.damping
    largest, smallest = float(shifted.max()), float(shifted.min())
    if smallest > largest * shifted.numel() * torch.finfo(torch.float64).eps:
        return
    suggestion = float(0.1 * inverse.values.mean()) or 1e-3
    raise UsageError(
        f"Module {module!r}: its {inverse.kind} curvature plus damping {inverse.damping:g} is "
        f"singular (eigenvalues from {smallest:.3g} to {largest:.3g}), so (H + damping I)^-1 "
        f"and the scores would be inf/NaN. Pass damping > 0 (e.g. damping={suggestion:.3g}, "
        f"0.1 x that module's mean eigenvalue, or damping='auto'), or hessian='none'.")

"""How much damping each module's curvature gets: `damping="auto"` (the default), the relative
rule, or one absolute value. docs/concepts.md ("Damping") says why auto is what it is and what
it measured.

Auto, per module: lambda = AUTO_FACTOR x the root-mean-square eigenvalue of that module's
undamped curvature H (d x d),

    lambda = AUTO_FACTOR * sqrt(tr(H^2) / d) = AUTO_FACTOR * ||H||_F / sqrt(d),

the geometric mean of the mean eigenvalue tr(H) / d (the relative rule's scale) and the
curvature a typical logged gradient sees, tr(H^2) / tr(H) (for raw and EK-FAC curvature, the
mean of g^T H g / g^T g over the logged rows). The mean eigenvalue shrinks as a layer gets wider
than the examples that estimate it (most of its eigenvalues are then near zero, so a relative
damping lets the poorly estimated directions dominate); the second does not depend on those
directions at all. It needs the spectrum's first two moments only, so every curvature kind
(eigendecomposed or solved per query) and SOURCE's segments can use it.

The model's own curvature (the ``hessian`` and ``ggn`` kinds) takes its own auto rule, per
module and per batch of queries (`model_auto`):

    lambda = MODEL_FACTOR * tr(H^2) / tr(H) * sqrt(max(1, E||q||^2 / E||g||^2)),

tr(H^2) / tr(H) the curvature a typical gradient sees (as above), E||q||^2 / E||g||^2 the
queries' mean squared row norm over the logged training rows'. When a model fits its training
data, its training gradients and its Hessian shrink with the residuals while the queries'
gradients keep their size, and the RMS rule above collapses with the fit; the geometric mean of
the curvature at the training rows' scale and at the queries' scale does not.
"""

from __future__ import annotations

import math
from typing import Optional, Union

from torch import Tensor

AUTO = "auto"
RELATIVE = "relative"
ABSOLUTE = "absolute"
DEFAULT_RELATIVE = 0.1  # the relative rule's factor when influence.relative_damping is unset
AUTO_FACTOR = 0.3
MODEL_FACTOR = 0.011  # the hessian / ggn kinds' auto (docs/concepts.md, "Damping")

Setting = Union[None, str, float]


def rule(damping: Setting, relative_damping: Optional[float]) -> Union[str, float]:
    """What a (damping, relative_damping) pair of settings means: AUTO, RELATIVE or an absolute
    value. Unset damping is RELATIVE when relative_damping is set, else AUTO."""
    if damping is None:
        return AUTO if relative_damping is None else RELATIVE
    return damping if isinstance(damping, str) else float(damping)


def describe(damping: Setting, relative_damping: Optional[float]) -> str:
    """The rule's name for a result's meta: "auto", "relative" or "absolute"."""
    chosen = rule(damping, relative_damping)
    return chosen if isinstance(chosen, str) else ABSOLUTE


def resolve(values: Tensor, damping: Setting, relative_damping: Optional[float]) -> float:
    """The damping of one module whose undamped curvature has eigenvalues `values` (any shape:
    raw [d], K-FAC / EK-FAC [r_out, r_in])."""
    values = values.double().flatten()
    return from_moments(damping, relative_damping, values.numel(), float(values.sum()),
                        float(values.square().sum()))


def from_moments(damping: Setting, relative_damping: Optional[float], dim: int, trace: float,
                 trace_sq: float) -> float:
    """`resolve` from the curvature's size d, tr(H) and tr(H^2) (a kind that never forms H,
    such as lissa, estimates these from the rows)."""
    chosen = rule(damping, relative_damping)
    if chosen == RELATIVE:
        factor = DEFAULT_RELATIVE if relative_damping is None else relative_damping
        return float(factor * trace / max(dim, 1))
    if chosen == AUTO:
        return float(AUTO_FACTOR * math.sqrt(max(trace_sq, 0.0) / max(dim, 1)))
    return float(chosen)


def model_auto(trace: float, trace_sq: float, query_energy: float, train_energy: float) -> float:
    """The ``hessian`` / ``ggn`` kinds' auto damping of one module: tr(H) and tr(H^2) of its
    curvature (the squared norm of its rows of H, cross-module blocks included), the mean
    squared norm of its part of the queries' rows and of the logged training rows. The
    queries' scale counts at least as much as the training rows' (a query batch with no
    gradient in a module leaves the curvature term alone)."""
    if trace <= 0 or train_energy <= 0:
        return 0.0
    return float(MODEL_FACTOR * trace_sq / trace * math.sqrt(max(1.0, query_energy / train_energy)))

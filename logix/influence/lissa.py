"""LiSSA: (H + lambda I)^-1 v, matrix-free, by the Neumann recursion or conjugate gradients.

For A = H + lambda I and a scale s above A's largest eigenvalue, the recursion

    u_0 = v,   u_{t+1} = v + u_t - A u_t / s,   x_t = u_t / s

converges to A^-1 v (Agarwal et al., 2017; Koh & Liang, 2017) whenever A's eigenvalues lie in
(0, 2 s); the error shrinks by (1 - lambda_min(A) / s) per step, so reaching a relative residual
tol takes about log(tol) / log(1 - lambda_min(A) / s) steps: known before the first step once
lambda_min(A) is estimated (`needed_depth`), and refused when over the depth allowed. Each step's
residual ||v - A x_t|| / ||v|| comes for free with A u_t and is kept as the diagnostic.

Conjugate gradients (`conjugate_gradients`) solve the same system with the same products in
about sqrt(lambda_max / lambda_min) steps instead of lambda_max / lambda_min, and in at most
(number of distinct eigenvalues) steps: a Fisher of N rows plus damping has at most N + 1.

Two uses:

* `LissaPreconditioner`: the ``lissa`` curvature kind. H is the empirical Fisher of the saved
  rows, per module, F v = (1/N) sum_i g_i (g_i^T v): one streaming pass per step, batched over
  every query, so it works where the [d, d] ``raw`` covariance does not fit. Rows that fit in
  MEMORY_ROWS_BYTES are read once and kept in memory. Solver: conjugate gradients (default,
  influence.lissa_solver='cg') or the recursion ('neumann').
* `lissa(model, loss_fn, loader, vectors)`: the model's own Hessian (or Gauss-Newton matrix) by
  Hessian-vector products, one batch of `loader` per step: the classical estimator.
"""

from __future__ import annotations

import itertools
import math
import warnings
from typing import Callable, Dict, Iterable, List, Optional, Sequence, get_args

import torch
from torch import Tensor, nn

from logix import distributed
from logix.config import LissaSolver
from logix.errors import UsageError
from logix.influence import damping as damping_rules
from logix.influence.gather import own_part
from logix.influence.hvp import gauss_newton_products, hessian_products
from logix.influence.preconditioner import QuerySolver
from logix.progress import track

DIVERGED = 1e3  # a relative residual above this (or not finite) means the recursion diverged
MEMORY_ROWS_BYTES = 256 * 2 ** 20
POWER_ITERATIONS = 20
NEVER = 2 ** 62  # needed_depth when the recursion does not converge
EXACT_DIM = 2048  # modules at most this wide get tr(F^2) exactly (a [d, d] sum), wider estimated
PROBES = 64  # Hutchinson probes for tr(F^2) of wider modules


class LissaPreconditioner(QuerySolver):
    """A query-side solve: `apply(queries)` solves (F + lambda I) x = g_q against the saved rows'
    Fisher, by conjugate gradients (solver 'cg') or the LiSSA recursion ('neumann');
    `diagnostics` holds the last solve's residuals."""

    def __init__(self, reader, modules, damping: damping_rules.Setting,
                 relative_damping: Optional[float],
                 depth: int, scale: Optional[float], tol: float, block_rows: int,
                 progress: bool = True, solver: str = "cg") -> None:
        super().__init__("lissa", {}, list(modules))
        if solver not in get_args(LissaSolver):
            raise UsageError(f"LiSSA solver {solver!r} is not supported; allowed: "
                             f"{list(get_args(LissaSolver))}.")
        self.fisher = RowFisher(reader, self.modules, block_rows)
        means = self.fisher.mean_diagonal()
        squares = self.fisher.squared_traces() if damping_rules.rule(
            damping, relative_damping) == damping_rules.AUTO else {}
        self._dampings = {m.name: damping_rules.from_moments(
            damping, relative_damping, m.dim, means[m.name] * m.dim, squares.get(m.name, 0.0))
            for m in self.modules}
        self.damping_rule = damping_rules.describe(damping, relative_damping)
        self.depth, self.scale, self.tol, self.progress = depth, scale, tol, progress
        self.solver = solver
        self.diagnostics: dict = {}

    def apply(self, rows: Tensor) -> Tensor:
        """queries [n, dim] -> (F + lambda I)^-1 queries, per module (float64)."""
        if rows.shape[0] == 0:
            return rows
        for name, value in self._dampings.items():
            if value <= 0:
                raise UsageError(f"hessian='lissa' needs damping > 0; module {name!r} has "
                                 f"{value:g} (its logged rows are all zero, or damping=0 was "
                                 "passed). Pass damping > 0.")
        damping = _per_column(self.modules, self._dampings, rows.shape[1])

        def product(u: Tensor) -> Tensor:
            return self.fisher.apply(u) + damping * u

        if self.solver == "cg":
            solution, self.diagnostics = conjugate_gradients(
                product, rows.double(), _segments(self.modules, rows.shape[1]), self.depth,
                self.tol, self.progress, "hessian='lissa'")
            return solution.to(rows.dtype)
        scales = self._scales()
        smallest = self.fisher.smallest_eigenvalues(self._dampings, scales, self.progress)
        needed = max(needed_depth(smallest[m.name], scales[m.name], self.tol)
                     for m in self.modules)
        if needed > self.depth:
            raise UsageError(
                f"hessian='lissa' (solver 'neumann'): the recursion shrinks the error by 1 - "
                f"lambda_min / scale per step, and reaching lissa_tol={self.tol:g} takes at "
                f"least {needed} steps (lambda_min of F + damping I about "
                f"{_short(smallest)}; scales {_short(scales)}), over lissa_depth={self.depth}. "
                f"Pass lissa_solver='cg' (conjugate gradients: about the square root of that), "
                f"lissa_depth >= {needed}, or a larger damping.")
        scale = _per_column(self.modules, scales, rows.shape[1])
        solution, self.diagnostics = neumann(product, rows.double(), scale, self.depth, self.tol,
                                             self.progress, "hessian='lissa'")
        self.diagnostics["scale"] = scales
        return solution.to(rows.dtype)

    def _scales(self) -> Dict[str, float]:
        if self.scale is not None:
            return {m.name: float(self.scale) for m in self.modules}
        top = self.fisher.largest_eigenvalues(self.progress)
        return {m.name: top[m.name] + self._dampings[m.name] for m in self.modules}


class RowFisher:
    """F v = (1/N) sum_i g_i (g_i^T v) per module (block diagonal), from a log's saved rows,
    in float64."""

    def __init__(self, reader, modules, block_rows: int) -> None:
        self.modules = modules
        self.reader = own_part(reader) if distributed.is_distributed() else reader
        self.block_rows = block_rows
        self.count = int(distributed.all_reduce_sum(
            torch.tensor([float(self.reader.rows)], dtype=torch.float64)).item())
        if self.count == 0:
            raise UsageError("hessian='lissa' solves against the saved training rows and this "
                             "log has none: log with run.save(True) and setup({'grad': ['log']}).")
        self._rows = None
        if self.reader.rows * self.reader.dim * 4 <= MEMORY_ROWS_BYTES:
            self._rows = self.reader.read_all()[1].float()

    def _blocks(self) -> Iterable[Tensor]:
        if self._rows is not None:
            yield self._rows
            return
        for _, rows in self.reader.fixed_blocks(self.block_rows):
            yield rows.float()

    def mean_diagonal(self) -> Dict[str, float]:
        """trace(F_m) / d_m per module: F's mean eigenvalue, for relative damping."""
        total = torch.zeros(self.reader.dim, dtype=torch.float64)
        for rows in self._blocks():
            total += rows.double().square().sum(0)
        distributed.all_reduce_sum(total)
        return {m.name: float(total[m.columns].sum() / (self.count * m.dim))
                for m in self.modules}

    def apply(self, vectors: Tensor) -> Tensor:
        """vectors [q, dim] (float64) -> F vectors, one pass over the rows."""
        out = torch.zeros_like(vectors)
        for rows in self._blocks():
            rows = rows.double()
            for m in self.modules:
                g = rows[:, m.columns]  # [n, d_m]
                out[:, m.columns] += (vectors[:, m.columns] @ g.T) @ g
        distributed.all_reduce_sum(out)
        return out / self.count

    def squared_traces(self) -> Dict[str, float]:
        """tr(F_m^2) per module, for damping='auto': exact from G^T G (one pass) for modules at
        most EXACT_DIM wide, else the seeded Hutchinson estimate mean ||F_m z||^2 over PROBES
        Rademacher vectors z (one more pass)."""
        exact = [m for m in self.modules if m.dim <= EXACT_DIM]
        grams = {m.name: torch.zeros(m.dim, m.dim, dtype=torch.float64) for m in exact}
        for rows in self._blocks() if exact else ():
            for m in exact:
                g = rows[:, m.columns].double()
                grams[m.name] += g.T @ g
        out = {}
        for m in exact:
            distributed.all_reduce_sum(grams[m.name])
            out[m.name] = float((grams[m.name] / self.count).square().sum())
        wide = [m for m in self.modules if m.dim > EXACT_DIM]
        if wide:
            generator = torch.Generator().manual_seed(0)
            probes = torch.randint(0, 2, (PROBES, self.reader.dim), generator=generator
                                   ).double() * 2 - 1
            products = self.apply(probes)
            out.update({m.name: float(products[:, m.columns].square().sum(1).mean())
                        for m in wide})
        return out

    def largest_eigenvalues(self, progress: bool = True) -> Dict[str, float]:
        """Per module, F's largest eigenvalue by power iteration from a seeded start."""
        return self._power_iteration(self.apply, progress)

    def smallest_eigenvalues(self, dampings: Dict[str, float], scales: Dict[str, float],
                             progress: bool = True) -> Dict[str, float]:
        """Per module, an estimate of A = F + damping I's smallest eigenvalue from the top one of
        scale I - A: power iteration approaches that from below, so each estimate is at least
        the true value (and at least the damping)."""
        damping = _per_column(self.modules, dampings, self.reader.dim)
        scale = _per_column(self.modules, scales, self.reader.dim)
        top = self._power_iteration(lambda u: (scale - damping) * u - self.apply(u), progress)
        return {m.name: max(scales[m.name] - top[m.name], dampings[m.name])
                for m in self.modules}

    def _power_iteration(self, product, progress: bool) -> Dict[str, float]:
        """Per module, the Rayleigh quotient of a block-diagonal `product` after
        POWER_ITERATIONS steps from a seeded start."""
        generator = torch.Generator().manual_seed(0)
        v = torch.randn(1, self.reader.dim, generator=generator, dtype=torch.float64)
        estimate = {m.name: 0.0 for m in self.modules}
        for _ in track(range(POWER_ITERATIONS), POWER_ITERATIONS, "LiSSA spectrum", progress):
            v = _normalized(self.modules, v)
            fv = product(v)
            estimate = {m.name: float((v[:, m.columns] * fv[:, m.columns]).sum())
                        for m in self.modules}
            v = fv
        return estimate


def needed_depth(smallest: float, scale: float, tol: float) -> int:
    """Steps the recursion takes to shrink the error by `tol` when A's smallest eigenvalue is
    `smallest` (each step multiplies it by 1 - smallest / scale). NEVER when it never does."""
    if smallest >= scale:
        return 1
    if smallest <= 0 or tol <= 0:
        return NEVER
    return max(1, math.ceil(math.log(tol) / math.log1p(-smallest / scale)))


def conjugate_gradients(product: Callable[[Tensor], Tensor], v: Tensor, segments: Tensor,
                        depth: int, tol: float, progress: bool, what: str):
    """x ~ A^-1 v by conjugate gradients, A symmetric positive definite and block diagonal over
    the column `segments` ([dim] block index per column): each (row of v, block) pair is its own
    system, all advanced by one product(p) = A p per step. Stops once every row's relative
    residual ||v - A x|| / ||v|| is at most `tol`, else after `depth` steps (with a warning).
    Returns (x, diagnostics)."""
    _check_solver_args(depth, tol)
    blocks = int(segments.max()) + 1 if segments.numel() else 0

    def block_dot(a: Tensor, b: Tensor) -> Tensor:  # [q, blocks]
        return torch.zeros(a.shape[0], blocks, dtype=a.dtype).index_add_(1, segments, a * b)

    norms = v.norm(dim=-1).clamp_min(torch.finfo(v.dtype).tiny)
    x = torch.zeros_like(v)
    r = v.clone()
    p = r.clone()
    rr = block_dot(r, r)
    residuals: List[float] = []
    for step in track(range(depth), depth, "LiSSA (cg)", progress):
        ap = product(p)
        curvature = block_dot(p, ap)
        if bool((curvature[rr > 0] <= 0).any()) or not bool(torch.isfinite(curvature).all()):
            raise UsageError(f"{what}: conjugate gradients met a direction of zero or negative "
                             f"curvature at step {step}: H + damping I is not positive definite "
                             "(to round-off). Pass a larger damping.")
        alpha = torch.where(rr > 0, rr / curvature.where(rr > 0, torch.ones_like(rr)), 0)
        x += alpha[:, segments] * p
        r -= alpha[:, segments] * ap
        new = block_dot(r, r)
        residual = float((new.sum(1).sqrt() / norms).max())
        residuals.append(residual)
        if residual <= tol:
            break
        beta = torch.where(rr > 0, new / rr.where(rr > 0, torch.ones_like(rr)), 0)
        p = r + beta[:, segments] * p
        rr = new
    else:
        warnings.warn(f"{what}: conjugate gradients stopped at depth {depth} with relative "
                      f"residual {residuals[-1]:.3g} > tol {tol:g}; pass a larger depth "
                      "(influence.lissa_depth in the config, e.g. logix.init(..., "
                      "lissa_depth=5000)) or a larger damping. The scores solve the system only "
                      "to that residual.", stacklevel=3)
    return x, {"solver": "cg", "iterations": len(residuals), "residuals": residuals,
               "converged": residuals[-1] <= tol}


def neumann(product: Callable[[Tensor], Tensor], v: Tensor, scale, depth: int, tol: float,
            progress: bool, what: str):
    """x ~ A^-1 v by the LiSSA recursion; product(u) = A u. scale: a number or a tensor that
    broadcasts against v (e.g. one value per column). Stops once every row's relative residual
    is at most `tol`; raises UsageError when the recursion diverges. Returns (x, diagnostics)."""
    _check_solver_args(depth, tol)
    norms = v.norm(dim=-1).clamp_min(torch.finfo(v.dtype).tiny)
    u = v.clone()
    residuals: List[float] = []
    for step in track(range(depth), depth, "LiSSA", progress):
        au = product(u)
        residual = float(((v - au / scale).norm(dim=-1) / norms).max())
        residuals.append(residual)
        if not math.isfinite(residual) or residual > DIVERGED:
            raise UsageError(
                f"{what}: LiSSA diverged at step {step} (relative residual {residual:.3g}). The "
                "scale must exceed the largest eigenvalue of H + damping I, and every eigenvalue "
                "must be positive: pass a larger scale, or a larger damping (for the model's own "
                "Hessian, which can be indefinite, or use gauss_newton=True).")
        if residual <= tol:
            break
        u = v + u - au / scale
    else:
        warnings.warn(f"{what}: LiSSA stopped at depth {depth} with relative residual "
                      f"{residuals[-1]:.3g} > tol {tol:g}; pass a larger depth for an exact "
                      "solve (influence.lissa_depth in the config, e.g. logix.init(..., "
                      "lissa_depth=5000), or depth= to lissa()), a larger damping, or a smaller "
                      "scale (influence.lissa_scale: it need only exceed the largest eigenvalue "
                      "of H + damping I, and the recursion takes about scale / smallest "
                      "eigenvalue steps); the truncated recursion damps small eigenvalues "
                      "further.",
                      stacklevel=3)
    return u / scale, {"solver": "neumann", "iterations": len(residuals),
                       "residuals": residuals, "converged": residuals[-1] <= tol}


def lissa(model: nn.Module, loss_fn: Callable, loader: Iterable, vectors: Tensor, *,
          damping: float = 0.01, scale: Optional[float] = None, depth: int = 1000,
          tol: float = 1e-4, gauss_newton: bool = False, forward: Optional[Callable] = None,
          params: Optional[Sequence[str]] = None, progress: bool = False) -> dict:
    """(H + damping I)^-1 vectors for the model's own Hessian, by LiSSA with Hessian-vector
    products (one batch of `loader` per step, cycling).

    loss_fn(outputs, batch) -> the batch's loss (a mean over its examples, so H is the mean
    Hessian); forward(model, batch) -> outputs (default: model(batch[0])). vectors: [k, P], flat
    over `params` (default: every parameter that requires grad, in named_parameters order).
    gauss_newton=True uses the Gauss-Newton matrix J^T H_out J (positive semi-definite when the
    loss is convex in the outputs) instead of H. scale: default 1.5 x the largest eigenvalue of
    H + damping I on the first batch (power iteration). Before the first step, A = H + damping I's
    smallest eigenvalue is estimated on the first batch (power iteration on scale I - A, 20
    products); when it is <= 0 (the recursion would diverge), or when reaching `tol` takes more
    than `depth` steps even at that estimate (about log(tol) / log(1 - lambda_min / scale)), a
    UsageError says so and what to change. Stops when every vector's relative residual (on that
    step's batch) is at most `tol`, else after `depth` steps (with a warning).

    Returns {"solution" [k, P], "iterations", "residuals" (per step), "converged", "scale",
    "smallest_eigenvalue", "needed_depth"}.
    """
    if damping < 0 or not math.isfinite(damping):
        raise UsageError(f"lissa damping must be a finite number >= 0, got {damping!r}.")
    names = list(params) if params is not None else \
        [n for n, p in model.named_parameters() if p.requires_grad]
    weights = dict(model.named_parameters())
    unknown = [n for n in names if n not in weights]
    if unknown:
        raise UsageError(f"lissa params {unknown} are not parameters of the model; known: "
                         f"{list(weights)}.")
    shapes = [weights[n].shape for n in names]
    total = sum(s.numel() for s in shapes)
    if vectors.dim() != 2 or vectors.shape[1] != total:
        raise UsageError(f"lissa vectors must be [k, {total}] (flat over params {names}), got "
                         f"{list(vectors.shape)}.")
    forward = forward or (lambda m, batch: m(batch[0]))
    batches = _cycle(loader)
    base = {n: weights[n].detach() for n in names}
    hvp = gauss_newton_products if gauss_newton else hessian_products

    def product(u: Tensor, batch) -> Tensor:
        return hvp(model, forward, loss_fn, batch, base, names, shapes, u) + damping * u

    v = vectors.detach().to(weights[names[0]].dtype)
    first = next(batches)
    if scale is None:
        scale = 1.5 * _largest_eigenvalue(lambda u: product(u, first), total, v.dtype)
    elif not scale > 0:
        raise UsageError(f"lissa scale must be > 0, got {scale!r}.")
    smallest = _smallest_eigenvalue(lambda u: product(u, first), scale, total, v.dtype)
    needed = needed_depth(smallest, scale, tol)
    if smallest <= 0:
        raise UsageError(f"logix.influence.lissa: H + damping I has an eigenvalue <= 0 (about "
                         f"{smallest:.3g} on the first batch), so the recursion diverges: pass "
                         f"damping > {damping - smallest:.3g}, or gauss_newton=True.")
    if needed > depth:
        raise UsageError(
            f"logix.influence.lissa: reaching tol={tol:g} takes at least {needed} steps (each "
            f"shrinks the error by 1 - lambda_min / scale, lambda_min of H + damping I about "
            f"{smallest:.3g} on the first batch, scale {scale:.3g}), over depth={depth}. Pass "
            f"depth >= {needed}, a larger damping, or a larger tol.")
    current = itertools.chain([first], batches)
    solution, info = neumann(lambda u: product(u, next(current)), v, scale, depth, tol,
                             progress, "logix.influence.lissa")
    return {"solution": solution, **info, "scale": float(scale),
            "smallest_eigenvalue": smallest, "needed_depth": needed}


def _largest_eigenvalue(product, size: int, dtype) -> float:
    value = _power_iteration(product, size, dtype)
    if not value > 0:
        raise UsageError(f"logix.influence.lissa: H + damping I has no positive top eigenvalue "
                         f"({value:.3g}); pass a larger damping, gauss_newton=True, or scale=.")
    return value


def _smallest_eigenvalue(product, scale: float, size: int, dtype) -> float:
    """An estimate of A's smallest eigenvalue from the top one of scale I - A; power iteration
    approaches the top from below, so the estimate is at least the true value."""
    return scale - _power_iteration(lambda u: scale * u - product(u), size, dtype)


def _power_iteration(product, size: int, dtype) -> float:
    v = torch.randn(1, size, generator=torch.Generator().manual_seed(0)).to(dtype)
    value = 0.0
    for _ in range(POWER_ITERATIONS):
        v = v / v.norm()
        av = product(v)
        value = float((v * av).sum())
        v = av
    return value


def _cycle(loader: Iterable):
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise UsageError("logix.influence.lissa: the loader yielded no batch.")


def _per_column(modules, values: Dict[str, float], dim: int) -> Tensor:
    out = torch.empty(dim, dtype=torch.float64)
    for m in modules:
        out[m.columns] = values[m.name]
    return out


def _segments(modules, dim: int) -> Tensor:
    """[dim] the index of each column's module."""
    out = torch.empty(dim, dtype=torch.long)
    for i, m in enumerate(modules):
        out[m.columns] = i
    return out


def _short(values: Dict[str, float]) -> str:
    return ", ".join(f"{name}: {value:.3g}" for name, value in values.items())


def _normalized(modules, v: Tensor) -> Tensor:
    out = v.clone()
    for m in modules:
        out[:, m.columns] /= out[:, m.columns].norm().clamp_min(1e-300)
    return out


def _check_solver_args(depth: int, tol: float) -> None:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth <= 0:
        raise UsageError(f"LiSSA depth must be a positive integer, got {depth!r}.")
    if not 0 <= tol < math.inf:
        raise UsageError(f"LiSSA tol must be a finite number >= 0, got {tol!r}.")

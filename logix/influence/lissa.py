"""LiSSA: (H + lambda I)^-1 v by the truncated Neumann recursion, matrix-free.

For A = H + lambda I and a scale s above A's largest eigenvalue, the recursion

    u_0 = v,   u_{t+1} = v + u_t - A u_t / s,   x_t = u_t / s

converges to A^-1 v (Agarwal et al., 2017; Koh & Liang, 2017) whenever A's eigenvalues lie in
(0, 2 s); the error shrinks by (1 - lambda_min(A) / s) per step. Each step's residual
||v - A x_t|| / ||v|| comes for free with A u_t and is kept as the convergence diagnostic.

Two uses:

* `solve_rows`: the ``lissa`` curvature kind. H is the empirical Fisher of the saved rows, per
  module, F v = (1/N) sum_i g_i (g_i^T v): one streaming pass per step, batched over every query,
  so it works where the [d, d] ``raw`` covariance does not fit. Rows that fit in
  `memory_rows_bytes` are read once and kept in memory.
* `lissa(model, loss_fn, loader, vectors)`: the model's own Hessian (or Gauss-Newton matrix) by
  Hessian-vector products, one batch of `loader` per step: the classical estimator.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch import Tensor, nn

from logix import distributed
from logix.errors import UsageError
from logix.influence import damping as damping_rules
from logix.influence.gather import own_part
from logix.influence.preconditioner import Preconditioner
from logix.progress import track

DIVERGED = 1e3  # a relative residual above this (or not finite) means the recursion diverged
MEMORY_ROWS_BYTES = 256 * 2 ** 20
POWER_ITERATIONS = 20
EXACT_DIM = 2048  # modules at most this wide get tr(F^2) exactly (a [d, d] sum), wider estimated
PROBES = 64  # Hutchinson probes for tr(F^2) of wider modules


class LissaPreconditioner(Preconditioner):
    """A query-side solve: `apply(queries)` runs LiSSA against the saved rows' Fisher.

    There are no per-module inverses to apply to training rows, so only the queries are
    preconditioned (mode 'dot'); `diagnostics` holds the last solve's residuals.
    """

    queries_only = True

    def __init__(self, reader, modules, damping: damping_rules.Setting,
                 relative_damping: Optional[float],
                 depth: int, scale: Optional[float], tol: float, block_rows: int,
                 progress: bool = True) -> None:
        super().__init__("lissa", {}, list(modules))
        self.fisher = RowFisher(reader, self.modules, block_rows)
        means = self.fisher.mean_diagonal()
        squares = self.fisher.squared_traces() if damping_rules.rule(
            damping, relative_damping) == damping_rules.AUTO else {}
        self._dampings = {m.name: damping_rules.from_moments(
            damping, relative_damping, m.dim, means[m.name] * m.dim, squares.get(m.name, 0.0))
            for m in self.modules}
        self.damping_rule = damping_rules.describe(damping, relative_damping)
        self.depth, self.scale, self.tol, self.progress = depth, scale, tol, progress
        self.diagnostics: dict = {}

    @property
    def dampings(self) -> Dict[str, float]:
        return dict(self._dampings)

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
        if self.scale is not None:
            scale = torch.full((rows.shape[1],), float(self.scale), dtype=torch.float64)
        else:
            top = self.fisher.largest_eigenvalues(self.progress)
            scale = _per_column(self.modules, {m.name: top[m.name] + self._dampings[m.name]
                                               for m in self.modules}, rows.shape[1])
        solution, self.diagnostics = neumann(
            lambda u: self.fisher.apply(u) + damping * u, rows.double(), scale, self.depth,
            self.tol, self.progress, "hessian='lissa'")
        self.diagnostics["scale"] = {m.name: float(scale[m.offset]) for m in self.modules}
        return solution.to(rows.dtype)


class RowFisher:
    """F v = (1/N) sum_i g_i (g_i^T v) per module (block diagonal), from a log's saved rows."""

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
        v = vectors.float()
        for rows in self._blocks():
            for m in self.modules:
                g = rows[:, m.columns]  # [n, d_m]
                out[:, m.columns] += (g.T @ (g @ v[:, m.columns].T)).T.double()
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
        generator = torch.Generator().manual_seed(0)
        v = torch.randn(1, self.reader.dim, generator=generator, dtype=torch.float64)
        estimate = {m.name: 0.0 for m in self.modules}
        for _ in track(range(POWER_ITERATIONS), POWER_ITERATIONS, "LiSSA scale", progress):
            v = _normalized(self.modules, v)
            fv = self.apply(v)
            estimate = {m.name: float((v[:, m.columns] * fv[:, m.columns]).sum())
                        for m in self.modules}
            v = fv
        return estimate


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
    return u / scale, {"iterations": len(residuals), "residuals": residuals,
                       "converged": residuals[-1] <= tol}


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
    H + damping I on the first batch (power iteration). Stops when every vector's relative
    residual (on that step's batch) is at most `tol`, else after `depth` steps.

    Returns {"solution" [k, P], "iterations", "residuals" (per step), "converged", "scale"}.
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
    hvp = _gnvp if gauss_newton else _hvp

    def product(u: Tensor, batch) -> Tensor:
        return hvp(model, forward, loss_fn, batch, base, names, shapes, u) + damping * u

    v = vectors.detach().to(weights[names[0]].dtype)
    if scale is None:
        first = next(batches)
        scale = 1.5 * _largest_eigenvalue(lambda u: product(u, first), total, v.dtype)
    elif not scale > 0:
        raise UsageError(f"lissa scale must be > 0, got {scale!r}.")
    current = iter(batches)
    solution, info = neumann(lambda u: product(u, next(current)), v, scale, depth, tol,
                             progress, "logix.influence.lissa")
    return {"solution": solution, **info, "scale": float(scale)}


def _hvp(model, forward, loss_fn, batch, base, names, shapes, u: Tensor) -> Tensor:
    """[k, P] Hessian-vector products of the batch loss at `base`."""
    from torch.func import grad, jvp, vmap

    def loss(flat):
        return loss_fn(forward_at(model, forward, batch, _unflatten(flat, names, shapes)), batch)

    point = _flatten(base, names)
    return vmap(lambda t: jvp(grad(loss), (point,), (t,))[1])(u)


def _gnvp(model, forward, loss_fn, batch, base, names, shapes, u: Tensor) -> Tensor:
    """[k, P] Gauss-Newton-vector products J^T H_out J u at `base`."""
    from torch.func import grad, jvp, vjp, vmap

    point = _flatten(base, names)

    def outputs(flat):
        return forward_at(model, forward, batch, _unflatten(flat, names, shapes))

    out, pullback = vjp(outputs, point)

    def one(t):
        _, ju = jvp(outputs, (point,), (t,))
        _, hju = jvp(grad(lambda o: loss_fn(o, batch)), (out,), (ju,))
        return pullback(hju)[0]

    return vmap(one)(u)


def forward_at(model, forward, batch, params: Dict[str, Tensor]):
    """forward(model, batch) with the model's `params` replaced (torch.func.functional_call)."""
    from torch.func import functional_call

    return forward(lambda *args, **kwargs: functional_call(model, params, args, kwargs), batch)


def _flatten(tensors: Dict[str, Tensor], names) -> Tensor:
    return torch.cat([tensors[n].reshape(-1) for n in names])


def _unflatten(flat: Tensor, names, shapes) -> Dict[str, Tensor]:
    out, start = {}, 0
    for n, s in zip(names, shapes):
        out[n] = flat[start:start + s.numel()].reshape(s)
        start += s.numel()
    return out


def _largest_eigenvalue(product, size: int, dtype) -> float:
    v = torch.randn(1, size, generator=torch.Generator().manual_seed(0)).to(dtype)
    value = 0.0
    for _ in range(POWER_ITERATIONS):
        v = v / v.norm()
        av = product(v)
        value = float((v * av).sum())
        v = av
    if not value > 0:
        raise UsageError(f"logix.influence.lissa: H + damping I has no positive top eigenvalue "
                         f"({value:.3g}); pass a larger damping, gauss_newton=True, or scale=.")
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

"""The model's own curvature in the log's row space, solved per query by conjugate gradients.

The ``hessian`` and ``ggn`` kinds take H, the Hessian (or Gauss-Newton matrix J^T H_out J) of the
mean training loss with respect to the watched layers' weights, jointly over every layer (not
block-diagonal). A log row is M g: g the layer's gradient, M its LoGra projection (vec(P_out G
P_in^T), G the [out, in] matrix of the weight and, when logged, the bias), so the curvature of
the rows is M H M^T, never formed: its product with x is

    lift (M^T x: P_out^T X P_in, laid back onto the parameters)
    -> H u by Hessian-vector products, one pass over the training loader
    -> project back (M).

For an unprojected log M is a permutation and this is the exact Hessian. Each block of queries
solves (M H M^T + lambda I) x = g_q by conjugate gradients, one pass over the loader per
iteration; a non-positive p^T A p (the Hessian is indefinite) and a solve that does not reach
`tol` within `max_iterations` raise UsageError. Damping "auto" is these kinds' own rule
(`damping.model_auto`: per module, from the moments of M H M^T and the queries' scale over the
logged rows', so it depends on the batch of queries solved together).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from logix.errors import UsageError
from logix.influence.hvp import gauss_newton_products, hessian_products
from logix.influence import damping as damping_rules
from logix.influence.preconditioner import QuerySolver
from logix.logra import Projection
from logix.progress import track

# The moments behind the damping rules, per module: exact (its unit vectors) for a module of at
# most EXACT_DIM numbers, else PROBES Hutchinson probes on that module alone (probes of whole
# rows let wide modules' cross terms swamp a small module's trace: docs/concepts.md, the
# `hessian` and `ggn` kinds)
EXACT_DIM = 128  # no more products than its probes would take
PROBES = 128
DRIFT = 10.0  # the true residual may exceed CG's recursive one by this factor (round-off)


@dataclass(frozen=True)
class WatchedWeights:
    """One watched layer as its log rows see it."""

    params: Tuple[str, ...]  # the model's parameter names: (weight,) or (weight, bias)
    matrix: Callable[..., Tensor]  # (*params) -> the [out_dim, in_dim] matrix LoGra projects
    projection: Projection


@dataclass
class CurvatureSource:
    """What the ``hessian`` / ``ggn`` kinds differentiate (`run.add_curvature_source` builds it).

    loss_fn(outputs, batch) -> the batch's mean loss; forward(model, batch) -> outputs (default
    model(batch[0])); H is the mean over the loader's examples (batches weighted by their size).
    tol: relative residual ||g - A x|| / ||g|| every query must reach; max_iterations: CG
    iterations (passes over the loader) per block of `query_block` queries; allow_unconverged:
    warn and return the unconverged solution (its residuals in meta) instead of raising.
    """

    model: nn.Module
    loss_fn: Callable
    loader: Iterable
    layers: Dict[str, WatchedWeights]
    forward: Optional[Callable] = None
    tol: float = 1e-4
    max_iterations: int = 500
    query_block: int = 32
    allow_unconverged: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.tol < 1:
            raise UsageError(f"add_curvature_source tol must be in (0, 1), got {self.tol!r}.")
        for key in ("max_iterations", "query_block"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UsageError(f"add_curvature_source {key} must be a positive integer, got "
                                 f"{value!r}.")
        if not callable(self.loss_fn):
            raise UsageError("add_curvature_source loss_fn must be a function (outputs, batch) "
                             "-> the batch's mean loss.")
        self.check_first_batch()

    def check_first_batch(self) -> None:
        """Run forward and loss_fn once on the loader's first batch, so a wrong signature, batch
        layout or shape is refused here with what to change, not deep inside a CG solve."""
        if iter(self.loader) is self.loader:
            raise UsageError("add_curvature_source needs a loader it can pass over many times "
                             "(one pass per CG iteration), got a one-shot iterator: pass the "
                             "DataLoader (or a list of batches) itself.")
        batch = next(iter(self.loader), None)
        if batch is None:
            return  # refused at the first solve: the loader yielded no examples
        forward = self.forward or default_forward
        try:
            with torch.no_grad():
                outputs = forward(self.model, batch)
        except Exception as error:
            raise UsageError(
                f"add_curvature_source: forward(model, batch) failed on the loader's first batch "
                f"({type(error).__name__}: {error}). The loader must yield the training batches "
                "the model was logged on; the default forward is model(batch[0]): pass "
                "forward=lambda model, batch: ... for another batch layout.") from error
        try:
            loss = self.loss_fn(outputs, batch)
        except Exception as error:
            raise UsageError(
                f"add_curvature_source: loss_fn(outputs, batch) failed on the loader's first "
                f"batch ({type(error).__name__}: {error}). loss_fn takes the model's outputs and "
                "the whole batch and returns the batch's mean loss, e.g. lambda outputs, batch: "
                "F.cross_entropy(outputs, batch[1]).") from error
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            got = f"shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
            raise UsageError(f"add_curvature_source: loss_fn must return the batch's mean loss as "
                             f"a scalar tensor, got {got}: reduce it (reduction='mean').")


def default_forward(model, batch):
    return model(batch[0])


class ProjectedCurvature:
    """x [k, dim] -> M H M^T x, one pass over the source's loader per call."""

    def __init__(self, source: CurvatureSource, modules, gauss_newton: bool) -> None:
        self.source, self.modules = source, modules
        self.forward = source.forward or default_forward
        self.products = gauss_newton_products if gauss_newton else hessian_products
        weights = dict(source.model.named_parameters())
        self.layers = [_layer(source, m) for m in modules]
        self.names = [n for layer in self.layers for n in layer.params]
        self.base = {n: weights[n].detach() for n in self.names}
        self.shapes = [self.base[n].shape for n in self.names]
        self.dtype = self.base[self.names[0]].dtype
        self.passes = 0
        for m, layer in zip(modules, self.layers):
            shape = tuple(layer.matrix(*(self.base[n] for n in layer.params)).shape)
            if shape != (m.out_dim, m.in_dim):
                raise UsageError(f"Module {m.name!r} of the model passed to "
                                 f"add_curvature_source has a {shape} weight matrix; the log's "
                                 f"is {(m.out_dim, m.in_dim)}: pass the model that was logged.")

    @torch.no_grad()  # torch.func differentiates inside; nothing outside needs a graph
    def __call__(self, x: Tensor) -> Tensor:
        u = self.lift(x.to(self.dtype))
        total, count = torch.zeros_like(u), 0
        for batch in self.source.loader:
            n = _batch_size(batch)
            total += n * self.products(self.source.model, self.forward, self.source.loss_fn,
                                       batch, self.base, self.names, self.shapes, u)
            count += n
        if count == 0:
            raise UsageError("The curvature source's loader yielded no examples: pass the "
                             "training loader to add_curvature_source.")
        self.passes += 1
        return self.project(total / count).to(x.dtype)

    def lift(self, x: Tensor) -> Tensor:
        """Rows [k, dim] -> M^T x [k, P], flat over `names`."""
        from torch.func import vjp, vmap

        parts = []
        for m, layer in zip(self.modules, self.layers):
            p = layer.projection.to(dtype=self.dtype)
            v = x[:, m.columns].reshape(-1, m.rank_out, m.rank_in)
            g = _t(p.p_out) @ v if p.p_out is not None else v
            g = g @ p.p_in if p.p_in is not None else g  # [k, out, in]
            _, pullback = vjp(layer.matrix, *(self.base[n] for n in layer.params))
            parts.extend(t.reshape(x.shape[0], -1) for t in vmap(pullback)(g))
        return torch.cat(parts, 1)

    def project(self, u: Tensor) -> Tensor:
        """Parameter vectors [k, P] -> their rows M u [k, dim]."""
        from torch.func import vmap

        values, start = {}, 0
        for name, shape in zip(self.names, self.shapes):
            values[name] = u[:, start:start + shape.numel()].reshape(-1, *shape)
            start += shape.numel()
        parts = []
        for m, layer in zip(self.modules, self.layers):
            p = layer.projection.to(dtype=self.dtype)
            g = vmap(layer.matrix)(*(values[n] for n in layer.params))  # [k, out, in]
            g = p.p_out @ g if p.p_out is not None else g
            g = g @ _t(p.p_in) if p.p_in is not None else g
            parts.append(g.reshape(u.shape[0], m.dim))
        return torch.cat(parts, 1)


class HessianSolve(QuerySolver):
    """A query-side solve: `apply(queries)` runs CG against M H M^T + lambda I (mode 'dot' only;
    `diagnostics` holds the last solve's iterations and residuals)."""

    def __init__(self, kind: str, source: Optional[CurvatureSource], modules,
                 damping: damping_rules.Setting, relative_damping: Optional[float],
                 gauss_newton: bool, reader: Callable, block_rows: int,
                 progress: bool = True) -> None:
        super().__init__(kind, {}, list(modules))
        if source is None:
            raise UsageError(
                f"hessian={kind!r} differentiates the model's training loss: call "
                "run.add_curvature_source(model, loss_fn, train_loader) first (in a new process: "
                "run.watch(model); run.initialize_from_log(); then add_curvature_source).")
        self.curvature = ProjectedCurvature(source, self.modules, gauss_newton)
        self.source, self.damping, self.relative_damping = source, damping, relative_damping
        self.damping_rule = damping_rules.describe(damping, relative_damping)
        self.reader, self.block_rows, self.progress = reader, block_rows, progress
        self._train_energy: Optional[Dict[str, float]] = None
        self._dampings: Dict[str, float] = {}
        self.diagnostics: dict = {}

    def apply(self, rows: Tensor) -> Tensor:
        """queries [n, dim] -> (M H M^T + lambda I)^-1 queries (float64 solve)."""
        if rows.shape[0] == 0:
            return rows
        estimate = self._resolve_dampings(rows)
        damping = torch.cat([torch.full((m.dim,), self._dampings[m.name], dtype=torch.float64)
                             for m in self.modules])
        passes = self.curvature.passes
        b = rows.double()
        blocks = [b[i:i + self.source.query_block]
                  for i in range(0, b.shape[0], self.source.query_block)]
        solutions, iterations, residuals, final = [], [], [], []
        for block in blocks:
            x, info = conjugate_gradient(lambda v: self.curvature(v) + damping * v, block,
                                         self.source.tol, self.source.max_iterations,
                                         self.progress, f"hessian={self.kind!r}",
                                         self._dampings, self.kind == "ggn")
            solutions.append(x)
            iterations.append(info["iterations"])
            residuals.append(info["residuals"])
            final.extend(info["final_residuals"])
        converged = all(r <= self.source.tol * DRIFT for r in final) and \
            all(r[-1] <= self.source.tol for r in residuals)
        self.diagnostics = {"method": "cg", "iterations": iterations, "residuals": residuals,
                            "final_residuals": final, "converged": converged,
                            "tol": self.source.tol,
                            "passes": self.curvature.passes - passes, **estimate}
        if not converged:
            worst = max(max(final), max(r[-1] for r in residuals))
            message = (f"hessian={self.kind!r}: conjugate gradients stopped with relative "
                       f"residual {worst:.3g} > tol {self.source.tol:g} after "
                       f"{max(iterations)} iterations (residuals per block and iteration in "
                       "meta['solver'] with allow_unconverged=True). Pass a larger "
                       "max_iterations or a looser tol to add_curvature_source (in float32 "
                       "the reachable residual is about 1e-7 x the condition number of "
                       "M H M^T + damping I), or a larger damping to the query.")
            if not self.source.allow_unconverged:
                raise UsageError(message)
            warnings.warn(message, stacklevel=3)
        return torch.cat(solutions).to(rows.dtype)

    def _resolve_dampings(self, queries: Tensor) -> dict:
        """Per module damping: absolute when given, else from the moments of M H M^T
        (`_moments`): the trace of its diagonal block for the relative rule; for auto also tr
        over the module's rows of (M H M^T)^2, i.e. the squared norm of those rows, cross-module
        blocks included (the solve is joint), and the mean squared norm of the module's part of
        these queries and of the logged rows (damping.model_auto); returns what meta reports."""
        if isinstance(self.damping, (int, float)):
            self._dampings = {m.name: float(self.damping) for m in self.modules}
            return {}
        moments, how = self._moments()
        report: dict = {"moments": how}
        if damping_rules.rule(self.damping, self.relative_damping) == damping_rules.AUTO:
            train = self._train_energies()
            query = {m.name: float(queries[:, m.columns].double().square().sum(1).mean())
                     for m in self.modules}
            self._dampings = {name: damping_rules.model_auto(*moments[name], query[name],
                                                             train[name])
                              for name in moments}
            report["query_to_train"] = {name: query[name] / train[name] if train[name] > 0
                                        else float("inf") for name in moments}
        else:
            self._dampings = {m.name: damping_rules.from_moments(
                self.damping, self.relative_damping, m.dim, *moments[m.name])
                for m in self.modules}
        bad = {name: value for name, value in self._dampings.items() if not value > 0}
        if bad:
            raise UsageError(
                f"hessian={self.kind!r}: the {self.damping_rule} damping rule gives {bad}: that "
                "module's curvature (or its logged rows) is zero or has a negative trace. Zero: "
                "the curvature vanishes (for 'ggn', loss_fn must take the model's outputs; a "
                "loss computed inside forward= leaves no output curvature). Negative: the "
                "Hessian is indefinite there (use hessian='ggn'). Or pass an absolute damping "
                "> 0.")
        return report

    def _train_energies(self) -> Dict[str, float]:
        """Per module, the mean squared norm of the logged training rows (one pass over the
        rows, once per solver)."""
        if self._train_energy is None:
            reader = self.reader()
            totals = torch.zeros(len(self.modules), dtype=torch.float64)
            for _, rows in reader.fixed_blocks(self.block_rows):
                rows = rows.double()
                totals += torch.stack([rows[:, m.columns].square().sum() for m in self.modules])
            count = max(reader.rows, 1)
            self._train_energy = {m.name: float(t) / count for m, t in zip(self.modules, totals)}
        return self._train_energy

    def _moments(self) -> Tuple[Dict[str, Tuple[float, float]], Dict[str, str]]:
        """Per module (tr of its diagonal block of M H M^T, squared norm of its columns = of its
        rows), and how each was found: from that module's unit vectors when it has at most
        EXACT_DIM numbers, else from PROBES seeded Rademacher vectors supported on the module
        (so other modules add no noise to its trace). Products in blocks of `query_block`
        vectors, one pass over the loader each."""
        dim = sum(m.dim for m in self.modules)
        generator = torch.Generator().manual_seed(0)
        probes, owners, how = [], [], {}
        for index, m in enumerate(self.modules):
            if m.dim <= EXACT_DIM:
                local, how[m.name] = torch.eye(m.dim, dtype=torch.float64), "exact"
            else:
                local = torch.randint(0, 2, (PROBES, m.dim), generator=generator).double() * 2 - 1
                how[m.name] = f"hutchinson({PROBES})"
            block = torch.zeros(local.shape[0], dim, dtype=torch.float64)
            block[:, m.columns] = local
            probes.append(block)
            owners.extend([index] * local.shape[0])
        probes = torch.cat(probes)
        step = self.source.query_block
        products = torch.cat([self.curvature(probes[i:i + step])
                              for i in range(0, probes.shape[0], step)])
        owners = torch.tensor(owners)
        moments = {}
        for index, m in enumerate(self.modules):
            mine = owners == index
            scale = 1 if how[m.name] == "exact" else 1 / int(mine.sum())
            trace = float((probes[mine] * products[mine]).sum()) * scale
            moments[m.name] = (trace, float(products[mine].square().sum()) * scale)
        return moments, how


def conjugate_gradient(product: Callable[[Tensor], Tensor], b: Tensor, tol: float,
                       max_iterations: int, progress: bool, what: str,
                       dampings: Dict[str, float], gauss_newton: bool = False):
    """x = A^-1 b for each row of b [k, n] (A symmetric positive definite), CG on every row at
    once; product(v) = A v for v [k', n]. Rows stop once their relative residual is at most
    `tol`. Raises UsageError at a direction p with p^T A p <= 0. Returns (x, {"iterations",
    "residuals" (max over the rows still iterating, per iteration), "final_residuals" (per row,
    ||b - A x|| / ||b|| recomputed at the end)})."""
    norms = b.norm(dim=1)
    scale = norms.clamp_min(torch.finfo(b.dtype).tiny)
    x, r = torch.zeros_like(b), b.clone()
    p, rs = r.clone(), (r * r).sum(1)
    active = norms > 0
    residuals: List[float] = [1.0 if bool(active.any()) else 0.0]
    iteration = 0
    for iteration in track(range(1, max_iterations + 1), max_iterations, "CG", progress):
        if not bool(active.any()):
            iteration -= 1
            break
        idx = active.nonzero().squeeze(1)
        pa = p[idx]
        ap = product(pa)
        curvature = (pa * ap).sum(1)
        if not bool((curvature > 0).all()):
            cause = ("the Gauss-Newton matrix is only positive semi-definite, so too little "
                     "damping leaves its null directions singular (or, in round-off, negative): "
                     "use damping='auto' or" if gauss_newton else
                     "the model's Hessian is indefinite here, and (H + damping I)^-1 would not be "
                     "an influence. Use hessian='ggn' (positive semi-definite for a loss convex "
                     "in the outputs), or")
            worst = int(curvature.argmin())
            quotient = float(curvature[worst] / (pa[worst] * pa[worst]).sum())
            raise UsageError(
                f"{what}: the damped curvature is not positive definite (p^T A p = "
                f"{float(curvature[worst]):.3g}, Rayleigh quotient {quotient:.3g}, at CG "
                f"iteration {iteration}; dampings {dampings}): {cause} a damping above "
                f"{max(dampings.values(), default=0.0) - quotient:.3g}.")
        alpha = rs[idx] / curvature
        x[idx] += alpha[:, None] * pa
        r[idx] -= alpha[:, None] * ap
        new = (r[idx] * r[idx]).sum(1)
        p[idx] = r[idx] + (new / rs[idx])[:, None] * pa
        rs[idx] = new
        relative = rs.sqrt() / scale
        residuals.append(float(relative[idx].max()))
        active = active & (relative > tol)
    final = ((b - product(x)).norm(dim=1) / scale).where(norms > 0, torch.zeros_like(norms))
    return x, {"iterations": iteration, "residuals": residuals,
               "final_residuals": [float(v) for v in final]}


def watched_weights(model: nn.Module, tracked: Dict, projections: Dict[str, Projection]
                    ) -> Dict[str, WatchedWeights]:
    """{layer name: WatchedWeights} of the run's tracked layers (TrackedModule: `module`,
    `has_bias`, `as_matrix`), their parameters found in `model` by identity."""
    names = {id(p): n for n, p in model.named_parameters()}
    layers = {}
    for name, layer in tracked.items():
        params = [layer.module.weight] + ([layer.module.bias] if layer.has_bias else [])
        missing = [p for p in params if id(p) not in names]
        if missing:
            raise UsageError(f"Layer {name!r} is watched by the run but its parameters are not "
                             "in the model passed to add_curvature_source: pass the watched "
                             "model itself.")
        if not all(p.requires_grad for p in params):
            raise UsageError(f"Layer {name!r}'s parameters do not require grad, so the "
                             "Hessian with respect to them is not defined here: watch only "
                             "trainable layers.")
        layers[name] = WatchedWeights(tuple(names[id(p)] for p in params), layer.as_matrix,
                                      projections[name])
    return layers


def _layer(source: CurvatureSource, module) -> WatchedWeights:
    layer = source.layers.get(module.name)
    if layer is None:
        raise UsageError(f"The curvature source has no layer {module.name!r} of the log: call "
                         "add_curvature_source on the run that watches the logged layers.")
    if layer.projection.rank_in != module.rank_in or layer.projection.rank_out != module.rank_out:
        raise UsageError(f"Layer {module.name!r}: the curvature source's projection is "
                         f"{layer.projection.rank_out} x {layer.projection.rank_in}, the log's "
                         f"{module.rank_out} x {module.rank_in}: call run.initialize_from_log() "
                         "before add_curvature_source.")
    return layer


def _t(matrix: Tensor) -> Tensor:
    return matrix.transpose(-1, -2)


def _batch_size(batch) -> int:
    """Examples in a batch: the leading size of its first tensor."""
    if isinstance(batch, Tensor):
        return batch.shape[0] if batch.dim() else 1
    items = batch.values() if isinstance(batch, dict) else \
        batch if isinstance(batch, (list, tuple)) else ()
    for item in items:
        if isinstance(item, (Tensor, dict, list, tuple)):
            return _batch_size(item)
    raise UsageError(f"Cannot tell how many examples a {type(batch).__name__} batch holds: the "
                     "curvature source's loader must yield tensors, or tuples / lists / dicts "
                     "whose first tensor is batched along dim 0.")

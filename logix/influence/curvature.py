"""Curvature kinds: what each needs while logging, how it is fitted, and how it inverts.

Every kind is one subclass, registered by name:

    class KFAC(Curvature, name="kfac"):
        covariances = (FORWARD, BACKWARD)
        ...

Configuration, the scheduler, the integrations' arguments, influence queries and SOURCE all read
this table; a new kind is one new class here (plus its tests).
"""

from __future__ import annotations

from typing import Callable, ClassVar, Dict, Iterable, List, Optional, Tuple, Type

import torch
from torch import Tensor

from logix import distributed
from logix.errors import UsageError
from logix.influence.gather import own_part
from logix.influence.preconditioner import ModuleInverse, Preconditioner, resolve_damping
from logix.statistics.covariance import (BACKWARD, EKFAC_PEAK, FORWARD, GRAD, GRAD_PEAK,
                                        OPTIMIZER_IN, OPTIMIZER_OUT, CovarianceState)
from logix.statistics.eigen import EKFAC as EKFAC_STATISTIC
from logix.statistics.eigen import Eigen, eigh64, fit_ekfac
from logix.progress import track

AUTO = "auto"
# What `auto` picks, best first, among the kinds the statistics allow: the order of the LDS
# measured by benchmarks/quality.py (docs/concepts.md, "Defaults").
AUTO_ORDER = ("ekfac", "kfac", "raw", "none")
# Above this share of a module's empirical Fisher carried by one example, queries warn
# (docs/concepts.md, "When one example dominates the Fisher").
CONCENTRATED = 0.5


class Curvature:
    """One curvature kind. Subclass with `class X(Curvature, name="x")` to register it."""

    name: ClassVar[str]
    covariances: ClassVar[Tuple[str, ...]] = ()  # collected during the logging pass
    needs_rows: ClassVar[bool] = False  # fitted from the saved rows after logging
    identity: ClassVar[bool] = False  # H = 0 without damping: scores are plain dot products
    _kinds: ClassVar[Dict[str, Type["Curvature"]]] = {}

    def __init_subclass__(cls, name: str, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.spectrum.__func__ is Curvature.spectrum.__func__ and \
                cls.query_solver.__func__ is Curvature.query_solver.__func__:
            raise TypeError(f"Curvature kind {name!r} must define spectrum() or query_solver().")
        cls.name = name
        Curvature._kinds[name] = cls

    @classmethod
    def setup_spec(cls) -> Dict[str, List[str]]:
        """What `run.setup` must collect during the logging pass for this kind."""
        spec: Dict[str, List[str]] = {}
        for kind in cls.covariances:
            spec.setdefault(kind, []).append("covariance")
        return spec

    @classmethod
    def checkpoint_statistics(cls) -> Tuple[str, ...]:
        """What SOURCE averages over a segment's checkpoints for this kind (empty: SOURCE
        cannot use it)."""
        return cls.covariances

    @classmethod
    def how_to_collect(cls) -> str:
        """The call that gives a log (or a checkpoint block) this kind's statistics."""
        return f"run.setup({cls.setup_spec()})"

    @classmethod
    def collected(cls, statistics: CovarianceState, modules: Iterable[str]) -> bool:
        """Whether every module has the covariances this kind is built from."""
        modules = list(modules)
        return bool(modules) and all(statistics.get(m, kind) is not None
                                     for m in modules for kind in cls.covariances)

    @classmethod
    def fitted(cls, statistics: CovarianceState) -> bool:
        """Whether what is fitted after logging (if anything) is in `statistics`."""
        return True

    @classmethod
    def ready(cls, statistics: CovarianceState, modules: List[str],
              has_rows: Callable[[], bool]) -> bool:
        """Whether queries can use this kind: its covariances collected, and what is fitted
        from the rows fitted (or rows to fit it from)."""
        if cls.covariances and not cls.collected(statistics, modules):
            return False
        return not cls.needs_rows or cls.fitted(statistics) or has_rows()

    @classmethod
    def fit(cls, statistics: CovarianceState, spectra: "Spectra", blocks, modules,
            reduce: Optional[Callable] = None) -> None:
        """Fit from saved rows (`blocks` of (ids, rows)); kinds that need no rows do nothing."""

    @classmethod
    def concentration(cls, module: str, statistics: CovarianceState) -> Optional[float]:
        """The share of the module's empirical Fisher (its trace) that its largest single
        example carries, for the kinds built from it and logs that recorded it; else None."""
        return None

    @classmethod
    def spectrum(cls, module: str, spectra: "Spectra") -> ModuleInverse:
        """The module's curvature as an eigendecomposition, undamped (every kind defines it)."""
        ...

    @classmethod
    def query_solver(cls, reader, modules, settings, progress: bool = True, source=None
                     ) -> Optional[Preconditioner]:
        """For a kind that is not one eigendecomposition per module: a Preconditioner that
        applies (H + lambda I)^-1 (lissa, hessian, ggn: a solve per query; full: one inverse
        across modules) (reader: a function returning the log's LogReader; settings: the
        query's InfluenceConfig; source: the CurvatureSource of `run.add_curvature_source`, or
        None). None (the default) for kinds with a spectrum."""
        return None

    @classmethod
    def inverse(cls, module: str, spectra: "Spectra", damping,
                relative_damping: Optional[float]) -> ModuleInverse:
        """(H + lambda I)^-1 for one module; lambda from `damping` and `relative_damping` by
        logix.influence.damping (auto, relative or absolute)."""
        spec = cls.spectrum(module, spectra)
        if spec.values is None:
            return spec
        return ModuleInverse(spec.kind, resolve_damping(spec.values, damping, relative_damping),
                             values=spec.values, vectors=spec.vectors, q_out=spec.q_out,
                             q_in=spec.q_in)


class NoCurvature(Curvature, name="none"):
    """H = 0 and no damping: plain gradient dot products."""

    identity = True

    @classmethod
    def spectrum(cls, module: str, spectra: "Spectra") -> ModuleInverse:
        return ModuleInverse("none", 0.0)


class Raw(Curvature, name="raw"):
    """H = C, the full covariance of the projected per-example gradients."""

    covariances = (GRAD,)

    @classmethod
    def spectrum(cls, module: str, spectra: "Spectra") -> ModuleInverse:
        eig = spectra.eig(module, GRAD)
        return ModuleInverse("raw", 0.0, values=eig.values, vectors=eig.vectors)

    @classmethod
    def concentration(cls, module: str, statistics: CovarianceState) -> Optional[float]:
        total = statistics.total(module, GRAD)
        return _share(statistics.total(module, GRAD_PEAK),
                      None if total is None else total.diagonal().sum())


class KFAC(Curvature, name="kfac"):
    """H = A (x) S, the forward and backward covariances, in their Kronecker eigenbasis."""

    covariances = (FORWARD, BACKWARD)

    @classmethod
    def spectrum(cls, module: str, spectra: "Spectra") -> ModuleInverse:
        forward, backward = spectra.eig(module, FORWARD), spectra.eig(module, BACKWARD)
        return ModuleInverse("kfac", 0.0, values=torch.outer(backward.values, forward.values),
                             q_out=backward.vectors, q_in=forward.vectors)


class EKFAC(KFAC, name="ekfac"):
    """K-FAC's eigenbasis with eigenvalues refitted from the saved per-example rows."""

    needs_rows = True

    @classmethod
    def fitted(cls, statistics: CovarianceState) -> bool:
        return statistics.has(EKFAC_STATISTIC)

    @classmethod
    def fit(cls, statistics: CovarianceState, spectra: "Spectra", blocks, modules,
            reduce: Optional[Callable] = None) -> None:
        bases = {m.name: (spectra.eig(m.name, BACKWARD).vectors,
                          spectra.eig(m.name, FORWARD).vectors) for m in modules}
        sums, peaks, count = fit_ekfac(blocks, modules, bases)
        if reduce is not None:
            sums, count = reduce(sums, count)
            for name in sorted(peaks):
                distributed.all_reduce_max(peaks[name])
        statistics.drop(EKFAC_STATISTIC)
        statistics.drop(EKFAC_PEAK)
        for name, total in sums.items():
            statistics.accumulate(name, EKFAC_STATISTIC, total, count)
            statistics.raise_peak(name, EKFAC_PEAK, peaks[name])

    @classmethod
    def concentration(cls, module: str, statistics: CovarianceState) -> Optional[float]:
        total = statistics.total(module, EKFAC_STATISTIC)
        return _share(statistics.total(module, EKFAC_PEAK),
                      None if total is None else total.sum())

    @classmethod
    def spectrum(cls, module: str, spectra: "Spectra") -> ModuleInverse:
        kfac = KFAC.spectrum(module, spectra)
        corrected = spectra.statistics.get(module, EKFAC_STATISTIC)
        if corrected is None:
            raise UsageError(f"No EK-FAC eigenvalues for module {module!r}: they are fitted from "
                             "the saved rows (run.finalize() does it when rows were saved).")
        return ModuleInverse("ekfac", 0.0, values=corrected.double(), q_out=kfac.q_out,
                             q_in=kfac.q_in)


class LiSSA(Curvature, name="lissa"):
    """H = the empirical Fisher of the saved rows, per module, never formed: each query solves
    (F + lambda I) x = g_q by conjugate gradients (or the LiSSA recursion), one streaming pass
    over the rows per step (logix.influence.lissa). Scores in mode 'dot' only (no train-side
    inverse)."""

    needs_rows = True

    @classmethod
    def fitted(cls, statistics: CovarianceState) -> bool:
        return False  # nothing to fit: the rows themselves are the curvature

    @classmethod
    def query_solver(cls, reader, modules, settings, progress: bool = True,
                     source=None) -> Preconditioner:
        from logix.influence.lissa import LissaPreconditioner

        return LissaPreconditioner(reader(), modules, settings.damping, settings.relative_damping,
                                   settings.lissa_depth, settings.lissa_scale,
                                   settings.lissa_tol, settings.block_rows, progress,
                                   settings.lissa_solver)


class Full(Curvature, name="full"):
    """H = the empirical Fisher of the saved rows across every module (whole rows, cross-layer
    blocks included), formed in one streaming pass and eigendecomposed once per log
    (logix.influence.full); rows of at most full.MAX_WIDTH numbers. Influence groups split the
    total score by the training rows' modules (mode 'dot' only)."""

    needs_rows = True

    @classmethod
    def fitted(cls, statistics: CovarianceState) -> bool:
        return False  # formed from the rows at the first query, cached in that process

    @classmethod
    def query_solver(cls, reader, modules, settings, progress: bool = True,
                     source=None) -> Preconditioner:
        from logix.influence.full import full_preconditioner

        return full_preconditioner(reader(), modules, settings.damping,
                                   settings.relative_damping, settings.block_rows, progress)


class OptimizerState(Curvature, name="optimizer"):
    """H = sqrt(v), the diagonal curvature Adam, AdamW and Adafactor divide their updates by,
    factored per layer into out (x) in as Adafactor does and projected like K-FAC's covariances
    (logix.tracking.optimizer_state). Nothing is collected while logging: the factors come from
    the optimizer, `run.add_optimizer_state(optimizer)` (inside each checkpoint block for
    SOURCE: each segment's factors from the optimizer state at its checkpoints)."""

    @classmethod
    def checkpoint_statistics(cls) -> Tuple[str, ...]:
        return (OPTIMIZER_OUT, OPTIMIZER_IN)

    @classmethod
    def how_to_collect(cls) -> str:
        return "run.add_optimizer_state(optimizer)"

    @classmethod
    def ready(cls, statistics: CovarianceState, modules: List[str],
              has_rows: Callable[[], bool]) -> bool:
        return bool(modules) and all(statistics.get(m, kind) is not None for m in modules
                                     for kind in (OPTIMIZER_OUT, OPTIMIZER_IN))

    @classmethod
    def spectrum(cls, module: str, spectra: "Spectra") -> ModuleInverse:
        if spectra.statistics.get(module, OPTIMIZER_OUT) is None:
            raise UsageError(f"No optimizer state for module {module!r}: hessian='optimizer' "
                             "needs run.add_optimizer_state(optimizer) (Adam, AdamW or "
                             "Adafactor, after training) on the run that watches the model.")
        out, inp = spectra.eig(module, OPTIMIZER_OUT), spectra.eig(module, OPTIMIZER_IN)
        return ModuleInverse("optimizer", 0.0, values=torch.outer(out.values, inp.values),
                             q_out=out.vectors, q_in=inp.vectors)


class Hessian(Curvature, name="hessian"):
    """H = the Hessian of the mean training loss with respect to the watched layers' weights,
    jointly over every layer, in the log's projected space (M H M^T), never formed: each block
    of queries solves (M H M^T + lambda I) x = g_q by conjugate gradients with Hessian-vector
    products over the training loader of `run.add_curvature_source(model, loss_fn, loader)`
    (logix.influence.hessian). Can be indefinite (then refused). Scores in mode 'dot' only."""

    gauss_newton: ClassVar[bool] = False

    @classmethod
    def ready(cls, statistics: CovarianceState, modules: List[str],
              has_rows: Callable[[], bool]) -> bool:
        return False  # nothing on disk makes it: it needs the model (add_curvature_source)

    @classmethod
    def query_solver(cls, reader, modules, settings, progress: bool = True,
                     source=None) -> Preconditioner:
        from logix.influence.hessian import HessianSolve

        return HessianSolve(cls.name, source, modules, settings.damping,
                            settings.relative_damping, cls.gauss_newton, reader,
                            settings.block_rows, progress)


class GaussNewton(Hessian, name="ggn"):
    """H = the generalized Gauss-Newton matrix J^T H_out J of the mean training loss (positive
    semi-definite for a loss convex in the outputs), solved like ``hessian``."""

    gauss_newton = True


class Spectra:
    """Eigendecompositions of one CovarianceState's covariances, computed once per version."""

    def __init__(self, statistics: CovarianceState) -> None:
        self.statistics = statistics
        self._cache: Dict[Tuple[str, str], Eigen] = {}
        self._version = statistics.version

    def eig(self, module: str, kind: str) -> Eigen:
        if self.statistics.version != self._version:
            self._cache.clear()
            self._version = self.statistics.version
        key = (module, kind)
        if key not in self._cache:
            cov = self.statistics.get(module, kind)
            if cov is None:
                raise UsageError(missing_statistics(module, kind))
            self._cache[key] = eigh64(cov)
        return self._cache[key]


def fit(name: str, statistics: CovarianceState, reader, block_rows: int,
        progress: bool = True) -> None:
    """Fit what kind `name` takes from the saved rows of `reader` into `statistics` (EK-FAC: one
    streaming pass); kinds that need no rows do nothing. Under torch.distributed each rank reads
    its own shards and the sums are reduced."""
    kind = get(name)
    if not kind.needs_rows:
        return
    if reader.rows == 0:
        raise UsageError(f"hessian={name!r} is fitted from saved training logs, and this project "
                         "has none: log with run.save(True) and setup({'grad': ['log'], "
                         "'forward': ['covariance'], 'backward': ['covariance']}).")
    part = own_part(reader) if distributed.is_distributed() else reader
    blocks = track(part.fixed_blocks(block_rows), -(-part.rows // block_rows),
                   f"Fitting {name}", progress)
    kind.fit(statistics, Spectra(statistics), blocks, reader.manifest.modules,
             reduce=_reduce_sums)


def _share(peak: Optional[Tensor], total: Optional[Tensor]) -> Optional[float]:
    """peak / total, or None when either was not recorded (logs from before the diagnostic)."""
    if peak is None or total is None or float(total) <= 0:
        return None
    return float(peak) / float(total)


def _reduce_sums(sums: Dict[str, Tensor], count: int):
    for module in sorted(sums):
        distributed.all_reduce_sum(sums[module])
    total = distributed.all_reduce_sum(torch.tensor([float(count)], dtype=torch.float64))
    return sums, int(total)


def names() -> Tuple[str, ...]:
    """Every registered kind, in registration order."""
    return tuple(Curvature._kinds)


def get(name: str) -> Type[Curvature]:
    """The kind called `name`; a UsageError lists the allowed names."""
    kind = Curvature._kinds.get(name)
    if kind is None:
        raise UsageError(f"hessian={name!r} is not supported; allowed values: "
                         f"{[AUTO, *names()]}.")
    return kind


def check(name: str, allow_auto: bool = True) -> str:
    """`name` when it is a registered kind (or 'auto'), else a UsageError."""
    if not (allow_auto and name == AUTO):
        get(name)
    return name


def available(statistics: CovarianceState, modules: Iterable[str], has_rows: Callable[[], bool]
              ) -> List[str]:
    """The kinds whose statistics are present, in registration order."""
    modules = list(modules)
    return [name for name, kind in Curvature._kinds.items()
            if kind.ready(statistics, modules, has_rows)]


def fitted_after_logging(collected: Iterable[str]) -> List[str]:
    """The kinds a logging run fits from its saved rows at finalize: those with a `fit` whose
    covariances were all collected (EK-FAC's eigenvalues when forward and backward were)."""
    return [name for name, kind in Curvature._kinds.items()
            if kind.needs_rows and kind.fit.__func__ is not Curvature.fit.__func__
            and set(kind.covariances) <= set(collected)]


def pick_auto(kinds: List[str]) -> str:
    """What 'auto' means given the available kinds."""
    return next(k for k in AUTO_ORDER if k in kinds)


def pick_auto_for(kinds: List[str], statistics: CovarianceState, modules: List[str]
                  ) -> Tuple[str, Dict[str, float]]:
    """(kind, shares): `pick_auto`'s kind, except K-FAC when one example dominates the empirical
    Fisher of the kind it would pick (raw or ekfac) and K-FAC's factors were collected; shares
    are that kind's concentrated modules (empty when nothing was avoided)."""
    name = pick_auto(kinds)
    if "kfac" not in kinds:
        return name, {}
    shares = concentrated(name, statistics, modules)
    return ("kfac", shares) if shares else (name, {})


def concentrated(name: str, statistics: CovarianceState, modules: Iterable[str]
                 ) -> Dict[str, float]:
    """The modules whose empirical Fisher (as kind `name` uses it) one example dominates:
    module -> that example's share of the trace, where over CONCENTRATED."""
    shares = {m: get(name).concentration(m, statistics) for m in modules}
    return {m: share for m, share in shares.items()
            if share is not None and share > CONCENTRATED}


def concentration_warning(name: str, shares: Dict[str, float]) -> str:
    listed = ", ".join(f"{m!r} ({share:.1%})" for m, share in shares.items())
    return (f"hessian={name!r}: one training example carries more than {CONCENTRATED:.0%} of "
            f"the empirical Fisher of {listed}: the empirical Fisher of this layer is dominated "
            "by one example (the model fits its training data almost perfectly); "
            "hessian='kfac' or a plain dot product (hessian='none') is safer here "
            "(docs/concepts.md, 'When one example dominates the Fisher').")


def missing_statistics(module: str, kind: str) -> str:
    need = {k: c.setup_spec() for c in Curvature._kinds.values() for k in c.covariances}[kind]
    return (f"No {kind} covariance for module {module!r}: this preconditioner needs run.setup("
            f"{need}) during the logging pass, then run.finalize(). Or pass hessian='none'.")

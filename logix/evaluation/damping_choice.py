"""Choosing the damping on the user's own model: the LDS of a grid of dampings, measured on a
few retrainings. `damping="auto"` picks one without retraining, but no retraining-free rule we
measured stays within 0.02 LDS of the best damping on every case (docs/concepts.md,
"Damping"); this is how to check, and tune, for a model small enough to retrain 20 times."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Union

import torch

from logix.errors import UsageError
from logix.progress import progress_bar
from logix.storage.data_ids import normalize_data_ids
from logix.storage.format import atomic_file

from .align import align_scores
from .lds import lds, linear_datamodeling_score

GRID_STEPS = range(-6, 5)  # the default grid: auto's typical damping x 10^(k/2), 0.001x .. 100x
BOOTSTRAP = 200  # resamples of the subsets behind `spread`
AUTO = "auto"
NOT_PREDICTIVE = ("the scores predict the retrained outputs at no damping, so none is chosen; "
                  "check that train_ids are in the order train_fn indexes the examples and "
                  "that eval_fn measures the logged queries")
QUERIES_FILE = "choose_damping_queries.json"  # in cache_dir, beside the LDS cache


@dataclass
class DampingChoice:
    """What `choose_damping` measured, per candidate ("auto", whose per-module values are
    `auto_damping`, then each number of the grid): `lds[d]`, the LDS with `damping=d` on the
    retrained subsets, and `spread[d]`, its standard deviation over bootstrap resamples of
    those subsets (how much the measurement itself moves). `best`: the candidate with the
    highest LDS, what to pass as `damping=` when `best_is_above_noise` (else no damping's
    scores predict the retrained outputs, and choose_damping warns). `refused`: candidates the
    curvature refused (e.g. a solve that does not converge at a tiny damping), with the reason;
    their LDS is NaN.
    `bootstrap[d]`: the LDS of each bootstrap resample (the same resamples for every
    candidate, so two candidates' difference is measured pair by pair)."""

    best: Union[str, float]
    lds: Dict[Union[str, float], float]
    spread: Dict[Union[str, float], float]
    auto_damping: Any = field(repr=False)
    n_subsets: int = 0
    seeds: Sequence[int] = ()
    refused: Dict[float, str] = field(default_factory=dict)
    bootstrap: Dict[Union[str, float], torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def gap_spread(self) -> float:
        """The bootstrap std of LDS(best) - LDS(auto), resample by resample: both are measured
        on the same subsets, so most of each one's own spread cancels in their difference."""
        gap = self.bootstrap[self.best] - self.bootstrap[AUTO]
        gap = gap[~gap.isnan()]
        return float(gap.std()) if len(gap) > 1 else math.nan

    @property
    def auto_is_within_noise(self) -> bool:
        """Whether auto's LDS is within two deviations of the best candidate's, the deviation
        of their paired difference (`gap_spread`)."""
        if self.best == AUTO:
            return True
        return self.lds[AUTO] >= self.lds[self.best] - 2 * self.gap_spread

    @property
    def best_is_above_noise(self) -> bool:
        """Whether the best candidate's LDS is more than two bootstrap deviations above 0:
        otherwise the scores do not predict the retrained outputs at any damping."""
        return self.lds[self.best] > 2 * self.spread[self.best]

    def _auto_range(self) -> str:
        found = sorted(_numbers(self.auto_damping))
        if not found:
            return "none"
        low, high = f"{found[0]:.3g}", f"{found[-1]:.3g}"
        return low if low == high else f"{low} to {high} across modules"

    def __str__(self) -> str:
        lines = [f"LDS over {self.n_subsets} retrained subsets (seeds {list(self.seeds)}), "
                 "+- bootstrap std over subsets:"]
        for damping, value in self.lds.items():
            name = damping if isinstance(damping, str) else f"{damping:.3g}"
            mark = "  <- best" if damping == self.best else ""
            if damping in self.refused:
                lines.append(f"  {name:<9s} refused: {self.refused[damping]}")
                continue
            used = f"  (damping {self._auto_range()})" if damping == AUTO else ""
            lines.append(f"  {name:<9s} {value:+.3f} +- {self.spread[damping]:.3f}{mark}{used}")
        if not self.best_is_above_noise:
            verdict = (f"no candidate's LDS is clearly above 0 (the best: "
                       f"{self.lds[self.best]:+.3f} +- {self.spread[self.best]:.3f}): "
                       f"{NOT_PREDICTIVE}")
        elif self.best == AUTO:
            verdict = "auto is the best: keep damping='auto'"
        else:
            gap = (f"{self.lds[self.best] - self.lds[AUTO]:.3f} below the best, +- "
                   f"{self.gap_spread:.3f} paired bootstrap std")
            noise = " (within the noise of these subsets)" if self.auto_is_within_noise else ""
            verdict = f"pass damping={self.best:.6g}: auto is {gap}{noise}"
        return "\n".join(lines + [verdict])


def choose_damping(run, query, train_fn: Callable[[torch.Tensor, int], Any],
                   eval_fn: Callable[[Any], torch.Tensor], train_ids: Sequence, *,
                   dampings: Optional[Sequence[float]] = None, hessian: Optional[str] = None,
                   n_subsets: int = 20, seeds: Sequence[int] = (1,), fraction: float = 0.5,
                   outputs_are: str = "loss", cache_dir=None,
                   progress: bool = True) -> DampingChoice:
    """The LDS of each damping in a grid (and of "auto") for these queries, from `n_subsets`
    retrainings (`train_fn(indices, seed)` on each half subset, `eval_fn(model)` the queries'
    outputs; as in `linear_datamodeling_score`, whose cache `cache_dir` is). `run` scores with
    `run.compute_influence_all(query, hessian=hessian, damping=d)`; `train_ids` are the data ids
    of every logged training example, each once, in the order `train_fn` indexes them
    (`range(n)` when the ids were the dataset positions).

    The grid defaults to 11 values from 0.001x to 100x the geometric mean of auto's per-module
    dampings. Retrain with seeds other than the attributed run's: the LDS asks how models
    trained from a new initialisation respond. On benchmarks/damping_choice.py (12 cases, the
    log's curvature and ggn, full and random-8 rows) the best of 20 subsets was within 0.02 LDS
    of the best of a larger evaluation (3 other seeds x 50 subsets) on 41 of 46 settings, auto
    on 23 (docs/evaluation.md); 10 subsets pick more noisily (34 of 46).

    `cache_dir` remembers the queries' data ids and refuses other queries, but it cannot tell
    whether `train_fn` or `eval_fn` changed: use a new folder when they do."""
    if not hasattr(run, "compute_influence_all"):
        raise UsageError(f"run must be a logix Run (with compute_influence_all), got "
                         f"{type(run).__name__}.")
    _check_arguments(n_subsets, seeds, train_ids)
    seeds = tuple(seeds)
    dampings = None if dampings is None else _check_dampings(dampings)

    def influence(damping):
        return run.compute_influence_all(query, hessian=hessian, damping=damping,
                                         progress=False)

    auto_result = influence(AUTO)
    _check_train_ids(train_ids, auto_result["tgt_ids"])
    auto_scores = align_scores(auto_result, train_ids)
    auto_damping = auto_result["meta"].get("damping")
    if dampings is None:
        dampings = default_grid(auto_damping)
    if cache_dir is not None:
        _check_cache_queries(cache_dir, auto_result["src_ids"])
    retrained = linear_datamodeling_score(train_fn, eval_fn, auto_scores, n_subsets=n_subsets,
                                          fraction=fraction, seeds=seeds, cache_dir=cache_dir,
                                          outputs_are=outputs_are, progress=progress)
    masks, outputs = retrained["subset_masks"], retrained["subset_outputs"]
    resamples = torch.randint(0, n_subsets, (BOOTSTRAP, n_subsets),
                              generator=torch.Generator().manual_seed(0))
    picks = torch.nn.functional.one_hot(resamples, n_subsets).bool()  # [B, K, K]
    every = torch.eye(n_subsets, dtype=torch.bool)

    def measure(matrix):
        # each subset's summed scores once ([n_query, K]); the LDS and every resample pick
        # subsets (rows of the masks) from them
        sums = (masks.double() @ matrix.double().T).T
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # constant queries: NaN, left out
            value = lds(sums, every, outputs, outputs_are)["lds"]
            boots = torch.tensor([lds(sums, pick, outputs[r], outputs_are)["lds"]
                                  for pick, r in zip(picks, resamples)], dtype=torch.float64)
        defined = boots[~boots.isnan()]
        return value, float(defined.std()) if len(defined) > 1 else math.nan, boots

    values, spreads, refused, bootstrap = {}, {}, {}, {}
    values[AUTO], spreads[AUTO], bootstrap[AUTO] = measure(auto_scores)
    with progress_bar(len(dampings), "Damping grid", enabled=progress) as advance:
        for damping in dampings:
            try:
                values[damping], spreads[damping], bootstrap[damping] = \
                    measure(align_scores(influence(damping), train_ids))
            except UsageError as error:
                values[damping] = spreads[damping] = math.nan
                refused[damping] = str(error).split(". ")[0]
            advance()
    defined = {d: v for d, v in values.items() if not math.isnan(v)}
    if not defined:
        raise UsageError("the LDS is undefined at every damping: the queries' outputs (or the "
                         "predictions) do not change across the retrained subsets; check "
                         "eval_fn and train_fn.")
    best = max(defined, key=defined.get)
    choice = DampingChoice(best, values, spreads, auto_damping, n_subsets, seeds, refused,
                           bootstrap)
    if not choice.best_is_above_noise:
        warnings.warn(f"choose_damping: no candidate's LDS is clearly above 0 (the best: "
                      f"{values[best]:+.3f} +- {spreads[best]:.3f}): {NOT_PREDICTIVE}",
                      stacklevel=2)
    return choice


def default_grid(auto_damping) -> list:
    """0.001x to 100x (half-decade steps) the geometric mean of auto's per-module dampings."""
    found = [v for v in _numbers(auto_damping) if v > 0]
    if not found:
        raise UsageError("damping='auto' reported no damping for these settings (hessian "
                         "'none' uses none); pass hessian= a curvature kind, or dampings=.")
    centre = math.exp(sum(math.log(v) for v in found) / len(found))
    return [centre * 10 ** (k / 2) for k in GRID_STEPS]


def _numbers(value):
    if isinstance(value, Mapping):
        for item in value.values():
            yield from _numbers(item)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield float(value)


def _check_arguments(n_subsets, seeds, train_ids) -> None:
    if isinstance(n_subsets, bool) or not isinstance(n_subsets, int):
        raise UsageError(f"n_subsets must be an int, got {n_subsets!r}; e.g. n_subsets=20.")
    if n_subsets < 5:
        raise UsageError(f"n_subsets={n_subsets}: the LDS of fewer than 5 retrained subsets "
                         "cannot tell dampings apart; pass n_subsets >= 5 (20 recommended).")
    if isinstance(seeds, (int, str)):
        raise UsageError(f"seeds must be a sequence of ints, got {seeds!r}; e.g. seeds=(1,).")
    if isinstance(train_ids, int):
        raise UsageError(f"train_ids={train_ids} is a single id; pass the data id of every "
                         f"training example, e.g. train_ids=range({train_ids}).")


def _check_train_ids(train_ids, logged_ids) -> None:
    """train_ids must name every logged training example once: retraining on half subsets of
    fewer examples than the attributed model saw measures some other model."""
    wanted = normalize_data_ids(train_ids)
    logged = set(logged_ids)
    unknown = [i for i in wanted if i not in logged]
    left_out = sorted(logged - set(wanted), key=lambda i: (isinstance(i, str), i))
    if unknown or left_out:
        problems = []
        if unknown:
            problems.append(f"{len(unknown)} of them were not logged (e.g. {unknown[:5]})")
        if left_out:
            problems.append(f"{len(left_out)} logged examples are not among them (e.g. "
                            f"{left_out[:5]})")
        raise UsageError(f"train_ids ({len(wanted)} ids) must be the data ids of the "
                         f"{len(logged)} logged training examples, each once, in the order "
                         f"train_fn indexes them: {'; '.join(problems)}.")


def _check_cache_queries(cache_dir, query_ids) -> None:
    """The retrained outputs in cache_dir are those of one set of queries: record their ids
    on first use and refuse others (the LDS cache itself checks only their number)."""
    path = Path(cache_dir) / QUERIES_FILE
    query_ids = list(query_ids)
    if path.exists():
        stored = json.loads(path.read_text())["query_ids"]
        if stored != query_ids:
            raise UsageError(f"cache_dir {str(cache_dir)!r} holds retrainings measured for "
                             f"other queries ({len(stored)} ids, e.g. {stored[:3]}; these are "
                             f"{len(query_ids)}, e.g. {query_ids[:3]}): use another cache_dir, "
                             "or delete it.")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        f.write(json.dumps({"query_ids": query_ids}).encode())


def _check_dampings(dampings) -> list:
    if isinstance(dampings, (str, bytes)) or not isinstance(dampings, Iterable):
        raise UsageError(f"dampings must be a list of positive numbers, got {dampings!r}; "
                         "e.g. dampings=[1e-4, 1e-3], or None for the default grid.")
    dampings = [_check_damping(d) for d in dampings]
    if not dampings:
        raise UsageError("dampings=[] leaves only 'auto', with nothing to compare it to; pass "
                         "some dampings, or None for the default grid.")
    return dampings


def _check_damping(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
            or not math.isfinite(value):
        raise UsageError(f"dampings must be positive finite numbers, got {value!r}.")
    return float(value)

"""A resource plan before a long run (`run.resource_plan`, `logix plan`): per watched module and
in total, the row width and bytes, the disk a log of N examples takes, the statistics memory, a
measured step-time overhead of logging, and the largest rank that fits a disk budget.

Disk is one row per example (N x width x dtype bytes, whatever the tokens per example); the
statistics are the covariances `run.setup` collects (see `logix.statistics.budget`), in float32.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

from logix.errors import UsageError
from logix.statistics.budget import human, sizes
from logix.storage.format import DTYPES


@dataclass
class ModuleCost:
    name: str
    type: str
    shape: tuple  # (out_dim, in_dim) of the weight gradient
    rank_out: int
    rank_in: int
    width: int  # numbers in the module's part of a row
    row_bytes: int
    disk_bytes: int  # for the planned number of examples
    statistics_bytes: int


@dataclass
class ResourcePlan:
    examples: int
    tokens_per_example: int
    dtype: str
    modules: List[ModuleCost]
    buffer_bytes: int  # one shard of rows in memory
    batch_size: int = 1  # examples per timed step
    timing: Optional["StepTiming"] = None  # interleaved steps without and with the hooks
    disk_budget: Optional[int] = None
    recommended_rank: Optional[int] = None  # largest rank whose log fits disk_budget
    notes: List[str] = field(default_factory=list)

    @property
    def width(self) -> int:
        return sum(m.width for m in self.modules)

    @property
    def row_bytes(self) -> int:
        return sum(m.row_bytes for m in self.modules)

    @property
    def disk_bytes(self) -> int:
        return sum(m.disk_bytes for m in self.modules)

    @property
    def statistics_bytes(self) -> int:
        return sum(m.statistics_bytes for m in self.modules)

    @property
    def step_seconds(self) -> Optional[float]:
        """A step without logging (median of the timed steps), when measured."""
        return self.timing.plain if self.timing else None

    @property
    def logged_step_seconds(self) -> Optional[float]:
        """The same step with the hooks on (median), when measured."""
        return self.timing.logged if self.timing else None

    @property
    def overhead(self) -> Optional[float]:
        """Median over interleaved pairs of logged / plain step time - 1 (0.25 = 25% slower)."""
        return self.timing.overhead if self.timing else None

    @property
    def steps(self) -> int:
        """Steps of `batch_size` examples in one pass over `examples`."""
        return -(-self.examples // self.batch_size)

    @property
    def logging_seconds(self) -> Optional[tuple]:
        """(low, median, high) seconds of one logged pass over `examples`: the logged step's
        median and quartiles times `steps`."""
        if not self.timing:
            return None
        return tuple(self.steps * t for t in self.timing.logged_quartiles)

    def render(self) -> str:
        """The plan as a text table (what `logix plan` prints)."""
        total = f"total ({len(self.modules)} modules)"
        name = max([len(m.name) for m in self.modules] + [len(total), 6])
        lines = [f"Plan for {self.examples:,} examples x {self.tokens_per_example} tokens, "
                 f"log dtype {self.dtype}",
                 f"{'module':<{name}} {'grad shape':>12} {'rank o x i':>10} {'width':>7} "
                 f"{'row':>9} {'disk':>10} {'statistics':>10}"]
        for m in self.modules:
            lines.append(f"{m.name:<{name}} {m.shape[0]:>5} x {m.shape[1]:<5} "
                         f"{m.rank_out:>4} x {m.rank_in:<4}{m.width:>7} {human(m.row_bytes):>9} "
                         f"{human(m.disk_bytes):>10} {human(m.statistics_bytes):>10}")
        lines.append(f"{total:<{name}} {'':>12} {'':>10} "
                     f"{self.width:>7} {human(self.row_bytes):>9} {human(self.disk_bytes):>10} "
                     f"{human(self.statistics_bytes):>10}")
        lines.append(f"row buffer in memory (one shard): {human(self.buffer_bytes)}")
        if self.timing:
            lines += self.timing.render()
            low, mid, high = self.logging_seconds
            lines.append(f"a logged pass over {self.examples:,} examples ({self.steps:,} steps of "
                         f"{self.batch_size}): about {_duration(mid)} ({_duration(low)} to "
                         f"{_duration(high)}, from the middle half of the logged steps)")
        if self.disk_budget is not None:
            fits = "fits" if self.disk_bytes <= self.disk_budget else "does NOT fit"
            lines.append(f"disk budget {human(self.disk_budget)}: this log {fits}; largest rank "
                         f"that fits: {self.recommended_rank or 'none (even rank 1 is too big)'}")
        lines += self.notes
        return "\n".join(lines)


def resource_plan(run, examples: int, tokens_per_example: int = 1, disk_budget=None,
                  model=None, train_step=None, batch_size: int = 8, timed_steps: int = 3,
                  timing_budget: float = 30.0, show: bool = True) -> "ResourcePlan":
    """Plan a long run before starting it (prints the plan when `show`; returns a
    `logix.planning.ResourcePlan`): per watched module and in total the row width and
    bytes, the disk of a log of `examples` rows, the statistics memory of the current
    `setup`, and the largest rank whose log fits `disk_budget` (bytes or '50GB').

    Step-time overhead is measured when `model` is given (a causal LM step on random tokens
    [batch_size, tokens_per_example]) or `train_step` (a function running one training step
    of `batch_size` examples): steps without and with the hooks in interleaved pairs, at least
    `timed_steps` pairs and more until both medians are known to +-5% or `timing_budget`
    seconds have passed; the plan reports the medians, the overhead's spread and the time of
    one logged pass over `examples`. Nothing is logged; the statistics and the model's .grad
    are untouched."""
    if not run.modules:
        raise UsageError("resource_plan() needs watched layers: call run.watch(model) (and "
                         "run.add_lora(), run.setup(...)) first.")
    layers, spec, cfg = run.layers, run.capture_spec, run.config.logging
    result = make_plan(layers.layout(), spec, cfg, layers.rows_per_shard(cfg),
                       lambda: layers.capture(spec, run.statistics.device, batch_size),
                       examples, tokens_per_example, disk_budget, model, train_step,
                       batch_size, timed_steps, timing_budget)
    if show:
        print(result.render())
    return result


def make_plan(layout: Sequence, spec, logging, rows_per_shard: int,
              capture: Callable[[], object], examples: int, tokens_per_example: int = 1,
              disk_budget=None, model=None, train_step=None, batch_size: int = 8,
              timed_steps: int = 3, timing_budget: float = 30.0) -> "ResourcePlan":
    """The ResourcePlan of a row `layout` and capture `spec` (see `Run.resource_plan`);
    `capture()` makes the hooks whose step-time overhead is measured."""
    for name, value in (("examples", examples), ("tokens_per_example", tokens_per_example),
                        ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"{name} must be a positive integer, got {value!r}.")
    itemsize = DTYPES[logging.log_dtype].itemsize
    result = ResourcePlan(examples, tokens_per_example, logging.log_dtype,
                          module_costs(layout, spec, examples, itemsize),
                          buffer_bytes=rows_per_shard * sum(e.dim for e in layout) * itemsize,
                          batch_size=batch_size)
    if disk_budget is not None:
        result.disk_budget = parse_bytes(disk_budget)
        result.recommended_rank = recommend_rank([(e.in_dim, e.out_dim) for e in layout],
                                                 examples, itemsize, result.disk_budget)
    if model is not None and train_step is None:
        train_step = random_token_step(model, batch_size, tokens_per_example)
    if train_step is not None:
        result.timing = time_steps(train_step, capture, timed_steps, timing_budget)
    return result


def module_costs(entries: Sequence, spec, examples: int, itemsize: int) -> List[ModuleCost]:
    """Per-module costs of a row layout (`run.layout()`) under a capture spec."""
    costs = []
    for e in entries:
        stats = sum(size for size, _, kind in sizes([e], spec, 0, itemsize) if kind != "rows")
        width = e.rank_in * e.rank_out
        costs.append(ModuleCost(e.name, e.type, (e.out_dim, e.in_dim), e.rank_out, e.rank_in,
                                width, width * itemsize, width * itemsize * examples, stats))
    return costs


def recommend_rank(dims: Sequence[tuple], examples: int, itemsize: int,
                   disk_budget: int) -> Optional[int]:
    """The largest rank r (both sides, clipped to each layer's sizes as `add_lora` does) whose log
    of `examples` rows fits `disk_budget` bytes; None when rank 1 does not fit."""
    def disk(r):
        return examples * itemsize * sum(min(r, i) * min(r, o) for i, o in dims)

    top = max(max(i, o) for i, o in dims)
    if disk(1) > disk_budget:
        return None
    lo, hi = 1, top  # disk(lo) fits; binary search for the largest fitting rank
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if disk(mid) <= disk_budget else (lo, mid - 1)
    return lo


@dataclass
class StepTiming:
    """Seconds of a training step without (`plain`) and with (`logged`) the hooks, measured in
    interleaved pairs so that a machine getting faster or slower shifts both alike."""
    plain_times: List[float]
    logged_times: List[float]
    stable: bool  # the medians' confidence intervals are within STABLE of the medians
    budget: float  # seconds the timing was allowed to take

    @property
    def plain(self) -> float:
        return _quantile(self.plain_times, 0.5)

    @property
    def logged(self) -> float:
        return _quantile(self.logged_times, 0.5)

    @property
    def logged_quartiles(self) -> tuple:
        return tuple(_quantile(self.logged_times, q) for q in (0.25, 0.5, 0.75))

    @property
    def overheads(self) -> List[float]:
        """Each pair's logged / plain - 1."""
        return [b / a - 1 for a, b in zip(self.plain_times, self.logged_times)]

    @property
    def overhead(self) -> float:
        return _quantile(self.overheads, 0.5)

    def render(self) -> List[str]:
        q1, q3 = (_quantile(self.overheads, q) for q in (0.25, 0.75))
        lines = [f"step time: {self.plain * 1e3:.1f} ms without logging, {self.logged * 1e3:.1f} "
                 f"ms with the hooks: overhead {self.overhead:+.0%} (middle half of "
                 f"{len(self.overheads)} interleaved pairs: {q1:+.0%} to {q3:+.0%})"]
        if not self.stable:
            lines.append(f"  the step times did not settle within +-{STABLE:.0%} in "
                         f"{len(self.overheads)} pairs ({self.budget:.0f} s budget): a busy "
                         "machine, or steps that differ; read these figures as rough")
        return lines


STABLE = 0.05  # stop timing once each median is known to +-5% (95% confidence)
MAX_PAIRS = 200


def time_steps(step: Callable[[], None], capture: Callable[[], object], min_pairs: int,
               budget: float = 30.0) -> StepTiming:
    """Time `step()` alone and with the hooks of `capture()` attached, in pairs whose order
    alternates, after one warm-up pair; at least `min_pairs` pairs, then more until both medians
    are stable (see STABLE) or `budget` seconds of timed pairs have passed."""
    if isinstance(min_pairs, bool) or not isinstance(min_pairs, int) or min_pairs < 1:
        raise UsageError(f"timed_steps must be a positive integer, got {min_pairs!r}.")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget >= 0:
        raise UsageError(f"timing_budget must be a number of seconds >= 0, got {budget!r}.")

    def timed(with_hooks: bool) -> float:
        start = time.perf_counter()
        if with_hooks:
            with capture():
                step()
        else:
            step()
        return time.perf_counter() - start

    timed(False), timed(True)  # warm-up: allocator, kernels, thread pools
    plain, logged = [], []
    began = time.perf_counter()
    while True:
        first = len(plain) % 2 == 1  # alternate which of the pair runs first
        a = timed(first)
        b = timed(not first)
        plain.append(b if first else a)
        logged.append(a if first else b)
        stable = len(plain) >= min_pairs and _settled(plain) and _settled(logged)
        if stable or (len(plain) >= min_pairs and (time.perf_counter() - began > budget
                                                   or len(plain) >= MAX_PAIRS)):
            return StepTiming(plain, logged, stable, budget)


def _settled(times: List[float]) -> bool:
    """Whether the 95% confidence interval of the median (order statistics) lies within
    +-STABLE of it."""
    n = len(times)
    if n < 6:  # below six samples the interval is the whole range at best
        return False
    ordered = sorted(times)
    half = 0.98 * n ** 0.5
    low, high = ordered[max(int(n / 2 - half), 0)], ordered[min(int(n / 2 + half), n - 1)]
    middle = _quantile(times, 0.5)
    return high - low <= 2 * STABLE * middle


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    below = int(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def random_token_step(model, batch_size: int, tokens: int) -> Callable[[], None]:
    """A causal LM training step on random tokens [batch_size, tokens] (summed next-token
    cross-entropy, gradients by autograd.grad so the model's .grad stay untouched)."""
    import torch
    import torch.nn.functional as F

    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None:
        embeddings = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
        if not embeddings:
            raise UsageError("Cannot tell the model's vocabulary size (no config.vocab_size, no "
                             "nn.Embedding): pass step= (a function running one training step).")
        vocab = embeddings[0].num_embeddings
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    ids = torch.randint(0, vocab, (batch_size, tokens), device=device,
                        generator=torch.Generator(device=device).manual_seed(0))

    def step() -> None:
        out = model(ids)
        logits = out if isinstance(out, torch.Tensor) else out.logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                               ids[:, 1:].reshape(-1), reduction="sum")
        torch.autograd.grad(loss, params, allow_unused=True)

    return step


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10,
          "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value) -> int:
    """Bytes from an int or a string such as '50GB', '512 MiB', '1.5tb'."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(number):]
        try:
            size = float(number) * _UNITS[unit]
        except (ValueError, KeyError):
            size = 0
        if size >= 1:
            return int(size)
    raise UsageError(f"A disk budget must be a positive number of bytes or a size such as "
                     f"'50GB' / '512MiB' (units {sorted(u for u in _UNITS if u)}), got {value!r}.")

"""One step, from run.start() to run.end(): `StepRunner` attaches its hooks, checks what they
captured (refusing a step whose gradients would be wrong or lost), assembles every watched
module's projected gradient into rows [batch, dim], merges the step's statistics, keeps the
step's log and queues its rows for disk. It owns the buffers steps share: the last step's log,
a row buffer no log holds any more, the hooks' factor buffers and shard rows reserved for a
step that writes them in place."""

from __future__ import annotations

import enum
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import Tensor

from logix.config import LoggingConfig
from logix.errors import UsageError
from logix.log import StepRows, TokenRows
from logix.logra import Projection
from logix.statistics import resume
from logix.statistics.covariance import BACKWARD, GRAD, GRAD_PEAK, CovarianceState
from logix.statistics.live import RunStatistics
from logix.storage.session import LogSession
from logix.storage.data_ids import normalize_data_ids
from logix.tracking.capture import FLOAT32_MAX, CaptureSpec, GradientCapture
from logix.tracking.checkpoint import OpenCheckpoint

FLOAT16_MAX = 65504.0


def step_ids(data_id, mask: Optional[Tensor], scale) -> List:
    """The data ids of a step about to start, its mask and scale checked."""
    if mask is not None and not isinstance(mask, Tensor):
        raise UsageError(f"mask must be a tensor [batch, tokens], got {type(mask).__name__}.")
    # `scale` turns the backpropagated loss into the summed one: a finite number > 0.
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or \
            not 0 < float(scale) <= FLOAT32_MAX:
        raise UsageError(f"scale must be a finite number > 0 (what the backpropagated loss is "
                         f"multiplied by to become the loss summed over the batch, e.g. the "
                         f"number of examples or real tokens of a mean), got {scale!r}.")
    ids = normalize_data_ids(data_id, mask)
    if not ids:
        raise UsageError("run.start() got no data ids: a step needs at least one example. "
                         "Skip empty batches before calling run.start().")
    return ids


def check_capture(capture: GradientCapture, spec: CaptureSpec, on_unused_layer: str) -> None:
    """Refuse a step whose mask lined up with no layer, or in which a watched layer ran no
    forward or (when the spec needs a backward pass) received no output gradient: its part of
    the row would be zeros."""
    if capture.mask is not None and capture.batch_size is not None \
            and not capture.mask_matched:
        raise UsageError(f"mask of shape {tuple(capture.mask.shape)} lines up with no tracked "
                         "layer's input [batch, tokens, ...]; pass the attention mask of "
                         "this batch.")
    if on_unused_layer == "zero" or (spec.needs_grad and not capture.grads):
        return  # the second case: nothing reached any layer, which step_rows names itself
    if 0 not in capture.forwards.values() and not (spec.needs_backward
                                                   and 0 in capture.calls.values()):
        return
    no_forward = [n for n, count in capture.forwards.items() if count == 0]
    no_gradient = [n for n, count in capture.calls.items() if count == 0
                   and capture.forwards[n] > 0] if spec.needs_backward else []
    if not no_forward and not no_gradient:
        return
    problems = []
    if no_forward:
        problems.append(f"ran no forward pass: {no_forward}")
    if no_gradient:
        problems.append(f"ran forward but their output received no gradient (the loss does "
                        f"not depend on it, or it does not require grad): {no_gradient}")
    raise UsageError(
        f"Watched layers of this step {'; '.join(problems)}. Their logged gradient would be "
        "zeros; nothing of this step was kept. Leave them out with run.watch(model, "
        "name_filter=...), or, for layers legitimately unused in some steps, set "
        "logging.on_unused_layer: zero (their part of the row is then zero).")


def warn_of_repeated_passes(capture: GradientCapture) -> bool:
    """Warn (and return True) when every watched layer ran forward and backward more than once
    in the step: whole-model passes, which add up position by position. Right for passes over
    the same examples (two losses, two views); micro-batches of other examples need a step each.
    """
    calls = capture.calls
    if not calls or min(calls.values()) < 2 or min(capture.forwards.values()) < 2:
        return False
    warnings.warn(f"Every watched layer ran {min(calls.values())} forward and backward passes "
                  "in one step; their gradients add up per batch position, which is right when "
                  "the passes are over the same examples (two losses, two views of each "
                  "example). For gradient accumulation over micro-batches of other examples, "
                  "give each micro-batch its own run.start() / run.end() (`with run(...)`). "
                  "(Said once per run.)", stacklevel=3)
    return True


def step_rows(capture: GradientCapture, ids: List, scale: float) -> Tensor:
    """[batch, dim] float32: every module's projected gradient side by side, in row order,
    times `scale` (a layer unused in the step contributes zeros). The capture's own buffer."""
    if capture.batch_size is None or not capture.grads:
        raise UsageError("No gradient reached the tracked layers between start() and end(). "
                         "Call loss.backward() before run.end(), outside torch.no_grad().")
    if len(ids) != capture.batch_size:
        raise UsageError(f"data_id names {len(ids)} examples but the batch has "
                         f"{capture.batch_size}; pass one id per example.")
    rows = capture.rows
    if len(capture.grads) < len(capture.layout.columns):
        for name in capture.layout.columns:
            if name not in capture.grads:
                offset, width = capture.layout.width(name)
                rows[:, offset:offset + width].zero_()
    return rows.mul_(scale) if scale != 1.0 else rows


def keep_rows(rows: Tensor, ids: List, cfg: LoggingConfig, saving: bool,
              known_finite: bool = False) -> Optional[Tensor]:
    """`rows`, or None when the step is skipped for NaN/inf (logging.nonfinite: skip); raises
    for NaN/inf by default and for values float16 storage cannot hold. `known_finite`: the
    capture vouched for every number (`GradientCapture.rows_known_finite`), nothing to read."""
    if not known_finite and not math.isfinite(float(rows.sum())) \
            and not bool(torch.isfinite(rows).all()):
        bad = [ids[i] for i in (~torch.isfinite(rows).all(1)).nonzero().flatten().tolist()]
        if cfg.nonfinite == "error":
            raise UsageError(f"NaN or inf gradients for data ids {bad[:5]}; nothing of this "
                             "step was logged. Set logging.nonfinite: skip to drop such "
                             "steps with a warning.")
        warnings.warn(f"Skipped a step with NaN or inf gradients (ids {bad[:5]}): none of its "
                      f"{len(ids)} rows was logged, and its statistics were not kept.")
        return None
    if saving and cfg.log_dtype == "float16" and float(rows.abs().max()) > FLOAT16_MAX:
        raise UsageError(f"Gradients of this step reach {float(rows.abs().max()):.3g}, beyond "
                         f"float16's range ({FLOAT16_MAX:g}): they would be stored as inf. "
                         "Use logging.log_dtype: bfloat16 (same size, float32's range).")
    return rows


def token_rows(capture: GradientCapture, projections: Dict[str, Projection], scale: float,
               mask: Optional[Tensor]) -> tuple:
    """A per-token step's rows, one per real token (mask 1, or every position):
    (rows [n_tokens, dim] float32, query index of each row, its position). The rows of one
    example sum to its row of `step_rows`: masked positions contribute nothing to either."""
    lengths = {name: t.shape[1] for name, t in capture.token_grads.items()}
    if len(set(lengths.values())) > 1:
        raise UsageError(f"Per-token scores need every watched layer to see the same tokens; "
                         f"positions per layer: {lengths}. Watch only the layers on the token "
                         "axis (run.watch(model, name_filter=...)).")
    reference = next(iter(capture.token_grads.values()))
    batch, positions = reference.shape[:2]
    if mask is not None and tuple(mask.shape) != (batch, positions):
        raise UsageError(f"mask of shape {tuple(mask.shape)} does not line up with the "
                         f"{positions} positions the layers saw; pass the [batch, tokens] "
                         "attention mask of this batch.")
    parts = []
    for name, projection in projections.items():
        grad = capture.token_grads.get(name)
        if grad is None:
            grad = reference.new_zeros(batch, positions, projection.dim)
        parts.append(grad.reshape(batch, positions, -1))
    rows = torch.cat(parts, 2)  # [B, N, dim]
    keep = torch.ones(batch, positions, dtype=torch.bool) if mask is None \
        else mask.detach().to("cpu") != 0
    query, position = keep.nonzero(as_tuple=True)  # row-major: queries ascending, tokens in order
    rows = rows[query.to(rows.device), position.to(rows.device)]
    return (rows * scale if scale != 1.0 else rows), query.tolist(), position.tolist()


class LastRows(enum.Enum):
    """Whose the last step's row buffer is."""

    RUNNER = "runner"  # the runner's: the step after next writes into it
    HANDED_OUT = "handed out"  # log() gave it to the caller: never reused
    IN_SHARD = "in shard"  # a view of the shard being filled, which the writer recycles


@dataclass
class Step:
    """A started step: its hooks (`capture`), its data `ids`, the positions of the examples whose
    rows the log keeps (`keep`; None: nothing is written), the `scale` of its rows, the shard
    rows `reserved` for it when its hooks write them in place, and its `checkpoint`."""

    ids: List
    keep: Optional[List[int]]
    scale: float
    capture: GradientCapture
    reserved: Optional[Tensor] = None
    checkpoint: Optional[str] = None


class StepRunner:
    """One step at a time (`start`, `stop`, `finish`), its rows going to `session`; `last` is
    the last kept step's log (what run.get_log() returns); `checkpoint` the checkpoint block
    steps log into (tracking.checkpoint.checkpoint_block opens and closes it)."""

    def __init__(self, session: LogSession) -> None:
        self.session = session
        self.current: Optional[Step] = None
        self.last: Optional[StepRows] = None
        self.checkpoint: Optional[OpenCheckpoint] = None
        self._last_rows = LastRows.RUNNER
        self._spare: Optional[Tensor] = None  # a row buffer no StepRows holds any more
        self._factors: Dict = {}  # the hooks' projected inputs / output gradients
        self._warned_of_passes = False  # warn_of_repeated_passes said its piece

    def start(self, layers, spec: CaptureSpec, device, ids: List, writes: bool, scale: float,
              mask: Optional[Tensor], per_token: bool) -> Step:
        """Attach the hooks of `layers` (a TrackedLayers) for a step that `writes` its rows (its
        ids not yet logged, by logging.on_duplicate) or keeps them in memory. The step's
        forward/backward statistics stay apart until `finish` keeps the step, and count only
        kept examples."""
        checkpoint = None if self.checkpoint is None else self.checkpoint.name
        keep = self.session.unseen(ids, checkpoint) if writes else None
        reserved = None
        if keep is not None and len(keep) == len(ids):
            reserved = self.session.reserve(
                len(ids), intact=None if self.last is None else self.last.grads)
        capture = GradientCapture(
            layers.modules, layers.projection_for, spec, CovarianceState(device=device),
            layers.row_layout(), mask, examples=len(ids),
            counted=None if keep is None or len(keep) == len(ids) else keep,
            spare=self._spare if reserved is None else reserved,
            per_token=per_token, factors=self._factors).__enter__()
        if reserved is None:
            self._spare = None
        self.current = Step(ids, keep, scale, capture, reserved, checkpoint)
        return self.current

    def check_idle(self) -> None:
        """Refuse a step started inside another (before anything of it runs)."""
        if self.current is not None:
            raise UsageError("start() called twice without end(): call run.end() after each "
                             "step's backward pass.")

    def stop(self) -> Step:
        """Detach the current step's hooks; the step, for `finish`."""
        if self.current is None:
            raise UsageError("end() called without start(): call run.start(data_id=...) before "
                             "the forward pass.")
        step, self.current = self.current, None
        step.capture.__exit__(None, None, None)
        return step

    def drop(self) -> None:
        """Give the current step up (an exception inside `with run(...)`)."""
        if self.current is not None:
            self.current.capture.detach()
            self.current = None

    def finish(self, step: Step, spec: CaptureSpec, cfg: LoggingConfig, saving: bool, layers,
               run_statistics: RunStatistics) -> None:
        """Check a stopped step, merge its statistics into the run's, keep its log and queue its
        kept rows (nothing of a step skipped for NaN/inf, logging.nonfinite: skip)."""
        if self._keep(step, spec, cfg, saving, layers, run_statistics) and spec.covariances:
            run_statistics.unreduced = True

    def _keep(self, step: Step, spec: CaptureSpec, cfg: LoggingConfig, saving: bool, layers,
              run_statistics: RunStatistics) -> bool:
        statistics = run_statistics.state
        capture, ids, scale = step.capture, step.ids, step.scale
        if self.checkpoint is not None:
            self.checkpoint.check_inside(ids)
        check_capture(capture, spec, cfg.on_unused_layer)
        if not self._warned_of_passes:
            self._warned_of_passes = warn_of_repeated_passes(capture)
        if not spec.needs_grad:
            _merge(statistics, capture.statistics, scale)
            return True
        rows = keep_rows(step_rows(capture, ids, scale), ids, cfg, saving,
                         capture.rows_known_finite(scale))
        if rows is None:
            return False
        keep = step.keep
        if keep is not None and step.checkpoint is None and self.session.resumed_rows:
            resume.check_same_kinds(self.session, spec.covariances, statistics,
                                    run_statistics.loaded)
        in_shard = rows is step.reserved
        if in_shard and not self.session.takes_in_place(rows):
            rows, in_shard = rows.clone(), False  # a flush wrote the shard out mid-step
        kept = rows if keep is None or len(keep) == len(ids) else rows[keep]
        _merge(statistics, capture.statistics, scale)
        if spec.grad_covariance:
            for entry in layers.layout():
                block = kept[:, entry.columns]
                statistics.update(entry.name, GRAD, block, kept.shape[0])
                if len(block):
                    norms = block.float().square().sum(1)  # [n] ||g_n||^2
                    statistics.raise_peak(entry.name, GRAD_PEAK, norms.max())
        tokens = None
        if capture.per_token:
            tokens = TokenRows(*token_rows(capture, layers.projections, scale, capture.mask))
        self._set_last(StepRows(ids, rows, layers.layout(), dict(layers.projection_meta), tokens),
                       in_shard)
        if keep:
            self.session.append([ids[k] for k in keep], kept, step.checkpoint)
        return True

    def _set_last(self, log: StepRows, in_shard: bool) -> None:
        """Replace the last step's log; its row buffer is reused by the step after next unless
        log() handed it out (the next step writes into the other buffer, so log() during a step
        still returns the previous step intact). Rows `in_shard` (reserved in the shard being
        filled) are never reused here, and log() hands out a copy of them."""
        old = self.last
        if old is not None and self._last_rows is LastRows.RUNNER and old.grads is not log.grads:
            self._spare = old.grads
        self.last = log
        self._last_rows = LastRows.IN_SHARD if in_shard else LastRows.RUNNER

    def log(self, copy: bool = False) -> StepRows:
        """The last step's log (a copy with `copy`; else the runner never reuses its rows)."""
        if self.last is None:
            raise UsageError("No step has been logged yet: run start()/backward()/end() first.")
        if self._last_rows is LastRows.IN_SHARD:
            self.last, self._last_rows = self.last.clone(), LastRows.RUNNER
        if copy:
            return self.last.clone()
        self._last_rows = LastRows.HANDED_OUT
        return self.last

    def clear(self) -> None:
        self.drop()
        self.last, self._spare = None, None


def _merge(statistics: CovarianceState, step_statistics: CovarianceState, scale: float) -> None:
    """Merge a step's statistics. Output gradients are those of the loss times `scale` (the
    rows' scale), so their covariance takes scale squared; inputs are unchanged."""
    if scale != 1.0:
        step_statistics.scale(BACKWARD, scale * scale)
    statistics.merge(step_statistics)

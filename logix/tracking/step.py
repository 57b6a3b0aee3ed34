"""One step's rows: the checks that refuse a step whose gradients would be wrong or lost, and
the assembly of every watched module's projected gradient into rows [batch, dim]."""

from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional

import torch
from torch import Tensor

from logix.config import LoggingConfig
from logix.errors import UsageError
from logix.logra import Projection
from logix.tracking.capture import GradientCapture, Plan

FLOAT16_MAX = 65504.0


def check_capture(capture: GradientCapture, plan: Plan, on_unused_layer: str) -> None:
    """Refuse a step whose mask lined up with no layer, or in which a watched layer ran no
    forward or (when the plan needs a backward pass) received no output gradient: its part of
    the row would be zeros."""
    if capture.mask is not None and capture.batch_size is not None \
            and not capture.mask_matched:
        raise UsageError(f"mask of shape {tuple(capture.mask.shape)} lines up with no tracked "
                         "layer's input [batch, tokens, ...]; pass the attention mask of "
                         "this batch.")
    if on_unused_layer == "zero" or (plan.needs_grad and not capture.grads):
        return  # the second case: nothing reached any layer, which step_rows names itself
    if 0 not in capture.forwards.values() and not (plan.needs_backward
                                                   and 0 in capture.calls.values()):
        return
    no_forward = [n for n, count in capture.forwards.items() if count == 0]
    no_gradient = [n for n, count in capture.calls.items() if count == 0
                   and capture.forwards[n] > 0] if plan.needs_backward else []
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

"""Pieces the framework integrations share. Nothing here imports transformers or lightning."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Mapping
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from logix.errors import ConfigError, UsageError
from logix.log import StepRows
from logix.mode import Mode
from logix.tracking.frozen import frozen
from logix.tracking.optimizer_state import has_second_moments
from logix.storage.data_ids import normalize_data_ids

# (data ids, mask or None, scale) of one batch
Described = Tuple[List, Optional[Tensor], float]


def example_ids(inputs: Tensor, attention_mask: Optional[Tensor] = None) -> List[str]:
    """One stable id per example, from its content.

    Token ids [B, T]: the hash `run.start` gives a token-id tensor, taken over the real tokens
    only, so the same example gets the same id whatever padding its batch needed. Float inputs
    [B, ...]: a hash of the example's float32 bytes.
    """
    if not isinstance(inputs, Tensor) or inputs.dim() < 1:
        raise UsageError(f"Cannot derive data ids from {type(inputs).__name__}; pass explicit "
                         "ids (a dataset column or a data_id_fn).")
    if inputs.is_floating_point():
        rows = inputs.detach().to("cpu", torch.float32).reshape(inputs.shape[0], -1)
        return [hashlib.sha1(r.numpy().tobytes()).hexdigest()[:16] for r in rows]
    if inputs.dim() == 1:
        inputs = inputs[:, None]
    return normalize_data_ids(inputs, attention_mask)


class _Discarded(Exception):
    """Thrown into an open step to detach its hooks without logging it."""


class OpenStep:
    """One `with run(data_id=..., mask=..., scale=...)` block opened in one framework hook and
    closed in another: `close()` logs the step (run.end()); `discard()` detaches its hooks and
    logs nothing (a skipped or failed step)."""

    def __init__(self, run, data_id, mask: Optional[Tensor], scale: float) -> None:
        self._block = run(data_id=data_id, mask=mask, scale=scale)
        self._block.__enter__()

    def close(self) -> None:
        self._block.__exit__(None, None, None)

    def discard(self) -> None:
        self._block.__exit__(_Discarded, _Discarded(), None)


EpochChoice = Union[str, Sequence[int]]  # "last", "all", or epoch indices (0-based)


def check_epochs(epochs: EpochChoice) -> EpochChoice:
    if epochs in ("last", "all"):
        return epochs
    if isinstance(epochs, str) or not all(isinstance(e, int) and e >= 0 for e in epochs):
        raise ConfigError(f"epochs={epochs!r}; allowed: 'last', 'all', or a list of epoch "
                          "indices (0-based).")
    return list(epochs)


def logs_epoch(epochs: EpochChoice, epoch: int, total: Optional[int]) -> bool:
    """Whether epoch `epoch` of `total` (None: unknown) is logged."""
    if epochs == "all":
        return True
    if epochs == "last":
        return total is None or epoch == total - 1
    return epoch in epochs


@contextlib.contextmanager
def saving_enabled(run, enabled: bool = True):
    """`run.save(enabled)` for the block, then saving as it was, unless the block finalized
    the run: it then stays closed to more rows (see `Run.start`)."""
    before = run.saving
    run.save(enabled)
    try:
        yield run
    finally:
        if not (before and run.finalized):
            run.save(before)


@contextlib.contextmanager
def query_mode(run):
    """`run.eval()` for the block (log in memory only, no statistics), then the run's mode and
    capture spec as they were; a finalized run stays in query mode (a later step is a query
    too, never a row of the closed training log)."""
    mode, spec = run.mode, run.capture_spec
    run.eval()
    try:
        yield run
    finally:
        if mode is not Mode.FINALIZED and run.mode is Mode.QUERY:
            run.mode, run.capture_spec = mode, spec


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """model.eval() for the block, then every submodule's own training flag as it was."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


def watch_like_log(run, model: nn.Module) -> None:
    """A new process at query time: watch the layers the saved log holds, then load its
    projections and statistics."""
    from logix.storage.manifest import Manifest

    names = {m.name for m in Manifest.load(run.project_dir).modules}
    run.watch(model, name_filter=lambda name: name in names)
    run.initialize_from_log()


def log_batches(run, model: nn.Module, batches: Iterable,
                describe: Callable[[Any], Described],
                loss_of: Callable[[Any, int], Tensor]) -> Optional[StepRows]:
    """One pass of post-hoc logging: for each batch (moved to the model's device), start(ids,
    mask, scale) -> loss -> gradients -> end(). `describe` may take its id entry out of the
    batch. The model is in eval mode (no dropout) and frozen (`logix.frozen`: backward
    computes no weight gradient; requires_grad and .grad as they were after).
    Returns the concatenated in-memory logs when the run is in query mode, else None."""
    collected = []
    keep = run.capture_spec.log_grad and not run.saving
    device = model_device(model)
    with eval_mode(model), frozen(model), torch.enable_grad():
        for index, batch in enumerate(batches):
            batch = to_device(batch, device)
            ids, mask, scale = describe(batch)
            with run(data_id=ids, mask=mask, scale=scale):
                loss = loss_of(batch, index)
                if not loss.requires_grad:
                    raise UsageError("The loss does not depend on any watched layer, so no "
                                     "gradient reaches them: watch the layers the loss is "
                                     "computed through (with reentrant gradient checkpointing, "
                                     "also call model.enable_input_require_grads()).")
                loss.backward()
            if keep:
                collected.append(run.get_log(copy=True))
    return StepRows.concat(collected) if collected else None


def run_passes(run, scheduler, one_pass: Callable[[], Any], finalize: bool = True) -> None:
    """One pass (then finalize) without a scheduler; the scheduler's passes with one."""
    if scheduler is None:
        one_pass()
        if finalize:
            run.finalize()
        return
    if scheduler.run is not run:
        raise UsageError("The scheduler drives a different run than the one given.")
    for _ in scheduler:  # the scheduler finalizes after its last pass
        one_pass()


def extract(run, model: nn.Module, batches: Iterable, describe: Callable[[Any], Described],
            loss_of: Callable[[Any, int], Tensor], scheduler=None, save: bool = True,
            finalize: bool = True) -> None:
    """Post-hoc logging of `batches` (both integrations' `extract_log`): the scheduler's passes
    when given (it sets up, saves and finalizes); otherwise one pass with saving on (`save`),
    restored after, then finalize (`finalize`)."""
    if not run.modules:
        run.watch(model)

    def one_pass():
        log_batches(run, model, batches, describe, loss_of)

    if scheduler is not None:
        run_passes(run, scheduler, one_pass)
        return
    with saving_enabled(run, save):
        run_passes(run, None, one_pass, finalize=finalize)


def query_log(run, model: nn.Module, batches: Iterable, describe: Callable[[Any], Described],
              loss_of: Callable[[Any, int], Tensor]) -> StepRows:
    """The in-memory query log of `batches` (both integrations' `influence_of` and
    `self_influence`): query mode, nothing written, statistics unchanged. A run that watches
    nothing yet (a new process) watches the log's layers and loads its state first."""
    if not run.modules:
        watch_like_log(run, model)
    with query_mode(run):
        log = log_batches(run, model, batches, describe, loss_of)
    if log is None:
        raise UsageError("The query data yielded no batches.")
    return log


def finish_training(run, passes, optimizer=None) -> None:
    """At the end of training: run a scheduler's remaining passes (its last one finalizes the
    run), or finalize the run directly when no scheduler drives it; then keep the optimizer's
    second moments (Adam, AdamW, Adafactor) for hessian="optimizer" when it has them."""
    if passes is None:
        run.finalize()
    else:
        for _ in passes:
            continue
    if optimizer is not None and run.modules and has_second_moments(optimizer):
        run.add_optimizer_state(optimizer)


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")

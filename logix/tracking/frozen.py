"""A logging pass without weight gradients: `with logix.frozen(model):` turns requires_grad off
on every parameter for the block and restores each flag after. Inside, a step's hooks make the
watched layers' outputs need gradients (see `GradientCapture`), so backward computes the
gradients of activations only, and the logged rows are those of the weight-gradient path."""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Every parameter of `model` needs no gradient inside the block; each flag as it was after
    (also on an exception). Parameters' .grad are left as they are. Under
    DistributedDataParallel the block skips its gradient synchronisation (there is nothing to
    reduce)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"frozen() takes a torch.nn.Module, got {type(model).__name__}.")
    flags = [(p, p.requires_grad) for p in model.parameters()]
    no_sync = getattr(model, "no_sync", None)  # DDP: its reducer would wait for weight grads
    with (no_sync() if callable(no_sync) else contextlib.nullcontext()):
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        try:
            yield model
        finally:
            for parameter, flag in flags:
                parameter.requires_grad_(flag)

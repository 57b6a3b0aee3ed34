"""How a Hugging Face model reduces its loss: the items a mean divides by, whether it shifts
labels (causal LMs) or honours `num_items_in_batch`, and the summed loss recomputed from logits.
`LogIXCallback` uses these to turn the Trainer's backpropagated loss into the summed loss; an
explicit `loss_scale_fn` replaces all of it."""

from __future__ import annotations

import functools
import inspect
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from logix.errors import UsageError

IGNORE_INDEX = -100
LABELS = "labels"


def forward_arguments(model: nn.Module) -> set:
    """Names of the model's forward arguments (the columns the Trainer keeps)."""
    return set(inspect.signature(_base_model(model).forward).parameters)


def _base_model(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)  # PEFT
    return get_base() if callable(get_base) else model


def shifts_labels(model: nn.Module) -> bool:
    """Whether the model's loss predicts labels[t + 1] from position t (a causal LM)."""
    base = _base_model(model)
    if getattr(getattr(base, "config", None), "is_encoder_decoder", False):
        return False
    loss_type = getattr(base, "loss_type", "none")
    if loss_type is not None and "CausalLM" not in str(loss_type):
        return False
    try:
        loss_function = base.loss_function
    except AttributeError:
        return False
    return loss_function is _causal_lm_loss()


def honours_num_items(model: nn.Module) -> bool:
    """Whether the model divides its loss by the `num_items_in_batch` it is given (models that
    compute their loss with `self.loss_function`); others (e.g. BERT classifiers) take a mean
    over the micro-batch and ignore it. Checked against the numbers at the first micro-batch."""
    return _forward_uses_loss_function(type(_base_model(model)))


# The two places that read transformers' internals (a private module, the model's source). A
# transformers release that moves them breaks here, with a message naming the explicit path.
@functools.lru_cache(maxsize=None)
def _causal_lm_loss():
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except ImportError as e:
        raise UsageError(
            f"LogIX cannot infer how this transformers version reduces a causal LM's loss ({e}). "
            "Pass LogIXCallback(run, loss_scale_fn=lambda inputs: <number the backpropagated "
            "loss must be multiplied by to become the loss summed over examples>), e.g. the "
            "count of label tokens that are not -100 after the shift.") from e
    return ForCausalLMLoss


@functools.lru_cache(maxsize=None)
def _forward_uses_loss_function(cls: type) -> bool:
    try:
        return "loss_function" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return True  # no source to read: the first micro-batch's numeric check decides


def _targets(model: nn.Module, kwargs: dict):
    shifted = kwargs.get("shift_labels")
    if shifted is not None:
        return shifted, False
    labels = kwargs[LABELS]
    if shifts_labels(model):
        return labels[..., 1:], True
    return labels, False


def count_items(model: nn.Module, kwargs: dict) -> float:
    """How many items a mean-reduced loss of this batch divides by: the labels that are not
    -100 (after the causal shift), or every element of float labels (regression)."""
    targets, _ = _targets(model, kwargs)
    if targets.is_floating_point():
        return float(targets.numel())
    return float(targets.ne(IGNORE_INDEX).sum())


def summed_loss(model: nn.Module, kwargs: dict, output) -> Optional[float]:
    """The batch loss summed over items, recomputed from the logits for the standard heads (None
    when the output has no logits)."""
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, dict):
        logits = output.get("logits")
    if not isinstance(logits, Tensor):
        return None
    targets, shifted = _targets(model, kwargs)
    with torch.no_grad():
        logits = logits.detach().float()
        if shifted:
            logits = logits[..., :-1, :]
        if targets.is_floating_point():
            problem = getattr(getattr(model, "config", None), "problem_type", None)
            if problem == "multi_label_classification":
                return float(F.binary_cross_entropy_with_logits(
                    logits, targets.float(), reduction="sum"))
            return float(F.mse_loss(logits.squeeze(), targets.float().squeeze(), reduction="sum"))
        return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                     targets.reshape(-1).to(logits.device),
                                     ignore_index=IGNORE_INDEX, reduction="sum"))


def loss_of(output) -> Optional[Tensor]:
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, dict):
        loss = output.get("loss")
    if loss is None and isinstance(output, (tuple, list)) and output \
            and isinstance(output[0], Tensor) and output[0].dim() == 0:
        loss = output[0]
    return loss

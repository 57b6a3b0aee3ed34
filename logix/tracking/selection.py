"""Which layers of a model are watched: `run.watch(model, name_filter=, type_filter=)`."""

from __future__ import annotations

import warnings
from typing import Callable, Dict, Sequence, Set, Union

import torch
from torch import nn

from logix.errors import UsageError
from logix.tracking.modules import (TrackedModule, bypassed_layers, supported_types,
                                    tied_layers, tracked_class)

NameFilter = Union[None, str, Sequence[str], Callable[[str], bool]]


def select_modules(model: nn.Module, name_filter: NameFilter = None,
                   type_filter: Union[None, type, Sequence[type]] = None,
                   include_bias: bool = False) -> Dict[str, TrackedModule]:
    """Every supported layer of `model` (unwrapped from DDP) whose name and type pass the
    filters, by name. Layers whose forward their parent never calls are skipped with a warning;
    tied weights are warned about. Parameters' requires_grad is never changed.

    Adapters: in a model with LoRA adapters (PEFT), only the active adapters' lora_A / lora_B
    layers are candidates unless a name_filter is given (it then picks among every layer).
    Frozen layers (weight.requires_grad False) are skipped with a warning when other candidates
    train, unless a name_filter is given; a wholly frozen model (loaded for queries or a logging
    pass) has every candidate watched: a step makes their outputs need gradients. Layers with quantised weights (int8 / 4-bit, e.g. bitsandbytes) are never
    watched."""
    if not isinstance(model, nn.Module):
        raise UsageError(f"watch() takes a torch.nn.Module, got {type(model).__name__}.")
    if isinstance(type_filter, type):  # one class, as name_filter takes one string
        type_filter = [type_filter]
    if type_filter is not None and not all(isinstance(t, type) for t in type_filter):
        raise UsageError(f"type_filter takes layer classes, e.g. [nn.Linear, nn.Conv2d]; got "
                         f"{type_filter!r}.")
    model = unwrap(model)
    modules, bypassed, frozen = {}, bypassed_layers(model), []
    adapters = adapter_layers(model) if name_filter is None else None
    for name, module in model.named_modules():
        klass = tracked_class(module)
        if klass is None or not _passes(name, module, name_filter, type_filter):
            continue
        if (adapters and name not in adapters) or is_quantized(module):
            continue
        if name in bypassed:
            warnings.warn(f"Not watching {name!r}: {bypassed[name]}")
            continue
        modules[name] = klass(name, module, include_bias)
        weight = getattr(module, "weight", None)
        if name_filter is None and isinstance(weight, torch.Tensor) and not weight.requires_grad:
            frozen.append(name)
    if frozen and len(frozen) < len(modules):  # some layers train: watch those
        for name in frozen:
            del modules[name]
        warnings.warn(f"Not watching frozen layers (weight.requires_grad is False): "
                      f"{frozen[:8]}{' ...' if len(frozen) > 8 else ''}. Name them with "
                      "watch(model, name_filter=...) to attribute through them.")
    if not modules:
        raise UsageError(
            f"No supported layers matched in {type(model).__name__} (name_filter="
            f"{name_filter!r}, type_filter={type_filter!r}). LogIX tracks: "
            f"{supported_types()}. Loosen the filters, or subclass "
            "logix.tracking.modules.TrackedModule for a custom layer type.")
    for first, second in tied_layers(modules):
        warnings.warn(
            f"Layers {first!r} and {second!r} share one weight (tied): LogIX logs them as two "
            "blocks whose sum is the shared weight's gradient, so scores miss the cross terms "
            "between them (see 'Tied weights' in docs/concepts.md).")
    return modules


# Parameter classes of quantised weights (bitsandbytes) whose dtype may still read as floating.
_QUANTIZED_PARAMS = {"Params4bit", "Int8Params"}


def is_quantized(module: nn.Module) -> bool:
    """Whether the layer's weight is quantised (not a floating tensor one can differentiate)."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and (
        not weight.is_floating_point() or type(weight).__name__ in _QUANTIZED_PARAMS)


def adapter_layers(model: nn.Module) -> Set[str]:
    """Names of the active LoRA adapter layers (PEFT's `lora_A` / `lora_B` ModuleDicts) of
    `model`; empty when it has none."""
    names = set()
    for name, module in model.named_modules():
        a, b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if not isinstance(a, nn.ModuleDict) or not isinstance(b, nn.ModuleDict):
            continue
        active = getattr(module, "active_adapters", None) or list(a.keys())
        prefix = f"{name}." if name else ""
        for key in active:
            if key in a and key in b:
                names.update({f"{prefix}lora_A.{key}", f"{prefix}lora_B.{key}"})
    return names


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / DataParallel wrappers."""
    from torch.nn.parallel import DistributedDataParallel

    while isinstance(model, (DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _passes(name: str, module: nn.Module, name_filter: NameFilter, type_filter) -> bool:
    if type_filter is not None and not isinstance(module, tuple(type_filter)):
        return False
    if name_filter is None:
        return True
    if callable(name_filter):
        return bool(name_filter(name))
    if isinstance(name_filter, str):
        name_filter = [name_filter]
    return any(f in name for f in name_filter)

"""Second moments of an optimizer as per-layer Kronecker factors (the `optimizer` curvature kind).

Adam and AdamW keep v, the running mean of squared gradients, for each weight; Adafactor keeps
v's row and column means. Both precondition an update by 1 / sqrt(v). For the [out, in] matrix
of a watched layer, v is factored as Adafactor does, v ~ outer(r, c) / mean(v) with r, c its row
and column means, so that sqrt(v) ~ S_out (x) S_in with S_out = diag(sqrt(r)) / mean(v)^(1/4) and
S_in = diag(sqrt(c)) / mean(v)^(1/4). Projected like K-FAC's covariances (P S P^T per side),
this is a curvature that queries invert as they invert K-FAC's.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from logix import distributed
from logix.errors import UsageError
from logix.statistics.covariance import OPTIMIZER_IN, OPTIMIZER_OUT
from logix.storage import state
from logix.storage.manifest import load_optional
from logix.tracking.modules import TrackedModule

# Keys of the second moments in an optimizer's per-parameter state.
_FULL = ("exp_avg_sq",  # Adam, AdamW (and transformers' Adafactor for 1-D parameters)
         "variance")  # torch.optim.Adafactor for 1-D parameters
_FACTORED = (("exp_avg_sq_row", "exp_avg_sq_col"),  # transformers.optimization.Adafactor
             ("row_var", "col_var"))  # torch.optim.Adafactor


def second_moments(modules: Mapping[str, TrackedModule], optimizer,
                   params: Optional[Sequence[nn.Parameter]] = None) -> Dict[str, Tensor]:
    """v as each watched layer's [out, in] matrix (bias column included when tracked), read from
    `optimizer`: a live torch optimizer, or its `state_dict()` (for example a torch.load'ed
    optimizer.pt) together with `params`, the parameters in the order the optimizer was given
    them (`trainer_parameter_order` for a Hugging Face Trainer's)."""
    state = _state_by_parameter(optimizer, params)
    out = {}
    for name, tracked in modules.items():
        weight = _moments(state, tracked.module.weight, name, "weight")
        bias = _moments(state, tracked.module.bias, name, "bias") if tracked.has_bias else None
        out[name] = tracked.as_matrix(weight, bias).double()
    return out


def kronecker_factors(v: Tensor) -> Tuple[Tensor, Tensor]:
    """(diag of S_out, diag of S_in) with sqrt(v) ~ S_out (x) S_in (see the module docstring)."""
    mean = v.mean()
    if not mean > 0:
        raise UsageError("The optimizer's second moments are all zero: it has taken no step yet, "
                         "so it holds no curvature. Pass the optimizer after training.")
    scale = mean ** 0.25
    return v.mean(1).sqrt() / scale, v.mean(0).sqrt() / scale


def projected(diagonal: Tensor, projection: Optional[Tensor]) -> Tensor:
    """P diag(d) P^T (diag(d) itself for an unprojected side)."""
    if projection is None:
        return torch.diag(diagonal)
    p = projection.double()
    return (p * diagonal) @ p.T


def trainer_parameter_order(model: nn.Module) -> list:
    """The parameters in the order a Hugging Face Trainer gives them to its optimizer: the ones
    with weight decay first, then the others (transformers' own rule for which are which)."""
    from transformers import Trainer

    decay = set(Trainer.get_decay_parameter_names(None, model))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [p for n, p in named if n in decay] + [p for n, p in named if n not in decay]


def has_second_moments(optimizer) -> bool:
    """Whether a live optimizer keeps second moments this module reads (Adam, AdamW,
    Adafactor after a step)."""
    keys = {key for entry in getattr(optimizer, "state", {}).values() for key in entry}
    return bool(keys & ({*_FULL} | {key for pair in _FACTORED for key in pair}))


def _state_by_parameter(optimizer, params) -> Dict[int, dict]:
    if isinstance(optimizer, torch.optim.Optimizer):
        return {id(p): s for p, s in optimizer.state.items()}
    if not (isinstance(optimizer, Mapping) and "state" in optimizer
            and "param_groups" in optimizer):
        raise UsageError(f"Expected a torch optimizer or its state_dict() (a dict with 'state' "
                         f"and 'param_groups'), got {type(optimizer).__name__}.")
    if params is None:
        raise UsageError("An optimizer state_dict numbers its parameters: pass params=, the "
                         "parameters in the order the optimizer was given them (e.g. "
                         "list(model.parameters()), or trainer_parameter_order(model) for a "
                         "Hugging Face Trainer's optimizer.pt).")
    params = list(params)
    numbers = [i for group in optimizer["param_groups"] for i in group["params"]]
    if len(numbers) != len(params):
        raise UsageError(f"The optimizer state lists {len(numbers)} parameters but params= has "
                         f"{len(params)}: pass the parameters the optimizer was built with, in "
                         "its order.")
    by_number = dict(zip(numbers, params))
    return {id(by_number[i]): s for i, s in optimizer["state"].items() if i in by_number}


def _moments(state: Dict[int, dict], parameter: Tensor, module: str, what: str) -> Tensor:
    entry = state.get(id(parameter))
    if not entry:
        raise UsageError(f"The optimizer holds no state for {module}.{what}: it was not given "
                         "this parameter, has not stepped yet, or params= is in another order.")
    full = next((key for key in _FULL if key in entry), None)
    if full is not None:
        v = entry[full]
    else:
        pair = next(((r, c) for r, c in _FACTORED if r in entry and c in entry), None)
        if pair is None:
            raise UsageError(f"No second moments for {module}.{what} in the optimizer's state "
                             f"(keys {sorted(entry)}); supported: Adam, AdamW and Adafactor "
                             "(torch's or transformers').")
        row, col = entry[pair[0]].double(), entry[pair[1]].double()
        if pair == _FACTORED[0]:  # transformers: row [..., R], col [..., C]
            row, col = row.unsqueeze(-1), col.unsqueeze(-2)
        v = row * col / row.mean(-2, keepdim=True)  # row [..., R, 1], col [..., 1, C]
    if hasattr(v, "full_tensor"):  # a DTensor (FSDP2): every rank gathers the whole
        v = v.full_tensor()
    if tuple(v.shape) != tuple(parameter.shape):
        raise UsageError(f"The optimizer's second moments for {module}.{what} have shape "
                         f"{tuple(v.shape)}, the parameter {tuple(parameter.shape)}: params= is "
                         "not in the optimizer's order.")
    return v.detach().to("cpu", torch.float64)


def add_to_statistics(statistics, modules: Mapping[str, TrackedModule],
                      projections: Mapping, optimizer, params=None) -> None:
    """Put each watched layer's projected factors into `statistics` (replacing earlier ones),
    where the `optimizer` curvature kind reads them."""
    moments = second_moments(modules, optimizer, params)
    statistics.drop(OPTIMIZER_OUT)
    statistics.drop(OPTIMIZER_IN)
    for name, v in moments.items():
        s_out, s_in = kronecker_factors(v)
        projection = projections[name]
        statistics.accumulate(name, OPTIMIZER_OUT, projected(s_out, projection.p_out).float(), 1)
        statistics.accumulate(name, OPTIMIZER_IN, projected(s_in, projection.p_in).float(), 1)


def add_to_run(statistics, layers, optimizer, params, project_dir: str, logging: bool) -> None:
    """`run.add_optimizer_state`: the factors of the run's watched `layers` (a TrackedLayers)
    into its `statistics`, saved at once to the log in `project_dir` unless the run is
    `logging` (its finalize() saves them)."""
    if not layers.modules:
        raise UsageError("add_optimizer_state() needs the watched layers: call "
                         "run.watch(model) (and run.add_lora or initialize_from_log) first.")
    add_to_statistics(statistics, layers.modules, layers.projections, optimizer, params)
    manifest = load_optional(project_dir)
    if not logging and manifest is not None and distributed.rank() == 0:
        state.save_statistics(project_dir, statistics.state_dict(), manifest)

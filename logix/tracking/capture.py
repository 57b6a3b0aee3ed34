"""Hooks that turn one training step into projected per-example gradients and statistics.

Hooks exist only inside a `GradientCapture` context (one per `run.start()` / `run.end()`): the
forward hook projects the layer input and registers a hook on the layer output; that hook projects
the incoming output gradient and adds dy~ x~^T to the example's gradient. Each call of a layer
pairs its own input with its own output gradient, so layers called several times in a step,
several backward passes over the step's examples and gradient checkpointing (whose recomputed
outputs never receive a gradient) all sum correctly; micro-batches of other examples need a
step each. The hooks only read tensors: the model's own gradients and outputs
are untouched.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor

from logix.errors import ConfigError, UsageError
from logix.logra import Projection
from logix.statistics.covariance import BACKWARD, FORWARD, GRAD, CovarianceState
from logix.tracking.modules import TrackedLinear, TrackedModule


@dataclass(frozen=True)
class CaptureSpec:
    """What a step collects (from `run.setup`): `run.capture_spec`."""

    log_grad: bool = False
    grad_covariance: bool = False
    forward_covariance: bool = False
    backward_covariance: bool = False

    @property
    def needs_backward(self) -> bool:
        return self.log_grad or self.grad_covariance or self.backward_covariance

    @property
    def needs_grad(self) -> bool:
        return self.log_grad or self.grad_covariance

    @functools.cached_property
    def covariances(self) -> frozenset:
        """The covariance kinds this spec collects."""
        return frozenset(kind for kind, on in ((FORWARD, self.forward_covariance),
                                               (BACKWARD, self.backward_covariance),
                                               (GRAD, self.grad_covariance)) if on)


# What `run.setup` accepts per stage; old LogIX spellings map onto these.
SETUP_CHOICES = {"forward": {"covariance"}, "backward": {"covariance"},
                 "grad": {"log", "covariance"}}
_SETUP_ALIASES = {"cov": "covariance", "save": "log"}


def spec_from_setup(spec: Dict[str, Iterable[str]]) -> CaptureSpec:
    """The CaptureSpec of a `run.setup` argument such as {"grad": ["log", "covariance"], "forward":
    ["covariance"], "backward": ["covariance"]}."""
    if not isinstance(spec, dict):
        raise ConfigError(f"setup() takes a dict like {{'grad': ['log']}}, got {spec!r}.")
    chosen = set()
    for stage, items in spec.items():
        if stage not in SETUP_CHOICES:
            raise ConfigError(f"setup() stage {stage!r} is unknown; allowed stages: "
                              f"{sorted(SETUP_CHOICES)}.")
        for item in [items] if isinstance(items, str) else items:
            item = _SETUP_ALIASES.get(item, item)
            if item not in SETUP_CHOICES[stage]:
                raise ConfigError(f"setup() {stage!r}: {item!r} is not supported; allowed: "
                                  f"{sorted(SETUP_CHOICES[stage])}.")
            chosen.add((stage, item))
    return CaptureSpec(log_grad=("grad", "log") in chosen,
                grad_covariance=("grad", "covariance") in chosen,
                forward_covariance=("forward", "covariance") in chosen,
                backward_covariance=("backward", "covariance") in chosen)


ProjectionFor = Callable[[str, torch.device, torch.dtype], Projection]
FLOAT32_MAX = torch.finfo(torch.float32).max


class RowLayout:
    """Where each module's projected gradient goes in a row: `columns` (name -> (offset,
    rank_out, rank_in)) in a row of width `dim`, and the runs of adjacent modules of one shape
    (`runs`, lists of names), whose outer products one multiply can write together."""

    def __init__(self, columns: Dict[str, Tuple[int, int, int]]) -> None:
        self.columns = columns
        self.dim = sum(r_out * r_in for _, r_out, r_in in columns.values())
        self.runs: List[List[str]] = []
        end, shape = None, None
        for name, (offset, r_out, r_in) in sorted(columns.items(), key=lambda c: c[1][0]):
            if offset != end or (r_out, r_in) != shape:
                self.runs.append([])
            self.runs[-1].append(name)
            end, shape = offset + r_out * r_in, (r_out, r_in)
        self.slot = {name: (k, j) for k, run in enumerate(self.runs) for j, name in enumerate(run)}

    def width(self, name: str) -> Tuple[int, int]:
        """(offset, width) of the module's columns."""
        offset, r_out, r_in = self.columns[name]
        return offset, r_out * r_in


class GradientCapture:
    """Registers hooks on enter, removes every handle on exit.

    The hooks write each module's projected gradient straight into its columns (`layout`) of one
    [batch, layout.dim] float32 buffer per step (`rows`), so the step's rows need no
    concatenation. `spare` is an earlier step's buffer that nobody reads any more: reused when its
    shape fits, it saves the page faults of fresh memory (about as costly as the projections
    themselves on a small model).

    The hot path is a linear layer that sees one position per example (input [batch, features]):
    its projected input and output gradient go into step buffers shared by its run of equally
    shaped neighbours (`RowLayout.runs`), and exit writes the outer products dy~ x~^T of a whole
    run with one multiply instead of one per layer."""

    def __init__(self, modules: Dict[str, TrackedModule], projection_for: ProjectionFor,
                 spec: CaptureSpec, statistics: CovarianceState, layout: RowLayout,
                 mask: Optional[Tensor] = None, examples: Optional[int] = None,
                 counted: Optional[List[int]] = None, spare: Optional[Tensor] = None,
                 per_token: bool = False, factors: Optional[Dict] = None) -> None:
        self.modules = modules
        self.projection_for = projection_for
        self.spec = spec
        self.statistics = statistics
        self.mask = mask
        self.examples = examples  # number of data ids of the step
        # Positions of the examples whose rows the log keeps; statistics count only those
        # (None: every example).
        self.counted = None if counted is None else torch.tensor(counted, dtype=torch.long)
        self.batch_size: Optional[int] = None
        self.layout = layout
        self.rows: Optional[Tensor] = None  # [B, layout.dim] float32, from the first gradient on
        self._spare = spare
        self.grads: Dict[str, Tensor] = {}  # name -> [B, rank_out, rank_in], views of rows
        # Queries only: each token position's part of the projected gradient (their sum over
        # positions is `grads`), name -> [B, N, rank_out, rank_in], float32.
        self.per_token = per_token
        self.token_grads: Dict[str, Tensor] = {}
        self.forwards: Dict[str, int] = dict.fromkeys(modules, 0)  # forward calls
        self.calls: Dict[str, int] = dict.fromkeys(modules, 0)  # output gradients received
        self.mask_matched = False
        self._handles: List = []
        self._detached = False
        self._needs_backward = spec.needs_backward
        # The hot path: per run of layout.runs, x~ [layers, B, rank_in] and dy~ [layers, B,
        # rank_out] of each layer's first call (`_claimed`); `_deferred` (name -> slot) are the
        # layers whose outer product exit still has to write. `factors` keeps those buffers
        # for the next step ((run, side) -> tensor), which reuses them when their shape fits.
        self._batched = spec.needs_grad and not per_token
        self._factors = {} if factors is None else factors
        self._claimed: set = set()
        self._deferred: Dict[str, Tuple[int, int]] = {}
        self._outer_only: set = set()  # layers whose columns are one product written at exit

    def __enter__(self) -> "GradientCapture":
        for name, tracked in self.modules.items():
            self._handles.append(tracked.module.register_forward_hook(
                self._forward_hook(tracked), with_kwargs=True))
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.detach()
        if exc_type is None:
            self._write_deferred()

    def detach(self) -> None:
        """Remove the hooks (a step given up: nothing more is written)."""
        self._detached = True  # a later backward through this step's graph adds nothing
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _forward_hook(self, tracked: TrackedModule):
        name = tracked.name

        def hook(module, inputs, kwargs, output):
            # The layer's input, passed by position or by keyword (`layer(input=x)`).
            x = inputs[0] if inputs else next(iter(kwargs.values()), None)
            if not isinstance(x, Tensor):
                return
            self.forwards[name] += 1
            wants_backward = self._needs_backward
            replaced = None
            if wants_backward and not (isinstance(output, Tensor) and output.requires_grad):
                if not (isinstance(output, Tensor) and output.is_floating_point()
                        and torch.is_grad_enabled()):
                    return  # no gradient will come (inference, or a checkpoint's no-grad pass)
                # Frozen weights and an input that needs no gradient: the output becomes a leaf
                # that does, so backward reaches this layer (and the ones after it) without
                # computing a weight gradient; nothing before it is changed.
                output = replaced = output.detach().requires_grad_()
            if wants_backward and tracked.broadcast_input and x.shape[0] == 1 \
                    and (self.examples or 1) > 1 and output.shape[0] == 1:
                # One input row shared by the batch (position ids [1, T]): each example gets its
                # own view of the output, so its gradient arrives per example. The values are
                # the same and autograd sums the views back: training is unchanged.
                x = x.expand(self.examples, *x.shape[1:])
                output = replaced = output.expand(self.examples, *output.shape[1:])
            self._check_batch(name, x)
            dtype = _compute_dtype(x, module)
            projection = self.projection_for(name, x.device, dtype)
            with torch.no_grad(), _full_precision(x.device):
                x = x.detach().to(dtype) if x.is_floating_point() else x.detach()
                slot = self._claim_slot(tracked, x, projection)
                if slot is not None:
                    x_proj = self._project_into_slot(tracked, x, projection, slot)
                    mask = None
                else:
                    x_proj = tracked.project_input(x, projection.p_in)  # [B, g, N, r_in]
                    mask = tracked.token_mask(x, self.mask)
                    if mask is not None:
                        self.mask_matched = True
                        x_proj = x_proj * mask[:, None, :, None].to(x_proj.dtype)
                if not wants_backward:
                    self._forward_statistics(name, x_proj, mask)
                    return
            output.register_hook(self._output_grad_hook(tracked, projection, x_proj, mask, slot))
            return replaced

        return hook

    def _output_grad_hook(self, tracked: TrackedModule, projection: Projection, x_proj: Tensor,
                          mask: Optional[Tensor], slot: Optional[Tuple[int, int]]):
        name = tracked.name

        def hook(dy: Tensor) -> None:
            if self._detached:  # e.g. retain_graph: the step's shared buffers are the next's
                return
            with torch.no_grad(), _full_precision(dy.device):
                if self.spec.forward_covariance:
                    self._forward_statistics(name, x_proj, mask)
                if slot is not None and name in self._deferred:
                    # A second backward through this call: its first product goes in first,
                    # before the slot takes the new output gradient.
                    self._write_outer(name)
                in_slot = slot is not None and dy.dim() == 2
                if in_slot:
                    dy_proj = self._project_output_into_slot(tracked, dy, projection, slot)
                else:
                    dy_proj = tracked.project_output(dy.to(x_proj.dtype), projection.p_out)
                if self.spec.backward_covariance:
                    # A sum over tokens and calls per example: a layer's later calls in the
                    # step add output gradients of the same examples, not new examples.
                    counted = self._counted(dy_proj)
                    rows = counted.reshape(-1, counted.shape[-1])
                    examples = counted.shape[0] if self.calls[name] == 0 else 0
                    self.statistics.update(name, BACKWARD, rows, examples)
                if self.spec.needs_grad:
                    if in_slot and name not in self.grads:
                        self.grads[name] = self._columns_of(name, dy.shape[0], dy.device)
                        self._deferred[name] = slot
                    else:
                        self._add_grad(name, dy_proj.float(), x_proj.float())
                    if self.per_token:
                        self._add_token_grads(name, dy_proj, x_proj)
                self.calls[name] += 1

        return hook

    def _claim_slot(self, tracked: TrackedModule, x: Tensor,
                    projection: Projection) -> Optional[Tuple[int, int]]:
        """The hot-path slot (run, position) of this call, or None for the general path: only
        the first call in the step of a projected linear layer on [batch, features] float32."""
        if not (self._batched and x.dim() == 2 and x.dtype == torch.float32
                and type(tracked) is TrackedLinear and projection.p_in is not None
                and projection.p_out is not None and tracked.name not in self._claimed):
            return None
        self._claimed.add(tracked.name)
        return self.layout.slot[tracked.name]

    def _project_into_slot(self, tracked: "TrackedLinear", x: Tensor, projection: Projection,
                           slot: Tuple[int, int]) -> Tensor:
        """x~ of a hot-path call, written into its slot; returned as [B, 1, 1, rank_in]."""
        out = self._slot_view("in", slot, x.shape[0], projection.p_in.shape[0], x.device)
        tracked.project_input_rows(x, projection.p_in, out)
        return out.view(x.shape[0], 1, 1, -1)

    def _project_output_into_slot(self, tracked: "TrackedLinear", dy: Tensor,
                                  projection: Projection, slot: Tuple[int, int]) -> Tensor:
        out = self._slot_view("out", slot, dy.shape[0], projection.p_out.shape[0], dy.device)
        tracked.project_output_rows(dy.to(torch.float32), projection.p_out, out)
        return out.view(dy.shape[0], 1, 1, -1)

    def _slot_view(self, side: str, slot: Tuple[int, int], b: int, rank: int,
                   device: torch.device) -> Tensor:
        """The [b, rank] slot of one layer in its run's float32 [layers, b, rank] buffer of
        this side ("in": x~, "out": dy~); the buffer is an earlier step's when it fits."""
        run, position = slot
        shape = (len(self.layout.runs[run]), b, rank)
        buffer = self._factors.get((run, side))
        if buffer is None or buffer.shape != shape or buffer.device != device:
            buffer = self._factors[(run, side)] = torch.empty(shape, device=device)
        return buffer[position]

    def rows_known_finite(self, scale: float) -> bool:
        """True when every number of the step's rows times `scale` is finite, known without
        reading the rows: every layer's columns are one outer product dy~ x~^T written at exit,
        and max|dy~| max|x~| |scale| over each run's factors is a finite number below float32's
        largest (a NaN or inf factor, or a possible overflow, gives False: check the rows)."""
        if len(self._outer_only) != len(self.layout.columns):
            return False
        extents = torch.stack([v for run in range(len(self.layout.runs)) for side in ("in", "out")
                               for v in torch.aminmax(self._factors[(run, side)])]).tolist()
        for x_lo, x_hi, dy_lo, dy_hi in zip(*[iter(extents)] * 4):  # one run at a time
            if not all(math.isfinite(v) for v in (x_lo, x_hi, dy_lo, dy_hi)):
                return False
            bound = max(-x_lo, x_hi) * max(-dy_lo, dy_hi) * abs(scale)
            if not bound < FLOAT32_MAX:  # (False for a NaN scale too)
                return False
        return True

    def _write_deferred(self) -> None:
        """Write the outer products of the hot-path layers: one multiply per run whose layers
        all took the hot path, one per layer otherwise."""
        self._outer_only = set(self._deferred)
        if not self._deferred:
            return
        for run, names in enumerate(self.layout.runs):
            if len(names) > 1 and all(n in self._deferred for n in names):
                offset, r_out, r_in = self.layout.columns[names[0]]
                b = self.rows.shape[0]
                block = self.rows[:, offset:offset + len(names) * r_out * r_in]
                torch.mul(self._factors[(run, "out")].transpose(0, 1).unsqueeze(3),
                          self._factors[(run, "in")].transpose(0, 1).unsqueeze(2),
                          out=block.view(b, len(names), r_out, r_in))
                for n in names:
                    del self._deferred[n]
        for name in list(self._deferred):
            self._write_outer(name)

    def _write_outer(self, name: str) -> None:
        run, position = self._deferred.pop(name)
        torch.mul(self._factors[(run, "out")][position].unsqueeze(2),
                  self._factors[(run, "in")][position].unsqueeze(1), out=self.grads[name])

    def _add_token_grads(self, name: str, dy_proj: Tensor, x_proj: Tensor) -> None:
        # [B, g, N, r_out] x [B, g, N, r_in] -> [B, N, r_out, r_in]: one small outer product
        # per position, never a full per-token gradient (unless the layer is unprojected).
        tokens = torch.einsum("bgno,bgni->bnoi", dy_proj.float(), x_proj.float())
        known = self.token_grads.get(name)
        if known is None:
            self.token_grads[name] = tokens
        elif known.shape == tokens.shape:
            known += tokens
        else:
            raise UsageError(f"Module {name!r} was called twice in a per-token step with "
                             f"{known.shape[1]} and {tokens.shape[1]} positions; per-token "
                             "scores need one token axis per layer. Leave the layer out of "
                             "run.watch(model, name_filter=...).")

    def _columns_of(self, name: str, b: int, device: torch.device) -> Tensor:
        """The module's columns of the step's rows as [B, rank_out, rank_in] (the rows buffer
        is made at the first gradient of the step)."""
        if self.rows is None:
            spare = self._spare
            fits = spare is not None and spare.shape == (b, self.layout.dim) \
                and spare.device == device
            self.rows = spare if fits else torch.empty(b, self.layout.dim, device=device)
        offset, r_out, r_in = self.layout.columns[name]
        return self.rows[:, offset:offset + r_out * r_in].view(b, r_out, r_in)

    def _add_grad(self, name: str, dy_proj: Tensor, x_proj: Tensor) -> None:
        """Add sum_{g,n} dy~ x~^T ([B, g, N, r_out] x [B, g, N, r_in] -> [B, r_out, r_in]) to
        the module's slot of the step's rows."""
        b, r_out, r_in = dy_proj.shape[0], dy_proj.shape[-1], x_proj.shape[-1]
        if name in self._deferred:  # a layer's later call: its first call's product goes first
            self._write_outer(name)
        grad = self.grads.get(name)
        first = grad is None
        if first:
            grad = self.grads[name] = self._columns_of(name, b, dy_proj.device)
        if dy_proj.shape[1] * dy_proj.shape[2] == 1:  # one position: an outer product
            dy_proj, x_proj = dy_proj.reshape(b, r_out, 1), x_proj.reshape(b, 1, r_in)
            if first:
                torch.mul(dy_proj, x_proj, out=grad)
            else:
                grad.addcmul_(dy_proj, x_proj)
            return
        prod = torch.bmm(dy_proj.reshape(b, -1, r_out).transpose(1, 2),
                         x_proj.reshape(b, -1, r_in))
        if first:
            grad.copy_(prod)
        else:
            grad.add_(prod)

    def _forward_statistics(self, name: str, x_proj: Tensor, mask: Optional[Tensor]) -> None:
        x_proj = self._counted(x_proj)
        mask = None if mask is None else self._counted(mask)
        rows = x_proj.reshape(-1, x_proj.shape[-1])
        if mask is None:
            count = rows.shape[0]
        else:
            count = float(mask.sum()) * x_proj.shape[1]
        self.statistics.update(name, FORWARD, rows, count)

    def _counted(self, t: Tensor) -> Tensor:
        """The counted examples of a per-example tensor [B, ...] (all when the batch does not
        line up with the data ids; end() refuses such a step)."""
        if self.counted is None or t.shape[0] != self.examples:
            return t
        return t[self.counted.to(t.device)]

    def _check_batch(self, name: str, x: Tensor) -> None:
        if self.batch_size is None:
            self.batch_size = x.shape[0]
            if self.mask is not None and self.mask.shape[0] != self.batch_size:
                raise UsageError(f"mask has shape {tuple(self.mask.shape)} but the batch has "
                                 f"{self.batch_size} examples; pass a mask of shape "
                                 "[batch, tokens] (e.g. the attention_mask).")
        elif x.shape[0] != self.batch_size:
            raise UsageError(f"Module {name!r} saw a batch of {x.shape[0]} examples but an "
                             f"earlier module saw {self.batch_size}. LogIX needs dim 0 of every "
                             "tracked layer's input to be the example axis; leave layers whose "
                             "input mixes or is shared by the examples out of "
                             "run.watch(model, name_filter=...).")


def _full_precision(device: torch.device):
    """Autocast off inside the hooks: in a user's autocast region the projections and
    statistics would run in bfloat16 / float16 (and mix dtypes between forward and backward)."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _compute_dtype(x: Tensor, module: torch.nn.Module) -> torch.dtype:
    """Project in the layer's floating dtype (embeddings see integer ids), at least float32:
    bfloat16 / float16 inputs and output gradients are projected in float32, not rounded."""
    weight = getattr(module, "weight", None)
    dtype = x.dtype if x.is_floating_point() else getattr(weight, "dtype", torch.float32)
    return torch.promote_types(dtype, torch.float32)

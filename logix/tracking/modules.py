"""Per-module-type LoGra math: how to project a module's input and output gradient.

Each supported layer type is one small subclass of `TrackedModule`, registered by
`__init_subclass__`. A layer's full weight gradient is viewed as a matrix G of shape
[out_dim, in_dim] (for nn.Linear that is `weight.grad`; the bias, when included, is one more input
column fed by a constant 1). LoGra logs P_out G P_in^T, computed from projected inputs and projected
output gradients without ever forming G:

    x~  = P_in  x     [B, groups, N, rank_in]   N = tokens or spatial positions
    dy~ = P_out dy    [B, groups, N, rank_out]
    G~  = sum_{g,n} dy~ x~^T                    [B, rank_out, rank_in]

A projection of None means the identity (full gradients; small models and exactness tests).
"""

from __future__ import annotations

import abc
import math
from typing import ClassVar, Dict, Optional, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn


_REGISTRY: Dict[type, Type["TrackedModule"]] = {}


class TrackedModule(abc.ABC):
    """A watched layer: its name, gradient shape and projection math."""

    module_type: ClassVar[type]
    groups: int = 1
    # True when a batch-1 input may be shared by every example (position ids [1, T] of an
    # embedding): the hooks then expand it to the batch to see per-example gradients.
    broadcast_input: ClassVar[bool] = False

    def __init_subclass__(cls, module_type: Optional[type] = None, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if module_type is not None:
            cls.module_type = module_type
            _REGISTRY[module_type] = cls

    def __init__(self, name: str, module: nn.Module, include_bias: bool) -> None:
        self.name = name
        self.module = module
        self.has_bias = bool(include_bias and getattr(module, "bias", None) is not None)
        self.in_dim, self.out_dim = self._gradient_shape()

    @property
    def type_name(self) -> str:
        return type(self.module).__name__

    @abc.abstractmethod
    def _gradient_shape(self) -> tuple:
        """(in_dim, out_dim) of the weight gradient matrix, bias column included."""

    @abc.abstractmethod
    def project_input(self, x: Tensor, p_in: Optional[Tensor]) -> Tensor:
        """[B, ...] layer input -> [B, groups, N, rank_in]."""

    @abc.abstractmethod
    def project_output(self, dy: Tensor, p_out: Optional[Tensor]) -> Tensor:
        """[B, ...] gradient of the layer output -> [B, groups, N, rank_out]."""

    def token_mask(self, x: Tensor, mask: Optional[Tensor]) -> Optional[Tensor]:
        """The mask as [B, N] when it lines up with this layer's tokens, else None."""
        if mask is None or x.dim() < 3 or tuple(x.shape[:2]) != tuple(mask.shape):
            return None
        return mask.reshape(mask.shape[0], -1)

    def weight_gradient(self) -> Tensor:
        """The layer's current .grad as the [out_dim, in_dim] matrix that LoGra projects."""
        bias = self.module.bias.grad if self.has_bias else None
        return self.as_matrix(self.module.weight.grad, bias)

    def as_matrix(self, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        """A tensor shaped like the weight (a gradient, an optimizer's second moments) as the
        [out_dim, in_dim] matrix of LoGra's rows, `bias` (shaped like the bias) as the last
        column when the layer's bias is tracked."""
        matrix = self._weight_matrix(weight)
        return torch.cat([matrix, bias[:, None]], 1) if self.has_bias else matrix

    @abc.abstractmethod
    def _weight_matrix(self, weight: Tensor) -> Tensor:
        """`weight`-shaped -> [out, in] without the bias column."""


def _affine(x: Tensor, p_in: Optional[Tensor], has_bias: bool) -> Tensor:
    """x [..., k] -> x P^T, with P's last column applied to a constant 1 when has_bias."""
    if p_in is None:
        return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1) if has_bias else x
    if has_bias:
        return torch.addmm(p_in[:, -1], x.reshape(-1, x.shape[-1]), p_in[:, :-1].T).reshape(
            *x.shape[:-1], -1)
    return x @ p_in.T


class TrackedLinear(TrackedModule, module_type=nn.Linear):
    def _gradient_shape(self):
        return self.module.in_features + self.has_bias, self.module.out_features

    def project_input(self, x, p_in):
        x = x.reshape(x.shape[0], -1, x.shape[-1])  # [B, N, in]
        return _affine(x, p_in, self.has_bias).unsqueeze(1)

    def project_output(self, dy, p_out):
        dy = dy.reshape(dy.shape[0], -1, dy.shape[-1])  # [B, N, out]
        return (dy if p_out is None else dy @ p_out.T).unsqueeze(1)

    def project_input_rows(self, x: Tensor, p_in: Tensor, out: Tensor) -> Tensor:
        """One position per example: x [B, in] -> x~ [B, rank_in], written into `out` (the
        same product as project_input's)."""
        if self.has_bias:
            return torch.addmm(p_in[:, -1], x, p_in[:, :-1].T, out=out)
        return torch.mm(x, p_in.T, out=out)

    def project_output_rows(self, dy: Tensor, p_out: Tensor, out: Tensor) -> Tensor:
        """dy [B, out] -> dy~ [B, rank_out], written into `out`."""
        return torch.mm(dy, p_out.T, out=out)

    def _weight_matrix(self, weight):
        return weight


class TrackedEmbedding(TrackedModule, module_type=nn.Embedding):
    broadcast_input = True

    def _gradient_shape(self):
        return self.module.num_embeddings, self.module.embedding_dim

    def project_input(self, ids, p_in):
        ids = ids.reshape(ids.shape[0], -1)  # [B, N]
        if p_in is None:
            x = F.one_hot(ids, self.module.num_embeddings).float()
        else:
            x = F.embedding(ids, p_in.T)  # [B, N, rank_in]: a gather of P_in's columns
        if self.module.padding_idx is not None:
            x = x * (ids != self.module.padding_idx).unsqueeze(-1).to(x.dtype)
        return x.unsqueeze(1)

    def project_output(self, dy, p_out):
        dy = dy.reshape(dy.shape[0], -1, dy.shape[-1])
        return (dy if p_out is None else dy @ p_out.T).unsqueeze(1)

    def token_mask(self, ids, mask):
        if mask is None or tuple(ids.shape) != tuple(mask.shape) or ids.dim() < 2:
            return None
        return mask.reshape(mask.shape[0], -1)

    def _weight_matrix(self, weight):
        return weight.T


class _TrackedConv(TrackedModule):
    """nn.Conv1d / nn.Conv2d: P_in is applied as a convolution with the layer's geometry."""

    conv = None  # F.conv1d or F.conv2d

    def __init__(self, name, module, include_bias):
        super().__init__(name, module, include_bias)
        self.groups = module.groups

    def _gradient_shape(self):
        m = self.module
        return m.in_channels // m.groups * math.prod(m.kernel_size) + self.has_bias, m.out_channels

    def _kernel_in(self) -> int:
        return self.in_dim - self.has_bias

    def project_input(self, x, p_in):
        m, g = self.module, self.groups
        if p_in is None:  # identity: one output channel per (channel, kernel offset)
            p_in = torch.eye(self.in_dim, device=x.device, dtype=x.dtype)
        rank = p_in.shape[0]
        weight = p_in[:, : self._kernel_in()].reshape(rank, m.in_channels // g, *m.kernel_size)
        bias = p_in[:, -1].repeat(g) if self.has_bias else None
        padding = m.padding
        if m.padding_mode != "zeros":
            x = F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode)
            padding = 0
        out = type(self).conv(x, weight.repeat(g, *[1] * (weight.dim() - 1)), bias, m.stride,
                              padding, m.dilation, g)  # [B, g * rank, *spatial]
        return out.reshape(out.shape[0], g, rank, -1).transpose(2, 3)  # [B, g, N, rank]

    def project_output(self, dy, p_out):
        g = self.groups
        dy = dy.reshape(dy.shape[0], g, self.out_dim // g, -1)  # [B, g, out/g, N]
        if p_out is None:
            if g == 1:
                return dy.transpose(2, 3)
            p_out = torch.eye(self.out_dim, device=dy.device, dtype=dy.dtype)
        p_out = p_out.reshape(p_out.shape[0], g, self.out_dim // g)  # [rank, g, out/g]
        return torch.einsum("bgon,rgo->bgnr", dy, p_out)

    def token_mask(self, x, mask):
        return None

    def _weight_matrix(self, weight):
        return weight.reshape(self.out_dim, -1)


class TrackedConv1d(_TrackedConv, module_type=nn.Conv1d):
    conv = staticmethod(F.conv1d)


class TrackedConv2d(_TrackedConv, module_type=nn.Conv2d):
    conv = staticmethod(F.conv2d)


def _register_hf_conv1d() -> None:
    """Hugging Face's Conv1D (GPT-2) is a Linear with a transposed weight [in, out]."""
    import sys

    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    if pytorch_utils is None or pytorch_utils.Conv1D in _REGISTRY:
        return

    class TrackedHFConv1D(TrackedLinear, module_type=pytorch_utils.Conv1D):
        def _gradient_shape(self):
            in_features, out_features = self.module.weight.shape
            return in_features + self.has_bias, out_features

        def _weight_matrix(self, weight):
            return weight.T


def tracked_class(module: nn.Module) -> Optional[Type[TrackedModule]]:
    """The TrackedModule subclass for this layer, or None when its type is not supported."""
    _register_hf_conv1d()  # only if transformers was already imported by the user
    for klass in type(module).__mro__:
        if klass in _REGISTRY:
            return _REGISTRY[klass]
    return None


# Children that their parent uses through their parameters, never by calling them: hooks on them
# never fire. parent type -> {child attribute: why}.
_BYPASSED = {
    nn.MultiheadAttention: {
        "out_proj": "nn.MultiheadAttention uses out_proj's weight directly and never calls its "
                    "forward, so hooks on it never fire. Its gradient is not logged."},
}


def bypassed_layers(model: nn.Module) -> Dict[str, str]:
    """{name: why} of the layers of `model` whose forward their parent never calls."""
    found = {}
    for name, module in model.named_modules():
        for parent_type, children in _BYPASSED.items():
            if isinstance(module, parent_type):
                for child, why in children.items():
                    found[f"{name}.{child}" if name else child] = why
    return found


def tied_layers(modules: Dict[str, TrackedModule]) -> list:
    """[(first, second)] names of tracked layers that share one weight parameter."""
    owner, pairs = {}, []
    for name, tracked in modules.items():
        weight = getattr(tracked.module, "weight", None)
        if weight is None:
            continue
        if id(weight) in owner:
            pairs.append((owner[id(weight)], name))
        else:
            owner[id(weight)] = name
    return pairs


def supported_types() -> list:
    _register_hf_conv1d()
    return sorted(t.__module__.split(".")[0] + "." + t.__name__ for t in _REGISTRY)


"""Matrix-free curvature products of a model's loss: Hessian- and Gauss-Newton-vector products
through torch.func, batched over vectors, at chosen values of chosen parameters.

`params` are flat vectors over `names` (named_parameters names of the model) with `shapes`;
every other parameter keeps its value. forward(model, batch) -> outputs; loss_fn(outputs,
batch) -> the batch's loss. Used by LiSSA (logix.influence.lissa) and by the CG solves of the
``hessian`` / ``ggn`` curvature kinds (logix.influence.hessian).
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor


def hessian_products(model, forward, loss_fn, batch, base, names, shapes, u: Tensor) -> Tensor:
    """[k, P] Hessian-vector products of the batch loss at `base` ({name: value})."""
    from torch.func import grad, jvp, vmap

    def loss(flat):
        return loss_fn(forward_at(model, forward, batch, unflatten(flat, names, shapes)), batch)

    point = flatten(base, names)
    return vmap(lambda t: jvp(grad(loss), (point,), (t,))[1])(u)


def gauss_newton_products(model, forward, loss_fn, batch, base, names, shapes,
                          u: Tensor) -> Tensor:
    """[k, P] Gauss-Newton-vector products J^T H_out J u at `base`."""
    from torch.func import grad, jvp, vjp, vmap

    point = flatten(base, names)

    def outputs(flat):
        return forward_at(model, forward, batch, unflatten(flat, names, shapes))

    out, pullback = vjp(outputs, point)

    def one(t):
        _, ju = jvp(outputs, (point,), (t,))
        _, hju = jvp(grad(lambda o: loss_fn(o, batch)), (out,), (ju,))
        return pullback(hju)[0]

    return vmap(one)(u)


def forward_at(model, forward, batch, params: Dict[str, Tensor]):
    """forward(model, batch) with the model's `params` replaced (torch.func.functional_call)."""
    from torch.func import functional_call

    return forward(lambda *args, **kwargs: functional_call(model, params, args, kwargs), batch)


def flatten(tensors: Dict[str, Tensor], names) -> Tensor:
    return torch.cat([tensors[n].reshape(-1) for n in names])


def unflatten(flat: Tensor, names, shapes) -> Dict[str, Tensor]:
    out, start = {}, 0
    for n, s in zip(names, shapes):
        out[n] = flat[start:start + s.numel()].reshape(s)
        start += s.numel()
    return out

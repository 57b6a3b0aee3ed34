"""Running uncentred covariances, kept as sums and counts until they are read.

Kinds and their definitions (x~, dy~ projected; per module):
- ``forward``:  sum over real tokens of x~ x~^T,          divided by the number of real tokens.
- ``backward``: sum over tokens of dy~ dy~^T,             divided by the number of examples.
- ``grad``:     sum over examples of vec(G~) vec(G~)^T,    divided by the number of examples.
- ``grad_peak``: the largest ||G~||^2 of one example, kept as a maximum (count 1); over the
  trace of the ``grad`` sum it is the share of the Fisher one example carries (``ekfac_peak``:
  the same over the rows EK-FAC is fitted from; docs/concepts.md, "When one example dominates
  the Fisher").
With these, forward (x) backward matches the per-example gradient covariance in scale (exactly so
for one token per example), which is what K-FAC approximates.
"""

from __future__ import annotations

from typing import Dict, Iterator, Optional, Tuple

import torch
from torch import Tensor

from logix.distributed import all_gather_objects, all_reduce_max, all_reduce_sum, is_distributed
from logix.storage.format import KEY_SEP, state_key

FORWARD, BACKWARD, GRAD = "forward", "backward", "grad"
KINDS = (FORWARD, BACKWARD, GRAD)
# An optimizer's second moments as projected Kronecker factors (logix.tracking.optimizer_state).
OPTIMIZER_OUT, OPTIMIZER_IN = "optimizer_out", "optimizer_in"
GRAD_PEAK, EKFAC_PEAK = "grad_peak", "ekfac_peak"
PEAKS = (GRAD_PEAK, EKFAC_PEAK)  # combined by maximum, not by sum


class CovarianceState:
    """Sums of outer products and their counts, per (module, kind)."""

    def __init__(self, device: Optional[torch.device] = None) -> None:
        self.device = device
        self.sums: Dict[Tuple[str, str], Tensor] = {}
        self.counts: Dict[Tuple[str, str], float] = {}
        self.version = 0  # bumped on every change, so cached inverses know they are stale

    def update(self, module: str, kind: str, rows: Tensor, count: float) -> None:
        """Add rows^T rows (rows: [M, d]) and `count` observations."""
        self.version += 1
        rows = rows.float()
        if self.device is not None:
            # blocking: a non_blocking device->CPU copy may not have landed when addmm_ reads it
            rows = rows.to(self.device)
        key = (module, kind)
        if key in self.sums:
            self.sums[key].addmm_(rows.T, rows)
        else:
            self.sums[key] = rows.T @ rows
        self.counts[key] = self.counts.get(key, 0.0) + float(count)

    def accumulate(self, module: str, kind: str, total: Tensor, count: float) -> None:
        """Add a precomputed sum (e.g. EK-FAC's squared rotated gradients) and its count."""
        self.version += 1
        key = (module, kind)
        total = total.to(self.device) if self.device is not None else total
        self.sums[key] = self.sums[key] + total if key in self.sums else total.clone()
        self.counts[key] = self.counts.get(key, 0.0) + float(count)

    def raise_peak(self, module: str, kind: str, value: Tensor) -> None:
        """Keep the larger of `value` (a 0-d tensor) and the peak held for (module, kind)."""
        self.version += 1
        key = (module, kind)
        value = value.detach().double().to(self.device or value.device)
        self.sums[key] = torch.maximum(self.sums[key], value) if key in self.sums else value
        self.counts[key] = 1.0

    def scale(self, kind: str, factor: float) -> None:
        """Multiply every module's sum of one kind by `factor` (counts unchanged)."""
        self.version += 1
        for key, total in self.sums.items():
            if key[1] == kind:
                total.mul_(factor)

    def drop(self, kind: str) -> None:
        """Forget every module's statistics of one kind."""
        self.version += 1
        for key in [k for k in self.sums if k[1] == kind]:
            del self.sums[key], self.counts[key]

    def merge(self, other: "CovarianceState") -> None:
        """Add another state's sums and counts (one step's, once the step is kept)."""
        if other.sums:
            self.version += 1
        for key, total in other.sums.items():
            if key[1] in PEAKS:
                self.raise_peak(*key, total)
                continue
            if key in self.sums:
                self.sums[key].add_(total.to(self.sums[key].device))
            else:
                self.sums[key] = total if self.device is None else total.to(self.device)
            self.counts[key] = self.counts.get(key, 0.0) + other.counts[key]

    def get(self, module: str, kind: str) -> Optional[Tensor]:
        """The normalised covariance, or None when nothing was collected."""
        key = (module, kind)
        if key not in self.sums or self.counts[key] == 0:
            return None
        return self.sums[key] / self.counts[key]

    def total(self, module: str, kind: str) -> Optional[Tensor]:
        """The sum as accumulated, not divided by its count (a peak kind: the maximum)."""
        return self.sums.get((module, kind))

    def has(self, kind: str) -> bool:
        return any(k == kind for _, k in self.sums)

    def modules(self) -> Iterator[str]:
        return iter(dict.fromkeys(m for m, _ in self.sums))

    def clear(self) -> None:
        self.version += 1
        self.sums.clear()
        self.counts.clear()

    def all_reduce(self) -> None:
        """Sum sums and counts over torch.distributed ranks (a no-op in one process). Every
        rank must hold the same keys (the same modules and kinds were collected)."""
        if not is_distributed():
            return
        shapes = {}
        for theirs in all_gather_objects({k: (list(v.shape), str(v.dtype).split(".")[-1])
                                          for k, v in self.sums.items()}):
            shapes.update(theirs)
        device = next(iter(self.sums.values())).device if self.sums else self.device
        for key, (shape, dtype) in shapes.items():  # a rank that saw no step joins with zeros
            if key not in self.sums:
                self.sums[key] = torch.zeros(shape, device=device, dtype=getattr(torch, dtype))
                self.counts[key] = 0.0
        for key in sorted(self.sums):
            if key[1] in PEAKS:
                all_reduce_max(self.sums[key])
                self.counts[key] = 1.0
                continue
            all_reduce_sum(self.sums[key])
            count = all_reduce_sum(torch.tensor([self.counts[key]], dtype=torch.float64,
                                                device=self.sums[key].device))
            self.counts[key] = float(count.item())
        self.version += 1

    def state_dict(self) -> Dict[str, Tensor]:
        out = {}
        for (module, kind), total in self.sums.items():
            out[state_key(module, kind)] = total.detach().cpu().contiguous()
            out[state_key(module, kind, "count")] = torch.tensor(
                self.counts[(module, kind)], dtype=torch.float64)
        return out

    def load_state_dict(self, state: Dict[str, Tensor]) -> None:
        self.clear()
        self.version += 1
        for key, value in state.items():
            parts = key.split(KEY_SEP)
            if len(parts) == 3 and parts[2] == "count":
                self.counts[(parts[0], parts[1])] = float(value.item())
            elif len(parts) == 2:
                self.sums[(parts[0], parts[1])] = value.to(self.device) if self.device else value

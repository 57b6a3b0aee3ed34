"""Running top-k and bottom-k per query row while score blocks stream past."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


class TopK:
    def __init__(self, k: int, n_rows: int) -> None:
        if not isinstance(k, int) or k <= 0:
            raise ValueError(f"topk must be a positive integer, got {k!r}.")
        self.k = k
        self.best: Optional[Tuple[Tensor, Tensor]] = None
        self.worst: Optional[Tuple[Tensor, Tensor]] = None

    def update(self, scores: Tensor, start: int) -> None:
        """scores [rows, n] are the columns [start, start + n) of the full matrix."""
        index = torch.arange(start, start + scores.shape[1]).expand(scores.shape[0], -1)
        scores = scores.cpu()
        self.best = _merge(self.best, scores, index, self.k, largest=True)
        self.worst = _merge(self.worst, scores, index, self.k, largest=False)

    def result(self) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """(best scores, best column indices, worst scores, worst indices), each [rows, <=k],
        best sorted descending and worst ascending."""
        if self.best is None:
            empty = torch.zeros(0, 0)
            return empty, empty.long(), empty, empty.long()
        return (*self.best, *self.worst)


def _merge(current, scores: Tensor, index: Tensor, k: int, largest: bool):
    if current is not None:
        scores = torch.cat([current[0], scores], 1)
        index = torch.cat([current[1], index], 1)
    k = min(k, scores.shape[1])
    values, position = torch.topk(scores, k, dim=1, largest=largest, sorted=True)
    return values, torch.gather(index, 1, position)

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
        """scores [rows, n] are the columns [start, start + n) of the full matrix. The block's
        own top-k is taken first, so only k columns per row are merged (no copy of the block)."""
        scores = scores.cpu()
        self.best = _merge(self.best, scores, start, self.k, largest=True)
        self.worst = _merge(self.worst, scores, start, self.k, largest=False)

    def result(self) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """(best scores, best column indices, worst scores, worst indices), each [rows, <=k],
        best sorted descending and worst ascending."""
        if self.best is None:
            empty = torch.zeros(0, 0)
            return empty, empty.long(), empty, empty.long()
        return (*self.best, *self.worst)


def _merge(current, scores: Tensor, start: int, k: int, largest: bool):
    values, position = torch.topk(scores, min(k, scores.shape[1]), dim=1, largest=largest,
                                  sorted=True)
    index = position + start
    if current is None:
        return values, index
    values = torch.cat([current[0], values], 1)
    index = torch.cat([current[1], index], 1)
    values, position = torch.topk(values, min(k, values.shape[1]), dim=1, largest=largest,
                                  sorted=True)
    return values, torch.gather(index, 1, position)

"""A seeded Johnson-Lindenstrauss sketch of wide rows: x -> x S, S [dim, width] Gaussian with
variance 1/width, so <x S, y S> estimates <x, y> without bias. Only the seed is stored; S is
regenerated in column blocks (never held whole when it is large)."""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

_BLOCK = 4096  # input columns per generated block of S
_CACHE_NUMBERS = 1 << 24  # keep S in memory when it has at most this many entries


class Sketch:
    def __init__(self, dim: int, width: int, seed: int = 0) -> None:
        self.dim, self.width, self.seed = dim, width, seed
        self._matrix: Optional[Tensor] = None

    def _block(self, b: int) -> Tensor:
        rows = min(_BLOCK, self.dim - b * _BLOCK)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + b)
        return torch.randn(rows, self.width, generator=generator) / self.width ** 0.5

    def __call__(self, rows: Tensor) -> Tensor:
        """rows [n, dim] (float32) -> [n, width]."""
        n_blocks = -(-self.dim // _BLOCK)
        if self.dim * self.width <= _CACHE_NUMBERS:
            if self._matrix is None:
                self._matrix = torch.cat([self._block(b) for b in range(n_blocks)])
            return rows @ self._matrix
        out = rows.new_zeros(rows.shape[0], self.width)
        for b in range(n_blocks):
            out += rows[:, b * _BLOCK:(b + 1) * _BLOCK] @ self._block(b)
        return out


@functools.lru_cache(maxsize=8)
def cached(dim: int, width: int, seed: int) -> Sketch:
    """One Sketch per (dim, width, seed) in this process: queries reuse its matrix."""
    return Sketch(dim, width, seed)

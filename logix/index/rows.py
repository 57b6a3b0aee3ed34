"""Rows of an index by position (its shards in order, back to back), gathered from the
memory-mapped shards: only the asked rows are read."""

from __future__ import annotations

import os
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor

from logix.errors import LogFormatError
from logix.storage.reader import map_shard


class RowStore:
    def __init__(self, project_dir: str, shards: Sequence[dict], dim: int) -> None:
        self.project_dir = project_dir
        self.files = [s["file"] for s in shards]
        self.dim = dim
        sizes = torch.tensor([s["rows"] for s in shards], dtype=torch.long)
        self.starts = torch.cumsum(sizes, 0) - sizes  # [n_shards] first position of each
        self.rows = int(sizes.sum())
        self._maps: Dict[int, Tuple[List, Tensor]] = {}

    def _map(self, s: int) -> Tuple[List, Tensor]:
        if s not in self._maps:
            path = os.path.join(self.project_dir, self.files[s])
            if not os.path.isfile(path):
                raise LogFormatError(f"Shard {path!r} held by the index is missing; rebuild "
                                     f"the index (logix index DIR --rebuild).")
            self._maps[s] = map_shard(path)
        return self._maps[s]

    def locate(self, positions: Tensor) -> Tuple[Tensor, Tensor]:
        """(shard number, row within the shard) of each position."""
        shard = torch.searchsorted(self.starts, positions, right=True) - 1
        return shard, positions - self.starts[shard]

    def read(self, positions: Tensor) -> Tensor:
        """[n, dim] float32 rows at `positions` (int64)."""
        out = torch.empty(len(positions), self.dim)
        shard, local = self.locate(positions)
        for s in shard.unique().tolist():
            mask = shard == s
            out[mask] = self._map(s)[1][local[mask]].float()
        return out

    def ids(self, positions: Sequence[int]) -> List:
        positions = torch.as_tensor(list(positions), dtype=torch.long)
        if len(positions) == 0:
            return []
        shard, local = self.locate(positions)
        return [self._map(s)[0][i] for s, i in zip(shard.tolist(), local.tolist())]

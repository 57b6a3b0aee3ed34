"""Rows of an index by position (its shards in order, back to back), gathered from the
memory-mapped shards: only the asked rows are read."""

from __future__ import annotations

import functools
import json
import os
from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from logix.errors import LogFormatError
from logix.storage.format import DATA_IDS_KEY
from logix.storage.reader import map_shard, verify_file


class RowStore:
    """`verify`: check each shard's checksum (recorded when the index was built) the first time
    this process reads it, as LogReader does, so a changed shard is never scored."""

    def __init__(self, project_dir: str, shards: Sequence[dict], dim: int,
                 verify: bool = True) -> None:
        self.project_dir = project_dir
        self.files = [s["file"] for s in shards]
        self.checksums = [s["checksum"] for s in shards]
        self.verify = verify
        self.dim = dim
        sizes = torch.tensor([s["rows"] for s in shards], dtype=torch.long)
        self.starts = torch.cumsum(sizes, 0) - sizes  # [n_shards] first position of each
        self.rows = int(sizes.sum())

    def _version(self, s: int) -> Tuple[str, int, int]:
        path = os.path.join(self.project_dir, self.files[s])
        try:
            stat = os.stat(path)
        except OSError:
            raise LogFormatError(f"Shard {path!r} held by the index is missing; rebuild the "
                                 f"index (logix index DIR --rebuild).") from None
        if self.verify:
            verify_file(path, self.checksums[s])
        return path, stat.st_size, stat.st_mtime_ns

    def locate(self, positions: Tensor) -> Tuple[Tensor, Tensor]:
        """(shard number, row within the shard) of each position."""
        shard = torch.searchsorted(self.starts, positions, right=True) - 1
        return shard, positions - self.starts[shard]

    def read(self, positions: Tensor) -> Tensor:
        """[n, dim] float32 rows at `positions` (int64), read in shard and offset order."""
        out = torch.empty(len(positions), self.dim)
        order = torch.argsort(positions)
        shard, local = self.locate(positions[order])
        bounds = torch.searchsorted(shard, torch.arange(len(self.files) + 1)).tolist()
        for s in range(len(self.files)):
            part = slice(bounds[s], bounds[s + 1])
            if part.start < part.stop:
                out[order[part]] = _shard_rows(*self._version(s), self.dim)[local[part]].float()
        return out

    def ids(self, lists: Sequence[Sequence[int]]) -> List[List]:
        """The data ids at each list of positions (each shard's version checked once)."""
        flat = torch.as_tensor([p for positions in lists for p in positions], dtype=torch.long)
        shard, local = self.locate(flat) if len(flat) else (flat, flat)
        ids = {s: _shard_ids(*self._version(s)) for s in shard.unique().tolist()}
        found = iter([ids[s][i] for s, i in zip(shard.tolist(), local.tolist())])
        return [[next(found) for _ in positions] for positions in lists]


@functools.lru_cache(maxsize=256)
def _shard_rows(path: str, size: int, mtime_ns: int, width: int) -> Tensor:
    """A shard's memory-mapped rows, mapped once per file version."""
    return map_shard(path, width)[1]


@functools.lru_cache(maxsize=64)
def _shard_ids(path: str, size: int, mtime_ns: int) -> List:
    """A shard's data ids, parsed once per file version (searches read the same shards)."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return json.loads(header["__metadata__"][DATA_IDS_KEY])

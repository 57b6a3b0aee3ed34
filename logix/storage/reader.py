"""The log reader: memory-maps the shards named in the manifest and yields row blocks."""

from __future__ import annotations

import json
import os
from typing import Iterator, List, Optional, Tuple

import torch
from safetensors import safe_open
from torch import Tensor

from logix.errors import LogFormatError
from logix.storage.format import DATA_IDS_KEY, GRAD_KEY
from logix.storage.manifest import Manifest, ShardEntry


class LogReader:
    """Read-only view of a project folder. Memory stays bounded by one block at a time."""

    def __init__(self, project_dir: str, manifest: Optional[Manifest] = None,
                 block_rows: int = 8192) -> None:
        self.project_dir = project_dir
        self.manifest = manifest if manifest is not None else Manifest.load(project_dir)
        self.block_rows = block_rows

    def __iter__(self) -> Iterator[Tuple[List, Tensor]]:
        return self.blocks(self.block_rows)

    def __len__(self) -> int:
        """Number of blocks one pass yields."""
        return sum(-(-s.rows // self.block_rows) for s in self.manifest.shards)

    @property
    def rows(self) -> int:
        return self.manifest.rows

    @property
    def dim(self) -> int:
        return self.manifest.dim

    def shard_ids(self, shard: ShardEntry) -> List:
        with safe_open(self._path(shard), framework="pt") as f:
            return json.loads((f.metadata() or {})[DATA_IDS_KEY])

    def data_ids(self) -> List:
        return [i for shard in self.manifest.shards for i in self.shard_ids(shard)]

    def blocks(self, block_rows: int = 8192, shards: Optional[List[ShardEntry]] = None
               ) -> Iterator[Tuple[List, Tensor]]:
        """Yield (data_ids, rows [<= block_rows, dim] in the stored dtype), in manifest order."""
        for shard in self.manifest.shards if shards is None else shards:
            path = self._path(shard)
            try:
                with safe_open(path, framework="pt") as f:
                    ids = json.loads((f.metadata() or {})[DATA_IDS_KEY])
                    rows = f.get_slice(GRAD_KEY)
                    n = rows.get_shape()[0]
                    if n != shard.rows or len(ids) != n:
                        raise LogFormatError(f"Shard {path!r} holds {n} rows and {len(ids)} ids "
                                             f"but the manifest says {shard.rows}.")
                    for start in range(0, n, block_rows):
                        stop = min(start + block_rows, n)
                        yield ids[start:stop], rows[start:stop]
            except (OSError, KeyError, json.JSONDecodeError) as e:
                raise LogFormatError(f"Shard {path!r} is not readable: {e!r}. Run `logix verify "
                                     f"{self.project_dir}` to check every shard.") from e

    def read_all(self) -> Tuple[List, Tensor]:
        """Every row in one tensor: for small logs and tests."""
        ids, parts = [], []
        for block_ids, block in self.blocks():
            ids.extend(block_ids)
            parts.append(block)
        if not parts:
            return [], torch.empty(0, self.dim)
        return ids, torch.cat(parts)

    def _path(self, shard: ShardEntry) -> str:
        path = os.path.join(self.project_dir, shard.file)
        if not os.path.isfile(path):
            raise LogFormatError(f"Shard {path!r} is named in the manifest but missing.")
        return path

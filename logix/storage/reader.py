"""The log reader: memory-maps the shards named in the manifest and yields row blocks."""

from __future__ import annotations

import json
import os
import queue
import threading
from typing import Iterable, Iterator, List, Optional, Set, Tuple

import numpy as np
import torch
from torch import Tensor

from logix.errors import LogFormatError
from logix.storage.format import (DATA_IDS_KEY, GRAD_KEY, TORCH_DTYPES, file_checksum,
                                  read_header, split_checksum)
from logix.storage.manifest import Manifest, ShardEntry, check_structure


class LogReader:
    """Read-only view of a project folder. Memory stays bounded by one block at a time."""

    def __init__(self, project_dir: str, manifest: Optional[Manifest] = None,
                 block_rows: int = 8192, checkpoint: Optional[str] = None,
                 verify: bool = True) -> None:
        """checkpoint: read the rows logged inside run.checkpoint(name) instead of the plain
        (untagged) rows. verify: check each shard's size and checksum against the manifest the
        first time this process reads it (see `verify_shard`); False skips the check."""
        self.project_dir = project_dir
        if manifest is not None:  # Manifest.load checks the structure of one it reads
            check_structure(manifest, where=os.path.join(project_dir, "manifest.json"))
        self.manifest = manifest if manifest is not None else Manifest.load(project_dir)
        self.block_rows = block_rows
        self.checkpoint = checkpoint
        self.verify = verify
        self.shards = sorted((s for s in self.manifest.shards if s.checkpoint == checkpoint),
                             key=lambda s: (s.rank, s.seq))

    def __iter__(self) -> Iterator[Tuple[List, Tensor]]:
        return self.blocks(self.block_rows)

    def __len__(self) -> int:
        """Number of blocks one pass yields."""
        return sum(-(-s.rows // self.block_rows) for s in self.shards)

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def dim(self) -> int:
        return self.manifest.dim

    def shard_ids(self, shard: ShardEntry) -> List:
        path = self._path(shard)
        try:
            header, _, _ = read_header(path)
            return json.loads(header["__metadata__"][DATA_IDS_KEY])
        except (LogFormatError, KeyError, TypeError, ValueError) as e:
            raise LogFormatError(f"Shard {path!r} has no readable data ids: {e}. Run `logix "
                                 f"verify {self.project_dir}` to check every shard.") from e

    def data_ids(self) -> List:
        return [i for shard in self.shards for i in self.shard_ids(shard)]

    def blocks(self, block_rows: int = 8192, shards: Optional[List[ShardEntry]] = None
               ) -> Iterator[Tuple[List, Tensor]]:
        """Yield (data_ids, rows [<= block_rows, dim] in the stored dtype), in manifest order."""
        for shard in self.shards if shards is None else shards:
            ids, rows = self._map(shard)
            for start in range(0, rows.shape[0], block_rows):
                yield ids[start:start + block_rows], rows[start:start + block_rows]

    def _map(self, shard: ShardEntry) -> Tuple[List, Tensor]:
        """(ids, rows) of one shard, memory-mapped, checked against the manifest's row count."""
        ids, rows = map_shard(self._path(shard), self.dim)
        if rows.shape[0] != shard.rows or len(ids) != shard.rows:
            raise LogFormatError(f"Shard {shard.file!r} holds {rows.shape[0]} rows and "
                                 f"{len(ids)} ids but the manifest says {shard.rows}.")
        return ids, rows

    def fixed_blocks(self, block_rows: int, shards: Optional[List[ShardEntry]] = None,
                     prefetch: int = 2, unit: Optional[int] = None
                     ) -> Iterator[Tuple[List, Tensor]]:
        """Yield (ids, float32 rows) in blocks of exactly `block_rows` (the last may be shorter)
        whatever the shard sizes, so every matrix multiply has the same shape and scores do not
        depend on how the log was sharded. With `unit` (a divisor of block_rows), a block also
        ends at a shard boundary once it holds a multiple of `unit` rows: blocks then start at
        multiples of `unit` and rarely span shards. A block inside one float32 shard is a
        zero-copy view of the memory-mapped file; other blocks are assembled (and upcast) in one
        copy by a prefetch thread.
        """
        produce = self._fixed_blocks(block_rows, shards, unit)
        return _prefetched(produce, prefetch) if prefetch > 0 else produce

    def count_blocks(self, block_rows: int, shards: Optional[List[ShardEntry]] = None,
                     unit: Optional[int] = None) -> int:
        """How many blocks `fixed_blocks` yields (from the manifest's row counts)."""
        shards = self.shards if shards is None else shards
        return len(block_layout([s.rows for s in shards], block_rows, unit))

    def _fixed_blocks(self, block_rows: int, shards: Optional[List[ShardEntry]],
                      unit: Optional[int]):
        shards = self.shards if shards is None else shards
        mapped: dict = {}  # shard index -> (ids, rows), for the shards of the current block
        for pieces in block_layout([s.rows for s in shards], block_rows, unit):
            mapped = {i: m for i, m in mapped.items() if i >= pieces[0][0]}
            parts = []
            for index, start, stop in pieces:
                if index not in mapped:
                    mapped[index] = self._map(shards[index])
                ids, rows = mapped[index]
                parts.append((ids[start:stop], rows[start:stop]))
            if len(parts) == 1:
                yield parts[0][0], parts[0][1].float()
                continue
            out = torch.empty(sum(p[1].shape[0] for p in parts), self.dim)
            pos = 0
            for _, rows in parts:
                out[pos:pos + rows.shape[0]].copy_(rows)  # upcast on the way
                pos += rows.shape[0]
            yield [i for ids, _ in parts for i in ids], out

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
        if self.verify:
            verify_shard(path, shard)
        return path


def block_layout(shard_rows: List[int], block_rows: int, unit: Optional[int] = None
                 ) -> List[List[Tuple[int, int, int]]]:
    """Blocks as lists of (shard index, start, stop) pieces: `block_rows` rows each (the last
    may be shorter), or, with `unit`, cut early at a shard boundary once a multiple of `unit`."""
    blocks, pieces, size = [], [], 0
    for index, n in enumerate(shard_rows):
        pos = 0
        while pos < n:
            take = min(block_rows - size, n - pos)
            pieces.append((index, pos, pos + take))
            size, pos = size + take, pos + take
            if size == block_rows:
                blocks.append(pieces)
                pieces, size = [], 0
        if unit and size and size % unit == 0:
            blocks.append(pieces)
            pieces, size = [], 0
    if pieces:
        blocks.append(pieces)
    return blocks


_verified: Set[Tuple[str, int, int, str]] = set()  # (real path, size, mtime_ns, checksum)
_verified_lock = threading.Lock()


def verify_shard(path: str, shard: ShardEntry) -> None:
    """Raise LogFormatError unless the file's size and checksum are the ones the manifest
    recorded. The whole file is hashed once per process; later reads of the same path, size and
    modification time are free."""
    verify_file(path, shard.checksum, shard.bytes)


def verify_file(path: str, checksum: str, size: Optional[int] = None) -> None:
    """`verify_shard` for any reader that knows a shard's recorded checksum ("<algorithm>:<hex>")
    and size."""
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns, checksum)
    if key in _verified:
        return
    fix = ("Restore or re-log it (`logix verify` checks every shard of a project), or pass "
           "verify=False to read it unchecked.")
    if size is not None and stat.st_size != size:
        raise LogFormatError(f"Shard {path!r} is {stat.st_size} bytes but the manifest recorded "
                             f"{size}: it was truncated or changed. " + fix)
    algorithm, recorded = split_checksum(checksum)
    digest = file_checksum(path, algorithm)
    if digest != recorded:
        raise LogFormatError(f"Shard {path!r} is corrupt: its {algorithm} {digest[:16]}... does "
                             f"not match the recorded {recorded[:16]}.... " + fix)
    with _verified_lock:
        _verified.add(key)


def map_shard(path: str, width: int) -> Tuple[List, Tensor]:
    """(data_ids, rows [n, width]) of a shard, rows a zero-copy tensor over the memory-mapped
    file; a shard whose rows are not `width` wide (the manifest's dim) is refused."""
    try:
        header, data_start, _ = read_header(path)
        info = header[GRAD_KEY]
        start, stop = info["data_offsets"]
        dtype = TORCH_DTYPES[info["dtype"]]
        ids = json.loads(header["__metadata__"][DATA_IDS_KEY])
        shape = info["shape"]
    except (LogFormatError, KeyError, TypeError, ValueError) as e:
        raise LogFormatError(f"Shard {path!r} is not a readable LogIX shard: {e}. Run "
                             f"`logix verify` on the project folder.") from e
    if len(shape) != 2 or shape[1] != width:
        raise LogFormatError(f"Shard {path!r} holds rows of shape {shape} but the manifest's "
                             f"rows are {width} wide: the shard belongs to another log or "
                             f"layout. Run `logix verify` on the project folder.")
    if stop == start:
        return ids, torch.empty(shape, dtype=dtype)
    # copy-on-write mapping: torch wants a writable buffer; pages are shared until written.
    raw = np.memmap(path, dtype=np.uint8, mode="c", offset=data_start + start,
                    shape=(stop - start,))
    return ids, torch.from_numpy(raw).view(dtype).reshape(shape)


def _prefetched(blocks: Iterable, depth: int) -> Iterator:
    """Run a block generator in a thread, `depth` blocks ahead of the consumer."""
    slots: "queue.Queue" = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce():
        try:
            for item in blocks:
                if stop.is_set():
                    return
                slots.put(item)
            slots.put(done)
        except BaseException as e:  # handed to the consumer
            slots.put(e)

    thread = threading.Thread(target=produce, name="logix-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                slots.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.01)

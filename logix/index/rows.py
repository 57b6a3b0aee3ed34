"""Rows of an index by position (its shards in order, back to back), gathered from the
memory-mapped shards: only the asked rows are read.

A gather from a mapped file faults its pages in one at a time, each a disk read when the page
cache no longer holds them (a shard written past it, or evicted since): 100 candidates cost 100
sequential reads. `read` first advises the kernel of every page it will touch in a shard
(MADV_WILLNEED, for every shard before the first gather: the reads are issued together and
run in parallel), then gathers the rows with one vectorised index per shard. The advice is one
call per row range (3-4 ms for 64 queries' candidates), so it is skipped when a sample of the
rows (RESIDENT_SAMPLE, asked with mincore) is in memory: a warm read makes no advice calls, and
a row evicted outside the sample faults in alone. (mincore over a whole shard's pages instead
cost 2-20 ms a call.)"""

from __future__ import annotations

import ctypes
import functools
import json
import mmap
import os
from typing import List, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from logix.errors import LogFormatError
from logix.storage.format import DATA_IDS_KEY, GRAD_KEY, read_header
from logix.storage.reader import map_shard, verify_file

_PAGE = mmap.PAGESIZE
RESIDENT_SAMPLE = 4  # rows whose pages are checked before advising a read


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
        ordered = bool((positions[1:] >= positions[:-1]).all())  # e.g. torch.unique's
        order = None if ordered else torch.argsort(positions)
        shard, local = self.locate(positions if ordered else positions[order])
        bounds = torch.searchsorted(shard, torch.arange(len(self.files) + 1)).tolist()
        parts = [(_shard_map(*self._version(s), self.dim), slice(bounds[s], bounds[s + 1]))
                 for s in range(len(self.files)) if bounds[s] < bounds[s + 1]]
        for mapped, part in parts:  # every shard's reads issued before the first gather waits
            mapped.will_need(local[part])
        gathered = torch.empty(len(positions), self.dim)  # in position order
        for mapped, part in parts:
            if mapped.rows.dtype == torch.float32:
                torch.index_select(mapped.rows, 0, local[part], out=gathered[part])
            else:
                gathered[part] = mapped.rows.index_select(0, local[part])
        if ordered:
            return gathered
        out = torch.empty_like(gathered)
        out[order] = gathered
        return out

    def ids(self, lists: Sequence[Sequence[int]]) -> List[List]:
        """The data ids at each list of positions (each shard's version checked once)."""
        flat = torch.as_tensor([p for positions in lists for p in positions], dtype=torch.long)
        shard, local = self.locate(flat) if len(flat) else (flat, flat)
        ids = {s: _shard_ids(*self._version(s)) for s in shard.unique().tolist()}
        found = iter([ids[s][i] for s, i in zip(shard.tolist(), local.tolist())])
        return [[next(found) for _ in positions] for positions in lists]


class _Mapped:
    """A shard's rows [n, width] over a copy-on-write map of the file, and that map (for
    madvise)."""

    def __init__(self, path: str, width: int) -> None:
        map_shard(path, width)  # checks the shard's header and width, naming what is wrong
        header, data_start, _ = read_header(path)
        info = header[GRAD_KEY]
        start, stop = info["data_offsets"]
        self.first = data_start + start  # file offset of row 0
        self.row_bytes = width * torch.empty(0, dtype=_dtype(info["dtype"])).element_size()
        self.map = None
        if stop == start:
            self.rows = torch.empty(info["shape"], dtype=_dtype(info["dtype"]))
            return
        with open(path, "rb") as f:
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        raw = np.frombuffer(self.map, dtype=np.uint8, count=stop - start, offset=self.first)
        self.rows = torch.from_numpy(raw).view(_dtype(info["dtype"])).reshape(info["shape"])

    def will_need(self, local: Tensor) -> None:
        """Ask the kernel to read the pages of these rows (sorted) now, all together, unless a
        sample of them is resident (warm)."""
        if self.map is None or not hasattr(self.map, "madvise") or not len(local):
            return
        begin = ((self.first + local * self.row_bytes) // _PAGE).numpy()
        end = ((self.first + (local + 1) * self.row_bytes - 1) // _PAGE).numpy()
        base = self.rows.data_ptr() - self.first  # the map's first page
        sample = np.unique(np.linspace(0, len(begin) - 1, RESIDENT_SAMPLE).astype(np.int64))
        if all(_resident(base, int(begin[i]), int(end[i])) for i in sample):
            return
        for page_begin, page_end in zip(*_ranges(begin, end)):
            try:
                self.map.madvise(mmap.MADV_WILLNEED, int(page_begin) * _PAGE,
                                 int(page_end - page_begin + 1) * _PAGE)
            except (OSError, ValueError):
                return  # advice only


def _ranges(begin: np.ndarray, end: np.ndarray):
    """(first pages, last pages) of sorted rows' page ranges, touching ranges joined."""
    if not len(begin):
        return begin, end
    new = np.concatenate([[True], begin[1:] > end[:-1] + 1])
    last = np.concatenate([np.flatnonzero(new)[1:] - 1, [len(end) - 1]])
    return begin[new], end[last]


def _resident(base: int, first_page: int, last_page: int) -> bool:
    """Whether pages first_page..last_page of the mapping at `base` are all in memory (mincore;
    False where that cannot be asked)."""
    if _LIBC is None:
        return False
    vec = np.empty(last_page - first_page + 1, dtype=np.uint8)
    rc = _LIBC.mincore(ctypes.c_void_p(base + first_page * _PAGE),
                       ctypes.c_size_t(len(vec) * _PAGE), vec.ctypes.data_as(ctypes.c_void_p))
    return rc == 0 and bool((vec & 1).all())


def _libc():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        return libc
    except (OSError, AttributeError):  # no mincore (not Linux / BSD): advise every page
        return None


_LIBC = _libc()


def _dtype(name: str) -> torch.dtype:
    from logix.storage.format import TORCH_DTYPES

    return TORCH_DTYPES[name]


@functools.lru_cache(maxsize=256)
def _shard_map(path: str, size: int, mtime_ns: int, width: int) -> _Mapped:
    """A shard's memory-mapped rows, mapped once per file version."""
    return _Mapped(path, width)


def _shard_rows(path: str, size: int, mtime_ns: int, width: int) -> Tensor:
    return _shard_map(path, size, mtime_ns, width).rows


@functools.lru_cache(maxsize=64)
def _shard_ids(path: str, size: int, mtime_ns: int) -> List:
    """A shard's data ids, parsed once per file version (searches read the same shards)."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return json.loads(header["__metadata__"][DATA_IDS_KEY])

"""The ``full`` curvature: one gradient covariance across every module, not one block per module.

    F = (1/N) sum_i g_i g_i^T,   g_i the whole saved row (all modules concatenated)

is the empirical Fisher of the projected gradients with its cross-layer blocks, the exact
curvature of the projected space that ``raw`` (F's diagonal blocks) approximates. It is formed
from the saved rows in one streaming pass (float64), eigendecomposed once per log and kept in this
process, then (F + lambda I)^-1 is applied to queries and, for modes cosine and l2, to training
rows. Its [dim, dim] float64 matrices limit it to rows of MAX_WIDTH numbers.
"""

from __future__ import annotations

from typing import ClassVar, Dict, Optional

import torch
from torch import Tensor

from logix import distributed
from logix.errors import UsageError
from logix.influence.gather import own_part
from logix.influence.preconditioner import (ModuleInverse, Preconditioner, check_invertible,
                                            resolve_damping)
from logix.progress import track
from logix.statistics.eigen import Eigen, eigh64

MAX_WIDTH = 16384  # numbers per row: its [dim, dim] float64 covariance is then 2 GiB
CHUNK_ROWS = 1024  # rows converted to float64 at a time while the covariance is summed
_cache: Dict[tuple, Eigen] = {}  # the last log's eigendecomposition, by its shards' content


class FullPreconditioner(Preconditioner):
    """g -> (F + lambda I)^-1 g over the whole row, F one covariance across every module."""

    cross_layer: ClassVar[bool] = True

    def __init__(self, modules, inverse: ModuleInverse) -> None:
        super().__init__("full", {}, list(modules))
        self.inverse = inverse  # dense over the whole row: values [dim], vectors [dim, dim]

    def apply(self, rows: Tensor) -> Tensor:
        """rows [n, dim] -> (F + lambda I)^-1 rows, in rows' dtype."""
        return self.inverse.apply(rows[:, None, :]).reshape(rows.shape)

    @property
    def dampings(self) -> Dict[str, float]:
        return {m.name: self.inverse.damping for m in self.modules}


def full_preconditioner(reader, modules, damping: Optional[float], relative_damping: float,
                        block_rows: int, progress: bool = True) -> FullPreconditioner:
    """The ``full`` inverse for the saved rows of `reader` (fitted at the first call for a log's
    content, then cached); damping absolute, else relative to F's mean eigenvalue."""
    modules = list(modules)
    width = sum(m.dim for m in modules)
    if width > MAX_WIDTH:
        raise UsageError(
            f"hessian='full' forms one {width} x {width} covariance across all {len(modules)} "
            f"modules, and rows of {width} numbers are over its limit of {MAX_WIDTH} "
            f"({width ** 2 * 8 / 2 ** 30:.1f} GiB per float64 matrix). Log with a smaller LoGra "
            "rank (a row holds rank_out x rank_in numbers per module), or use a block-diagonal "
            "curvature: hessian='raw' or 'ekfac' (or 'lissa' when those do not fit either).")
    eig = _eigen(reader, width, block_rows, progress)
    inverse = ModuleInverse("full", resolve_damping(eig.values, damping, relative_damping),
                            values=eig.values, vectors=eig.vectors)
    check_invertible("all modules (hessian='full')", inverse)
    return FullPreconditioner(modules, inverse)


def _eigen(reader, width: int, block_rows: int, progress: bool) -> Eigen:
    key = (reader.project_dir, reader.checkpoint, width,
           tuple((s.file, s.checksum) for s in reader.shards))
    if key not in _cache:
        _cache.clear()  # one log's matrices at a time: they can be GiBs
        _cache[key] = eigh64(covariance(reader, width, block_rows, progress))
    return _cache[key]


def covariance(reader, width: int, block_rows: int, progress: bool = True) -> Tensor:
    """[width, width] (1/N) G^T G of every saved row (float64), one streaming pass; under
    torch.distributed each rank sums its own shards and the sums are reduced."""
    if reader.dim != width:
        raise UsageError(f"hessian='full': the saved rows hold {reader.dim} numbers and the "
                         f"query's modules {width}; query with the log's own modules.")
    part = own_part(reader) if distributed.is_distributed() else reader
    total = torch.zeros(width, width, dtype=torch.float64)
    count = 0
    blocks = track(part.fixed_blocks(block_rows), part.count_blocks(block_rows),
                   "Fitting full", progress)
    for _, rows in blocks:
        for start in range(0, rows.shape[0], CHUNK_ROWS):
            chunk = rows[start:start + CHUNK_ROWS].double()
            total.addmm_(chunk.T, chunk)
        count += rows.shape[0]
    distributed.all_reduce_sum(total)
    count = int(distributed.all_reduce_sum(torch.tensor([float(count)],
                                                        dtype=torch.float64)).item())
    if count == 0:
        raise UsageError("hessian='full' is fitted from the saved training rows and this log has "
                         "none: log with run.save(True) and setup({'grad': ['log']}).")
    return total / count

"""FAISS, imported only when an index is built or searched (``pip install "logix[search]"``)."""

from __future__ import annotations

import math
import os
from typing import Optional

from logix.errors import UsageError
from logix.storage.format import atomic_file

KINDS = ("auto", "flat", "ivf", "hnsw")
QUANTIZERS = (None, "sq8", "pq")
PQ_CENTROIDS = 256  # a product quantizer's 8-bit codebook, trained by k-means
AUTO_FLAT_ROWS = 10_000  # kind="auto": exact flat index below this many rows,
AUTO_HNSW_BYTES = 2 << 30  # HNSW while its file fits this (read into memory: fast searches;
AUTO_HNSW_EF_CONSTRUCTION = 40  # built with this breadth), then IVF-SQ8 (fast builds, w B/row)
HNSW_LINK_BYTES = 270  # HNSW32's neighbour lists per row, beside the 4w of its vectors
AUTO_SKETCH_WIDTH = 256  # kind="auto": index a JL sketch of this width when rows are wider than
AUTO_SKETCH_ABOVE = 512  # this (the re-ranking reads the full rows)
AUTO_RECALL = 0.95  # kind="auto": recall@10 the calibration must measure, else a flat index
AUTO_RECALL_TARGET = 0.97  # ... and walks nprobe / ef up to this (a margin for other queries)
AUTO_MIN_SPEEDUP = 1.0  # kind="auto": ... and a speed-up over the exact scan above this


def import_faiss():
    """The faiss module, or a UsageError naming the install command."""
    try:
        import faiss
    except ImportError as e:
        raise UsageError("Vector search needs FAISS, which is not installed: "
                         "pip install \"logix[search]\" (or pip install faiss-cpu).") from e
    return faiss


def available() -> bool:
    try:
        import_faiss()
    except UsageError:
        return False
    return True


def resolve_kind(kind: str, rows: int, width: int) -> str:
    """The kind to build; "auto": flat below AUTO_FLAT_ROWS rows, HNSW while an HNSW32 index of
    `width`-wide vectors fits AUTO_HNSW_BYTES (about 1.6 million rows of a 256-wide sketch; a
    walk's cost grows with the log of the rows, an IVF scan's with their root), else IVF."""
    if kind not in KINDS:
        raise UsageError(f"index kind={kind!r} is not supported; allowed: {list(KINDS)}.")
    if kind == "auto":
        if rows < AUTO_FLAT_ROWS:
            return "flat"
        return "hnsw" if rows * (4 * width + HNSW_LINK_BYTES) <= AUTO_HNSW_BYTES else "ivf"
    return kind


def auto_sketch(dim: int, sketch: Optional[int]) -> Optional[int]:
    """kind="auto" without `sketch`: a 256-wide JL sketch of rows wider than 512 numbers (a
    quarter of LoGra's 928-wide rows' bytes or less; recall stays >= 0.95 after re-ranking,
    docs/search.md), the full rows otherwise."""
    if sketch is not None:
        return sketch
    return AUTO_SKETCH_WIDTH if dim > AUTO_SKETCH_ABOVE else None


def auto_codes(requested: str, resolved: str, quantize: Optional[str]) -> Optional[str]:
    """The stored codes: `quantize` as asked, except that kind="auto" on a large log (resolved to
    IVF) stores SQ8: a quarter of the bytes per row, the same recall after re-ranking and, since
    a batch of queries scans a quarter of the memory, several times faster for batches."""
    if quantize is None and requested == "auto" and resolved == "ivf":
        return "sq8"
    return quantize


def default_nlist(rows: int) -> int:
    """IVF lists: about 4 sqrt(rows), at least 39 training rows per list (FAISS's minimum). At
    10^6 gradient-like rows (a 256-wide sketch, SQ8) recall@10 0.97 took 512 of 4,000 lists
    (13% of the rows scanned) against 256 of 1,000 (26%)."""
    return max(1, min(int(4 * math.sqrt(rows)), rows // 39))


def check_trainable(kind: str, quantize: Optional[str], nlist: int, rows: int) -> None:
    """Refuse, before FAISS's k-means fails on it, an index whose training needs more rows than
    the log holds: one per IVF list, PQ_CENTROIDS per product quantizer's codebook."""
    if kind == "ivf" and nlist > rows:
        raise UsageError(f"nlist={nlist} IVF lists need at least {nlist} rows to train; the log "
                         f"holds {rows}: pass nlist <= {rows} (the default is about sqrt(rows)) "
                         "or kind='flat'.")
    if quantize == "pq" and rows < PQ_CENTROIDS:
        raise UsageError(f"quantize='pq' trains {PQ_CENTROIDS} centroids per codebook and needs "
                         f"at least {PQ_CENTROIDS} rows; the log holds {rows}: use "
                         "quantize='sq8' or None, or log more rows.")


def factory_string(kind: str, width: int, quantize: Optional[str], nlist: int, hnsw_m: int,
                   pq_m: Optional[int] = None) -> str:
    """The faiss.index_factory description of an index kind."""
    if quantize not in QUANTIZERS:
        raise UsageError(f"quantize={quantize!r} is not supported; allowed: {list(QUANTIZERS)}.")
    if quantize == "pq":
        if kind == "hnsw":
            raise UsageError("quantize='pq' is for kind='flat' or 'ivf'; use quantize='sq8' "
                             "with kind='hnsw'.")
        pq_m = pq_m or _pq_subquantizers(width)
        if width % pq_m:
            raise UsageError(f"pq_m={pq_m} must divide the indexed width {width}.")
        codes = f"PQ{pq_m}"
    else:
        codes = "SQ8" if quantize == "sq8" else "Flat"
    if kind == "flat":
        return codes
    if kind == "ivf":
        return f"IVF{nlist},{codes}"
    return f"HNSW{hnsw_m}" + ("" if codes == "Flat" else f",{codes}")


def _pq_subquantizers(width: int) -> int:
    """About 8 dimensions per byte-sized code, dividing the width."""
    target = max(1, width // 8)
    return max(m for m in range(1, target + 1) if width % m == 0)


def new_index(description: str, width: int, kind: str):
    """An inner-product index. IVF lists come from spherical k-means (unit centroids), so a row
    joins the list of the centroid nearest in direction and a query probes the lists of the
    directions nearest its own; HNSW links rows by inner product."""
    faiss = import_faiss()
    index = faiss.index_factory(width, description, faiss.METRIC_INNER_PRODUCT)
    if kind == "ivf":
        faiss.extract_index_ivf(index).cp.spherical = True
    return index


def write(index, path: str) -> int:
    """Write atomically (`storage.format.atomic_file`: a temporary name of its own, fsync,
    rename); returns the file's bytes."""
    faiss = import_faiss()
    with atomic_file(path) as f:
        faiss.write_index(index, faiss.PyCallbackIOWriter(f.write))
    return os.path.getsize(path)


def read(path: str, kind: str, mmap: bool = True):
    """Load an index; memory-mapped (read only) when `mmap`: flat codes (flat, hnsw storage) and
    IVF lists stay on disk and pages load as they are touched."""
    faiss = import_faiss()
    flags = 0
    if mmap:  # IVF lists map with IO_FLAG_MMAP; flat codes need IO_FLAG_MMAP_IFC (faiss >= 1.9)
        mapping = faiss.IO_FLAG_MMAP if kind == "ivf" else getattr(faiss, "IO_FLAG_MMAP_IFC", 0)
        flags = mapping | faiss.IO_FLAG_READ_ONLY
    return faiss.read_index(path, flags)


def check_search_params(nprobe: Optional[int], ef: Optional[int],
                        candidates: Optional[int] = None) -> None:
    """Refuse a search setting that is not a positive integer (None: the index's default)."""
    for name, value in (("nprobe", nprobe), ("ef", ef), ("candidates", candidates)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value <= 0):
            raise UsageError(f"{name} must be a positive integer or None (the index's default), "
                             f"got {value!r}.")


def set_search_params(index, nprobe: Optional[int], ef: Optional[int]) -> None:
    faiss = import_faiss()
    if nprobe is not None and hasattr(faiss, "extract_index_ivf"):
        try:
            faiss.extract_index_ivf(index).nprobe = int(nprobe)
        except RuntimeError:
            pass  # not an IVF index
    if ef is not None and hasattr(index, "hnsw"):
        index.hnsw.efSearch = int(ef)

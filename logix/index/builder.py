"""Build an index from a log's shards, or bring one up to date: only shards logged after the
last build are read; a stale index (shards changed, other layout or parameters) is rebuilt."""

from __future__ import annotations

import os
import time
import warnings
from typing import Optional

import numpy as np
import torch

from logix import distributed
from logix.errors import LogFormatError, UsageError
from logix.index import backend, calibrate, store
from logix.index.rows import RowStore
from logix.index.sketch import Sketch
from logix.influence import norms as norm_cache
from logix.influence.gather import own_part
from logix.influence.scoring import aligned
from logix.log import StepRows
from logix.progress import track

SERVED_MODES = ("dot", "cosine")
TRAIN_ROWS_PER_LIST = 50  # IVF k-means sample: rows per list (at least 10,000 for PQ)
DEFAULT_PROBE_SHARE = 16  # IVF: lists visited by default, 1 in this many (at least 8)


def build(attributor, kind: str = "auto", mode: str = "dot", *, sketch: Optional[int] = None,
          quantize: Optional[str] = None, name: Optional[str] = None, rebuild: bool = False,
          hessian: Optional[str] = None, damping: Optional[float] = None,
          nlist: Optional[int] = None, nprobe: Optional[int] = None, hnsw_m: int = 32,
          ef: int = 128, pq_m: Optional[int] = None, seed: int = 0, block_rows: int = 65536,
          progress: bool = True, measure: bool = False) -> store.IndexManifest:
    backend.import_faiss()
    full = attributor.reader()
    if full.rows == 0:
        raise UsageError(f"There are no logged rows to index in {full.project_dir!r}. Log "
                         "training steps (run.save(True), run.setup({'grad': ['log']})) and "
                         "call run.finalize() first.")
    if mode not in SERVED_MODES:
        raise UsageError(f"mode={mode!r} has no index; allowed: {list(SERVED_MODES)}. For 'l2' "
                         "use compute_influence_all(topk=k, mode='l2').")
    dim = full.dim
    block_rows = aligned(block_rows, dim)
    if sketch is not None and (isinstance(sketch, bool) or not isinstance(sketch, int)
                               or not 0 < sketch < dim):
        raise UsageError(f"sketch={sketch!r} must be an integer in [1, {dim}) (the row width), "
                         "or None to index full rows.")
    backend.resolve_kind(kind, full.rows, dim)  # validates the name early
    backend.check_search_params(nprobe, ef)
    reader = own_part(full) if distributed.is_distributed() else full
    part = {"rank": distributed.rank(), "world": distributed.world_size()}
    layout = store.layout_of(full.manifest)
    plan, curvature = None, None
    if mode == "cosine":
        dummy = StepRows([], torch.zeros(0, dim), full.manifest.modules)
        plan = attributor.scorer(dummy, "cosine", True, hessian, damping, None)
        curvature = store.curvature_of(plan.preconditioner)
    name = name or store.default_name(kind, mode, quantize, sketch,
                                      curvature and curvature["hessian"], part)
    path = os.path.join(store.folder(full.project_dir, name), store.INDEX_FILE)
    wanted = {"mode": mode, "curvature": curvature, "part": part,
              "sketch": {"width": sketch, "seed": seed} if sketch else None,
              "requested": kind, "quantize": quantize}

    manifest, index = _existing(full.project_dir, name, path, reader, layout, wanted, rebuild)
    if manifest is not None and index is None:
        return manifest  # fresh: nothing to add
    started = time.perf_counter()
    options = dict(name=name, mode=mode, layout=layout, curvature=curvature, part=part,
                   requested=kind, quantize=quantize, asked_sketch=wanted["sketch"],
                   nlist=nlist, nprobe=nprobe, hnsw_m=hnsw_m, ef=ef, pq_m=pq_m, seed=seed)
    truth = None
    if manifest is None:
        sketched = backend.auto_sketch(dim, sketch)  # the width auto indexes, None: full rows
        resolved = backend.resolve_kind(kind, reader.rows, sketched or dim)
        width = sketched if kind == "auto" and resolved != "flat" else sketch
        if kind == "auto" and resolved == "hnsw":
            options["ef"] = backend.AUTO_HNSW_EF_CONSTRUCTION
        manifest, index = _new(resolved, width, reader.rows, dim, **options)
        if kind == "auto" or measure:
            truth = "measure"
    transform = _Transform(manifest, dim, attributor, full, plan, block_rows, progress)
    if truth == "measure":  # the exact top-10 of sample rows, gathered during the add pass
        truth = calibrate.Truth(*_sample_queries(full.project_dir, reader, transform))
    _fill(index, manifest, reader, transform, block_rows, truth, full.project_dir, progress)
    if truth is not None:
        found = calibrate.measure(
            index, manifest, truth,
            lambda at: _read_normalised(full.project_dir, reader, transform, at), transform.finish)
        if found["pick"] == "flat" and manifest.kind != "flat":  # an index that does not pay off
            rejected = found["calibration"]
            manifest, index = _new("flat", None, reader.rows, dim, **options)
            transform = _Transform(manifest, dim, attributor, full, plan, block_rows, progress)
            _fill(index, manifest, reader, transform, block_rows, None, full.project_dir,
                  progress)
            found = calibrate.measure(
                index, manifest, truth,
                lambda at: _read_normalised(full.project_dir, reader, transform, at),
                transform.finish)
            found["calibration"]["why"] = \
                f"{rejected['measured']} did not pay off: {rejected['why']}"
            found["calibration"]["rejected"] = {key: rejected[key] for key in (
                "measured", "nprobe", "recall_at_10", "speedup", "why", "tried")}
        manifest.faiss["candidates"] = found["candidates"]
        if manifest.kind == "ivf":
            manifest.faiss["nprobe"] = found["nprobe"]
        elif manifest.kind == "hnsw":
            manifest.faiss["ef"] = found["ef"]
        manifest.calibration = found["calibration"]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    manifest.bytes = backend.write(index, path)
    manifest.shards = store.shard_entries(reader.shards)
    manifest.rows = int(index.ntotal)
    manifest.build_seconds += time.perf_counter() - started
    store.save(full.project_dir, manifest)
    return manifest


def _new(resolved, width, rows, dim, *, name, mode, layout, curvature, part, requested,
         quantize, asked_sketch, nlist, nprobe, hnsw_m, ef, pq_m, seed):
    """A new (empty) index and its manifest."""
    lists = nlist or backend.default_nlist(rows)
    codes = backend.auto_codes(requested, resolved, quantize)
    backend.check_trainable(resolved, codes, lists, rows)
    description = backend.factory_string(resolved, width or dim, codes, lists, hnsw_m, pq_m)
    manifest = store.IndexManifest(
        name=name, kind=resolved, mode=mode, layout=layout, curvature=curvature,
        sketch={"width": width, "seed": seed} if width else None, part=part,
        faiss={"factory": description, "requested": requested, "quantize": quantize,
               "asked_sketch": asked_sketch,
               "nlist": lists if resolved == "ivf" else None,
               "nprobe": (nprobe or min(lists, max(8, lists // DEFAULT_PROBE_SHARE)))
               if resolved == "ivf" else None,
               "hnsw_m": hnsw_m if resolved == "hnsw" else None,
               "ef": ef if resolved == "hnsw" else None})
    index = backend.new_index(description, width or dim, resolved)
    if resolved == "hnsw":
        index.hnsw.efConstruction = max(40, ef)
    return manifest, index


def _fill(index, manifest, reader, transform, block_rows, truth, project_dir, progress):
    """Train the index if it needs it, then add the rows of the shards it does not hold yet
    (and feed them to the calibration's exact top-k, `truth`)."""
    if not index.is_trained:
        index.train(_training_sample(project_dir, reader, manifest, transform))
    new = reader.shards[len(manifest.shards):]
    blocks = [(shard, b) for shard in new for b in range(-(-shard.rows // block_rows))]
    shard_blocks = ((shard, ids_rows) for shard in new
                    for ids_rows in reader.fixed_blocks(block_rows, [shard]))
    start_in_shard = {}
    for shard, (_, rows) in track(shard_blocks, len(blocks), f"Indexing ({manifest.name})",
                                  progress):
        offset = start_in_shard.get(shard.file, 0)
        normal = transform.normalise(rows, shard.file, offset)
        if truth is not None:
            truth.add(normal)
        index.add(transform.finish(normal))
        start_in_shard[shard.file] = offset + rows.shape[0]


def _sample_queries(project_dir, reader, transform):
    """(queries [n, dim], their positions): evenly spaced rows of the log as the index sees them
    before any sketch (cosine: normalised), the calibration's queries."""
    n = min(calibrate.SAMPLE_QUERIES, reader.rows)
    positions = torch.linspace(0, reader.rows - 1, n).round().long().unique()
    return _read_normalised(project_dir, reader, transform, positions), positions


def _existing(project_dir, name, path, reader, layout, wanted, rebuild):
    """(manifest, loaded index) of an index to update in place, (manifest, None) of a fresh
    one, or (None, None) to build anew."""
    if not os.path.isfile(os.path.join(store.folder(project_dir, name), store.INDEX_MANIFEST)):
        return None, None
    try:
        manifest = store.load(project_dir, name)
    except LogFormatError as e:  # e.g. written by an older LogIX: the shards rebuild it
        warnings.warn(f"Rebuilding index {name!r}: {e}", stacklevel=4)
        return None, None
    have = {"mode": manifest.mode, "curvature": manifest.curvature, "part": manifest.part,
            "sketch": manifest.faiss.get("asked_sketch", manifest.sketch),
            "requested": manifest.faiss.get("requested"),
            "quantize": manifest.faiss.get("quantize")}
    state, why = store.state(manifest, reader.shards, layout)
    if have != wanted:
        state, why = store.STALE, "it was built with other parameters"
    if not os.path.isfile(path):
        state, why = store.STALE, f"its file {path!r} is missing"
    index = None if state == store.STALE else \
        backend.read(path, manifest.kind, mmap=state == store.FRESH)
    if index is not None and index.ntotal != manifest.rows:
        state, why = store.STALE, (f"its file holds {index.ntotal} vectors, its manifest "
                                   f"{manifest.rows} (an interrupted update)")
    if rebuild or state == store.STALE:
        if not rebuild:
            warnings.warn(f"Rebuilding index {name!r}: {why}.", stacklevel=4)
        return None, None
    return manifest, (None if state == store.FRESH else index)


class _Transform:
    """Log rows -> index vectors: cosine divides by ||(H + lambda I)^-1/2 g||, then the sketch."""

    def __init__(self, manifest, dim, attributor, full, plan, block_rows, progress) -> None:
        self.sketch = Sketch(dim, manifest.sketch["width"], manifest.sketch["seed"]) \
            if manifest.sketch else None
        self.norms, self.starts = None, {}
        if plan is not None:
            self.norms = norm_cache.train_norms(full, plan, block_rows, progress)[:, 0]
            first = 0
            for shard in full.shards:
                self.starts[shard.file] = first
                first += shard.rows

    def normalise(self, rows, shard_file: Optional[str] = None, offset: int = 0,
                  positions=None) -> torch.Tensor:
        """Rows as the index scores them, before the sketch: cosine divides by the norm."""
        rows = rows.float()
        if self.norms is not None:
            if positions is None:
                begin = self.starts[shard_file] + offset
                positions = torch.arange(begin, begin + rows.shape[0])
            rows = rows / self.norms[positions].clamp_min(1e-30).sqrt()[:, None]
        return rows

    def finish(self, rows: torch.Tensor) -> np.ndarray:
        """Normalised rows -> the index's vectors (sketched when it holds a sketch)."""
        if self.sketch is not None:
            rows = self.sketch(rows)
        return np.ascontiguousarray(rows.numpy(), dtype=np.float32)

    def __call__(self, rows, shard_file: Optional[str] = None, offset: int = 0,
                 positions=None) -> np.ndarray:
        return self.finish(self.normalise(rows, shard_file, offset, positions))


def _training_sample(project_dir, reader, manifest, transform) -> np.ndarray:
    """Evenly spaced rows of the index's shards (k-means / quantizer training)."""
    rows = reader.rows
    lists = manifest.faiss.get("nlist") or 1
    want = min(rows, max(TRAIN_ROWS_PER_LIST * lists, 10_000))
    positions = torch.linspace(0, rows - 1, want).round().long().unique()
    return transform.finish(_read_normalised(project_dir, reader, transform, positions))


def _read_normalised(project_dir, reader, transform, positions) -> torch.Tensor:
    """The rows at `positions` of the index's shards, normalised as the index sees them."""
    store_rows = RowStore(project_dir, store.shard_entries(reader.shards), reader.dim)
    global_positions = None
    if transform.norms is not None:
        shard, local = store_rows.locate(positions)
        starts = torch.tensor([transform.starts[f] for f in store_rows.files])
        global_positions = starts[shard] + local
    return transform.normalise(store_rows.read(positions), positions=global_positions)

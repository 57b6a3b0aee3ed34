"""Search: the index proposes candidates per query (the most positive inner products with the
preconditioned query; the most negative ones with its negation for `bottom`), then the exact
scores of the candidates are computed from the shards: the stream's to float32 rounding (a
single query's with its bits); recall is what the index finds. Without FAISS or without an
index for the asked mode, the exact streaming top-k answers instead (with a one-line notice); a
stale index is refused. A batch of STREAM_BATCH or more queries on an exact flat index goes to the
stream too (at 10^4 rows, 64 queries: 100 ms as FAISS's flat scan, 20 ms as the stream's matrix
products), with meta["search"]["stream"] set."""

from __future__ import annotations

import os
import time
import warnings
from typing import List, Optional

import numpy as np
import torch
from torch import Tensor

from logix import distributed
from logix.errors import UsageError
from logix.index import backend, calibrate, store, threads
from logix.index.builder import SERVED_MODES
from logix.index.rows import RowStore
from logix.index import sketch
from logix.index.warm import Warm
from logix.influence import norms as norm_cache
from logix.influence.gather import own_part
from logix.influence.scoring import SCORE_CHUNK
from logix.log import StepRows

MIN_CANDIDATES = 100
STREAM_BATCH = 4  # queries from which an exact flat index hands a batch to the exact stream


def search(attributor, src: StepRows, k: int = 10, candidates: Optional[int] = None,
           rerank: bool = True, bottom: bool = False, *, index: Optional[str] = None,
           mode: Optional[str] = None, hessian: Optional[str] = None,
           damping: Optional[float] = None, precondition: bool = True,
           nprobe: Optional[int] = None, ef: Optional[int] = None,
           fallback: bool = True) -> dict:
    started = time.perf_counter()
    full = attributor.reader()
    if full.rows == 0:
        raise UsageError(f"There are no logged rows to search in {full.project_dir!r}. Log "
                         "training steps and call run.finalize() first.")
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise UsageError(f"k must be a positive integer, got {k!r}.")
    if k > full.rows:
        raise UsageError(f"k={k} is larger than the log, which holds {full.rows} rows; ask for "
                         f"k <= {full.rows}.")
    backend.check_search_params(nprobe, ef, candidates)
    asked = candidates
    candidates = max(k, candidates if candidates is not None else max(4 * k, MIN_CANDIDATES))
    if len(src) == 0:
        raise UsageError("The query log holds no rows; log at least one query step.")
    mode = mode or attributor.influence_config.mode
    if mode not in SERVED_MODES:
        raise UsageError(f"mode={mode!r} is not served by an index; allowed: "
                         f"{list(SERVED_MODES)}. For 'l2' use compute_influence_all(topk=k, "
                         "mode='l2').")
    plan = attributor.scorer(src, mode, precondition, hessian, damping, None)
    reader = own_part(full) if distributed.is_distributed() else full
    part = {"rank": distributed.rank(), "world": distributed.world_size()}
    curvature = store.curvature_of(plan.preconditioner) if mode == "cosine" else None
    warm = getattr(attributor, "index_cache", None) or Warm()
    found, why = _pick(full.project_dir, mode, curvature, part, index, warm)
    if found is None and not fallback:
        raise UsageError(f"logix search: {why}; this search answers from a fresh index only "
                         "(no fallback to the exact stream).")
    if found is None:
        warnings.warn(f"logix search: {why}; using the exact streaming top-k instead.",
                      stacklevel=3)
        return _streamed(attributor, src, mode, precondition, hessian, damping, k, bottom,
                         None, why)
    state, why = store.state(found, reader.shards, store.layout_of(full.manifest))
    if state != store.FRESH:
        raise UsageError(f"Index {found.name!r} is {store.STALE}: {why}. Bring it up to date "
                         f"with {store.build_hint(found, full.project_dir)} (only new shards "
                         f"are read; changed shards mean a rebuild).")
    if _exact(found) and rerank and len(src) >= STREAM_BATCH:
        return _streamed(attributor, src, mode, precondition, hessian, damping, k, bottom,
                         found.name, f"{len(src)} queries on an exact flat index: the exact "
                         "stream's matrix products answer a batch faster than a flat scan")
    calibrated = found.faiss.get("candidates")
    if asked is None and calibrated and k <= calibrate.K:  # measured at build: kind="auto"
        candidates = max(k, calibrated)
    timing = {"index": 0.0, "read": 0.0, "rerank": 0.0}
    with threads.limited(threads.SEARCH_THREADS) as stream_threads:
        local = _search_part(attributor, full, found, plan, src, k, candidates, rerank, bottom,
                             nprobe, ef, warm, timing, stream_threads)
    result = _merge(distributed.all_gather_objects(local), k, bottom) \
        if distributed.is_distributed() else local
    result["meta"] = {**plan.meta, "search": {
        "index": found.name,
        "kind": found.kind, "factory": found.faiss["factory"], "candidates": candidates,
        "rerank": rerank, "exact": rerank,  # exact: the scores, not the recall
        "seconds": {**{key: round(value, 6) for key, value in timing.items()},
                    "total": round(time.perf_counter() - started, 6)}}}
    return result


def _streamed(attributor, src, mode, precondition, hessian, damping, k: int, bottom: bool,
              index: Optional[str], why: str) -> dict:
    """The exact streaming top-k in search's result form, meta["search"] saying why."""
    started = time.perf_counter()
    result = attributor.compute_influence_all(src, mode=mode, precondition=precondition,
                                              hessian=hessian, damping=damping, topk=k)
    if not bottom:
        result.pop("bottom_ids"), result.pop("bottom_scores")
    result["meta"] = {**result["meta"], "search": {
        "index": index, "exact": True, "stream": True, "why": why,
        "seconds": {"total": round(time.perf_counter() - started, 6)}}}
    return result


def _exact(manifest) -> bool:
    """Whether the index's candidates are exact: flat, full width, not quantised."""
    return manifest.kind == "flat" and not manifest.faiss.get("quantize") and not manifest.sketch


def _pick(project_dir: str, mode: str, curvature: Optional[dict], part: dict,
          name: Optional[str], warm: Warm):
    """(manifest, "") of the index to use, or (None, why there is none). Among the indexes that
    serve the query, an exact one (flat, full width, not quantised) first, then the newest."""
    if not backend.available():
        return None, "FAISS is not installed (pip install \"logix[search]\")"
    names = store.names(project_dir)
    if name is not None:
        if name not in names:
            raise UsageError(f"There is no index named {name!r} in {project_dir!r}; it has "
                             f"{names or 'none'}. Build one with attributor.build_index("
                             f"kind=..., mode=..., name={name!r}) or `logix index DIR --name "
                             f"{name} --kind K --mode M`.")
        manifest = warm.manifest(project_dir, name)
        if manifest.mode != mode:
            raise UsageError(f"Index {name!r} serves mode {manifest.mode!r}, not {mode!r}. "
                             f"Build an index for it: attributor.build_index(mode={mode!r}) or "
                             f"`logix index DIR --mode {mode}`.")
        if curvature and manifest.curvature["key"] != curvature["key"]:
            raise UsageError(f"Index {name!r} normalises rows for curvature "
                             f"{_curvature_text(manifest.curvature)}but the query asks for "
                             f"{_curvature_text(curvature)}(other statistics or damping, e.g. "
                             f"refit after more rows were logged). Rebuild it: "
                             f"{store.build_hint(manifest, project_dir, rebuild=True)}.")
        return manifest, ""
    fitting = []
    for n in names:
        manifest = warm.manifest(project_dir, n)
        if manifest.mode == mode and manifest.part == part and \
                (curvature is None or manifest.curvature["key"] == curvature["key"]):
            mtime = os.path.getmtime(os.path.join(store.folder(project_dir, n),
                                                  store.INDEX_MANIFEST))
            fitting.append(((_exact(manifest), mtime), n, manifest))
    if not fitting:
        return None, (f"{project_dir!r} has no index for mode {mode!r} "
                      f"{_curvature_text(curvature)}(build one with attributor.build_index("
                      f"mode={mode!r}{_hessian_option(curvature, '=')}) or `logix index DIR"
                      f"{' --mode ' + mode if mode != 'dot' else ''}"
                      f"{_hessian_option(curvature, ' ')}`)")
    return max(fitting, key=lambda t: (t[0], t[1]))[2], ""


def _hessian_option(curvature: Optional[dict], sep: str) -> str:
    if not curvature:
        return ""
    return f", hessian={curvature['hessian']!r}" if sep == "=" else \
        f" --hessian {curvature['hessian']}"


def _curvature_text(curvature: Optional[dict]) -> str:
    return f"(curvature {curvature['hessian']}, damping {curvature['damping']}) " \
        if curvature else ""


def _search_part(attributor, full, manifest, plan, src, k, candidates, rerank, bottom,
                 nprobe, ef, warm: Warm, timing: dict, stream_threads: int) -> dict:
    """This process's index: candidates, then exact scores; {src_ids, top_*[, bottom_*]}.
    `timing` gathers seconds: index (FAISS), read (candidate rows), rerank (exact scores);
    `stream_threads`: the stream's torch thread count (its bits)."""
    path = os.path.join(store.folder(full.project_dir, manifest.name), store.INDEX_FILE)
    if not os.path.isfile(path):
        raise UsageError(f"Index {manifest.name!r} has lost its file {path!r}. Rebuild it: "
                         f"{store.build_hint(manifest, full.project_dir, rebuild=True)}.")
    index, lock = warm.index(path, manifest.kind)
    if index.ntotal != manifest.rows:
        raise UsageError(f"Index {manifest.name!r} file holds {index.ntotal} vectors but its "
                         f"manifest says {manifest.rows} (an interrupted update). Rebuild it: "
                         f"build_index(name={manifest.name!r}, rebuild=True).")
    rows = warm.rows(full.project_dir, manifest.shards, full.dim, full.verify)
    queries = plan.queries  # [n_query, dim] preconditioned
    if manifest.sketch:
        width, seed = manifest.sketch["width"], manifest.sketch["seed"]
        queries = sketch.cached(full.dim, width, seed)(queries)
    queries = np.ascontiguousarray(queries.numpy(), dtype=np.float32)
    c = min(candidates, int(index.ntotal))
    norms = None
    if plan.needs_norms:  # the cached train norms the streaming scores use, by log position
        norms = warm.norms(norm_cache.cache_path(full, plan), lambda: norm_cache.train_norms(
            full, plan, attributor.influence_config.block_rows, False))
    result = {"src_ids": list(src.data_ids)}
    sides = [("top", 1.0, True)] + ([("bottom", -1.0, False)] if bottom else [])
    for side, sign, largest in sides:
        started = time.perf_counter()
        with lock:  # nprobe / ef are the index's state: set and search as one step
            backend.set_search_params(index, nprobe or manifest.faiss.get("nprobe"),
                                      ef or manifest.faiss.get("ef"))
            with threads.faiss_batch(len(queries), stream_threads):
                found_scores, found = index.search(sign * queries, c)
        timing["index"] += time.perf_counter() - started
        found = torch.from_numpy(found).long()  # [n_query, c]; -1 where the index had fewer
        if rerank:
            values, positions = _exact_top(plan, rows, found, norms,
                                           _log_starts(full, manifest), min(k, c), largest,
                                           timing, warm.block(SCORE_CHUNK, full.dim),
                                           stream_threads)
        else:
            scores = torch.from_numpy(found_scores).float()
            scores = sign * scores
            if plan.needs_norms:  # cosine: the index's rows are normalised, the query is not
                scores = scores / plan.query_norms[:, None].clamp_min(1e-30).sqrt()
            fill = float("-inf") if largest else float("inf")
            scores = scores.masked_fill(found < 0, fill)
            values, order = torch.topk(scores, min(k, c), dim=1, largest=largest, sorted=True)
            positions = torch.gather(found, 1, order)
        result[f"{side}_ids"] = rows.ids([row[row >= 0].tolist() for row in positions])
        result[f"{side}_scores"] = values
    return result


# float32 round-off bound of a dot product of n terms: |fl(q.r) - q.r| <= n u sum|q_d r_d|
# (u = 2^-24); two orders of summation differ by at most twice that.
_UNIT_ROUNDOFF = 2.0 ** -24


def _exact_top(plan, rows: RowStore, found: Tensor, norms: Optional[Tensor], starts: Tensor,
               k: int, largest: bool, timing: dict, block: Tensor, stream_threads: int):
    """(values, positions) [n_query, k]: each query's best k candidates by their exact scores.

    Every candidate's score to round-off: one read of the union of all queries' candidates (one
    gather per shard), then per query a product with its own candidates only (a gather small
    enough to stay in cache; one product of the union with every query was 2x slower for 64
    queries, one batched product over a gathered [n_query, c, dim] copy up to 15x). A batch
    (several queries) returns these: the stream's scores to float32 round-off. A single query
    then takes the stream's bits for the candidates that can still be in its top k (within the
    round-off bound of the k-th score, usually k or a few more) through `_stream_bits`: one
    fixed-shape GEMM, cheap for one query, while a batch's near rows need several GEMMs over
    every query on the stream's threads (most of a 64-query search)."""
    started = time.perf_counter()
    valid = found >= 0
    union, inverse = torch.unique(found.clamp_min(0), return_inverse=True)  # sorted
    values = rows.read(union)  # [n_union, dim]
    read = time.perf_counter()
    timing["read"] += read - started
    queries = plan.queries  # [n_query, dim]
    fast = torch.empty(inverse.shape)  # [n_query, c]
    for q in range(inverse.shape[0]):
        torch.mv(values.index_select(0, inverse[q]), queries[q], out=fast[q])
    train_norms = None
    if norms is not None:
        shard, local = rows.locate(union)
        train_norms = norms[starts[shard] + local]  # [n_union, 1]
        scale = plan.query_norms[:, None].clamp_min(1e-30).sqrt() * \
            train_norms[inverse][:, :, 0].clamp_min(1e-30).sqrt()
        fast = fast / scale
    sign = 1.0 if largest else -1.0
    fill = float("-inf")
    signed = (sign * fast).masked_fill(~valid, fill)
    if plan.n_query > 1:
        best, order = torch.topk(signed, k, dim=1, sorted=True)
    else:
        best, order = _stream_top(plan, union, inverse, values, train_norms, valid, signed,
                                  sign, k, block, stream_threads)
    positions = torch.gather(found, 1, order).masked_fill(best == fill, -1)
    timing["rerank"] += time.perf_counter() - read
    return sign * best, positions


def _stream_top(plan, union: Tensor, inverse: Tensor, values: Tensor,
                train_norms: Optional[Tensor], valid: Tensor, signed: Tensor, sign: float,
                k: int, block: Tensor, stream_threads: int):
    """(signed scores, candidate order) [n_query, k] of the best k candidates with the stream's
    bits, from `signed`, their round-off accurate scores (-inf where invalid)."""
    fill = float("-inf")
    # sum_d |q_d r_d| <= |q| |r| (Cauchy-Schwarz): a looser bound that needs no second product
    bound = 2 * values.shape[1] * _UNIT_ROUNDOFF * plan.queries.norm(dim=1)[:, None] * \
        values.norm(dim=1)[inverse]
    bound_scale = 1.0
    if train_norms is not None:  # cosine: the bound of the product scaled, and its divisions'
        bound = bound / (plan.query_norms[:, None].clamp_min(1e-30).sqrt() *
                         train_norms[inverse][:, :, 0].clamp_min(1e-30).sqrt())
        bound_scale = 1.01
    bound = (bound + 8 * _UNIT_ROUNDOFF * signed.masked_fill(~valid, 0).abs()) * bound_scale
    kth = torch.topk(signed, k, dim=1).values[:, -1:]  # [n_query, 1]
    near = valid & (signed + bound >= kth - bound.masked_fill(~valid, 0).max(1, keepdim=True)
                    .values)
    exact = torch.full_like(signed, float("nan"))
    needed = torch.unique(inverse[near])
    bits = _stream_bits(plan, union[needed], values[needed],
                        None if train_norms is None else train_norms[needed], block,
                        stream_threads)
    slot = torch.full((len(union),), -1, dtype=torch.long)
    slot[needed] = torch.arange(len(needed))
    exact[near] = bits[near.nonzero()[:, 0], slot[inverse[near]]]
    return torch.topk((sign * exact).masked_fill(~near, fill), k, dim=1, sorted=True)


def _stream_bits(plan, union: Tensor, values: Tensor, train_norms: Optional[Tensor],
                 block: Tensor, stream_threads: int) -> Tensor:
    """[n_query, n] scores of rows at log positions `union` with the stream's bits.

    Each row goes to the slot of a SCORE_CHUNK-row matrix it has in the stream (its position
    modulo SCORE_CHUNK, blocks being chunk aligned), so its score is computed by the same matrix
    multiply of the same queries at the same row and has the stream's bits; rows sharing a slot
    go to successive matrices, each multiplied on the stream's thread count (`stream_threads`:
    the bits can depend on it), or on one thread where `threads.bits_threads` finds the same
    bits there. `block`: a zeroed [SCORE_CHUNK, dim] scratch matrix, left zeroed.
    Returns [n_query, n]."""
    slots = union % SCORE_CHUNK
    by_slot = torch.argsort(slots, stable=True)
    first = torch.searchsorted(slots[by_slot], slots[by_slot])  # first of each slot group
    chunk = torch.empty_like(union)
    chunk[by_slot] = torch.arange(len(union)) - first  # k-th row of its slot -> chunk k
    scores = torch.empty(len(union), plan.n_query)
    previous = slots[:0]
    try:
        for c in range(int(chunk.max()) + 1 if len(union) else 0):
            members = (chunk == c).nonzero().flatten()
            block[previous] = 0  # only the slots the last chunk filled
            block[slots[members]] = values[members]
            previous = slots[members]
            block_norms = None
            if train_norms is not None:
                block_norms = torch.ones(SCORE_CHUNK, train_norms.shape[1])
                block_norms[slots[members]] = train_norms[members]
            with threads.torch_threads(threads.bits_threads(plan.queries.shape[0], block.shape[1],
                                                            stream_threads)):
                raw = plan.products(block)
            scores[members] = plan.finish(raw, block, block_norms)[slots[members]]
    finally:
        block[previous] = 0
    return scores.T


def _log_starts(full, manifest) -> Tensor:
    """Position in the whole log of the first row of each of the index's shards."""
    first, starts = 0, {}
    for shard in full.shards:
        starts[shard.file] = first
        first += shard.rows
    return torch.tensor([starts[s["file"]] for s in manifest.shards], dtype=torch.long)


def _merge(parts: List[dict], k: int, bottom: bool) -> dict:
    """Every rank's candidates (exact scores) merged into the global top-k (and bottom-k)."""
    merged = {"src_ids": parts[0]["src_ids"]}
    for side, largest in [("top", True)] + ([("bottom", False)] if bottom else []):
        per_query = []
        scores_out = []
        for q in range(len(merged["src_ids"])):
            ids = [i for p in parts for i in p[f"{side}_ids"][q]]
            scores = torch.cat([p[f"{side}_scores"][q][:len(p[f"{side}_ids"][q])]
                                for p in parts])
            values, order = torch.topk(scores, min(k, len(ids)), largest=largest, sorted=True)
            per_query.append([ids[i] for i in order.tolist()])
            scores_out.append(values)
        merged[f"{side}_ids"] = per_query
        merged[f"{side}_scores"] = torch.stack(scores_out)
    return merged

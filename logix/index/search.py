"""Search: the index proposes candidates per query (the most positive inner products with the
preconditioned query; the most negative ones with its negation for `bottom`), then the exact
scores of the candidates are computed from the shards. Scores are exact; recall is what the
index finds. Without FAISS or without an index for the asked mode, the exact streaming top-k
answers instead (with a one-line notice); a stale index is refused."""

from __future__ import annotations

import os
import warnings
from typing import List, Optional

import numpy as np
import torch
from torch import Tensor

from logix import distributed
from logix.errors import UsageError
from logix.index import backend, store
from logix.index.builder import SERVED_MODES
from logix.index.rows import RowStore
from logix.index import sketch
from logix.influence import norms as norm_cache
from logix.influence.gather import own_part
from logix.influence.scoring import SCORE_CHUNK
from logix.log import StepLog

MIN_CANDIDATES = 100


def search(attributor, src: StepLog, k: int = 10, candidates: Optional[int] = None,
           rerank: bool = True, bottom: bool = False, *, index: Optional[str] = None,
           mode: Optional[str] = None, hessian: Optional[str] = None,
           damping: Optional[float] = None, precondition: bool = True,
           nprobe: Optional[int] = None, ef: Optional[int] = None) -> dict:
    full = attributor.reader()
    if full.rows == 0:
        raise UsageError(f"There are no logged rows to search in {full.project_dir!r}. Log "
                         "training steps and call run.finalize() first.")
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise UsageError(f"k must be a positive integer, got {k!r}.")
    if k > full.rows:
        raise UsageError(f"k={k} is larger than the log, which holds {full.rows} rows; ask for "
                         f"k <= {full.rows}.")
    backend.check_search_params(nprobe, ef)
    candidates = max(k, candidates if candidates is not None else max(4 * k, MIN_CANDIDATES))
    if len(src) == 0:
        raise UsageError("The query log holds no rows; log at least one query step.")
    mode = mode or attributor.influence_config.mode
    if mode not in SERVED_MODES:
        raise UsageError(f"mode={mode!r} is not served by an index; allowed: "
                         f"{list(SERVED_MODES)}. For 'l2' use compute_influence_all(topk=k, "
                         "mode='l2').")
    plan = attributor.score_plan(src, mode, precondition, hessian, damping, None)
    reader = own_part(full) if distributed.is_distributed() else full
    part = {"rank": distributed.rank(), "world": distributed.world_size()}
    curvature = store.curvature_of(plan.preconditioner) if mode == "cosine" else None
    found, why = _pick(full.project_dir, mode, curvature, part, index)
    if found is None:
        warnings.warn(f"logix search: {why}; using the exact streaming top-k instead.",
                      stacklevel=3)
        result = attributor.compute_influence_all(src, mode=mode, precondition=precondition,
                                                  hessian=hessian, damping=damping, topk=k)
        if not bottom:
            result.pop("bottom_ids"), result.pop("bottom_scores")
        result["meta"] = {**result["meta"], "search": {"index": None, "exact": True,
                                                       "why": why}}
        return result
    state, why = store.state(found, reader.shards, store.layout_of(full.manifest))
    if state != store.FRESH:
        raise UsageError(f"Index {found.name!r} is {store.STALE}: {why}. Bring it up to date "
                         f"with {store.build_hint(found, full.project_dir)} (only new shards "
                         f"are read; changed shards mean a rebuild).")
    local = _search_part(attributor, full, found, plan, src, k, candidates, rerank, bottom,
                         nprobe, ef)
    result = _merge(distributed.all_gather_objects(local), k, bottom) \
        if distributed.is_distributed() else local
    result["meta"] = {**plan.meta, "search": {
        "index": found.name,
        "kind": found.kind, "factory": found.faiss["factory"], "candidates": candidates,
        "rerank": rerank, "exact": rerank}}  # exact: the scores, not the recall
    return result


def _pick(project_dir: str, mode: str, curvature: Optional[dict], part: dict,
          name: Optional[str]):
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
        manifest = store.load(project_dir, name)
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
        manifest = store.load(project_dir, n)
        if manifest.mode == mode and manifest.part == part and \
                (curvature is None or manifest.curvature["key"] == curvature["key"]):
            mtime = os.path.getmtime(os.path.join(store.folder(project_dir, n),
                                                  store.INDEX_MANIFEST))
            exact = manifest.kind == "flat" and not manifest.faiss.get("quantize") \
                and not manifest.sketch
            fitting.append(((exact, mtime), n, manifest))
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
                 nprobe, ef) -> dict:
    """This process's index: candidates, then exact scores; {src_ids, top_*[, bottom_*]}."""
    path = os.path.join(store.folder(full.project_dir, manifest.name), store.INDEX_FILE)
    if not os.path.isfile(path):
        raise UsageError(f"Index {manifest.name!r} has lost its file {path!r}. Rebuild it: "
                         f"{store.build_hint(manifest, full.project_dir, rebuild=True)}.")
    index = backend.read(path, manifest.kind)
    if index.ntotal != manifest.rows:
        raise UsageError(f"Index {manifest.name!r} file holds {index.ntotal} vectors but its "
                         f"manifest says {manifest.rows} (an interrupted update). Rebuild it: "
                         f"build_index(name={manifest.name!r}, rebuild=True).")
    backend.set_search_params(index, nprobe or manifest.faiss.get("nprobe"),
                              ef or manifest.faiss.get("ef"))
    rows = RowStore(full.project_dir, manifest.shards, full.dim, verify=full.verify)
    queries = plan.queries  # [n_query, dim] preconditioned
    if manifest.sketch:
        width, seed = manifest.sketch["width"], manifest.sketch["seed"]
        queries = sketch.cached(full.dim, width, seed)(queries)
    queries = np.ascontiguousarray(queries.numpy(), dtype=np.float32)
    c = min(candidates, int(index.ntotal))
    norms = None
    if plan.needs_norms:  # the cached train norms the streaming scores use, by log position
        norms = norm_cache.train_norms(full, plan, attributor.influence_config.block_rows, False)
    result = {"src_ids": list(src.data_ids)}
    sides = [("top", 1.0, True)] + ([("bottom", -1.0, False)] if bottom else [])
    for side, sign, largest in sides:
        found_scores, found = index.search(sign * queries, c)
        found = torch.from_numpy(found).long()  # [n_query, c]; -1 where the index had fewer
        if rerank:
            scores = _exact(plan, rows, found, norms, _log_starts(full, manifest))
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


def _exact(plan, rows: RowStore, found: Tensor, norms: Optional[Tensor],
           starts: Tensor) -> Tensor:
    """[n_query, c] exact scores of each query's candidates.

    The union of all queries' candidates is read once, in shard and offset order. Each
    candidate goes to the slot of a SCORE_CHUNK-row matrix it has in the stream (its position
    modulo SCORE_CHUNK, blocks being chunk aligned), so its score is computed by the same matrix
    multiply of the same queries at the same row and has the stream's bits; candidates sharing
    a slot go to successive matrices."""
    union, inverse = torch.unique(found.clamp_min(0), return_inverse=True)  # sorted
    values = rows.read(union)  # [n_union, dim]
    slots = union % SCORE_CHUNK
    by_slot = torch.argsort(slots, stable=True)
    first = torch.searchsorted(slots[by_slot], slots[by_slot])  # first of each slot group
    chunk = torch.empty_like(union)
    chunk[by_slot] = torch.arange(len(union)) - first  # k-th candidate of its slot -> chunk k
    train_norms = None
    if norms is not None:
        shard, local = rows.locate(union)
        train_norms = norms[starts[shard] + local]
    scores = torch.empty(len(union), plan.n_query)
    block = torch.empty(SCORE_CHUNK, rows.dim)
    for c in range(int(chunk.max()) + 1 if len(union) else 0):
        members = (chunk == c).nonzero().flatten()
        block.zero_()
        block[slots[members]] = values[members]
        block_norms = None
        if train_norms is not None:
            block_norms = torch.ones(SCORE_CHUNK, train_norms.shape[1])
            block_norms[slots[members]] = train_norms[members]
        scores[members] = plan.score(block, block_norms)[slots[members]]
    return torch.gather(scores.T, 1, inverse)


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

"""kind="auto" measures what it built: recall@10 and speed-up on a sample of the log's own rows.

The queries are SAMPLE_QUERIES evenly spaced rows of the log, as the index sees them (cosine:
normalised), each searched for its 10 best other rows (the row itself is left out of both lists:
it would be a free hit). The truth is the exact top-10 by inner product over every row, gathered
block by block while the rows are added (`Truth`), and timed: that in-memory scan is what the
exact stream does for the same queries, less reading the shards. The index answers the same
queries the way `search` does (candidates, then exact inner products of the candidates' full
rows), one setting after another, cheapest first (`settings`): nprobe (HNSW: ef) together with
the number of candidates, each searched with its own count (an HNSW walk is as wide as the
candidates it returns, so fewer candidates are not a prefix of more). The first setting that
reaches `backend.AUTO_RECALL_TARGET` (0.97, a margin over the 0.95 asked of it: queries that
are not log rows measured 0.01-0.02 lower at 10^5 rows) becomes the index's default, for
k <= 10. A flat index replaces an IVF or HNSW one that reaches it at no setting, or is not
faster than the scan (`pick`). The numbers, and how they were measured, go to the index manifest
(`calibration`) and `logix show`.
"""

from __future__ import annotations

import time
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from logix.index import backend

SAMPLE_QUERIES = 64
K = 10
CANDIDATE_LADDER = (20, 30, 40, 50, 100)  # candidates per query tried (search's default: 100)
EF_LADDER = (16, 32, 64, 128, 256, 512)  # HNSW search breadths tried


class Truth:
    """The exact top-(K+1) of the sample queries over the rows added so far, in add order."""

    def __init__(self, queries: Tensor, positions: Tensor) -> None:
        self.queries = queries.float()  # [n, dim]
        self.positions = positions  # [n] the queries' own positions
        self.scores = torch.full((len(positions), 0), float("-inf"))
        self.ids = torch.zeros(len(positions), 0, dtype=torch.long)
        self.rows = 0
        self.seconds = 0.0

    def add(self, rows: Tensor) -> None:
        started = time.perf_counter()
        scores = torch.cat([self.scores, self.queries @ rows.T], dim=1)  # [n, kept + b]
        ids = torch.cat([self.ids, torch.arange(self.rows, self.rows + rows.shape[0])
                         .expand(len(self.positions), -1)], dim=1)
        self.scores, order = torch.topk(scores, min(K + 1, scores.shape[1]), dim=1)
        self.ids = torch.gather(ids, 1, order)
        self.rows += rows.shape[0]
        self.seconds += time.perf_counter() - started

    def top(self) -> List[set]:
        return _top_without_self(self.scores, self.ids, self.positions)


def settings(manifest, rows: int) -> List[Tuple[Optional[int], int]]:
    """(nprobe or ef, candidates) to try, cheapest first. IVF: by nprobe (the lists scanned are
    most of the cost), then candidates. HNSW: by a rough cost, max(ef, candidates) for the walk
    (FAISS walks at least as wide as the candidates asked) plus twice the candidates for reading
    and re-ranking them (what a 64-query batch at 10^5 rows measured). Flat: candidates."""
    counts = [c for c in CANDIDATE_LADDER if c <= rows] or [rows]
    if manifest.kind == "ivf":
        nlist, nprobe, probes = manifest.faiss["nlist"], min(8, manifest.faiss["nlist"]), []
        while True:
            probes.append(nprobe)
            if nprobe >= nlist:
                break
            nprobe = min(2 * nprobe, nlist)
        return [(n, c) for n in probes for c in counts]
    if manifest.kind == "hnsw":
        pairs = {(max(ef, c), c): (ef, c) for ef in reversed(EF_LADDER) for c in counts}
        return [pairs[key] for key in sorted(pairs, key=lambda w: (w[0] + 2 * w[1], w))]
    return [(None, c) for c in counts]


def measure(index, manifest, truth: Truth, read: Callable[[Tensor], Tensor],
            finish: Callable[[Tensor], np.ndarray]) -> dict:
    """{"pick": "index" | "flat", "nprobe", "ef", "candidates", "calibration": what goes to the
    manifest}. Every setting is searched as `search` does (k = its candidates), cheapest first,
    until one reaches backend.AUTO_RECALL_TARGET; else the last (the widest) is kept."""
    want = truth.top()
    queries = finish(truth.queries)
    field = {"ivf": "nprobe", "hnsw": "ef"}.get(manifest.kind)
    tried = []
    for setting, c in settings(manifest, int(index.ntotal)):
        backend.set_search_params(index, *((setting, None) if field == "nprobe" else
                                           (None, setting)))
        started = time.perf_counter()
        _, found = index.search(queries, c)
        found = torch.from_numpy(found).long()  # [n, c]
        searched = time.perf_counter()
        union, inverse = torch.unique(found.clamp_min(0), return_inverse=True)
        rows = read(union)  # [n_union, dim]
        scores = torch.einsum("qd,qcd->qc", truth.queries, rows[inverse])
        scores = scores.masked_fill(found < 0, float("-inf"))
        got = _top_without_self(scores, found, truth.positions)
        seconds = time.perf_counter() - started
        recall = sum(len(g & w) for g, w in zip(got, want)) / max(1, sum(len(w) for w in want))
        tried.append({**({field: setting} if field else {}), "candidates": c,
                      "recall_at_10": round(recall, 4),
                      "index_ms": round(1e3 * (searched - started), 3),
                      "index_and_rerank_ms": round(1e3 * seconds, 3)})
        if recall >= backend.AUTO_RECALL_TARGET:
            break
    best = tried[-1]
    scan_ms = 1e3 * truth.seconds
    speedup = scan_ms / max(best["index_and_rerank_ms"], 1e-6)
    pick = "index" if manifest.kind == "flat" or manifest.faiss["requested"] != "auto" or (
        best["recall_at_10"] >= backend.AUTO_RECALL and speedup > backend.AUTO_MIN_SPEEDUP) \
        else "flat"
    calibration = {
        "queries": len(truth.positions), "k": K, "candidates": best["candidates"],
        "sample": "evenly spaced rows of the log as queries, each row left out of its own "
                  "top-10; truth: exact inner products over every row",
        "positions": truth.positions.tolist(),
        "nprobe": best.get("nprobe"), "ef": best.get("ef"),
        "recall_at_10": best["recall_at_10"],
        "exact_scan_ms": round(scan_ms, 3), "index_ms": best["index_and_rerank_ms"],
        "speedup": round(speedup, 2), "tried": tried,
        "measured": manifest.faiss["factory"],
        "picked": manifest.faiss["factory"] if pick == "index" else "Flat (full rows)",
        "why": "below backend.AUTO_FLAT_ROWS rows: exact flat index" if manifest.kind == "flat"
        else "recall and speed-up measured" if pick == "index" else
               f"the index measured recall {best['recall_at_10']} and {speedup:.2f}x the exact "
               f"scan (needs >= {backend.AUTO_RECALL} and > {backend.AUTO_MIN_SPEEDUP}x): a "
               "flat index is faster or more accurate"}
    return {"pick": pick, "nprobe": best.get("nprobe"), "ef": best.get("ef"),
            "candidates": best["candidates"], "calibration": calibration}


def _top_without_self(scores: Tensor, ids: Tensor, positions: Tensor) -> List[set]:
    """Per query, the K best ids other than the query's own row."""
    scores = scores.masked_fill(ids == positions[:, None], float("-inf"))
    k = min(K, scores.shape[1])
    values, order = torch.topk(scores, k, dim=1)
    top = torch.gather(ids, 1, order)
    return [set(t[v > float("-inf")].tolist()) for t, v in zip(top, values)]

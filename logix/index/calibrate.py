"""kind="auto" measures what it built: recall@10 and speed-up on a sample of the log's own rows.

The queries are SAMPLE_QUERIES evenly spaced rows of the log, as the index sees them (cosine:
normalised), each searched for its 10 best other rows (the row itself is left out of both lists:
it would be a free hit). The truth is the exact top-10 by inner product over every row, gathered
block by block while the rows are added (`Truth`), and timed: that in-memory scan is what the
exact stream does for the same queries, less reading the shards. The index answers the same
queries the way `search` does (candidates, then exact inner products of the candidates' full
rows); the smallest nprobe (HNSW: ef) on a doubling ladder that reaches
`backend.AUTO_RECALL_TARGET` (0.97, a margin over the 0.95 asked of it) becomes the index's
default, and the fewest candidates (20, 30, 50, else 100) that keep its recall become the
default for k <= 10 (`search_candidates`: re-ranking 64 queries' candidates is most of a batch's
time). A flat index replaces an IVF one that reaches it at no nprobe, or is not faster
than the scan (`pick`). Both numbers, and how they were measured, go to the index manifest
(`calibration`) and `logix show`.
"""

from __future__ import annotations

import time
from typing import Callable, List

import numpy as np
import torch
from torch import Tensor

from logix.index import backend

SAMPLE_QUERIES = 64
K = 10
CANDIDATES = 100  # search's default for k = 10: max(4k, 100)
CANDIDATE_LADDER = (20, 30, 50)  # fewer candidates tried, kept when the recall holds


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


def measure(index, manifest, truth: Truth, read: Callable[[Tensor], Tensor],
            finish: Callable[[Tensor], np.ndarray]) -> dict:
    """{"pick": "index" | "flat", "nprobe", "calibration": what goes to the manifest}."""
    want = truth.top()
    queries = finish(truth.queries)
    c = min(CANDIDATES, int(index.ntotal))
    ladder = [None]
    if manifest.kind == "ivf":
        nlist = manifest.faiss["nlist"]
        ladder, nprobe = [], min(8, nlist)
        while True:
            ladder.append(nprobe)
            if nprobe >= nlist:
                break
            nprobe = min(2 * nprobe, nlist)
    field = "nprobe"
    if manifest.kind == "hnsw":  # search breadth
        field, ladder = "ef", [16, 32, 64, 128, 256, 512]
    tried = []
    for nprobe in ladder:
        backend.set_search_params(index, *((nprobe, None) if field == "nprobe" else
                                           (None, nprobe)))
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
        last = (found, scores)
        recall = sum(len(g & w) for g, w in zip(got, want)) / max(1, sum(len(w) for w in want))
        tried.append({field: nprobe, "recall_at_10": round(recall, 4),
                      "index_ms": round(1e3 * (searched - started), 3),
                      "index_and_rerank_ms": round(1e3 * seconds, 3)})
        if recall >= backend.AUTO_RECALL_TARGET:
            break
    best = tried[-1]
    best.setdefault("nprobe", None)
    # candidates: FAISS returns them best first, so fewer is a prefix of the same answer
    fewer = c
    for n in CANDIDATE_LADDER:
        if n >= c:
            break
        got = _top_without_self(last[1][:, :n], last[0][:, :n], truth.positions)
        recall = sum(len(g & w) for g, w in zip(got, want)) / max(1, sum(len(w) for w in want))
        if recall >= min(best["recall_at_10"], backend.AUTO_RECALL_TARGET):
            fewer = n
            break
    scan_ms = 1e3 * truth.seconds
    speedup = scan_ms / max(best["index_and_rerank_ms"], 1e-6)
    pick = "index" if manifest.kind == "flat" or manifest.faiss["requested"] != "auto" or (
        best["recall_at_10"] >= backend.AUTO_RECALL and speedup > backend.AUTO_MIN_SPEEDUP) \
        else "flat"
    calibration = {
        "queries": len(truth.positions), "k": K, "candidates": c, "search_candidates": fewer,
        "sample": "evenly spaced rows of the log as queries, each row left out of its own "
                  "top-10; truth: exact inner products over every row",
        "positions": truth.positions.tolist(),
        "nprobe": best["nprobe"], "ef": best.get("ef"), "recall_at_10": best["recall_at_10"],
        "exact_scan_ms": round(scan_ms, 3), "index_ms": best["index_and_rerank_ms"],
        "speedup": round(speedup, 2), "tried": tried,
        "measured": manifest.faiss["factory"],
        "picked": manifest.faiss["factory"] if pick == "index" else "Flat (full rows)",
        "why": "below backend.AUTO_FLAT_ROWS rows: exact flat index" if manifest.kind == "flat"
        else "recall and speed-up measured" if pick == "index" else
               f"the index measured recall {best['recall_at_10']} and {speedup:.2f}x the exact "
               f"scan (needs >= {backend.AUTO_RECALL} and > {backend.AUTO_MIN_SPEEDUP}x): a "
               "flat index is faster or more accurate"}
    return {"pick": pick, "nprobe": best["nprobe"], "ef": best.get("ef"), "candidates": fewer,
            "calibration": calibration}


def _top_without_self(scores: Tensor, ids: Tensor, positions: Tensor) -> List[set]:
    """Per query, the K best ids other than the query's own row."""
    scores = scores.masked_fill(ids == positions[:, None], float("-inf"))
    k = min(K, scores.shape[1])
    values, order = torch.topk(scores, k, dim=1)
    top = torch.gather(ids, 1, order)
    return [set(t[v > float("-inf")].tolist()) for t, v in zip(top, values)]

"""`logix.Attributor`: the Attributor of `logix.influence` with vector search on top.

Scoring lives in `logix.influence`, which never imports `logix.index`; this subclass adds the
two index entry points (`build_index`, `search`), and it is what `logix.Attributor` and
`run.influence` are."""

from __future__ import annotations

from typing import Optional

from logix.compat import AttributorNames
from logix.index.builder import build
from logix.index.search import search
from logix.index.warm import Warm
from logix.influence import attributor
from logix.influence.results import Scores, scores


class Attributor(attributor.Attributor, AttributorNames):
    # the class docstring is influence's (inspect.getdoc inherits it)

    @property
    def index_cache(self) -> Warm:
        """What `search` keeps open between calls (index files, row stores over the mapped
        shards, train norms), each reopened when its file changes; `.clear()` drops it."""
        warm = self.__dict__.get("_index_cache")
        if warm is None:
            warm = self.__dict__["_index_cache"] = Warm()
        return warm

    def build_index(self, kind: str = "auto", mode: str = "dot", **options):
        """Build (or bring up to date) a FAISS index of the saved rows under
        ``<project>/index/<name>/``, for `search`. kind: "auto" | "flat" | "ivf" | "hnsw".
        auto: flat below 10,000 rows, HNSW while its file fits 2 GiB (about 1.6 million rows),
        else IVF-SQ8, the latter two over a
        256-wide sketch of rows wider than 512 with ef / nprobe calibrated on the log's own rows
        (recall@10 and speed-up recorded in the manifest's `calibration`; flat where that index
        measures below 0.95 recall@10 or no faster). mode "dot" (serves every curvature) or
        "cosine" (built for one curvature and damping). options: sketch=width (seeded JL
        sketch of wide rows), quantize=None | "sq8" | "pq", name, rebuild, hessian, damping,
        nlist, nprobe, hnsw_m, ef, pq_m, seed, progress, measure (record recall@10 and
        speed-up measured on the log's own rows, as auto does, and set nprobe / ef to the
        smallest that reaches 0.95). Only shards logged since the last
        build are read; a stale index is rebuilt. Needs ``pip install "logix[search]"``.
        Returns the index manifest."""
        return build(self, kind, mode, **options)

    def search(self, query=None, k: int = 10, candidates: Optional[int] = None,
               rerank: bool = True, bottom: bool = False, **options) -> Scores:
        """The k most helpful training examples per query, fast: the index proposes
        `candidates` per query (default max(4k, 100)) and their exact scores rank them, so the
        scores are exact and only recall is approximate. bottom=True adds the k most harmful.
        Returns Scores with "src_ids", "top_ids", "top_scores"[, "bottom_ids",
        "bottom_scores"], "meta", as influence(..., topk=k); meta["search"]["seconds"] splits
        the time (index, read, rerank, total). options: index (name), mode, hessian, damping,
        precondition, nprobe, ef, fallback. Without FAISS or an index for the mode, the exact
        streaming top-k answers (with a notice; fallback=False: a UsageError instead); a stale
        index is refused. The index, the row stores over the mapped shards and the train norms
        stay open between calls (`index_cache`)."""
        return scores(search(self, self.query(query), k, candidates, rerank, bottom, **options))

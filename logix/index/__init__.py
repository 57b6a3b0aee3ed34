"""Vector search over a saved log: an approximate index proposes candidates, exact scores rank
them (DESIGN.md section 9: reads shards, writes ``<project>/index/``, never changes logs).

A score is g_q^T (H + lambda I)^-1 g_i = <(H + lambda I)^-1 g_q, g_i>: with the query
preconditioned, an inner-product index over the raw rows serves ``dot`` for every curvature and
damping. ``cosine`` divides each row by ||(H + lambda I)^-1/2 g_i||, so its index is built for one
curvature and damping. ``l2`` has no index (use ``compute_influence_all(topk=k, mode="l2")``).

Rooms: `backend` (faiss: import, factory strings, files), `sketch` (seeded JL sketch of wide
rows), `store` (the index's manifest and staleness), `builder` (build and incremental update),
`search` (candidates, then exact re-ranking from the shards), `calibrate` (kind="auto" measures
recall@10 and speed-up on the log's own rows), `warm` (what an Attributor keeps open between
searches), `threads` (a search on one thread, the stream-bits GEMMs on the stream's count),
`rows` (candidate rows from the mapped shards), `attributor` (`logix.Attributor`:
influence's Attributor plus `build_index` and `search`), `service` (`logix serve`: JSON searches
over HTTP with the dashboard server's safety rules) and `client` (asks it). The index builds on
public parts of `logix.influence`: `Attributor.scorer` (its Scorer's `products` and `finish`),
the GEMM loop `influence.scoring.products` and the train-norm cache `influence.norms`.
"""

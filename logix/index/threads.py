"""How many threads a search's torch and FAISS operations use.

A warm search is a few dozen small operations (a FAISS walk, a gather of candidate rows, small
products). Split over threads, each operation ends at a barrier where a thread waits for its
peers; on a busy machine a peer that lost its core costs a scheduler time slice at every one of
them (measured on the shared 2-core VM at load 8: one query 70-170 ms on two threads, 13-15 ms
on one). `search` therefore runs torch and FAISS on SEARCH_THREADS, except a batch's FAISS
search (`faiss_batch`: one barrier for many queries' work) and the products that
carry a single query's exact stream bits: a GEMM's bits may depend on its thread count (here,
MKL: the same on one and two threads for up to 8 query rows, not for 16 or more), so those run
on the thread count the stream uses (the one set outside the search), unless a probe of
the same GEMM shape on random rows gives the same bits on one thread (`bits_threads`).

Both counts are process-wide, so `limited` holds one process-wide lock while it has changed
them: concurrent searches (`logix serve`) take turns there instead of setting each other's
counts (and the stream-bits products of one running on the other's single thread). Other
threads' torch work during a search runs on its counts too: same values to round-off, not the
same bits as on the default count."""

from __future__ import annotations

import contextlib
import functools
import threading

import torch

from logix.index import backend

SEARCH_THREADS = 1
BATCH_QUERIES = 16  # a FAISS search of at least this many queries runs on the stream's threads
_CHANGED = threading.RLock()  # held while the counts are changed


@contextlib.contextmanager
def limited(n: int):
    """torch and FAISS on `n` threads inside; yields the torch thread count set before."""
    faiss = backend.import_faiss()
    with _CHANGED:
        torch_before, faiss_before = torch.get_num_threads(), faiss.omp_get_max_threads()
        torch.set_num_threads(n)
        faiss.omp_set_num_threads(n)  # both: OpenMP's count is shared, and a mismatch (FAISS
        try:  # on 2, torch on 1) made torch's small gathers 30x slower
            yield torch_before
        finally:
            torch.set_num_threads(torch_before)
            faiss.omp_set_num_threads(faiss_before)


@contextlib.contextmanager
def torch_threads(n: int):
    """torch alone on `n` threads inside (the stream's bits), restored after; called inside
    `limited`, whose lock keeps other searches from changing the count meanwhile."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def faiss_batch(n_query: int, stream_threads: int):
    """FAISS on `stream_threads` inside for a batch of at least BATCH_QUERIES queries, which it
    splits between its threads with one barrier at the end (at 10^5 rows, 64 queries' HNSW walk
    took 15 ms on one thread, 7 on two); on SEARCH_THREADS otherwise. Called inside `limited`."""
    faiss = backend.import_faiss()
    n = stream_threads if n_query >= BATCH_QUERIES else SEARCH_THREADS
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(SEARCH_THREADS)


@functools.lru_cache(maxsize=256)
def bits_threads(width: int, dim: int, stream_threads: int) -> int:
    """The thread count for the stream-bits GEMMs of `width` query columns over `dim`-wide rows:
    SEARCH_THREADS when a probe (random [SCORE_CHUNK, dim] rows against random queries, through
    scoring.products) gives the same bits on it as on `stream_threads`, else `stream_threads`.
    Random rows almost surely expose a different order of summation."""
    from logix.influence.scoring import SCORE_CHUNK, products

    if stream_threads <= SEARCH_THREADS:
        return stream_threads
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(SCORE_CHUNK, dim, generator=generator)
    queries = torch.randn(width, dim, generator=generator)
    with torch_threads(stream_threads):
        want = products(rows, queries)
    with torch_threads(SEARCH_THREADS):
        got = products(rows, queries)
    return SEARCH_THREADS if torch.equal(got, want) else stream_threads

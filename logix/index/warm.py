"""What one Attributor keeps open between searches, so that the second question costs only the
search: the index manifests, the opened FAISS indexes, the row stores over the memory-mapped
shards (`rows._shard_map` keeps the maps) and the train norms of cosine indexes.

An index file of at most IN_MEMORY_BYTES is read into memory (a memory-mapped one pages in from
disk again whenever the page cache drops it: an HNSW search touches pages all over the file);
a larger one stays memory-mapped.

Every entry is keyed by the version of the file it came from (path, size, mtime, inode), so an
index rebuilt or updated on disk, by this process or another, is opened again on the next call;
freshness against the log (new or changed shards) is still checked on every call by `search`.
One lock per index serialises setting nprobe / ef and searching, so threads that share an
Attributor (`logix serve`) never search with each other's settings.
"""

from __future__ import annotations

import os
import threading
from typing import Callable, Dict, Tuple

from logix.errors import UsageError
from logix.index import backend, store
from logix.index.rows import RowStore


IN_MEMORY_BYTES = 2 << 30


def _version(path: str) -> Tuple[int, int, int]:
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns, stat.st_ino


class Warm:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._manifests: Dict[str, tuple] = {}
        self._indexes: Dict[str, tuple] = {}
        self._rows: Dict[tuple, RowStore] = {}
        self._norms: Dict[str, object] = {}
        self._local = threading.local()  # per thread: the re-ranking's scratch block
        self.read_only = False  # True (`logix serve`): train norms not cached yet are refused

    def manifest(self, project_dir: str, name: str) -> store.IndexManifest:
        path = os.path.join(store.folder(project_dir, name), store.INDEX_MANIFEST)
        key = _version(path)
        with self._lock:
            held = self._manifests.get(path)
            if held is not None and held[0] == key:
                return held[1]
        manifest = store.load(project_dir, name)
        with self._lock:
            self._manifests[path] = (key, manifest)
        return manifest

    def index(self, path: str, kind: str) -> Tuple[object, threading.Lock]:
        """(the opened index, its search lock); opened again when the file changed."""
        key = _version(path)
        with self._lock:
            held = self._indexes.get(path)
            if held is not None and held[0] == key:
                return held[1], held[2]
        index = backend.read(path, kind, mmap=key[0] > IN_MEMORY_BYTES)
        with self._lock:
            self._indexes[path] = (key, index, threading.Lock())
            return index, self._indexes[path][2]

    def rows(self, project_dir: str, shards, dim: int, verify: bool) -> RowStore:
        key = (project_dir, tuple((s["file"], s["checksum"], s["rows"]) for s in shards), dim,
               verify)
        with self._lock:
            if key not in self._rows:
                self._rows[key] = RowStore(project_dir, shards, dim, verify=verify)
            return self._rows[key]

    def norms(self, path: str, load: Callable[[], object]):
        """The train norms cached at `path` (content addressed: its name hashes the shards and
        the curvature), loaded once."""
        with self._lock:
            if path in self._norms:
                return self._norms[path]
        if self.read_only and not os.path.isfile(path):
            raise UsageError("The train norms this cosine search needs are not cached, and "
                             "this search writes nothing (logix serve). Build the cosine index "
                             "first (`logix index DIR --mode cosine`), which caches them.")
        value = load()
        with self._lock:
            self._norms[path] = value
        return value

    def block(self, rows: int, dim: int):
        """A zeroed [rows, dim] float32 scratch matrix of this thread, kept between searches
        (a fresh one costs page faults every call); the caller zeroes what it wrote."""
        import torch

        block = getattr(self._local, "block", None)
        if block is None or block.shape != (rows, dim):
            block = self._local.block = torch.zeros(rows, dim)
        return block

    def clear(self) -> None:
        with self._lock:
            self._manifests.clear(), self._indexes.clear(), self._rows.clear()
            self._norms.clear()

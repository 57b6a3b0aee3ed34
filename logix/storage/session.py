"""LogSession: one run's writing side of a project folder. It opens (or reopens) the log, keeps
the duplicate-id index, appends rows through the shard writer, records checkpoints, and saves
the manifest and state at finalize."""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor

from logix import distributed
from logix.config import LoggingConfig
from logix.errors import LogFormatError, UsageError, WriterError
from logix.storage import state
from logix.storage.format import (DTYPES, GRAD_KEY, LOGS_DIR, MANIFEST, STATE_DIR,
                                  STATISTICS_FILE, parse_shard_name)
from logix.storage.lock import WriterLock
from logix.storage.manifest import (INDEX_PREFIX, INDEX_SUFFIX, Manifest, ShardEntry,
                                    append_rank_index, load_optional)
from logix.storage.reader import LogReader
from logix.storage.writer import ShardWriter


class LogSession:
    """The writing side of one run. `manifest` is None until the first row is logged (or the
    session reopens an existing log); `writer` likewise. It writes only while it holds its
    rank's writer lock (storage/lock.py): from `open` until `release` (at finalize)."""

    def __init__(self, project_dir: str, logging: LoggingConfig) -> None:
        self.project_dir = project_dir
        self.logging = logging
        self.manifest: Optional[Manifest] = None
        self.writer: Optional[ShardWriter] = None
        self._logged_ids: Optional[Dict] = None  # checkpoint -> data ids already in the log
        self._appended: Dict = {}  # checkpoint -> data ids this session appended (this rank)
        # Saved statistics of an earlier session whose log this one appends to, and its rows
        # (see logix.statistics.resume: checked at the first step, merged at finalize).
        self.resumed_state: Optional[Dict[str, Tensor]] = None
        self.resumed_rows = 0
        self._lock: Optional[WriterLock] = None
        self._released: Optional[tuple] = None  # the log's files when the lock was given back

    @property
    def has_rows(self) -> bool:
        """Whether this session wrote or queued any row."""
        return self.writer is not None and bool(self.writer.pending_rows + len(self.manifest.shards))

    # ------------------------------------------------------------------ opening
    def open(self, new_manifest: Callable[[], Manifest], save_projections: Callable[[], None],
             statistics_loaded: bool, rows_per_shard: int) -> ShardWriter:
        """Start writing rows of `new_manifest()`'s layout, appending to the log already in the
        folder when its layout matches (refused otherwise). Idempotent: once open, it returns
        the writer at once (called at every step)."""
        self._hold()
        if self.writer is not None:
            return self.writer
        try:
            with self._disk_errors("the manifest and projections"):
                return self._open(new_manifest, save_projections, statistics_loaded,
                                  rows_per_shard)
        except BaseException:
            self._lock.release()  # nothing of this session is in the log yet
            raise

    def _open(self, new_manifest: Callable[[], Manifest], save_projections: Callable[[], None],
              statistics_loaded: bool, rows_per_shard: int) -> ShardWriter:
        manifest = new_manifest()
        os.makedirs(self.project_dir, exist_ok=True)
        existing = load_optional(self.project_dir)
        if existing is None:
            _refuse_orphan_shards(self.project_dir, manifest.dim)
        elif not existing.shards:
            # e.g. finalize() after a PCA pass, or a first shard whose listing failed: no rows
            # to stay compatible with (unlisted shard files are not part of the log)
            existing = None
        if existing is not None:
            existing.check_compatible(manifest)
            manifest.shards, manifest.checkpoints = existing.shards, existing.checkpoints
            self.resumed_rows = existing.rows
            if distributed.rank() == 0 and self.logging.on_duplicate != "allow":
                warnings.warn(
                    f"{self.project_dir!r} already holds a log of {existing.rows} rows: this run "
                    "appends to it, and rows whose data ids are already logged are handled by "
                    f"logging.on_duplicate ({self.logging.on_duplicate!r}). To start over, use "
                    "a new project name or delete the folder.")
            if not statistics_loaded:
                self.resumed_state = state.load_statistics(self.project_dir)
        self.manifest = manifest
        if distributed.rank() == 0:  # the layout is readable before the first shard lands
            save_projections()
            manifest.save(self.project_dir)
        cfg = self.logging
        self.writer = ShardWriter(self.project_dir, distributed.rank(), rows_per_shard,
                                  manifest.dim, DTYPES[cfg.log_dtype], self._on_shard,
                                  num_workers=cfg.num_workers, queue_size=cfg.queue_size)
        return self.writer

    def _on_shard(self, entry: ShardEntry) -> None:
        """A shard is complete: list it in this rank's index (manifest.json is rewritten only at
        finalize, so the cost per shard stays constant)."""
        append_rank_index(self.project_dir, entry)
        self.manifest.shards.append(entry)  # readers and save() put shards in (rank, seq) order

    # ------------------------------------------------------------------ the writer lock
    def _hold(self) -> None:
        """Take this rank's writer lock before writing. After `release` a session goes on only
        where no other process wrote to the log since: its view of the log (rows, statistics,
        shard numbers) would be stale."""
        if self._lock is None:
            self._lock = WriterLock(self.project_dir, distributed.rank(), busy=lambda: (
                self.writer is not None and not self.writer.idle))
        if self._lock.held:
            return
        if self._lock.taken_over:
            raise UsageError(f"A newer Run of this process took over writing to "
                             f"{self.project_dir!r} while this one had nothing to write; this "
                             "run's view of the log is out of date. Log with the newer Run.")
        with self._disk_errors("the writer lock"):
            os.makedirs(self.project_dir, exist_ok=True)
            self._lock.acquire()
        if self._released is not None and self._released != self._files():
            self._lock.release()
            raise UsageError(f"Another run wrote to {self.project_dir!r} after this run's "
                             "finalize(); this run's view of the log is out of date. Start a "
                             "new run (logix.init) to append to the log.")
        self._released = None

    def release(self) -> None:
        """Give the writer lock back (at finalize, even a failed one)."""
        if self._lock is not None and self._lock.held:
            self._lock.release()
            self._released = self._files() if self.manifest is not None else None

    def _files(self) -> tuple:
        """What changes when anyone writes to this rank's part of the log."""
        index = os.path.join(LOGS_DIR, f"{INDEX_PREFIX}{self._lock.rank}{INDEX_SUFFIX}")
        out = []
        for name in (MANIFEST, index):
            try:
                st = os.stat(os.path.join(self.project_dir, name))
                out.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except FileNotFoundError:
                out.append(None)
        return tuple(out)

    @contextlib.contextmanager
    def _disk_errors(self, what: str):
        """An OSError of a write in the user's thread becomes a WriterError naming the fix."""
        try:
            yield
        except OSError as e:
            raise WriterError(f"Writing {what} of {self.project_dir!r} failed ({e}). Shards "
                              "already in the manifest or index are intact. Fix the cause (disk "
                              "space, permissions) and run again.") from e

    # ------------------------------------------------------------------ rows
    def unseen(self, ids: List, checkpoint: Optional[str]) -> List[int]:
        """Positions of ids not yet in this log (per checkpoint), by logging.on_duplicate."""
        if self._logged_ids is None:
            reader = self.reader(verify=False)
            self._logged_ids = {}
            for s in reader.manifest.shards:
                self._logged_ids.setdefault(s.checkpoint, set()).update(reader.shard_ids(s))
        policy = self.logging.on_duplicate
        if policy == "allow":
            return list(range(len(ids)))
        logged = self._logged_ids.get(checkpoint, ())
        if not logged or logged.isdisjoint(ids):
            return list(range(len(ids)))
        keep = [k for k, i in enumerate(ids) if i not in logged]
        if len(keep) < len(ids):
            seen = [i for i in ids if i in logged]
            if policy == "error":
                raise UsageError(f"data ids {seen[:5]} are already in this log ("
                                 f"{self.project_dir!r}); nothing of this step was written. Set "
                                 "logging.on_duplicate to 'skip' or 'allow', or use new ids.")
            warnings.warn(f"Skipped {len(seen)} rows whose data ids are already logged (e.g. "
                          f"{seen[:3]}); logging.on_duplicate='allow' keeps them, and the "
                          "statistics count only the kept rows.")
        return keep

    def reserve(self, n: int, intact: Optional[Tensor] = None) -> Optional[Tensor]:
        """The next n rows of the shard being filled, for a step whose rows are all kept and
        stored as float32 on this device (its hooks write them in place: `append` copies
        nothing); None otherwise. See `ShardWriter.reserve`."""
        if self.writer is None or self.writer.dtype != torch.float32:
            return None
        return self.writer.reserve(n, intact)

    def takes_in_place(self, rows: Tensor) -> bool:
        """Whether `append` takes these reserved rows where they are (`ShardWriter.
        takes_in_place`)."""
        return self.writer is not None and self.writer.takes_in_place(rows)

    def append(self, ids: List, rows: Tensor, checkpoint: Optional[str]) -> None:
        """Queue rows for disk (cast to the log dtype while copied into the shard buffer)."""
        self._hold()  # taken over by another Run of this process since this step started?
        self._logged_ids.setdefault(checkpoint, set()).update(ids)
        if distributed.is_distributed():
            self._appended.setdefault(checkpoint, set()).update(ids)
        self.writer.append(ids, rows)

    def warn_of_ids_on_several_ranks(self) -> None:
        """Warn (every rank calls this: a collective) when ranks appended the same data ids:
        `on_duplicate` sees only a rank's own ids, so such an example has a row per rank and
        counts as often in the statistics (e.g. the examples a DistributedSampler repeats to
        even out the ranks)."""
        shares, self._appended = distributed.all_gather_objects(self._appended), {}
        for checkpoint in sorted({c for share in shares for c in share}, key=str):
            seen, repeated = set(), set()
            for share in shares:
                ids = share.get(checkpoint, set())
                repeated |= seen & ids
                seen |= ids
            if repeated:
                where = "" if checkpoint is None else f" in checkpoint {checkpoint!r}"
                warnings.warn(
                    f"{len(repeated)} data ids were logged by more than one rank{where} (e.g. "
                    f"{sorted(map(str, repeated))[:5]}): each has a row per rank, and the "
                    "statistics count it as often. on_duplicate sees only a rank's own ids; a "
                    "DistributedSampler repeats examples to even out the ranks (see "
                    "docs/scale.md).")

    def raise_if_failed(self) -> None:
        if self.writer is not None:
            self.writer.raise_if_failed()

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        """Write every buffered row, then stop the writer threads."""
        if self.writer is not None:
            self.writer.close()

    def reader(self, verify: bool = True) -> LogReader:
        """A reader over the saved logs, this session's pending rows flushed first."""
        self.flush()
        if self.manifest is None:
            return LogReader(self.project_dir, verify=verify)
        self.manifest.merge_rank_indexes(self.project_dir)  # other ranks' shards
        return LogReader(self.project_dir, self.manifest, verify=verify)

    # ------------------------------------------------------------------ checkpoints and finalize
    @contextlib.contextmanager
    def checkpoint(self, name: str, open_writer: Callable[[], ShardWriter]):
        """Rows appended inside the block are shards of checkpoint `name`; they are flushed
        when the block ends, even when it fails."""
        writer = open_writer()
        writer.tag = name
        try:
            yield writer
        finally:
            try:
                self.flush()
            finally:
                writer.tag = None

    def add_checkpoint(self, name: str, statistics: Dict[str, Tensor], info: dict) -> None:
        """Save a closed checkpoint's statistics (a state dict) and list it in the manifest
        (rank 0)."""
        if distributed.rank() != 0:
            return
        self._hold()
        with self._disk_errors(f"checkpoint {name!r}"):
            state.save_checkpoint_statistics(self.project_dir, name, statistics, info)
            self.manifest.checkpoints[name] = {k: v for k, v in info.items()
                                               if k != "train_ids"}
            self.manifest.save(self.project_dir)

    def finalize(self, statistics: Callable[[], Dict[str, Tensor]],
                 new_manifest: Callable[[], Manifest], config_snapshot: dict,
                 save_projections: Callable[[], None]) -> None:
        """Every rank: write every buffered row and stop the writer, then `statistics()` (which
        may reduce across ranks) gives the state that rank 0 saves with the final manifest.
        The writer lock is given back even when this fails."""
        try:
            self.close()
            distributed.barrier()  # every rank's shards are on disk and in its index
            if distributed.is_distributed():
                self.warn_of_ids_on_several_ranks()
            tensors = statistics()
            if distributed.rank() == 0:
                self.save_final(new_manifest, config_snapshot, save_projections, tensors)
            distributed.barrier()  # the manifest is complete when finalize returns on any rank
        finally:
            self.release()

    def save_final(self, new_manifest: Callable[[], Manifest], config_snapshot: dict,
                   save_projections: Callable[[], None], statistics: Dict[str, Tensor]) -> None:
        """Rank 0 at finalize: every rank's shards in the manifest, projections, statistics."""
        os.makedirs(self.project_dir, exist_ok=True)
        self._hold()
        with self._disk_errors("the final manifest and state"):
            self._save_final(new_manifest, config_snapshot, save_projections, statistics)

    def _save_final(self, new_manifest: Callable[[], Manifest], config_snapshot: dict,
                    save_projections: Callable[[], None], statistics: Dict[str, Tensor]) -> None:
        if self.manifest is None:  # nothing written by this run: the folder's log, if any
            existing = load_optional(self.project_dir)
            if existing is not None and existing.shards:
                # Its projections and statistics are about to be replaced by this run's.
                existing.check_compatible(new_manifest())
            self.manifest = existing or new_manifest()
        self.manifest.merge_rank_indexes(self.project_dir)
        self.manifest.config = config_snapshot
        save_projections()
        # A run that collected no statistics (one that only appends rows) keeps the saved ones.
        if statistics or not os.path.isfile(
                os.path.join(self.project_dir, STATE_DIR, STATISTICS_FILE)):
            state.save_statistics(self.project_dir, statistics, self.manifest)
        self.manifest.save(self.project_dir)


def _refuse_orphan_shards(project_dir: str, dim: int) -> None:
    """Shards on disk that no manifest describes (manifest.json was deleted): their layout
    cannot be checked, so rows are not appended beside them."""
    logs = os.path.join(project_dir, LOGS_DIR)
    shards = sorted(n for n in os.listdir(logs) if parse_shard_name(n)) \
        if os.path.isdir(logs) else []
    if not shards:
        return
    widths = sorted({_shard_width(os.path.join(logs, n)) for n in shards} - {None})
    raise LogFormatError(
        f"{logs!r} holds {len(shards)} shards (rows of width {widths or 'unknown'}; this run's "
        f"rows have width {dim}) but {project_dir!r} has no manifest.json to check their layout "
        "against. Move the logs/ folder away (or restore manifest.json), or use a new project.")


def _shard_width(path: str) -> Optional[int]:
    from logix.storage.format import read_header

    try:
        header, _, _ = read_header(path)
        shape = header[GRAD_KEY]["shape"]
    except (LogFormatError, KeyError, TypeError):
        return None
    return int(shape[1]) if isinstance(shape, list) and len(shape) == 2 else None

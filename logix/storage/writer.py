"""The shard writer: a bounded queue and background threads that write safetensors shards.

The training loop hands rows to `append`; the writer copies them straight into a preallocated
shard buffer in the log dtype (pinned memory and a non-blocking copy on CUDA), and worker threads
stream each full buffer to disk atomically (temporary name, fsync, rename), announce it through
`on_shard`, which updates the manifest, and recycle the buffer. A worker's failure is kept and re-raised by the next
`append`, `flush` or `close`, naming the rows that were not written; shards already written stay
readable.
"""

from __future__ import annotations

import bisect
import itertools
import json
import os
import queue
import threading
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

from logix.errors import UsageError, WriterError
from logix.storage.direct_io import PAGE, aligned_empty, write_shard
from logix.storage.format import (DATA_IDS_KEY, GRAD_KEY, LOGS_DIR, parse_shard_name,
                                  safetensors_header, shard_name, tensor_bytes)
from logix.storage.manifest import ShardEntry

_STOP = object()
# Bytes of data-id metadata one shard header may take: a shard is cut early when its ids would
# take more, so any id length gives a header well under safetensors' limit (MAX_HEADER).
IDS_HEADER_BUDGET = 32 << 20


def next_sequence(project_dir: str, rank: int) -> int:
    """The first unused shard number of this rank, so reopening a log appends to it."""
    logs = os.path.join(project_dir, LOGS_DIR)
    if not os.path.isdir(logs):
        return 0
    seqs = [p[1] for p in map(parse_shard_name, os.listdir(logs)) if p and p[0] == rank]
    return max(seqs, default=-1) + 1


def _same_place(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors are the same memory seen the same way."""
    return a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.device == b.device \
        and a.shape == b.shape and a.stride() == b.stride()


def _overlap(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors' bytes overlap (same device)."""
    if a.device != b.device:
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


def _header_costs(data_ids: Sequence) -> List[int]:
    """Bytes each id takes in a shard header (JSON inside JSON); an id that alone passes
    IDS_HEADER_BUDGET is refused (run.start refuses such ids first: data_ids.MAX_ID_CHARS)."""
    costs = [len(json.dumps(json.dumps(i))) for i in data_ids]
    if costs and max(costs) > IDS_HEADER_BUDGET:
        i = data_ids[costs.index(max(costs))]
        raise UsageError(f"data id {str(i)[:60]!r}... takes {max(costs)} bytes in a shard header, "
                         f"more than the {IDS_HEADER_BUDGET} one shard's ids may take; its rows "
                         "were not written. Use shorter ids (e.g. a hash of the text).")
    return costs


class ShardWriter:
    """Copies rows into preallocated shard buffers (casting to the log dtype on the way) and
    hands full buffers to writer threads, which stream them to disk and recycle them."""

    def __init__(self, project_dir: str, rank: int, rows_per_shard: int, dim: int,
                 dtype: torch.dtype, on_shard: Callable[[ShardEntry], None],
                 num_workers: int = 1, queue_size: int = 2) -> None:
        self.project_dir = project_dir
        self.rank = rank
        self.rows_per_shard = rows_per_shard
        self.dim = dim
        self.dtype = dtype
        self.on_shard = on_shard
        self._queue: "queue.Queue" = queue.Queue(maxsize=queue_size)
        self._num_workers = num_workers
        self._threads: List[threading.Thread] = []
        self._announce = threading.Lock()
        self._buffer = threading.Lock()  # append and flush may come from different threads
        self._free: "queue.SimpleQueue" = queue.SimpleQueue()  # written buffers, for reuse
        self._error: Optional[BaseException] = None
        self._lost_ids: List = []  # ids of rows a failed writer dropped
        self._seq = next_sequence(project_dir, rank)
        self._rows: Optional[Tensor] = None  # the shard being filled [rows_per_shard, dim]
        self._ids: List = []
        self._id_bytes = 0  # header bytes of self._ids (IDS_HEADER_BUDGET)
        self._events: List = []  # CUDA copies into self._rows still in flight
        self.tag: Optional[str] = None  # checkpoint name stamped on the shards written next

    @property
    def pending_rows(self) -> int:
        return len(self._ids)

    @property
    def idle(self) -> bool:
        """No row buffered, queued or being written."""
        with self._buffer:
            return not self._ids and not self._queue.unfinished_tasks

    def reserve(self, n: int, intact: Optional[Tensor] = None) -> Optional[Tensor]:
        """The next n rows of the shard being filled, for rows made in place: `append` of
        exactly this view then copies nothing. None where they do not fit in this shard, or
        would overlap `intact` (rows the caller still reads, e.g. from an earlier reservation
        of a buffer that has been written and recycled since)."""
        with self._buffer:
            view = self._next_rows(n)
        if view is None or (intact is not None and _overlap(view, intact)):
            return None
        return view

    def takes_in_place(self, rows: Tensor) -> bool:
        """Whether `append(ids, rows)` would take `rows` where they are: a view from `reserve`
        that is still the next rows of the shard being filled (a flush since then wrote that
        shard out)."""
        with self._buffer:
            if self._rows is None:
                return False
            view = self._next_rows(rows.shape[0])
            return view is not None and _same_place(rows, view)

    def _next_rows(self, n: int) -> Optional[Tensor]:
        """The next n rows of the shard being filled, or None where they do not fit in it
        (callers hold the buffer lock)."""
        fill = len(self._ids)
        return None if fill + n > self.rows_per_shard else self._current()[fill:fill + n]

    def append(self, data_ids: Sequence, rows: Tensor) -> None:
        """Copy rows [B, dim] (any float dtype, any device) and their ids into the shard being
        filled; full shards go to the writer threads. The caller keeps ownership of `rows`
        (a view from `reserve` is taken as it is)."""
        self.raise_if_failed()
        costs = _header_costs(data_ids)
        with self._buffer:
            start, n = 0, rows.shape[0]
            while start < n:
                buffer = self._current()
                fill = len(self._ids)
                most = min(n - start, self.rows_per_shard - fill)
                room = IDS_HEADER_BUDGET - self._id_bytes
                take = bisect.bisect_right(list(itertools.accumulate(costs[start:start + most])),
                                           room)
                if take == 0:  # the ids would overflow this shard's header: cut it here
                    self._submit()
                    continue
                target = buffer[fill:fill + take]
                part = rows[start:start + take]
                if not _same_place(part, target):
                    if _overlap(part, buffer):  # reserved before a flush recycled the buffer
                        part = part.clone()
                    target.copy_(part.detach(), non_blocking=rows.is_cuda)
                if rows.is_cuda:
                    event = torch.cuda.Event()
                    event.record()
                    self._events.append(event)
                self._ids.extend(data_ids[start:start + take])
                self._id_bytes += sum(costs[start:start + take])
                start += take
                if len(self._ids) == self.rows_per_shard:
                    self._submit()

    def flush(self) -> None:
        """Write every buffered row and wait until all shards are on disk."""
        self.raise_if_failed()
        with self._buffer:
            if self._ids:
                self._submit()
        self._queue.join()
        self.raise_if_failed()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            for _ in self._threads:
                self._queue.put(_STOP)
            for thread in self._threads:
                thread.join()
            self._threads.clear()

    def raise_if_failed(self) -> None:
        if self._error is not None:
            self._queue.join()  # the failed worker drops the shards still queued: count them
            lost = self._lost_ids + self._ids  # and the rows still buffered here
            raise WriterError(f"The log writer failed ({self._error!r}); {len(lost)} rows were "
                              f"not written (data ids {lost[:5]}{' ...' if len(lost) > 5 else ''})"
                              ". Shards already in the manifest are intact. Fix the cause (disk "
                              "space, permissions) and log the missing rows again."
                              ) from self._error

    def _current(self) -> Tensor:
        if self._rows is None:
            try:
                self._rows = self._free.get_nowait()
            except queue.Empty:
                self._rows = aligned_empty(self.rows_per_shard, self.dim, self.dtype,
                                           pin_memory=torch.cuda.is_available())
        return self._rows

    def _submit(self) -> None:
        for event in self._events:  # device-to-host copies must land before the write
            event.synchronize()
        self._events.clear()
        buffer, ids = self._rows, self._ids
        self._rows, self._ids, self._id_bytes = None, [], 0
        self._start_workers()
        self._queue.put((self._seq, ids, buffer, self.tag))
        self._seq += 1

    def _start_workers(self) -> None:
        while len(self._threads) < self._num_workers:
            thread = threading.Thread(target=self._work, name="logix-writer", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                seq, ids, buffer, tag = item
                if self._error is not None:
                    self._lost_ids.extend(ids)
                    continue
                try:
                    self._write(seq, ids, buffer[:len(ids)], tag)
                    self._free.put(buffer)
                except BaseException as e:  # kept and re-raised in the user's thread
                    self._lost_ids.extend(ids)
                    self._error = e
            finally:
                self._queue.task_done()

    def _write(self, seq: int, ids: list, rows: Tensor, tag: Optional[str]) -> None:
        """Stream header and rows to disk: no serialised copy, and no GIL held while copying;
        past the page cache where the file system allows (`direct_io`)."""
        header = safetensors_header({GRAD_KEY: (rows.dtype, tuple(rows.shape))},
                                    {DATA_IDS_KEY: json.dumps(ids)}, align=PAGE)
        name = shard_name(self.rank, seq)
        os.makedirs(os.path.join(self.project_dir, LOGS_DIR), exist_ok=True)
        path, data = os.path.join(self.project_dir, LOGS_DIR, name), tensor_bytes(rows)
        checksum = write_shard(path, header, data)
        size = len(header) + rows.numel() * rows.element_size()
        entry = ShardEntry(file=f"{LOGS_DIR}/{name}", rows=rows.shape[0], bytes=size,
                           checksum=checksum, rank=self.rank, seq=seq, checkpoint=tag)
        with self._announce:
            self.on_shard(entry)

"""The shard writer: a bounded queue and background threads that write safetensors shards.

The training loop hands rows to `append`; the writer copies them off the device (pinned memory
and a non-blocking copy on CUDA), groups them into shards of `rows_per_shard`, and worker threads
serialise each shard atomically (temporary name, fsync, rename) before announcing it through
`on_shard`, which updates the manifest. A worker's failure is kept and re-raised by the next
`append`, `flush` or `close`, naming the rows that were not written; shards already written stay
readable.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
from typing import Callable, List, Optional, Sequence

import torch
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from logix.errors import WriterError
from logix.storage.format import (DATA_IDS_KEY, GRAD_KEY, LOGS_DIR, atomic_write,
                                  parse_shard_name, shard_name)
from logix.storage.manifest import ShardEntry

_STOP = object()


def next_sequence(project_dir: str, rank: int) -> int:
    """The first unused shard number of this rank, so reopening a log appends to it."""
    logs = os.path.join(project_dir, LOGS_DIR)
    if not os.path.isdir(logs):
        return 0
    seqs = [p[1] for p in map(parse_shard_name, os.listdir(logs)) if p and p[0] == rank]
    return max(seqs, default=-1) + 1


class ShardWriter:
    def __init__(self, project_dir: str, rank: int, rows_per_shard: int,
                 on_shard: Callable[[ShardEntry], None], num_workers: int = 1,
                 queue_size: int = 2) -> None:
        self.project_dir = project_dir
        self.rank = rank
        self.rows_per_shard = rows_per_shard
        self.on_shard = on_shard
        self._queue: "queue.Queue" = queue.Queue(maxsize=queue_size)
        self._num_workers = num_workers
        self._threads: List[threading.Thread] = []
        self._announce = threading.Lock()
        self._buffer = threading.Lock()  # append and flush may come from different threads
        self._error: Optional[BaseException] = None
        self._lost_ids: List = []  # ids of rows a failed writer dropped
        self._seq = next_sequence(project_dir, rank)
        self._pending_ids: List = []
        self._pending_rows: List[Tensor] = []
        self._pending = 0
        self.tag: Optional[str] = None  # checkpoint name stamped on the shards written next

    @property
    def pending_rows(self) -> int:
        return self._pending

    def append(self, data_ids: Sequence, rows: Tensor) -> None:
        """Queue rows [B, D] (already in the log dtype) with their ids. Copies; never aliases."""
        self.raise_if_failed()
        with self._buffer:
            self._pending_ids.extend(data_ids)
            self._pending_rows.append(_host_copy(rows))
            self._pending += rows.shape[0]
            while self._pending >= self.rows_per_shard:
                self._submit(self.rows_per_shard)

    def flush(self) -> None:
        """Write every buffered row and wait until all shards are on disk."""
        self.raise_if_failed()
        with self._buffer:
            if self._pending:
                self._submit(self._pending)
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
            lost = self._lost_ids + self._pending_ids  # and the rows still buffered here
            raise WriterError(f"The log writer failed ({self._error!r}); {len(lost)} rows were "
                              f"not written (data ids {lost[:5]}{' ...' if len(lost) > 5 else ''})"
                              ". Shards already in the manifest are intact. Fix the cause (disk "
                              "space, permissions) and log the missing rows again."
                              ) from self._error

    def _submit(self, n: int) -> None:
        for _, event in self._pending_rows:
            if event is not None:  # the device-to-host copy must land before rows are sliced
                event.synchronize()
        parts = [rows for rows, _ in self._pending_rows]
        rows = torch.cat(parts, 0) if len(parts) > 1 else parts[0]
        ids, self._pending_ids = self._pending_ids[:n], self._pending_ids[n:]
        head, tail = rows[:n], rows[n:]
        self._pending_rows = [(tail.clone(), None)] if tail.shape[0] else []
        self._pending -= n
        self._start_workers()
        self._queue.put((self._seq, ids, head, self.tag))
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
                seq, ids, rows, tag = item
                if self._error is not None:
                    self._lost_ids.extend(ids)
                    continue
                try:
                    self._write(seq, ids, rows, tag)
                except BaseException as e:  # kept and re-raised in the user's thread
                    self._lost_ids.extend(ids)
                    self._error = e
            finally:
                self._queue.task_done()

    def _write(self, seq: int, ids: list, rows: Tensor, tag: Optional[str]) -> None:
        data = safetensors_bytes({GRAD_KEY: rows.contiguous()},
                                 metadata={DATA_IDS_KEY: json.dumps(ids)})
        name = shard_name(self.rank, seq)
        os.makedirs(os.path.join(self.project_dir, LOGS_DIR), exist_ok=True)
        atomic_write(os.path.join(self.project_dir, LOGS_DIR, name), data)
        entry = ShardEntry(file=f"{LOGS_DIR}/{name}", rows=rows.shape[0], bytes=len(data),
                           sha256=hashlib.sha256(data).hexdigest(), rank=self.rank, seq=seq,
                           checkpoint=tag)
        with self._announce:
            self.on_shard(entry)


def _host_copy(rows: Tensor):
    """(CPU copy owned by the writer, CUDA event to wait on or None)."""
    if rows.device.type == "cuda":
        buffer = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
        buffer.copy_(rows, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return buffer, event
    return rows.detach().to("cpu", copy=True), None

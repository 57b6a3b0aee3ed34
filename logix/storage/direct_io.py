"""Shard writes that bypass the page cache (O_DIRECT).

A buffered write copies every byte into freshly allocated page-cache pages, which on a small
machine costs the writer thread about as much CPU as the training step it runs beside (measured
in benchmarks/logging_overhead.py --profile). With O_DIRECT the disk reads the shard buffer
itself; only the checksum touches the bytes. O_DIRECT needs the file offset, the length and the
memory address of each write to be multiples of PAGE: shard buffers are allocated page-aligned
(`aligned_empty`), shard headers are padded so the rows start at a multiple of PAGE
(`safetensors_header(..., align=PAGE)`), and the last partial page goes through the page cache.
Where the file system or the buffer does not allow it, `write_direct` returns None and the
caller writes through the page cache as before: the bytes on disk are the same either way.
"""

from __future__ import annotations

import errno
import mmap
import os
from typing import Optional

import numpy as np
import torch

from logix.storage.format import (CHECKSUM, WRITE_SLICE, atomic_write, commit, new_digest,
                                  temporary_path)

PAGE = 4096


def aligned_empty(rows: int, dim: int, dtype: torch.dtype, pin_memory: bool = False
                  ) -> torch.Tensor:
    """An uninitialised [rows, dim] tensor whose first byte sits on a page boundary."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    flat = torch.empty(rows * dim + PAGE // itemsize, dtype=dtype, pin_memory=pin_memory)
    skip = (-flat.data_ptr() % PAGE) // itemsize
    return flat[skip:skip + rows * dim].view(rows, dim)


def write_shard(path: str, header: bytes, data: memoryview) -> str:
    """Write a shard atomically, past the page cache where possible; returns its checksum."""
    return write_direct(path, header, data, CHECKSUM) or atomic_write(path, header, data)


def write_direct(path: str, header: bytes, data: memoryview, algorithm: str) -> Optional[str]:
    """Write header + data to `path` atomically (temporary file, fsync, rename) with O_DIRECT;
    returns the checksum "<algorithm>:<hex>" of the file, or None (nothing written) where
    O_DIRECT is unavailable: no flag, a header not a multiple of PAGE, an unaligned buffer, or a
    file system that refuses it."""
    data = data.cast("B")
    if not hasattr(os, "O_DIRECT") or len(header) % PAGE or _address(data) % PAGE:
        return None
    tmp = temporary_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return None
        raise
    digest = new_digest(algorithm)
    try:
        whole = len(data) - len(data) % PAGE
        try:
            head = mmap.mmap(-1, len(header))  # page-aligned memory for the header
            head.write(header)
            _write_all(fd, memoryview(head))
            digest.update(header)
            for start in range(0, whole, WRITE_SLICE):
                piece = data[start:min(start + WRITE_SLICE, whole)]
                _write_all(fd, piece)
                digest.update(piece)
        except OSError as e:
            if e.errno == errno.EINVAL:  # the file system accepted the flag but not the writes
                return None
            raise
        if whole < len(data):
            import fcntl  # POSIX only, like O_DIRECT itself

            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            _write_all(fd, data[whole:])
            digest.update(data[whole:])
        os.fsync(fd)
        os.close(fd)
        fd = -1
        commit(tmp, path)
        return f"{algorithm}:{digest.hexdigest()}"
    finally:
        if fd >= 0:
            os.close(fd)
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_all(fd: int, view: memoryview) -> None:
    while len(view):
        view = view[os.write(fd, view):]


def _address(view: memoryview) -> int:
    return np.frombuffer(view, dtype=np.uint8).ctypes.data if len(view) else 0

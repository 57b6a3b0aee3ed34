"""Names fixed by the on-disk format (DESIGN.md section 5). Other tools read these files."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import re
import struct
import zlib
from typing import Dict, Optional, Sequence, Tuple

import torch
import xxhash

from logix.errors import LogFormatError

FORMAT_VERSION = 2  # 2: shard entries carry "checksum" ("<algorithm>:<hex>"); 1: "sha256"
MANIFEST = "manifest.json"
LOGS_DIR = "logs"
STATE_DIR = "state"
CACHE_DIR = "cache"
STATISTICS_FILE = "statistics.safetensors"
PROJECTIONS_FILE = "projections.safetensors"
GRAD_KEY = "grad"
DATA_IDS_KEY = "data_ids"
TMP_SUFFIX = ".tmp"
LOCK_PREFIX, LOCK_SUFFIX = "writer-r", ".lock"  # <project>/writer-r<rank>.lock (storage/lock.py)
_WRITES = itertools.count()  # numbers temporary files (temporary_path)

KEY_SEP = "::"  # joins a module name and a kind in state files: "<module>::forward"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
TORCH_DTYPES = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
            "U8": 1, "BOOL": 1}  # bytes per element of each safetensors dtype code
MAX_HEADER = 100_000_000  # safetensors refuses larger headers
WRITE_SLICE = 8 << 20  # bytes per write call (a multiple of 4 KiB pages)
_HASH_CHUNK = 1 << 20
# The per-shard checksum of new shards. It guards against accidental corruption and truncation
# (not tampering): XXH3-64 runs near memory speed (about 5x crc32, 12x sha256 here), which is
# CPU the writer thread no longer takes from training. Shards written with crc32 or sha256
# (earlier releases) keep their checksum and are verified with it.
CHECKSUM = "xxh3"

_SHARD = re.compile(r"^shard-r(\d+)-(\d+)\.safetensors$")


def shard_name(rank: int, seq: int) -> str:
    return f"shard-r{rank}-{seq:06d}.safetensors"


def parse_shard_name(name: str):
    """(rank, seq) of a shard file name, or None for any other file."""
    match = _SHARD.match(name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def lock_name(rank: int) -> str:
    return f"{LOCK_PREFIX}{rank}{LOCK_SUFFIX}"


def state_key(module: str, *kind: str) -> str:
    """The tensor name of a module's entry in a state file, e.g. "fc1::forward::count"."""
    return KEY_SEP.join((module,) + kind)


@contextlib.contextmanager
def atomic_file(path: str, replace: bool = True):
    """Open a temporary file beside `path` for writing; on success fsync and rename it into place
    (readers see the old file or the whole new one), on error remove it. With replace=False an
    existing `path` is never replaced: FileExistsError instead (see `commit_new`)."""
    path = os.fspath(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        (commit if replace else commit_new)(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def temporary_path(path: str) -> str:
    """Where `path` is written before its rename into place: a name no other write uses (this
    process's id and a counter), so that two writers of one file (e.g. every rank of a job
    caching the same norms) never remove or rename each other's half-written file."""
    return f"{os.fspath(path)}.{os.getpid()}-{next(_WRITES)}{TMP_SUFFIX}"


def commit(tmp: str, path: str) -> None:
    """Rename a fully written (and fsynced) temporary file into place, durably."""
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def commit_new(tmp: str, path: str) -> None:
    """`commit`, but where `path` already exists (another process took the name first) raise
    FileExistsError and replace nothing: a hard link creates the name or fails atomically."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: reserve the name, then fill it
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        os.replace(tmp, path)
    else:
        os.remove(tmp)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_write(path: str, *parts, algorithm: str = CHECKSUM, replace: bool = True) -> str:
    """Write `parts` (bytes or buffers) atomically (see `atomic_file`). Large buffers go out in
    slices without a joined copy. Returns the checksum of what was written, "<algorithm>:<hex>"
    (hashed slice by slice right after its write, while the slice is in the CPU cache)."""
    digest = new_digest(algorithm)
    with atomic_file(path, replace) as f:
        for part in parts:
            view = memoryview(part).cast("B")
            for start in range(0, len(view), WRITE_SLICE):
                piece = view[start:start + WRITE_SLICE]
                f.write(piece)
                digest.update(piece)
    return f"{algorithm}:{digest.hexdigest()}"


def split_checksum(checksum: str) -> Tuple[str, str]:
    """(algorithm, hex digest) of a recorded checksum "<algorithm>:<hex>"."""
    algorithm, _, digest = checksum.partition(":")
    return algorithm, digest


def file_checksum(path: str, algorithm: str, advance=None) -> str:
    """The hex digest of a file read in chunks (bounded memory); `advance(n)` after each
    chunk."""
    digest = new_digest(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(chunk)
            if advance is not None:
                advance(len(chunk))
    return digest.hexdigest()


class _Crc32:
    """zlib.crc32 behind hashlib's update / hexdigest (it releases the GIL on large buffers)."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data) -> None:
        self.value = zlib.crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


# Each digest has hashlib's update / hexdigest, and releases the GIL on large buffers.
_DIGESTS = {"xxh3": xxhash.xxh3_64, "crc32": _Crc32, "sha256": hashlib.sha256}


def new_digest(algorithm: str):
    make = _DIGESTS.get(algorithm)
    if make is None:
        raise LogFormatError(f"checksum algorithm {algorithm!r} is unknown; this LogIX checks "
                             f"{', '.join(_DIGESTS)}.")
    return make()


def read_header(path: str) -> Tuple[dict, int, int]:
    """(header, data start, file size) of a safetensors file, checked so that every tensor lies
    inside the file. A LogFormatError says exactly what is wrong."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise LogFormatError(f"{size} bytes, shorter than the 8-byte header length")
            n = int.from_bytes(prefix, "little")
            if n > size - 8:
                raise LogFormatError(f"the header claims {n} bytes but the file has {size - 8} "
                                     "after the length (truncated?)")
            if n > MAX_HEADER:
                raise LogFormatError(f"the header is {n} bytes, over the {MAX_HEADER}-byte limit "
                                     "of safetensors readers (a shard written before shards "
                                     "were cut at a header budget, or not a LogIX file)")
            header = json.loads(f.read(n))
    except OSError as e:
        raise LogFormatError(str(e)) from e
    except (ValueError, UnicodeDecodeError) as e:
        raise LogFormatError(f"the header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise LogFormatError("the header is not a JSON object")
    data_size = size - 8 - n
    for key, spec in header.items():
        if key == "__metadata__":
            continue
        offsets = spec.get("data_offsets") if isinstance(spec, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) for o in offsets)):
            raise LogFormatError(f"the header's entry for tensor {key!r} has no valid "
                                 f"data_offsets (got {spec!r}): the header is damaged")
        if offsets[1] > data_size:
            raise LogFormatError(f"tensor {key!r} ends at byte {offsets[1]} of a "
                                 f"{data_size}-byte data section (truncated?)")
    return header, 8 + n, size


def safetensors_header(tensors: Dict[str, Tuple[torch.dtype, Sequence[int]]],
                       metadata: Optional[Dict[str, str]] = None, align: int = 8) -> bytes:
    """The 8-byte length and JSON header of a safetensors file whose tensors follow in order,
    padded with spaces so that the data starts at a multiple of `align` bytes."""
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-(8 + len(encoded)) % align)
    return struct.pack("<Q", len(encoded)) + encoded


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A tensor's memory as bytes, without a copy (any dtype, bfloat16 included)."""
    return memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

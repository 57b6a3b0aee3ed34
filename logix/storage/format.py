"""Names fixed by the on-disk format (DESIGN.md section 5). Other tools read these files."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from typing import Dict, Optional, Sequence, Tuple

import torch

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOGS_DIR = "logs"
STATE_DIR = "state"
CACHE_DIR = "cache"
STATISTICS_FILE = "statistics.safetensors"
PROJECTIONS_FILE = "projections.safetensors"
GRAD_KEY = "grad"
DATA_IDS_KEY = "data_ids"
TMP_SUFFIX = ".tmp"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_SLICE = 8 << 20  # bytes per write call

_SHARD = re.compile(r"^shard-r(\d+)-(\d+)\.safetensors$")


def shard_name(rank: int, seq: int) -> str:
    return f"shard-r{rank}-{seq:06d}.safetensors"


def parse_shard_name(name: str):
    """(rank, seq) of a shard file name, or None for any other file."""
    match = _SHARD.match(name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def atomic_write(path: str, *parts) -> str:
    """Write `parts` (bytes or buffers) to a temporary name, fsync, rename: readers see the old
    file or the whole new one. Large buffers go out in slices without a joined copy. Returns
    the sha256 of what was written."""
    digest = hashlib.sha256()
    tmp = path + TMP_SUFFIX
    with open(tmp, "wb") as f:
        for part in parts:
            view = memoryview(part).cast("B")
            for start in range(0, len(view), _SLICE):
                piece = view[start:start + _SLICE]
                f.write(piece)
                digest.update(piece)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")
    return digest.hexdigest()


def safetensors_header(tensors: Dict[str, Tuple[torch.dtype, Sequence[int]]],
                       metadata: Optional[Dict[str, str]] = None) -> bytes:
    """The 8-byte length and JSON header of a safetensors file whose tensors follow in order."""
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # keeps the data 8-byte aligned
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

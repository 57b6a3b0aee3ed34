"""Names fixed by the on-disk format (DESIGN.md section 5). Other tools read these files."""

from __future__ import annotations

import os
import re

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

_SHARD = re.compile(r"^shard-r(\d+)-(\d+)\.safetensors$")


def shard_name(rank: int, seq: int) -> str:
    return f"shard-r{rank}-{seq:06d}.safetensors"


def parse_shard_name(name: str):
    """(rank, seq) of a shard file name, or None for any other file."""
    match = _SHARD.match(name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def atomic_write(path: str, data: bytes) -> None:
    """Write to a temporary name, fsync, rename: readers see the old file or the whole new one."""
    tmp = path + TMP_SUFFIX
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


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

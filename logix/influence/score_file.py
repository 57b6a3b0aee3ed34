"""Scores written straight to a safetensors file, column block by column block.

For very large logs the [n_query, n_train] score matrix need not fit in memory: the file's header
is written first (the shape is known from the manifest), its data region is memory-mapped, each
streamed block fills its columns, and the file is fsynced and renamed into place at the end.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Dict, List

import numpy as np
from torch import Tensor

from logix.storage.format import TMP_SUFFIX, fsync_dir


class ScoreFileWriter:
    def __init__(self, path: str, shapes: Dict[str, tuple], metadata: Dict[str, str]) -> None:
        self.path = path
        header, offset = {}, 0
        for name, shape in shapes.items():
            size = 4 * int(np.prod(shape))
            header[name] = {"dtype": "F32", "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        header["__metadata__"] = metadata
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self._tmp = path + TMP_SUFFIX
        with open(self._tmp, "wb") as f:
            f.write(struct.pack("<Q", len(encoded)))
            f.write(encoded)
            f.truncate(8 + len(encoded) + offset)
        data_start = 8 + len(encoded)
        self._maps = {}
        for name, shape in shapes.items():
            start, _ = header[name]["data_offsets"]
            if int(np.prod(shape)) == 0:
                continue
            self._maps[name] = np.memmap(self._tmp, dtype=np.float32, mode="r+",
                                         offset=data_start + start, shape=tuple(shape))

    def write_columns(self, name: str, start: int, block: Tensor) -> None:
        """block [rows, n] goes to columns [start, start + n) of tensor `name`."""
        if name in self._maps:
            self._maps[name][:, start:start + block.shape[1]] = block.contiguous().cpu().numpy()

    def close(self) -> None:
        for array in self._maps.values():
            array.flush()
        self._maps.clear()
        with open(self._tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self._tmp, self.path)
        fsync_dir(os.path.dirname(os.path.abspath(self.path)))


def json_ids(ids: List) -> str:
    return json.dumps(list(ids))


def load_score_file(path: str) -> dict:
    """{"src_ids", "tgt_ids", "influence", ...} from a file written with out=path."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        out = {key: f.get_tensor(key) for key in f.keys()}
    out["src_ids"] = json.loads(meta.get("src_ids", "[]"))
    out["tgt_ids"] = json.loads(meta.get("tgt_ids", "[]"))
    return out


__all__ = ["ScoreFileWriter", "load_score_file"]

"""content/*.safetensors: what each data id *is* (text, image, label), stored beside the log so
that `logix top` and the dashboard can show examples, not just ids (docs/format.md, "Example
content").

    <project>/content/content-r<rank>-<seq>.safetensors     one file per run.describe() call
      tensor "image/<row>"   uint8 [H, W] (grey) or [H, W, C] (C = 3 RGB, 4 RGBA), optional
      metadata "format": "logix-content", "format_version": "1",
               "ids": JSON list, "texts" / "labels": JSON lists (null: none), optional

Files are written atomically under a name no other file has (never replacing one, so two
processes describing at once keep both) and never changed; a reader merges them in (rank, seq)
order, a later description of an id replacing an earlier one field by field.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from logix.errors import LogFormatError, UsageError
from logix.storage.format import atomic_write
from logix.storage.data_ids import normalize_data_ids

CONTENT_DIR = "content"
CONTENT_FORMAT = "logix-content"
CONTENT_FORMAT_VERSION = 1
IMAGE_PREFIX = "image/"  # + row number within the file
IDS_KEY, TEXTS_KEY, LABELS_KEY = "ids", "texts", "labels"
_FILE = re.compile(r"^content-r(\d+)-(\d+)\.safetensors$")


def content_name(rank: int, seq: int) -> str:
    return f"content-r{rank}-{seq:06d}.safetensors"


def describe(project_dir: str, ids: Any, texts: Optional[Sequence] = None,
             images: Optional[Sequence] = None, labels: Optional[Sequence] = None,
             rank: int = 0) -> str:
    """Write one content file for `ids` (what run.describe does). Returns its path."""
    ids = normalize_data_ids(ids)
    if texts is None and images is None and labels is None:
        raise UsageError("describe() needs texts=, images= or labels= (one per id).")
    columns = {}
    for name, values in ((TEXTS_KEY, texts), (LABELS_KEY, labels), ("images", images)):
        if values is None:
            continue
        values = list(values) if not isinstance(values, (str, bytes)) else [values]
        if len(values) != len(ids):
            raise UsageError(f"describe() got {len(ids)} ids but {len(values)} {name}; pass one "
                             "per id (None where there is nothing).")
        columns[name] = values
    metadata = {"format": CONTENT_FORMAT, "format_version": str(CONTENT_FORMAT_VERSION),
                IDS_KEY: json.dumps(ids)}
    if TEXTS_KEY in columns:
        bad = [t for t in columns[TEXTS_KEY] if t is not None and not isinstance(t, str)]
        if bad:
            raise UsageError(f"describe() texts must be str or None, got {bad[0]!r} "
                             f"({type(bad[0]).__name__}).")
        metadata[TEXTS_KEY] = json.dumps(columns[TEXTS_KEY])
    if LABELS_KEY in columns:
        metadata[LABELS_KEY] = json.dumps([_label(v) for v in columns[LABELS_KEY]])
    tensors = {f"{IMAGE_PREFIX}{row}": _image(image)
               for row, image in enumerate(columns.get("images", [])) if image is not None}
    from safetensors.torch import save

    folder = os.path.join(project_dir, CONTENT_DIR)
    os.makedirs(folder, exist_ok=True)
    seqs = [int(m.group(2)) for m in map(_FILE.match, os.listdir(folder))
            if m and int(m.group(1)) == rank]
    data, seq = save(tensors, metadata=metadata), max(seqs, default=-1) + 1
    while True:  # another process describing at once may take a number first: use the next
        path = os.path.join(folder, content_name(rank, seq))
        try:
            atomic_write(path, data, replace=False)
            return path
        except FileExistsError:
            seq += 1


def _label(value):
    if hasattr(value, "item"):
        value = value.item()
    if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int, float))):
        raise UsageError(f"describe() labels must be str, int, float or None, got {value!r} "
                         f"({type(value).__name__}).")
    return value


def _image(image) -> torch.Tensor:
    """uint8 [H, W] or [H, W, C]. Floats are read as [0, 1]; a channels-first [C, H, W] tensor
    (C = 1 or 3) is moved to channels-last."""
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise UsageError(f"describe() images must be [H, W], [H, W, C] or [C, H, W] with C in "
                         f"(1, 3, 4); got shape {list(array.shape)}.")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
            raise UsageError(f"describe() images must hold numbers, got dtype {array.dtype}.")
        array = np.clip(np.nan_to_num(array.astype(np.float64)) * 255.0, 0, 255).round()
    return torch.from_numpy(np.ascontiguousarray(array.astype(np.uint8)))


class ContentStore:
    """Every content file of a project, merged: `get(id)` -> {"text", "label", "image"}."""

    def __init__(self, project_dir: str) -> None:
        self.project_dir = project_dir
        self._entries: Dict[str, dict] = {}  # json key of the id -> fields
        self.errors: List[str] = []  # unreadable files, skipped
        folder = os.path.join(project_dir, CONTENT_DIR)
        names = os.listdir(folder) if os.path.isdir(folder) else []
        files = sorted((tuple(map(int, m.groups())), name) for name in names
                       if (m := _FILE.match(name)))
        for _, name in files:
            try:
                self._read(os.path.join(folder, name))
            except LogFormatError as e:
                self.errors.append(str(e))

    def _read(self, path: str) -> None:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
                images = {int(k[len(IMAGE_PREFIX):]) for k in f.keys()
                          if k.startswith(IMAGE_PREFIX)}
            if metadata.get("format") != CONTENT_FORMAT:
                raise LogFormatError(f"{path!r} is not a LogIX content file.")
            if int(metadata.get("format_version", "0")) > CONTENT_FORMAT_VERSION:
                raise LogFormatError(f"{path!r} has content format version "
                                     f"{metadata['format_version']}; upgrade LogIX to read it.")
            ids = json.loads(metadata[IDS_KEY])
            texts = json.loads(metadata.get(TEXTS_KEY, "null")) or [None] * len(ids)
            labels = json.loads(metadata.get(LABELS_KEY, "null")) or [None] * len(ids)
        except (SafetensorError, OSError, ValueError, KeyError) as e:
            raise LogFormatError(f"{path!r} is not a readable content file: {e}") from e
        for row, data_id in enumerate(ids):
            entry = self._entries.setdefault(_key(data_id), {})
            if texts[row] is not None:
                entry["text"] = texts[row]
            if labels[row] is not None:
                entry["label"] = labels[row]
            if row in images:
                entry["image"] = (path, f"{IMAGE_PREFIX}{row}")

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, data_id) -> bool:
        return _key(data_id) in self._entries

    def get(self, data_id) -> Dict[str, Any]:
        """{"text"?, "label"?, "image"? (uint8 ndarray)}; {} for an id with no content."""
        entry = dict(self._entries.get(_key(data_id), {}))
        if "image" in entry:
            from safetensors import safe_open

            path, key = entry["image"]
            with safe_open(path, framework="np") as f:
                entry["image"] = f.get_tensor(key)
        return entry


def _key(data_id) -> str:
    return json.dumps(data_id)


def load_content(project_dir: str) -> ContentStore:
    return ContentStore(project_dir)

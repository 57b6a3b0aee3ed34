"""Turn whatever the user passes as `data_id` into a list of JSON-safe ids, one per example."""

from __future__ import annotations

import hashlib
from typing import Any, List, Optional

import torch

from logix.errors import UsageError


_PLAIN = {int, str}  # exactly these types (bool is an int subclass and is refused)
_MAX_INT_DIGITS = 4300  # Python's default limit for int <-> str conversion (JSON of the ids)
_TOO_LONG = 10 ** _MAX_INT_DIGITS
MAX_ID_CHARS = 1 << 20  # even escaped in a shard header (<= 14 bytes a character), well under
# the writer's IDS_HEADER_BUDGET


def normalize_data_ids(data_id: Any, mask: Optional[torch.Tensor] = None) -> List:
    """A list of str/int stays as it is; a tensor of token ids [B, T] becomes one stable hash per
    row (the same tokens give the same id in any process), over the real tokens only when a
    `mask` of the same shape is given (nonzero: real), so a sequence keeps its id whatever
    padding its batch needed; a 1-D integer tensor becomes ints. Ids must be unique within a
    batch."""
    if isinstance(data_id, torch.Tensor):
        return _unique(_tensor_ids(data_id, mask))
    if isinstance(data_id, (str, int)):
        data_id = [data_id]
    try:
        ids = list(data_id)
    except TypeError:
        raise UsageError(f"data_id must be a list of str/int or a tensor, got "
                         f"{type(data_id).__name__}.") from None
    if set(map(type, ids)) <= _PLAIN:
        return _unique(ids)
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, (str, int)):
            if hasattr(i, "item"):
                continue
            raise UsageError(f"data_id entries must be str or int, got {i!r} "
                             f"({type(i).__name__}).")
    return _unique([i.item() if hasattr(i, "item") else i for i in ids])


def _tensor_ids(data_id: torch.Tensor, mask: Optional[torch.Tensor]) -> List:
    if data_id.dim() == 1 and not data_id.is_floating_point():
        return [int(i) for i in data_id.tolist()]
    if data_id.dim() >= 2:
        rows = data_id.detach().to("cpu", torch.int64).reshape(data_id.shape[0], -1)
        if mask is not None and mask.shape == data_id.shape and not bool(mask.all()):
            real = mask.detach().to("cpu").reshape(data_id.shape[0], -1) != 0
            rows = [row[keep] for row, keep in zip(rows, real)]
        return [hashlib.sha1(r.numpy().tobytes()).hexdigest()[:16] for r in rows]
    raise UsageError(f"data_id tensor of shape {tuple(data_id.shape)} and dtype "
                     f"{data_id.dtype} cannot name examples; pass integer ids [B], token ids "
                     "[B, T], or a list of str/int.")


def _unique(ids: List) -> List:
    for i in ids:
        if type(i) is int and not -_TOO_LONG < i < _TOO_LONG:
            raise UsageError(f"A data_id integer has about {int(i.bit_length() * 0.30103) + 1} "
                             f"digits; ids are stored as JSON, which takes integers of at most "
                             f"{_MAX_INT_DIGITS} digits (Python's int-to-str limit). Pass such "
                             "ids as str, or a short hash of them.")
        if type(i) is str and len(i) > MAX_ID_CHARS:
            raise UsageError(f"A data_id string has {len(i)} characters (it starts {i[:40]!r}); "
                             f"ids may have at most {MAX_ID_CHARS}, so that every shard header "
                             "stays readable. Pass a short hash of the text as the id.")
    if len(set(ids)) != len(ids):
        dupes = sorted({str(i) for i in ids if ids.count(i) > 1})[:5]
        raise UsageError(f"data_id has duplicates within one batch: {dupes}. Each example in a "
                         "batch needs its own id.")
    return ids

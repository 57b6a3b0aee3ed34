"""Scores: what every estimator returns. A dict (LogIX's result, so `result["influence"]`,
`result["src_ids"]`, `dict(result)` keep working) with the same key names everywhere, also
readable as attributes."""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor


class Scores(dict):
    """Scores of queries (rows, `src_ids`) against training examples (columns, `tgt_ids`).

    A score is g_q^T (H + lambda I)^-1 g_i: positive means training on example i lowers query
    q's loss (helpful), negative that it raises it (harmful). Always present: `src_ids` and
    `meta` (the estimator, curvature, damping, mode, projection, project; with raw / ekfac, or
    kfac that auto took instead of them, `fisher_concentration` {module: share} where one
    example carries over half a module's empirical Fisher: docs/concepts.md, "When one example
    dominates the Fisher"). Then one of:

    - `influence` [n_src, n_tgt] with `tgt_ids` (columns in logging order); `groups`: name ->
      [n_src, n_tgt] per group of modules when influence_groups was given. Self-influence:
      `influence` [n] with `tgt_ids` == `src_ids` (and `ids`, their older name).
    - top-k (`topk=k`): `top_ids` / `top_scores` [n_src, k] (most helpful first) and
      `bottom_ids` / `bottom_scores` (most harmful first); `bottom_*` absent for `search`
      without bottom=True.
    - a score file (`out=path`): `path`, with `tgt_ids`; the scores are in the file.

    A missing field reads as None.
    """

    influence: Optional[Tensor] = property(lambda self: self.get("influence"))
    src_ids: Optional[List] = property(lambda self: self.get("src_ids"))
    tgt_ids: Optional[List] = property(lambda self: self.get("tgt_ids"))
    meta: Dict = property(lambda self: self.get("meta", {}))
    groups: Optional[Dict[str, Tensor]] = property(lambda self: self.get("groups"))
    top_ids: Optional[List[List]] = property(lambda self: self.get("top_ids"))
    top_scores: Optional[Tensor] = property(lambda self: self.get("top_scores"))
    bottom_ids: Optional[List[List]] = property(lambda self: self.get("bottom_ids"))
    bottom_scores: Optional[Tensor] = property(lambda self: self.get("bottom_scores"))
    path: Optional[str] = property(lambda self: self.get("path"))

    def __reduce__(self):
        return Scores, (dict(self),)  # a plain dict inside: what weights_only loading allows

    @property
    def is_topk(self) -> bool:
        return "top_ids" in self

    def __repr__(self) -> str:
        shape = tuple(self.influence.shape) if self.influence is not None else None
        what = f"influence {shape}" if shape else ("top-k" if self.is_topk else
                                                    f"file {self.path!r}")
        return (f"Scores({what}, {len(self.src_ids or [])} queries, "
                f"method={self.meta.get('method')!r})")


# torch.save(result) then torch.load(path) (weights_only by default) reads Scores back.
torch.serialization.add_safe_globals([Scores])


def scores(result: Optional[dict]) -> Optional[Scores]:
    """`result` as Scores (None stays None: ranks other than 0 with gather="rank0")."""
    if result is None or isinstance(result, Scores):
        return result
    return Scores(result)


def self_scores(ids: List, influence: Tensor, meta: dict) -> Scores:
    """Self-influence: one score per example, with the key names of every other result."""
    return Scores({"src_ids": ids, "tgt_ids": ids, "ids": ids, "influence": influence,
                   "meta": meta})

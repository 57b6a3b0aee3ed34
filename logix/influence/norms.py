"""The train-side norm cache: g^T (H + lambda I)^-1 g of every saved row, per influence group,
computed once per log, curvature, damping and groups, and kept in ``<project>/cache``. Scores in
mode ``cosine`` and ``l2`` and cosine indexes (``logix.index``) read it."""

from __future__ import annotations

import hashlib
import json
import os

import torch
from torch import Tensor

from logix.influence.scoring import SCORE_CHUNK, Scorer
from logix.progress import track
from logix.storage.format import CACHE_DIR, atomic_file
from logix.storage.reader import LogReader


def train_norms(reader: LogReader, scorer: Scorer, block_rows: int, progress: bool) -> Tensor:
    """[n_train, groups] g^T (H + lambda I)^-1 g per group of every row of `reader`, in log
    order: read from the cache, else computed in one streaming pass and cached."""
    path = cache_path(reader, scorer)
    if os.path.isfile(path):
        return torch.load(path, weights_only=True)
    parts = []
    blocks = reader.fixed_blocks(block_rows, unit=SCORE_CHUNK)
    for _, rows in track(blocks, reader.count_blocks(block_rows, unit=SCORE_CHUNK),
                         "Train norms", progress):
        parts.append(scorer.norms_of(rows.to(scorer.device)).cpu())
    norms = torch.cat(parts) if parts else torch.zeros(0, len(scorer.group_names))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_file(path) as f:
        torch.save(norms, f)
    return norms


def cache_path(reader: LogReader, scorer: Scorer) -> str:
    """Where `train_norms` caches the norms of this log, curvature, damping and groups (the name
    hashes all of them: a path names one content)."""
    digest = hashlib.sha256(json.dumps({
        "kind": scorer.preconditioner.kind, "damping": scorer.preconditioner.dampings,
        "shards": [(s.file, s.checksum) for s in reader.shards]},
        sort_keys=True, default=str).encode())
    _hash_tensors(digest, scorer)
    key = digest.hexdigest()[:24]
    return os.path.join(reader.project_dir, CACHE_DIR, f"norms-{key}.pt")


def _hash_tensors(digest, scorer: Scorer) -> None:
    """Feed the group masks and every tensor of the preconditioner into `digest`: two plans
    share cached train norms only when their groups and inverses are identical."""
    for name, mask in scorer.groups.items():
        digest.update(name.encode() + b"\0")
        digest.update(mask.cpu().numpy().tobytes())
    for name, inv in sorted(scorer.preconditioner.inverses.items()):
        digest.update(name.encode() + b"\0")
        for tensor in (inv.values, inv.vectors, inv.q_out, inv.q_in):
            if tensor is not None:
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())

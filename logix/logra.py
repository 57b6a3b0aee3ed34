"""LoGra projections: one (P_in, P_out) pair per tracked module, and how they are initialised.

Random projections are seeded Gaussians with entries of variance 1/rank (Johnson-Lindenstrauss
scaling): E[P^T P] = I, so projected inner products estimate full-gradient inner products without
bias, and no module's weight in a summed score depends on its rank or width. Each module's seed
mixes the run's seed with a stable hash of the module's name, so a query run regenerates exactly
the projections of the log. PCA projections are the top eigenvectors of the forward / backward
covariances of a statistics pass.

A layer split over attention heads (`HeadSplit`, `run.watch(model, heads=...)`) gets a
block-diagonal projection on its split side: each head's slice of the gradient is projected by its
own block (rank // heads rows, JL-scaled for that rank), rows ordered head by head, so that each
head's projected gradient is a fixed set of the row's columns (`head_columns`) and the per-head
scores of those columns sum to the layer's score.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from logix.errors import ConfigError, UsageError

INITS = ("random", "pca")
SIDES = ("out", "in")
NO_HEAD = -1  # head index of a bias column on the input side: it belongs to no head


@dataclass(frozen=True)
class HeadSplit:
    """How a layer's gradient matrix [out, in] splits over attention heads.

    side: "out" when each head owns a slice of the layer's outputs (query / key / value
    projections: GPT-2's c_attn, Llama's q_proj, k_proj, v_proj, GPT-NeoX's query_key_value),
    "in" when it owns a slice of its inputs (the output projection: GPT-2's attn.c_proj, Llama's
    o_proj). parts: fused projections laid side by side on that axis, each split over the heads
    in order (GPT-2's c_attn is q | k | v: parts=3); GPT-NeoX's query_key_value interleaves
    [head, (q, k, v), head_dim] and is parts=1."""

    heads: int
    side: str = "out"
    parts: int = 1

    def __post_init__(self) -> None:
        for key in ("heads", "parts"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"HeadSplit {key}={value!r} must be a positive integer.")
        if self.side not in SIDES:
            raise ConfigError(f"HeadSplit side={self.side!r}; allowed values: {list(SIDES)}.")

    def head_of(self, width: int, bias: bool) -> Tensor:
        """[width] the head of each index along the split side (NO_HEAD for an input-side
        bias column, the last)."""
        features = width - (bias and self.side == "in")
        if features % (self.parts * self.heads):
            raise ConfigError(f"A {self.side}-side of {features} features does not split into "
                              f"{self.parts} x {self.heads} equal head slices; check heads= and "
                              "parts=.")
        per_head = features // self.parts // self.heads
        index = torch.arange(features) % (features // self.parts) // per_head
        return torch.cat([index, torch.full((width - features,), NO_HEAD)])

    def to_dict(self) -> dict:
        return {"heads": self.heads, "side": self.side, "parts": self.parts}


def head_splits(meta: Dict) -> Dict[str, Tuple[HeadSplit, Optional[int]]]:
    """{layer: (its HeadSplit, rank per head or None when its split side is not projected)}
    from a log's projection metadata."""
    return {name: (HeadSplit(s["heads"], s["side"], s["parts"]), s.get("rank"))
            for name, s in (meta.get("heads") or {}).items()}


def head_columns(split: HeadSplit, rank_per_head: Optional[int], in_dim: int, out_dim: int,
                 rank_in: int, rank_out: int, bias: bool) -> Tensor:
    """[rank_out * rank_in] the head of each column of the layer's part of a row (its
    [rank_out, rank_in] block read row by row), NO_HEAD for the input-side bias column."""
    width, rank = (out_dim, rank_out) if split.side == "out" else (in_dim, rank_in)
    if rank_per_head is None:
        heads = split.head_of(width, bias)
    else:  # rows ordered head by head, then the bias row
        heads = torch.arange(split.heads).repeat_interleave(rank_per_head)
        heads = torch.cat([heads, torch.full((rank - len(heads),), NO_HEAD)])
    if split.side == "out":
        return heads.repeat_interleave(rank_in)
    return heads.repeat(rank_out)


@dataclass
class Projection:
    """P_in [rank_in, in_dim] and P_out [rank_out, out_dim]; None stands for the identity."""

    p_in: Optional[Tensor]
    p_out: Optional[Tensor]
    in_dim: int
    out_dim: int

    @property
    def rank_in(self) -> int:
        return self.in_dim if self.p_in is None else self.p_in.shape[0]

    @property
    def rank_out(self) -> int:
        return self.out_dim if self.p_out is None else self.p_out.shape[0]

    @property
    def dim(self) -> int:
        """Width of this module's part of a log row."""
        return self.rank_in * self.rank_out

    def to(self, device=None, dtype=None) -> "Projection":
        def move(p):
            return None if p is None else p.to(device=device, dtype=dtype)

        return Projection(move(self.p_in), move(self.p_out), self.in_dim, self.out_dim)


def identity(in_dim: int, out_dim: int) -> Projection:
    return Projection(None, None, in_dim, out_dim)


def module_seed(seed: int, name: str) -> int:
    """A stable per-module seed: the same on every process, machine and Python version."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def random_projection(name: str, in_dim: int, out_dim: int, rank_in: int, rank_out: int,
                      seed: int) -> Projection:
    """Seeded Gaussian P_in / P_out; a side whose rank reaches its size is the identity (None):
    a square random matrix would only distort dot products and save nothing."""
    generator = torch.Generator().manual_seed(module_seed(seed, name))

    def gaussian(rank: int, dim: int) -> Optional[Tensor]:
        if rank >= dim:
            return None
        return torch.randn(rank, dim, generator=generator) / rank**0.5

    return Projection(gaussian(rank_in, in_dim), gaussian(rank_out, out_dim), in_dim, out_dim)


def _split_side(split: HeadSplit, rank: int, width: int, bias: bool,
                block: Callable[[int, Tensor], Tensor]) -> Tuple[Optional[Tensor], Optional[int]]:
    """(the block-diagonal projection of a head-split side, rank per head); (None, None) when
    `rank` reaches the side's width. `block(rank_per_head, indices)` gives a head's block."""
    if rank >= width:
        return None, None
    per_head = rank // split.heads
    if per_head < 1:
        raise ConfigError(f"A rank of {rank} gives no row to each of {split.heads} heads; use a "
                          f"rank of at least {split.heads} (a multiple of it uses all of it).")
    heads = split.head_of(width, bias)
    rows: List[Tensor] = []
    for h in range(split.heads):
        indices = (heads == h).nonzero().flatten()
        p = torch.zeros(per_head, width)
        p[:, indices] = block(per_head, indices)
        rows.append(p)
    if (heads == NO_HEAD).any():
        rows.append((heads == NO_HEAD).float()[None])  # the bias column, kept whole
    return torch.cat(rows), per_head


def random_split_projection(name: str, in_dim: int, out_dim: int, rank_in: int, rank_out: int,
                            seed: int, split: HeadSplit, bias: bool) -> Tuple[Projection, dict]:
    """A seeded projection whose split side is block-diagonal over the heads (each block a
    Gaussian with entries of variance 1 / rank per head); (projection, head metadata)."""
    generator = torch.Generator().manual_seed(module_seed(seed, name))

    def gaussian(rank: int, dim: int) -> Optional[Tensor]:
        return None if rank >= dim else torch.randn(rank, dim, generator=generator) / rank**0.5

    def block(rank: int, indices: Tensor) -> Tensor:
        return torch.randn(rank, len(indices), generator=generator) / rank**0.5

    if split.side == "out":
        p_in = gaussian(rank_in, in_dim)
        p_out, per_head = _split_side(split, rank_out, out_dim, bias, block)
    else:
        p_in, per_head = _split_side(split, rank_in, in_dim, bias, block)
        p_out = gaussian(rank_out, out_dim)
    return Projection(p_in, p_out, in_dim, out_dim), {**split.to_dict(), "rank": per_head}


def pca_split_projection(forward_cov: Tensor, backward_cov: Tensor, rank_in: int, rank_out: int,
                         split: HeadSplit, bias: bool) -> Tuple[Projection, dict]:
    """PCA on the unsplit side; on the split side each head's block holds the top eigenvectors
    of that head's diagonal block of the covariance."""
    cov = backward_cov if split.side == "out" else forward_cov

    def block(rank: int, indices: Tensor) -> Tensor:
        vectors = top_eigenvectors(cov[indices][:, indices], rank)
        return torch.eye(len(indices)) if vectors is None else vectors

    if split.side == "out":
        p_in = top_eigenvectors(forward_cov, rank_in)
        p_out, per_head = _split_side(split, rank_out, backward_cov.shape[0], bias, block)
    else:
        p_in, per_head = _split_side(split, rank_in, forward_cov.shape[0], bias, block)
        p_out = top_eigenvectors(backward_cov, rank_out)
    projection = Projection(p_in, p_out, forward_cov.shape[0], backward_cov.shape[0])
    return projection, {**split.to_dict(), "rank": per_head}


def pca_projection(forward_cov: Tensor, backward_cov: Tensor, rank_in: int,
                   rank_out: int) -> Projection:
    """Rows of P_in / P_out are the top eigenvectors of the input / output-gradient covariances;
    a side whose rank reaches its size is the identity (None)."""
    return Projection(top_eigenvectors(forward_cov, rank_in), top_eigenvectors(backward_cov, rank_out),
                      forward_cov.shape[0], backward_cov.shape[0])


def top_eigenvectors(cov: Tensor, rank: int) -> Optional[Tensor]:
    """[rank, d]: eigenvectors of the largest eigenvalues, largest first, computed in float64;
    None (the identity) when rank >= d."""
    if rank >= cov.shape[0]:
        return None
    _, vectors = torch.linalg.eigh(cov.double())
    return vectors[:, -rank:].flip(-1).T.contiguous().float()


def resolve_ranks(lora, rank: Optional[int], rank_in: Optional[int],
                  rank_out: Optional[int]) -> Tuple[int, int]:
    """(rank_in, rank_out): the arguments given, else the config's lora keys. Each must be a
    positive integer."""
    for key, value in (("rank", rank), ("rank_in", rank_in), ("rank_out", rank_out)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value <= 0):
            raise ConfigError(f"add_lora {key}={value!r}: a rank must be a positive integer "
                              f"(or None for the config's lora.{key}).")
    return (_first_set(rank_in, rank, lora.rank_in, lora.rank),
            _first_set(rank_out, rank, lora.rank_out, lora.rank))


def build_projections(dims: Dict[str, Tuple[int, int]], init: str, rank_in: int, rank_out: int,
                      seed: int, covariance: Callable[[str, str], Optional[Tensor]],
                      splits: Optional[Dict[str, Tuple[HeadSplit, bool]]] = None
                      ) -> Tuple[Dict[str, Projection], Dict[str, dict]]:
    """One projection per module ({name: (in_dim, out_dim)}): seeded random, or PCA from
    `covariance(name, "forward" | "backward")` of an unprojected statistics pass. `splits`
    ({name: (HeadSplit, tracks its bias)}) are projected head by head. Returns (projections,
    {name: head metadata} of the split layers, for the log's projection metadata)."""
    if init not in INITS:
        raise ConfigError(f"add_lora init={init!r}; allowed values: {list(INITS)}.")
    splits = splits or {}
    projections, heads = {}, {}
    for name, (in_dim, out_dim) in dims.items():
        if init == "random":
            forward = backward = None
        else:
            forward, backward = covariance(name, "forward"), covariance(name, "backward")
            if forward is None or backward is None:
                raise UsageError(
                    f"add_lora(init='pca') needs forward and backward covariances of {name!r}. "
                    "Run one pass first with run.setup({'forward': ['covariance'], 'backward': "
                    "['covariance']}) and start()/end() around each step, then call add_lora.")
        if name in splits:
            split, bias = splits[name]
            projections[name], heads[name] = (
                random_split_projection(name, in_dim, out_dim, rank_in, rank_out, seed, split,
                                        bias) if init == "random" else
                pca_split_projection(forward, backward, rank_in, rank_out, split, bias))
        elif init == "random":
            projections[name] = random_projection(name, in_dim, out_dim, rank_in, rank_out, seed)
        else:
            projections[name] = pca_projection(forward, backward, rank_in, rank_out)
    return projections, heads


def _first_set(*values):
    return next(v for v in values if v is not None)


def fingerprint(projections: Dict[str, Projection]) -> str:
    """A short hash of every module's matrices: queries and logs must share it."""
    digest = hashlib.sha1()
    for name, p in projections.items():
        digest.update(f"{name}:{p.in_dim}x{p.out_dim}".encode())
        for matrix in (p.p_in, p.p_out):
            if matrix is not None:
                digest.update(matrix.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]

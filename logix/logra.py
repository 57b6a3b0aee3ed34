"""LoGra projections: one (P_in, P_out) pair per tracked module, and how they are initialised.

Random projections are seeded Gaussians with entries of variance 1/rank (Johnson-Lindenstrauss
scaling): E[P^T P] = I, so projected inner products estimate full-gradient inner products without
bias, and no module's weight in a summed score depends on its rank or width. Each module's seed
mixes the run's seed with a stable hash of the module's name, so a query run regenerates exactly
the projections of the log. PCA projections are the top eigenvectors of the forward / backward
covariances of a statistics pass.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from logix.errors import ConfigError, UsageError

INITS = ("random", "pca")


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
                      seed: int, covariance: Callable[[str, str], Optional[Tensor]]
                      ) -> Dict[str, Projection]:
    """One projection per module ({name: (in_dim, out_dim)}): seeded random, or PCA from
    `covariance(name, "forward" | "backward")` of an unprojected statistics pass."""
    if init not in INITS:
        raise ConfigError(f"add_lora init={init!r}; allowed values: {list(INITS)}.")
    if init == "random":
        return {name: random_projection(name, in_dim, out_dim, rank_in, rank_out, seed)
                for name, (in_dim, out_dim) in dims.items()}
    projections = {}
    for name in dims:
        forward, backward = covariance(name, "forward"), covariance(name, "backward")
        if forward is None or backward is None:
            raise UsageError(
                f"add_lora(init='pca') needs forward and backward covariances of {name!r}. Run "
                "one pass first with run.setup({'forward': ['covariance'], 'backward': "
                "['covariance']}) and start()/end() around each step, then call add_lora.")
        projections[name] = pca_projection(forward, backward, rank_in, rank_out)
    return projections


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

"""Linear datamodeling score (LDS).

The LDS asks: if we retrain on a random subset S of the training data, does the
sum of the attribution scores of the examples in S predict how the model's
outputs change?  It is the Spearman rank correlation, across subsets, between
the predicted and the measured output, averaged over test examples.

Sign convention (library-wide): ``scores[q, i] = g_q^T (H + lambda I)^-1 g_i``
with both gradients taken of *losses*.  A positive score means that training on
example ``i`` LOWERS the loss of query ``q`` (the example is helpful); a
negative score means it is harmful.
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from logix.progress import progress_bar
from logix.storage.format import atomic_file

__all__ = ["make_subsets", "lds", "linear_datamodeling_score", "spearman"]

# Output kinds where a LOWER value is better: the predicted output is the
# negated score sum.  For the others a higher value is better.
_LOWER_IS_BETTER = frozenset({"loss"})
_HIGHER_IS_BETTER = frozenset({"score", "margin", "logprob"})
_OUTPUT_KINDS = _LOWER_IS_BETTER | _HIGHER_IS_BETTER

_CACHE_FORMAT = 1
_CACHE_META = "lds_cache.json"


# --------------------------------------------------------------------------- #
# Input checks shared with brittleness.py
# --------------------------------------------------------------------------- #
def _as_tensor(value: Any, name: str) -> torch.Tensor:
    """Turn a tensor or array-like into a CPU tensor, or raise TypeError."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(
            f"{name} must be a torch.Tensor or array-like, got {type(value).__name__}"
        ) from exc


def _check_scores(scores: Any) -> torch.Tensor:
    """Validate a score matrix and return it as float64, shape [n_test, n_train]."""
    scores = _as_tensor(scores, "scores")
    if scores.dim() != 2:
        raise ValueError(
            f"scores must be 2-D [n_test, n_train], got shape {tuple(scores.shape)}"
        )
    if scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(
            f"scores must have at least one test and one training example, "
            f"got shape {tuple(scores.shape)}"
        )
    if scores.is_complex() or scores.dtype == torch.bool:
        raise TypeError(f"scores must be a real floating/integer tensor, got {scores.dtype}")
    scores = scores.to(torch.float64)
    if not torch.isfinite(scores).all():
        raise ValueError("scores contains NaN or infinite values")
    return scores


def _check_outputs(
    out: Any, n_test: int, name: str, allow_inf: bool = False
) -> torch.Tensor:
    """Validate one measured output vector and return it as float64 [n_test].

    NaN is always rejected; +-inf only unless ``allow_inf``.
    """
    out = _as_tensor(out, name)
    if tuple(out.shape) != (n_test,):
        raise ValueError(
            f"{name} must have shape ({n_test},) = (n_test,), got shape {tuple(out.shape)}"
        )
    if out.is_complex() or out.dtype == torch.bool:
        raise TypeError(f"{name} must be a real floating tensor, got {out.dtype}")
    out = out.to(torch.float64)
    if torch.isnan(out).any():
        raise ValueError(f"{name} contains NaN values")
    if not allow_inf and not torch.isfinite(out).all():
        raise ValueError(f"{name} contains infinite values")
    return out


def _as_int(value: Any, name: str) -> int:
    """A Python int from any integer (Python, NumPy, a one-element torch integer tensor); a
    TypeError naming `name` for anything else, bool included."""
    try:
        index = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        index = None
    if index is None:
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    return index


def _check_int(value: Any, name: str, minimum: int) -> int:
    value = _as_int(value, name)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_outputs_are(outputs_are: Any) -> bool:
    """Return True when predictions must be negated (lower output is better)."""
    if outputs_are not in _OUTPUT_KINDS:
        raise ValueError(
            f"outputs_are must be one of {sorted(_OUTPUT_KINDS)}, got {outputs_are!r}"
        )
    return outputs_are in _LOWER_IS_BETTER


# --------------------------------------------------------------------------- #
# Spearman rank correlation
# --------------------------------------------------------------------------- #
def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks along the last dim; tied values share their average rank."""
    x = x.contiguous()
    sorted_x, _ = torch.sort(x, dim=-1)  # [..., n]
    n_less = torch.searchsorted(sorted_x, x, right=False)  # [..., n]
    n_less_eq = torch.searchsorted(sorted_x, x, right=True)  # [..., n]
    # Tied block occupies ranks n_less+1 .. n_less_eq; its mean is:
    return (n_less + n_less_eq + 1).to(torch.float64) / 2.0


def spearman(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Row-wise Spearman rank correlation of two [m, n] tensors -> [m].

    Ties get average ranks.  A row where either input is constant has no
    defined correlation and yields NaN.
    """
    if x.shape != y.shape or x.dim() != 2:
        raise ValueError(
            f"x and y must both be 2-D with equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    rx = _average_ranks(x.to(torch.float64))  # [m, n]
    ry = _average_ranks(y.to(torch.float64))  # [m, n]
    rx = rx - rx.mean(dim=1, keepdim=True)  # [m, n]
    ry = ry - ry.mean(dim=1, keepdim=True)  # [m, n]
    cov = (rx * ry).sum(dim=1)  # [m]
    denom = torch.sqrt((rx * rx).sum(dim=1) * (ry * ry).sum(dim=1))  # [m]
    rho = cov / denom.clamp_min(torch.finfo(torch.float64).tiny)  # [m]
    # Ranks are exact small numbers, so a constant row has exactly zero spread.
    return torch.where(denom > 0, rho.clamp(-1.0, 1.0), torch.full_like(rho, math.nan))


# --------------------------------------------------------------------------- #
# Subsets and the score itself
# --------------------------------------------------------------------------- #
def make_subsets(
    n_train: int, n_subsets: int, fraction: float = 0.5, seed: int = 0
) -> torch.Tensor:
    """Draw random training subsets for the LDS.

    Args:
        n_train: number of training examples.
        n_subsets: number of subsets (rows).
        fraction: fraction kept per subset, in (0, 1); every row keeps exactly
            ``round(fraction * n_train)`` examples.
        seed: seed of the ``torch.Generator`` used; the same arguments always
            give the same masks.  Row ``j`` depends only on ``(n_train,
            fraction, seed, j)``, so asking for more subsets extends the list.

    Returns:
        Bool tensor ``[n_subsets, n_train]``; True marks a kept example.
    """
    n_train = _check_int(n_train, "n_train", 1)
    n_subsets = _check_int(n_subsets, "n_subsets", 1)
    seed = _as_int(seed, "seed")
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool):
        raise TypeError(f"fraction must be a float, got {type(fraction).__name__}")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    size = round(fraction * n_train)
    if not 0 < size < n_train:
        raise ValueError(
            f"fraction={fraction} of n_train={n_train} keeps {size} examples; "
            f"expected between 1 and n_train - 1"
        )
    gen = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n_subsets, n_train, dtype=torch.bool)  # [n_subsets, n_train]
    for row in range(n_subsets):
        kept = torch.randperm(n_train, generator=gen)[:size]  # [size]
        masks[row, kept] = True
    return masks


def _check_masks(subset_masks: Any, n_train: int) -> torch.Tensor:
    masks = _as_tensor(subset_masks, "subset_masks")
    if masks.dim() != 2 or masks.shape[1] != n_train:
        raise ValueError(
            f"subset_masks must have shape [n_subsets, n_train={n_train}] "
            f"(n_train taken from scores), got shape {tuple(masks.shape)}"
        )
    if masks.dtype != torch.bool:
        if masks.is_complex() or not bool(((masks == 0) | (masks == 1)).all()):
            raise ValueError(
                f"subset_masks must be boolean or contain only 0 and 1, got dtype {masks.dtype}"
            )
        masks = masks != 0
    if masks.shape[0] < 3:
        raise ValueError(
            f"subset_masks needs at least 3 subsets for a rank correlation, "
            f"got shape {tuple(masks.shape)}"
        )
    return masks


def lds(
    scores: torch.Tensor,
    subset_masks: torch.Tensor,
    subset_outputs: torch.Tensor,
    outputs_are: str = "loss",
) -> dict[str, Any]:
    """Linear datamodeling score from already measured retraining outputs.

    The predicted output of subset ``S`` for query ``q`` is
    ``sum_{i in S} scores[q, i]``.  Scores follow the library sign convention
    (positive = training on ``i`` LOWERS the loss of ``q``), so when
    ``outputs_are == "loss"`` the prediction is the NEGATED sum; for
    ``"score"``, ``"margin"`` or ``"logprob"`` (higher is better) it is the sum
    itself.  Either way, a perfect attribution gives an LDS near +1.

    Args:
        scores: ``[n_test, n_train]`` attribution scores.
        subset_masks: ``[n_subsets, n_train]`` bool (or 0/1) masks, one per subset.
        subset_outputs: ``[n_subsets, n_test]`` measured outputs of the model
            retrained on each subset (averaged over seeds by the caller).
        outputs_are: ``"loss"`` or one of ``"score"``, ``"margin"``, ``"logprob"``.

    Returns:
        ``{"lds": float, "per_query": Tensor[n_test] (float64)}``.  ``per_query``
        is the Spearman correlation (average ranks for ties) across subsets.
        A query whose measured or predicted outputs are constant across
        subsets has no defined correlation: its entry is NaN, it is left out
        of the mean and a ``RuntimeWarning`` is issued (``"lds"`` is NaN if no
        query is defined).

    Raises:
        ValueError: on shape mismatches, non-finite values, fewer than 3
            subsets or an unknown ``outputs_are``.
        TypeError: if an argument is not tensor-like.
    """
    negate = _check_outputs_are(outputs_are)
    scores = _check_scores(scores)  # [n_test, n_train]
    n_test, n_train = scores.shape
    masks = _check_masks(subset_masks, n_train)  # [n_subsets, n_train]
    n_subsets = masks.shape[0]

    outputs = _as_tensor(subset_outputs, "subset_outputs")
    if tuple(outputs.shape) != (n_subsets, n_test):
        raise ValueError(
            f"subset_outputs must have shape [n_subsets={n_subsets}, n_test={n_test}] "
            f"(from subset_masks and scores), got shape {tuple(outputs.shape)}"
        )
    if outputs.is_complex() or outputs.dtype == torch.bool:
        raise TypeError(f"subset_outputs must be a real tensor, got {outputs.dtype}")
    outputs = outputs.to(torch.float64)
    if not torch.isfinite(outputs).all():
        raise ValueError("subset_outputs contains NaN or infinite values")

    predicted = masks.to(torch.float64) @ scores.T  # [n_subsets, n_test]
    if negate:
        predicted = -predicted
    per_query = spearman(predicted.T, outputs.T)  # [n_test]

    undefined = torch.isnan(per_query)  # [n_test]
    if bool(undefined.all()):
        warnings.warn(
            "LDS is undefined for every query (constant outputs or predictions "
            "across subsets); returning NaN",
            RuntimeWarning,
            stacklevel=2,
        )
        mean = math.nan
    else:
        if bool(undefined.any()):
            warnings.warn(
                f"LDS is undefined for {int(undefined.sum())} of {n_test} queries "
                f"(constant outputs or predictions across subsets); they are NaN in "
                f"per_query and excluded from the mean",
                RuntimeWarning,
                stacklevel=2,
            )
        mean = float(per_query[~undefined].mean())
    return {"lds": mean, "per_query": per_query}


# --------------------------------------------------------------------------- #
# Retraining driver with an on-disk cache
# --------------------------------------------------------------------------- #
def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """`write(file)` through a temporary name in the same folder, then a durable rename."""
    with atomic_file(os.fspath(path)) as fh:
        write(fh)


def _open_cache(cache_dir: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Create or check the cache folder; refuse one made with other settings."""
    root = Path(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    meta_path = root / _CACHE_META
    if meta_path.exists():
        try:
            stored = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cache_dir {str(root)!r}: unreadable {_CACHE_META}") from exc
        diffs = [
            f"{key}: cache has {stored.get(key)!r}, this call has {value!r}"
            for key, value in meta.items()
            if stored.get(key) != value
        ]
        if diffs:
            raise ValueError(
                f"cache_dir {str(root)!r} was made with different settings ("
                + "; ".join(diffs)
                + "); use another cache_dir or delete it"
            )
    else:
        text = json.dumps(meta, indent=2, sort_keys=True).encode()
        _atomic_write(meta_path, lambda fh: fh.write(text))
    return root


def _digest(indices: torch.Tensor) -> str:
    return hashlib.sha1(indices.to(torch.int64).numpy().tobytes()).hexdigest()


def _load_cached(path: Path, digest: str, n_test: int) -> torch.Tensor | None:
    """Return the cached output vector, or None if there is no usable file."""
    if not path.exists():
        return None
    try:
        entry = torch.load(path, weights_only=True)
        outputs = entry["outputs"]
        stored_digest = entry["indices_sha1"]
    except Exception as exc:  # a damaged file: measure again
        warnings.warn(f"ignoring unreadable cache file {path}: {exc}", RuntimeWarning)
        return None
    if stored_digest != digest:
        raise ValueError(
            f"cache file {path} was made for a different training subset; "
            f"the cache does not match these settings, use another cache_dir"
        )
    return _check_outputs(outputs, n_test, f"cached outputs in {path}")


def linear_datamodeling_score(
    train_fn: Callable[[torch.Tensor, int], Any],
    eval_fn: Callable[[Any], torch.Tensor],
    scores: torch.Tensor,
    n_subsets: int = 50,
    fraction: float = 0.5,
    seeds: Sequence[int] = (0,),
    cache_dir: str | os.PathLike | None = None,
    outputs_are: str = "loss",
    subset_seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Retrain on random subsets and compute the LDS of ``scores``.

    For each of ``n_subsets`` random subsets (see :func:`make_subsets`) and
    each seed, calls ``model = train_fn(train_indices, seed)`` with a sorted
    LongTensor of kept training indices, then ``eval_fn(model)`` which must
    return a ``[n_test]`` tensor of outputs for the test examples (a loss per
    example if ``outputs_are == "loss"``).  Outputs are averaged over seeds and
    passed to :func:`lds` (see there for the sign convention).

    With ``cache_dir`` every measured ``(subset, seed)`` output is saved as
    its own small file, written atomically, so an interrupted run resumes and
    a repeated call trains nothing.  The cache records ``n_train``, ``n_test``,
    ``fraction`` and ``subset_seed`` and raises ValueError when reused with
    different ones; asking for more subsets or other seeds extends it.  The
    cache cannot tell whether ``train_fn``/``eval_fn`` changed: use a new
    folder when they do.

    Returns:
        :func:`lds`'s dict plus ``"subset_masks"`` (bool ``[n_subsets,
        n_train]``) and ``"subset_outputs"`` (float64 ``[n_subsets, n_test]``,
        averaged over seeds).
    """
    _check_outputs_are(outputs_are)
    scores = _check_scores(scores)  # [n_test, n_train]
    n_test, n_train = scores.shape
    n_subsets = _check_int(n_subsets, "n_subsets", 3)
    seeds = tuple(_as_int(s, "seeds") for s in seeds)
    if not seeds:
        raise ValueError("seeds must contain at least one seed, got ()")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds}")
    if not callable(train_fn) or not callable(eval_fn):
        raise TypeError("train_fn and eval_fn must be callable")

    masks = make_subsets(n_train, n_subsets, fraction, subset_seed)  # [n_subsets, n_train]
    root = None
    if cache_dir is not None:
        meta = {
            "format": _CACHE_FORMAT,
            "n_train": n_train,
            "n_test": n_test,
            "fraction": float(fraction),
            "subset_seed": subset_seed,
        }
        root = _open_cache(cache_dir, meta)

    outputs = torch.zeros(n_subsets, n_test, dtype=torch.float64)  # [n_subsets, n_test]
    with progress_bar(n_subsets * len(seeds), "LDS retraining", enabled=progress) as advance:
        for j in range(n_subsets):
            indices = torch.nonzero(masks[j]).flatten()  # [n_kept], sorted
            digest = _digest(indices)
            per_seed = []
            for seed in seeds:
                path = root / f"subset{j:05d}_seed{seed}.pt" if root is not None else None
                measured = _load_cached(path, digest, n_test) if path is not None else None
                if measured is None:
                    model = train_fn(indices.clone(), seed)
                    measured = _check_outputs(eval_fn(model), n_test, "eval_fn(model)")
                    del model
                    if path is not None:
                        entry = {"outputs": measured, "indices_sha1": digest, "seed": seed}
                        _atomic_write(path, lambda fh, e=entry: torch.save(e, fh))
                per_seed.append(measured)
                advance()
            outputs[j] = torch.stack(per_seed).mean(dim=0)  # [n_test]

    result = lds(scores, masks, outputs, outputs_are=outputs_are)
    result["subset_masks"] = masks
    result["subset_outputs"] = outputs
    return result

"""Brittleness test: does removing the most helpful examples flip a prediction?

For a test example ``q`` we remove the ``k`` training examples with the
largest scores for ``q`` (the most helpful ones under the library convention:
positive score = training on the example LOWERS ``q``'s loss), retrain, and
check whether ``q``'s prediction becomes wrong.  A good attribution flips the
prediction with a small ``k``; removing ``k`` random examples (the control)
should not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

from .lds import _as_int, _check_int, _check_outputs, _check_scores

__all__ = ["BrittlenessResult", "brittleness"]


@dataclass(frozen=True)
class BrittlenessResult:
    """Outcome of the brittleness test for one test example.

    Attributes:
        test_index: row of ``scores`` / entry of ``eval_fn``'s output.
        base_margin: margin of the model trained on all training examples.
        k_flip: smallest ``k`` whose removal made the margin ``<= 0``, or None
            if none did (also None when the prediction was wrong to begin with,
            see ``initially_correct``).
        margins: ``{k: margin after removing the top-k scored examples}``.
        random_flip_fraction: ``{k: fraction of random k-removals that flipped}``.
        random_margins: ``{k: margins after each random k-removal}``.
    """

    test_index: int
    base_margin: float
    k_flip: int | None
    margins: dict[int, float] = field(default_factory=dict)
    random_flip_fraction: dict[int, float] = field(default_factory=dict)
    random_margins: dict[int, tuple[float, ...]] = field(default_factory=dict)

    @property
    def initially_correct(self) -> bool:
        """Whether the full-data model got this example right (margin > 0)."""
        return self.base_margin > 0

    @property
    def flipped(self) -> bool:
        """Whether some tested ``k`` flipped the prediction."""
        return self.k_flip is not None


def _check_test_index(test_index: Any, n_test: int) -> list[int]:
    if test_index is None:
        return list(range(n_test))
    try:
        items = [_as_int(test_index, "test_index")]
    except TypeError:
        if isinstance(test_index, (str, bytes)) or not isinstance(test_index, Iterable):
            raise
        items = [_as_int(q, "test_index entries") for q in test_index]
    out = []
    for q in items:
        if not 0 <= q < n_test:
            raise ValueError(f"test_index {q} out of range for scores with n_test={n_test}")
        out.append(q)
    if not out:
        raise ValueError("test_index is empty")
    return out


def _check_ks(ks: Sequence[int], n_train: int) -> list[int]:
    ks = list(ks)
    if not ks:
        raise ValueError("ks must contain at least one k")
    ks = [_as_int(k, "ks") for k in ks]
    for k in ks:
        if not 0 < k < n_train:
            raise ValueError(
                f"every k in ks must satisfy 0 < k < n_train={n_train}, got {k}"
            )
    return sorted(set(ks))


def brittleness(
    train_fn: Callable[[torch.Tensor, int], Any],
    eval_fn: Callable[[Any], torch.Tensor],
    scores: torch.Tensor,
    test_index: int | Sequence[int] | None = None,
    ks: Sequence[int] = (10, 20, 40),
    n_random: int = 3,
    seed: int = 0,
) -> list[BrittlenessResult]:
    """Remove each query's top-k most helpful training examples and retrain.

    Args:
        train_fn: ``train_fn(train_indices, seed) -> model``; ``train_indices``
            is a sorted LongTensor of the training examples to keep.
        eval_fn: ``eval_fn(model) -> Tensor[n_test]`` of a prediction
            correctness measure for every test example, e.g. the margin
            ``logit[true class] - max other logit``: a value ``> 0`` means the
            prediction is right and ``<= 0`` means it is wrong.  ``-inf``/``inf``
            are accepted (e.g. a class with no training examples left), NaN is not.
        scores: ``[n_test, n_train]`` attribution scores (positive = helpful).
        test_index: query rows to test; None means all of them.
        ks: removal sizes, each in ``1 .. n_train - 1`` (sorted, deduplicated).
        n_random: random-removal control draws per ``k`` (0 disables the control).
        seed: passed to every ``train_fn`` call, and (combined with the query
            index) seeds the ``torch.Generator`` drawing the random removals.

    For each query the removed set for ``k`` is the ``k`` highest-scoring
    training examples (ties broken by lower index).  If fewer than ``k`` scores
    are positive the set also holds neutral/harmful examples, which only makes
    a flip less likely.  A query wrong under the full-data model
    (``base_margin <= 0``) gets no retrains: empty ``margins`` and
    ``k_flip=None``.  Retrains are cached within the call by removed set, so
    the full-data model is trained once and repeated sets are reused.

    Returns:
        One :class:`BrittlenessResult` per query, in ``test_index`` order.
    """
    scores = _check_scores(scores)  # [n_test, n_train]
    n_test, n_train = scores.shape
    queries = _check_test_index(test_index, n_test)
    ks = _check_ks(ks, n_train)
    n_random = _check_int(n_random, "n_random", 0)
    seed = _as_int(seed, "seed")
    if not callable(train_fn) or not callable(eval_fn):
        raise TypeError("train_fn and eval_fn must be callable")

    measured: dict[tuple[int, ...], torch.Tensor] = {}  # removed set -> outputs [n_test]

    def outputs_without(removed: torch.Tensor) -> torch.Tensor:
        key = tuple(sorted(removed.tolist()))
        if key not in measured:
            keep = torch.ones(n_train, dtype=torch.bool)  # [n_train]
            keep[list(key)] = False
            model = train_fn(torch.nonzero(keep).flatten(), seed)
            measured[key] = _check_outputs(
                eval_fn(model), n_test, "eval_fn(model)", allow_inf=True
            )
        return measured[key]

    results = []
    for q in queries:
        base = float(outputs_without(torch.empty(0, dtype=torch.long))[q])
        if base <= 0:
            results.append(BrittlenessResult(test_index=q, base_margin=base, k_flip=None))
            continue
        order = torch.argsort(scores[q], descending=True, stable=True)  # [n_train]
        gen = torch.Generator().manual_seed((seed * 1_000_003 + q) % (2**63))
        margins: dict[int, float] = {}
        random_margins: dict[int, tuple[float, ...]] = {}
        random_flip: dict[int, float] = {}
        for k in ks:
            margins[k] = float(outputs_without(order[:k])[q])
            draws = tuple(
                float(outputs_without(torch.randperm(n_train, generator=gen)[:k])[q])
                for _ in range(n_random)
            )
            random_margins[k] = draws
            if n_random:
                random_flip[k] = sum(m <= 0 for m in draws) / n_random
        k_flip = next((k for k in ks if margins[k] <= 0), None)
        results.append(
            BrittlenessResult(
                test_index=q,
                base_margin=base,
                k_flip=k_flip,
                margins=margins,
                random_flip_fraction=random_flip,
                random_margins=random_margins,
            )
        )
    return results

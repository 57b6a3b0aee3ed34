"""Streaming blocks and the running top-k: every row read once, in order, in blocks whose start
is a multiple of the scoring chunk (so scores do not depend on the sharding), and a top-k merged
block by block equal to the top-k of the whole matrix."""

from __future__ import annotations

import pytest
import torch

from logix.influence.topk import TopK
from logix.storage.reader import block_layout


@pytest.mark.parametrize("shard_rows", [[8, 8, 8], [5, 7, 12, 3], [1] * 9, [16], [20, 4, 1]])
@pytest.mark.parametrize("unit", [None, 4])
def test_block_layout_covers_rows_in_order_on_unit_boundaries(shard_rows, unit):
    block_rows = 8
    blocks = block_layout(shard_rows, block_rows, unit)
    flat = [(i, r) for pieces in blocks for i, a, b in pieces for r in range(a, b)]
    assert flat == [(i, r) for i, n in enumerate(shard_rows) for r in range(n)]
    sizes = [sum(b - a for _, a, b in pieces) for pieces in blocks]
    assert all(0 < s <= block_rows for s in sizes)
    step = unit or block_rows
    assert all(s % step == 0 for s in sizes[:-1]), sizes
    if unit is None:
        assert sizes[:-1] == [block_rows] * (len(sizes) - 1)


def test_block_layout_with_unit_keeps_blocks_inside_aligned_shards():
    blocks = block_layout([8, 8, 4], block_rows=12, unit=4)
    assert [[p[0] for p in pieces] for pieces in blocks] == [[0], [1], [2]]


@pytest.mark.parametrize("block", [1, 3, 7, 50])
def test_topk_merged_by_blocks_equals_topk_of_the_whole(block):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 50, generator=g)
    top = TopK(4, 5)
    for start in range(0, 50, block):
        top.update(scores[:, start:start + block], start)
    best, best_idx, worst, worst_idx = top.result()
    expected = torch.topk(scores, 4, dim=1)
    assert torch.equal(best, expected.values) and torch.equal(best_idx, expected.indices)
    expected = torch.topk(scores, 4, dim=1, largest=False)
    assert torch.equal(worst, expected.values) and torch.equal(worst_idx, expected.indices)

"""Attention heads: which layers of a transformer split over heads (`attention_heads`), and the
influence groups that score each head apart (`head_groups`).

    run.watch(model, heads=logix.text.attention_heads(model))
    run.add_lora(rank=64)          # the split side of each attention layer: 64 // heads per head
    ...
    scores = run.influence.influence(log, influence_groups=logix.text.head_groups(run))
    scores["groups"]["transformer.h.0.attn.c_attn/head3"]       # [n_query, n_train]

A head owns a slice of the layer's gradient matrix: the rows of its outputs in a query / key /
value projection, the columns of its inputs in the output projection. The split layer's
projection is block-diagonal over the heads, so each head's projected gradient is a fixed set of
the row's columns, and a head's score is the score of those columns: the preconditioned query
masked to them, dotted with the training row. The layer's columns are the heads' columns (plus
the output projection's bias column, its own group "<layer>/bias"), so the heads' scores sum to
the layer's score under every curvature. A head's score is exact (projected the same way) with
`hessian="none"`; with a per-layer curvature (kfac, ekfac, raw) the query is preconditioned by
the whole layer's inverse before masking, so curvature across heads is kept.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn

from logix.errors import UsageError
from logix.log import StepRows
from logix.logra import NO_HEAD, HeadSplit, head_columns, head_splits
from logix.storage.manifest import ModuleEntry

# (name suffix, side, parts, config key of the layer's head count), by architecture
_LAYERS = (
    (".attn.c_attn", "out", 3, "n_head"),  # GPT-2: q | k | v
    (".attn.c_proj", "in", 1, "n_head"),
    (".attention.query_key_value", "out", 1, "num_attention_heads"),  # GPT-NeoX: interleaved
    (".attention.dense", "in", 1, "num_attention_heads"),
    (".self_attn.q_proj", "out", 1, "num_attention_heads"),  # Llama, Mistral, Qwen, OPT
    (".self_attn.k_proj", "out", 1, "num_key_value_heads"),
    (".self_attn.v_proj", "out", 1, "num_key_value_heads"),
    (".self_attn.o_proj", "in", 1, "num_attention_heads"),
    (".self_attn.out_proj", "in", 1, "num_attention_heads"),
)


def attention_heads(model: nn.Module) -> Dict[str, HeadSplit]:
    """{layer name: HeadSplit} of the attention projections of a Hugging Face GPT-2, GPT-NeoX or
    Llama-style model (q/k/v and output projections; grouped-query key / value projections
    split over their own key-value heads), for `run.watch(model, heads=...)`."""
    config = getattr(model, "config", None)
    found = {}
    for name, _ in model.named_modules():
        for suffix, side, parts, key in _LAYERS:
            if ("." + name).endswith(suffix):
                heads = getattr(config, key, None) or getattr(config, "num_attention_heads", None)
                if heads:
                    found[name] = HeadSplit(int(heads), side, parts)
    if not found:
        raise UsageError(f"No attention projections found in {type(model).__name__} (looked for "
                         f"{[s for s, *_ in _LAYERS]} with a head count in model.config); pass "
                         "heads={layer name: logix.logra.HeadSplit(...)} to run.watch yourself.")
    return found


def head_groups(source) -> Dict[str, Tensor]:
    """Influence groups {"<layer>/head<h>": column mask, "<layer>/bias": ...} of every layer
    split over heads, for `influence_groups=`. source: the Run, a `logix.Attributor` or a log
    (StepRows) whose row layout and projections the scores use."""
    modules, meta = _layout(source)
    splits = head_splits(meta)
    if not splits:
        raise UsageError("No layer of this log is split over heads: watch the model with "
                         "run.watch(model, heads=logix.text.attention_heads(model)) before "
                         "add_lora and logging.")
    dim = sum(m.dim for m in modules)
    groups = {}
    for entry in modules:
        if entry.name not in splits:
            continue
        split, per_head = splits[entry.name]
        heads = head_columns(split, per_head, entry.in_dim, entry.out_dim, entry.rank_in,
                             entry.rank_out, entry.bias)
        for h in range(split.heads):
            groups[f"{entry.name}/head{h}"] = _mask(dim, entry, heads == h)
        if (heads == NO_HEAD).any():
            groups[f"{entry.name}/bias"] = _mask(dim, entry, heads == NO_HEAD)
    return groups


def _mask(dim: int, entry: ModuleEntry, columns: Tensor) -> Tensor:
    mask = torch.zeros(dim, dtype=torch.bool)
    mask[entry.columns] = columns
    return mask


def _layout(source) -> Tuple[List[ModuleEntry], dict]:
    if isinstance(source, StepRows):
        return list(source.modules), dict(source.projection)
    if hasattr(source, "projection_meta") and hasattr(source, "layout"):  # a Run
        return source.layout(), dict(source.projection_meta)
    if hasattr(source, "modules") and hasattr(source, "reader"):  # an Attributor
        return source.modules(), dict(source.reader().manifest.projection)
    raise UsageError(f"head_groups() takes a Run, a logix.Attributor or a StepRows, got "
                     f"{type(source).__name__}.")

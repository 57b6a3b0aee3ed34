"""Per-token scores: which tokens of a query a training example supports.

A per-token query log (`query_log(..., per_token=True)`, or `run.start(..., per_token=True)`)
carries, for every real token position t of a query, the part of its projected gradient that
flows through that position in every watched layer: sum over layers of dy~_t x~_t^T. These
parts sum to the query's gradient, and a score is linear in the query gradient, so

    token_influence[k, i] = g_t^T (H + lambda I)^-1 g_i,   sum over a query's tokens = its score.

A token's score covers the layers' work at that position: its input, and the prediction of the
next token made there (the last prompt token's row carries the first completion token's
prediction). Prompt tokens get scores too: later positions attend to them.
"""

from __future__ import annotations

from typing import Dict

import torch

from logix.errors import UsageError
from logix.log import StepRows

_NOT_PASSED_ON = ("topk", "out", "influence_groups", "method")


def token_influence(scorer, log: StepRows, **kwargs) -> Dict:
    """Sequence and per-token scores of a per-token query log against every training example.

    scorer: a `Run` or a `logix.Attributor`; kwargs go to its `compute_influence_all`
    (hessian, damping, precondition, loader, block_rows, progress). Scores are `dot` scores
    (a cosine or l2 score is not a sum over tokens). Both kinds come from one pass over the log.

    Returns compute_influence_all's {"src_ids", "tgt_ids", "influence" [n_query, n_train],
    "meta"} plus "token_influence" [n_tokens, n_train] (a query's rows, in token order, sum to
    its row of "influence"), "token_query" (the query row of each token row), "token_position",
    "token_text" and "token_completion" (whether the token is part of the scored completion).
    `logix.storage.scores.save_scores` writes them in the dashboard's per-token layout.
    """
    if not isinstance(log, StepRows) or log.tokens is None:
        raise UsageError("token_influence() needs a per-token query log: "
                         "logix.text.query_log(..., per_token=True), or run.start(..., "
                         "per_token=True) then run.get_log().")
    mode = kwargs.pop("mode", "dot")
    if mode != "dot":
        raise UsageError(f"Per-token scores are dot scores (they sum to the query's score); "
                         f"mode={mode!r} does not split over tokens. Pass mode='dot', or score "
                         "the sequences alone with compute_influence_all(log, mode=...).")
    refused = [k for k in _NOT_PASSED_ON if kwargs.get(k) is not None]
    if refused:
        raise UsageError(f"token_influence() returns full score matrices and does not take "
                         f"{refused}; score the sequences with compute_influence_all for those.")
    tokens, n = log.tokens, len(log)
    both = StepRows(list(range(n + len(tokens.query))), torch.cat([log.grads, tokens.grads]),
                   log.modules, log.projection)
    result = scorer.compute_influence_all(both, mode="dot", **kwargs)
    scores = result["influence"]
    texts = tokens.text if tokens.text is not None else [str(p) for p in tokens.position]
    return {"src_ids": list(log.data_ids), "tgt_ids": result["tgt_ids"],
            "influence": scores[:n], "token_influence": scores[n:],
            "token_query": list(tokens.query), "token_position": list(tokens.position),
            "token_text": list(texts), "token_completion": tokens.completion,
            "meta": {**result.get("meta", {}), "per_token": True}}

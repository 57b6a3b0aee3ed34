"""Training-side per-token scores: which tokens of a training example make its score for a query.

A training example's gradient is a sum over its token positions of per-position terms (every
layer's dy_t x_t^T at position t), so its score splits exactly over its tokens:

    score(q, i) = sum_t q~^T P(dy_t x_t^T),   q~ = (H + lambda I)^-1 g_q, P the LoGra projection.

Nothing is stored for this: the example is run through the model again (frozen, in eval mode)
with per-token capture, and each position's row is scored against the one query. The re-run's
row must equal the logged row (same model, same loss), which `train_token_scores` checks when the
example's id is in the log; token t carries the layers' work at position t, including the
prediction of token t + 1 made there.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from logix.errors import UsageError
from logix.log import StepRows
from logix.storage.data_ids import normalize_data_ids
from logix.text.queries import Text, _logits, _token_ids, _token_text
from logix.tracking.frozen import frozen


def train_token_scores(run, model, log: StepRows, tokens: Text, query: int = 0,
                       data_id: Any = None, tokenizer=None,
                       in_loss: Optional[Sequence[bool]] = None, hessian: Optional[str] = None,
                       damping: Optional[float] = None, precondition: bool = True,
                       tolerance: float = 1e-3) -> Dict[str, Any]:
    """Each token's share of one training example's score for one query.

    run: the Run that logged the training data, in query mode (`run.eval()`), or a new one
    after `initialize_from_log`; model: the model as it was logged. log: a query log (e.g.
    `query_log(...)`), `query` its row. tokens: the training example's token ids (or a string,
    with `tokenizer`), as they were logged; in_loss: per token, whether it was a target of the
    training loss (default: every token but the first, a text window's summed next-token loss).
    data_id: the example's id in the log: its logged row is read and must match the re-run's
    row to `tolerance` (relative), else the model or loss differs from logging and the split
    would be of another gradient (refused). Scores are `dot` scores with the curvature, damping
    and preconditioning given (the query's defaults otherwise).

    Returns {"query_id", "train_id", "token_text", "token_scores" (one float per token; they
    sum to "score"), "token_in_loss", "score" (the re-run row's score), "logged_score" (the
    logged row's, when data_id is given), "meta"}; `attach_train_tokens` adds it to a result
    so that `save_scores` writes it for the dashboard.
    """
    if run.saving:
        raise UsageError("train_token_scores() would write into the training log: call "
                         "run.eval() first.")
    if not isinstance(log, StepRows):
        raise UsageError(f"log must be a query log (StepRows), got {type(log).__name__}.")
    if isinstance(query, bool) or not isinstance(query, int) or not 0 <= query < len(log):
        raise UsageError(f"query must be a row index in [0, {len(log)}), got {query!r}.")
    ids = _token_ids(tokens, tokenizer, False, "training example")
    if len(ids) < 2:
        raise UsageError("A training example needs at least two tokens (the first predicts the "
                         "second).")
    targets = [False] + [True] * (len(ids) - 1) if in_loss is None else [bool(f) for f in in_loss]
    if len(targets) != len(ids) or targets[0] or not any(targets):
        raise UsageError(f"in_loss needs one flag per token ({len(ids)}), False for the first "
                         "token (nothing predicts it) and True for at least one other.")
    train_id = "train" if data_id is None else normalize_data_ids([data_id])[0]
    rows, row = _token_rows(run, model, ids, targets, train_id)
    src = StepRows([log.data_ids[query]], log.grads[query:query + 1], log.modules, log.projection)
    scorer = run.influence.scorer(src, "dot", precondition, hessian, damping)
    device = scorer.device
    token_scores = scorer.score(rows.to(device), None)[:, 0].double()
    score = float(scorer.score(row.to(device), None)[0, 0])
    logged_score = None
    if data_id is not None:
        logged = _logged_row(run, train_id)
        difference = float((row.double() - logged.double()).norm() / logged.double().norm()) \
            if logged.norm() > 0 else float(row.norm())
        if not difference <= tolerance:
            raise UsageError(f"Training example {train_id!r} re-run through the model gives a row "
                             f"{difference:.2e} (relative) away from its logged row: the model, "
                             "its tokens or the loss (in_loss) differ from logging, so its score "
                             "would not split into these tokens. Pass the logged model and tokens "
                             f"(or a larger tolerance for a half-precision log).")
        logged_score = float(scorer.score(logged.to(device).float()[None], None)[0, 0])
    return {"query_id": log.data_ids[query], "train_id": train_id,
            "token_text": [_token_text(t, tokenizer) for t in ids],
            "token_scores": [float(v) for v in token_scores], "token_in_loss": targets,
            "score": score, "logged_score": logged_score,
            "meta": {**scorer.meta, "query": query}}


def attach_train_tokens(result: Dict, pairs: Sequence[Dict[str, Any]]) -> Dict:
    """`result` (an influence result) with `pairs` (`train_token_scores` results of its
    queries) under "train_tokens", which `save_scores` writes for the dashboard."""
    src_ids = list(result["src_ids"])
    for pair in pairs:
        if pair["query_id"] not in src_ids:
            raise UsageError(f"Query {pair['query_id']!r} of these training-token scores is not "
                             f"among the result's queries {src_ids[:3]}.")
    result["train_tokens"] = [*result.get("train_tokens", []), *pairs]
    return result


def _token_rows(run, model, ids: List[int], targets: List[bool], train_id):
    """(per-position rows [T, dim], the example's row [1, dim]) from one frozen pass."""
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    mask = torch.ones_like(input_ids)
    target = torch.tensor([targets], device=device)
    was_training = model.training
    model.eval()
    try:
        with frozen(model), torch.enable_grad():
            with run(data_id=[train_id], mask=mask, per_token=True):
                logits = _logits(model, input_ids, mask)
                nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:],
                                      reduction="none")
                (nll * target[:, 1:]).sum().backward()
    finally:
        model.train(was_training)
    step = run.get_log(copy=True)
    if step.tokens is None or step.tokens.position != list(range(len(ids))):
        raise UsageError("The re-run gave no row for every token position; the model's watched "
                         "layers must see the tokens as [batch, tokens, features].")
    return step.tokens.grads, step.grads


def _logged_row(run, train_id) -> torch.Tensor:
    for data_ids, rows in run.influence.reader():
        for n, logged_id in enumerate(data_ids):
            if logged_id == train_id:
                return rows[n].float().cpu()
    raise UsageError(f"Training id {train_id!r} is not in the log; pass the id it was logged "
                     "under, or data_id=None to skip the check against the logged row.")


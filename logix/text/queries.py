"""Query logs of generated text: the gradient of a completion's negative log-likelihood given its
prompt, logged through the run's hooks.

    run.eval()
    log = logix.text.query_log(run, model, prompts, completions, tokenizer=tok, per_token=True)
    result = logix.text.token_influence(run, log)    # or run.compute_influence_all(log)

Each query's loss is the summed NLL of its completion tokens (prompt tokens and padding are left
out of the loss), so its gradient is what training on that completion would follow. Batches are
right-padded; the attention mask goes to the model (when its forward takes one) and to the hooks.
"""

from __future__ import annotations

import inspect
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from logix.errors import UsageError
from logix.log import StepRows
from logix.storage.data_ids import normalize_data_ids
from logix.tracking.frozen import frozen

Text = Union[str, Sequence[int], Tensor]


def query_log(run, model: nn.Module, prompts: Sequence[Text], completions: Sequence[Text],
              tokenizer=None, data_ids: Optional[Sequence] = None, batch_size: int = 8,
              per_token: bool = False) -> StepRows:
    """The query log of `completions` given `prompts` (one query per pair), in batches.

    prompts, completions: strings (then `tokenizer` is needed: any Hugging Face tokenizer) or
    token ids (lists or 1-D tensors, e.g. what `model.generate` appended). The prompt is
    tokenized with the tokenizer's special tokens, the completion without.
    model: a Hugging Face causal LM or any nn.Module whose forward takes input ids [B, T] as
    its first argument (and `attention_mask=`, if it has one) and returns logits [B, T, vocab]
    (a tensor, or an output with `.logits`).
    data_ids: one id per query (default "q0", "q1", ...: apart from training ids, whose content
    `run.describe` keeps under the same ids). per_token: the log also carries every token's part
    of each query's gradient (see `logix.text.token_influence`).

    The run must be in query mode (`run.eval()`); the model is put in eval mode for the passes
    (dropout off) and restored after; its parameters' `.grad` are not touched.
    """
    if run.saving:
        raise UsageError("query_log() would write the queries into the training log: call "
                         "run.eval() first (gradients kept in memory, nothing written).")
    if len(prompts) != len(completions):
        raise UsageError(f"query_log() needs one completion per prompt, got {len(prompts)} "
                         f"prompts and {len(completions)} completions.")
    if not len(prompts):
        raise UsageError("query_log() needs at least one prompt and completion.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch_size must be a positive integer, got {batch_size!r}.")
    ids = normalize_data_ids([f"q{i}" for i in range(len(prompts))] if data_ids is None
                             else data_ids)
    if len(ids) != len(prompts):
        raise UsageError(f"data_ids names {len(ids)} queries but there are {len(prompts)}.")
    pairs = [(_token_ids(p, tokenizer, True, "prompt"), _token_ids(c, tokenizer, False,
                                                                   "completion"))
             for p, c in zip(prompts, completions)]
    vocab, positions = _model_limits(model)
    for n, (p, c) in enumerate(pairs):
        if not p or not c:
            raise UsageError(f"Query {ids[n]!r} has an empty {'prompt' if not p else 'completion'}"
                             "; the first completion token is predicted from the prompt, so "
                             "both need at least one token.")
        outside = [t for t in p + c if t < 0 or (vocab is not None and t >= vocab)]
        if outside:
            raise UsageError(f"Query {ids[n]!r} has token ids {outside[:5]} outside the model's "
                             f"vocabulary of {vocab}; tokenize with the model's own tokenizer.")
        if positions and len(p) + len(c) > positions:
            raise UsageError(f"Query {ids[n]!r} is {len(p) + len(c)} tokens long, more than the "
                             f"model's {positions} positions; shorten its prompt or completion.")
    device = next(model.parameters()).device
    logs = []
    was_training = model.training
    model.eval()
    try:
        with frozen(model), torch.enable_grad():  # gradients of activations only
            for start in range(0, len(pairs), batch_size):
                batch = pairs[start:start + batch_size]
                logs.append(_query_batch(run, model, batch, ids[start:start + batch_size],
                                         device, tokenizer, per_token))
    finally:
        model.train(was_training)
    return StepRows.concat(logs)


def _query_batch(run, model, batch, ids, device, tokenizer, per_token) -> StepRows:
    length = max(len(p) + len(c) for p, c in batch)
    input_ids = torch.zeros(len(batch), length, dtype=torch.long)
    mask = torch.zeros(len(batch), length, dtype=torch.long)
    in_loss = torch.zeros(len(batch), length, dtype=torch.bool)  # the completion's tokens
    for b, (p, c) in enumerate(batch):
        input_ids[b, :len(p) + len(c)] = torch.tensor(p + c)
        mask[b, :len(p) + len(c)] = 1
        in_loss[b, len(p):len(p) + len(c)] = True
    input_ids, mask, in_loss = input_ids.to(device), mask.to(device), in_loss.to(device)
    with run(data_id=ids, mask=mask, per_token=per_token):
        logits = _logits(model, input_ids, mask)
        # Position t predicts token t + 1; only completion tokens are scored. [B, T - 1]
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:],
                              reduction="none")
        loss = (nll * in_loss[:, 1:]).sum()
        loss.backward()  # hooks fire; the model is frozen: no weight gradient, .grad untouched
    log = run.get_log(copy=True)
    if log.tokens is not None:
        tokens = log.tokens
        flat = input_ids.cpu()
        tokens.text = [_token_text(int(flat[q, t]), tokenizer)
                       for q, t in zip(tokens.query, tokens.position)]
        tokens.completion = [bool(in_loss[q, t]) for q, t in zip(tokens.query, tokens.position)]
    return log


def _model_limits(model: nn.Module) -> tuple:
    """(vocabulary size, number of positions) of a Hugging Face model, None where unknown."""
    config = getattr(model, "config", None)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None) or getattr(config, "vocab_size", None)
    positions = getattr(config, "n_positions", None) or \
        getattr(config, "max_position_embeddings", None)
    return vocab, positions


def _logits(model: nn.Module, input_ids: Tensor, mask: Tensor,
            positions: Optional[Tensor] = None) -> Tensor:
    """Logits [B, T, vocab] of `input_ids`, with the attention mask (and `positions` as
    position ids) where the model's forward takes them."""
    try:
        accepted = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        accepted = {}
    kwargs = {"attention_mask": mask} if "attention_mask" in accepted else {}
    if positions is not None and "position_ids" in accepted:
        kwargs["position_ids"] = positions
    out = model(input_ids, **kwargs)
    logits = out if isinstance(out, Tensor) else getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        logits = out[0]
    if not isinstance(logits, Tensor) or logits.dim() != 3 or \
            tuple(logits.shape[:2]) != tuple(input_ids.shape):
        raise UsageError(f"The model returned {_describe(out)}; query_log() needs logits "
                         f"[batch, tokens, vocab] = [{input_ids.shape[0]}, {input_ids.shape[1]}, "
                         "vocab] (a tensor, or an output with .logits).")
    return logits


def _token_ids(value: Text, tokenizer, special: bool, what: str) -> List[int]:
    if isinstance(value, str):
        if tokenizer is None:
            raise UsageError(f"The {what} {value[:40]!r} is a string: pass tokenizer= (a Hugging "
                             "Face tokenizer), or pass token ids instead.")
        return list(tokenizer(value, add_special_tokens=special)["input_ids"])
    if isinstance(value, Tensor):
        if value.dim() != 1 or value.is_floating_point():
            raise UsageError(f"A {what} tensor must hold 1-D integer token ids, got "
                             f"{value.dtype} of shape {tuple(value.shape)}.")
        return [int(v) for v in value.tolist()]
    try:
        return [int(v) for v in value]
    except (TypeError, ValueError) as e:
        raise UsageError(f"A {what} must be a string or a sequence of token ids, got "
                         f"{type(value).__name__}.") from e


def _token_text(token: int, tokenizer) -> str:
    """The token's text; without a tokenizer its id, after a space (as decoded words carry
    theirs), so that heat maps read "5 7 9". A sentencepiece word start ('▁') keeps its space,
    which decoding one token drops, so heat maps can tell "pass word" from "password"."""
    if tokenizer is None:
        return f" {token}"
    text = tokenizer.decode([token])
    piece = tokenizer.convert_ids_to_tokens(token) if hasattr(tokenizer,
                                                              "convert_ids_to_tokens") else None
    if isinstance(piece, str) and piece.startswith("\u2581") and not text[:1].isspace():
        text = " " + text
    return text


def _describe(out) -> str:
    if isinstance(out, Tensor):
        return f"a tensor of shape {tuple(out.shape)}"
    return type(out).__name__

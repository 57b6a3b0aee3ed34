"""Data for `logix build` / `logix score`: rows from local files, examples (token ids and
which tokens are in the loss) from text, prompt/completion or chat columns, and padded batches.

    rows = read_rows("train.jsonl")                          # jsonl, csv, parquet, save_to_disk
    examples = make_examples(rows, tokenizer, Columns(), max_length=512)
    for batch in batches(examples, batch_tokens=8192, order="sorted", pad_id=0): ...

Nothing here imports transformers or datasets at module level; `datasets` (and pyarrow, for
parquet) are optional: `pip install "logix[datasets]"`.
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from logix.errors import ConfigError, UsageError

FORMATS = ("auto", "text", "completion", "chat")
ORDERS = ("sorted", "greedy")
EXTRA = 'pip install "logix[datasets]"'


# --------------------------------------------------------------------------- rows
def read_rows(path: str, split: Optional[str] = None, limit: Optional[int] = None
              ) -> List[Dict[str, Any]]:
    """The rows (dicts) of a local dataset: a .jsonl / .json-lines file, a .csv file, a .parquet
    file (needs pyarrow) or a `datasets.save_to_disk` folder (needs datasets; `split` picks one
    of a DatasetDict). `limit`: the first N rows only."""
    if not os.path.exists(path):
        raise UsageError(f"The dataset {path!r} does not exist.")
    if os.path.isdir(path):
        rows = _from_disk(path, split)
    else:
        ext = os.path.splitext(path)[1].lower()
        if ext in (".jsonl", ".json", ".ndjson"):
            rows = _jsonl(path, limit)
        elif ext == ".csv":
            rows = _csv(path, limit)
        elif ext == ".parquet":
            rows = _parquet(path)
        else:
            raise UsageError(f"Cannot read {path!r}: the extension {ext or '(none)'!r} is not "
                             "one of .jsonl, .json (one object per line), .csv, .parquet; a "
                             "datasets.save_to_disk folder also works.")
    return rows if limit is None else rows[:limit]


def _jsonl(path: str, limit: Optional[int]) -> List[Dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise UsageError(f"{path}:{number} is not a JSON object ({e}); a .jsonl file "
                                 "holds one object per line.") from None
            if not isinstance(row, dict):
                raise UsageError(f"{path}:{number} holds {type(row).__name__}, not an object.")
            rows.append(row)
            if limit is not None and len(rows) >= limit:
                break
    return rows


def _csv(path: str, limit: Optional[int]) -> List[Dict]:
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            rows.append(row)
            if limit is not None and len(rows) >= limit:
                break
    return rows


def _parquet(path: str) -> List[Dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError(f"Reading {path!r} needs pyarrow: {EXTRA} (jsonl and csv need "
                         "nothing more).") from None
    return pq.read_table(path).to_pylist()


def _from_disk(path: str, split: Optional[str]) -> List[Dict]:
    try:
        import datasets
    except ImportError:
        raise UsageError(f"{path!r} is a folder (a datasets.save_to_disk dataset?); reading it "
                         f"needs the datasets library: {EXTRA}.") from None
    try:
        data = datasets.load_from_disk(path)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"{path!r} is not a datasets.save_to_disk folder: {e}") from None
    if isinstance(data, datasets.DatasetDict):
        if split is None:
            if len(data) != 1:
                raise UsageError(f"{path!r} holds the splits {sorted(data)}: pick one with "
                                 "--split.")
            split = next(iter(data))
        if split not in data:
            raise UsageError(f"{path!r} has no split {split!r}; it has {sorted(data)}.")
        data = data[split]
    return [dict(row) for row in data]


# --------------------------------------------------------------------------- examples
@dataclass
class Columns:
    """Which columns hold the text. format "auto": chat when the messages column is there,
    prompt/completion when both are, else text."""

    format: str = "auto"
    text: str = "text"
    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"
    id: Optional[str] = None  # a column of example ids (default: the row number)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"format={self.format!r}; allowed: {', '.join(FORMATS)}.")

    def resolve(self, row: Dict) -> str:
        if self.format != "auto":
            return self.format
        if self.messages in row:
            return "chat"
        if self.prompt in row and self.completion in row:
            return "completion"
        if self.text in row:
            return "text"
        raise UsageError(f"No text column in a row with the columns {sorted(row)}: name it with "
                         f"--text-column (now {self.text!r}), --prompt-column and "
                         f"--completion-column ({self.prompt!r}, {self.completion!r}) or "
                         f"--messages-column ({self.messages!r}).")


@dataclass
class Example:
    """One sequence: token ids, which of them are predicted in the loss (a token is predicted
    from the one before it, so the first is never), and its text (for run.describe)."""

    id: str
    input_ids: List[int]
    in_loss: List[bool]
    text: str

    def __len__(self) -> int:
        return len(self.input_ids)


def make_examples(rows: Sequence[Dict], tokenizer, columns: Columns, max_length: int,
                  prefix: str = "") -> List[Example]:
    """Examples of `rows`. Text: the whole text tokenized (with the tokenizer's special tokens)
    and cut into windows of `max_length` tokens, each its own example "<row>:<chunk>" (a last
    window of one token, which predicts nothing, is dropped). Prompt/completion: one example
    "<row>", the loss on the completion only (the prompt tokenized with special tokens, the
    completion without, as `logix.text.query_log` does); cut to `max_length`. Chat: the
    tokenizer's chat template, the loss on the assistant turns only. `prefix` goes before
    every id (queries: "q")."""
    if max_length < 2:
        raise ConfigError(f"max_length must be at least 2 (a token and the next), got "
                          f"{max_length}.")
    examples, cut, empty = [], 0, []
    fmt = columns.resolve(rows[0]) if rows else "text"
    for number, row in enumerate(rows):
        if columns.id and columns.id not in row:
            raise UsageError(f"Row {number} has no id column {columns.id!r} (columns: "
                             f"{sorted(row)}).")
        row_id = prefix + str(row[columns.id] if columns.id else number)
        if fmt == "text":
            ids = _tokens(tokenizer, _field(row, columns.text, number), True)
            for chunk, start in enumerate(range(0, len(ids), max_length)):
                window = ids[start:start + max_length]
                if len(window) < 2:
                    continue
                examples.append(Example(f"{row_id}:{chunk}", window,
                                        [False] + [True] * (len(window) - 1),
                                        tokenizer.decode(window)))
            continue
        if fmt == "completion":
            prompt, completion = _field(row, columns.prompt, number), \
                _field(row, columns.completion, number)
            pieces = [(_tokens(tokenizer, prompt, True), False),
                      (_tokens(tokenizer, completion, False), True)]
            text = prompt + completion
        else:
            pieces, text = chat_pieces(tokenizer, _messages(row, columns.messages, number))
        ids = [t for piece, _ in pieces for t in piece]
        in_loss = [flag for piece, flag in pieces for _ in piece]
        if len(ids) > max_length:
            cut += 1
            ids, in_loss = ids[:max_length], in_loss[:max_length]
        in_loss[0] = False  # the first token is predicted from nothing
        if not any(in_loss):
            empty.append(row_id)
            continue
        examples.append(Example(row_id, ids, in_loss, text))
    if cut:
        warnings.warn(f"{cut} of {len(rows)} rows are longer than max_length={max_length} "
                      "tokens and were cut to it (their loss covers the tokens kept).")
    if empty:
        warnings.warn(f"{len(empty)} rows have no loss token left (empty completion or no "
                      f"assistant turn within max_length) and are skipped: {empty[:5]}.")
    return examples


def _field(row: Dict, column: str, number: int) -> str:
    if column not in row:
        raise UsageError(f"Row {number} has no column {column!r} (columns: {sorted(row)}).")
    value = row[column]
    if not isinstance(value, str):
        raise UsageError(f"Row {number}'s {column!r} is {type(value).__name__}, not text.")
    return value


def _messages(row: Dict, column: str, number: int) -> List[Dict]:
    if column not in row:
        raise UsageError(f"Row {number} has no column {column!r} (columns: {sorted(row)}).")
    value = row[column]
    if isinstance(value, str):  # a csv cell holding JSON
        try:
            value = json.loads(value)
        except ValueError:
            raise UsageError(f"Row {number}'s {column!r} is text that is not a JSON list of "
                             "messages.") from None
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m and
                                              "content" in m for m in value):
        raise UsageError(f"Row {number}'s {column!r} must be a list of {{'role', 'content'}} "
                         "messages.")
    return value


def _tokens(tokenizer, text: str, special: bool) -> List[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def chat_pieces(tokenizer, messages: List[Dict]):
    """([(token ids, in the loss)], text) of a conversation rendered by the tokenizer's chat
    template: each assistant turn's content (and what the template closes it with) is in the
    loss; the rest (system and user turns, the generation prompt before an assistant turn) is
    not. The template is rendered for growing prefixes of the conversation, so it must render
    a prefix as the start of the whole."""
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError("Chat rows need a tokenizer with a chat template (tokenizer."
                         "chat_template is not set): use a tokenizer that has one, set it and "
                         "save_pretrained, or give text / prompt-completion columns instead.")

    def render(part, generation=False):
        return tokenizer.apply_chat_template(part, tokenize=False,
                                             add_generation_prompt=generation)

    pieces, done = [], ""

    def add(text: str, flag: bool, upto: str) -> None:
        if not upto.startswith(done):
            raise UsageError("The chat template does not render a conversation's start as the "
                             "start of the whole conversation, so the assistant turns cannot be "
                             "found; use prompt/completion columns instead.")
        if text:
            pieces.append((_tokens(tokenizer, text, False), flag))

    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head = render(messages[:i], generation=True)
        add(head[len(done):], False, head)
        done = head
        full = render(messages[:i + 1])
        add(full[len(done):], True, full)
        done = full
    whole = render(messages)
    add(whole[len(done):], False, whole)
    return pieces, whole


# --------------------------------------------------------------------------- batches
def plan_batches(examples: Sequence[Example], batch_size: Optional[int] = None,
                 batch_tokens: Optional[int] = None, order: str = "sorted") -> List[List[int]]:
    """Indices of `examples` per batch. batch_tokens: each batch filled while its padded size
    (examples x longest) stays within the budget (an example longer than the budget goes
    alone); else batch_size examples per batch. order "sorted": longest first (less padding;
    ties keep dataset order); "greedy": dataset order."""
    if order not in ORDERS:
        raise ConfigError(f"batching={order!r}; allowed: {', '.join(ORDERS)}.")
    index = list(range(len(examples)))
    if order == "sorted":
        index.sort(key=lambda i: -len(examples[i]))
    plan: List[List[int]] = []
    if batch_tokens is None:
        size = batch_size or 8
        return [index[s:s + size] for s in range(0, len(index), size)]
    current, longest = [], 0
    for i in index:
        n = len(examples[i])
        if current and (len(current) + 1) * max(longest, n) > batch_tokens:
            plan.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        plan.append(current)
    return plan


def collate(examples: Sequence[Example], pad_id: int = 0) -> Dict[str, Any]:
    """Right-padded {"ids", "input_ids" [B, T], "attention_mask" [B, T], "in_loss" [B, T]}."""
    length = max(len(e) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(examples), length, dtype=torch.long)
    in_loss = torch.zeros(len(examples), length, dtype=torch.bool)
    for b, e in enumerate(examples):
        input_ids[b, :len(e)] = torch.tensor(e.input_ids)
        mask[b, :len(e)] = 1
        in_loss[b, :len(e)] = torch.tensor(e.in_loss)
    return {"ids": [e.id for e in examples], "input_ids": input_ids, "attention_mask": mask,
            "in_loss": in_loss}


def batches(examples: Sequence[Example], batch_size: Optional[int] = None,
            batch_tokens: Optional[int] = None, order: str = "sorted",
            pad_id: int = 0) -> Iterator[Dict[str, Any]]:
    for indices in plan_batches(examples, batch_size, batch_tokens, order):
        yield collate([examples[i] for i in indices], pad_id)


def summed_nll(model: nn.Module, batch: Dict[str, Any]) -> Tensor:
    """The batch's loss: the negative log-likelihood summed over the tokens in the loss
    (position t predicts token t + 1; padding and prompt tokens left out)."""
    out = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out if isinstance(out, Tensor) else out.logits  # [B, T, vocab]
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), batch["input_ids"][:, 1:],
                          reduction="none")  # [B, T - 1]
    return (nll * batch["in_loss"][:, 1:]).sum()

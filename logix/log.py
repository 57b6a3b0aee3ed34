"""StepRows: projected per-example gradients held in memory (a query, or the last logged step)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Union

import torch
from torch import Tensor

from logix.errors import LogFormatError, UsageError
from logix.storage.format import (DATA_IDS_KEY, GRAD_KEY, atomic_write, safetensors_header,
                                  tensor_bytes)
from logix.storage.manifest import ModuleEntry

STEP_LOG_FORMAT = "logix-step-log"
TOKEN_GRAD_KEY = "token_grad"  # a saved StepRows's per-token rows, described by TOKEN_ROWS_KEY
TOKEN_ROWS_KEY = "token_rows"


@dataclass
class TokenRows:
    """Per-token rows of a query log (`run.start(..., per_token=True)`): row k is the part of
    query `query[k]`'s projected gradient that flows through token position `position[k]`; the
    rows of one query sum to its row of `StepRows.grads`. `text` (token strings) and
    `completion` (whether the token belongs to the scored completion) are optional."""

    grads: Tensor  # [n_tokens, dim]
    query: List[int]  # ascending
    position: List[int]
    text: Optional[List[str]] = None
    completion: Optional[List[bool]] = None

    def shifted(self, offset: int) -> "TokenRows":
        return dataclasses.replace(self, query=[q + offset for q in self.query])

    @staticmethod
    def concat(parts: Sequence["TokenRows"]) -> "TokenRows":
        def join(key):
            values = [getattr(p, key) for p in parts]
            return None if any(v is None for v in values) else [x for v in values for x in v]

        return TokenRows(torch.cat([p.grads for p in parts]), join("query"), join("position"),
                         join("text"), join("completion"))


@dataclass
class StepRows:
    """Rows [n, dim]: every tracked module's flattened G~ side by side, as in a shard."""

    data_ids: List
    grads: Tensor
    modules: List[ModuleEntry]
    projection: Dict = field(default_factory=dict)  # init, seed, checksum of the projections
    tokens: Optional[TokenRows] = None  # per-token rows of a query (per_token=True)

    def __len__(self) -> int:
        return len(self.data_ids)

    def __iter__(self) -> Iterator:
        """`ids, grads = run.get_log()` unpacks like LogIX's (data_id, log) pair."""
        return iter((self.data_ids, self.grads))

    def module(self, name: str) -> Tensor:
        """[n, rank_out, rank_in] for one module."""
        for entry in self.modules:
            if entry.name == name:
                return self.grads[:, entry.columns].reshape(-1, entry.rank_out, entry.rank_in)
        raise UsageError(f"Module {name!r} is not in this log; it holds "
                         f"{[m.name for m in self.modules]}.")

    def clone(self) -> "StepRows":
        tokens = None if self.tokens is None else dataclasses.replace(
            self.tokens, grads=self.tokens.grads.clone())
        return StepRows(list(self.data_ids), self.grads.clone(), list(self.modules),
                       dict(self.projection), tokens)

    @staticmethod
    def concat(logs: Sequence["StepRows"]) -> "StepRows":
        """Join the logs of several query batches into one."""
        if not logs:
            raise UsageError("StepRows.concat needs at least one log.")
        if any(log.modules != logs[0].modules or log.projection != logs[0].projection
               for log in logs):
            raise UsageError("Cannot concatenate logs with different modules, ranks or "
                             "projections.")
        ids = [i for log in logs for i in log.data_ids]
        with_tokens = [log.tokens is not None for log in logs]
        if any(with_tokens) and not all(with_tokens):
            raise UsageError("Cannot concatenate logs with and without per-token rows: log "
                             "every query batch with the same per_token setting.")
        tokens, offset = [], 0
        for log in logs if all(with_tokens) else []:
            tokens.append(log.tokens.shifted(offset))
            offset += len(log)
        return StepRows(ids, torch.cat([log.grads for log in logs]), list(logs[0].modules),
                       dict(logs[0].projection), TokenRows.concat(tokens) if tokens else None)

    def save(self, path: Union[str, os.PathLike]) -> str:
        """Write this log to one safetensors file (tensor "grad" [n, dim]; data ids, modules and
        projection in the metadata), so another process can score it without the model
        (`logix.Attributor(project).compute_influence_all(path)`). Returns the path."""
        path = os.fspath(path)
        metadata = {"format": STEP_LOG_FORMAT, DATA_IDS_KEY: json.dumps(list(self.data_ids)),
                    "modules": json.dumps([dataclasses.asdict(m) for m in self.modules]),
                    "projection": json.dumps(self.projection)}
        tensors = {GRAD_KEY: self.grads.detach().to("cpu").contiguous()}
        if self.tokens is not None:
            tensors[TOKEN_GRAD_KEY] = self.tokens.grads.detach().to("cpu").contiguous()
            metadata[TOKEN_ROWS_KEY] = json.dumps({k: getattr(self.tokens, k) for k in (
                "query", "position", "text", "completion")})
        header = safetensors_header({k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()},
                                    metadata)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_write(path, header, *[tensor_bytes(t) for t in tensors.values()])
        return path

    @staticmethod
    def load(path: Union[str, os.PathLike]) -> "StepRows":
        """Read a log written by `StepRows.save`."""
        from safetensors import SafetensorError, safe_open

        path = os.fspath(path)
        try:
            with safe_open(path, "pt") as f:
                metadata = f.metadata() or {}
                if metadata.get("format") != STEP_LOG_FORMAT:
                    raise UsageError(f"{path!r} is not a saved StepRows (its metadata format is "
                                     f"{metadata.get('format')!r}); write one with "
                                     "run.get_log().save(path).")
                grads = f.get_tensor(GRAD_KEY)
                tokens = None
                if TOKEN_GRAD_KEY in f.keys():
                    tokens = TokenRows(f.get_tensor(TOKEN_GRAD_KEY),
                                       **json.loads(metadata[TOKEN_ROWS_KEY]))
            modules = [ModuleEntry(**m) for m in json.loads(metadata["modules"])]
            ids = json.loads(metadata[DATA_IDS_KEY])
            projection = json.loads(metadata["projection"])
        except (OSError, SafetensorError, KeyError, TypeError, ValueError) as e:
            raise LogFormatError(f"Cannot read the StepRows file {path!r}: {e}") from e
        if grads.dim() != 2 or grads.shape[0] != len(ids) or \
                grads.shape[1] != sum(m.dim for m in modules):
            raise LogFormatError(f"{path!r}: grad of shape {tuple(grads.shape)} does not match "
                                 f"{len(ids)} data ids and the modules' width.")
        return StepRows(ids, grads, modules, projection, tokens)

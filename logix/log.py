"""StepLog: projected per-example gradients held in memory (a query, or the last logged step)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Sequence, Union

import torch
from torch import Tensor

from logix.errors import LogFormatError, UsageError
from logix.storage.format import (DATA_IDS_KEY, GRAD_KEY, atomic_write, safetensors_header,
                                  tensor_bytes)
from logix.storage.manifest import ModuleEntry

STEP_LOG_FORMAT = "logix-step-log"


@dataclass
class StepLog:
    """Rows [n, dim]: every tracked module's flattened G~ side by side, as in a shard."""

    data_ids: List
    grads: Tensor
    modules: List[ModuleEntry]
    projection: Dict = field(default_factory=dict)  # init, seed, checksum of the projections

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

    def clone(self) -> "StepLog":
        return StepLog(list(self.data_ids), self.grads.clone(), list(self.modules),
                       dict(self.projection))

    @staticmethod
    def concat(logs: Sequence["StepLog"]) -> "StepLog":
        """Join the logs of several query batches into one."""
        if not logs:
            raise UsageError("StepLog.concat needs at least one log.")
        if any(log.modules != logs[0].modules or log.projection != logs[0].projection
               for log in logs):
            raise UsageError("Cannot concatenate logs with different modules, ranks or "
                             "projections.")
        ids = [i for log in logs for i in log.data_ids]
        return StepLog(ids, torch.cat([log.grads for log in logs]), list(logs[0].modules),
                       dict(logs[0].projection))

    def save(self, path: Union[str, os.PathLike]) -> str:
        """Write this log to one safetensors file (tensor "grad" [n, dim]; data ids, modules and
        projection in the metadata), so another process can score it without the model
        (`logix.Attributor(project).compute_influence_all(path)`). Returns the path."""
        path = os.fspath(path)
        metadata = {"format": STEP_LOG_FORMAT, DATA_IDS_KEY: json.dumps(list(self.data_ids)),
                    "modules": json.dumps([dataclasses.asdict(m) for m in self.modules]),
                    "projection": json.dumps(self.projection)}
        grads = self.grads.detach().to("cpu").contiguous()
        header = safetensors_header({GRAD_KEY: (grads.dtype, tuple(grads.shape))}, metadata)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_write(path, header, tensor_bytes(grads))
        return path

    @staticmethod
    def load(path: Union[str, os.PathLike]) -> "StepLog":
        """Read a log written by `StepLog.save`."""
        from safetensors import SafetensorError, safe_open

        path = os.fspath(path)
        try:
            with safe_open(path, "pt") as f:
                metadata = f.metadata() or {}
                if metadata.get("format") != STEP_LOG_FORMAT:
                    raise LogFormatError(f"{path!r} is not a saved StepLog (its metadata format "
                                         f"is {metadata.get('format')!r}); write one with "
                                         "run.get_log().save(path).")
                grads = f.get_tensor(GRAD_KEY)
            modules = [ModuleEntry(**m) for m in json.loads(metadata["modules"])]
            ids = json.loads(metadata[DATA_IDS_KEY])
            projection = json.loads(metadata["projection"])
        except (OSError, SafetensorError, KeyError, TypeError, ValueError) as e:
            raise LogFormatError(f"Cannot read the StepLog file {path!r}: {e}") from e
        if grads.dim() != 2 or grads.shape[0] != len(ids) or \
                grads.shape[1] != sum(m.dim for m in modules):
            raise LogFormatError(f"{path!r}: grad of shape {tuple(grads.shape)} does not match "
                                 f"{len(ids)} data ids and the modules' width.")
        return StepLog(ids, grads, modules, projection)

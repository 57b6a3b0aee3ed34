"""StepLog: projected per-example gradients held in memory (a query, or the last logged step)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Sequence

import torch
from torch import Tensor

from logix.errors import UsageError
from logix.storage.manifest import ModuleEntry


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

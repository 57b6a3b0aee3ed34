"""A run's statistics while it logs: the covariances and where they stand."""

from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor

from logix import distributed
from logix.statistics.covariance import CovarianceState
from logix.storage.session import LogSession


class RunStatistics:
    """`state` (a CovarianceState), `loaded`: put there by initialize_from_log (they join the
    log's saved statistics at the first writing step), `unreduced`: collected since the last
    all-reduce across ranks."""

    def __init__(self, device) -> None:
        self.state = CovarianceState(device=device)
        self.loaded = False
        self.unreduced = False

    def load(self, tensors: Dict[str, Tensor]) -> None:
        self.state.load_state_dict(tensors)
        self.loaded = True

    def hand_over(self, session: LogSession, kinds: frozenset) -> None:
        """A step that writes and collects `kinds`: loaded statistics join this session's once,
        after the all-reduce at finalize (every rank loaded them): statistics/resume.py."""
        if self.loaded and kinds:
            session.resumed_state = self.state.state_dict()
            self.state.clear()
            self.loaded = False

    def reduce(self) -> bool:
        """All-reduce what was collected since the last reduce (a collective: every rank calls
        it); whether there was any."""
        if not distributed.any_rank(self.unreduced):
            return False
        self.state.all_reduce()
        self.unreduced = False
        return True

    def fresh(self) -> CovarianceState:
        """Empty statistics on the same device (a checkpoint block's)."""
        return CovarianceState(device=self.state.device)


def device_of(cpu_offload: bool):
    return torch.device("cpu") if cpu_offload else None

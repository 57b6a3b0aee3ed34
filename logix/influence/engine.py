"""Streaming influence: score query gradients against every logged training row."""

from __future__ import annotations

from typing import Optional

import torch

from logix.errors import UsageError
from logix.log import StepLog
from logix.storage.reader import LogReader


class InfluenceEngine:
    def __init__(self, run) -> None:
        self.run = run

    def compute_influence_all(self, src_log: Optional[StepLog] = None, loader=None,
                              precondition: bool = False, **kwargs) -> dict:
        src_log = src_log if src_log is not None else self.run.get_log()
        reader = loader if isinstance(loader, LogReader) else self.run.reader()
        if src_log.modules != reader.manifest.modules:
            raise UsageError("The query log's modules or ranks differ from the saved log's.")
        queries = src_log.grads.float()
        scores, tgt_ids = [], []
        for ids, block in reader.blocks(reader.block_rows):
            scores.append(queries @ block.to(queries.device, torch.float32).T)
            tgt_ids.extend(ids)
        influence = torch.cat(scores, 1) if scores else queries.new_zeros(len(src_log), 0)
        return {"src_ids": list(src_log.data_ids), "tgt_ids": tgt_ids, "influence": influence}

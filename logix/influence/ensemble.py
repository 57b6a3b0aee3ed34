"""Checkpoint ensembles: influence averaged over the checkpoints logged with `run.checkpoint`.

    score_i = 1/C sum_c q_c^T (H_c + lambda_c I)^-1 g_{i,c}

with each checkpoint's own curvature H_c (its statistics, or its rows for ekfac / lissa), its
logged rows g_{i,c} and the query gradient q_c at that checkpoint's weights (or one query log for
every checkpoint). An example a checkpoint did not log contributes nothing there. TracIn-CP
(logix.influence.tracin) is the same sum with weights lr_c, no curvature and plain dot products.
Every checkpoint is scored by streaming its shards, as `compute_influence_all` does.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional, Union

import torch

from logix.errors import UsageError
from logix.log import StepRows
from logix.storage import state
from logix.statistics.covariance import CovarianceState
from logix.storage.reader import LogReader


def checkpoint_influence(attributor, queries: Union[StepRows, Mapping[str, StepRows]],
                         weight: Callable[[dict, int], float], method: str,
                         mode: Optional[str] = None, hessian: Optional[str] = None,
                         damping: Union[None, str, float] = None, block_rows: Optional[int] = None,
                         progress: bool = True) -> dict:
    """sum_c weight(info_c, C) x (checkpoint c's influence scores) over every logged checkpoint.

    attributor: the project's `Attributor` (its config and folder); queries: one StepRows for
    every checkpoint, or {checkpoint name: StepRows} with one per checkpoint (the same query ids,
    in the same order). Returns {"src_ids", "tgt_ids", "influence" [n_query, n_train], "meta"};
    columns in order of first appearance across checkpoints.
    """
    manifest = attributor.reader().manifest
    names = list(manifest.checkpoints)
    if not names:
        raise UsageError(f"method={method!r} needs checkpoints: log each one inside `with "
                         "run.checkpoint(name, segment=..., lr=..., steps=...)`.")
    per_checkpoint = _queries_by_checkpoint(queries, names, method)
    first = per_checkpoint[names[0]]
    columns: Dict = {}
    parts, dampings = [], {}
    for name in names:
        reader = LogReader(attributor.project_dir, manifest, checkpoint=name,
                           verify=attributor.influence_config.verify)
        tensors, _ = state.load_checkpoint_statistics(attributor.project_dir, name)
        statistics = CovarianceState()
        statistics.load_state_dict(tensors)
        scorer = type(attributor)(attributor.project_dir, attributor.influence_config,
                                  statistics=statistics, reader=reader,
                                  project=attributor.project)
        result = scorer.influence(per_checkpoint[name], mode=mode, hessian=hessian,
                                  damping=damping, block_rows=block_rows, progress=progress)
        for i in result["tgt_ids"]:
            columns.setdefault(i, len(columns))
        parts.append((result["tgt_ids"], result["influence"],
                      weight(manifest.checkpoints[name], len(names))))
        dampings[name] = result["meta"]["damping"]
        meta = result["meta"]
    scores = torch.zeros(len(first), len(columns), dtype=torch.float64)
    for ids, influence, w in parts:
        index = torch.tensor([columns[i] for i in ids], dtype=torch.long)
        scores.index_add_(1, index, influence.double() * w)
    meta = {**meta, "method": method, "damping": dampings, "checkpoints": names,
            "weights": {n: p[2] for n, p in zip(names, parts)}}
    meta.pop("solver", None)
    return {"src_ids": list(first.data_ids), "tgt_ids": list(columns),
            "influence": scores.float(), "meta": meta}


def ensemble_influence(attributor, queries, mode: Optional[str] = None,
                       hessian: Optional[str] = None, damping: Union[None, str, float] = None,
                       block_rows: Optional[int] = None, progress: bool = True) -> dict:
    """Influence averaged over the logged checkpoints, each with its own curvature."""
    return checkpoint_influence(attributor, queries, lambda info, count: 1.0 / count,
                                "ensemble", mode, hessian, damping, block_rows, progress)


def _queries_by_checkpoint(queries, names: List[str], method: str) -> Dict[str, StepRows]:
    if isinstance(queries, StepRows):
        return {name: queries for name in names}
    missing = [n for n in names if n not in queries]
    extra = [n for n in queries if n not in names]
    if missing or extra:
        raise UsageError(f"method={method!r} with one query log per checkpoint needs exactly the "
                         f"logged checkpoints {names}; missing {missing}, unknown {extra}. Or "
                         "pass one StepRows for every checkpoint.")
    ids = list(queries[names[0]].data_ids)
    for name in names[1:]:
        if list(queries[name].data_ids) != ids:
            raise UsageError(f"method={method!r}: the query log of checkpoint {name!r} has ids "
                             f"{list(queries[name].data_ids)[:5]}..., checkpoint {names[0]!r}'s "
                             f"{ids[:5]}...: log the same queries, in the same order, at every "
                             "checkpoint.")
    return dict(queries)

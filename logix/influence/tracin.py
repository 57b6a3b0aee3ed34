"""TracIn-CP (Pruthi et al., 2020): learning-rate-weighted gradient dot products summed over the
checkpoints logged with `run.checkpoint`,

    score_i = sum_c lr_c q_c . g_{i,c}

q_c the query gradient at checkpoint c (or one query log for every checkpoint). No curvature:
a baseline for the preconditioned methods (influence, ensemble, SOURCE).
"""

from __future__ import annotations

from typing import Optional

from logix.influence.ensemble import checkpoint_influence


def tracin_influence(attributor, queries, block_rows: Optional[int] = None,
                     progress: bool = True) -> dict:
    """TracIn-CP scores over every logged checkpoint; see the module doc."""
    return checkpoint_influence(attributor, queries, lambda info, count: info["lr"], "tracin",
                                mode="dot", hessian="none", block_rows=block_rows,
                                progress=progress)

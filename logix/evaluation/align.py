"""Put influence columns in the order an evaluation expects."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from logix.storage.data_ids import normalize_data_ids


def align_scores(result: Mapping, train_ids: Sequence) -> torch.Tensor:
    """result["influence"] [n_query, n_logged] reordered to columns `train_ids` [n_query, n].

    compute_influence_all returns columns in the order the rows were logged (result["tgt_ids"]);
    LDS and brittleness index training examples by position, so align first, e.g.
    `align_scores(result, range(n_train))` when the data ids are the dataset positions.
    `train_ids` are read as `run.start(data_id=...)` reads ids (a tensor or array of ints too).
    """
    train_ids = normalize_data_ids(train_ids)
    where = {i: k for k, i in enumerate(result["tgt_ids"])}
    missing = [i for i in train_ids if i not in where]
    if missing:
        raise ValueError(f"{len(missing)} requested ids are not in the scores (e.g. "
                         f"{missing[:5]}); were they logged?")
    return result["influence"][:, [where[i] for i in train_ids]]

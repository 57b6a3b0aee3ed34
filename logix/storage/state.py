"""state/*.safetensors: the projections and statistics a later process needs to query a log."""

from __future__ import annotations

import json
import os
from typing import Dict, Tuple

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from logix.errors import LogFormatError
from logix.logra import Projection
from logix.storage.format import (PROJECTIONS_FILE, STATE_DIR, STATISTICS_FILE, atomic_write,
                                  state_key)

_P_IN, _P_OUT = "p_in", "p_out"


def save_projections(project_dir: str, projections: Dict[str, Projection], meta: dict) -> None:
    """P_in and P_out per module (identity ones are omitted), with init kind and seed."""
    tensors = {}
    for name, p in projections.items():
        if p.p_in is not None:
            tensors[state_key(name, _P_IN)] = p.p_in.detach().float().cpu().contiguous()
        if p.p_out is not None:
            tensors[state_key(name, _P_OUT)] = p.p_out.detach().float().cpu().contiguous()
    dims = {name: [p.in_dim, p.out_dim] for name, p in projections.items()}
    metadata = {"meta": json.dumps(meta), "dims": json.dumps(dims)}
    _write(project_dir, PROJECTIONS_FILE, tensors, metadata)


def load_projections(project_dir: str) -> Tuple[Dict[str, Projection], dict]:
    path = os.path.join(project_dir, STATE_DIR, PROJECTIONS_FILE)
    if not os.path.isfile(path):
        raise LogFormatError(f"{path!r} is missing: the log was not finalized. Call "
                             "run.finalize() at the end of the logging pass.")
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    dims = json.loads(metadata["dims"])
    projections = {name: Projection(tensors.get(state_key(name, _P_IN)),
                                    tensors.get(state_key(name, _P_OUT)), in_dim, out_dim)
                   for name, (in_dim, out_dim) in dims.items()}
    return projections, json.loads(metadata["meta"])


def save_statistics(project_dir: str, state: Dict[str, torch.Tensor]) -> None:
    _write(project_dir, STATISTICS_FILE, state, {})


def load_statistics(project_dir: str) -> Dict[str, torch.Tensor]:
    path = os.path.join(project_dir, STATE_DIR, STATISTICS_FILE)
    return load_file(path) if os.path.isfile(path) else {}


def _write(project_dir: str, filename: str, tensors: dict, metadata: dict) -> None:
    os.makedirs(os.path.join(project_dir, STATE_DIR), exist_ok=True)
    data = safetensors_bytes(tensors, metadata=metadata or None)
    atomic_write(os.path.join(project_dir, STATE_DIR, filename), data)


def checkpoint_file(name: str) -> str:
    return f"checkpoint-{name}.safetensors"


def save_checkpoint_statistics(project_dir: str, name: str, state: Dict[str, torch.Tensor],
                               info: dict) -> None:
    """One checkpoint's statistics, with its optimizer summary and train ids in the metadata."""
    _write(project_dir, checkpoint_file(name), state, {"checkpoint": json.dumps(info)})


def load_checkpoint_statistics(project_dir: str, name: str) -> Tuple[Dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    path = os.path.join(project_dir, STATE_DIR, checkpoint_file(name))
    if not os.path.isfile(path):
        raise LogFormatError(f"{path!r} is missing: checkpoint {name!r} was not closed (its "
                             "`with run.checkpoint(...)` block did not finish).")
    with safe_open(path, framework="pt") as f:
        info = json.loads((f.metadata() or {})["checkpoint"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, info

"""Evaluation result files: what `lds` / `linear_datamodeling_score` / `brittleness` returned,
saved as JSON for the dashboard and for later comparison (docs/evaluation.md, "Result files").

    {"format": "logix-evaluation", "format_version": 1, "kind": "lds", "name": str,
     "lds": float|null, "per_query": [float|null, ...]}
    {"format": "logix-evaluation", "format_version": 1, "kind": "brittleness", "name": str,
     "results": [{"test_index", "base_margin", "k_flip", "margins": {k: m},
                  "random_flip_fraction": {k: f}, "random_margins": {k: [m, ...]}}, ...]}

NaN is written as null (JSON has no NaN); keys k are strings, as JSON requires.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Dict, Optional

import torch

from .brittleness import BrittlenessResult

RESULTS_FORMAT = "logix-evaluation"
RESULTS_FORMAT_VERSION = 1


def save_results(path: str, result: Any, name: Optional[str] = None) -> str:
    """Write an LDS dict ({"lds", "per_query", ...}) or a list of BrittlenessResult to `path`
    (JSON, written atomically). `name`: a label for the scores evaluated (default: the file
    name). Returns the path."""
    from logix.storage.format import atomic_write

    out: Dict[str, Any] = {"format": RESULTS_FORMAT, "format_version": RESULTS_FORMAT_VERSION,
                           "name": name or os.path.splitext(os.path.basename(path))[0]}
    if isinstance(result, dict) and "lds" in result and "per_query" in result:
        out.update(kind="lds", lds=_number(result["lds"]),
                   per_query=[_number(v) for v in torch.as_tensor(result["per_query"]).tolist()])
    elif isinstance(result, (list, tuple)) and all(isinstance(r, BrittlenessResult)
                                                   for r in result):
        out.update(kind="brittleness", results=[_clean(dataclasses.asdict(r)) for r in result])
    else:
        raise TypeError(f"save_results takes what lds()/linear_datamodeling_score() return (a "
                        f"dict with 'lds' and 'per_query') or brittleness()'s list of "
                        f"BrittlenessResult; got {type(result).__name__}.")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(os.fspath(path), json.dumps(out, indent=1).encode())
    return os.fspath(path)


def load_results(path: str) -> Dict[str, Any]:
    """A result file read back as the JSON object above; ValueError if it is not one."""
    with open(path, "rb") as f:
        try:
            data = json.loads(f.read().decode("utf-8"))
        except ValueError as e:
            raise ValueError(f"{path!r} is not readable JSON: {e}") from e
    if not isinstance(data, dict) or data.get("format") != RESULTS_FORMAT:
        raise ValueError(f"{path!r} is not a LogIX evaluation result file (no 'format': "
                         f"{RESULTS_FORMAT!r}); write one with logix.evaluation.save_results.")
    version = data.get("format_version")
    if not isinstance(version, int) or version > RESULTS_FORMAT_VERSION:
        raise ValueError(f"{path!r} has result format version {version!r}; this LogIX reads up "
                         f"to {RESULTS_FORMAT_VERSION}. Upgrade LogIX.")
    if data.get("kind") not in ("lds", "brittleness"):
        raise ValueError(f"{path!r} has kind {data.get('kind')!r}; expected 'lds' or "
                         "'brittleness'.")
    return data


def _number(value) -> Optional[float]:
    value = float(value)
    return None if math.isnan(value) or math.isinf(value) else value


def _clean(value):
    """JSON-safe: dict keys as strings, tuples as lists, NaN as null."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float):
        return _number(value)
    return value

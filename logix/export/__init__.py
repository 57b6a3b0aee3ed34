"""Export a project to the experiment trackers people already use: TensorBoard, MLflow and
Weights & Biases (optional extras: pip install "logix[tensorboard]", "logix[mlflow]",
"logix[wandb]"). Each sends the log's summary, top-k tables with the examples' text, per-token
heat maps, and LDS / brittleness results (docs/export.md); no tracker is imported until used.

    logix.export.to_tensorboard("logix_logs/demo", out="logix_export/tensorboard")
    logix.export.to_mlflow("logix_logs/demo", out="logix_export/mlflow")
    logix.export.to_wandb("logix_logs/demo", out="logix_export/wandb")   # offline run
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Optional, Sequence

from logix.errors import UsageError
from logix.export.collect import Evaluation, Export, Image, Table, collect

TRACKERS = ("tensorboard", "mlflow", "wandb")
DEFAULT_OUT = "logix_export"


def to_tensorboard(project_dir: str, out: Optional[str] = None, name: Optional[str] = None,
                   scores: Optional[Sequence[str]] = None,
                   results: Optional[Sequence[str]] = None, k: int = 10, queries: int = 20,
                   heatmaps: bool = True) -> str:
    """Write a TensorBoard run (event files) under `out` (default logix_export/tensorboard);
    returns its folder. `scores` / `results`: score and evaluation result files (default: those
    in the project folder); `k` examples each way for the first `queries` queries; `heatmaps`:
    per-token heat maps of score files that have token scores (needs matplotlib)."""
    return write(_collect(project_dir, scores, results, k, queries, heatmaps), "tensorboard",
                 out, name)


def to_mlflow(project_dir: str, out: Optional[str] = None, name: Optional[str] = None,
              scores: Optional[Sequence[str]] = None, results: Optional[Sequence[str]] = None,
              k: int = 10, queries: int = 20, heatmaps: bool = True,
              tracking_uri: Optional[str] = None, experiment: Optional[str] = None) -> str:
    """Log an MLflow run; returns its run id. Store: `tracking_uri`, else SQLite in `out`
    (default logix_export/mlflow: mlflow.db and artifacts/). Experiment: the project's name
    unless `experiment`. Other arguments as `to_tensorboard`."""
    return write(_collect(project_dir, scores, results, k, queries, heatmaps), "mlflow", out,
                 name, tracking_uri=tracking_uri, experiment=experiment)


def to_wandb(project_dir: str, out: Optional[str] = None, name: Optional[str] = None,
             scores: Optional[Sequence[str]] = None, results: Optional[Sequence[str]] = None,
             k: int = 10, queries: int = 20, heatmaps: bool = True,
             project: Optional[str] = None, mode: str = "offline") -> str:
    """Log a Weights & Biases run (offline by default: `wandb sync` uploads it later) with its
    files under `out`/wandb (default logix_export/wandb); returns the run's folder. W&B project: the
    LogIX project's name unless `project`. Other arguments as `to_tensorboard`."""
    return write(_collect(project_dir, scores, results, k, queries, heatmaps), "wandb", out,
                 name, project=project, mode=mode)


def write(export: Export, to: str, out: Optional[str] = None, name: Optional[str] = None,
          **options) -> str:
    """Send a collected `Export` to tracker `to` (one of TRACKERS); `options` are that
    tracker's (mlflow: tracking_uri, experiment; wandb: project, mode). Returns what `to_<to>`
    returns."""
    if to not in TRACKERS:
        raise UsageError(f"Unknown tracker {to!r}; LogIX exports to {', '.join(TRACKERS)}.")
    module = importlib.import_module(f"logix.export.{to}")
    # wandb adds a folder of its own: logix_export/wandb/offline-run-*
    out = out or (DEFAULT_OUT if to == "wandb" else os.path.join(DEFAULT_OUT, to))
    return module.write(export, out, name, **options)


def _collect(*args) -> Export:
    """collect(), each of its notes (what was left out) raised as a warning."""
    export = collect(*args)
    for note in export.notes:
        warnings.warn(note, stacklevel=3)
    return export


__all__ = ["TRACKERS", "Evaluation", "Export", "Image", "Table", "collect", "to_mlflow",
           "to_tensorboard", "to_wandb", "write"]

"""The watched layers and their LoGra projections: what a log row is made of (its layout), and
the manifest a log of such rows starts with."""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from logix import logra
from logix.config import Config, LoggingConfig, LoraConfig
from logix.errors import UsageError
from logix.logra import HeadSplit, Projection
from logix.statistics import budget
from logix.statistics.covariance import CovarianceState
from logix.statistics.live import RunStatistics
from logix.storage import state
from logix.storage.format import DTYPES
from logix.storage.manifest import Manifest, ModuleEntry
from logix.tracking.capture import CaptureSpec, GradientCapture, RowLayout
from logix.tracking.modules import TrackedModule


class TrackedLayers:
    """`modules` (name -> TrackedModule) and their `projections`, with `projection_meta` (init,
    seed, fingerprint, the layers split over attention heads) and what add_lora() used
    (`lora_used`, for the config snapshot)."""

    def __init__(self, seed: int) -> None:
        self.modules: Dict[str, TrackedModule] = {}
        self.splits: Dict[str, HeadSplit] = {}
        self.projections: Dict[str, Projection] = {}
        self.projection_meta: Dict = {"init": "none", "seed": seed}
        self.lora_used: Optional[dict] = None
        self._on_device: Dict[tuple, Projection] = {}
        self._layout: Optional[tuple] = None  # (projections it was computed for, entries)
        self._row_layout: Optional[tuple] = None  # (layout entries, RowLayout)

    def watch(self, modules: Dict[str, TrackedModule], seed: int,
              heads: Optional[Dict[str, HeadSplit]] = None) -> None:
        """Track `modules`, unprojected; `heads` (layer name -> HeadSplit) split over heads."""
        self.splits = _checked_splits(heads or {}, modules)
        self.modules = modules
        self.use({n: logra.identity(m.in_dim, m.out_dim) for n, m in modules.items()}, "none",
                 seed, heads={n: {**s.to_dict(), "rank": None} for n, s in self.splits.items()})

    def add_lora(self, lora: LoraConfig, seed: int, init: Optional[str], rank: Optional[int],
                 rank_in: Optional[int], rank_out: Optional[int],
                 statistics: RunStatistics) -> None:
        """A LoGra projection per layer (logix.logra; init default lora.init). PCA reads the
        covariances of `statistics`, all-reduced first so that every rank derives the same
        projection."""
        if not self.modules:
            raise UsageError("add_lora() needs watched layers: call run.watch(model) first, or "
                             "pass the model: run.add_lora(model).")
        init = init or lora.init
        r_in, r_out = logra.resolve_ranks(lora, rank, rank_in, rank_out)  # refused before PCA's
        if init == "pca":
            if self.projection_meta["init"] != "none":
                raise UsageError("add_lora(init='pca') must come before any other add_lora(): "
                                 "PCA needs covariances of the unprojected layers.")
            statistics.reduce()
        dims = {name: (m.in_dim, m.out_dim) for name, m in self.modules.items()}
        splits = {n: (s, self.modules[n].has_bias) for n, s in self.splits.items()}
        projections, heads = logra.build_projections(dims, init, r_in, r_out, seed,
                                                     statistics.state.get, splits)
        self.use(projections, init, seed, lora_used={
            "init": init, "rank": rank if rank is not None else lora.rank, "rank_in": r_in,
            "rank_out": r_out}, heads=heads)

    def use(self, projections: Dict[str, Projection], init: str, seed: int,
            lora_used: Optional[dict] = None, heads: Optional[Dict[str, dict]] = None) -> None:
        meta = {"init": init, "seed": seed, "checksum": logra.fingerprint(projections)}
        if heads:
            meta["heads"] = heads
        self.set_projections(projections, meta, lora_used)

    def set_projections(self, projections: Dict[str, Projection], meta: Dict,
                        lora_used: Optional[dict] = None) -> None:
        self.projections, self.projection_meta, self.lora_used = projections, meta, lora_used
        self._on_device.clear()

    def layout(self) -> List[ModuleEntry]:
        """Each module's slice of a log row (cached until the projections change)."""
        cached = self._layout
        if cached is not None and cached[0] is self.projections:
            return cached[1]
        entries, offset = [], 0
        for name, projection in self.projections.items():
            tracked = self.modules[name]
            entries.append(ModuleEntry(name=name, type=tracked.type_name, in_dim=tracked.in_dim,
                                       out_dim=tracked.out_dim, rank_in=projection.rank_in,
                                       rank_out=projection.rank_out, offset=offset,
                                       bias=tracked.has_bias))
            offset += projection.dim
        self._layout = (self.projections, entries)
        return entries

    def row_layout(self) -> RowLayout:
        """Where the hooks write each module's projected gradient, cached with layout()."""
        entries = self.layout()
        if self._row_layout is None or self._row_layout[0] is not entries:
            self._row_layout = (entries, RowLayout(
                {e.name: (e.offset, e.rank_out, e.rank_in) for e in entries}))
        return self._row_layout[1]

    def projection_for(self, name: str, device: torch.device, dtype: torch.dtype) -> Projection:
        key = (name, device, dtype)
        if key not in self._on_device:
            self._on_device[key] = self.projections[name].to(device=device, dtype=dtype)
        return self._on_device[key]

    def capture(self, spec: CaptureSpec, device, examples: int) -> GradientCapture:
        """Hooks whose statistics stay apart and whose rows nobody keeps (resource_plan times
        them)."""
        return GradientCapture(self.modules, self.projection_for, spec,
                               CovarianceState(device=device), self.row_layout(),
                               examples=examples)

    def rows_per_shard(self, cfg: LoggingConfig) -> int:
        dim = sum(p.dim for p in self.projections.values())
        return cfg.shard_rows or max(1, cfg.flush_threshold // max(dim, 1))

    def check_memory(self, spec: CaptureSpec, cfg: LoggingConfig,
                     device: Optional[torch.device]) -> None:
        """Refuse statistics and row buffers beyond logging.max_statistics_bytes before they are
        allocated (see logix.statistics.budget)."""
        if not self.modules:
            return
        limit = cfg.max_statistics_bytes
        if limit is None:
            weight = next(iter(self.modules.values())).module.weight
            limit = budget.default_budget(device or weight.device)
        budget.check(budget.sizes(self.layout(), spec, self.rows_per_shard(cfg),
                                  DTYPES[cfg.log_dtype].itemsize), limit)

    # ------------------------------------------------------------------ the log's description
    def config_snapshot(self, config: Config) -> dict:
        """The config as used: add_lora's own init and ranks replace the config's lora keys."""
        snapshot = config.to_dict()
        if self.lora_used is not None:
            snapshot["lora"] = dict(self.lora_used)
        return snapshot

    def manifest(self, project: str, config: Config) -> Manifest:
        return Manifest(project=project, dtype=config.logging.log_dtype, modules=self.layout(),
                        projection=dict(self.projection_meta),
                        config=self.config_snapshot(config))

    def load(self, manifest: Manifest, projections: Dict[str, Projection], meta: Dict) -> None:
        """Take a saved log's projections (initialize_from_log): the watched layers must be the
        log's, in its order and shapes."""
        names = [m.name for m in manifest.modules]
        missing = sorted(set(names) - set(self.modules))
        extra = sorted(set(self.modules) - set(names))
        if missing or extra:
            raise UsageError(f"The watched layers differ from the log's: missing {missing}, "
                             f"not in the log {extra}. Watch with the logging run's filters.")
        self.modules = {n: self.modules[n] for n in names}
        self.splits = {n: split for n, (split, _) in logra.head_splits(meta).items()}
        self.set_projections({n: projections[n] for n in names}, meta, self.lora_used)

    def reopen(self, project_dir: str) -> Manifest:
        """Take the projections of the log in `project_dir` (run.initialize_from_log), the
        watched layers checked against it; its manifest."""
        if not self.modules:
            raise UsageError("initialize_from_log() needs the model: call run.watch(model) "
                             "first, with the same filters as the logging run.")
        manifest = Manifest.load(project_dir)
        self.load(manifest, *state.load_projections(project_dir))
        self.check_same_as(manifest)
        return manifest

    def check_same_as(self, manifest: Manifest) -> None:
        for ours, logged in zip(self.layout(), manifest.modules):
            if ours != logged:
                raise UsageError(
                    f"The watched layer {ours.name!r} differs from the log's: watched "
                    f"{_shape(ours)}, logged {_shape(logged)}. Load the same model architecture "
                    "(and logging.include_bias) as the logging run.")


def _checked_splits(heads: Dict[str, object], modules: Dict[str, TrackedModule]
                    ) -> Dict[str, HeadSplit]:
    """`heads` as {watched layer: HeadSplit} (an int n stands for HeadSplit(n)), each checked
    against its layer's gradient shape."""
    if not isinstance(heads, dict):
        raise UsageError(f"heads= takes {{layer name: HeadSplit or number of heads}}, got "
                         f"{heads!r}; logix.text.attention_heads(model) builds it.")
    splits = {}
    for name, split in heads.items():
        if name not in modules:
            raise UsageError(f"heads= names {name!r}, which is not a watched layer; watched: "
                             f"{sorted(modules)[:8]}{' ...' if len(modules) > 8 else ''}.")
        split = HeadSplit(split) if isinstance(split, int) and not isinstance(split, bool) \
            else split
        if not isinstance(split, HeadSplit):
            raise UsageError(f"heads[{name!r}] must be a logix.logra.HeadSplit or a number of "
                             f"heads, got {split!r}.")
        tracked = modules[name]
        split.head_of(tracked.out_dim if split.side == "out" else tracked.in_dim,
                      tracked.has_bias)  # refuses a width the heads do not divide
        splits[name] = split
    return splits


def _shape(entry: ModuleEntry) -> str:
    return (f"{entry.type} in_dim={entry.in_dim} out_dim={entry.out_dim} rank_in={entry.rank_in} "
            f"rank_out={entry.rank_out} bias={entry.bias} offset={entry.offset}")

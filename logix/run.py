"""Run: the object users touch. It wires tracking, LoGra, statistics and storage together."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import warnings
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from logix import distributed, logra
from logix.config import Config
from logix.errors import ConfigError, UsageError
from logix.influence import curvature
from logix.influence.attributor import Attributor
from logix.log import StepLog
from logix.logra import Projection
from logix.statistics.covariance import BACKWARD, FORWARD, GRAD, CovarianceState
from logix.storage import state
from logix.storage.format import DTYPES, STATE_DIR, STATISTICS_FILE
from logix.storage.manifest import (Manifest, ModuleEntry, ShardEntry, append_rank_index,
                                    load_optional)
from logix.storage.reader import LogReader
from logix.storage.writer import ShardWriter
from logix.tracking.capture import GradientCapture, Plan
from logix.tracking.data_ids import normalize_data_ids
from logix.tracking.modules import TrackedModule, supported_types, tracked_class

logger = logging.getLogger("logix")

# What `run.setup` accepts per stage; old LogIX spellings map onto these.
_SETUP_CHOICES = {"forward": {"covariance"}, "backward": {"covariance"},
                  "grad": {"log", "covariance"}}
_SETUP_ALIASES = {"cov": "covariance", "save": "log"}
_FLOAT16_MAX = 65504.0


class Run:
    """One logging project: `logix.init(project)` returns it.

    Train time: `watch` a model, optionally `add_lora`, `setup` what to collect, `save(True)`,
    then `start(data_id=...)` / `end()` around each step (or `with run(data_id=...):`) and
    `finalize()` at the end. Query time: the same hooks give a test log (`get_log()`) that
    `compute_influence_all` scores against every logged training example.
    """

    def __init__(self, project: str, config: Config) -> None:
        if not project or not isinstance(project, str) or os.sep in project:
            raise ConfigError(f"project must be a non-empty folder name, got {project!r}.")
        self.project = project
        self.config = copy.deepcopy(config)  # the run may declare its curvature in it
        self.project_dir = os.path.join(config.root_dir, project)
        self.modules: Dict[str, TrackedModule] = {}
        self.projections: Dict[str, Projection] = {}
        self.projection_meta: Dict = {"init": "none", "seed": config.seed}
        self.statistics = CovarianceState(
            device=torch.device("cpu") if config.logging.cpu_offload else None)
        self.plan = Plan(log_grad=True)
        self._save = False
        self._capture: Optional[GradientCapture] = None
        self._step_ids: Optional[List] = None
        self._step_scale = 1.0
        self._last_log: Optional[StepLog] = None
        self._writer: Optional[ShardWriter] = None
        self._manifest: Optional[Manifest] = None
        self._on_device: Dict[tuple, Projection] = {}
        self._needs_reduce = False
        self._influence = None
        self._checkpoint: Optional[str] = None
        self._checkpoint_ids: Optional[set] = None  # train_ids of the open checkpoint block
        self._logged_ids: Optional[set] = None  # (checkpoint, data id) already in the log
        self._layout: Optional[tuple] = None  # (projections it was computed for, entries)

    # ------------------------------------------------------------------ what to track
    def watch(self, model: nn.Module, name_filter: Union[None, Sequence[str], Callable] = None,
              type_filter: Optional[Sequence[type]] = None) -> "Run":
        """Track every supported layer of `model` whose name and type pass the filters.

        name_filter: substrings (a layer is kept if any occurs in its name) or a predicate on the
        name. type_filter: layer classes to keep. Parameters' requires_grad is never changed.
        """
        model = _unwrap(model)
        if self._writer is not None and self._writer.pending_rows + len(self._manifest.shards):
            raise UsageError("watch() after rows were logged would change the row layout. "
                             "Finish this project (run.finalize()) and start a new one.")
        modules = {}
        for name, module in model.named_modules():
            klass = tracked_class(module)
            if klass is None or not _passes(name, module, name_filter, type_filter):
                continue
            modules[name] = klass(name, module, self.config.logging.include_bias)
        if not modules:
            raise UsageError(
                f"No supported layers matched in {type(model).__name__} (name_filter="
                f"{name_filter!r}, type_filter={type_filter!r}). LogIX tracks: "
                f"{supported_types()}. Loosen the filters, or subclass "
                "logix.tracking.modules.TrackedModule for a custom layer type.")
        self.modules = modules
        self.projections = {n: logra.identity(m.in_dim, m.out_dim) for n, m in modules.items()}
        self.projection_meta = {"init": "none", "seed": self.config.seed,
                                "checksum": logra.fingerprint(self.projections)}
        self._on_device.clear()
        self.statistics.clear()
        logger.info("LogIX watches %d layers of %s", len(modules), type(model).__name__)
        return self

    def add_lora(self, model: Optional[nn.Module] = None, watch: bool = True, clear: bool = True,
                 type_filter=None, name_filter=None, init: Optional[str] = None,
                 rank: Optional[int] = None, rank_in: Optional[int] = None,
                 rank_out: Optional[int] = None) -> "Run":
        """Give every watched layer a LoGra projection (init "random" or "pca").

        PCA needs forward and backward covariances from an earlier pass without projections.
        Statistics collected so far belong to the old space and are reset (`clear` is kept for
        LogIX compatibility and must stay True).
        """
        if model is not None and (watch or not self.modules):
            self.watch(model, name_filter=name_filter, type_filter=type_filter)
        if not self.modules:
            raise UsageError("add_lora() needs watched layers: call run.watch(model) first, or "
                             "pass the model: run.add_lora(model).")
        if not clear:
            raise UsageError("add_lora(clear=False) would keep statistics of the unprojected "
                             "space next to projected ones; they cannot be mixed.")
        lora = self.config.lora
        init = init or lora.init
        if init not in ("random", "pca"):
            raise ConfigError(f"add_lora init={init!r}; allowed values: ['random', 'pca'].")
        r_in = rank_in or rank or lora.rank_in or lora.rank
        r_out = rank_out or rank or lora.rank_out or lora.rank
        if init == "pca" and distributed.any_rank(self._needs_reduce):
            self.statistics.all_reduce()  # every rank derives the same projection
            self._needs_reduce = False
        projections = {}
        for name, tracked in self.modules.items():
            if init == "random":
                projections[name] = logra.random_projection(
                    name, tracked.in_dim, tracked.out_dim, r_in, r_out, self.config.seed)
            else:
                projections[name] = self._pca_projection(name, r_in, r_out)
        self.projections = projections
        self.projection_meta = {"init": init, "seed": self.config.seed,
                                "checksum": logra.fingerprint(projections)}
        self._on_device.clear()
        self.statistics.clear()
        return self

    def _pca_projection(self, name: str, r_in: int, r_out: int) -> Projection:
        if self.projection_meta["init"] != "none":
            raise UsageError("add_lora(init='pca') must come before any other add_lora(): PCA "
                             "needs covariances of the unprojected layers.")
        forward = self.statistics.get(name, FORWARD)
        backward = self.statistics.get(name, BACKWARD)
        if forward is None or backward is None:
            raise UsageError(
                f"add_lora(init='pca') needs forward and backward covariances of {name!r}. Run "
                "one pass first with run.setup({'forward': ['covariance'], 'backward': "
                "['covariance']}) and start()/end() around each step, then call add_lora.")
        return logra.pca_projection(forward, backward, r_in, r_out)

    def setup(self, spec: Dict[str, Iterable[str]]) -> "Run":
        """What each step collects, e.g. {"grad": ["log", "covariance"], "forward":
        ["covariance"], "backward": ["covariance"]}."""
        if not isinstance(spec, dict):
            raise ConfigError(f"setup() takes a dict like {{'grad': ['log']}}, got {spec!r}.")
        chosen = {}
        for stage, items in spec.items():
            if stage not in _SETUP_CHOICES:
                raise ConfigError(f"setup() stage {stage!r} is unknown; allowed stages: "
                                  f"{sorted(_SETUP_CHOICES)}.")
            if isinstance(items, str):
                items = [items]
            for item in items:
                item = _SETUP_ALIASES.get(item, item)
                if item not in _SETUP_CHOICES[stage]:
                    raise ConfigError(f"setup() {stage!r}: {item!r} is not supported; allowed: "
                                      f"{sorted(_SETUP_CHOICES[stage])}.")
                chosen[(stage, item)] = True
        self.plan = Plan(log_grad=("grad", "log") in chosen,
                         grad_covariance=("grad", "covariance") in chosen,
                         forward_covariance=("forward", "covariance") in chosen,
                         backward_covariance=("backward", "covariance") in chosen)
        return self

    def declare_curvature(self, hessian: str) -> "Run":
        """The curvature queries use unless told otherwise (`influence.hessian`; 'auto' picks
        the best the statistics allow). `LogIXScheduler` declares its `hessian`; the manifest's
        config snapshot keeps it for later processes."""
        self.config.influence.hessian = curvature.check(hessian)
        return self

    def save(self, enabled: bool = True) -> "Run":
        """Write logged gradients to disk (True) or only keep the last step in memory (False)."""
        self._save = bool(enabled)
        return self

    @property
    def saving(self) -> bool:
        """Whether end() writes logged rows to disk (see save())."""
        return self._save

    def eval(self) -> "Run":
        """Query mode: log gradients in memory only; no statistics, nothing written."""
        self._save = False
        self.plan = Plan(log_grad=True)
        return self

    # ------------------------------------------------------------------ per step
    def start(self, data_id, mask: Optional[Tensor] = None, scale: float = 1.0) -> None:
        """Attach hooks for one step. `mask` [batch, tokens] zeroes padding tokens; `scale`
        multiplies the logged gradients (e.g. the batch size when the loss is a mean)."""
        if self._capture is not None:
            raise UsageError("start() called twice without end(): call run.end() after each "
                             "step's backward pass.")
        if not self.modules:
            raise UsageError("Nothing is watched: call run.watch(model) before run.start().")
        ids = normalize_data_ids(data_id)
        if mask is not None and not isinstance(mask, Tensor):
            raise UsageError(f"mask must be a tensor [batch, tokens], got {type(mask).__name__}.")
        # The step's forward/backward statistics stay apart until end() keeps the step.
        step_statistics = CovarianceState(device=self.statistics.device)
        self._capture = GradientCapture(self.modules, self._projection_for, self.plan,
                                        step_statistics, mask, examples=len(ids)).__enter__()
        self._step_ids, self._step_scale = ids, scale

    def end(self) -> None:
        """Detach hooks, assemble the step's rows, update statistics and queue rows for disk."""
        capture = self._capture
        if capture is None:
            raise UsageError("end() called without start(): call run.start(data_id=...) before "
                             "the forward pass.")
        capture.__exit__(None, None, None)
        self._capture = None
        ids = self._step_ids
        if self._writer is not None:
            self._writer.raise_if_failed()
        if self._checkpoint_ids is not None:
            outside = [i for i in ids if i not in self._checkpoint_ids]
            if outside:
                raise UsageError(
                    f"checkpoint({self._checkpoint!r}) was given train_ids, and this step logs "
                    f"ids outside them ({outside[:5]}); the segment's curvature would include "
                    "examples it did not train on. Log only train_ids inside the block.")
        if capture.mask is not None and capture.batch_size is not None \
                and not capture.mask_matched:
            raise UsageError(f"mask of shape {tuple(capture.mask.shape)} lines up with no tracked "
                             "layer's input [batch, tokens, ...]; pass the attention mask of "
                             "this batch.")
        if not self.plan.needs_grad:
            self._keep_statistics(capture.statistics)
            return
        if capture.batch_size is None or not capture.grads:
            raise UsageError("No gradient reached the tracked layers between start() and end(). "
                             "Call loss.backward() before run.end(), outside torch.no_grad().")
        if len(ids) != capture.batch_size:
            raise UsageError(f"data_id names {len(ids)} examples but the batch has "
                             f"{capture.batch_size}; pass one id per example.")
        rows = self._assemble(capture)  # [B, dim] float32
        if not bool(torch.isfinite(rows.sum())) and not bool(torch.isfinite(rows).all()):
            bad = [ids[i] for i in (~torch.isfinite(rows).all(1)).nonzero().flatten().tolist()]
            if self.config.logging.nonfinite == "error":
                raise UsageError(f"NaN or inf gradients for data ids {bad[:5]}; nothing of this "
                                 "step was logged. Set logging.nonfinite: skip to drop such "
                                 "steps with a warning.")
            warnings.warn(f"Skipped a step with NaN or inf gradients (ids {bad[:5]}).")
            return
        if self._save and self.config.logging.log_dtype == "float16" \
                and float(rows.abs().max()) > _FLOAT16_MAX:
            raise UsageError(f"Gradients of this step reach {float(rows.abs().max()):.3g}, beyond "
                             f"float16's range ({_FLOAT16_MAX:g}): they would be stored as inf. "
                             "Use logging.log_dtype: bfloat16 (same size, float32's range).")
        keep = []
        if self._save and self.plan.log_grad:  # refusals come before anything of the step is kept
            writer = self._ensure_writer()  # a log of another layout or dtype
            keep = self._unseen(ids)  # ids already logged, by logging.on_duplicate
        self._keep_statistics(capture.statistics)
        if self.plan.grad_covariance:
            for entry in self.layout():
                self.statistics.update(entry.name, GRAD, rows[:, entry.columns], rows.shape[0])
        self._last_log = StepLog(ids, rows, self.layout(), dict(self.projection_meta))
        if keep:
            if len(keep) < len(ids):
                ids, rows = [ids[k] for k in keep], rows[keep]
            writer.append(ids, rows)  # cast to the log dtype while copied into the shard

    def _unseen(self, ids: List) -> List[int]:
        """Positions of ids not yet in this log (per checkpoint), by logging.on_duplicate."""
        if self._logged_ids is None:
            reader = self.reader()
            self._logged_ids = {(s.checkpoint, i) for s in reader.manifest.shards
                                for i in reader.shard_ids(s)}
        policy = self.config.logging.on_duplicate
        keep = [k for k, i in enumerate(ids) if (self._checkpoint, i) not in self._logged_ids]
        if len(keep) < len(ids) and policy != "allow":
            seen = [i for k, i in enumerate(ids) if k not in set(keep)]
            if policy == "error":
                raise UsageError(f"data ids {seen[:5]} are already in this log (project "
                                 f"{self.project!r}); nothing of this step was written. Set "
                                 "logging.on_duplicate to 'skip' or 'allow', or use new ids.")
            warnings.warn(f"Skipped {len(seen)} rows whose data ids are already logged (e.g. "
                          f"{seen[:3]}); logging.on_duplicate='allow' keeps them.")
        if policy == "allow":
            keep = list(range(len(ids)))
        self._logged_ids.update((self._checkpoint, ids[k]) for k in keep)
        return keep

    def _keep_statistics(self, step: CovarianceState) -> None:
        self.statistics.merge(step)
        if self.plan.forward_covariance or self.plan.backward_covariance \
                or self.plan.grad_covariance:
            self._needs_reduce = True

    def _assemble(self, capture: GradientCapture) -> Tensor:
        parts = []
        reference = next(iter(capture.grads.values()))
        for name, projection in self.projections.items():
            grad = capture.grads.get(name)
            if grad is None:  # layer unused in this step: its gradient is zero
                grad = reference.new_zeros(reference.shape[0], projection.dim)
            parts.append(grad.reshape(grad.shape[0], -1))
        rows = torch.cat(parts, 1)
        return rows * self._step_scale if self._step_scale != 1.0 else rows

    @contextlib.contextmanager
    def __call__(self, data_id, mask: Optional[Tensor] = None, scale: float = 1.0):
        """`with run(data_id=ids, mask=attention_mask): loss.backward()`."""
        self.start(data_id, mask=mask, scale=scale)
        try:
            yield self
        except BaseException:
            if self._capture is not None:
                self._capture.__exit__(None, None, None)
                self._capture = None
            raise
        self.end()

    @contextlib.contextmanager
    def checkpoint(self, name: str, segment: int, lr: float, steps: int, momentum: float = 0.0,
                   train_ids: Optional[Sequence] = None):
        """Log one training checkpoint for SOURCE (`compute_influence_all(method="source")`).

        Load the checkpoint's weights, then run an ordinary logging pass inside this block.
        segment: the training stage it belongs to (0 = earliest); lr, steps, momentum: that
        segment's optimizer summary (effective step lr / (1 - momentum), `steps` updates);
        train_ids: the examples the segment trained on (default: every id logged in it). Rows
        and statistics are kept apart from other checkpoints', named in the manifest.
        """
        _check_checkpoint_args(name, segment, lr, steps, momentum)
        if self._checkpoint is not None:
            raise UsageError(f"checkpoint({name!r}) inside checkpoint({self._checkpoint!r}): "
                             "close one checkpoint block before opening the next.")
        self.flush()
        known = self._manifest or load_optional(self.project_dir)
        if known is not None and name in known.checkpoints:
            raise UsageError(f"Checkpoint {name!r} is already in this log; use a new name.")
        writer = self._ensure_writer() if self._save else None
        outer = self.statistics
        self.statistics = CovarianceState(device=outer.device)
        self._checkpoint = name
        self._checkpoint_ids = None if train_ids is None else set(normalize_data_ids(train_ids))
        if writer is not None:
            writer.tag = name
        try:
            yield self
            self.flush()
        finally:
            if writer is not None:
                writer.tag = None
            inner, self.statistics, self._checkpoint = self.statistics, outer, None
            self._checkpoint_ids = None
        inner.all_reduce()
        info = {"segment": int(segment), "lr": float(lr), "steps": int(steps),
                "momentum": float(momentum),
                "train_ids": None if train_ids is None else normalize_data_ids(train_ids)}
        if writer is not None and distributed.rank() == 0:
            state.save_checkpoint_statistics(self.project_dir, name, inner.state_dict(), info)
            self._manifest.checkpoints[name] = {k: v for k, v in info.items() if k != "train_ids"}
            self._manifest.save(self.project_dir)

    def get_log(self, copy: bool = False) -> StepLog:
        """The last step's projected gradients (a query's test log)."""
        if self._last_log is None:
            raise UsageError("No step has been logged yet: run start()/backward()/end() first.")
        return self._last_log.clone() if copy else self._last_log

    def clear(self) -> None:
        """Forget statistics and the last step (nothing on disk changes)."""
        if self._capture is not None:
            self._capture.__exit__(None, None, None)
            self._capture = None
        self.statistics.clear()
        self._last_log = None

    # ------------------------------------------------------------------ layout and disk
    def layout(self) -> List[ModuleEntry]:
        """Each watched module's slice of a log row (cached until the projections change)."""
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

    def _projection_for(self, name: str, device: torch.device, dtype: torch.dtype) -> Projection:
        key = (name, device, dtype)
        if key not in self._on_device:
            self._on_device[key] = self.projections[name].to(device=device, dtype=dtype)
        return self._on_device[key]

    def _new_manifest(self) -> Manifest:
        return Manifest(project=self.project, dtype=self.config.logging.log_dtype,
                        modules=self.layout(), projection=dict(self.projection_meta),
                        config=self.config.to_dict())

    def _ensure_writer(self) -> ShardWriter:
        if self._writer is not None:
            return self._writer
        os.makedirs(self.project_dir, exist_ok=True)
        manifest = self._new_manifest()
        existing = load_optional(self.project_dir)
        if existing is not None and not existing.shards:
            existing = None  # e.g. finalize() after a PCA pass: no rows to stay compatible with
        if existing is not None:
            existing.check_compatible(manifest)
            manifest.shards, manifest.checkpoints = existing.shards, existing.checkpoints
        self._manifest = manifest
        if distributed.rank() == 0:  # the layout is readable before the first shard lands
            self._save_projections()
            manifest.save(self.project_dir)
        cfg = self.config.logging
        dim = sum(p.dim for p in self.projections.values())
        rows_per_shard = cfg.shard_rows or max(1, cfg.flush_threshold // max(dim, 1))
        self._writer = ShardWriter(self.project_dir, distributed.rank(), rows_per_shard, dim,
                                   DTYPES[cfg.log_dtype], self._on_shard,
                                   num_workers=cfg.num_workers, queue_size=cfg.queue_size)
        return self._writer

    def _on_shard(self, entry: ShardEntry) -> None:
        """A shard is complete: list it in this rank's index (manifest.json is rewritten only at
        finalize, so the cost per shard stays constant)."""
        append_rank_index(self.project_dir, entry)
        self._manifest.shards.append(entry)
        self._manifest.shards.sort(key=lambda s: (s.rank, s.seq))

    def _save_projections(self) -> None:
        state.save_projections(self.project_dir, self.projections, self.projection_meta)

    def flush(self) -> None:
        """Write every buffered row to disk now."""
        if self._writer is not None:
            self._writer.flush()

    def finalize(self) -> None:
        """Flush the writer, reduce statistics across processes, save state and manifest.
        Safe to call more than once."""
        if self._capture is not None:
            raise UsageError("finalize() inside a step: call run.end() first.")
        if self._writer is not None:
            self._writer.close()  # writes every buffered row, then stops the writer threads
        distributed.barrier()  # every rank's shards are on disk and in its index
        if distributed.any_rank(self._needs_reduce):
            self.statistics.all_reduce()
            self._needs_reduce = False
            if distributed.any_rank(self._fits_ekfac()):
                curvature.fit("ekfac", self.statistics, self.reader(),
                              self.config.influence.block_rows, progress=False)
        if distributed.rank() == 0:
            self._save_final_state()
        distributed.barrier()  # the manifest is complete when finalize returns on any rank

    def _save_final_state(self) -> None:
        os.makedirs(self.project_dir, exist_ok=True)
        if self._manifest is None:
            existing = load_optional(self.project_dir)
            self._manifest = existing or self._new_manifest()
        self._manifest.merge_rank_indexes(self.project_dir)
        self._manifest.config = self.config.to_dict()
        self._save_projections()
        # A run that collected no statistics (one that only appends rows) keeps the saved ones.
        if self.statistics.sums or not os.path.isfile(
                os.path.join(self.project_dir, STATE_DIR, STATISTICS_FILE)):
            state.save_statistics(self.project_dir, self.statistics.state_dict())
        self._manifest.save(self.project_dir)

    def _fits_ekfac(self) -> bool:
        """EK-FAC's eigenvalues come from the saved rows in K-FAC's eigenbasis."""
        return (self._save and self.plan.forward_covariance and self.plan.backward_covariance
                and self._manifest is not None and self._manifest.rows > 0)

    def initialize_from_log(self) -> "Run":
        """Load projections and statistics from this project's folder (a new process picks up
        where the logging run stopped). Watch the same model first."""
        if not self.modules:
            raise UsageError("initialize_from_log() needs the model: call run.watch(model) "
                             "first, with the same filters as the logging run.")
        manifest = Manifest.load(self.project_dir)
        projections, meta = state.load_projections(self.project_dir)
        missing = sorted({m.name for m in manifest.modules} - set(self.modules))
        extra = sorted(set(self.modules) - {m.name for m in manifest.modules})
        if missing or extra:
            raise UsageError(f"The watched layers differ from the log's: missing {missing}, "
                             f"not in the log {extra}. Watch with the logging run's filters.")
        self.modules = {m.name: self.modules[m.name] for m in manifest.modules}
        self.projections = {m.name: projections[m.name] for m in manifest.modules}
        self.projection_meta = meta
        self.config.logging.log_dtype = manifest.dtype
        self._on_device.clear()
        self.statistics.load_state_dict(state.load_statistics(self.project_dir))
        if self.layout() != manifest.modules:
            raise UsageError("The watched layers' shapes differ from the log's; load the same "
                             "model architecture as the logging run.")
        return self

    def reader(self) -> LogReader:
        """A reader over this project's saved logs (flushes pending rows first)."""
        self.flush()
        if self._manifest is None:
            return LogReader(self.project_dir)
        self._manifest.merge_rank_indexes(self.project_dir)  # other ranks' shards
        return LogReader(self.project_dir, self._manifest)

    def build_log_dataloader(self, batch_size: Optional[int] = None):
        """LogIX compatibility: an iterable of saved row blocks (a LogReader)."""
        reader = self.reader()
        reader.block_rows = batch_size or self.config.influence.block_rows
        return reader

    # ------------------------------------------------------------------ queries
    @property
    def influence(self) -> Attributor:
        """The `Attributor` over this run's log and live statistics (also LogIX's
        `run.influence.*` names for the query methods)."""
        if self._influence is None or self._influence.statistics is not self.statistics:
            self._influence = Attributor(self.project_dir, self.config, statistics=self.statistics,
                                         reader=self.reader, modules=self.layout,
                                         project=self.project)
        return self._influence

    def compute_influence_all(self, src_log: Optional[StepLog] = None, loader=None, **kwargs):
        """Score the query log (default: the last step) against every logged training example,
        streaming the shards. See `logix.Attributor.compute_influence_all`."""
        return self.influence.compute_influence_all(self._query(src_log), loader, **kwargs)

    def compute_influence(self, src_log: StepLog, tgt_log: StepLog, **kwargs):
        """Scores between two in-memory logs. See `logix.Attributor.compute_influence`."""
        return self.influence.compute_influence(src_log, tgt_log, **kwargs)

    def compute_self_influence(self, src_log: Optional[StepLog] = None, **kwargs):
        """g^T (H + lambda I)^-1 g per example (of src_log, or of every saved row)."""
        return self.influence.compute_self_influence(src_log, **kwargs)

    def search(self, src_log: Optional[StepLog] = None, k: int = 10, **kwargs):
        """The k most helpful training examples per query (default: the last step) from a
        vector index, with exact scores. See `logix.Attributor.search`."""
        return self.influence.search(self._query(src_log), k, **kwargs)

    def build_index(self, kind: str = "auto", **kwargs):
        """Build or update the vector index of this run's log. See
        `logix.Attributor.build_index`."""
        return self.influence.build_index(kind, **kwargs)

    def _query(self, src_log):
        return self.get_log() if src_log is None else src_log

    def summary(self) -> str:
        """A table of watched layers, gradient shapes, ranks and row widths (printed)."""
        from logix.summary import render_summary

        return render_summary(self)

    def describe(self, ids, texts=None, images=None, labels=None) -> str:
        """Store what the examples `ids` are (one text / image / label per id, None where there
        is none) beside the log, for `logix top` and the dashboard. Ids are normalized as
        `start(data_id=...)` does. Writes one crash-safe file under content/; returns its path."""
        from logix.storage.content import describe

        return describe(self.project_dir, ids, texts=texts, images=images, labels=labels,
                        rank=distributed.rank())


def _check_checkpoint_args(name, segment, lr, steps, momentum) -> None:
    if not isinstance(name, str) or not name or "/" in name or os.sep in name:
        raise UsageError(f"checkpoint name must be a non-empty string without '/', got {name!r}.")
    if isinstance(segment, bool) or not isinstance(segment, int) or segment < 0:
        raise UsageError(f"checkpoint segment must be an integer >= 0, got {segment!r}.")
    if not lr > 0:
        raise UsageError(f"checkpoint lr must be > 0, got {lr!r}.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise UsageError(f"checkpoint steps must be a positive integer, got {steps!r}.")
    if not 0 <= momentum < 1:
        raise UsageError(f"checkpoint momentum must be in [0, 1), got {momentum!r}.")


def _unwrap(model: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    while isinstance(model, (DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _passes(name: str, module: nn.Module, name_filter, type_filter) -> bool:
    if type_filter is not None and not isinstance(module, tuple(type_filter)):
        return False
    if name_filter is None:
        return True
    if callable(name_filter):
        return bool(name_filter(name))
    if isinstance(name_filter, str):
        name_filter = [name_filter]
    return any(f in name for f in name_filter)

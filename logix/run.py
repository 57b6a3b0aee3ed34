"""Run: the object users touch. A facade over the rooms that do the work: module selection and
hooks (`tracking/`), projections (`logra`), statistics (`statistics/`), the writing side of the
log (`storage.session.LogSession`) and scoring (`influence.attributor.Attributor`)."""

from __future__ import annotations

import contextlib
import copy
import logging
import numbers
import os
import warnings
from typing import Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from logix import distributed, logra
from logix.config import Config
from logix.errors import ConfigError, UsageError
from logix.influence import curvature
from logix.influence.attributor import Attributor
from logix.influence.checkpoints import check_inside, check_same_segment, checkpoint_info
from logix.log import StepLog, TokenRows
from logix.logra import Projection
from logix.statistics import budget, resume
from logix.statistics.covariance import BACKWARD, GRAD, CovarianceState
from logix.storage import state
from logix.storage.format import DTYPES
from logix.storage.manifest import Manifest, ModuleEntry, load_optional
from logix.storage.reader import LogReader
from logix.storage.session import LogSession
from logix.tracking import step
from logix.tracking.capture import (FLOAT32_MAX, GradientCapture, Plan, RowLayout,
                                    plan_from_setup)
from logix.storage.data_ids import normalize_data_ids
from logix.tracking.modules import TrackedModule
from logix.tracking.selection import NameFilter, select_modules

logger = logging.getLogger("logix")


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
        if os.path.abspath(config.root_dir) == os.path.abspath("logix"):
            warnings.warn("root_dir ./logix is a folder named like the package: scripts run from "
                          "this folder would import it instead of LogIX (an editable install). "
                          "Pick another root_dir, e.g. ./logix_logs (the default).", stacklevel=3)
        self.modules: Dict[str, TrackedModule] = {}
        self.projections: Dict[str, Projection] = {}
        self.projection_meta: Dict = {"init": "none", "seed": config.seed}
        self.statistics = CovarianceState(
            device=torch.device("cpu") if config.logging.cpu_offload else None)
        self.plan = Plan(log_grad=True)
        self._setup_plan = self.plan  # what setup() asked for; eval() swaps in a query plan
        self._warned_of_passes = False  # step.warn_of_repeated_passes said its piece
        self._session = LogSession(self.project_dir, self.config.logging)
        self._save = False
        self._finalized = False  # finalize() ran and saving was not switched on again since
        self._statistics_loaded = False  # initialize_from_log() put the saved ones in .statistics
        self._needs_reduce = False
        self._capture: Optional[GradientCapture] = None
        # (ids, positions of rows to write or None, scale, shard rows reserved for the step)
        self._step: Optional[tuple] = None
        self._last_log: Optional[StepLog] = None
        self._last_log_shared = False  # get_log() handed it out: its rows are never reused
        self._last_log_in_shard = False  # its rows are a view of the shard being filled
        self._spare_rows: Optional[Tensor] = None  # a row buffer no StepLog holds any more
        self._factor_buffers: Dict = {}  # the hooks' projected inputs / output gradients
        self._on_device: Dict[tuple, Projection] = {}
        self._layout: Optional[tuple] = None  # (projections it was computed for, entries)
        self._row_layout_of: Optional[tuple] = None  # (layout entries, RowLayout)
        self._lora_used: Optional[dict] = None  # add_lora's init and ranks, for the manifest
        self._checkpoint: Optional[str] = None
        self._checkpoint_ids: Optional[set] = None  # train_ids of the open checkpoint block
        self._influence: Optional[Attributor] = None

    # ------------------------------------------------------------------ what to track
    def watch(self, model: nn.Module, name_filter: NameFilter = None,
              type_filter: Union[None, type, Sequence[type]] = None) -> "Run":
        """Track every supported layer of `model` whose name and type pass the filters.

        name_filter: substrings (a layer is kept if any occurs in its name) or a predicate on the
        name. type_filter: layer classes to keep (one class or a list). Parameters'
        requires_grad is never changed.
        """
        if self._session.has_rows:
            raise UsageError("watch() after rows were logged would change the row layout. "
                             "Finish this project (run.finalize()) and start a new one.")
        modules = select_modules(model, name_filter, type_filter,
                                 self.config.logging.include_bias)
        self.modules = modules
        self._set_projections({n: logra.identity(m.in_dim, m.out_dim)
                               for n, m in modules.items()}, "none", lora_used=None)
        logger.info("LogIX watches %d layers of %s", len(modules), type(model).__name__)
        return self

    def add_lora(self, model: Optional[nn.Module] = None, watch: bool = True, clear: bool = True,
                 type_filter=None, name_filter=None, init: Optional[str] = None,
                 rank: Optional[int] = None, rank_in: Optional[int] = None,
                 rank_out: Optional[int] = None) -> "Run":
        """Give every watched layer a LoGra projection (init "random" or "pca").

        rank (both sides), rank_in, rank_out: positive integers, defaulting to the config's lora
        keys; a side no wider than its rank is not projected (the identity).

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
        r_in, r_out = logra.resolve_ranks(lora, rank, rank_in, rank_out)
        if init == "pca":
            if self.projection_meta["init"] != "none":
                raise UsageError("add_lora(init='pca') must come before any other add_lora(): "
                                 "PCA needs covariances of the unprojected layers.")
            if distributed.any_rank(self._needs_reduce):
                self.statistics.all_reduce()  # every rank derives the same projection
                self._needs_reduce = False
        dims = {name: (m.in_dim, m.out_dim) for name, m in self.modules.items()}
        projections = logra.build_projections(dims, init, r_in, r_out, self.config.seed,
                                              self.statistics.get)
        self._set_projections(projections, init, lora_used={
            "init": init, "rank": rank if rank is not None else lora.rank, "rank_in": r_in,
            "rank_out": r_out})
        return self

    def _set_projections(self, projections: Dict[str, Projection], init: str,
                         lora_used: Optional[dict]) -> None:
        """New projections: statistics of the old space are dropped, memory is rechecked."""
        self.projections = projections
        self.projection_meta = {"init": init, "seed": self.config.seed,
                                "checksum": logra.fingerprint(projections)}
        self._lora_used = lora_used
        self._on_device.clear()
        self.statistics.clear()
        self._check_memory()

    def setup(self, spec: Dict[str, Iterable[str]]) -> "Run":
        """What each step collects, e.g. {"grad": ["log", "covariance"], "forward":
        ["covariance"], "backward": ["covariance"]}."""
        self.plan = self._setup_plan = plan_from_setup(spec)
        self._check_memory()
        return self

    def declare_curvature(self, hessian: str) -> "Run":
        """The curvature queries use unless told otherwise (`influence.hessian`; 'auto' picks
        the best the statistics allow). `LogIXScheduler` declares its `hessian`; the manifest's
        config snapshot keeps it for later processes."""
        self.config.influence.hessian = curvature.check(hessian)
        return self

    def _check_memory(self) -> None:
        """Refuse statistics and row buffers beyond logging.max_statistics_bytes before they are
        allocated (see logix.statistics.budget)."""
        if not self.modules:
            return
        cfg = self.config.logging
        limit = cfg.max_statistics_bytes
        if limit is None:
            weight = next(iter(self.modules.values())).module.weight
            limit = budget.default_budget(self.statistics.device or weight.device)
        budget.check(budget.sizes(self.layout(), self.plan, self._rows_per_shard(),
                                  DTYPES[cfg.log_dtype].itemsize), limit)

    def _rows_per_shard(self) -> int:
        cfg = self.config.logging
        dim = sum(p.dim for p in self.projections.values())
        return cfg.shard_rows or max(1, cfg.flush_threshold // max(dim, 1))

    def save(self, enabled: bool = True) -> "Run":
        """Write logged gradients to disk (True) or only keep the last step in memory (False).
        After `finalize()`, `save(True)` is needed again to log more rows (see `start`); after
        `eval()`, it also brings back what `setup()` collects (statistics included)."""
        self._save = bool(enabled)
        if self._save:
            self._finalized = False
            self.plan = self._setup_plan
        return self

    @property
    def saving(self) -> bool:
        """Whether end() writes logged rows to disk (see save())."""
        return self._save

    @property
    def finalized(self) -> bool:
        """Whether finalize() closed the log (and save(True) was not called since)."""
        return self._finalized

    def eval(self) -> "Run":
        """Query mode: log gradients in memory only; no statistics, nothing written (until
        `save(True)`)."""
        self._save = False
        self.plan = Plan(log_grad=True)
        return self

    # ------------------------------------------------------------------ per step
    def start(self, data_id, mask: Optional[Tensor] = None, scale: float = 1.0,
              per_token: bool = False) -> None:
        """Attach hooks for one step. `mask` [batch, tokens] zeroes padding tokens; `scale`
        multiplies the logged gradients (e.g. the batch size when the loss is a mean).
        `per_token` (queries only, nothing written): the log also carries each real token's
        part of the projected gradient (`get_log().tokens`, see `logix.text`).

        After `finalize()` a step that would write rows is refused until `run.eval()` (a query,
        kept in memory) or `run.save(True)` (more training rows) says which one it is."""
        if self._capture is not None:
            raise UsageError("start() called twice without end(): call run.end() after each "
                             "step's backward pass.")
        writes = self._save and self.plan.log_grad
        if per_token and (writes or not self.plan.log_grad):
            raise UsageError("per_token=True is for queries: call run.eval() first (gradients "
                             "kept in memory, nothing written).")
        if self._finalized and writes:
            raise UsageError(
                "run.finalize() closed this training log, and saving is still on: this step "
                "would append its rows to it. For a query, call run.eval() first (gradients kept "
                "in memory, nothing written, statistics unchanged); to log more training rows "
                "into this project, call run.save(True) again.")
        if not self.modules:
            raise UsageError("Nothing is watched: call run.watch(model) before run.start().")
        if mask is not None and not isinstance(mask, Tensor):
            raise UsageError(f"mask must be a tensor [batch, tokens], got {type(mask).__name__}.")
        _check_scale(scale)
        ids = normalize_data_ids(data_id, mask)
        keep = None
        if writes:  # refusals come before anything of the step runs
            self._session.open(self._new_manifest, self._save_projections,
                               self._statistics_loaded, self._rows_per_shard())
            if self._statistics_loaded and self.plan.covariances:
                # The loaded statistics join this session's once, after the all-reduce at
                # finalize (every rank loaded them): statistics/resume.py.
                self._session.resumed_state = self.statistics.state_dict()
                self.statistics.clear()
                self._statistics_loaded = False
            keep = self._session.unseen(ids, self._checkpoint)
        # The step's forward/backward statistics stay apart until end() keeps the step, and
        # count only the examples whose rows the log keeps.
        step_statistics = CovarianceState(device=self.statistics.device)
        reserved = None
        if keep is not None and len(keep) == len(ids):
            reserved = self._session.reserve(
                len(ids), intact=None if self._last_log is None else self._last_log.grads)
        self._capture = GradientCapture(
            self.modules, self._projection_for, self.plan, step_statistics, self._row_layout(),
            mask, examples=len(ids),
            counted=None if keep is None or len(keep) == len(ids) else keep,
            spare=self._spare_rows if reserved is None else reserved,
            per_token=per_token, factors=self._factor_buffers).__enter__()
        if reserved is None:
            self._spare_rows = None
        self._step = (ids, keep, scale, reserved)

    def end(self) -> None:
        """Detach hooks, assemble the step's rows, update statistics and queue rows for disk."""
        capture = self._capture
        if capture is None:
            raise UsageError("end() called without start(): call run.start(data_id=...) before "
                             "the forward pass.")
        capture.__exit__(None, None, None)
        self._capture = None
        ids, keep, scale, reserved = self._step  # keep None: nothing written, all counted
        self._session.raise_if_failed()
        check_inside(self._checkpoint, self._checkpoint_ids, ids)
        step.check_capture(capture, self.plan, self.config.logging.on_unused_layer)
        if not self._warned_of_passes:
            self._warned_of_passes = step.warn_of_repeated_passes(capture)
        if not self.plan.needs_grad:
            self._keep_statistics(capture.statistics, scale)
            return
        rows = step.keep_rows(step.step_rows(capture, ids, scale), ids,
                              self.config.logging, self._save, capture.rows_known_finite(scale))
        if rows is None:
            return
        if keep is not None and self._checkpoint is None and self._session.resumed_rows:
            resume.check_same_kinds(self._session, self.plan.covariances, self.statistics,
                                    self._statistics_loaded)
        in_shard = rows is reserved
        if in_shard and not self._session.takes_in_place(rows):
            rows, in_shard = rows.clone(), False  # a flush wrote the shard out mid-step
        kept = rows if keep is None or len(keep) == len(ids) else rows[keep]
        self._keep_statistics(capture.statistics, scale)
        if self.plan.grad_covariance:
            for entry in self.layout():
                self.statistics.update(entry.name, GRAD, kept[:, entry.columns], kept.shape[0])
        tokens = None
        if capture.per_token:
            tokens = TokenRows(*step.token_rows(capture, self.projections, scale, capture.mask))
        self._set_last_log(StepLog(ids, rows, self.layout(), dict(self.projection_meta), tokens),
                           in_shard=in_shard)
        if keep:
            self._session.append([ids[k] for k in keep], kept, self._checkpoint)

    def _set_last_log(self, log: Optional[StepLog], in_shard: bool = False) -> None:
        """Replace the last step's log; its row buffer is reused by the step after next unless
        get_log() handed it out (the next step writes into the other buffer, so get_log() during
        a step still returns the previous step intact). Rows `in_shard` (reserved in the shard
        being filled) are never reused here, and get_log() hands out a copy of them."""
        old = self._last_log
        if old is not None and not self._last_log_shared and not self._last_log_in_shard \
                and old.grads is not log.grads:
            self._spare_rows = old.grads
        self._last_log, self._last_log_shared, self._last_log_in_shard = log, False, in_shard

    def _keep_statistics(self, step_statistics: CovarianceState, scale: float) -> None:
        """Merge a step's statistics. Output gradients are those of the loss times `scale` (the
        rows' scale), so their covariance takes scale squared; inputs are unchanged."""
        if scale != 1.0:
            step_statistics.scale(BACKWARD, scale * scale)
        self.statistics.merge(step_statistics)
        if self.plan.covariances:
            self._needs_reduce = True

    @contextlib.contextmanager
    def __call__(self, data_id, mask: Optional[Tensor] = None, scale: float = 1.0,
                 per_token: bool = False):
        """`with run(data_id=ids, mask=attention_mask): loss.backward()`."""
        self.start(data_id, mask=mask, scale=scale, per_token=per_token)
        try:
            yield self
        except BaseException:
            self._drop_capture()
            raise
        self.end()

    def _drop_capture(self) -> None:
        if self._capture is not None:
            self._capture.detach()
            self._capture = None

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
        info = checkpoint_info(name, segment, lr, steps, momentum, train_ids)
        if self._checkpoint is not None:
            raise UsageError(f"checkpoint({name!r}) inside checkpoint({self._checkpoint!r}): "
                             "close one checkpoint block before opening the next.")
        self.flush()
        known = self._session.manifest or load_optional(self.project_dir)
        if known is not None and name in known.checkpoints:
            raise UsageError(f"Checkpoint {name!r} is already in this log; use a new name.")
        if known is not None:
            check_same_segment(name, info, known.checkpoints)
        if known is not None and any(s.checkpoint == name for s in known.shards):
            raise UsageError(f"Checkpoint {name!r} has rows from a block that did not finish "
                             "(an exception left it); no query reads them. Use a new name.")
        if not self._save:
            raise UsageError(f"checkpoint({name!r}) records a logging pass, but this run does not "
                             "save (run.eval() or save(False)): call run.save(True) first.")
        writer = self._session.open(self._new_manifest, self._save_projections,
                                    self._statistics_loaded, self._rows_per_shard())
        outer = self.statistics
        self.statistics = CovarianceState(device=outer.device)
        self._checkpoint = name
        self._checkpoint_ids = None if train_ids is None else set(info["train_ids"])
        writer.tag = name
        try:
            yield self
        finally:
            try:
                self.flush()  # the block's rows go out under its name, even when it failed
            finally:
                writer.tag = None
                inner, self.statistics, self._checkpoint = self.statistics, outer, None
                self._checkpoint_ids = None
        inner.all_reduce()
        self._session.add_checkpoint(name, inner.state_dict(), info)

    def magic_recorder(self, model: nn.Module, optimizer, **kwargs):
        """A `logix.MagicRecorder` that records this training run into `<project>/replay`, for
        exact metagradient scores (`logix.magic_scores(run.project_dir, ...)`; docs/magic.md).
        kwargs: every, reduction, seed."""
        from logix.influence.magic import REPLAY_DIR, MagicRecorder

        return MagicRecorder(os.path.join(self.project_dir, REPLAY_DIR), model, optimizer,
                             **kwargs)

    def get_log(self, copy: bool = False) -> StepLog:
        """The last step's projected gradients (a query's test log)."""
        if self._last_log is None:
            raise UsageError("No step has been logged yet: run start()/backward()/end() first.")
        if self._last_log_in_shard:  # rows in a shard buffer, which the writer recycles
            self._last_log, self._last_log_in_shard = self._last_log.clone(), False
        if copy:
            return self._last_log.clone()
        self._last_log_shared = True
        return self._last_log

    def clear(self) -> None:
        """Forget statistics and the last step (nothing on disk changes)."""
        self._drop_capture()
        self.statistics.clear()
        self._last_log, self._spare_rows = None, None

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

    def _row_layout(self) -> RowLayout:
        """Where the hooks write each module's projected gradient, cached with layout()."""
        entries = self.layout()
        if self._row_layout_of is None or self._row_layout_of[0] is not entries:
            self._row_layout_of = (entries, RowLayout(
                {e.name: (e.offset, e.rank_out, e.rank_in) for e in entries}))
        return self._row_layout_of[1]

    def _projection_for(self, name: str, device: torch.device, dtype: torch.dtype) -> Projection:
        key = (name, device, dtype)
        if key not in self._on_device:
            self._on_device[key] = self.projections[name].to(device=device, dtype=dtype)
        return self._on_device[key]

    def _new_manifest(self) -> Manifest:
        return Manifest(project=self.project, dtype=self.config.logging.log_dtype,
                        modules=self.layout(), projection=dict(self.projection_meta),
                        config=self._config_snapshot())

    def _config_snapshot(self) -> dict:
        """The config as used: add_lora's own init and ranks replace the config's lora keys."""
        snapshot = self.config.to_dict()
        if self._lora_used is not None:
            snapshot["lora"] = dict(self._lora_used)
        return snapshot

    def _save_projections(self) -> None:
        state.save_projections(self.project_dir, self.projections, self.projection_meta)

    def flush(self) -> None:
        """Write every buffered row to disk now."""
        self._session.flush()

    def finalize(self) -> None:
        """Flush the writer, reduce statistics across processes, save state and manifest.
        Safe to call more than once. Later steps must say whether they are queries
        (`run.eval()`) or more training rows (`run.save(True)`, e.g. after a periodic
        finalize in one process)."""
        if self._capture is not None:
            raise UsageError("finalize() inside a step: call run.end() first.")
        try:
            self._session.close()
            distributed.barrier()  # every rank's shards are on disk and in its index
            if distributed.is_distributed():
                self._session.warn_of_ids_on_several_ranks()
            if distributed.any_rank(self._needs_reduce):
                self.statistics.all_reduce()
                self._needs_reduce = False
                resume.merge_saved(self._session, self.statistics)
                if distributed.any_rank(self._fits_ekfac()):
                    curvature.fit("ekfac", self.statistics, self.reader(),
                                  self.config.influence.block_rows, progress=False)
            if distributed.rank() == 0:
                self._session.save_final(self._new_manifest, self._config_snapshot(),
                                         self._save_projections, self.statistics.state_dict())
            distributed.barrier()  # the manifest is complete when finalize returns on any rank
            self._finalized = True
        finally:
            self._session.release()  # the writer lock, even when finalize failed

    def _fits_ekfac(self) -> bool:
        """EK-FAC's eigenvalues come from the saved rows in K-FAC's eigenbasis."""
        manifest = self._session.manifest
        return (self._save and self.plan.forward_covariance and self.plan.backward_covariance
                and manifest is not None and manifest.rows > 0)

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
        self.config.logging.log_dtype = manifest.dtype  # the run's own copy of the config
        self._on_device.clear()
        self.statistics.load_state_dict(state.load_statistics(self.project_dir))
        self._statistics_loaded = True
        for ours, logged in zip(self.layout(), manifest.modules):
            if ours != logged:
                raise UsageError(
                    f"The watched layer {ours.name!r} differs from the log's: watched "
                    f"{_shape(ours)}, logged {_shape(logged)}. Load the same model architecture "
                    "(and logging.include_bias) as the logging run.")
        return self

    def reader(self) -> LogReader:
        """A reader over this project's saved logs (flushes pending rows first)."""
        return self._session.reader(verify=self.config.influence.verify)

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

    def resource_plan(self, examples: int, tokens_per_example: int = 1, disk_budget=None,
                      model: Optional[nn.Module] = None, train_step=None, batch_size: int = 8,
                      timed_steps: int = 3, timing_budget: float = 30.0, show: bool = True):
        """Plan a long run before starting it (prints the plan when `show`; returns a
        `logix.planning.ResourcePlan`): per watched module and in total the row width and
        bytes, the disk of a log of `examples` rows, the statistics memory of the current
        `setup`, and the largest rank whose log fits `disk_budget` (bytes or '50GB').

        Step-time overhead is measured when `model` is given (a causal LM step on random tokens
        [batch_size, tokens_per_example]) or `train_step` (a function running one training step
        of `batch_size` examples): steps without and with the hooks in interleaved pairs, at least
        `timed_steps` pairs and more until both medians are known to +-5% or `timing_budget`
        seconds have passed; the plan reports the medians, the overhead's spread and the time of
        one logged pass over `examples`. Nothing is logged; the statistics and the model's .grad
        are untouched."""
        from logix import planning

        if not self.modules:
            raise UsageError("resource_plan() needs watched layers: call run.watch(model) (and "
                             "run.add_lora(), run.setup(...)) first.")

        row_layout = self._row_layout()

        def capture():  # hooks that keep nothing: statistics apart, nothing logged
            return GradientCapture(self.modules, self._projection_for, self.plan,
                                   CovarianceState(device=self.statistics.device), row_layout,
                                   examples=batch_size)

        result = planning.make_plan(self.layout(), self.plan, self.config.logging,
                                    self._rows_per_shard(), capture, examples,
                                    tokens_per_example, disk_budget, model, train_step,
                                    batch_size, timed_steps, timing_budget)
        if show:
            print(result.render())
        return result

    def summary(self, show: bool = True) -> Optional[str]:
        """A table of watched layers, gradient shapes, ranks and row widths: printed (returns
        None), or returned as text with `show=False`."""
        from logix.summary import render_summary

        text = render_summary(self)
        if not show:
            return text
        print(text, end="")
        return None

    def describe(self, ids, texts=None, images=None, labels=None) -> str:
        """Store what the examples `ids` are (one text / image / label per id, None where there
        is none) beside the log, for `logix top` and the dashboard. Ids are normalized as
        `start(data_id=...)` does. Writes one crash-safe file under content/; returns its path."""
        from logix.storage.content import describe

        return describe(self.project_dir, ids, texts=texts, images=images, labels=labels,
                        rank=distributed.rank())


def _check_scale(scale) -> None:
    """`scale` turns the backpropagated loss into the summed one: a finite number > 0."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or \
            not 0 < float(scale) <= FLOAT32_MAX:
        raise UsageError(f"scale must be a finite number > 0 (what the backpropagated loss is "
                         f"multiplied by to become the loss summed over the batch, e.g. the "
                         f"number of examples or real tokens of a mean), got {scale!r}.")


def _shape(entry: ModuleEntry) -> str:
    return (f"{entry.type} in_dim={entry.in_dim} out_dim={entry.out_dim} rank_in={entry.rank_in} "
            f"rank_out={entry.rank_out} bias={entry.bias} offset={entry.offset}")

"""Run: the object users touch. A facade over the rooms that do the work: the watched layers and
their projections (`tracking.layers`), one step at a time (`tracking.step.StepRunner`),
statistics (`statistics/`), the writing side of the log (`storage.session.LogSession`) and
scoring (`influence.attributor.Attributor`). What its calls do depends on one `Mode`."""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import logging
import os
import warnings
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

from torch import Tensor, nn

from logix import distributed, planning
from logix.compat import RunNames, check_clear, renamed_argument
from logix.config import Config
from logix.errors import ConfigError, UsageError
from logix.index.attributor import Attributor
from logix.influence import curvature
from logix.influence.attributor import check_config
from logix.influence.hessian import CurvatureSource, watched_weights
from logix.log import StepRows
from logix.mode import Mode
from logix.statistics import resume
from logix.statistics.covariance import CovarianceState
from logix.statistics.live import RunStatistics, device_of
from logix.storage import state
from logix.storage.manifest import Manifest, ModuleEntry
from logix.storage.reader import LogReader
from logix.summary import summary as summary_table
from logix.storage.session import LogSession
from logix.tracking.capture import CaptureSpec, spec_from_setup
from logix.tracking.checkpoint import checkpoint_block, checkpoint_info
from logix.tracking.layers import TrackedLayers
from logix.tracking.selection import NameFilter, select_modules
from logix.tracking.step import StepRunner, step_ids

logger = logging.getLogger("logix")
QUERY_SPEC = CaptureSpec(log_grad=True)


def _influence_call(name: str, last_step: bool = False):
    """`Run.<name>`: `run.influence.<name>`, with that method's docstring (`last_step`: no
    query means the last step's log)."""
    method = getattr(Attributor, name)

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        return getattr(self.influence, name)(*args, **kwargs)

    call.__qualname__ = f"Run.{name}"
    call.__doc__ = f"`run.influence.{name}`{' (no query: the last step)' if last_step else ''}." \
                   f"\n\n{inspect.cleandoc(method.__doc__)}"
    return call


class Run(RunNames):
    """One logging project: `logix.init(project)` returns it.

    Train time: `watch` a model, optionally `add_lora`, `setup` what to collect, `save(True)`,
    then `start(data_id=...)` / `end()` around each step (or `with run(data_id=...):`) and
    `finalize()` at the end. Query time: the same hooks give a test log (`get_log()`) that
    `compute_influence_all` scores against every logged training example. `mode` says what a
    step does (logix.mode: setup, logging, query, finalized).
    """

    def __init__(self, project: str, config: Config) -> None:
        if not project or not isinstance(project, str) or os.sep in project:
            raise ConfigError(f"project must be a non-empty folder name, got {project!r}.")
        self.project = project
        self.config = copy.deepcopy(config)  # the run may declare its curvature in it
        check_config(self.config.influence)
        self.project_dir = os.path.join(config.root_dir, project)
        if os.path.abspath(config.root_dir) == os.path.abspath("logix"):
            warnings.warn("root_dir ./logix is a folder named like the package: scripts run from "
                          "this folder would import it instead of LogIX (an editable install). "
                          "Pick another root_dir, e.g. ./logix_logs (the default).", stacklevel=3)
        self.layers = TrackedLayers(config.seed)
        self._stats = RunStatistics(device_of(config.logging.cpu_offload))
        self.mode = Mode.SETUP
        self.capture_spec = self._setup_spec = CaptureSpec(log_grad=True)
        self._session = LogSession(self.project_dir, self.config.logging)
        self._steps = StepRunner(self._session)
        self._influence: Optional[Attributor] = None
        self._curvature_source: Optional[CurvatureSource] = None

    modules = property(lambda self: self.layers.modules, doc="name -> TrackedModule watched.")
    projections = property(lambda self: self.layers.projections,
                           doc="name -> the layer's LoGra Projection.")
    projection_meta = property(lambda self: self.layers.projection_meta,
                               doc="The projections' init, seed and fingerprint.")
    saving = property(lambda self: self.mode.saving,
                      doc="Whether save(True) is in effect (see save()).")
    finalized = property(lambda self: self.mode is Mode.FINALIZED,
                         doc="Whether finalize() closed the log while saving (and neither "
                             "save() nor eval() was called since).")

    @property
    def statistics(self) -> CovarianceState:
        """The covariances collected so far (a checkpoint block's inside one)."""
        return self._stats.state

    def layout(self) -> List[ModuleEntry]:
        """Each watched module's slice of a log row (cached until the projections change)."""
        return self.layers.layout()

    # ------------------------------------------------------------------ what to track
    def watch(self, model: nn.Module, name_filter: NameFilter = None,
              type_filter: Union[None, type, Sequence[type]] = None,
              heads: Optional[Dict[str, Any]] = None) -> "Run":
        """Track every supported layer of `model` whose name and type pass the filters.

        name_filter: substrings (a layer is kept if any occurs in its name) or a predicate on the
        name. type_filter: layer classes to keep (one class or a list). heads: attention layers
        to split over heads, {layer name: logix.logra.HeadSplit or a number of heads}
        (`logix.text.attention_heads(model)` finds them): their projections keep each head's
        slice apart, so `logix.text.head_groups` can score heads. Parameters' requires_grad is
        never changed.
        """
        if self._session.has_rows:
            raise UsageError("watch() after rows were logged would change the row layout. "
                             "Finish this project (run.finalize()) and start a new one.")
        modules = select_modules(model, name_filter, type_filter,
                                 self.config.logging.include_bias)
        self.layers.watch(modules, self.config.seed, heads)
        self._new_space()
        logger.info("LogIX watches %d layers of %s", len(modules), type(model).__name__)
        return self

    def add_lora(self, model: Optional[nn.Module] = None, watch: bool = True,
                 clear: Optional[bool] = None,
                 type_filter=None, name_filter=None, init: Optional[str] = None,
                 rank: Optional[int] = None, rank_in: Optional[int] = None,
                 rank_out: Optional[int] = None) -> "Run":
        """Give every watched layer a LoGra projection (init "random" or "pca").

        rank (both sides), rank_in, rank_out: positive integers, defaulting to the config's lora
        keys; a side no wider than its rank is not projected (the identity).

        PCA needs forward and backward covariances from an earlier pass without projections.
        Statistics collected so far belong to the old space and are reset (`clear`: LogIX's
        flag, logix.compat).
        """
        check_clear(clear)
        if model is not None and (watch or not self.modules):
            self.watch(model, name_filter=name_filter, type_filter=type_filter)
        self.layers.add_lora(self.config.lora, self.config.seed, init, rank, rank_in, rank_out,
                             self._stats)
        self._new_space()
        return self

    def _new_space(self) -> None:
        """New projections: statistics (and the curvature source) of the old space are
        dropped, memory is rechecked."""
        self.statistics.clear()
        self._curvature_source = None
        self._check_memory()

    def setup(self, spec: Dict[str, Iterable[str]]) -> "Run":
        """What each step collects, e.g. {"grad": ["log", "covariance"], "forward":
        ["covariance"], "backward": ["covariance"]}."""
        self.capture_spec = self._setup_spec = spec_from_setup(spec)
        self._check_memory()
        return self

    def declare_curvature(self, hessian: str) -> "Run":
        """The curvature queries use unless told otherwise (`influence.hessian`; 'auto' picks
        the best the statistics allow). `LogIXScheduler` declares its `hessian`; the manifest's
        config snapshot keeps it for later processes."""
        self.config.influence.hessian = curvature.check(hessian)
        return self

    def _check_memory(self) -> None:
        self.layers.check_memory(self.capture_spec, self.config.logging, self.statistics.device)

    def save(self, enabled: bool = True) -> "Run":
        """Write logged gradients to disk (True: logging mode) or only keep the last step in
        memory (False). After `finalize()`, `save(True)` is needed again to log more rows (see
        `start`); after `eval()`, it also brings back what `setup()` collects."""
        self.mode = self.mode.after(f"save({bool(enabled)})")
        if enabled:
            self.capture_spec = self._setup_spec
        return self

    def eval(self) -> "Run":
        """Query mode: log gradients in memory only; no statistics, nothing written (until
        `save(True)`)."""
        self.mode = self.mode.after("eval()")
        self.capture_spec = QUERY_SPEC
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
        self._steps.check_idle()
        spec = self.capture_spec
        writes = self.mode.check_step(spec, per_token)
        if not self.modules:
            raise UsageError("Nothing is watched: call run.watch(model) before run.start().")
        ids = step_ids(data_id, mask, scale)
        if writes:  # refusals come before anything of the step runs
            self._open_session()
            self._stats.hand_over(self._session, spec.covariances)
        self._steps.start(self.layers, spec, self.statistics.device, ids, writes, scale, mask,
                          per_token)

    def end(self) -> None:
        """Detach hooks, assemble the step's rows, update statistics and queue rows for disk."""
        step = self._steps.stop()
        self._session.raise_if_failed()
        self._steps.finish(step, self.capture_spec, self.config.logging, self.saving,
                           self.layers, self._stats)

    @contextlib.contextmanager
    def __call__(self, data_id, mask: Optional[Tensor] = None, scale: float = 1.0,
                 per_token: bool = False):
        """`with run(data_id=ids, mask=attention_mask): loss.backward()`."""
        self.start(data_id, mask=mask, scale=scale, per_token=per_token)
        try:
            yield self
        except BaseException:
            self._steps.drop()
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
        info = checkpoint_info(name, segment, lr, steps, momentum, train_ids)
        with checkpoint_block(self._steps, self._stats, self.mode, info, name, self._open_session):
            yield self

    def magic_recorder(self, model: nn.Module, optimizer, **kwargs):
        """A `logix.MagicRecorder` that records this training run into `<project>/replay`, for
        exact metagradient scores (`logix.magic_scores(run.project_dir, ...)`; docs/magic.md).
        kwargs: every, reduction, seed."""
        from logix.influence.magic import REPLAY_DIR, MagicRecorder

        return MagicRecorder(os.path.join(self.project_dir, REPLAY_DIR), model, optimizer,
                             **kwargs)

    def get_log(self, copy: bool = False) -> StepRows:
        """The last step's projected gradients (a query's test log)."""
        return self._steps.log(copy)

    def clear(self) -> None:
        """Forget statistics and the last step (nothing on disk changes)."""
        self._steps.clear()
        self.statistics.clear()

    # ------------------------------------------------------------------ disk
    def _manifest(self) -> Manifest:
        return self.layers.manifest(self.project, self.config)

    def _open_session(self):
        return self._session.open(self._manifest, self._save_projections, self._stats.loaded,
                                  self.layers.rows_per_shard(self.config.logging))

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
        if self._steps.current is not None:
            raise UsageError("finalize() inside a step: call run.end() first.")
        self._session.finalize(self._final_statistics, self._manifest,
                               self.layers.config_snapshot(self.config), self._save_projections)
        self.mode = self.mode.after("finalize()")

    def _final_statistics(self) -> dict:
        """Reduced across ranks, joined with a reopened log's, curvatures such as EK-FAC fitted
        from the rows this run saved."""
        if self._stats.reduce():
            resume.merge_saved(self._session, self.statistics)
            manifest = self._session.manifest
            if distributed.any_rank(self.saving and manifest is not None and manifest.rows > 0):
                for kind in curvature.fitted_after_logging(self.capture_spec.covariances):
                    self.influence.fit(kind, progress=False)
        return self.statistics.state_dict()

    def initialize_from_log(self) -> "Run":
        """Load projections and statistics from this project's folder (a new process picks up
        where the logging run stopped). Watch the same model first."""
        manifest = self.layers.reopen(self.project_dir)
        self._curvature_source = None  # built with the projections it replaced
        self.config.logging.log_dtype = manifest.dtype  # the run's own copy of the config
        self._stats.load(state.load_statistics(self.project_dir))
        return self

    def reader(self) -> LogReader:
        """A reader over this project's saved logs (flushes pending rows first)."""
        return self._session.reader(verify=self.config.influence.verify)

    # ------------------------------------------------------------------ queries
    @property
    def influence(self) -> Attributor:
        """The `Attributor` over this run's log and live statistics (also LogIX's
        `run.influence.*` names for the query methods)."""
        if self._influence is None or self._influence.statistics is not self.statistics or \
                self._influence.curvature_source is not self._curvature_source:
            self._influence = Attributor(self.project_dir, self.config, statistics=self.statistics,
                                         reader=self.reader, modules=self.layout,
                                         project=self.project, last_query=self.get_log,
                                         curvature_source=self._curvature_source)
        return self._influence

    compute_influence_all = _influence_call("compute_influence_all", last_step=True)
    compute_influence = _influence_call("compute_influence")
    compute_self_influence = _influence_call("compute_self_influence")
    search = renamed_argument("src_log", "query")(_influence_call("search", last_step=True))
    build_index = _influence_call("build_index")

    # ------------------------------------------------------------------ tools
    resource_plan = planning.resource_plan  # (run, examples, ...): the run is `self`
    summary = summary_table

    def add_optimizer_state(self, optimizer, params=None) -> "Run":
        """Keep the second moments of Adam, AdamW or Adafactor (a live optimizer, or its
        state_dict with `params` in the optimizer's order) as the `hessian="optimizer"`
        curvature of the watched layers (logix.tracking.optimizer_state); saved with the
        statistics (at once unless the run is logging: its finalize() saves them). Inside a
        `run.checkpoint(...)` block they are that checkpoint's, for SOURCE with
        hessian="optimizer": pass the optimizer state saved with the checkpoint's weights."""
        from logix.tracking.optimizer_state import add_to_run

        add_to_run(self.statistics, self.layers, optimizer, params, self.project_dir,
                   logging=self.mode is Mode.LOGGING or self._steps.checkpoint is not None)
        return self

    def add_curvature_source(self, model: nn.Module, loss_fn, loader, *, forward=None,
                             tol: float = 1e-4, max_iterations: int = 500,
                             query_block: int = 32, allow_unconverged: bool = False) -> "Run":
        """The model, its loss and the training loader for hessian="hessian" / "ggn": the
        Hessian (or Gauss-Newton matrix) of the mean training loss with respect to the watched
        layers' weights, solved per query by conjugate gradients (logix.influence.hessian).

        model: the watched model, at the weights the rows were logged at (call model.eval()
        first: every CG iteration must see the same function). loss_fn(outputs, batch) -> the
        batch's mean loss; forward(model, batch) -> outputs (default model(batch[0])). tol,
        max_iterations, query_block, allow_unconverged: see `CurvatureSource`. In a new
        process: run.watch(model); run.initialize_from_log(); then this."""
        if not self.modules:
            raise UsageError("add_curvature_source() needs the watched layers: call "
                             "run.watch(model) (and run.add_lora or initialize_from_log) first.")
        self._curvature_source = CurvatureSource(
            model, loss_fn, loader, watched_weights(model, self.modules, self.projections),
            forward=forward, tol=tol, max_iterations=max_iterations, query_block=query_block,
            allow_unconverged=allow_unconverged)
        return self

    def describe(self, ids, texts=None, images=None, labels=None) -> str:
        """Store what the examples `ids` are (one text / image / label per id, None where there
        is none) beside the log, for `logix top` and the dashboard. Ids are normalized as
        `start(data_id=...)` does. Writes one crash-safe file under content/; returns its path."""
        from logix.storage.content import describe

        return describe(self.project_dir, ids, texts=texts, images=images, labels=labels,
                        rank=distributed.rank())


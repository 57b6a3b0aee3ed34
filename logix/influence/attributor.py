"""Streaming influence: precondition the queries once, then one GEMM per block of logged rows.

A score is s[q, i] = g_q^T (H + lambda I)^-1 g_i, both gradients of losses (summed over the
examples of a batch). Positive: training on example i lowers query q's loss (helpful); negative:
it raises it (harmful). Train logs stay unpreconditioned on disk, so every preconditioner and
damping is a query-time choice.

Modes: ``dot`` (s), ``cosine`` (s / sqrt(q^T H^-1 q * g^T H^-1 g)) and ``l2``
(-(q - g)^T H^-1 (q - g)); the train-side g^T H^-1 g is computed once per preconditioner and cached
in ``<project>/cache``.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import warnings
from typing import Callable, Dict, List, Optional, Union

import torch

from logix import distributed
from logix.config import Config, InfluenceConfig, load_config, query_settings
from logix.errors import ConfigError, UsageError
from logix.influence import curvature
from logix.influence import damping as damping_rules
from logix.influence import norms as norm_cache
from logix.influence.preconditioner import Preconditioner, check_invertible
from logix.influence.gather import merge_full, merge_topk, own_part
from logix.influence.hessian import CurvatureSource
from logix.influence.scoring import (MODES, SCORE_CHUNK, TOTAL, Scorer, aligned,
                                     group_masks, score_buffer)
from logix.influence.source import source_influence
from logix.influence.ensemble import ensemble_influence
from logix.influence.results import Scores, self_scores
from logix.influence.tracin import tracin_influence
from logix.influence.topk import TopK
from logix.log import StepRows
from logix.progress import track
from logix.statistics.covariance import CovarianceState
from logix.storage import state
from logix.storage.format import STATE_DIR, STATISTICS_FILE
from logix.storage.manifest import ModuleEntry, load_optional, project_fingerprint
from logix.storage.reader import LogReader
from logix.storage.scores import GROUP_PREFIX, INFLUENCE_KEY, ScoreFileWriter, save_scores


CHECKPOINT_METHODS = ("ensemble", "tracin")


class Attributor:
    """Scores queries against a saved training log, built from what is on disk: the manifest,
    the statistics and the shards. No model and no `Run` is needed:

        attributor = logix.Attributor("logix_logs/myproject")
        result = attributor.compute_influence_all(query_log)   # a StepRows, file or folder

    project_dir: the training log's folder. config: a `Config` or `InfluenceConfig` (default: the
    logging run's config snapshot in the manifest, so its declared curvature is kept).
    statistics: a `CovarianceState` (default: loaded from ``state/statistics.safetensors``).
    reader: a `LogReader`, or a function returning a fresh one per query (default: a reader of
    `project_dir`). modules: a function returning the row layout when there is no manifest yet.
    curvature_source: the model, loss and training loader of the ``hessian`` / ``ggn`` kinds
    (`run.add_curvature_source` builds it). last_query: a function returning the query when none
    is given (a Run's `get_log`: its last step). A `Run` builds one from its live values
    (`run.influence`).
    """

    def __init__(self, project_dir: Union[str, os.PathLike], config=None, *,
                 statistics: Optional[CovarianceState] = None,
                 reader: Union[None, LogReader, Callable[[], LogReader]] = None,
                 modules: Optional[Callable[[], List[ModuleEntry]]] = None,
                 project: Optional[str] = None,
                 curvature_source: Optional[CurvatureSource] = None,
                 last_query: Optional[Callable[[], StepRows]] = None) -> None:
        self.project_dir = os.fspath(project_dir)
        manifest = load_optional(self.project_dir)
        if manifest is None and statistics is None and reader is None:
            raise UsageError(f"{self.project_dir!r} holds no LogIX log (no manifest.json). Pass "
                             "the folder of a finalized project: <root_dir>/<project>.")
        self.influence_config = check_config(_influence_config(config, manifest))
        if statistics is None:
            statistics = CovarianceState()
            if os.path.isfile(os.path.join(self.project_dir, STATE_DIR, STATISTICS_FILE)):
                statistics.load_state_dict(state.load_statistics(self.project_dir))
            elif manifest is not None and manifest.rows:
                warnings.warn(f"{self.project_dir!r} has no saved statistics (the logging run "
                              "did not call run.finalize()?): until it is finalized only "
                              "curvatures fitted from the rows alone (hessian='none', 'lissa') "
                              "can be used.")
        self.statistics = statistics
        self.project = project or (manifest.project if manifest else
                                   os.path.basename(os.path.normpath(self.project_dir)))
        self._reader_source = reader
        self._modules = modules
        self.curvature_source = curvature_source
        self._last_query = last_query
        self._spectra_cache: Optional[curvature.Spectra] = None

    # ------------------------------------------------------------------ preconditioning
    def available_hessians(self) -> List[str]:
        """The curvature kinds the statistics (and saved rows) allow."""
        return curvature.available(self.statistics, [m.name for m in self.modules()],
                                   self._has_saved_rows)

    def modules(self) -> List[ModuleEntry]:
        """The row layout: the live run's, else the manifest's."""
        if self._modules is not None:
            return self._modules()
        return self.reader().manifest.modules

    def reader(self) -> LogReader:
        """A reader over the training log (the run's flushes pending rows first)."""
        source = self._reader_source
        if source is None:
            return LogReader(self.project_dir, verify=self.influence_config.verify)
        return source if isinstance(source, LogReader) else source()

    def preconditioner(self, hessian: Optional[str] = None, damping: Union[None, str, float] = None,
                       modules=None, progress: bool = True) -> Preconditioner:
        """The per-module inverse curvature for a hessian kind and damping (eigendecompositions
        are cached until the statistics change); for a kind that is no per-module spectrum
        (lissa, hessian, ggn: a solve per query; full: one inverse across modules), the
        Preconditioner its query_solver builds."""
        cfg = check_config(query_settings(self.influence_config, hessian=hessian,
                                          damping=damping), query=True)
        name = cfg.hessian
        modules = modules if modules is not None else self.modules()
        avoided: Dict[str, float] = {}
        if name == curvature.AUTO:
            name = self._declared()
            if name is None:
                name, avoided = curvature.pick_auto_for(self.available_hessians(),
                                                        self.statistics,
                                                        [m.name for m in modules])
        kind = curvature.get(name)
        solver = kind.query_solver(self.reader, modules, cfg, progress,
                                   source=self.curvature_source)
        if solver is not None:
            return solver
        if kind.identity:
            return Preconditioner(name, {}, modules)
        if not kind.fitted(self.statistics):
            self.fit(name)
        spectra = self._spectra()
        inverses = {}
        for m in modules:
            inverses[m.name] = kind.inverse(m.name, spectra, cfg.damping, cfg.relative_damping)
            check_invertible(m.name, inverses[m.name])
        shares = curvature.concentrated(name, self.statistics, inverses)
        if shares:
            warnings.warn(curvature.concentration_warning(name, shares), UserWarning,
                          stacklevel=2)
        return Preconditioner(name, inverses, modules,
                              damping_rules.describe(cfg.damping, cfg.relative_damping),
                              shares or avoided)

    def _declared(self) -> Optional[str]:
        """The curvature the logging run declared (its manifest's config snapshot), if any."""
        manifest = load_optional(self.project_dir)
        declared = (manifest.config.get("influence") or {}).get("hessian") if manifest else None
        return None if declared in (None, curvature.AUTO) else curvature.check(declared)

    def _spectra(self) -> curvature.Spectra:
        if self._spectra_cache is None or self._spectra_cache.statistics is not self.statistics:
            self._spectra_cache = curvature.Spectra(self.statistics)
        return self._spectra_cache

    def fit(self, hessian: str, reader: Optional[LogReader] = None, progress: bool = True) -> None:
        """Fit what a curvature kind takes from the saved rows into the statistics (EK-FAC's
        eigenvalues: one streaming pass); kinds that need no rows do nothing."""
        curvature.fit(hessian, self.statistics, reader or self.reader(),
                      self.influence_config.block_rows, progress)

    # ------------------------------------------------------------------ estimators
    # Each takes only its own arguments and returns Scores (logix.influence.results).
    def influence(self, query=None, *, mode: Optional[str] = None, precondition: bool = True,
                  hessian: Optional[str] = None, damping: Union[None, str, float] = None,
                  influence_groups=None, topk: Optional[int] = None, out: Optional[str] = None,
                  loader=None, block_rows: Optional[int] = None, progress: bool = True,
                  gather: str = "all") -> Optional[Scores]:
        """Influence of every saved training row on each query, streaming the shards.

        query: a StepRows (run.get_log()), a list of them, a StepRows file or a logged project
        folder. loader: a LogReader or project folder (default: this log).
        mode: "dot" | "cosine" | "l2"; hessian: "auto" (the declared kind, else the best the
        log allows) | "none" | "raw" | "kfac" | "ekfac" |
        "lissa" (solves each query against the saved rows' Fisher by conjugate gradients; mode
        "dot" only; settings influence.lissa_solver / lissa_depth / lissa_scale / lissa_tol;
        residuals in meta["solver"]) | "full" (the saved rows' Fisher across all modules, one
        eigendecomposition of the [dim, dim] covariance, rows of at most 16384 numbers; with
        influence_groups, mode "dot" only) | "optimizer" |
        "hessian" | "ggn" (the model's own Hessian / Gauss-Newton matrix of the training loss,
        jointly over the watched layers, solved per query by conjugate gradients with
        Hessian-vector products; needs run.add_curvature_source(model, loss_fn, loader); mode
        "dot" only; iterations and residuals in meta["solver"]);
        damping: 'auto' (default: chosen per module from the log's curvature, values in
        meta["damping"]; for "hessian" / "ggn" from the model's curvature and the scale of this
        batch of queries over the logged rows'), 'relative' (influence.relative_damping x each
        module's mean eigenvalue) or a number (absolute, every module); docs/concepts.md,
        "Damping".
        influence_groups: "module" (one group per module) or {name: [module-name substrings]}:
        adds `groups`, whose scores sum to the total when they partition the modules. topk=k (a
        positive int): instead of the full matrix, per query the k most helpful and k most
        harmful training examples. out=path: write the full scores to a safetensors file (not
        with topk). Arguments follow the config's rules (damping >= 0, ...); a damped curvature
        that is singular, or scores with NaN/inf, raise UsageError. Shards are checked against
        the manifest's checksums once per process (config influence.verify; or pass
        loader=LogReader(dir, verify=False)).

        Under torch.distributed every rank scores its share of the shards and the parts are
        gathered (full matrix in manifest order, or merged top-k): on every rank with
        gather="all", on rank 0 only with gather="rank0" (other ranks get None).

        Returns Scores: `influence` [n_query, n_train] (positive = helpful), `src_ids`,
        `tgt_ids` (the order rows were logged; logix.evaluation.align_scores reorders them),
        `meta`; or the top-k or score-file fields (see Scores).
        """
        _check_topk(topk, out)
        _check_gather(gather)
        block_rows = self._block_rows(block_rows)
        src = self._query_log(query)
        reader = self._reader(loader)
        if reader.rows == 0:  # an empty score matrix would hide a logging pass that saved nothing
            raise UsageError(f"There are no logged rows to score against in "
                             f"{reader.project_dir!r}. Log training steps with run.save(True) "
                             "and run.setup({'grad': ['log']}) first, and call run.finalize().")
        if topk is not None and topk > reader.rows:
            raise UsageError(f"topk={topk} is larger than the log ({reader.rows} rows in "
                             f"{reader.project_dir!r}); ask for topk <= {reader.rows}.")
        _check_layout(src, reader.manifest.modules, reader.manifest.projection, "saved log")
        block_rows = aligned(block_rows, reader.dim)
        scorer = self.scorer(src, mode, precondition, hessian, damping, influence_groups)
        log = {"project": self.project, "fingerprint": project_fingerprint(reader.project_dir)}
        if not distributed.is_distributed():
            result = self._stream(src, reader, scorer, topk, out, block_rows, progress, log)
            return Scores({**result, "meta": {**result["meta"], **log}})
        # Each rank scores its share of the shards; the parts are gathered in manifest order.
        local = self._stream(src, own_part(reader), scorer, topk, None, block_rows, progress,
                             log)
        merged = merge_topk(local, topk) if topk is not None else merge_full(local, reader)
        merged["meta"] = {**merged["meta"], **log}
        if out is not None and distributed.rank() == 0:
            merged["path"] = save_scores(out, merged)
        return Scores(merged) if gather == "all" or distributed.rank() == 0 else None

    def source(self, query=None, *, hessian: Optional[str] = None,
               damping: Union[None, str, float] = None, topk: Optional[int] = None,
               block_rows: Optional[int] = None) -> Scores:
        """SOURCE over the checkpoints logged with run.checkpoint(...) (logix.influence.source):
        dot products through each segment's own damped curvature (hessian=, default ekfac;
        damping as for `influence`, per segment and module in meta["damping"]). Scores as
        `influence` returns them (plus meta["segments"]); columns follow the first appearance
        of each id across checkpoints."""
        _check_topk(topk, None)
        block_rows = self._block_rows(block_rows)
        cfg = query_settings(self.influence_config, damping=damping)
        src = self._query_log(query)
        reader = self.reader()
        result = source_influence(reader, src, hessian or "ekfac",
                                  aligned(block_rows, reader.dim), cfg.damping,
                                  cfg.relative_damping)
        if topk is None:
            return Scores(result)
        top = TopK(topk, len(src))
        top.update(result["influence"], 0)
        scorer = Scorer(src, "dot", Preconditioner("none", {}, src.modules),
                        group_masks(src.modules, None))
        return Scores({**scorer.topk_result(src, result["tgt_ids"], top), "meta": result["meta"]})

    def tracin(self, queries=None, *, topk: Optional[int] = None,
               block_rows: Optional[int] = None, progress: bool = True) -> Scores:
        """TracIn-CP (logix.influence.tracin): the sum over the logged checkpoints of lr x the
        dot products. queries: one query log for every checkpoint, or {checkpoint name: query
        log at that checkpoint's weights}."""
        _check_topk(topk, None)
        result = tracin_influence(self, self._checkpoint_queries(queries),
                                  self._block_rows(block_rows), progress)
        return Scores(result if topk is None else _topk_of(result, topk))

    def ensemble(self, queries=None, *, mode: Optional[str] = None,
                 hessian: Optional[str] = None, damping: Union[None, str, float] = None,
                 topk: Optional[int] = None, block_rows: Optional[int] = None,
                 progress: bool = True) -> Scores:
        """Influence averaged over the logged checkpoints, each with its own curvature
        (logix.influence.ensemble). queries as for `tracin`; mode, hessian, damping as for
        `influence`."""
        _check_topk(topk, None)
        result = ensemble_influence(self, self._checkpoint_queries(queries), mode, hessian,
                                    damping, self._block_rows(block_rows), progress)
        return Scores(result if topk is None else _topk_of(result, topk))

    def self_influence(self, query=None, *, loader=None, precondition: bool = True,
                       hessian: Optional[str] = None, damping: Union[None, str, float] = None,
                       block_rows: Optional[int] = None, progress: bool = True) -> Scores:
        """g^T (H + lambda I)^-1 g per example: of `query` when given, else of every saved row.
        Returns Scores with `influence` [n] and `src_ids` == `tgt_ids` (also `ids`)."""
        block_rows = self._block_rows(block_rows)
        kind = hessian if precondition else "none"
        if query is not None:
            log = _as_log(query)
            scorer = self.scorer(log, "dot", precondition, kind, damping, None)
            return self_scores(list(log.data_ids), scorer.norms_of(log.grads.float())[:, 0],
                               scorer.meta)
        reader = self._reader(loader)
        dummy = StepRows([], torch.zeros(0, reader.dim), reader.manifest.modules)
        scorer = self.scorer(dummy, "dot", precondition, kind, damping, None)
        if scorer.preconditioner.queries_only:
            raise UsageError(f"hessian={scorer.preconditioner.kind!r} solves per query, so the "
                             "self-influence of every saved row would take one solve per row. "
                             "Pass src_log= (query= in self_influence: those examples only), or "
                             "hessian='raw' / 'ekfac'.")
        norms = norm_cache.train_norms(reader, scorer, aligned(block_rows, reader.dim), progress)
        return self_scores(reader.data_ids(), norms[:, 0], scorer.meta)

    def compute_influence(self, src_log, tgt_log: StepRows, mode: Optional[str] = None,
                          precondition: bool = True, hessian: Optional[str] = None,
                          damping: Union[None, str, float] = None, influence_groups=None) -> Scores:
        """Scores between two in-memory logs: `influence` [n_src, n_tgt], `src_ids`, `tgt_ids`
        (+ `groups` when influence_groups is given)."""
        src = _as_log(src_log)
        _check_layout(src, tgt_log.modules, tgt_log.projection, "target log")
        grads = tgt_log.grads.float()
        scorer = self.scorer(src, mode, precondition, hessian, damping, influence_groups)
        train_norms = scorer.norms_of(grads) if scorer.needs_norms else None
        scores = scorer.score(grads, train_norms).T.contiguous()
        return Scores(scorer.result(src, list(tgt_log.data_ids), scores))

    # ------------------------------------------------------------------ LogIX's names
    def compute_influence_all(self, src_log=None, loader=None, mode: Optional[str] = None,
                              precondition: bool = True, hessian: Optional[str] = None,
                              damping: Union[None, str, float] = None, influence_groups=None,
                              topk: Optional[int] = None, out: Optional[str] = None,
                              block_rows: Optional[int] = None, progress: bool = True,
                              method: str = "influence", gather: str = "all"):
        """LogIX's entry point: `influence` (method="influence", the default), `source`,
        `tracin` or `ensemble` with these arguments; one the method does not take is refused."""
        _check_topk(topk, out)
        _check_gather(gather)
        self._block_rows(block_rows)
        _refuse_unused(method, mode=mode, hessian=hessian, damping=damping,
                       precondition=precondition)
        if method == "influence":
            return self.influence(src_log, mode=mode, precondition=precondition,
                                  hessian=hessian, damping=damping,
                                  influence_groups=influence_groups, topk=topk, out=out,
                                  loader=loader, block_rows=block_rows, progress=progress,
                                  gather=gather)
        if method not in ("source",) + CHECKPOINT_METHODS:
            raise UsageError(f"method={method!r} is not supported; allowed: 'influence', "
                             f"'source', {', '.join(repr(m) for m in CHECKPOINT_METHODS)}.")
        if influence_groups is not None or out is not None or loader is not None:
            raise UsageError(f"method={method!r} supports topk but not influence_groups, out "
                             "or loader.")
        if method == "source":
            return self.source(src_log, hessian=hessian, damping=damping, topk=topk,
                               block_rows=block_rows)
        if method == "tracin":
            return self.tracin(src_log, topk=topk, block_rows=block_rows, progress=progress)
        return self.ensemble(src_log, mode=mode, hessian=hessian, damping=damping, topk=topk,
                             block_rows=block_rows, progress=progress)

    def _stream(self, src: StepRows, reader: LogReader, scorer: Scorer, topk, out,
                block_rows: int, progress: bool, log: dict) -> dict:
        n_train = reader.rows
        train_norms = norm_cache.train_norms(reader, scorer, block_rows, progress) \
            if scorer.needs_norms else None
        names = scorer.group_names
        n_query = len(src)
        writer = None
        if out is not None:
            shapes = {_tensor_name(g): (n_query, n_train) for g in names}
            writer = ScoreFileWriter(out, shapes, src.data_ids, reader.data_ids(),
                                     meta={**scorer.meta, **log})
        top = TopK(topk, len(names) * n_query) if topk is not None else None
        width = len(names) * n_query
        full = None if (writer or top) else score_buffer(n_train, width, scorer.device)
        spare = None  # top-k and score files: one block's scores, reused block after block
        tgt_ids: List = []
        start = 0
        blocks = reader.fixed_blocks(block_rows, unit=SCORE_CHUNK)
        total_blocks = reader.count_blocks(block_rows, unit=SCORE_CHUNK)
        try:
            for ids, rows in track(blocks, total_blocks, "Scoring", progress):
                n = rows.shape[0]
                norms = None if train_norms is None else train_norms[start:start + n]
                if full is not None:
                    slab = full[start:start + n]
                else:
                    if spare is None or spare.shape[0] < n:
                        spare = score_buffer(n, width, scorer.device)
                    slab = spare[:n]
                scores = scorer.score(rows.to(scorer.device), norms, out=slab)  # [n, G * n_query]
                if writer is not None:
                    for g, name in enumerate(names):
                        writer.write_columns(_tensor_name(name), start,
                                             scores[:, g * n_query:(g + 1) * n_query].T)
                elif top is not None:
                    top.update(scores.T, start)
                tgt_ids.extend(ids)
                start += n
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        if writer is not None:
            writer.close()
            return {"src_ids": list(src.data_ids), "tgt_ids": tgt_ids, "path": out,
                    "meta": scorer.meta}
        if top is not None:
            return scorer.topk_result(src, tgt_ids, top)
        return scorer.result(src, tgt_ids, full.T.contiguous().cpu())

    # ------------------------------------------------------------------ what logix.index builds on
    def scorer(self, src: StepRows, mode: Optional[str] = None, precondition: bool = True,
               hessian: Optional[str] = None, damping: Union[None, str, float] = None,
               groups=None) -> Scorer:
        """The queries of `src` preconditioned for a mode, curvature and damping (arguments as
        in `influence`; groups: its influence_groups): what scores a block of training rows
        (`Scorer.score`), here and in `logix.index`."""
        if not isinstance(precondition, bool):
            raise UsageError(f"precondition must be True or False, got {precondition!r}.")
        cfg = check_config(query_settings(self.influence_config, mode=mode, hessian=hessian,
                                          damping=damping), query=True)
        preconditioner = self.preconditioner(cfg.hessian if precondition else "none",
                                             cfg.damping, src.modules)
        mode = cfg.mode
        if preconditioner.queries_only and mode != "dot":
            raise UsageError(f"hessian={preconditioner.kind!r} solves each query against the "
                             f"saved rows and has no train-side inverse, so mode={mode!r} (which "
                             "needs g^T H^-1 g of every training row) is not supported: use "
                             "mode='dot', or hessian='raw' / 'ekfac' for cosine and l2.")
        if preconditioner.cross_layer and groups is not None and mode != "dot":
            raise UsageError(f"hessian={preconditioner.kind!r} couples the modules, so a group's "
                             f"share of g^T H^-1 g can be negative and mode={mode!r} per group "
                             "has no meaning: use mode='dot' with influence_groups (each group "
                             "gets its modules' share of the total score), or leave "
                             "influence_groups out.")
        return Scorer(src, mode, preconditioner, group_masks(src.modules, groups))

    def query(self, log) -> StepRows:
        """The query log `log` (a StepRows, a list of them, a `StepRows.save` file or a project
        folder), checked against the saved log's layers and projections."""
        src = self._query_log(log)
        manifest = self.reader().manifest
        _check_layout(src, manifest.modules, manifest.projection, "saved log")
        return src

    # ------------------------------------------------------------------ helpers
    def _query_log(self, query) -> StepRows:
        """The query log `query` (see `_as_log`); None: `last_query()` where there is one."""
        if query is None and self._last_query is not None:
            return self._last_query()
        return _as_log(query)

    def _checkpoint_queries(self, queries):
        """One query log, or {checkpoint name: query log}."""
        if isinstance(queries, dict):
            return {name: _as_log(log) for name, log in queries.items()}
        return self._query_log(queries)

    def _block_rows(self, block_rows: Optional[int]) -> int:
        return query_settings(self.influence_config, block_rows=block_rows).block_rows

    def _reader(self, loader) -> LogReader:
        if loader is None:
            return self.reader()
        if isinstance(loader, LogReader):
            return loader
        if isinstance(loader, (str, os.PathLike)):
            return LogReader(os.fspath(loader), verify=self.influence_config.verify)
        raise UsageError(f"loader must be a LogReader, a project folder or None, got "
                         f"{type(loader).__name__}.")

    def _has_saved_rows(self) -> bool:
        """False when nothing was logged yet (no manifest); a damaged log or a failed writer
        raises instead of silently changing what hessian='auto' picks."""
        if load_optional(self.project_dir) is None:
            return False
        return self.reader().rows > 0


def _topk_of(result: dict, topk: int) -> dict:
    """The top-k form of a full result (methods that sum scores over checkpoints)."""
    top = TopK(topk, len(result["src_ids"]))
    top.update(result["influence"], 0)
    best, best_idx, worst, worst_idx = top.result()
    tgt = result["tgt_ids"]

    def ids(index):
        return [[tgt[i] for i in row] for row in index.tolist()]

    return {"src_ids": result["src_ids"], "top_ids": ids(best_idx), "top_scores": best,
            "bottom_ids": ids(worst_idx), "bottom_scores": worst, "meta": result["meta"]}


# Per method: what its scores are, and the arguments it has no use for (with the values that
# mean "not given").
_FIXED = {
    "source": ("SOURCE scores are dot products through its own curvature of each segment "
               "(chosen with hessian= and damping=)",
               (("mode", (None, "dot")), ("precondition", (True,)))),
    "tracin": ("TracIn scores are plain dot products summed over the checkpoints",
               (("mode", (None, "dot")), ("hessian", (None, "none")), ("damping", (None,)))),
}


def _refuse_unused(method: str, **given) -> None:
    """Refuse an argument the method would ignore (its scores would not be what was asked)."""
    what, fixed = _FIXED.get(method, ("", ()))
    unused = [f"{name}={given[name]!r}" for name, unset in fixed if given[name] not in unset]
    if unused:
        raise UsageError(f"method={method!r} does not take {', '.join(unused)}: {what}. Leave "
                         f"{'it' if len(unused) == 1 else 'them'} out, or use method='ensemble' "
                         "for influence with a chosen mode, curvature and damping per checkpoint.")


def _check_gather(gather: str) -> None:
    if gather not in ("all", "rank0"):
        raise UsageError(f"gather={gather!r} is not supported; allowed: 'all', 'rank0'.")


def _check_topk(topk, out) -> None:
    if topk is None:
        return
    if isinstance(topk, bool) or not isinstance(topk, int) or topk <= 0:
        raise UsageError(f"topk must be a positive integer or None (the full matrix), got "
                         f"{topk!r}.")
    if out is not None:
        raise UsageError(f"topk={topk} and out={out!r} together are not supported: out= writes "
                         "the full score matrix. Pass out= alone (then `logix top FILE --k N` "
                         "or ScoreFile.row reads the best examples per query), or topk= alone.")


def _tensor_name(group: str) -> str:
    return INFLUENCE_KEY if group == TOTAL else GROUP_PREFIX + group


def _as_log(log) -> StepRows:
    """A query log from a StepRows, a list of them, a `StepRows.save` file or a project folder
    (every saved row of it becomes a query)."""
    if isinstance(log, StepRows):
        return log
    if isinstance(log, (list, tuple)) and log and all(isinstance(x, StepRows) for x in log):
        return StepRows.concat(log)
    if isinstance(log, (str, os.PathLike)):
        path = os.fspath(log)
        if os.path.isdir(path):
            reader = LogReader(path)
            ids, rows = reader.read_all()
            return StepRows(ids, rows.float(), reader.manifest.modules,
                           dict(reader.manifest.projection))
        if os.path.isfile(path):
            return StepRows.load(path)
        raise UsageError(f"Query log {path!r} does not exist.")
    if log is None:
        raise UsageError("Pass the query log: a StepRows (run.get_log()), a list of them, a file "
                         "written by StepRows.save, or the folder of a logged query project.")
    raise UsageError(f"Expected a StepRows from run.get_log() (or a list of them, a StepRows file "
                     f"or a project folder), got {type(log).__name__}.")


def check_config(cfg: InfluenceConfig, query: bool = False) -> InfluenceConfig:
    """`cfg`, its `hessian` a kind of the curvature registry or 'auto' (config.py, below the
    registry, leaves this check to the layers that read it: this one and the Run). query: the
    hessian is a query argument (a UsageError), not a config key (a ConfigError)."""
    allowed = [curvature.AUTO, *curvature.names()]
    if cfg.hessian not in allowed:
        what = "Invalid query argument: argument" if query else "Config key"
        raise (UsageError if query else ConfigError)(
            f"{what} 'hessian' is {cfg.hessian!r}; allowed values: {allowed}.")
    return cfg


def _influence_config(config, manifest) -> InfluenceConfig:
    """The influence settings: given, else the logging run's snapshot, else the defaults."""
    if isinstance(config, Config):
        return config.influence
    if isinstance(config, InfluenceConfig):
        return config
    if config is not None:
        raise UsageError(f"config must be a logix.Config, an InfluenceConfig or None, got "
                         f"{type(config).__name__}.")
    saved = (manifest.config.get("influence") if manifest else None) or {}
    if saved.get("lissa_scale") is not None and "lissa_solver" not in saved:
        saved = {**saved, "lissa_solver": "neumann"}  # a log from before lissa_solver existed
    known = {f.name for f in dataclasses.fields(InfluenceConfig)}
    return load_config(None, influence={k: v for k, v in saved.items() if k in known}).influence


def _check_layout(src: StepRows, saved_modules, saved_projection: dict, what: str) -> None:
    fix = ("Query with the same watched layers and projections: in a new process call "
           "run.watch(model) then run.initialize_from_log().")
    if list(src.modules) != list(saved_modules):
        mine, theirs = next((a, b) for a, b in itertools.zip_longest(src.modules, saved_modules)
                            if a != b)
        raise UsageError(f"The query's tracked layers differ from the {what}'s "
                         f"({len(src.modules)} vs {len(saved_modules)} layers); the first that "
                         f"differs: query {_describe(mine)}, {what} {_describe(theirs)}. " + fix)
    dim = sum(m.dim for m in saved_modules)
    if src.grads.dim() != 2 or src.grads.shape[1] != dim:
        raise UsageError(f"The query's rows are {tuple(src.grads.shape)}, but the {what}'s "
                         f"layers make rows of {dim} numbers: pass [n_queries, {dim}] (a log "
                         "from run.get_log(), not rows edited or built by hand).")
    mine, theirs = src.projection.get("checksum"), (saved_projection or {}).get("checksum")
    if mine and theirs and mine != theirs:
        raise UsageError(f"The query's LoGra projections (init {src.projection.get('init')!r}, "
                         f"seed {src.projection.get('seed')}) differ from the {what}'s (init "
                         f"{saved_projection.get('init')!r}, seed {saved_projection.get('seed')})"
                         f": scores would be meaningless. " + fix)


def _describe(module: Optional[ModuleEntry]) -> str:
    if module is None:
        return "none"
    return (f"{module.name!r} ({module.type} {module.in_dim} -> {module.out_dim}, rank "
            f"{module.rank_out} x {module.rank_in})")


__all__ = ["Attributor", "MODES"]

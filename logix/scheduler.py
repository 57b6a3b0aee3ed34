"""LogIXScheduler: the passes over the data that a choice of projection and curvature needs.

    scheduler = LogIXScheduler(run, lora="pca", hessian="ekfac", save="grad")
    for _ in scheduler:                 # one iteration = one pass (epoch) over the data
        for batch in loader:
            with run(data_id=batch["ids"]):
                loss_fn(model, batch).backward()

Passes, in order:
1. ``lora="pca"`` only: a statistics pass without projections that collects the forward and
   backward covariances PCA needs (nothing is logged or written).
2. The logging pass: projections are added before it (``add_lora(init=...)``), it collects the
   curvature ``hessian`` asks for (raw: projected-gradient covariance; kfac / ekfac: forward and
   backward covariances; ekfac's corrected eigenvalues are then fitted from the saved rows by
   `run.finalize()`) and, with ``save="grad"``, writes the projected gradients to disk.

Saving is switched on for the logging pass only; when the iteration ends the run is finalized
(flush, reduce statistics across processes, save state) and saving is put back as it was. If it
was on, a later step must say whether it is a query (`run.eval()`) or more training rows
(`run.save(True)`): see `Run.start`. The logging pass declares
``hessian`` as the run's curvature: queries use it unless told otherwise.
"""

from __future__ import annotations

from typing import Dict, List, Literal, get_args

from logix.errors import ConfigError, UsageError
from logix.influence import curvature

Lora = Literal["none", "random", "pca"]
Save = Literal["none", "grad"]

_COVARIANCE = ["covariance"]


class LogIXScheduler:
    """An iterable of pass indices; each step of the iteration prepares the run for one pass.

    Args:
        run: the `logix.Run` to drive; watch the model before iterating.
        lora: "none" (full gradients), "random" or "pca" LoGra projections.
        hessian: curvature collected during the logging pass, a kind of
            `logix.influence.curvature` (`curvature.names()`); queries then use it unless told
            otherwise.
        save: "grad" writes the logging pass's projected gradients to disk; "none" keeps only
            the last step in memory (`run.get_log()`).
    """

    def __init__(self, run, lora: Lora = "none", hessian: str = "none",
                 save: Save = "grad") -> None:
        for key, value, allowed in (("lora", lora, get_args(Lora)),
                                    ("hessian", hessian, curvature.names()),
                                    ("save", save, get_args(Save))):
            if value not in allowed:
                raise ConfigError(f"LogIXScheduler {key}={value!r}; allowed values: "
                                  f"{list(allowed)}.")
        if curvature.get(hessian).needs_rows and save != "grad":
            raise ConfigError(f"LogIXScheduler hessian={hessian!r} is fitted from the saved "
                              "gradient logs: use save='grad'.")
        self.run = run
        self.lora, self.hessian, self.save = lora, hessian, save
        self._passes: List[Dict[str, List[str]]] = self._setups()
        self._next = 0
        self._saving_before = None
        self._done = False

    def _setups(self) -> List[Dict[str, List[str]]]:
        """Each pass's `run.setup` argument."""
        passes = []
        if self.lora == "pca":
            passes.append({"forward": _COVARIANCE, "backward": _COVARIANCE})
        logging_pass: Dict[str, List[str]] = {}
        if self.save == "grad":
            logging_pass["grad"] = ["log"]
        for stage, items in curvature.get(self.hessian).setup_spec().items():
            logging_pass.setdefault(stage, []).extend(items)
        passes.append(logging_pass)
        return passes

    def __len__(self) -> int:
        """Number of passes over the data."""
        return len(self._passes)

    @property
    def logging_pass(self) -> int:
        """Index of the pass that logs gradients (always the last one)."""
        return len(self._passes) - 1

    def __iter__(self) -> "LogIXScheduler":
        return self

    def __next__(self) -> int:
        if self._done:
            raise StopIteration
        if self._next == len(self._passes):
            self._finish()
            raise StopIteration
        index = self._next
        if not self.run.modules:
            raise UsageError("LogIXScheduler needs watched layers: call run.watch(model) before "
                             "iterating over the scheduler.")
        if index == self.logging_pass:
            self._enter_logging_pass()
        self.run.setup(self._passes[index])
        self._next += 1
        return index

    def _enter_logging_pass(self) -> None:
        run = self.run
        run.declare_curvature(self.hessian)
        if self.lora != "none":
            run.add_lora(init=self.lora)  # PCA: add_lora reduces the covariances across ranks
        if self.save == "grad":
            self._saving_before = run.saving
            run.save(True)

    def _finish(self) -> None:
        self._done = True
        try:
            self.run.finalize()
        finally:  # a finalized run stays closed to more rows until save(True) (Run.start)
            before = self._saving_before
            if before is not None and not (before and self.run.finalized):
                self.run.save(before)

    def __repr__(self) -> str:
        return (f"LogIXScheduler(lora={self.lora!r}, hessian={self.hessian!r}, "
                f"save={self.save!r}, passes={len(self)})")

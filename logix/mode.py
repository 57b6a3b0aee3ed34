"""The mode of a Run: one state, what the calls that change it do, and what steps do in it."""

from __future__ import annotations

import enum

from logix.errors import UsageError


class Mode(enum.Enum):
    """What the next step does (`run.mode`)."""

    SETUP = "setup"  # steps collect what setup() asks; rows stay in memory, nothing is written
    LOGGING = "logging"  # save(True): steps append their rows (and statistics) to the log
    QUERY = "query"  # eval(): gradients kept in memory; no statistics, nothing written
    FINALIZED = "finalized"  # finalize() closed the log while saving: a writing step is refused

    @property
    def saving(self) -> bool:
        """Whether save(True) is in effect (FINALIZED: asked for, refused until reopened)."""
        return self in (Mode.LOGGING, Mode.FINALIZED)

    def after(self, call: str) -> "Mode":
        """The mode after `call` (a key of TRANSITIONS)."""
        return TRANSITIONS[call].get(self, self)

    def refuse(self, what: str, fix: str) -> UsageError:
        return UsageError(f"{what} (the run is in {self.value} mode). {fix}")

    def check_step(self, spec, per_token: bool) -> bool:
        """Refuse a step this mode does not take (`spec`: the run's CaptureSpec); whether the
        step writes rows."""
        writes = self.saving and spec.log_grad
        if per_token and (writes or not spec.log_grad):
            raise self.refuse("per_token=True is for queries", "Call run.eval() first "
                              "(gradients kept in memory, nothing written).")
        if self is Mode.FINALIZED and writes:
            raise self.refuse(
                "run.finalize() closed this training log, and saving is still on: this step "
                "would append its rows to it", "For a query, call run.eval() first (gradients "
                "kept in memory, nothing written, statistics unchanged); to log more training "
                "rows into this project, call run.save(True) again.")
        return writes


# call -> {mode before: mode after}; a mode not listed stays as it is.
TRANSITIONS = {
    "save(True)": {mode: Mode.LOGGING for mode in Mode},
    "save(False)": {Mode.LOGGING: Mode.SETUP, Mode.FINALIZED: Mode.SETUP},
    "eval()": {mode: Mode.QUERY for mode in Mode},
    "finalize()": {Mode.LOGGING: Mode.FINALIZED},
}

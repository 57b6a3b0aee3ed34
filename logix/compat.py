"""Older names, in one place: what each became, and whether using it warns.

LogIX 0.1 scripts keep working unchanged: their calls are this SDK's calls, and LogIX's own names
that differ from ours stay without a warning. Names this SDK has renamed since warn once per
process (a DeprecationWarning) and will go in a later version.

| old name | new name | warns |
| --- | --- | --- |
| `logix.huggingface`, `logix.lightning` (modules) | `logix.integrations.huggingface`, `logix.integrations.lightning` | no |
| `logix.huggingface.patch_trainer`, `LogIXArguments` | kept (a `Trainer` with `LogIXCallback`) | no |
| `logix.lightning.patch`, `LogIXArguments` | kept (a `Trainer` with `LogIXCallback`) | no |
| `compute_influence_all(src_log, loader, method=...)` | kept: LogIX's entry point to `Attributor.influence` / `source` / `tracin` / `ensemble` | no |
| `compute_self_influence(src_log)` | `Attributor.self_influence(query)` | no |
| `build_log_dataloader(batch_size)` | `run.reader()` (`block_rows` rows per block) | no |
| `add_lora(clear=True)` | `add_lora()`: statistics of the old space are always reset (`clear=False` is refused) | yes |
| `StepLog` | `logix.StepRows` (a step's or a query's rows in memory; a log is what is saved) | yes |
| `run.plan` | `run.capture_spec` | yes |
| `Plan`, `plan_from_setup` | `logix.tracking.capture.CaptureSpec`, `spec_from_setup` | yes |
| `ScorePlan`, `Attributor.score_plan` | `logix.influence.scoring.Scorer`, `Attributor.scorer` | yes |
| `Attributor.fit_ekfac()` | `Attributor.fit("ekfac")` | yes |
| `run.search(src_log=...)` | `run.search(query=...)`, as `Attributor.search` | yes |

`Run` and `logix.Attributor` take their old method names from `RunNames` and `AttributorNames`;
the old module-level names are attributes of this module (and of `logix`).
"""

from __future__ import annotations

import functools
import warnings
from typing import Optional, Union

from logix.errors import UsageError
from logix.influence.scoring import Scorer
from logix.log import StepRows
from logix.tracking.capture import CaptureSpec, spec_from_setup

_warned: set = set()  # the old names that have warned in this process

# old module-level name -> (its new name, the object)
RENAMED = {
    "StepLog": ("logix.StepRows", StepRows),
    "Plan": ("logix.tracking.capture.CaptureSpec", CaptureSpec),
    "plan_from_setup": ("logix.tracking.capture.spec_from_setup", spec_from_setup),
    "ScorePlan": ("logix.influence.scoring.Scorer", Scorer),
}


def deprecated(old: str, new: str, stacklevel: int = 3) -> None:
    """Warn, once per process, that `old` is now `new` (a DeprecationWarning pointing at the
    caller's caller: the user's line)."""
    if old in _warned:
        return
    _warned.add(old)
    warnings.warn(f"{old} is deprecated: use {new} (logix.compat lists the old names).",
                  DeprecationWarning, stacklevel=stacklevel)


def old_name(name: str, stacklevel: int = 3):
    """The object an old module-level name stands for (it warns); AttributeError otherwise."""
    if name not in RENAMED:
        raise AttributeError(f"module 'logix.compat' has no attribute {name!r}")
    new, value = RENAMED[name]
    deprecated(name, new, stacklevel + 1)
    return value


def __getattr__(name: str):
    return old_name(name)


def renamed_argument(old: str, new: str):
    """A decorator: the keyword argument `old` is accepted as `new`, with a warning."""
    def wrap(function):
        @functools.wraps(function)
        def call(*args, **kwargs):
            if old in kwargs:
                if new in kwargs:
                    raise UsageError(f"{function.__name__}() got {new}= and {old}= (its old "
                                     f"name): pass {new}= only.")
                deprecated(f"{function.__name__}({old}=...)", f"{function.__name__}({new}=...)")
                kwargs[new] = kwargs.pop(old)
            return function(*args, **kwargs)

        return call

    return wrap


def check_clear(clear: Optional[bool]) -> None:
    """`add_lora(clear=...)`: LogIX's flag. New projections always reset the statistics."""
    if clear is None:
        return
    if not clear:
        raise UsageError("add_lora(clear=False) would keep statistics of the unprojected space "
                         "next to projected ones; they cannot be mixed.")
    deprecated("add_lora(clear=True)", "add_lora() (statistics of the old space are always "
               "reset)", stacklevel=4)


class RunNames:
    """`Run`'s older method names."""

    @property
    def plan(self) -> CaptureSpec:
        """Deprecated: `run.capture_spec`."""
        deprecated("run.plan", "run.capture_spec")
        return self.capture_spec

    @plan.setter
    def plan(self, spec: CaptureSpec) -> None:
        deprecated("run.plan", "run.capture_spec")
        self.capture_spec = spec

    def build_log_dataloader(self, batch_size: Optional[int] = None):
        """LogIX's name: `run.reader()`, an iterable of saved row blocks (`batch_size` rows
        each; default influence.block_rows)."""
        reader = self.reader()
        reader.block_rows = batch_size or self.config.influence.block_rows
        return reader


class AttributorNames:
    """`logix.Attributor`'s older method names."""

    def compute_self_influence(self, src_log=None, loader=None, precondition: bool = True,
                               hessian: Optional[str] = None,
                               damping: Union[None, str, float] = None,
                               block_rows: Optional[int] = None, progress: bool = True):
        """LogIX's name of `self_influence` (src_log: its query)."""
        return self.self_influence(src_log, loader=loader, precondition=precondition,
                                   hessian=hessian, damping=damping, block_rows=block_rows,
                                   progress=progress)

    def fit_ekfac(self, reader=None, progress: bool = True) -> None:
        """Deprecated: `fit("ekfac")`."""
        deprecated("Attributor.fit_ekfac()", 'Attributor.fit("ekfac")')
        self.fit("ekfac", reader, progress)

    def score_plan(self, *args, **kwargs) -> Scorer:
        """Deprecated: `scorer`."""
        deprecated("Attributor.score_plan", "Attributor.scorer")
        return self.scorer(*args, **kwargs)

"""LogIX: training data attribution as easy as experiment tracking.

    run = logix.init(project="demo")
    run.watch(model); run.add_lora(); run.setup({"grad": ["log"]}); run.save(True)
    with run(data_id=ids): loss.backward()
    run.finalize()
"""

from __future__ import annotations

import functools
from typing import Any, Optional

from logix import compat
from logix.config import Config, load_config
from logix.errors import ConfigError, LogFormatError, LogIXError, UsageError, WriterError
from logix.index.attributor import Attributor
from logix.influence.magic import MagicRecorder, magic_scores
from logix.influence.results import Scores
from logix.log import StepRows
from logix.mode import Mode
from logix.run import Run
from logix.scheduler import LogIXScheduler
from logix.tracking.frozen import frozen

__version__ = "0.2.0"

_current: Optional[Run] = None


def init(project: str, config: Any = None, **overrides: Any) -> Run:
    """Start a project. `config` is a YAML path, a dict with the YAML's keys, a Config, or None
    for defaults; keyword overrides use the config's keys (`root_dir="..."`, `lora={"rank": 16}`,
    `rank=16`)."""
    global _current
    cfg = config if isinstance(config, Config) else load_config(config, **overrides)
    if isinstance(config, Config) and overrides:
        cfg = load_config(None, **{**config.to_dict(), **overrides})
    _current = Run(project, cfg)
    return _current


def get_run() -> Run:
    """The run of the last `logix.init` (what the module-level shortcuts such as
    `logix.watch` call)."""
    if _current is None:
        raise UsageError("No active LogIX run: call logix.init(project) first.")
    return _current


def _shortcut(name: str):
    """`logix.<name>(...)`: `get_run().<name>(...)`, with the method's docstring."""
    method = getattr(Run, name)

    @functools.wraps(method)
    def call(*args, **kwargs):
        return getattr(get_run(), name)(*args, **kwargs)

    return call


watch = _shortcut("watch")
add_lora = _shortcut("add_lora")
setup = _shortcut("setup")
save = _shortcut("save")
start = _shortcut("start")
end = _shortcut("end")
get_log = _shortcut("get_log")
eval = _shortcut("eval")  # noqa: A001 (LogIX's name)
clear = _shortcut("clear")
flush = _shortcut("flush")
finalize = _shortcut("finalize")
initialize_from_log = _shortcut("initialize_from_log")
build_log_dataloader = _shortcut("build_log_dataloader")
compute_influence_all = _shortcut("compute_influence_all")
compute_influence = _shortcut("compute_influence")
compute_self_influence = _shortcut("compute_self_influence")
summary = _shortcut("summary")


def __getattr__(name: str):
    """`logix.text` is imported on first use (it pulls in more); older names come from
    logix.compat (with a DeprecationWarning)."""
    if name == "text":
        import importlib

        return importlib.import_module(f"logix.{name}")
    if name in compat.RENAMED:
        return compat.old_name(name)
    raise AttributeError(f"module 'logix' has no attribute {name!r}")


__all__ = ["init", "Run", "Attributor", "Scores", "Mode", "LogIXScheduler", "Config",
           "load_config", "StepRows", "get_run", "frozen", "LogIXError", "ConfigError",
           "UsageError", "LogFormatError", "WriterError", "MagicRecorder", "magic_scores",
           # the current run's methods (get_run().<name>)
           "watch", "add_lora", "setup", "save", "start", "end", "get_log", "eval", "clear",
           "flush", "finalize", "initialize_from_log", "build_log_dataloader",
           "compute_influence_all", "compute_influence", "compute_self_influence", "summary"]

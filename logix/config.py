"""Configuration: one dataclass per concern, validated on construction.

The YAML file uses LogIX's key names (``root_dir``, ``logging``, ``lora``) so existing files keep
working. Every key is optional and so is the file. Unknown keys are errors.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional, Union, get_args, get_origin

import yaml

from logix.errors import ConfigError, UsageError

LogDtype = Literal["float32", "bfloat16", "float16"]
LoraInit = Literal["random", "pca"]
Mode = Literal["dot", "cosine", "l2"]
LissaSolver = Literal["cg", "neumann"]

# Old LogIX wrote `log_dtype: none` for "the model's dtype"; we log float32 then.
_DTYPE_ALIASES = {"none": "float32", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16",
                  "float": "float32", "half": "float16"}


def _help(text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass
class LoggingConfig:
    flush_threshold: int = _help(
        "Numbers (rows x row width) per shard: 8M = 32 MiB of float32 rows.", 1 << 23)
    shard_rows: Optional[int] = _help(
        "Rows per shard; overrides flush_threshold when set.", None)
    num_workers: int = _help("Writer threads that serialise shards to disk.", 1)
    queue_size: int = _help("Shards waiting for a writer before end() blocks (bounds memory).", 2)
    cpu_offload: bool = _help("Keep statistics on the CPU instead of the model's device.", False)
    log_dtype: LogDtype = _help("dtype of the logged rows on disk.", "float32")
    include_bias: bool = _help("Log the bias gradient too (a constant 1 appended to inputs).", False)
    on_duplicate: Literal["skip", "error", "allow"] = _help(
        "A data id already in the log (e.g. a resumed run, a second epoch): skip its row with a "
        "warning, raise, or log it again.", "skip")
    nonfinite: Literal["error", "skip"] = _help(
        "What to do with a step whose gradients contain NaN or inf: raise, or skip the whole "
        "step (every row of its batch, and its statistics) with a warning.",
        "error")
    on_unused_layer: Literal["error", "zero"] = _help(
        "A watched layer that runs no forward, or whose output gets no gradient, in a step: "
        "raise, or log zeros for it (a layer legitimately unused in some steps).", "error")
    max_statistics_bytes: Optional[int] = _help(
        "Memory that statistics and one shard of rows may take; run.watch / add_lora / setup "
        "refuse more. null: half of the RAM, or of the GPU's memory where statistics live.",
        None)

    def __post_init__(self) -> None:
        if isinstance(self.log_dtype, str):
            self.log_dtype = _DTYPE_ALIASES.get(self.log_dtype.lower(), self.log_dtype.lower())
        _positive(self, "flush_threshold", "num_workers", "queue_size")
        for key in ("shard_rows", "max_statistics_bytes"):
            if getattr(self, key) is not None:
                _positive(self, key)


@dataclass
class LoraConfig:
    init: LoraInit = _help("How projections are initialised: seeded Gaussian or PCA.", "random")
    rank: int = _help(
        "Projection rank for both sides; a side no wider than it is not projected.", 64)
    rank_in: Optional[int] = _help("Input-side rank; overrides `rank` when set.", None)
    rank_out: Optional[int] = _help("Output-side rank; overrides `rank` when set.", None)

    def __post_init__(self) -> None:
        _positive(self, "rank")
        for key in ("rank_in", "rank_out"):
            if getattr(self, key) is not None:
                _positive(self, key)


@dataclass
class InfluenceConfig:
    hessian: str = _help(
        "Preconditioner: a kind of logix.influence.curvature, or 'auto': the kind the logging run "
        "declared (its scheduler's hessian), else the best the statistics allow "
        "(ekfac > kfac > raw > none; kfac first where one example dominates the empirical "
        "Fisher).",
        "auto")
    mode: Mode = _help("Score: dot product, cosine similarity, or negative squared distance.", "dot")
    damping: Union[float, str, None] = _help(
        "Damping added to each module's curvature: 'auto' (chosen per module from the log, see "
        "docs/concepts.md), 'relative' (relative_damping x the module's mean eigenvalue) or a "
        "number >= 0 (that absolute value for every module). Unset: 'relative' when "
        "relative_damping is set, else 'auto'.", None)
    relative_damping: Optional[float] = _help(
        "The relative rule's factor (unset: 0.1); setting it with damping unset selects that "
        "rule.", None)
    block_rows: int = _help("Training rows read per streamed block, at most 256 MiB of float32 "
                            "rows (scores do not depend on it).", 8192)
    lissa_solver: LissaSolver = _help(
        "hessian='lissa': 'cg' (conjugate gradients: about sqrt(condition number) streaming "
        "passes) or 'neumann' (the LiSSA recursion: about condition number passes).", "cg")
    lissa_depth: int = _help("hessian='lissa': most solver steps (streaming passes) per query "
                             "solve.", 1000)
    lissa_scale: Optional[float] = _help(
        "hessian='lissa', lissa_solver='neumann': the recursion's scale, above the largest "
        "eigenvalue of F + damping I (default: estimated per module by 20 power-iteration "
        "passes).", None)
    lissa_tol: float = _help("hessian='lissa': stop once every query's relative residual "
                             "||g - (F + damping I) x|| / ||g|| is at most this.", 1e-4)
    verify: bool = _help(
        "Check each shard's checksum against the manifest the first time a process reads it "
        "(cached by path, size and modification time); false reads shards unchecked.", True)

    def __post_init__(self) -> None:
        # `hessian` is checked against the curvature registry where the influence layer reads
        # the config (logix.influence.attributor.check_config), above this module.
        if isinstance(self.damping, bool) or not (
                self.damping in (None, "auto", "relative") or
                isinstance(self.damping, (int, float)) and 0 <= self.damping < math.inf):
            raise ConfigError(f"influence.damping must be a finite number >= 0, 'auto', "
                              f"'relative' or null, got {self.damping!r}.")
        if self.relative_damping is not None and not 0 <= self.relative_damping < math.inf:
            raise ConfigError(f"influence.relative_damping must be a finite number >= 0 or null, "
                              f"got {self.relative_damping}.")
        _positive(self, "block_rows")
        _positive(self, "lissa_depth")
        if self.lissa_scale is not None and not 0 < self.lissa_scale < math.inf:
            raise ConfigError(f"influence.lissa_scale must be a finite number > 0 or null, got "
                              f"{self.lissa_scale}.")
        if self.lissa_scale is not None and self.lissa_solver != "neumann":
            raise ConfigError(f"influence.lissa_scale={self.lissa_scale} is the scale of "
                              f"lissa_solver='neumann', and the solver is "
                              f"{self.lissa_solver!r} (which has none): pass "
                              "lissa_solver='neumann' with it, or leave lissa_scale unset.")
        if not 0 <= self.lissa_tol < math.inf:
            raise ConfigError(f"influence.lissa_tol must be a finite number >= 0, got "
                              f"{self.lissa_tol}.")


@dataclass
class Config:
    root_dir: str = _help("Folder that holds one sub-folder per project (not ./logix: a folder "
                          "named like the package would hide it from `import logix`).",
                          "./logix_logs")
    seed: int = _help("Seed of the random projections (each module also mixes in its name).", 0)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    influence: InfluenceConfig = field(default_factory=InfluenceConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config(path: Union[str, os.PathLike, Mapping, None] = None, **overrides: Any) -> Config:
    """Build a Config from an optional YAML file (or a mapping with the file's keys, e.g.
    ``{"logging": {"log_dtype": "bfloat16"}}``), then keyword overrides.

    Overrides use the same keys: ``root_dir="..."``, ``lora={"rank": 16}``, or a flat key of a
    section such as ``rank=16`` or ``log_dtype="bfloat16"`` when the name is unambiguous. A flat
    override of None counts as not given (as query arguments do); to unset a key the file sets,
    use its section: ``influence={"damping": None}``.
    """
    data: dict = {}
    if isinstance(path, Mapping):
        data = copy.deepcopy(dict(path))
    elif path is not None:
        if not isinstance(path, (str, os.PathLike)):
            raise ConfigError(f"config must be a YAML file's path, a dict with its keys, a Config "
                              f"or None; got {type(path).__name__}.")
        if not os.path.isfile(path):
            raise ConfigError(f"Config file {str(path)!r} does not exist. Pass config=None to use "
                              "the defaults, or the path of a YAML file.")
        loaded = _read_yaml(path) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"Config file {str(path)!r} must hold a mapping, got "
                              f"{type(loaded).__name__}.")
        data = loaded
    for key, value in overrides.items():
        if value is None:
            continue
        section = _section_of(key)
        if section is None and key in _sections() and isinstance(value, Mapping):
            data[key] = {**(data.get(key) or {}), **value}  # merge, keep other keys of the file
        elif section is None:
            data[key] = value
        else:
            data.setdefault(section, {})
            if data[section] is None:
                data[section] = {}
            data[section][key] = value
    return _build(Config, data, "")


def query_settings(base: InfluenceConfig, **given: Any) -> InfluenceConfig:
    """`base` with the query arguments that were given (None: keep the config's value), checked
    by the same rules as the config's influence section. Raises UsageError naming the argument."""
    data = {**dataclasses.asdict(base), **{k: v for k, v in given.items() if v is not None}}
    try:
        return _build(InfluenceConfig, data, "")
    except ConfigError as e:
        raise UsageError(f"Invalid query argument: {e}".replace("Config key", "argument")
                         ) from None


def _section_of(key: str) -> Optional[str]:
    """The section that owns a flat key, or None for a top-level key."""
    top = _field_names(Config)
    if key in top:
        return None
    owners = [name for name, cls in _sections().items() if key in _field_names(cls)]
    if len(owners) == 1:
        return owners[0]
    raise ConfigError(f"Unknown config key {key!r}. Top-level keys: {top}; section keys: "
                      + "; ".join(f"{s}: {_field_names(c)}" for s, c in _sections().items()))


def _sections() -> dict:
    return {f.name: f.default_factory for f in dataclasses.fields(Config)
            if f.default_factory is not dataclasses.MISSING}


def _field_names(cls) -> list:
    return [f.name for f in dataclasses.fields(cls)]


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict:
    """A config class's resolved field types (resolving them compiles each annotation: worth
    keeping, since every query checks its arguments through `_build`)."""
    return typing.get_type_hints(cls)


def _build(cls, data: Any, prefix: str):
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"Config section {prefix.rstrip('.') or 'root'!r} must be a mapping, got "
                          f"{data!r}.")
    hints = _hints(cls)
    names = _field_names(cls)
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"Unknown config key(s) {[prefix + k for k in unknown]}. Allowed keys"
                          f"{' in ' + prefix.rstrip('.') if prefix else ''}: {names}.")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        value, hint = data[name], hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(f"{prefix}{name}", value, hint)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"Invalid config{' section ' + prefix.rstrip('.') if prefix else ''}: {e}"
                          ) from e


def _check_type(key: str, value: Any, hint: Any) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) > 1:  # several types (influence.damping): __post_init__ checks the value
            return float(value) if isinstance(value, int) and not isinstance(value, bool) \
                else value
        return _check_type(key, value, inner[0])
    if origin is Literal:
        if isinstance(value, str) and key.endswith("log_dtype"):
            value = _DTYPE_ALIASES.get(value.lower(), value.lower())
        if value not in args:
            raise ConfigError(f"Config key {key!r} is {value!r}; allowed values: {list(args)}.")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"Config key {key!r} must be true or false, got {value!r}.")
        return value
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"Config key {key!r} must be an integer, got {value!r}.")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"Config key {key!r} must be a number, got {value!r}.")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, os.PathLike)):
            raise ConfigError(f"Config key {key!r} must be a string, got {value!r}.")
        return os.fspath(value)
    return value


def _positive(obj: Any, *keys: str) -> None:
    for key in keys:
        value = getattr(obj, key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"`{key}` must be a positive integer, got {value!r}.")


def _read_yaml(path) -> object:
    """A YAML file's content; a ConfigError naming the file, line and column when it does not
    parse."""
    with open(path, "rb") as f:
        try:
            return yaml.safe_load(f)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or str(e)
            raise ConfigError(f"Config file {str(path)!r} is not valid YAML{where}: {problem}. "
                              "Fix the syntax there (e.g. indentation, a missing ':' or "
                              "quote).") from None

"""LogIXArguments: the settings old LogIX's `patch_trainer` / `lightning.patch` took.

One base class holds what both integrations share; each integration adds only its own keys, so
the two cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Union

from logix.errors import ConfigError
from logix.influence import curvature

_SAVES = ("none", "grad")
_LORAS = ("none", "random", "pca")


@dataclass
class BaseLogIXArguments:
    project: str = field(default="tmp_logix", metadata={"help": "Project name (log folder)."})
    config: Optional[str] = field(
        default=None, metadata={"help": "Path of a LogIX config.yaml; None uses the defaults."})
    lora: Union[bool, str] = field(
        default=False, metadata={"help": "LoGra projections: False/'none', True (the config's "
                                         "lora.init), 'random' or 'pca'."})
    hessian: str = field(default="none", metadata={"help": "A curvature kind: " + ", ".join(
        map(repr, curvature.names())) + "."})
    save: str = field(default="none", metadata={"help": "'grad' writes gradients; 'none'."})
    initialize_from_log: bool = field(
        default=False, metadata={"help": "Load projections and statistics of an earlier log "
                                         "(query time)."})
    name_filter: List[str] = field(
        default_factory=list, metadata={"help": "Watch layers whose name holds one of these."})
    type_filter: List[type] = field(
        default_factory=list, metadata={"help": "Watch layers of these classes."})
    log_batch_size: int = field(
        default=16, metadata={"help": "Batch size of post-hoc logging and queries."})
    log_num_workers: int = field(default=1, metadata={"help": "Kept for LogIX compatibility."})
    influence_damping: Optional[float] = field(
        default=None, metadata={"help": "Absolute damping of influence queries (None: the "
                                        "config's, 'auto' by default)."})
    influence_mode: str = field(default="dot", metadata={"help": "'dot', 'cosine' or 'l2'."})

    def __post_init__(self) -> None:
        self.mode = "log"
        if self.hessian not in curvature.names():
            raise ConfigError(f"LogIXArguments.hessian={self.hessian!r}; allowed: "
                              f"{list(curvature.names())}.")
        if self.save not in _SAVES:
            raise ConfigError(f"LogIXArguments.save={self.save!r}; allowed: {list(_SAVES)}.")
        if not isinstance(self.lora, bool) and self.lora not in _LORAS:
            raise ConfigError(f"LogIXArguments.lora={self.lora!r}; allowed: True, False or "
                              f"{list(_LORAS)}.")

    def lora_init(self, run) -> str:
        """The scheduler's `lora` choice for this run."""
        if self.lora is True:
            return run.config.lora.init
        return "none" if self.lora is False else self.lora

    def influence_kwargs(self) -> dict:
        out = {"mode": self.influence_mode}
        if self.influence_damping is not None:
            out["damping"] = self.influence_damping
        return out

"""A replayable training run, recorded for exact attribution (MAGIC, `logix.influence.magic`).

    <folder>/                           (by default <root_dir>/<project>/replay)
      replay.json                       the record: optimizer kind and hyperparameters, the
                                        reduction of the per-example losses, seeds, the
                                        checkpoints' steps, whether the run finished
      checkpoint-<step>.safetensors     trained parameters ("param::<name>") and optimizer state
                                        ("state::<name>::<key>") before step <step> (0-based),
                                        every `every` steps and after the last one
      steps-<start>.json                the steps from checkpoint <start> to the next one: per
                                        step the data ids in order and the lr of each group

Every file is written atomically (temporary name, fsync, rename), each steps file once, before
its closing checkpoint; `replay.json` (small) is rewritten at each checkpoint, so after a crash
it describes the steps up to the last complete checkpoint and says the run did not finish. `MagicRecorder` writes a record; `load_record` reads it back and
refuses one that cannot be replayed, naming why.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from logix.errors import LogFormatError, UsageError
from logix.storage.data_ids import normalize_data_ids
from logix.storage.format import KEY_SEP, atomic_write

REPLAY_DIR = "replay"
RECORD_FILE = "replay.json"
REPLAY_FORMAT, REPLAY_FORMAT_VERSION = "logix-replay", 1
PARAM_PREFIX, STATE_PREFIX = "param", "state"
REDUCTIONS = ("mean", "sum")

# Supported optimizers: the exact class, its kind in the record, the hyperparameters the replay
# uses (besides lr), and the settings it cannot replay (with the only value it accepts).
_SUPPORTED = {
    torch.optim.SGD: ("sgd", ("momentum", "dampening", "weight_decay", "nesterov"),
                      {"maximize": False}),
    torch.optim.Adam: ("adam", ("betas", "eps", "weight_decay"),
                       {"amsgrad": False, "maximize": False, "decoupled_weight_decay": False}),
    torch.optim.AdamW: ("adamw", ("betas", "eps", "weight_decay"),
                        {"amsgrad": False, "maximize": False}),
}
SUPPORTED_OPTIMIZERS = ("torch.optim.SGD (momentum, dampening, nesterov, weight_decay)",
                        "torch.optim.Adam (weight_decay, no amsgrad)",
                        "torch.optim.AdamW (no amsgrad)")
_STOCHASTIC = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
               nn.FeatureAlphaDropout)


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}.safetensors"


def steps_name(start: int) -> str:
    return f"steps-{start:08d}.json"


def optimizer_kind(optimizer: torch.optim.Optimizer) -> Tuple[str, Tuple[str, ...]]:
    """(kind, hyperparameter names) of a supported optimizer; UsageError naming the supported
    ones otherwise (the exact class: a subclass may change the step)."""
    spec = _SUPPORTED.get(type(optimizer))
    if spec is None:
        raise UsageError(f"MAGIC cannot replay {type(optimizer).__module__}."
                         f"{type(optimizer).__name__}: its update rule is not implemented. "
                         f"Supported optimizers: {', '.join(SUPPORTED_OPTIMIZERS)}.")
    kind, names, fixed = spec
    for group in optimizer.param_groups:
        for key, allowed in fixed.items():
            if group.get(key, allowed) != allowed:
                raise UsageError(f"MAGIC cannot replay {type(optimizer).__name__} with "
                                 f"{key}={group[key]!r} (only {key}={allowed!r}). Supported "
                                 f"optimizers: {', '.join(SUPPORTED_OPTIMIZERS)}.")
    return kind, names


def _plain(value):
    if isinstance(value, Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


class MagicRecorder:
    """Records a training run so that it can be replayed exactly (see `logix.influence.magic`).

        recorder = MagicRecorder(folder, model, optimizer, every=10, reduction="mean")
        for ids, batch in loader:
            recorder.record(ids)            # the data ids of this step's batch, in order
            optimizer.zero_grad()
            loss_fn(model, batch).mean().backward()   # per-example losses, reduced
            optimizer.step()                # hooked: lr used, checkpoint every `every` steps
            scheduler.step()                # any lr schedule: the lr of each step is kept
        recorder.finish()                   # the final checkpoint; the record is complete

    A step of the optimizer without `record(ids)` before it, a change of a hyperparameter other
    than lr, or a stochastic layer (dropout) in training mode makes the run not replayable: the
    record keeps the reason (and warns), and scoring refuses it. `reduction` says how the
    per-example losses of a batch were reduced into the training loss ("mean": divided by the
    batch size, "sum"). `seed`: the seed the user trained with, kept in the record.
    Checkpoints hold the trained parameters and the optimizer state: T / every of them on disk.
    Models on an accelerator must run with `torch.use_deterministic_algorithms(True)`.
    """

    def __init__(self, folder: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                 every: int = 10, reduction: str = "mean", seed: Optional[int] = None) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise UsageError(f"every must be a positive integer (steps between checkpoints), "
                             f"got {every!r}.")
        if reduction not in REDUCTIONS:
            raise UsageError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
        kind, hparam_names = optimizer_kind(optimizer)
        names = {id(p): n for n, p in model.named_parameters()}
        groups = []
        for group in optimizer.param_groups:
            missing = [p for p in group["params"] if id(p) not in names]
            if missing:
                raise UsageError(f"The optimizer holds {len(missing)} parameter(s) that are not "
                                 "parameters of `model`: pass the model the optimizer trains.")
            groups.append({"params": [names[id(p)] for p in group["params"]],
                           "hparams": {k: _plain(group[k]) for k in hparam_names}})
        self.folder = os.fspath(folder)
        if os.path.exists(os.path.join(self.folder, RECORD_FILE)):
            raise UsageError(f"{self.folder!r} already holds a recorded run; record into a new "
                             "folder (or delete it).")
        os.makedirs(self.folder, exist_ok=True)
        self.model, self.optimizer, self.every = model, optimizer, every
        self._hparam_names = hparam_names
        self._params = [(names[id(p)], p) for g in optimizer.param_groups for p in g["params"]]
        self._pending: Optional[List] = None
        self._steps: List[dict] = []
        self._checkpoints: List[int] = []
        self._problems: List[str] = []
        self.record_info = {
            "format": REPLAY_FORMAT, "format_version": REPLAY_FORMAT_VERSION,
            "optimizer": {"kind": kind, "class": type(optimizer).__name__, "groups": groups},
            "reduction": reduction, "every": every,
            "seed": seed, "torch_initial_seed": torch.initial_seed(),
            "dtype": str(next(iter(p for _, p in self._params)).dtype).replace("torch.", ""),
            "start_state": bool(optimizer.state),
        }
        self._check_deterministic()
        self._save_checkpoint()
        self._hooks = [optimizer.register_step_pre_hook(self._before_step),
                       optimizer.register_step_post_hook(self._after_step)]

    # --------------------------------------------------------------------- user calls
    def record(self, data_ids: Any) -> None:
        """The data ids of the batch the next optimizer step trains on, in the order of the
        per-example losses `loss_fn(model, batch)` returns (unique within the batch)."""
        if self._hooks is None:
            raise UsageError("This recorder has finished; start a new one for a new run.")
        ids = normalize_data_ids(data_ids)
        if not ids:
            raise UsageError("record() needs the data ids of a non-empty batch.")
        self._pending = ids

    def finish(self) -> str:
        """Save the final checkpoint and complete the record; returns the record's folder."""
        if self._hooks is None:
            return self.folder
        for hook in self._hooks:
            hook.remove()
        self._hooks = None
        if self._pending is not None:
            self._problem("record(ids) was called for a step that never ran "
                          "(no optimizer.step() after it)")
        if not self._checkpoints or self._checkpoints[-1] != len(self._steps):
            self._save_checkpoint()
        self._write_record(finished=True)
        return self.folder

    def __enter__(self) -> "MagicRecorder":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.finish()
        elif self._hooks is not None:  # an interrupted run: the record says it did not finish
            for hook in self._hooks:
                hook.remove()
            self._hooks = None

    # --------------------------------------------------------------------- hooks
    def _before_step(self, optimizer, args, kwargs) -> None:
        if self._pending is None:
            self._problem(f"optimizer step {len(self._steps)} ran without record(ids) before "
                          "it: the data order of that step is unknown")
            ids = None
        else:
            ids = self._pending
        self._pending = None
        lrs = []
        for n, (group, known) in enumerate(zip(optimizer.param_groups,
                                               self.record_info["optimizer"]["groups"])):
            now = {k: _plain(group[k]) for k in self._hparam_names}
            if now != known["hparams"]:
                self._problem(f"step {len(self._steps)}: param group {n} changed its "
                              f"hyperparameters from {known['hparams']} to {now} (only lr may "
                              "change during a replayable run)")
            lrs.append(float(_plain(group["lr"])))
        self._check_deterministic()
        self._steps.append({"ids": ids, "lr": lrs})

    def _after_step(self, optimizer, args, kwargs) -> None:
        if len(self._steps) % self.every == 0:
            self._save_checkpoint()

    # --------------------------------------------------------------------- internals
    def _problem(self, text: str) -> None:
        if text not in self._problems:
            self._problems.append(text)
            warnings.warn(f"MagicRecorder: {text}; this run cannot be replayed.", RuntimeWarning,
                          stacklevel=3)

    def _check_deterministic(self) -> None:
        stochastic = [n for n, m in self.model.named_modules()
                      if isinstance(m, _STOCHASTIC) and m.training and m.p > 0]
        if stochastic:
            self._problem(f"stochastic layers in training mode ({stochastic[:3]}): their random "
                          "masks are not recorded")
        devices = {p.device.type for _, p in self._params}
        if devices - {"cpu"} and not torch.are_deterministic_algorithms_enabled():
            self._problem(f"parameters on {sorted(devices - {'cpu'})} without "
                          "torch.use_deterministic_algorithms(True): non-deterministic kernels")

    def _save_checkpoint(self) -> None:
        step = len(self._steps)
        if self._checkpoints:  # the steps since the last checkpoint, before the one closing them
            start = self._checkpoints[-1]
            atomic_write(os.path.join(self.folder, steps_name(start)),
                         json.dumps(self._steps[start:]).encode())
        tensors = {}
        for name, p in self._params:
            tensors[KEY_SEP.join((PARAM_PREFIX, name))] = p.detach().cpu().contiguous()
            for key, value in self.optimizer.state.get(p, {}).items():
                if isinstance(value, Tensor):
                    tensors[KEY_SEP.join((STATE_PREFIX, name, key))] = \
                        value.detach().cpu().contiguous()
        data = safetensors_bytes(tensors, {"step": str(step)})
        atomic_write(os.path.join(self.folder, checkpoint_name(step)), data)
        self._checkpoints.append(step)
        self._write_record(finished=False)

    def _write_record(self, finished: bool) -> None:
        record = {**self.record_info, "finished": finished, "problems": list(self._problems),
                  "checkpoints": list(self._checkpoints)}
        atomic_write(os.path.join(self.folder, RECORD_FILE), json.dumps(record).encode())


# ------------------------------------------------------------------------- reading
@dataclass
class ReplayRecord:
    """A recorded run read back (`load_record`)."""
    folder: str
    kind: str
    groups: List[dict]
    reduction: str
    every: int
    steps: List[dict]
    checkpoints: List[int]
    info: dict = field(default_factory=dict)

    @property
    def param_names(self) -> List[str]:
        return [n for g in self.groups for n in g["params"]]

    def load_checkpoint(self, step: int) -> Tuple[Dict[str, Tensor], Dict[str, Dict[str, Tensor]]]:
        """(parameters, optimizer state per parameter) saved before step `step`."""
        path = os.path.join(self.folder, checkpoint_name(step))
        params: Dict[str, Tensor] = {}
        states: Dict[str, Dict[str, Tensor]] = {n: {} for n in self.param_names}
        try:
            with safe_open(path, "pt") as f:
                for key in f.keys():
                    kind, _, rest = key.partition(KEY_SEP)
                    if kind == PARAM_PREFIX:
                        params[rest] = f.get_tensor(key)
                    else:
                        name, _, entry = rest.rpartition(KEY_SEP)
                        states.setdefault(name, {})[entry] = f.get_tensor(key)
        except Exception as exc:  # a missing, truncated or damaged file
            raise LogFormatError(f"Cannot read the replay checkpoint {path!r}: {exc}") from exc
        missing = [n for n in self.param_names if n not in params]
        if missing:
            raise LogFormatError(f"{path!r} lacks the parameters {missing[:5]}.")
        return params, states


def load_record(folder: str) -> ReplayRecord:
    """Read a recorded run (its folder, or a project folder holding it in `replay/`);
    UsageError when it cannot be replayed (unfinished, unknown data order, changed
    hyperparameters, stochastic or non-deterministic ops), naming the reason."""
    folder = os.fspath(folder)
    if not os.path.exists(os.path.join(folder, RECORD_FILE)) and \
            os.path.exists(os.path.join(folder, REPLAY_DIR, RECORD_FILE)):
        folder = os.path.join(folder, REPLAY_DIR)  # a project folder (run.magic_recorder)
    path = os.path.join(folder, RECORD_FILE)
    try:
        with open(path) as f:
            record = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{folder!r} holds no recorded run ({RECORD_FILE} is missing): record "
                         "training with logix.MagicRecorder first.") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise LogFormatError(f"{path!r} is not readable: {exc}") from exc
    if record.get("format") != REPLAY_FORMAT or \
            record.get("format_version") != REPLAY_FORMAT_VERSION:
        raise LogFormatError(f"{path!r} is not a {REPLAY_FORMAT} version "
                             f"{REPLAY_FORMAT_VERSION} record.")
    if record["problems"]:
        raise UsageError(f"The run recorded in {folder!r} cannot be replayed: "
                         + "; ".join(record["problems"]) + ".")
    if not record["finished"]:
        raise UsageError(f"The run recorded in {folder!r} did not finish (no "
                         "recorder.finish(), or it crashed): its final weights are unknown.")
    checkpoints = record["checkpoints"]
    if len(checkpoints) < 2:
        raise UsageError(f"The run recorded in {folder!r} has no optimizer steps.")
    steps: List[dict] = []
    for start, stop in zip(checkpoints[:-1], checkpoints[1:]):
        name = os.path.join(folder, steps_name(start))
        try:
            with open(name) as f:
                part = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise LogFormatError(f"{name!r} is missing or damaged: {exc}") from exc
        if len(part) != stop - start:
            raise LogFormatError(f"{name!r} holds {len(part)} steps, the checkpoints "
                                 f"{start} and {stop} need {stop - start}.")
        steps += part
    return ReplayRecord(folder, record["optimizer"]["kind"],
                        record["optimizer"]["groups"], record["reduction"], record["every"],
                        steps, checkpoints, record)

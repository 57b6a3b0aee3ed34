"""Checkpoints logged for SOURCE (`run.checkpoint(...)`): the arguments that summarise a
training segment, checked once; the block that logs one (`checkpoint_block`: its rows and
statistics kept apart from the other checkpoints'); the record saved with its statistics."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from logix.errors import UsageError
from logix.mode import Mode
from logix.statistics.live import RunStatistics
from logix.storage.data_ids import normalize_data_ids
from logix.storage.manifest import load_optional


@dataclass
class OpenCheckpoint:
    """The checkpoint block a step logs into: its `name` and `train_ids` (None: any id)."""

    name: str
    train_ids: Optional[set] = None

    def check_inside(self, ids: Sequence) -> None:
        """Refuse a step logging ids outside the block's train_ids."""
        if self.train_ids is None:
            return
        outside = [i for i in ids if i not in self.train_ids]
        if outside:
            raise UsageError(
                f"checkpoint({self.name!r}) was given train_ids, and this step logs ids outside "
                f"them ({outside[:5]}); the segment's curvature would include examples it did "
                "not train on. Log only train_ids inside the block.")


@contextlib.contextmanager
def checkpoint_block(steps, statistics: RunStatistics, mode: Mode, info: dict, name: str,
                     open_writer: Callable):
    """Log checkpoint `name` (`info`: its checkpoint_info record) inside the block: `steps` (the
    run's StepRunner) tags its steps with it, their rows go out under its name (flushed when the
    block ends, even when it fails), and `statistics` collects apart from the run's until the
    block closes, when they are all-reduced and saved with the record."""
    session = steps.session
    if steps.checkpoint is not None:
        raise UsageError(f"checkpoint({name!r}) inside checkpoint({steps.checkpoint.name!r}): "
                         "close one checkpoint block before opening the next.")
    session.flush()
    check_new(name, info, session.manifest or load_optional(session.project_dir))
    if not mode.saving:
        raise mode.refuse(f"checkpoint({name!r}) records a logging pass, but this run does not "
                          "save", "Call run.save(True) first.")
    outer, statistics.state = statistics.state, statistics.fresh()
    ids = info["train_ids"]
    steps.checkpoint = OpenCheckpoint(name, None if ids is None else set(ids))
    try:
        with session.checkpoint(name, open_writer):
            yield
    finally:
        inner, statistics.state = statistics.state, outer
        steps.checkpoint = None
    inner.all_reduce()
    session.add_checkpoint(name, inner.state_dict(), info)


def checkpoint_info(name: str, segment: int, lr: float, steps: int, momentum: float,
                    train_ids: Optional[Sequence]) -> dict:
    """The record of one checkpoint: its segment, optimizer summary and train ids (None: every
    id logged in it). Raises UsageError naming a bad argument."""
    if not isinstance(name, str) or not name or "/" in name or os.sep in name:
        raise UsageError(f"checkpoint name must be a non-empty string without '/', got {name!r}.")
    if isinstance(segment, bool) or not isinstance(segment, int) or segment < 0:
        raise UsageError(f"checkpoint segment must be an integer >= 0, got {segment!r}.")
    if not lr > 0:
        raise UsageError(f"checkpoint lr must be > 0, got {lr!r}.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise UsageError(f"checkpoint steps must be a positive integer, got {steps!r}.")
    if not 0 <= momentum < 1:
        raise UsageError(f"checkpoint momentum must be in [0, 1), got {momentum!r}.")
    return {"segment": int(segment), "lr": float(lr), "steps": int(steps),
            "momentum": float(momentum),
            "train_ids": None if train_ids is None else normalize_data_ids(train_ids)}


def check_new(name: str, info: dict, known) -> None:
    """Refuse a checkpoint block the log (`known`: its Manifest, or None) cannot take."""
    if known is None:
        return
    if name in known.checkpoints:
        raise UsageError(f"Checkpoint {name!r} is already in this log; use a new name.")
    check_same_segment(name, info, known.checkpoints)
    if any(s.checkpoint == name for s in known.shards):
        raise UsageError(f"Checkpoint {name!r} has rows from a block that did not finish "
                         "(an exception left it); no query reads them. Use a new name.")


def check_same_segment(name: str, info: dict, known: dict) -> None:
    """Refuse a checkpoint whose optimizer summary differs from the one the other checkpoints of
    its segment gave (`known`: the log's checkpoints, name -> record)."""
    for other, record in known.items():
        if record.get("segment") != info["segment"]:
            continue
        differ = [k for k in ("lr", "steps", "momentum") if record.get(k) != info[k]]
        if differ:
            given = ", ".join(f"{k}={info[k]!r}" for k in differ)
            logged = ", ".join(f"{k}={record.get(k)!r}" for k in differ)
            raise UsageError(
                f"checkpoint({name!r}) gives segment {info['segment']} {given}, but checkpoint "
                f"{other!r} of that segment gave {logged}. lr, steps and momentum summarize the "
                "whole segment (steps: its number of optimizer updates, not those since the "
                "last checkpoint) and must be the same for each of its checkpoints.")

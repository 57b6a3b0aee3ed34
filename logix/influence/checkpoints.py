"""Checkpoints logged for SOURCE (`run.checkpoint(...)`): the arguments that summarise a
training segment, checked once, and the record saved with the checkpoint's statistics."""

from __future__ import annotations

import os
from typing import Optional, Sequence

from logix.errors import UsageError
from logix.storage.data_ids import normalize_data_ids


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


def check_inside(checkpoint: str, train_ids: Optional[set], ids: Sequence) -> None:
    """Refuse a step logging ids outside the open checkpoint's train_ids."""
    if train_ids is None:
        return
    outside = [i for i in ids if i not in train_ids]
    if outside:
        raise UsageError(
            f"checkpoint({checkpoint!r}) was given train_ids, and this step logs ids outside "
            f"them ({outside[:5]}); the segment's curvature would include examples it did not "
            "train on. Log only train_ids inside the block.")

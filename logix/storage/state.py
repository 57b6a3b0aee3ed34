"""state/*.safetensors: the projections and statistics a later process needs to query a log."""

from __future__ import annotations

import json
import os
from typing import Dict, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from logix.errors import LogFormatError
from logix.logra import Projection, fingerprint
from logix.storage.format import (CHECKSUM, PROJECTIONS_FILE, STATE_DIR, STATISTICS_FILE,
                                  atomic_write, new_digest, split_checksum, state_key,
                                  tensor_bytes)
from logix.storage.manifest import Manifest, describes, load_optional
from logix.storage.reader import LogReader

_P_IN, _P_OUT = "p_in", "p_out"
DESCRIBES_KEY = "describes"  # statistics and score files: the log they were computed from


def save_projections(project_dir: str, projections: Dict[str, Projection], meta: dict) -> None:
    """P_in and P_out per module (identity ones are omitted), with init kind and seed."""
    tensors = {}
    for name, p in projections.items():
        if p.p_in is not None:
            tensors[state_key(name, _P_IN)] = p.p_in.detach().float().cpu().contiguous()
        if p.p_out is not None:
            tensors[state_key(name, _P_OUT)] = p.p_out.detach().float().cpu().contiguous()
    dims = {name: [p.in_dim, p.out_dim] for name, p in projections.items()}
    metadata = {"meta": json.dumps(meta), "dims": json.dumps(dims)}
    _write(project_dir, PROJECTIONS_FILE, tensors, metadata)


def load_projections(project_dir: str) -> Tuple[Dict[str, Projection], dict]:
    """The projections and their metadata. Refused when damaged: the matrices must hash to the
    fingerprint recorded with them (`meta.checksum`, which queries are matched against)."""
    path = os.path.join(project_dir, STATE_DIR, PROJECTIONS_FILE)
    if not os.path.isfile(path):
        raise LogFormatError(f"{path!r} is missing: the log was not finalized. Call "
                             "run.finalize() at the end of the logging pass.")
    tensors, metadata = _read(path, "Queries projected with it would not match the logged rows")
    dims = json.loads(metadata["dims"])
    projections = {name: Projection(tensors.get(state_key(name, _P_IN)),
                                    tensors.get(state_key(name, _P_OUT)), in_dim, out_dim)
                   for name, (in_dim, out_dim) in dims.items()}
    meta = json.loads(metadata["meta"])
    recorded, found = meta.get("checksum"), fingerprint(projections)
    if recorded is not None and recorded != found:
        raise LogFormatError(f"{path!r} is damaged: its matrices hash to {found}, the file "
                             f"records {recorded}. Queries projected with it would not match "
                             f"the logged rows; {_RESTORE}")
    return projections, meta


def save_statistics(project_dir: str, state: Dict[str, torch.Tensor],
                    manifest: Optional[Manifest] = None) -> None:
    """The statistics, recording the log they describe (`describes`: the project's fingerprint
    and the plain rows of `manifest`, with a digest of their ids)."""
    metadata = {}
    if manifest is not None:
        ids = LogReader(project_dir, manifest, verify=False).data_ids()
        metadata[DESCRIBES_KEY] = json.dumps(describes(manifest.claim_fingerprint(project_dir),
                                                       ids))
    _write(project_dir, STATISTICS_FILE, state, metadata)


def load_statistics(project_dir: str) -> Dict[str, torch.Tensor]:
    """The saved statistics ({} when there are none); refused when damaged, or when they were
    computed from another project's log (`check_describes`)."""
    path = os.path.join(project_dir, STATE_DIR, STATISTICS_FILE)
    if not os.path.isfile(path):
        return {}
    tensors, metadata = _read(path, "Scores preconditioned with them would be wrong (hessian="
                                    "'none' and 'lissa' do not read them)")
    check_describes(path, recorded_describes(path, metadata), project_dir)
    return tensors


def recorded_describes(path: str, metadata: dict) -> Optional[dict]:
    """The `describes` object of a statistics or score file's metadata; None for files of
    earlier releases, which recorded none (read as unverified)."""
    if DESCRIBES_KEY not in metadata:
        return None
    try:
        value = json.loads(metadata[DESCRIBES_KEY])
    except (ValueError, RecursionError) as e:
        raise LogFormatError(f"{path!r}: metadata {DESCRIBES_KEY!r} is not JSON ({e}); "
                             f"{_RESTORE}") from None
    if not (isinstance(value, dict) and isinstance(value.get("rows"), int)
            and isinstance(value.get("ids"), str)):
        raise LogFormatError(f"{path!r}: metadata {DESCRIBES_KEY!r} is {value!r}, not "
                             '{"fingerprint", "rows", "ids"}; ' + _RESTORE)
    return value


def check_describes(path: str, recorded: Optional[dict], project_dir: str,
                    fix: str = "Put back this project's own file, or delete it and finalize() "
                               "a logging run of this project again.") -> None:
    """Refuse a file computed from another log than the project's: another fingerprint, or
    more rows than the log holds. Fewer rows are accepted: rows appended since (a session that
    appends and has not finalized yet, scores computed before)."""
    if recorded is None:
        return
    manifest = load_optional(project_dir)
    if manifest is None:
        return
    theirs, ours = recorded.get("fingerprint"), manifest.fingerprint
    if theirs is not None and ours is not None and theirs != ours:
        raise LogFormatError(
            f"{path!r} was computed from another log: it records project fingerprint {theirs} "
            f"({recorded['rows']} rows), but {project_dir!r} has fingerprint {ours} "
            f"({manifest.rows} rows): it was copied from another project. " + fix)
    if recorded["rows"] > manifest.rows:
        raise LogFormatError(
            f"{path!r} describes {recorded['rows']} rows but the log in {project_dir!r} holds "
            f"{manifest.rows}: it does not belong to this log. " + fix)


def _write(project_dir: str, filename: str, tensors: dict, metadata: dict) -> None:
    """A state file, with a checksum of its tensors in the metadata (`checksum`)."""
    os.makedirs(os.path.join(project_dir, STATE_DIR), exist_ok=True)
    metadata = {**metadata, "checksum": _tensors_checksum(tensors, CHECKSUM)}
    data = safetensors_bytes(tensors, metadata=metadata)
    atomic_write(os.path.join(project_dir, STATE_DIR, filename), data)


def _read(path: str, harm: str) -> Tuple[Dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a state file, refused (naming the `harm` of using it) when its
    tensors do not hash to the recorded checksum; files of earlier releases have none."""
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    recorded = metadata.get("checksum")
    if recorded is not None:
        found = _tensors_checksum(tensors, split_checksum(recorded)[0])
        if found != recorded:
            raise LogFormatError(f"{path!r} is damaged: its tensors hash to {found}, the file "
                                 f"records {recorded}. {harm}; {_RESTORE}")
    return tensors, metadata


_RESTORE = "restore the file from a copy of the log, or log again."


def _tensors_checksum(tensors: Dict[str, torch.Tensor], algorithm: str) -> str:
    """"<algorithm>:<hex>" over every tensor's key, dtype, shape and bytes, in key order."""
    digest = new_digest(algorithm)
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu()
        digest.update(f"{key}:{tensor.dtype}:{list(tensor.shape)}".encode())
        digest.update(tensor_bytes(tensor))
    return f"{algorithm}:{digest.hexdigest()}"


def checkpoint_file(name: str) -> str:
    return f"checkpoint-{name}.safetensors"


def save_checkpoint_statistics(project_dir: str, name: str, state: Dict[str, torch.Tensor],
                               info: dict) -> None:
    """One checkpoint's statistics, with its optimizer summary and train ids in the metadata."""
    _write(project_dir, checkpoint_file(name), state, {"checkpoint": json.dumps(info)})


def load_checkpoint_statistics(project_dir: str, name: str) -> Tuple[Dict[str, torch.Tensor], dict]:
    path = os.path.join(project_dir, STATE_DIR, checkpoint_file(name))
    if not os.path.isfile(path):
        raise LogFormatError(f"{path!r} is missing: checkpoint {name!r} was not closed (its "
                             "`with run.checkpoint(...)` block did not finish).")
    tensors, metadata = _read(path, "SOURCE scores computed with them would be wrong")
    return tensors, json.loads(metadata["checkpoint"])

"""`logix verify` as a function: check every shard of a log against its manifest (size,
checksum, header, width, dtype, rows, data ids), the state files against the layout, and report
stray files, in bounded memory. `verify(project_dir)` returns a `VerifyReport`; the CLI and the
dashboard print it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from logix.errors import LogFormatError
from logix.storage import state
from logix.storage.format import (DATA_IDS_KEY, DTYPES, GRAD_KEY, ITEMSIZE, KEY_SEP, LOGS_DIR,
                                  SAFETENSORS_DTYPES, STATE_DIR, TMP_SUFFIX, file_checksum,
                                  parse_shard_name, read_header, split_checksum)
from logix.storage.manifest import (INDEX_PREFIX, INDEX_SUFFIX, read_manifest,
                                    ids_digest, structure_problems)
from logix.storage.overview import projections_info, statistics_info


@dataclass
class VerifyReport:
    """What `verify` found: errors (the log is damaged), warnings, and what was read."""

    errors: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    ok_shards: List[str] = field(default_factory=list)  # shards with no error
    shards: int = 0
    rows: int = 0  # plain rows (outside checkpoints)
    checkpoint_rows: int = 0
    bytes_read: int = 0
    hashed: bool = True

    def error(self, message: str) -> None:
        self.errors.append(message)

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    @property
    def ok(self) -> bool:
        return not self.errors


def verify(project_dir: str, hashing: bool = True,
           advance: Optional[Callable[[int], None]] = None) -> VerifyReport:
    """Check a log folder; `advance(n)` is called with each chunk of bytes hashed. Raises
    LogFormatError when the manifest itself cannot be read (then no shard can be checked)."""
    manifest, raw = read_manifest(project_dir)
    report = VerifyReport(shards=len(manifest.shards), rows=manifest.rows, hashed=hashing,
                          checkpoint_rows=sum(s.rows for s in manifest.shards
                                              if s.checkpoint is not None))
    _check_manifest(manifest, raw, report)
    seen_ids: Dict = {}
    duplicates: List = []
    plain_ids: List = []  # the ids of the plain rows, in row order (what statistics describe)
    for shard in manifest.shards:
        before = len(report.errors)
        report.bytes_read += _check_shard(project_dir, manifest, shard, report, hashing,
                                          seen_ids, duplicates, advance or (lambda n: None),
                                          plain_ids)
        if len(report.errors) == before:
            report.ok_shards.append(shard.file)
    if duplicates:
        examples = "; ".join(f"{json.dumps(i)} in {a} and {b}" for i, a, b in duplicates[:5])
        count = len(duplicates)
        report.warn(f"{count} data id{'s' if count > 1 else ''} "
                    f"{'appear' if count > 1 else 'appears'} more than once in the log (e.g. "
                    f"{examples}); scores will list such examples once per row.")
    _check_stray_files(project_dir, manifest, report)
    _check_state(project_dir, manifest, report, plain_ids)
    return report


def _check_manifest(manifest, raw: dict, report: VerifyReport) -> None:
    for problem in structure_problems(manifest, raw):  # what readers refuse to score
        report.error(f"manifest {problem}.")
    unfinished = sorted({s.checkpoint for s in manifest.shards
                         if s.checkpoint is not None and s.checkpoint not in manifest.checkpoints})
    for name in unfinished:
        report.warn(f"shards of checkpoint {name!r}, whose block did not finish (an exception "
                    "left it): no query reads their rows.")


def _check_shard(project_dir: str, manifest, shard, report: VerifyReport, hashing: bool,
                 seen_ids: Dict, duplicates: List, advance, plain_ids: List) -> int:
    """Check one shard; returns the bytes read. Reads the file once in chunks (bounded memory)."""
    name = shard.file
    if parse_shard_name(os.path.basename(name)) is None or \
            os.path.dirname(name) != LOGS_DIR:  # reported by _check_manifest; never opened
        return 0
    path = os.path.join(project_dir, name)
    if not os.path.isfile(path):
        report.error(f"shard {name!r} is named in the manifest but missing.")
        return 0
    size = os.path.getsize(path)
    if size != shard.bytes:
        what = "truncated?" if size < shard.bytes else "extra bytes?"
        report.error(f"shard {name!r} is {size} bytes; the manifest says {shard.bytes} ({what}).")
    if hashing:
        algorithm, recorded = split_checksum(shard.checksum)
        try:
            digest = file_checksum(path, algorithm, advance)
        except (OSError, LogFormatError) as e:
            report.error(f"shard {name!r} cannot be checked: {e}")
            return 0
        if digest != recorded:
            report.error(f"shard {name!r}: {algorithm} {digest[:16]}... does not match "
                         f"the manifest's {recorded[:16]}...; its bytes changed after it was "
                         "written.")
    ids = _check_shard_header(path, name, size, manifest, shard, report)
    if ids is not None:
        if shard.checkpoint is None:
            plain_ids.extend(ids)
        for i in ids:
            key = i if isinstance(i, (str, int)) else json.dumps(i)
            if key in seen_ids:
                duplicates.append((i, seen_ids[key], name))
            else:
                seen_ids[key] = name
    return size


def _check_shard_header(path: str, name: str, size: int, manifest, shard,
                        report: VerifyReport) -> Optional[list]:
    """Check the safetensors header (exact messages), then open it with safetensors.
    Returns the shard's data ids, or None when they cannot be read."""

    def bad(message: str) -> None:
        report.error(f"shard {name!r} is not a readable safetensors file: {message}.")

    try:
        header, _, _ = read_header(path)
    except LogFormatError as e:
        return bad(str(e))
    grad = header.get(GRAD_KEY)
    if not isinstance(grad, dict):
        report.error(f"shard {name!r} has no {GRAD_KEY!r} tensor (it holds "
                     f"{[k for k in header if k != '__metadata__'][:5]}).")
    else:
        shape, dtype = grad.get("shape"), grad.get("dtype")
        want_dtype = SAFETENSORS_DTYPES.get(DTYPES.get(manifest.dtype))
        if dtype != want_dtype:
            report.error(f"shard {name!r}: {GRAD_KEY!r} is {dtype}, the manifest says "
                         f"{manifest.dtype} ({want_dtype}).")
        if not (isinstance(shape, list) and len(shape) == 2):
            report.error(f"shard {name!r}: {GRAD_KEY!r} has shape {shape}, not [rows, width].")
        else:
            if shape[1] != manifest.dim:
                report.error(f"shard {name!r}: {GRAD_KEY!r} is {shape[1]} columns wide, the "
                             f"manifest's row width is {manifest.dim}.")
            if shape[0] != shard.rows:
                report.error(f"shard {name!r} holds {shape[0]} rows, the manifest says "
                             f"{shard.rows}.")
            start, stop = grad["data_offsets"]
            need = shape[0] * shape[1] * ITEMSIZE.get(dtype, 0)
            if dtype in ITEMSIZE and stop - start != need:
                report.error(f"shard {name!r}: {GRAD_KEY!r} spans {stop - start} bytes, its "
                             f"shape and dtype need {need}.")
    ids = None
    metadata = header.get("__metadata__") or {}
    if DATA_IDS_KEY not in metadata:
        report.error(f"shard {name!r} has no {DATA_IDS_KEY!r} in its metadata.")
    else:
        try:
            ids = json.loads(metadata[DATA_IDS_KEY])
        except (ValueError, TypeError, RecursionError) as e:
            report.error(f"shard {name!r}: metadata {DATA_IDS_KEY!r} is not JSON ({e}).")
        if ids is not None and not isinstance(ids, list):
            report.error(f"shard {name!r}: metadata {DATA_IDS_KEY!r} is not a JSON list.")
            ids = None
        if ids is not None and len(ids) != shard.rows:
            report.error(f"shard {name!r} names {len(ids)} data ids for {shard.rows} rows.")
        if ids is not None:
            odd = [i for i in ids if isinstance(i, bool) or not isinstance(i, (str, int))]
            if odd:
                report.warn(f"shard {name!r}: data ids should be str or int, found {odd[:3]}.")
    from safetensors import SafetensorError, safe_open

    try:  # the library itself must agree (this is what every reader uses)
        with safe_open(path, framework="pt") as f:
            if GRAD_KEY in f.keys():
                f.get_slice(GRAD_KEY).get_shape()
    except (SafetensorError, OSError, RuntimeError) as e:
        bad(f"safetensors refuses it ({e})")
    return ids


def _check_stray_files(project_dir: str, manifest, report: VerifyReport) -> None:
    named = {os.path.normpath(s.file) for s in manifest.shards}
    logs = os.path.join(project_dir, LOGS_DIR)
    if os.path.isdir(logs):
        for entry in sorted(os.listdir(logs)):
            rel = os.path.normpath(os.path.join(LOGS_DIR, entry))
            if rel in named or (entry.startswith(INDEX_PREFIX) and entry.endswith(INDEX_SUFFIX)):
                continue  # index-r<rank>.jsonl: a writer's list of its completed shards
            if entry.endswith(TMP_SUFFIX):
                report.warn(f"{rel!r} is a leftover temporary file from an interrupted write; "
                            "it holds no logged rows and can be deleted.")
            else:
                report.warn(f"{rel!r} is in {LOGS_DIR}/ but not named in the manifest; readers "
                            "ignore it (a shard written after the last manifest update, or a "
                            "foreign file).")
    for folder in (project_dir, os.path.join(project_dir, STATE_DIR)):
        if not os.path.isdir(folder):
            continue
        for entry in sorted(os.listdir(folder)):
            if entry.endswith(TMP_SUFFIX):
                rel = os.path.relpath(os.path.join(folder, entry), project_dir)
                report.warn(f"{rel!r} is a leftover temporary file from an interrupted write; "
                            "it can be deleted.")


def _check_state(project_dir: str, manifest, report: VerifyReport, plain_ids: List) -> None:
    modules = {m.name: m for m in manifest.modules}
    proj = projections_info(project_dir)
    if not proj["present"]:
        message = (f"{proj['file']} is missing; queries need it to project test gradients "
                   "the same way.")
        (report.error if manifest.shards else report.warn)(message)
    elif proj["error"]:
        report.error(f"{proj['file']} is not readable: {proj['error']}.")
    else:
        _check_state_file(report, proj["file"], state.load_projections, project_dir)
        if proj["meta"] is not None and proj["meta"] != manifest.projection:
            report.error(f"{proj['file']} says projection {proj['meta']}, the manifest "
                         f"{manifest.projection}.")
        dims = proj["dims"] or {}
        for name, m in modules.items():
            if name in dims and list(dims[name]) != [m.in_dim, m.out_dim]:
                report.error(f"{proj['file']}: module {name!r} has [in, out] {dims[name]}, the "
                             f"manifest [{m.in_dim}, {m.out_dim}].")
            for side, rank, full in (("p_in", m.rank_in, m.in_dim),
                                     ("p_out", m.rank_out, m.out_dim)):
                shape = proj["shapes"].get(f"{name}{KEY_SEP}{side}")
                if shape is None and rank != full:
                    report.error(f"{proj['file']} has no {name}{KEY_SEP}{side} but module "
                                 f"{name!r} is projected to rank {rank} of {full}.")
                elif shape is not None and shape != [rank, full]:
                    report.error(f"{proj['file']}: {name}{KEY_SEP}{side} is {shape}, the "
                                 f"manifest needs [{rank}, {full}].")
    for name in manifest.checkpoints:
        file = f"{STATE_DIR}/{state.checkpoint_file(name)}"
        if os.path.isfile(os.path.join(project_dir, file)):
            _check_state_file(report, file, state.load_checkpoint_statistics, project_dir, name)
    stats = statistics_info(project_dir)
    if not stats["present"]:
        report.warn(f"{stats['file']} is missing (finalize() was not called?); queries with a "
                    "preconditioner need it.")
        return
    if stats["error"]:
        report.error(f"{stats['file']} is not readable: {stats['error']}.")
        return
    if _check_state_file(report, stats["file"], state.load_statistics, project_dir) and \
            stats["entries"]:
        _check_statistics_log(report, stats, manifest, plain_ids)
    for base in stats["orphan_counts"]:
        report.warn(f"{stats['file']}: {base}{KEY_SEP}count has no matching statistic.")
    for module, kinds in stats["entries"].items():
        m = modules.get(module)
        if m is None:
            report.warn(f"{stats['file']} holds statistics of {module!r}, which is not in the "
                        "manifest.")
            continue
        expected = {"forward": [m.rank_in] * 2, "backward": [m.rank_out] * 2,
                    "grad": [m.dim] * 2}
        for kind, entry in kinds.items():
            if kind in expected and entry["shape"] != expected[kind]:
                report.error(f"{stats['file']}: {module}{KEY_SEP}{kind} is {entry['shape']}, "
                             f"the manifest's ranks need {expected[kind]}.")
            if kind in expected and entry["count"] is None:
                report.error(f"{stats['file']}: {module}{KEY_SEP}{kind} has no count.")


def _check_statistics_log(report: VerifyReport, stats: dict, manifest, plain_ids: List) -> None:
    """The log the statistics record (`describes`) against this one; load_statistics has
    already refused another project's fingerprint and more rows than the log holds."""
    recorded = stats["describes"]
    if recorded is None:
        report.warn(f"{stats['file']} records no log (written by an earlier LogIX): whether it "
                    "describes this project's rows cannot be checked. finalize() a run on this "
                    "project to record it.")
    elif recorded["rows"] < manifest.rows:
        report.warn(f"{stats['file']} describes {recorded['rows']} of the log's "
                    f"{manifest.rows} rows (rows appended since by a session that did not "
                    "finalize, or a statistics pass before logging).")
    elif recorded["rows"] == manifest.rows == len(plain_ids) and \
            recorded["ids"] != ids_digest(plain_ids):
        report.error(f"{stats['file']} describes {recorded['rows']} rows whose ids hash to "
                     f"{recorded['ids']}, the log's ids hash to {ids_digest(plain_ids)}: the "
                     "statistics were computed from other examples. Compute them again from "
                     "this log.")


def _check_state_file(report: VerifyReport, file: str, load: Callable, *args) -> bool:
    """Read a state file whole: its tensors must hash to the checksum recorded with them.
    Returns whether it could be loaded."""
    from safetensors import SafetensorError

    try:
        load(*args)
        return True
    except LogFormatError as e:
        report.error(str(e))
    except (SafetensorError, OSError, RuntimeError, ValueError, KeyError) as e:
        report.error(f"{file} is not readable: {e!r}.")
    return False

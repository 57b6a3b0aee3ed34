"""manifest.json: what a log folder holds. Only shards that were completely written are named."""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import xxhash

from logix.errors import LogFormatError
from logix.storage.format import (DTYPES, FORMAT_VERSION, LOGS_DIR, MANIFEST, atomic_write,
                                  parse_shard_name)

INDEX_PREFIX = "index-r"  # logs/index-r<rank>.jsonl
INDEX_SUFFIX = ".jsonl"


@dataclass(frozen=True)
class ModuleEntry:
    """One tracked module's slice of a log row: columns [offset, offset + rank_out * rank_in)."""

    name: str
    type: str
    in_dim: int
    out_dim: int
    rank_in: int
    rank_out: int
    offset: int
    bias: bool = False

    @property
    def dim(self) -> int:
        return self.rank_in * self.rank_out

    @property
    def columns(self) -> slice:
        return slice(self.offset, self.offset + self.dim)


@dataclass(frozen=True)
class ShardEntry:
    file: str  # relative to the project folder
    rows: int
    bytes: int
    checksum: str  # "<algorithm>:<hex>" of the whole file, e.g. "xxh3:9b1f04c2d7e8a356"
    rank: int
    seq: int
    checkpoint: Optional[str] = None  # set for rows logged inside run.checkpoint(...)


@dataclass
class Manifest:
    project: str
    dtype: str
    modules: List[ModuleEntry]
    projection: Dict = field(default_factory=dict)  # {"init": ..., "seed": ...}
    config: Dict = field(default_factory=dict)
    shards: List[ShardEntry] = field(default_factory=list)
    checkpoints: Dict[str, dict] = field(default_factory=dict)  # name -> segment, lr, steps, ...
    format_version: int = FORMAT_VERSION
    format: str = "logix"
    fingerprint: Optional[str] = None  # the project's identity; see claim_fingerprint


    @property
    def dim(self) -> int:
        return sum(m.dim for m in self.modules)

    @property
    def rows(self) -> int:
        """Rows outside checkpoints (those that plain influence reads)."""
        return sum(s.rows for s in self.shards if s.checkpoint is None)

    def module(self, name: str) -> ModuleEntry:
        for entry in self.modules:
            if entry.name == name:
                return entry
        raise LogFormatError(f"Module {name!r} is not in this log; it holds "
                             f"{[m.name for m in self.modules]}.")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["shards"].sort(key=lambda s: (s["rank"], s["seq"]))  # writers append in any order
        out["format_version"] = FORMAT_VERSION  # the form these shard entries are written in
        out["dim"] = self.dim
        out["rows"] = self.rows
        return out

    def claim_fingerprint(self, project_dir: str) -> str:
        """The project's fingerprint: 16 random hex digits fixed by the first manifest written
        in the folder and kept by every later save (a run that appends, a logging pass after a
        statistics pass). Statistics and score files record it (see `describes`)."""
        if self.fingerprint is None:
            self.fingerprint = project_fingerprint(project_dir) or secrets.token_hex(8)
        return self.fingerprint

    def save(self, project_dir: str) -> None:
        self.claim_fingerprint(project_dir)
        data = json.dumps(self.to_dict(), indent=1).encode()
        atomic_write(os.path.join(project_dir, MANIFEST), data)

    @classmethod
    def load(cls, project_dir: str) -> "Manifest":
        """The project's manifest, every rank's shard index merged; LogFormatError when it is
        missing, unreadable, of a newer format, malformed or structurally invalid."""
        manifest, raw = read_manifest(project_dir)
        check_structure(manifest, raw, os.path.join(project_dir, MANIFEST))
        return manifest

    def merge_rank_indexes(self, project_dir: str) -> None:
        """Add the shards listed in logs/index-r<rank>.jsonl: each writer appends one line per
        shard once the shard is complete on disk, so every completed shard of every rank is
        visible before (or without) the final manifest. A torn last line, from a crash while it
        was appended, names no complete shard and is skipped."""
        logs = os.path.join(project_dir, LOGS_DIR)
        if not os.path.isdir(logs):
            return
        known = {s.file for s in self.shards}
        for name in sorted(os.listdir(logs)):
            if not (name.startswith(INDEX_PREFIX) and name.endswith(INDEX_SUFFIX)):
                continue
            path = os.path.join(logs, name)
            try:
                with open(path, "rb") as f:
                    lines = f.read().decode("utf-8", errors="replace").splitlines()
            except OSError as e:
                raise LogFormatError(f"{path!r} is not readable: {e}") from e
            for number, line in enumerate(lines):
                try:
                    shard = shard_entry(json.loads(line))
                except (ValueError, TypeError) as e:
                    shard = _after_torn_line(line)
                    if shard is None and number == len(lines) - 1:
                        break  # torn by a crash mid-append
                    if shard is None:
                        raise LogFormatError(f"{path!r} line {number + 1} is malformed: {e}"
                                             ) from e
                if shard.file not in known:
                    self.shards.append(shard)
                    known.add(shard.file)
        self.shards.sort(key=lambda s: (s.rank, s.seq))

    def check_compatible(self, other: "Manifest") -> None:
        """Refuse to mix rows of different layouts or dtypes in one log."""
        problems = []
        if self.dtype != other.dtype:
            problems.append(f"dtype {other.dtype} vs {self.dtype} on disk")
        if self.modules != other.modules:
            problems.append(_module_differences(other.modules, self.modules))
        if self.projection != other.projection:
            problems.append(f"projection {other.projection} vs {self.projection} on disk")
        if problems:
            raise LogFormatError("This run does not match the log already in the project folder: "
                                 + "; ".join(problems) + ". Use a new project name, or the same "
                                 "model, modules, ranks, seed and log_dtype as the existing log.")


def _module_differences(new: List[ModuleEntry], old: List[ModuleEntry]) -> str:
    """What differs between two row layouts, e.g. "module '0': in_dim 7 vs 6 on disk"."""
    if [m.name for m in new] != [m.name for m in old]:
        return f"modules {[m.name for m in new]} vs {[m.name for m in old]} on disk"
    fields = ("type", "in_dim", "out_dim", "rank_in", "rank_out", "bias")
    return "; ".join(
        f"module {a.name!r}: " + ", ".join(f"{f} {getattr(a, f)} vs {getattr(b, f)}"
                                           for f in fields if getattr(a, f) != getattr(b, f))
        + " on disk" for a, b in zip(new, old) if a != b)


def _after_torn_line(line: str) -> Optional[ShardEntry]:
    """The entry a line ends with when it is a torn line with a whole one appended after it (as
    earlier releases appended after a crash), or None."""
    start = line.rfind('{"file"')
    try:
        return shard_entry(json.loads(line[start:])) if start > 0 else None
    except (ValueError, TypeError):
        return None


def append_rank_index(project_dir: str, entry: ShardEntry) -> None:
    """Record one completed shard in its rank's append-only index (see merge_rank_indexes):
    constant work per shard, however long the run."""
    path = os.path.join(project_dir, LOGS_DIR, f"{INDEX_PREFIX}{entry.rank}{INDEX_SUFFIX}")
    _repair_torn_tail(path)
    with open(path, "ab") as f:
        f.write(json.dumps(dataclasses.asdict(entry)).encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())


def _repair_torn_tail(path: str) -> None:
    """An index whose last line lacks its newline (a crash or a full disk mid-append) is
    rewritten, atomically, without that fragment, or with its newline where the line is whole:
    readers see the same shards before and after, and a line appended next stays readable."""
    size = os.path.getsize(path) if os.path.isfile(path) else 0
    if not size:
        return
    with open(path, "rb") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
    cut = data.rfind(b"\n") + 1
    kept, tail = data[:cut], data[cut:]
    try:
        shard_entry(json.loads(tail))
        kept += tail + b"\n"
    except (ValueError, TypeError):
        if _after_torn_line(tail.decode("utf-8", errors="replace")) is not None:
            kept += tail + b"\n"
    atomic_write(path, kept)


def read_manifest(project_dir: str) -> Tuple[Manifest, dict]:
    """(Manifest with every rank's index merged, the raw JSON object) of a project folder. A
    LogFormatError says what is wrong: missing, unreadable, not JSON, a newer format version,
    fields of the wrong type or negative sizes."""
    path = os.path.join(project_dir, MANIFEST)
    if not os.path.isfile(path):
        raise LogFormatError(f"{project_dir!r} is not a LogIX log: it has no {MANIFEST}. "
                             "Point at the project folder (<root_dir>/<project>).")
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except OSError as e:
        raise LogFormatError(f"{path!r} cannot be read: {e}") from e
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, nesting
        raise LogFormatError(f"{path!r} is corrupt: not readable JSON ({_short(e)}). Restore "
                             f"it from a copy of the log.") from e
    if not isinstance(data, dict):
        raise LogFormatError(f"{path!r} is corrupt: it holds a JSON {type(data).__name__}, not "
                             "the manifest object.")
    if data.get("format") != "logix":
        raise LogFormatError(f"{path!r} is not a LogIX manifest (no 'format': 'logix').")
    version = data.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1 \
            or version > FORMAT_VERSION:
        raise LogFormatError(f"{path!r} has format version {version}; this LogIX reads "
                             f"versions up to {FORMAT_VERSION}. Upgrade LogIX to read it.")
    try:
        manifest = Manifest(
            project=data["project"], dtype=data["dtype"],
            modules=[_typed(ModuleEntry, m) for m in data["modules"]],
            projection=data.get("projection", {}), config=data.get("config", {}),
            shards=[shard_entry(s) for s in data.get("shards", [])],
            checkpoints=data.get("checkpoints", {}), format_version=version,
            fingerprint=data.get("fingerprint"))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise LogFormatError(f"{path!r} is missing or has malformed fields: {e}") from e
    problems = _field_problems(manifest)
    if problems:
        raise LogFormatError(f"{path!r} has malformed fields: " + "; ".join(problems[:5]))
    manifest.merge_rank_indexes(project_dir)
    return manifest, data


def _field_problems(manifest: Manifest) -> List[str]:
    """Sizes that would make arithmetic on the manifest fail or lie."""
    problems = []
    for m in manifest.modules:
        for key in ("in_dim", "out_dim", "rank_in", "rank_out", "offset"):
            if getattr(m, key) < 0:
                problems.append(f"module {m.name!r}: {key}={getattr(m, key)!r} is negative")
    for s in manifest.shards:
        for key in ("rows", "bytes", "rank", "seq"):
            if getattr(s, key) < 0:
                problems.append(f"shard {s.file!r}: {key}={getattr(s, key)!r} is negative")
    if not isinstance(manifest.projection, dict):
        problems.append(f"projection={manifest.projection!r} is not an object")
    if manifest.fingerprint is not None and not isinstance(manifest.fingerprint, str):
        problems.append(f"fingerprint={manifest.fingerprint!r} is not a string")
    return problems


def structure_problems(manifest: Manifest, raw: Optional[dict] = None) -> List[str]:
    """What makes a manifest unsafe to score or append to, whatever its shard files hold: shard
    files that are not plain shard names inside logs/ (absolute, `..`, other folders), named
    twice, or whose name disagrees with their rank / seq; rows the recorded bytes cannot hold;
    module columns that overlap or run past the row; an unknown dtype; derived `dim` / `rows`
    (in `raw`, the JSON object) that disagree with the entries. `logix verify` reports each;
    readers refuse the manifest (`check_structure`)."""
    problems = []
    if manifest.dtype not in DTYPES:
        problems.append(f"dtype {manifest.dtype!r} is not one of {sorted(DTYPES)}")
    names = [m.name for m in manifest.modules]
    if len(set(names)) != len(names):
        problems.append(f"module names repeat: {names}")
    spans = sorted((m.offset, m.offset + m.dim, m.name) for m in manifest.modules)
    for (a0, a1, a), (b0, b1, b) in zip(spans, spans[1:]):
        if b0 < a1:
            problems.append(f"modules {a!r} [{a0}, {a1}) and {b!r} [{b0}, {b1}) overlap in "
                            "the row")
    for start, stop, name in spans:
        if stop > manifest.dim:
            problems.append(f"module {name!r} columns [{start}, {stop}) run past the row width "
                            f"{manifest.dim}")
    itemsize = DTYPES[manifest.dtype].itemsize if manifest.dtype in DTYPES else 1
    seen = set()
    for s in manifest.shards:
        folder, _, name = s.file.partition("/")
        parsed = parse_shard_name(name) if folder == LOGS_DIR else None
        if parsed is None:
            problems.append(f"shard {s.file!r} is not a shard name inside {LOGS_DIR}/ "
                            f"({LOGS_DIR}/shard-r<rank>-<seq>.safetensors)")
        elif parsed != (s.rank, s.seq):
            problems.append(f"shard {s.file!r}: the name says rank {parsed[0]} seq "
                            f"{parsed[1]}, the entry rank {s.rank} seq {s.seq}")
        if s.file in seen:
            problems.append(f"shard {s.file!r} is named more than once")
        seen.add(s.file)
        if s.rows * manifest.dim * itemsize > s.bytes:
            problems.append(f"shard {s.file!r}: {s.rows} rows of {manifest.dim} columns do not "
                            f"fit in its {s.bytes} bytes")
    if raw is not None:
        if raw.get("dim") is not None and raw.get("dim") != manifest.dim:
            problems.append(f"'dim' is {raw.get('dim')!r} but its modules add up to "
                            f"{manifest.dim} columns")
        listed = sum(s.get("rows", 0) for s in raw.get("shards", [])
                     if isinstance(s, dict) and s.get("checkpoint") is None)
        if raw.get("rows") is not None and raw.get("rows") != listed:  # index shards on top
            problems.append(f"'rows' is {raw.get('rows')!r} but its shards hold {listed} rows")
    return problems


def check_structure(manifest: Manifest, raw: Optional[dict] = None,
                    where: str = MANIFEST) -> None:
    """Raise LogFormatError listing `structure_problems`, if any: such a log is not scored."""
    problems = structure_problems(manifest, raw)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise LogFormatError(f"{where!r} is not a valid LogIX manifest: " + "; ".join(problems[:5])
                             + f"{more}. Run `logix verify` on the project folder, and restore "
                             "manifest.json from a copy of the log.")


def project_fingerprint(project_dir: str) -> Optional[str]:
    """The fingerprint recorded in the folder's manifest.json; None when there is none (no
    manifest, an unreadable one, or one written by a release before fingerprints)."""
    try:
        with open(os.path.join(project_dir, MANIFEST), "rb") as f:
            value = json.loads(f.read()).get("fingerprint")
    except (OSError, ValueError, RecursionError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def enclosing_project(path: str) -> Optional[str]:
    """The nearest folder above `path` (a file) that holds a manifest.json, or None."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.isfile(os.path.join(folder, MANIFEST)):
        if os.path.dirname(folder) == folder:
            return None
        folder = os.path.dirname(folder)
    return folder


def ids_digest(ids: List) -> str:
    """"xxh3:<hex>" of the ids' JSON text, `json.dumps(ids)` (hashed in slices: bounded memory)."""
    digest = xxhash.xxh3_64(b"[")
    for start in range(0, len(ids), _DIGEST_SLICE):
        digest.update((", " if start else "").encode()
                      + json.dumps(ids[start:start + _DIGEST_SLICE])[1:-1].encode())
    digest.update(b"]")
    return f"xxh3:{digest.hexdigest()}"


_DIGEST_SLICE = 65536


def describes(fingerprint: Optional[str], ids: List) -> dict:
    """What a statistics or score file was computed from: the project's fingerprint, the
    number of training rows and a digest of their ids (stored as JSON metadata `describes`)."""
    return {"fingerprint": fingerprint, "rows": len(ids), "ids": ids_digest(ids)}


def _short(error: BaseException) -> str:
    return "nested too deeply" if isinstance(error, RecursionError) else str(error)


def shard_entry(data) -> ShardEntry:
    """A ShardEntry from its JSON form; a version 1 entry records "sha256": <hex> instead of
    "checksum"."""
    if isinstance(data, dict) and "sha256" in data and "checksum" not in data:
        data = dict(data)
        data["checksum"] = "sha256:" + data.pop("sha256")
    return _typed(ShardEntry, data)


def _typed(cls, data):
    """Build a frozen entry from JSON, refusing values of the wrong type (e.g. "rows": "5")."""
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__} must be a JSON object, got {data!r}")
    allowed = {"str": (str,), "int": (int,), "bool": (bool,), "Optional[str]": (str, type(None))}
    for f in dataclasses.fields(cls):
        if f.name in data:
            value = data[f.name]
            kinds = allowed[str(f.type)]
            if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
                raise ValueError(f"{cls.__name__}.{f.name} is {value!r}, expected {f.type}")
    return cls(**data)


def load_optional(project_dir: str) -> Optional[Manifest]:
    if not os.path.isfile(os.path.join(project_dir, MANIFEST)):
        return None
    return Manifest.load(project_dir)

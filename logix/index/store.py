"""``<project>/index/<name>/``: one FAISS file and its manifest (index.json), which names the
shards it holds (with checksums), the layout, mode and curvature it serves, and its parameters.
An index is fresh when its shards are exactly the log's, behind when the log has only gained
shards (an incremental update reads the new ones), and stale otherwise (refused)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from logix.errors import LogFormatError
from logix.storage.format import atomic_write

INDEX_DIR = "index"
INDEX_MANIFEST = "index.json"
INDEX_FILE = "index.faiss"
INDEX_FORMAT = "logix-index"
INDEX_VERSION = 2
FRESH, BEHIND, STALE = "fresh", "behind", "stale"


@dataclass
class IndexManifest:
    name: str
    kind: str  # flat | ivf | hnsw (kind="auto" resolved)
    mode: str  # dot | cosine
    faiss: dict  # factory, nlist, nprobe, hnsw_m, ef, quantize
    layout: dict  # dim, dtype, modules [[name, rank_out, rank_in]], projection checksum
    curvature: Optional[dict] = None  # cosine only: hessian, damping, key
    sketch: Optional[dict] = None  # width, seed
    part: dict = field(default_factory=lambda: {"rank": 0, "world": 1})
    shards: List[dict] = field(default_factory=list)  # file, checksum, rows (index row order)
    rows: int = 0
    bytes: int = 0
    build_seconds: float = 0.0
    calibration: Optional[dict] = None  # kind="auto": recall@10 and speed-up measured at build
    format_version: int = INDEX_VERSION
    format: str = INDEX_FORMAT

    @property
    def width(self) -> int:
        return self.sketch["width"] if self.sketch else self.layout["dim"]


def folder(project_dir: str, name: str) -> str:
    return os.path.join(project_dir, INDEX_DIR, name)


def save(project_dir: str, manifest: IndexManifest) -> None:
    data = json.dumps(dataclasses.asdict(manifest), indent=1).encode()
    atomic_write(os.path.join(folder(project_dir, manifest.name), INDEX_MANIFEST), data)


def load(project_dir: str, name: str) -> IndexManifest:
    path = os.path.join(folder(project_dir, name), INDEX_MANIFEST)
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
        if data.get("format") != INDEX_FORMAT or data.get("format_version") != INDEX_VERSION:
            raise ValueError(f"format {data.get('format')!r} v{data.get('format_version')}")
        return IndexManifest(**data)
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise LogFormatError(f"{path!r} is not a readable LogIX index manifest ({e}). Delete "
                             f"the folder and build the index again (logix index DIR).") from e


def names(project_dir: str) -> List[str]:
    root = os.path.join(project_dir, INDEX_DIR)
    if not os.path.isdir(root):
        return []
    return sorted(n for n in os.listdir(root)
                  if os.path.isfile(os.path.join(root, n, INDEX_MANIFEST)))


def layout_of(log_manifest) -> dict:
    return {"dim": log_manifest.dim, "dtype": log_manifest.dtype,
            "modules": [[m.name, m.rank_out, m.rank_in] for m in log_manifest.modules],
            "projection": (log_manifest.projection or {}).get("checksum")}


def shard_entries(shards) -> List[dict]:
    return [{"file": s.file, "checksum": s.checksum, "rows": s.rows} for s in shards]


def state(manifest: IndexManifest, shards, layout: dict) -> Tuple[str, str]:
    """(FRESH | BEHIND | STALE, why) of an index against the log's current shards and layout."""
    if manifest.layout != layout:
        return STALE, (f"it was built for another row layout or projection ({manifest.layout}; "
                       f"the log now has {layout})")
    current = shard_entries(shards)
    held = manifest.shards
    for i, entry in enumerate(held):
        if i >= len(current):
            return STALE, f"shard {entry['file']!r} it holds is no longer in the log"
        if current[i] != entry:
            return STALE, (f"shard {entry['file']!r} changed (checksum or rows differ, or shards "
                           f"were reordered)")
    if len(current) > len(held):
        return BEHIND, f"{len(current) - len(held)} shard(s) were logged after it was built"
    return FRESH, "up to date"


def default_name(kind: str, mode: str, quantize: Optional[str], sketch: Optional[int],
                 hessian: Optional[str], part: dict) -> str:
    name = f"{kind}-{mode}"
    if mode == "cosine":
        name += f"-{hessian}"
    if quantize:
        name += f"-{quantize}"
    if sketch:
        name += f"-s{sketch}"
    if part["world"] > 1:
        name += f"-r{part['rank']}of{part['world']}"
    return name


def curvature_of(preconditioner) -> dict:
    """What a cosine index's row normalisation depends on: curvature kind, damping and a
    fingerprint of the statistics."""
    import hashlib

    fingerprint = [(name, float(inv.values.sum()) if inv.values is not None else 0.0)
                   for name, inv in sorted(preconditioner.inverses.items())]
    key = json.dumps([preconditioner.kind, preconditioner.dampings, fingerprint],
                     sort_keys=True, default=str)
    return {"hessian": preconditioner.kind, "damping": preconditioner.dampings,
            "key": hashlib.sha1(key.encode()).hexdigest()[:16]}


def summaries(project_dir: str, log_manifest) -> List[dict]:
    """One line per index of a project (for `logix show`): what it serves and whether it is
    fresh, behind or stale against the log's current shards."""
    out = []
    shards = [s for s in log_manifest.shards if s.checkpoint is None]
    for name in names(project_dir):
        try:
            m = load(project_dir, name)
        except LogFormatError as e:
            out.append({"name": name, "error": str(e)})
            continue
        status, why = state(m, shards, layout_of(log_manifest))
        if m.part["world"] > 1:  # a rank's index holds that rank's share of the shards
            status, why = "part", f"rank {m.part['rank']} of {m.part['world']}"
        out.append({"name": name, "kind": m.kind, "factory": m.faiss["factory"],
                    "mode": m.mode, "hessian": (m.curvature or {}).get("hessian"),
                    "sketch": (m.sketch or {}).get("width"), "rows": m.rows, "bytes": m.bytes,
                    "state": status, "why": why, "recall": (m.calibration or {}).get(
                        "recall_at_10"), "speedup": (m.calibration or {}).get("speedup")})
    return out


def build_hint(manifest: "IndexManifest", project_dir: str, rebuild: bool = False) -> str:
    """How to build this index again, with the options it was built with (a bare build_index()
    would build another index)."""
    options = {"kind": manifest.faiss.get("requested") or manifest.kind, "mode": manifest.mode,
               "quantize": manifest.faiss.get("quantize"),
               "sketch": manifest.sketch and manifest.sketch["width"],
               "hessian": manifest.curvature and manifest.curvature["hessian"],
               "name": manifest.name, "rebuild": rebuild}
    chosen = {k: v for k, v in options.items() if v}
    python = ", ".join(f"{k}={v!r}" for k, v in chosen.items())
    cli = " ".join(f"--{k}" if v is True else f"--{k} {v}" for k, v in chosen.items())
    return f"attributor.build_index({python}) or `logix index {project_dir} {cli}`"

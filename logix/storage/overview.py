"""What a log folder holds, read from the manifest and file headers only (no rows, no sums):
the summary behind `logix show` and the dashboard's project page."""

from __future__ import annotations

import json
import os
from typing import Dict

from logix.errors import LogFormatError
from logix.storage.format import DTYPES, KEY_SEP, PROJECTIONS_FILE, STATE_DIR, STATISTICS_FILE
from logix.storage.state import recorded_describes


def summary(project_dir: str, manifest, list_shards: bool = False) -> Dict:
    """Layout, sizes, compression and the state files of a project (`logix show --json`)."""
    itemsize = DTYPES[manifest.dtype].itemsize if manifest.dtype in DTYPES else None
    full = sum(m.in_dim * m.out_dim for m in manifest.modules)
    dim = manifest.dim
    shards_by_rank: Dict[int, int] = {}
    for s in manifest.shards:
        shards_by_rank[s.rank] = shards_by_rank.get(s.rank, 0) + 1
    out = {
        "path": os.path.abspath(project_dir),
        "project": manifest.project,
        "format_version": manifest.format_version,
        "dtype": manifest.dtype,
        "projection": dict(manifest.projection),
        "modules": [{"name": m.name, "type": m.type, "gradient": [m.out_dim, m.in_dim],
                     "rank": [m.rank_out, m.rank_in], "offset": m.offset, "width": m.dim,
                     "bias": m.bias} for m in manifest.modules],
        "row_width": dim,
        "rows": manifest.rows,
        "checkpoint_rows": sum(s.rows for s in manifest.shards if s.checkpoint is not None),
        "shards": {"count": len(manifest.shards),
                   "bytes": sum(s.bytes for s in manifest.shards),
                   "by_rank": {str(r): n for r, n in sorted(shards_by_rank.items())}},
        "bytes_per_example": dim * itemsize if itemsize else None,
        "full_gradient_numbers": full,
        "full_gradient_bytes_per_example": full * itemsize if itemsize else None,
        "compression": (full / dim) if dim else None,
        "statistics": statistics_info(project_dir),
        "projections_file": projections_info(project_dir),
    }
    if list_shards:
        out["shards"]["files"] = [{"file": s.file, "rank": s.rank, "seq": s.seq, "rows": s.rows,
                                   "bytes": s.bytes, "checksum": s.checksum}
                                  for s in manifest.shards]
    return out



def statistics_info(project_dir: str) -> Dict:
    """{"present": bool, "error": str|None, "entries": {module: {kind: {"shape", "count"}}}}
    from the header of state/statistics.safetensors (sums are not loaded)."""
    path = os.path.join(project_dir, STATE_DIR, STATISTICS_FILE)
    info = {"file": f"{STATE_DIR}/{STATISTICS_FILE}", "present": os.path.isfile(path),
            "error": None, "entries": {}, "orphan_counts": [], "describes": None}
    if not info["present"]:
        return info
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            info["describes"] = recorded_describes(path, f.metadata() or {})
            keys = sorted(f.keys())
            counts = {}
            for key in keys:
                parts = key.split(KEY_SEP)
                if len(parts) >= 3 and parts[-1] == "count":
                    counts[KEY_SEP.join(parts[:-1])] = float(f.get_tensor(key).double().sum())
                elif len(parts) >= 2:
                    module, kind = parts[0], KEY_SEP.join(parts[1:])
                    info["entries"].setdefault(module, {})[kind] = {
                        "shape": list(f.get_slice(key).get_shape()), "count": None}
    except (SafetensorError, OSError, RuntimeError, LogFormatError) as e:
        info["error"] = f"{e}"
        return info
    for base, count in counts.items():
        module, _, kind = base.partition(KEY_SEP)
        entry = info["entries"].get(module, {}).get(kind)
        if entry is None:
            info["orphan_counts"].append(base)
        else:
            entry["count"] = count
    return info



def projections_info(project_dir: str) -> Dict:
    """Header facts of state/projections.safetensors: which matrices, their shapes, metadata."""
    path = os.path.join(project_dir, STATE_DIR, PROJECTIONS_FILE)
    info = {"file": f"{STATE_DIR}/{PROJECTIONS_FILE}", "present": os.path.isfile(path),
            "error": None, "shapes": {}, "meta": None, "dims": None}
    if not info["present"]:
        return info
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            info["shapes"] = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        info["meta"] = json.loads(metadata["meta"]) if "meta" in metadata else None
        info["dims"] = json.loads(metadata["dims"]) if "dims" in metadata else None
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        info["error"] = f"{e}"
    return info

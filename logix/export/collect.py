"""What an export sends, read from disk into plain Python structures (no tracker imported):
a project folder's summary (what `logix show --json` prints), top-k tables of its score files
with the examples' text and labels (`run.describe`), per-token heat maps (PNG bytes) of score
files that carry token scores, and evaluation result files (LDS, brittleness).

Every tracker module (`tensorboard.py`, `mlflow.py`, `wandb.py`) takes one `Export` and writes
it in its own terms; see docs/export.md for what goes where.
"""

from __future__ import annotations

import math
import os
import struct
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from logix.errors import LogFormatError, UsageError

TOPK_COLUMNS = ["query", "query_id", "query_label", "query_text", "kind", "rank", "train_id",
                "score", "train_label", "train_text"]
MODULE_COLUMNS = ["name", "type", "out_dim", "in_dim", "rank_out", "rank_in", "offset", "width",
                  "bias"]
BRITTLENESS_COLUMNS = ["test_index", "k", "margin", "base_margin", "k_flip",
                       "random_flip_fraction", "random_margin_mean"]
LDS_COLUMNS = ["query", "lds"]
# The summary's numbers that make sense as metrics (the rest are settings).
SUMMARY_SCALARS = ("rows", "row_width", "modules", "shards", "shard_bytes", "bytes_per_example",
                   "compression", "checkpoint_rows", "described_examples")
HELPFUL, HARMFUL = "helpful", "harmful"
# Folders of a project never searched for score / result files: the log itself, derived data,
# and what an export writes by default.
_SKIP = {"logs", "state", "cache", "content", "index", "logix_export"}
_MAX_SCAN = 2000


@dataclass
class Table:
    """Rows of equal length under `columns`; cells are str, int, float, bool or None."""

    name: str
    columns: List[str]
    rows: List[List[Any]] = field(default_factory=list)

    def records(self) -> List[Dict[str, Any]]:
        return [dict(zip(self.columns, row)) for row in self.rows]


@dataclass
class Image:
    """A PNG: `tag` groups images (one per score file), `step` is the query row it shows."""

    tag: str
    step: int
    caption: str
    png: bytes

    @property
    def size(self):
        """(width, height) in pixels, from the PNG header."""
        return struct.unpack(">II", self.png[16:24])


@dataclass
class Evaluation:
    """One evaluation result file (logix.evaluation.save_results): its LDS (mean and per query)
    or its brittleness rows."""

    name: str
    kind: str  # "lds" | "brittleness"
    file: str
    lds: Optional[float] = None
    per_query: List[Optional[float]] = field(default_factory=list)
    table: Optional[Table] = None  # LDS_COLUMNS or BRITTLENESS_COLUMNS
    data: Dict[str, Any] = field(default_factory=dict)  # the file as load_results read it


@dataclass
class Export:
    """Everything one export sends. `params`: flat scalars of the summary (hyperparameter-like);
    `tables`: "modules" and one "topk/<score file>" per score file; `images`: heat maps;
    `notes`: what was left out and why (printed by `logix export`)."""

    project: str
    project_dir: str
    summary: Dict[str, Any]
    params: Dict[str, Any]
    tables: Dict[str, Table]
    images: List[Image]
    evaluations: List[Evaluation]
    notes: List[str] = field(default_factory=list)

    @property
    def default_name(self) -> str:
        return f"logix-{self.project}"


def collect(project_dir: str, scores: Optional[Sequence[str]] = None,
            results: Optional[Sequence[str]] = None, k: int = 10, queries: int = 20,
            heatmaps: bool = True, text_chars: int = 500) -> Export:
    """Read what to export. `scores` / `results`: score files and evaluation result files (None:
    every one found in the project folder, outside logs/, state/, cache/, content/, index/);
    `k`: helpful and harmful examples per query; `queries`: the first N queries of each score
    file; `heatmaps`: per-token heat maps (needs matplotlib) of score files that have token
    scores, one per query against its most helpful example; `text_chars`: example text cut to
    this many characters."""
    from logix.storage.content import load_content
    from logix.storage.format import MANIFEST
    from logix.storage.manifest import read_manifest
    from logix.storage.overview import summary as log_summary

    if not isinstance(k, int) or k < 1 or not isinstance(queries, int) or queries < 1:
        raise UsageError(f"k and queries must be positive integers, got k={k!r}, "
                         f"queries={queries!r}.")
    project_dir = os.fspath(project_dir)
    if not os.path.isdir(project_dir):
        raise UsageError(f"{project_dir!r} is not a folder; pass a project folder "
                         "(<root_dir>/<project>, the one with manifest.json).")
    if not os.path.isfile(os.path.join(project_dir, MANIFEST)):
        raise UsageError(f"{project_dir!r} is not a LogIX log: it has no {MANIFEST}. Pass the "
                         "project folder (<root_dir>/<project>).")
    manifest, _ = read_manifest(project_dir)
    info = log_summary(project_dir, manifest)
    store = load_content(project_dir)
    notes: List[str] = []
    if scores is None or results is None:
        found_scores, found_results = _find_files(project_dir, notes if scores is None else [])
    scores = found_scores if scores is None else _paths(scores, "score file")
    results = found_results if results is None else _paths(results, "result file")
    out = Export(project=manifest.project, project_dir=os.path.abspath(project_dir),
                 summary=info, params=_params(info, len(store)),
                 tables={"modules": _modules(info)}, images=[], evaluations=[], notes=notes)
    out.notes.extend(f"content: {e}" for e in store.errors)
    for path, name in zip(scores, _unique_names([_stem(p) for p in scores])):
        out.tables[f"topk/{name}"] = _topk(path, name, store, k, queries, text_chars)
        if heatmaps:
            out.images.extend(_heatmaps(path, name, queries, out.notes))
    out.evaluations = [_evaluation(path) for path in results]
    for ev, name in zip(out.evaluations, _unique_names([ev.name for ev in out.evaluations])):
        ev.name = name  # two results saved under one name stay apart in the trackers
        if ev.table is not None:
            ev.table.name = f"{ev.kind}/{name}"
    return out


def _paths(paths, what: str) -> List[str]:
    """Given paths as a list (one path alone is taken as a list of one); each must exist."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    for path in paths:
        if not os.path.isfile(path):
            raise UsageError(f"The {what} {os.fspath(path)!r} does not exist (or is a folder).")
    return [os.fspath(p) for p in paths]


# --------------------------------------------------------------------------- summary
def _params(info: Dict[str, Any], described: int) -> Dict[str, Any]:
    projection = info.get("projection") or {}
    return {
        "project": info["project"], "format_version": info["format_version"],
        "dtype": info["dtype"], "projection_init": projection.get("init", "none"),
        "projection_seed": projection.get("seed"), "modules": len(info["modules"]),
        "rows": info["rows"], "row_width": info["row_width"],
        "checkpoint_rows": info["checkpoint_rows"], "shards": info["shards"]["count"],
        "shard_bytes": info["shards"]["bytes"], "bytes_per_example": info["bytes_per_example"],
        "compression": info["compression"], "statistics": info["statistics"]["present"],
        "described_examples": described,
    }


def _modules(info: Dict[str, Any]) -> Table:
    return Table("modules", list(MODULE_COLUMNS), [
        [m["name"], m["type"], m["gradient"][0], m["gradient"][1], m["rank"][0], m["rank"][1],
         m["offset"], m["width"], m["bias"]] for m in info["modules"]])


# --------------------------------------------------------------------------- files
def _find_files(project_dir: str, notes: List[str]):
    """Score files (.safetensors) and evaluation result files (.json) in the project folder;
    a .safetensors file that is not a readable score file gets a note."""
    scores, results, seen = [], [], 0
    for folder, dirs, files in os.walk(project_dir):
        if os.path.samefile(folder, project_dir):
            dirs[:] = [d for d in dirs if d not in _SKIP]
        dirs.sort()
        for name in sorted(files):
            seen += 1
            if seen > _MAX_SCAN:
                return scores, results
            path = os.path.join(folder, name)
            if name.endswith(".safetensors"):
                problem = _score_file_problem(path)
                if problem is None:
                    scores.append(path)
                else:
                    notes.append(f"{os.path.relpath(path, project_dir)} left out: {problem}")
            elif name.endswith(".json") and _is_result_file(path):
                results.append(path)
    return scores, results


def _score_file_problem(path: str) -> Optional[str]:
    from logix.storage.scores import open_scores

    try:
        open_scores(path).close()
    except (LogFormatError, UsageError, OSError) as e:
        return str(e)
    return None


def _is_result_file(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return b'"logix-evaluation"' in f.read(200)
    except OSError:
        return False


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0] or "file"


def _unique_names(bases: Sequence[str]) -> List[str]:
    """The names as they are; a repeated one gets -2, -3, ..."""
    names, taken = [], set()
    for base in bases:
        name, n = base, 1
        while name in taken:
            n += 1
            name = f"{base}-{n}"
        taken.add(name)
        names.append(name)
    return names


# --------------------------------------------------------------------------- scores
def _topk(path: str, name: str, store, k: int, queries: int, text_chars: int) -> Table:
    from logix.storage.scores import open_scores, top_of_row

    table = Table(f"topk/{name}", list(TOPK_COLUMNS))
    with open_scores(path) as scores:  # names the path when it is not a score file
        for q in range(min(queries, scores.shape[0])):
            query_id = scores.src_ids[q]
            about = store.get(query_id)
            helpful, harmful, _ = top_of_row(scores.row(q), scores.tgt_ids, k)
            for kind, entries in ((HELPFUL, helpful), (HARMFUL, harmful)):
                for e in entries:
                    example = store.get(e["id"])
                    table.rows.append([
                        q, query_id, about.get("label"), _cut(about.get("text"), text_chars),
                        kind, e["rank"], e["id"], e["score"], example.get("label"),
                        _cut(example.get("text"), text_chars)])
    return table


def _cut(text: Optional[str], n: int) -> Optional[str]:
    if text is None or len(text) <= n:
        return text
    return text[:max(n - 3, 0)] + "..."


def _heatmaps(path: str, name: str, queries: int, notes: List[str]) -> List[Image]:
    """One PNG per query (its tokens against its most helpful training example) of a score file
    with per-token scores; none (and a note) without matplotlib."""
    from safetensors import safe_open

    from logix.storage.scores import TOKEN_INFLUENCE_KEY, load_scores

    with safe_open(path, framework="pt") as f:
        if TOKEN_INFLUENCE_KEY not in f.keys():
            return []
    try:
        import matplotlib  # noqa: F401  (heatmap_png needs it)
    except ImportError:
        notes.append(f"heat maps of {name!r} left out: they need matplotlib "
                     "(pip install \"logix[viz]\").")
        return []
    from logix.text.heatmap import heatmap_png

    result = load_scores(path)
    images = []
    with tempfile.TemporaryDirectory() as tmp:
        for q in range(min(queries, len(result["src_ids"]))):
            if q not in result["token_query"] or not len(result["tgt_ids"]):
                continue
            png = os.path.join(tmp, f"{q}.png")
            heatmap_png(result, png, query=q)
            column = int(result["influence"][q].argmax())
            with open(png, "rb") as f:
                images.append(Image(f"heatmap/{name}", q,
                                    f"query {result['src_ids'][q]!r} x training example "
                                    f"{result['tgt_ids'][column]!r}", f.read()))
    return images


# --------------------------------------------------------------------------- evaluations
def _evaluation(path: str) -> Evaluation:
    from logix.evaluation.results import load_results

    try:
        data = load_results(path)
    except OSError as e:
        raise UsageError(f"Cannot read the result file {path!r}: {e}") from None
    except ValueError as e:  # names the path: not JSON, not a result file, newer version
        raise UsageError(str(e)) from None
    label = str(data.get("name") or _stem(path))
    if data["kind"] == "lds":
        per_query = [_finite(v) for v in data.get("per_query", [])]
        return Evaluation(label, "lds", path, lds=_finite(data.get("lds")), per_query=per_query,
                          table=Table(f"lds/{label}", list(LDS_COLUMNS),
                                      [[q, v] for q, v in enumerate(per_query)]),
                          data=data)
    table = Table(f"brittleness/{label}", list(BRITTLENESS_COLUMNS))
    for r in data.get("results", []):
        for key, margin in sorted((r.get("margins") or {}).items(), key=lambda kv: int(kv[0])):
            randoms = [v for v in (r.get("random_margins") or {}).get(key, []) if v is not None]
            table.rows.append([
                r.get("test_index"), int(key), _finite(margin), _finite(r.get("base_margin")),
                r.get("k_flip"), _finite((r.get("random_flip_fraction") or {}).get(key)),
                sum(randoms) / len(randoms) if randoms else None])
    return Evaluation(label, "brittleness", path, table=table, data=data)


def _finite(value) -> Optional[float]:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


# --------------------------------------------------------------------------- shared by trackers
def require(module: str, extra: str, tracker: str):
    """Import an optional tracker package on first use, or a UsageError naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise UsageError(f"Exporting to {tracker} needs the {module.split('.')[0]!r} package "
                         f"({e}): pip install \"logix[{extra}]\".") from e


def new_folder(parent: str, name: str) -> str:
    """`parent/name`, or `parent/name-2`, `-3`, ... if that exists: one folder per export."""
    path, n = os.path.join(parent, name), 1
    while os.path.exists(path):
        n += 1
        path = os.path.join(parent, f"{name}-{n}")
    os.makedirs(path)
    return path


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-style markdown table; `|` and line breaks in cells are escaped."""
    def cell(value) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            value = f"{value:.6g}"
        return " ".join(str(value).split()).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)

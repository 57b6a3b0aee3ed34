"""JSON builders behind every dashboard page. They only read: manifests, shards' headers, state
files, score files, example content and evaluation result files. Problems come back as
{"error": message} entries, never as exceptions, so a page can say what is wrong."""

from __future__ import annotations

import json
import math
import os
import threading
import time
from typing import Any, Dict, List, Optional

from logix.errors import LogFormatError, UsageError
from logix.storage.format import (CACHE_DIR, KEY_SEP, LOGS_DIR, MANIFEST, STATE_DIR,
                                  STATISTICS_FILE)
from logix.storage.scores import top_of_row

CONTENT_DIR = "content"
_RESERVED = {LOGS_DIR, STATE_DIR, CACHE_DIR, CONTENT_DIR}  # never scanned for score files
_MAX_EIGEN = 2048  # statistics wider than this get no spectrum (eigvalsh is cubic)
_MAX_SCAN = 2000  # files looked at per project when listing score / result files
NORMS = ("max", "raw")  # the example page's views: scores / the query's largest |score|, or raw


class DashboardError(Exception):
    """What a page or endpoint cannot show, with the HTTP status that goes with it."""

    def __init__(self, message: str, status: int = 404) -> None:
        super().__init__(message)
        self.status = status


class Dashboard:
    """The projects under one or more roots. A root is a project folder (holding manifest.json)
    or a folder of project folders. Folders are looked at again on every call, so new projects,
    shards and score files show up without a restart."""

    def __init__(self, roots: List[str]) -> None:
        self.roots = [os.path.abspath(r) for r in roots]
        self._real_roots = [os.path.realpath(r) for r in roots]
        self._cache: Dict[tuple, Any] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ discovery
    def inside(self, path: str) -> bool:
        """Whether `path`, links resolved (os.path.realpath), stays inside a served root. The
        dashboard reads nothing else: a link out of the root is not followed."""
        real = os.path.realpath(path)
        return any(real == r or real.startswith(r.rstrip(os.sep) + os.sep)
                   for r in self._real_roots)

    def _outside(self, path: str, what: str) -> str:
        return (f"{what} {path!r} is a link to {os.path.realpath(path)!r}, outside the folders "
                f"being served ({', '.join(self.roots)}); the dashboard does not follow links "
                "out of them. Copy the file in, or serve the folder it lives in.")

    def _candidates(self) -> List[str]:
        found = []
        for root in self.roots:
            if _has_manifest(root) or _looks_like_log(root):
                found.append(root)
                continue
            try:
                names = sorted(os.listdir(root))
            except OSError:
                continue
            paths = [os.path.join(root, n) for n in names]
            found += [p for p in paths if _has_manifest(p) or _looks_like_log(p)]
        return found

    def folders(self) -> Dict[str, str]:
        """{key: project folder}, keys unique (a repeated folder name gets a -2, -3 suffix);
        folders that are links out of the roots are left out (root_problems names them)."""
        keys: Dict[str, str] = {}
        for path in filter(self.inside, self._candidates()):
            key = base = os.path.basename(path.rstrip(os.sep)) or "project"
            n = 1
            while key in keys:
                n += 1
                key = f"{base}-{n}"
            keys[key] = path
        return keys

    def folder(self, key: str) -> str:
        folders = self.folders()
        if key not in folders:
            raise DashboardError(f"No project {key!r} under {', '.join(self.roots)}; known: "
                                 f"{sorted(folders) or 'none'}.")
        problem = self._log_links_out(folders[key])
        if problem:
            raise DashboardError(problem, 403)
        return folders[key]

    def _refuse_link_out(self, path: str, rel: str, what: str) -> None:
        full = os.path.join(path, rel)
        if os.path.islink(full) and not self.inside(full):
            raise DashboardError(self._outside(full, what), 403)

    def _log_links_out(self, path: str) -> Optional[str]:
        """A message if the manifest, or anything under logs/, state/, cache/ or content/, is
        a link that leaves the roots (then nothing of the project is read), else None."""
        for folder, dirs, files in os.walk(path):
            if folder == path:
                dirs[:] = [d for d in dirs if d in _RESERVED]
                files = [f for f in files if f == MANIFEST]
            for name in dirs + files:
                full = os.path.join(folder, name)
                if os.path.islink(full) and not self.inside(full):
                    return self._outside(full, "In this project,")
        return None

    def root_problems(self) -> List[str]:
        """Messages for roots that hold no project at all (not a log folder, or missing)."""
        problems = [self._outside(p, "The project folder") for p in self._candidates()
                    if not self.inside(p)]
        for root in self.roots:
            if not os.path.isdir(root):
                problems.append(f"{root!r} does not exist or is not a folder.")
            elif not any(p == root or os.path.dirname(p) == root for p in self.folders().values()):
                problems.append(f"{root!r} is not a LogIX log: it has no {MANIFEST}, and none of "
                                f"its subfolders has one. Point `logix ui` at <root_dir> or at "
                                f"a project folder <root_dir>/<project>.")
        return problems

    # ------------------------------------------------------------------ projects page
    def projects(self) -> Dict[str, Any]:
        rows = [self.project_row(key, path) for key, path in self.folders().items()]
        return {"roots": self.roots, "projects": rows, "problems": self.root_problems(),
                "time": time.time()}

    def project_row(self, key: str, path: str) -> Dict[str, Any]:
        row: Dict[str, Any] = {"key": key, "path": path, "disk_bytes": _disk_bytes(path),
                               "last_write": _last_write(path)}
        problem = self._log_links_out(path)
        try:
            if problem:
                raise LogFormatError(problem)
            manifest, raw = _manifest(path)
            for shard in manifest.shards:
                if not self.inside(os.path.join(path, shard.file)):
                    raise LogFormatError(self._outside(os.path.join(path, shard.file),
                                                       "The shard"))
        except LogFormatError as e:
            row["error"] = str(e)
            return row
        finalized = {s.get("file") for s in raw.get("shards", []) if isinstance(s, dict)}
        row.update(project=manifest.project, rows=manifest.rows, width=manifest.dim,
                   modules=len(manifest.modules), shards=len(manifest.shards),
                   checkpoints=len(manifest.checkpoints), dtype=manifest.dtype,
                   projection=manifest.projection.get("init", "none"),
                   state="logging" if any(s.file not in finalized for s in manifest.shards)
                   or not os.path.isfile(os.path.join(path, STATE_DIR, STATISTICS_FILE))
                   else "finalized")
        return row

    # ------------------------------------------------------------------ project page
    def project(self, key: str, hashing: bool = False) -> Dict[str, Any]:
        from logix.storage.overview import summary

        path = self.folder(key)
        out: Dict[str, Any] = {"key": key, "row": self.project_row(key, path)}
        out.update(self._files(path))
        if "error" in out["row"]:
            out["error"] = out["row"]["error"]
            return out
        manifest, _ = _manifest(path)
        out["summary"] = summary(path, manifest)
        out["spectra"] = self._spectra(path)
        out["growth"] = _growth(path, manifest)
        out["verify"] = _verify(path, hashing)
        out["content"] = self._content_summary(path)
        return out

    def _files(self, path: str) -> Dict[str, List[Dict]]:
        """Score files and evaluation result files anywhere in the project folder (outside
        logs/, state/, cache/, content/), recognised by their headers."""
        scores, evaluations, seen = [], [], 0
        for folder, dirs, files in os.walk(path):
            if folder == path:
                dirs[:] = [d for d in dirs if d not in _RESERVED]
            dirs.sort()
            for name in sorted(files):
                seen += 1
                if seen > _MAX_SCAN:
                    return {"score_files": scores, "evaluation_files": evaluations}
                full = os.path.join(folder, name)
                if not self.inside(full):
                    continue
                rel = os.path.relpath(full, path).replace(os.sep, "/")
                if name.endswith(".safetensors"):  # a damaged one is listed: its page says why
                    scores.append({"file": rel, "bytes": os.path.getsize(full)})
                elif name.endswith(".json") and _is_result_file(full):
                    evaluations.append({"file": rel, "bytes": os.path.getsize(full)})
        return {"score_files": scores, "evaluation_files": evaluations}

    def _spectra(self, path: str) -> Dict[str, Any]:
        """{module: {kind: eigenvalues of sum / count, descending}} (cached per file mtime);
        for EK-FAC's corrected eigenvalues, those values themselves, sorted."""
        stats_path = os.path.join(path, STATE_DIR, STATISTICS_FILE)
        if not os.path.isfile(stats_path):
            return {"error": f"{STATE_DIR}/{STATISTICS_FILE} is missing (finalize() writes it)."}
        key = ("spectra", stats_path, os.path.getmtime(stats_path))
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        import torch
        from safetensors import SafetensorError, safe_open

        from logix.statistics.eigen import EKFAC

        out: Dict[str, Any] = {"modules": {}}
        try:
            with safe_open(stats_path, framework="pt") as f:
                keys = sorted(f.keys())
                for name in keys:
                    parts = name.split(KEY_SEP)
                    if len(parts) != 2 or f"{name}::count" not in keys:
                        continue
                    shape = f.get_slice(name).get_shape()
                    entry = out["modules"].setdefault(parts[0], {})
                    square = len(shape) == 2 and shape[0] == shape[1]
                    if parts[1] != EKFAC and (not square or shape[0] > _MAX_EIGEN):
                        entry[parts[1]] = {"shape": shape, "note": "no spectrum (not square, "
                                                                   f"or wider than {_MAX_EIGEN})"}
                        continue
                    count = float(f.get_tensor(f"{name}::count").double().sum())
                    mean = f.get_tensor(name).double() / max(count, 1.0)
                    if parts[1] == EKFAC:  # already eigenvalues: [r_out, r_in], one per pair
                        values = mean.flatten().sort(descending=True).values
                    else:
                        values = torch.linalg.eigvalsh((mean + mean.T) / 2).flip(0)
                    entry[parts[1]] = {"shape": shape, "count": count,
                                       "eigenvalues": [_finite(v) for v in values.tolist()]}
        except (SafetensorError, OSError, RuntimeError) as e:
            out = {"error": f"{STATE_DIR}/{STATISTICS_FILE} is not readable: {e}"}
        with self._lock:
            self._cache[key] = out
        return out

    def _content_summary(self, path: str) -> Dict[str, Any]:
        store = self.content(path)
        return {"described": len(store), "errors": store.errors}

    def content(self, path: str):
        """The project's ContentStore, cached until a content file is added."""
        from logix.storage.content import load_content

        folder = os.path.join(path, CONTENT_DIR)
        try:
            stamp = tuple(sorted((n, os.path.getmtime(os.path.join(folder, n)))
                                 for n in os.listdir(folder)))
        except OSError:
            stamp = ()
        key = ("content", path, stamp)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = load_content(path)
            return self._cache[key]

    # ------------------------------------------------------------------ scores page
    def score_file(self, key: str, rel: str) -> str:
        path = self.folder(key)
        files = {f["file"] for f in self._files(path)["score_files"]}
        self._refuse_link_out(path, rel, "The score file")
        if rel not in files:
            raise DashboardError(f"No score file {rel!r} in project {key!r}; its score files: "
                                 f"{sorted(files) or 'none'}.")
        return os.path.join(path, rel)

    def scores(self, key: str, rel: str, query: int = 0, k: int = 10,
               group: Optional[str] = None) -> Dict[str, Any]:
        from logix.storage.scores import open_scores

        full = self.score_file(key, rel)
        try:
            scores = open_scores(full, group)
        except UsageError as e:  # not a score file, or no such group
            raise DashboardError(str(e), 400) from None
        except LogFormatError as e:
            raise DashboardError(str(e), 422) from None
        n_test, n_train = scores.shape
        if n_test == 0:
            raise DashboardError(f"{rel!r} holds no queries.", 422)
        if not 0 <= query < n_test:
            raise DashboardError(f"query {query} is out of range: {rel!r} holds {n_test} queries "
                                 f"(0..{n_test - 1}).", 400)
        store = self.content(self.folder(key))
        row = scores.row(query)  # [n_train]
        helpful, harmful, nonfinite = top_of_row(row, scores.tgt_ids, k)
        group_rows = {g: open_scores(full, g).row(query) for g in scores.groups}
        index = {_id_key(i): n for n, i in enumerate(scores.tgt_ids)}
        for entry in helpful + harmful:
            col = index[_id_key(entry["id"])]
            entry["groups"] = {g: _finite(float(r[col])) for g, r in group_rows.items()}
            entry["content"] = _content(store, entry["id"])
        return {
            "key": key, "file": rel, "shape": [n_test, n_train], "meta": scores.meta,
            "groups": scores.groups, "group": group, "k": k, "query": query,
            "queries": [{"index": q, "id": i, "label": _short(store, i)}
                        for q, i in enumerate(scores.src_ids[:1000])],
            "src_id": scores.src_ids[query], "src_content": _content(store,
                                                                      scores.src_ids[query]),
            "helpful": helpful, "harmful": harmful, "nonfinite": nonfinite,
            "distribution": [_finite(v) for v in row[row.isfinite()].tolist()[:200_000]],
            "tokens": _tokens(full, query, helpful + harmful, index),
            "group_totals": {g: _finite(float(r[r.isfinite()].sum())) for g, r in
                             group_rows.items()},
        }

    # ------------------------------------------------------------------ example page
    def example(self, key: str, data_id, norm: str = "max", k: int = 10) -> Dict[str, Any]:
        """One training example: its content and the queries it helps (largest positive score)
        and hurts (most negative) most, over every score file of the project that scores it.
        norm "max": each score divided by its query's largest |score| (comparable across
        queries); "raw": the scores as stored."""
        if norm not in NORMS:
            raise DashboardError(f"norm={norm!r} is not known; use one of {sorted(NORMS)}.", 400)
        path = self.folder(key)
        store = self.content(path)
        files, pooled, problems, train_tokens = [], [], [], []
        for f in self._files(path)["score_files"]:
            full = os.path.join(path, f["file"])
            try:
                index = self._score_index(full)
            except (LogFormatError, UsageError, OSError) as e:
                problems.append(f"{f['file']}: {e}")
                continue
            column = index["columns"].get(_id_key(data_id))
            files.append({"file": f["file"], "queries": len(index["src_ids"]),
                          "scored": column is not None})
            pairs = _train_tokens(full, data_id, index["src_ids"])
            if isinstance(pairs, str):
                problems.append(f"{f['file']}: {pairs}")
            else:
                train_tokens += [{**pair, "file": f["file"]} for pair in pairs]
            if column is None:
                continue
            raw = _column(full, column)  # [n_test]
            for q, value in enumerate(raw.tolist()):
                scale = index["max_abs"][q]
                if not math.isfinite(value):
                    continue
                shown = value if norm == "raw" else (value / scale if scale > 0 else 0.0)
                pooled.append({"file": f["file"], "query": q, "query_id": index["src_ids"][q],
                               "raw": value, "score": shown, "query_max_abs": scale,
                               "column": column})
        if not any(f["scored"] for f in files) and data_id not in store:
            raise DashboardError(f"No training example {data_id!r} in project {key!r}: no score "
                                 "file scores it and it has no stored content.")
        helps = sorted((e for e in pooled if e["score"] > 0), key=lambda e: -e["score"])[:k]
        hurts = sorted((e for e in pooled if e["score"] < 0), key=lambda e: e["score"])[:k]
        this = _id_key(data_id)
        for entry in helps + hurts:
            entry["query_label"] = _short(store, entry["query_id"])
            tokens = _tokens(os.path.join(path, entry["file"]), entry["query"], [{"id": data_id}],
                             {this: entry.pop("column")})
            entry["tokens"] = tokens and {"tokens": tokens.get("tokens"),
                                          "completion": tokens.get("completion"),
                                          "values": tokens.get("rows", {}).get(this),
                                          "error": tokens.get("error")}
        return {"key": key, "id": data_id, "norm": norm, "k": k,
                "content": _content(store, data_id), "files": files, "problems": problems,
                "helps": helps, "hurts": hurts, "scores_seen": len(pooled),
                "train_tokens": train_tokens}

    def _score_index(self, full: str) -> Dict[str, Any]:
        """A score file's ids, its training ids' columns and each query's largest |score|
        (one pass over the rows; cached until the file changes)."""
        from logix.storage.scores import open_scores

        stat = os.stat(full)
        key = ("score-index", full, stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        with open_scores(full) as scores:
            max_abs = []
            for q in range(scores.shape[0]):
                row = scores.row(q)
                row = row[row.isfinite()]
                max_abs.append(float(row.abs().max()) if row.numel() else 0.0)
            out = {"src_ids": scores.src_ids, "max_abs": max_abs,
                   "columns": {_id_key(i): n for n, i in enumerate(scores.tgt_ids)}}
        with self._lock:
            self._cache[key] = out
        return out

    # ------------------------------------------------------------------ evaluation page
    def evaluation(self, key: str, rel: str) -> Dict[str, Any]:
        from logix.evaluation.results import load_results

        path = self.folder(key)
        full = os.path.join(path, rel)
        files = {f["file"] for f in self._files(path)["evaluation_files"]}
        self._refuse_link_out(path, rel, "The result file")
        if rel not in files:
            raise DashboardError(f"No evaluation result file {rel!r} in project {key!r}; its "
                                 f"result files: {sorted(files) or 'none'}.")
        try:
            data = load_results(full)
        except (ValueError, OSError) as e:
            raise DashboardError(str(e), 422) from None
        return {"key": key, "file": rel, **data}


# --------------------------------------------------------------------------- helpers
def _has_manifest(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST))


def _looks_like_log(path: str) -> bool:
    """A folder a run has started writing (logs/ or state/) before its first manifest."""
    return os.path.isdir(os.path.join(path, LOGS_DIR)) or \
        os.path.isdir(os.path.join(path, STATE_DIR))


def _manifest(path: str):
    """(Manifest with every rank's index merged, raw manifest.json) or LogFormatError."""
    from logix.storage.manifest import read_manifest

    if not _has_manifest(path):
        raise LogFormatError(f"{path!r} has no {MANIFEST} yet: a run that has not written its "
                             "first shard, or a folder that is not a LogIX log.")
    return read_manifest(path)


def _verify(path: str, hashing: bool) -> Dict[str, Any]:
    """`logix verify` (without checksums unless `hashing`): {"ok", "errors", "warnings"}."""
    from logix.storage.verify import verify

    try:
        report = verify(path, hashing=hashing)
    except LogFormatError as e:
        return {"ok": False, "errors": [str(e)], "warnings": [], "hashed": hashing}
    return {"ok": report.ok, "errors": report.errors, "warnings": report.warnings,
            "hashed": hashing}


def _growth(path: str, manifest) -> Dict[str, List]:
    """Cumulative rows after each shard, with the shard files' modification times."""
    times, rows, total = [], [], 0
    for shard in manifest.shards:
        total += shard.rows
        try:
            times.append(os.path.getmtime(os.path.join(path, shard.file)))
        except OSError:
            times.append(None)
        rows.append(total)
    return {"shard": list(range(1, len(rows) + 1)), "rows": rows, "time": times}


def _disk_bytes(path: str) -> int:
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size  # a link: its own size
            except OSError:
                pass
    return total


def _last_write(path: str) -> Optional[float]:
    """Latest modification time of the manifest, the logs and the state files."""
    latest = None
    for folder in (path, os.path.join(path, LOGS_DIR), os.path.join(path, STATE_DIR)):
        try:
            entries = os.scandir(folder)
        except OSError:
            continue
        with entries:
            for entry in entries:
                if entry.is_file(follow_symlinks=False):
                    latest = max(latest or 0.0, entry.stat(follow_symlinks=False).st_mtime)
    return latest


def _is_result_file(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            start = f.read(200)
    except OSError:
        return False
    return b'"logix-evaluation"' in start


def _id_key(data_id) -> str:
    return json.dumps(data_id)


def _content(store, data_id) -> Dict[str, Any]:
    """JSON-safe content of one id: text, label, image (as a PNG data URI), or a note."""
    from logix.dashboard.plots import png_data_uri

    entry = store.get(data_id)
    if not entry:
        return {"missing": True}
    out = {k: v for k, v in entry.items() if k != "image"}
    if "image" in entry:
        out["image"] = png_data_uri(entry["image"])
    return out


def _short(store, data_id) -> Optional[str]:
    entry = store.get(data_id) if data_id in store else {}
    text = entry.get("text")
    label = entry.get("label")
    parts = [str(p) for p in (label, text) if p is not None]
    return " ".join(parts)[:80] if parts else None


def _tokens(path: str, query: int, entries: List[Dict], index: Dict[str, int]
            ) -> Optional[Dict[str, Any]]:
    """Per-token scores of one query for the shown training examples, when the file has them
    (tensor token_influence [n_tokens, n_train], metadata token_query, token_text)."""
    from safetensors import SafetensorError, safe_open

    from logix.storage.scores import (TOKEN_COMPLETION_KEY, TOKEN_INFLUENCE_KEY,
                                      TOKEN_QUERY_KEY, TOKEN_TEXT_KEY)

    try:
        with safe_open(path, framework="pt") as f:
            if TOKEN_INFLUENCE_KEY not in f.keys():
                return None
            metadata = f.metadata() or {}
            rows_of = json.loads(metadata[TOKEN_QUERY_KEY])
            texts = json.loads(metadata[TOKEN_TEXT_KEY])
            flags = json.loads(metadata.get(TOKEN_COMPLETION_KEY, "null"))
            rows = [n for n, q in enumerate(rows_of) if q == query]
            if not rows:
                return {"tokens": [], "rows": {}, "completion": None}
            block = f.get_slice(TOKEN_INFLUENCE_KEY)[rows[0]:rows[-1] + 1]  # [T, n_train]
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        return {"error": f"per-token scores are not readable: {e}"}
    if not isinstance(flags, (list, type(None))):
        return {"error": f"{TOKEN_COMPLETION_KEY} must be a JSON list of booleans."}
    if len(texts) != len(rows_of) or (flags is not None and len(flags) != len(rows_of)):
        return {"error": f"{TOKEN_TEXT_KEY} names {len(texts)} tokens, {TOKEN_QUERY_KEY} "
                         f"{len(rows_of)}, {TOKEN_COMPLETION_KEY} "
                         f"{'none' if flags is None else len(flags)}."}
    return {"tokens": [texts[n] for n in rows],
            "completion": None if flags is None else [bool(flags[n]) for n in rows],
            "rows": {_id_key(e["id"]): [_finite(v) for v in
                                        block[:, index[_id_key(e["id"])]].tolist()]
                     for e in entries}}


def _train_tokens(path: str, data_id, src_ids: List) -> Any:
    """This training example's own per-token scores in a score file (train_token_scores
    results saved with it), one entry per query; a string when they are not readable."""
    from safetensors import SafetensorError, safe_open

    from logix.storage.scores import TRAIN_TOKEN_INFLUENCE_KEY, train_token_pairs

    try:
        with safe_open(path, framework="pt") as f:
            if TRAIN_TOKEN_INFLUENCE_KEY not in f.keys():
                return []
            pairs = train_token_pairs(f.metadata() or {}, f.get_tensor(TRAIN_TOKEN_INFLUENCE_KEY),
                                      src_ids)
    except (SafetensorError, OSError, KeyError, ValueError, TypeError, LogFormatError) as e:
        return f"training-token scores are not readable: {e}"
    return [{"query_id": p["query_id"], "query": src_ids.index(p["query_id"]),
             "tokens": p["token_text"], "completion": p["token_in_loss"],
             "values": [_finite(v) for v in p["token_scores"]], "score": p["score"]}
            for p in pairs if _id_key(p["train_id"]) == _id_key(data_id)]


def _column(path: str, column: int):
    """Column `column` of a score file's influence matrix: every query's score, [n_test]."""
    from safetensors import safe_open

    from logix.storage.scores import INFLUENCE_KEY

    with safe_open(path, framework="pt") as f:
        return f.get_slice(INFLUENCE_KEY)[:, column:column + 1][:, 0].float()


def _finite(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None

"""`logix serve PROJECT`: answer search requests from other processes with one warm Attributor,
so a notebook or an evaluation job does not open the index for every question.

    GET  /api/health                       the project, its rows and indexes (and their state)
    GET  /api/search?path=FILE&k=10[&bottom=1&index=&mode=&hessian=&nprobe=&ef=&candidates=]
    POST /api/search   {"rows": [[...], ...], "ids": [...], "projection": {...}, "k": 10, ...}
                    or {"path": "FILE", "k": 10, ...}

Queries are either the rows themselves (JSON numbers: the logged, unpreconditioned query
gradients, as `run.get_log()` holds them, one row per query, the saved log's width) or the path
of a `StepRows.save` file inside a folder given with `--queries-dir` (the only files the service
reads besides the project; a path that resolves outside them, symlinks included, is refused).
Answers are JSON: {"src_ids", "top_ids", "top_scores"[, "bottom_ids", "bottom_scores"], "meta"}
with the scores of `Attributor.search` (exact, float32 values written as JSON numbers, which
read back to the same float32). Errors are {"error": "..."} with 400 (bad request), 403 (a path
outside the allowed folders), 404, 405 (other methods), 409 (no fresh index for the request),
413 (too large), 421 (another Host) or 503 (busy).

Safety, as `logix ui` (docs/dashboard.md, "Safety"), through `logix.dashboard.server`: loopback
by default, and a non-loopback address only with `allow_remote` (plus a warning); the Host check
(DNS rebinding); bounded work (the dashboard server's worker threads and queue, and at most
`searches` searches at a time, each waiting at most `max_wait_s` for its turn, else 503).
Read-only: a POST carries a question, never a change; nothing is written (a search that would
compute and cache train norms, or fall back to the exact stream, is refused instead).
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import warnings
from http.server import BaseHTTPRequestHandler
from typing import Iterable, Optional, Sequence
from urllib.parse import parse_qs, urlsplit

import torch

from logix.errors import LogFormatError, LogIXError, UsageError
from logix.log import StepRows

logger = logging.getLogger("logix")
MAX_BODY_BYTES = 64 << 20
MAX_QUERIES = 1024
MAX_K = 1000
_OPTIONS = {"k": int, "candidates": int, "nprobe": int, "ef": int, "bottom": bool,
            "index": str, "mode": str, "hessian": str}


class ServiceError(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class SearchService:
    """One warm Attributor over a project and the rules of what may be asked of it."""

    def __init__(self, project_dir: str, query_dirs: Sequence[str] = (), searches: int = 2,
                 max_wait_s: float = 30.0) -> None:
        from logix.index.attributor import Attributor

        self.project_dir = os.path.abspath(project_dir)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. no statistics: said by /api/health instead
            self.attributor = Attributor(self.project_dir)
        self.attributor.index_cache.read_only = True  # train norms: read, never computed
        self.query_dirs = [os.path.realpath(d) for d in query_dirs]
        self._turns = threading.BoundedSemaphore(searches)
        self.max_wait_s = max_wait_s

    # ------------------------------------------------------------------ questions
    def health(self) -> dict:
        from logix.index.store import summaries

        reader = self.attributor.reader()
        return {"project": self.project_dir, "rows": reader.rows, "dim": reader.dim,
                "indexes": summaries(self.project_dir, reader.manifest),
                "query_dirs": self.query_dirs, "read_only": True}

    def warm_up(self, index: Optional[str] = None) -> Optional[str]:
        """Open the index `search` would use for mode dot (or `index`) and map (and check) every
        shard it holds, so that the first question is as fast as the next; returns its name."""
        from logix.index import search as index_search, store

        warm = self.attributor.index_cache
        full = self.attributor.reader()
        manifest, _ = index_search._pick(self.project_dir, "dot", None,
                                         {"rank": 0, "world": 1}, index, warm)
        if manifest is None:
            return None
        warm.index(os.path.join(store.folder(self.project_dir, manifest.name),
                                store.INDEX_FILE), manifest.kind)
        rows = warm.rows(self.project_dir, manifest.shards, full.dim, full.verify)
        rows.ids([[int(start)] for start in rows.starts.tolist()])  # maps and checks each shard
        rows.read(rows.starts)
        return manifest.name

    def search(self, request: dict) -> dict:
        options = _options(request)
        if "path" in request:
            if "rows" in request:
                raise ServiceError("Send either 'rows' or 'path', not both.")
            query = self._query_file(request["path"])
        elif "rows" in request:
            query = self._query_rows(request)
        else:
            raise ServiceError("The request has no query: send 'rows' (a list of query rows) "
                               "or 'path' (a StepRows.save file inside an allowed folder).")
        if len(query) > MAX_QUERIES:
            raise ServiceError(f"{len(query)} queries in one request; at most {MAX_QUERIES}.",
                               413)
        if not self._turns.acquire(timeout=self.max_wait_s):
            raise ServiceError(f"All search slots stayed busy for {self.max_wait_s:.0f} s; "
                               "retry in a moment.", 503)
        try:  # no fallback to the exact stream: minutes of one worker on a large log
            result = self.attributor.search(query, fallback=False, **options)
        except UsageError as e:
            raise ServiceError(str(e), 409 if "fresh index" in str(e) or "no index" in str(e)
                               or "stale" in str(e) or "not cached" in str(e) else 400) from None
        finally:
            self._turns.release()
        return _json_result(result)

    def _query_file(self, path) -> StepRows:
        if not isinstance(path, str) or not path or "\0" in path:
            raise ServiceError("'path' must be a non-empty string.")
        if not self.query_dirs:
            raise ServiceError("This service reads no query files (it was started without "
                               "--queries-dir); send the query rows instead.", 403)
        real = os.path.realpath(path)
        if not any(os.path.commonpath([real, d]) == d for d in self.query_dirs):
            raise ServiceError(f"Path {path!r} is outside the folders this service reads "
                               f"queries from ({', '.join(self.query_dirs)}).", 403)
        if not os.path.isfile(real):
            raise ServiceError(f"Query file {path!r} does not exist (or is not a file).", 404)
        try:
            return self.attributor.query(StepRows.load(real))
        except (LogFormatError, UsageError, OSError, ValueError) as e:
            raise ServiceError(f"Query file {path!r} is not a saved StepRows: {e}") from None

    def _query_rows(self, request: dict) -> StepRows:
        rows = request["rows"]
        manifest = self.attributor.reader().manifest
        if not isinstance(rows, list) or not rows or not all(isinstance(r, list) for r in rows):
            raise ServiceError("'rows' must be a non-empty list of rows (lists of numbers).")
        if len(rows) > MAX_QUERIES:
            raise ServiceError(f"{len(rows)} query rows; at most {MAX_QUERIES}.", 413)
        if any(len(r) != manifest.dim for r in rows):
            raise ServiceError(f"Every query row must hold {manifest.dim} numbers (the saved "
                               f"log's width).")
        try:
            grads = torch.tensor(rows, dtype=torch.float32)
        except (TypeError, ValueError) as e:
            raise ServiceError(f"'rows' must hold numbers only: {e}") from None
        if not bool(torch.isfinite(grads).all()):
            raise ServiceError("'rows' holds NaN or infinite values.")
        ids = request.get("ids", [f"q{i}" for i in range(len(rows))])
        if not isinstance(ids, list) or len(ids) != len(rows) or \
                not all(isinstance(i, (str, int)) and not isinstance(i, bool) for i in ids):
            raise ServiceError("'ids' must be a list of strings or integers, one per row.")
        projection = request.get("projection", dict(manifest.projection or {}))
        if not isinstance(projection, dict):
            raise ServiceError("'projection' must be an object (the query log's projection).")
        try:
            return self.attributor.query(StepRows(ids, grads, manifest.modules, projection))
        except UsageError as e:
            raise ServiceError(str(e)) from None


def _options(request: dict) -> dict:
    if not isinstance(request, dict):
        raise ServiceError("The request body must be a JSON object.")
    unknown = set(request) - set(_OPTIONS) - {"rows", "ids", "projection", "path"}
    if unknown:
        raise ServiceError(f"Unknown field(s) {sorted(unknown)}; allowed: rows, ids, "
                           f"projection, path, {', '.join(_OPTIONS)}.")
    out = {}
    for name, kind in _OPTIONS.items():
        if request.get(name) is None:
            continue
        value = request[name]
        if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ServiceError(f"{name} must be a positive integer, got {value!r}.")
        if kind is bool and not isinstance(value, bool):
            raise ServiceError(f"{name} must be true or false, got {value!r}.")
        if kind is str and not isinstance(value, str):
            raise ServiceError(f"{name} must be a string, got {value!r}.")
        out[name] = value
    if out.get("k", 10) > MAX_K:
        raise ServiceError(f"k={out['k']} is too large; at most {MAX_K}.")
    return out


def _json_result(result: dict) -> dict:
    out = {"src_ids": result["src_ids"]}
    for side in ("top", "bottom"):
        if f"{side}_ids" in result:
            out[f"{side}_ids"] = result[f"{side}_ids"]
            out[f"{side}_scores"] = [[_number(v) for v in row[:len(ids)]] for row, ids in
                                     zip(result[f"{side}_scores"].tolist(),
                                         result[f"{side}_ids"])]
    out["meta"] = result.get("meta", {})
    return out


def _number(value: float):
    return value if math.isfinite(value) else None


def _query_params(query: str) -> dict:
    params = {k: v[-1] for k, v in parse_qs(query, errors="strict").items()}
    out = {}
    for key, text in params.items():
        kind = _OPTIONS.get(key, str)
        if kind is int:
            try:
                out[key] = int(text)
            except ValueError:
                raise ServiceError(f"{key}={text!r} is not a whole number.") from None
        elif kind is bool:
            if text not in ("0", "1", "true", "false"):
                raise ServiceError(f"{key}={text!r} must be 0, 1, true or false.")
            out[key] = text in ("1", "true")
        else:
            out[key] = text
    return out


class _Handler(BaseHTTPRequestHandler):
    service: SearchService
    server_version = "logix-serve"
    timeout = 30

    def log_message(self, format, *args):
        logger.debug("serve: " + format, *args)

    def _refused(self) -> bool:
        from logix.dashboard.server import host_refusal

        refusal = host_refusal(self.headers.get("Host"), self.server.allowed_hosts,
                               "search service")
        if refusal is not None:
            self._answer(refusal[0], {"error": refusal[1].strip()})
        return refusal is not None

    def do_GET(self) -> None:
        if self._refused():
            return
        parts = urlsplit(self.path)
        try:
            if parts.path in ("/api/health", "/api/", "/"):
                return self._answer(200, self.service.health())
            if parts.path == "/api/search":
                return self._answer(200, self.service.search(_query_params(parts.query)))
            raise ServiceError(f"No endpoint at {parts.path!r}: GET /api/health, GET or POST "
                               "/api/search.", 404)
        except Exception as e:  # noqa: BLE001 - every failure is an answer
            self._fail(e)

    def do_POST(self) -> None:
        if self._refused():
            return
        try:
            if urlsplit(self.path).path != "/api/search":
                raise ServiceError("POST goes to /api/search only (a question, never a change).",
                                   404)
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                raise ServiceError("A POST needs a Content-Length.", 411) from None
            if length < 0 or length > MAX_BODY_BYTES:
                raise ServiceError(f"The request body is {length} bytes; at most "
                                   f"{MAX_BODY_BYTES}.", 413)
            try:
                request = json.loads(self.rfile.read(length))
            except (ValueError, UnicodeDecodeError) as e:
                raise ServiceError(f"The request body is not JSON: {e}") from None
            self._answer(200, self.service.search(request))
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    def _not_allowed(self) -> None:
        if self._refused():
            return
        self._answer(405, {"error": "The search service only reads: GET or POST /api/search."})

    do_PUT = do_DELETE = do_PATCH = _not_allowed

    def _fail(self, e: Exception) -> None:
        if isinstance(e, ServiceError):
            return self._answer(e.status, {"error": str(e)})
        if isinstance(e, (UsageError, LogFormatError, LogIXError)):
            return self._answer(400 if isinstance(e, UsageError) else 500, {"error": str(e)})
        logger.exception("serve: %s failed", self.path)
        self._answer(500, {"error": f"{type(e).__name__}: {e}"})

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body, default=str).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)


def make_service(project_dir: str, host: str = "127.0.0.1", port: int = 0,
                 allowed_hosts: Iterable[str] = (), query_dirs: Sequence[str] = (),
                 allow_remote: bool = False, searches: int = 2, warm: bool = True,
                 index: Optional[str] = None):
    """A server (the dashboard's bounded `DashboardServer`) answering searches of one project;
    `server.service` is its SearchService. Refuses a non-loopback `host` unless
    `allow_remote`."""
    from logix.dashboard.server import DashboardServer, is_loopback

    if not is_loopback(host) and not allow_remote:
        raise UsageError(f"--host {host} is not a loopback address: the search service has no "
                         "authentication, so it binds another address only with "
                         "--allow-remote.")
    service = SearchService(project_dir, query_dirs, searches)
    if warm:
        service.warm_up(index)

    class Handler(_Handler):
        pass

    Handler.service = service
    server = DashboardServer((host, port), Handler, allowed_hosts)
    server.service = service
    return server


def serve(project_dir: str, host: str = "127.0.0.1", port: int = 8766, ready=None,
          **options) -> None:
    from logix.dashboard.server import serve_until_interrupted

    serve_until_interrupted(make_service(project_dir, host, port, **options), ready)

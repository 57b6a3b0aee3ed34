"""`logix ui`: a read-only web server (standard library http.server) over LogIX projects.

    GET /                                  projects page       /api/projects (or /api/)
    GET /project/<key>                     project page        /api/project/<key>[?hash=1]
    GET /scores/<key>/<file>?query=&k=&group=   scores page    /api/scores/<key>/<file>?...
    GET /evaluation/<key>/<file>           evaluation page     /api/evaluation/<key>/<file>

Every problem (not a log, a corrupt file, a bad query number) is answered with a page or a JSON
{"error": ...} naming it, never a traceback. Nothing is written anywhere.
"""

from __future__ import annotations

import json
import logging
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, List, Optional, Tuple
from urllib.parse import parse_qs, unquote, urlsplit

from logix.dashboard import pages
from logix.dashboard.data import Dashboard, DashboardError

logger = logging.getLogger("logix")
_MAX_K = 1000


def make_server(roots: List[str], host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """A server bound to host:port (0: a free port; see server.server_address) over `roots`."""
    dashboard = Dashboard(roots)

    class Handler(_Handler):
        pass

    Handler.dashboard = dashboard
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def serve(roots: List[str], host: str = "127.0.0.1", port: int = 8765,
          ready: Optional[Callable[[str], None]] = None) -> None:
    """Serve until interrupted; `ready(url)` is called once the port is bound."""
    server = make_server(roots, host, port)
    url = f"http://{server.server_address[0]}:{server.server_address[1]}/"
    if ready is not None:
        ready(url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


class _Handler(BaseHTTPRequestHandler):
    dashboard: Dashboard
    server_version = "logix-ui"

    def log_message(self, format, *args):  # quiet: no line per request on stderr
        logger.debug("ui: " + format, *args)

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        segments = [unquote(s) for s in parts.path.strip("/").split("/") if s]
        params = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        api = bool(segments) and segments[0] == "api"
        if api:
            segments = segments[1:]
        try:
            data, page = self._route(segments, params)
        except DashboardError as e:
            return self._fail(api, e.status, str(e))
        except Exception as e:  # noqa: BLE001 - the page says what failed, the server stays up
            logger.exception("ui: %s failed", self.path)
            return self._fail(api, 500, f"{type(e).__name__}: {e}")
        if api:
            self._send(200, "application/json", json.dumps(data, default=str).encode())
        else:
            title, body = page(data)
            self._send(200, "text/html; charset=utf-8", pages.layout(title, body).encode("utf-8"))

    def _route(self, segments: List[str], params: dict) -> Tuple[object, Callable]:
        d, links = self.dashboard, pages.Links()
        if not segments or segments == ["projects"]:
            return d.projects(), lambda x: ("LogIX projects", pages.projects_page(x, links))
        kind, rest = segments[0], segments[1:]
        if kind == "project" and len(rest) == 1:
            data = d.project(rest[0], hashing=params.get("hash") == "1")
            return data, lambda x: (f"{rest[0]} - LogIX", pages.project_page(x, links))
        if kind == "scores" and len(rest) >= 2:
            data = d.scores(rest[0], "/".join(rest[1:]), _int(params, "query", 0, None),
                            _int(params, "k", 10, _MAX_K), params.get("group") or None)
            return data, lambda x: (f"{x['file']} - LogIX", pages.scores_page([x], links))
        if kind == "evaluation" and len(rest) >= 2:
            data = d.evaluation(rest[0], "/".join(rest[1:]))
            return data, lambda x: (f"{x['name']} - LogIX", pages.evaluation_page(x, links))
        raise DashboardError(f"No page at {self.path!r}. Pages: /, /project/<name>, "
                             "/scores/<name>/<file>, /evaluation/<name>/<file>; the same under "
                             "/api/ as JSON.")

    def do_POST(self) -> None:
        self._fail(True, 405, "The dashboard only reads; it accepts GET requests only.")

    do_PUT = do_DELETE = do_PATCH = do_POST

    def _fail(self, api: bool, status: int, message: str) -> None:
        if api:
            self._send(status, "application/json", json.dumps({"error": message}).encode())
        else:
            body = pages.error_page(message, pages.Links().projects())
            self._send(status, "text/html; charset=utf-8",
                       pages.layout("LogIX: error", body).encode("utf-8"))

    def _send(self, status: int, kind: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)


def _int(params: dict, name: str, default: int, maximum: Optional[int]) -> int:
    text = params.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise DashboardError(f"{name}={text!r} is not a whole number.", 400) from None
    if value < 0 or (maximum is not None and value > maximum) or (name == "k" and value < 1):
        raise DashboardError(f"{name}={value} is out of range (allowed: "
                             f"{'1' if name == 'k' else '0'}..{maximum or 'n-1'}).", 400)
    return value

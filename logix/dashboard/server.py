"""`logix ui`: a read-only web server (standard library http.server) over LogIX projects.

    GET /                                  projects page       /api/projects (or /api/)
    GET /project/<key>                     project page        /api/project/<key>[?hash=1]
    GET /scores/<key>/<file>?query=&k=&group=   scores page    /api/scores/<key>/<file>?...
    GET /example/<key>?id=<json id>&norm=max|raw   example page   /api/example/<key>?id=...
    GET /evaluation/<key>/<file>           evaluation page     /api/evaluation/<key>/<file>

Every problem (not a log, a corrupt file, a bad query number) is answered with a page or a JSON
{"error": ...} naming it, never a traceback. Nothing is written anywhere.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import queue
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Callable, Iterable, List, Optional, Tuple
from urllib.parse import parse_qs, unquote, urlsplit

from logix.dashboard import pages
from logix.dashboard.data import Dashboard, DashboardError
from logix.dashboard.markup import text

logger = logging.getLogger("logix")
_MAX_K = 1000
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


class DashboardServer(HTTPServer):
    """An HTTP server with a bounded amount of work: `workers` threads answer requests that wait
    in a queue of at most `max_waiting`; a connection that finds the queue full, or waited
    longer than `max_wait_s`, gets a quick 503. The listen backlog holds a burst of connections.
    Only requests whose Host header names this machine (loopback, the bound address, and
    `allowed_hosts`) are answered: a page of another site cannot read the dashboard through
    DNS rebinding."""

    request_queue_size = 256  # listen backlog (socketserver's default is 5)
    workers = 8
    max_waiting = 256
    max_wait_s = 5.0

    def __init__(self, address: Tuple[str, int], handler, allowed_hosts: Iterable[str] = ()):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)
        self.allowed_hosts = {h.lower().strip("[]") for h in
                              (*LOOPBACK_NAMES, address[0], self.server_address[0],
                               *allowed_hosts)}
        self._waiting: "queue.Queue" = queue.Queue(self.max_waiting)
        self._threads = [threading.Thread(target=self._work, daemon=True, name=f"logix-ui-{n}")
                         for n in range(self.workers)]
        for thread in self._threads:
            thread.start()

    def process_request(self, request, client_address) -> None:
        try:
            self._waiting.put_nowait((request, client_address, time.monotonic()))
        except queue.Full:
            self._busy(request)
            self.shutdown_request(request)

    def _work(self) -> None:
        while (item := self._waiting.get()) is not None:
            request, client_address, since = item
            try:
                if time.monotonic() - since > self.max_wait_s:
                    self._busy(request)
                else:
                    self.finish_request(request, client_address)
            except Exception:  # noqa: BLE001 - one bad connection never stops a worker
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)

    def _busy(self, request) -> None:
        """503, quickly: read the request if it is there within 20 ms (closing a socket with
        unread data resets the connection before the client reads the answer), then answer."""
        body = (f"LogIX dashboard is busy ({self.max_waiting} requests waiting, or this one "
                f"waited over {self.max_wait_s:.0f} s); retry in a moment.\n").encode()
        head = ("HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n")
        try:
            request.settimeout(0.02)
            try:
                request.recv(65536)
            except socket.timeout:
                pass
            request.sendall(head.encode() + body)
        except OSError:
            pass

    def server_close(self) -> None:
        super().server_close()
        for _ in self._threads:
            self._waiting.put(None)
        deadline = time.monotonic() + 5
        for thread in self._threads:
            thread.join(timeout=max(deadline - time.monotonic(), 0))


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the dashboard on this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def remote_warning(host: str, what: str = "dashboard") -> Optional[str]:
    """The warning to print when `host` is not a loopback address (None when it is)."""
    if is_loopback(host):
        return None
    return (f"warning: --host {host} is not a loopback address: anyone who can reach it can "
            f"read what this {what} serves (it has no authentication). Use --host 127.0.0.1 "
            "unless that is what you want; other machines reach it by the names given with "
            "--allow-host.")


def make_server(roots: List[str], host: str = "127.0.0.1", port: int = 0,
                allowed_hosts: Iterable[str] = ()) -> DashboardServer:
    """A server bound to host:port (0: a free port; see server.server_address) over `roots`.
    `allowed_hosts`: more names the browser may use in the URL (e.g. this machine's name when
    `host` is 0.0.0.0)."""
    dashboard = Dashboard(roots)

    class Handler(_Handler):
        pass

    Handler.dashboard = dashboard
    return DashboardServer((host, port), Handler, allowed_hosts)


def serve(roots: List[str], host: str = "127.0.0.1", port: int = 8765,
          ready: Optional[Callable[[str], None]] = None, allowed_hosts: Iterable[str] = ()) -> None:
    """Serve until interrupted; `ready(url)` is called once the port is bound."""
    serve_until_interrupted(make_server(roots, host, port, allowed_hosts), ready)


def url_of(server) -> str:
    """The http:// URL a bound server answers on."""
    address = server.server_address[0]
    return f"http://{f'[{address}]' if ':' in address else address}:{server.server_address[1]}/"


def serve_until_interrupted(server, ready: Optional[Callable[[str], None]] = None) -> None:
    """Call `ready(url)`, then serve until Ctrl-C; the server is closed however it ends."""
    if ready is not None:
        ready(url_of(server))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


class _Handler(BaseHTTPRequestHandler):
    dashboard: Dashboard
    server_version = "logix-ui"
    timeout = 30  # seconds a client may take to send its request (a stalled one frees its worker)

    def log_message(self, format, *args):  # quiet: no line per request on stderr
        logger.debug("ui: " + format, *args)

    def _host_refused(self) -> bool:
        """Answer 421 unless the Host header names this machine (DNS rebinding defence)."""
        refusal = host_refusal(self.headers.get("Host"), self.server.allowed_hosts)
        if refusal is None:
            return False
        self._send(refusal[0], "text/plain; charset=utf-8", refusal[1].encode())
        return True

    def do_GET(self) -> None:
        if self._host_refused():
            return
        parts = urlsplit(self.path)
        # surrogateescape: %FF in a URL names the file whose name has the byte 0xFF
        segments = [unquote(s, errors="surrogateescape") for s in parts.path.strip("/").split("/")
                    if s]
        params = {k: v[-1] for k, v in parse_qs(parts.query, errors="surrogateescape").items()}
        api = bool(segments) and segments[0] == "api"
        if api:
            segments = segments[1:]
        try:
            data, page = self._route(segments, params)
            if api:
                kind, body = "application/json", json.dumps(_display(data), default=str)
            else:
                kind, body = "text/html; charset=utf-8", pages.layout(*page(data))
        except DashboardError as e:
            return self._fail(api, e.status, str(e))
        except Exception as e:  # noqa: BLE001 - the page says what failed, the server stays up
            logger.exception("ui: %s failed", self.path)
            return self._fail(api, 500, f"{type(e).__name__}: {e}")
        self._send(200, kind, body.encode("utf-8"))

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
        if kind == "example" and len(rest) == 1:
            data = d.example(rest[0], _data_id(params), params.get("norm") or "max",
                             _int(params, "k", 10, _MAX_K))
            return data, lambda x: (f"example {pages.id_text(x['id'])} - LogIX",
                                    pages.example_page(x, links))
        if kind == "evaluation" and len(rest) >= 2:
            data = d.evaluation(rest[0], "/".join(rest[1:]))
            return data, lambda x: (f"{x['name']} - LogIX", pages.evaluation_page(x, links))
        raise DashboardError(f"No page at {self.path!r}. Pages: /, /project/<name>, "
                             "/scores/<name>/<file>, /example/<name>?id=<id>, "
                             "/evaluation/<name>/<file>; the same under /api/ as JSON.")

    def do_POST(self) -> None:
        if self._host_refused():
            return
        self._fail(True, 405, "The dashboard only reads; it accepts GET requests only.")

    do_PUT = do_DELETE = do_PATCH = do_POST

    def _fail(self, api: bool, status: int, message: str) -> None:
        if api:
            self._send(status, "application/json",
                       json.dumps({"error": text(message)}).encode())
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


def _display(value):
    """The JSON as the pages show it: a lone surrogate (a non-UTF-8 byte of an id or a file
    name) becomes the text \\udcff, as on the page, not an invalid JSON string."""
    if isinstance(value, str):
        return text(value)
    if isinstance(value, list):
        return [_display(v) for v in value]
    if isinstance(value, dict):
        return {text(k) if isinstance(k, str) else k: _display(v) for k, v in value.items()}
    return value


def _data_id(params: dict):
    """?id= as JSON (7 is the int, "7" the string); text that is not a JSON str or int is
    taken as the string itself, so ?id=doc-3 works typed by hand."""
    raw = params.get("id")
    if raw is None:
        raise DashboardError("This page needs ?id=<training id> (JSON: 7, or \"doc-3\").", 400)
    try:
        value = json.loads(raw)
    except ValueError:
        return raw
    return value if isinstance(value, (str, int)) and not isinstance(value, bool) else raw


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


def host_refusal(header: Optional[str], allowed_hosts, what: str = "dashboard"
                 ) -> Optional[Tuple[int, str]]:
    """None when the Host header names this machine (one of `allowed_hosts`, with or without a
    port), else (status, message): 421 for another name, 400 without a Host header. Shared by
    every LogIX server (`logix ui`, `logix serve`): the DNS rebinding defence."""
    name = (urlsplit(f"//{header}").hostname or "") if header else ""
    if name in allowed_hosts:
        return None
    allowed = ", ".join(sorted(allowed_hosts))
    if not header:
        return 400, f"The request has no Host header; this {what} needs one.\n"
    return 421, (f"Host {header!r} is not served here: this {what} answers requests for "
                 f"{allowed} only. Open it by one of those names, or start it with "
                 f"--allow-host NAME.\n")

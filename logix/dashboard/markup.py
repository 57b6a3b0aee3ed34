"""The dashboard's only way to make HTML. Every value put into a template goes through `escape`;
only `Markup` passes unchanged, and only this module's builders make Markup (a rendered
template, a joined list, a checked URL, the package's own static files, JSON for a script
block). A page is therefore safe by construction: text read from disk (project and module
names, data ids, texts, labels, file names, result fields) cannot become markup."""

from __future__ import annotations

import functools
import html
import json
import string
from importlib import resources
from typing import Any, Iterable

_TRUSTED = object()
_URL_PREFIXES = ("/", "#", "data:image/png;base64,")


class Markup(str):
    """HTML that is safe to insert as it is. Made by render(), join(), url(), static() and
    script_json() only; anything else passed to render() is escaped."""

    __slots__ = ()

    def __new__(cls, text: str = "", _key: object = None) -> "Markup":
        if _key is not _TRUSTED:
            raise TypeError("Markup is made by logix.dashboard.markup's builders only (render, "
                            "join, url, ...); pass the plain string to render(), which escapes "
                            "it.")
        return super().__new__(cls, text)


def _trust(text: str) -> Markup:
    return Markup(text, _TRUSTED)


def text(value: Any) -> str:
    """A value as display text: str(value), with lone surrogates (what os.fsdecode makes of
    non-UTF-8 bytes in file names and ids) written as the escape \\udcff, so the page encodes."""
    s = value if isinstance(value, str) else str(value)
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


def escape(value: Any) -> Markup:
    """The one escaping function: Markup unchanged, anything else as text (& < > " ' escaped)."""
    if isinstance(value, Markup):
        return value
    return _trust(html.escape(text(value), quote=True))


@functools.lru_cache(maxsize=512)
def _template(source: str) -> string.Template:
    return string.Template(source)


def render(template: str, **values: Any) -> Markup:
    """`template` (a literal in the code, `$name` placeholders, `$$` for a dollar sign) with
    every value escaped. Attribute values in templates are always double-quoted."""
    return _trust(_template(template).substitute({k: escape(v) for k, v in values.items()}))


def join(items: Iterable[Any], sep: str = "") -> Markup:
    """Items (Markup, or text to escape) one after the other; `sep` is escaped too."""
    return _trust(escape(sep).join(escape(item) for item in items))


def url(value: str) -> Markup:
    """A link or image source: a path on this server, an #anchor or a PNG data URI. Anything
    else (javascript:, another site) is refused, so no href can run code or leave the page."""
    if not isinstance(value, str) or not value.startswith(_URL_PREFIXES):
        raise ValueError(f"refusing URL {text(value)[:80]!r}: dashboard links are paths ('/'), "
                         "anchors ('#') or PNG data URIs.")
    return escape(value)


def script_json(value: Any) -> Markup:
    """JSON to embed in a <script type="application/json"> block: < > & are written as \\u003c
    \\u003e \\u0026, so no string in it can close the block or start markup."""
    data = json.dumps(value, ensure_ascii=True, default=str)
    return _trust(data.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))


def static(*parts: str) -> Markup:
    """A file shipped in logix/dashboard (template, style, script): ours, inserted as it is."""
    path = resources.files("logix.dashboard").joinpath(*parts)
    return _trust(path.read_text(encoding="utf-8"))

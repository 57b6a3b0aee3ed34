"""What every command shares: the error type and exit codes, argument types, the rich console
and table, formatting, the project-folder checks, and the example-content lines of top and
search."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict

from logix.influence import curvature

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


class CliError(Exception):
    """A message for the user (no traceback) and the exit status that goes with it."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0-65535 (0: any free one), got {value}")
    return value


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(file=sys.stderr if stderr else sys.stdout, highlight=False, soft_wrap=True)


def _table_factory():
    """rich's Table with a compact border (wide tables fit an 80-column pipe)."""
    import functools

    from rich import box
    from rich.table import Table

    factory = functools.partial(Table, box=box.SIMPLE_HEAD, title_justify="left",
                                title_style="bold")
    factory.grid = Table.grid
    return factory


def _plural(n: int, word: str) -> str:
    if n == 1:
        return f"{n} {word}"
    return f"{n} {word[:-1]}ies" if word.endswith("y") else f"{n} {word}s"


def _error(message: str) -> None:
    print(f"logix: error: {message}", file=sys.stderr)


def _esc(value) -> str:
    from rich.markup import escape

    return escape(value if isinstance(value, str) else json.dumps(value))


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _project_dir(path: str) -> str:
    """The project folder named by `path`, or a CliError saying why it is not one."""
    from logix.storage.format import MANIFEST

    if not os.path.exists(path):
        raise CliError(f"{path!r} does not exist.", EXIT_USAGE)
    if os.path.isfile(path) and os.path.basename(path) == MANIFEST:
        path = os.path.dirname(path) or "."
    if not os.path.isdir(path):
        raise CliError(f"{path!r} is a file, not a LogIX log folder. Pass the project folder "
                       f"(<root_dir>/<project>, the one holding {MANIFEST}).", EXIT_USAGE)
    if not os.path.isfile(os.path.join(path, MANIFEST)):
        hint = ""
        try:
            inner = sorted(d for d in os.listdir(path)
                           if os.path.isfile(os.path.join(path, d, MANIFEST)))
        except OSError:
            inner = []
        if inner:
            hint = " Projects inside it: " + ", ".join(os.path.join(path, d) for d in inner[:5])
        raise CliError(f"{path!r} is not a LogIX log: it has no {MANIFEST}. Pass the project "
                       f"folder (<root_dir>/<project>).{hint}", EXIT_USAGE)
    return path


def _load_manifest(project_dir: str):
    """(Manifest, raw JSON dict); a damaged manifest becomes a CliError (exit 1)."""
    from logix.errors import LogFormatError
    from logix.storage.manifest import read_manifest

    try:
        return read_manifest(project_dir)
    except LogFormatError as e:
        raise CliError(str(e)) from None


def _add_content(entry: Dict, store, data_id) -> None:
    content = store.get(data_id)
    entry.update({k: content[k] for k in ("text", "label") if k in content})


def _describe_entry(entry: Dict, bracket: bool = False) -> str:
    """"label: text" of an entry that has content (shortened), else ""."""
    parts = [str(entry[k]) for k in ("label", "text") if entry.get(k) is not None]
    text = " ".join(" ".join(parts).split())
    text = text if len(text) <= 60 else text[:57] + "..."
    if not text:
        return ""
    return f" [dim]({_esc(text)})[/dim]" if bracket else text


_HESSIANS = (curvature.AUTO, *curvature.names())

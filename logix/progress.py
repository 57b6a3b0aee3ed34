"""One progress bar for long work (rich, transient, on a terminal's stderr): silent for short
work, when disabled, or when stderr is not a terminal."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")


@contextmanager
def progress_bar(total: int, description: str, enabled: bool = True,
                 min_total: int = 2) -> Iterator[Callable[..., None]]:
    """Yields `advance(n=1)` for a bar over `total` units, shown only for `total >= min_total`."""
    import sys

    if not enabled or total < min_total or not sys.stderr.isatty():
        yield lambda n=1: None
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeRemainingColumn)

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn())
    with Progress(*columns, transient=True, console=Console(stderr=True)) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)


def track(items: Iterable[T], total: Optional[int], description: str,
          enabled: bool = True) -> Iterator[T]:
    """`items`, with a bar over `total` of them (no bar when the total is unknown)."""
    with progress_bar(total or 0, description, enabled and total is not None) as advance:
        for item in items:
            yield item
            advance()

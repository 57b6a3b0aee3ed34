"""A printed table of what a run tracks."""

from __future__ import annotations


def render_summary(run) -> str:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"LogIX project {run.project!r}")
    for column in ("layer", "type", "gradient [out, in]", "rank [out, in]", "row width"):
        table.add_column(column)
    total = 0
    for entry in run.layout():
        total += entry.dim
        table.add_row(entry.name, entry.type, f"{entry.out_dim} x {entry.in_dim}",
                      f"{entry.rank_out} x {entry.rank_in}", str(entry.dim))
    full = sum(e.in_dim * e.out_dim for e in run.layout())
    table.caption = (f"{len(run.modules)} layers; {total} numbers per example "
                     f"(full gradient: {full}); projection: {run.projection_meta['init']}")
    console = Console()
    with console.capture() as captured:
        console.print(table)
    text = captured.get()
    print(text, end="")
    return text

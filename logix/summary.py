"""A table of what a run tracks (`run.summary()`)."""

from __future__ import annotations


def render_summary(run) -> str:
    """The table as text, names whole (folded, never cut) whatever the terminal's width."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"LogIX project {run.project!r}")
    layout = run.layout()
    longest = max((len(entry.name) for entry in layout), default=5)
    table.add_column("layer", overflow="fold", min_width=min(longest, 60))
    for column in ("type", "gradient [out, in]", "rank [out, in]", "row width"):
        table.add_column(column, overflow="fold")
    total = 0
    for entry in layout:
        total += entry.dim
        table.add_row(entry.name, entry.type, f"{entry.out_dim} x {entry.in_dim}",
                      f"{entry.rank_out} x {entry.rank_in}", str(entry.dim))
    full = sum(e.in_dim * e.out_dim for e in layout)
    table.caption = (f"{len(run.modules)} layers; {total} numbers per example "
                     f"(full gradient: {full}); projection: {run.projection_meta['init']}")
    console = Console(soft_wrap=True)  # wider than the terminal rather than cut
    with console.capture() as captured:
        console.print(table)
    return captured.get()


def summary(run, show: bool = True):
    """A table of watched layers, gradient shapes, ranks and row widths: printed (returns
    None), or returned as text with `show=False`."""
    text = render_summary(run)
    if not show:
        return text
    print(text, end="")
    return None

"""`logix show` and `logix verify`: what a log holds, and whether its shards match the manifest."""

from __future__ import annotations

import json
from typing import Dict, List

from logix.cli._common import (
    EXIT_OK, EXIT_ERROR, _console, _table_factory, _plural, _esc, _human_bytes, _project_dir,
    _load_manifest,
)


def add_parser(sub) -> None:
    show = sub.add_parser("show", help="summarise a log folder",
                          description="Summarise a log folder: modules, row layout, shards, "
                                      "statistics and compression. Reads only the manifest and "
                                      "file headers.")
    show.add_argument("dir", metavar="DIR", help="the project folder (<root_dir>/<project>)")
    show.add_argument("--shards", action="store_true", help="list every shard")
    show.add_argument("--json", action="store_true", help="print the summary as JSON")
    show.set_defaults(handler=_cmd_show)

    verify = sub.add_parser("verify", help="check every shard against the manifest",
                            description="Check that every shard named in the manifest exists, "
                                        "has the recorded size and checksum, and holds a 'grad' "
                                        "tensor of the manifest's width, dtype and row count; "
                                        "report stray files and duplicate data ids. Exit 1 on "
                                        "any error. Run it on a log no process is writing.")
    verify.add_argument("dir", metavar="DIR", help="the project folder (<root_dir>/<project>)")
    verify.add_argument("-v", "--verbose", action="store_true", help="list shards that pass")
    verify.add_argument("--no-hash", action="store_true",
                        help="skip the checksum check (sizes and headers only; fast)")
    verify.add_argument("--strict", action="store_true", help="treat warnings as errors")
    verify.set_defaults(handler=_cmd_verify)


def _cmd_show(args) -> int:
    from logix.storage.overview import summary

    project_dir = _project_dir(args.dir)
    manifest, _ = _load_manifest(project_dir)
    info = summary(project_dir, manifest, args.shards)
    info["indexes"] = _indexes(project_dir, manifest)
    if args.json:
        print(json.dumps(info, indent=1))
        return EXIT_OK

    out = _console()
    Table = _table_factory()
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column(overflow="fold")
    proj = info["projection"]
    pfile = info["projections_file"]
    pnote = ("" if pfile["present"] and not pfile["error"] else
             f" ({pfile['file']} {'unreadable' if pfile['present'] else 'missing'})")
    head.add_row("project", _esc(manifest.project))
    head.add_row("folder", _esc(info["path"]))
    head.add_row("format", f"logix v{manifest.format_version}")
    head.add_row("dtype", _esc(manifest.dtype))
    head.add_row("projection", f"init {_esc(str(proj.get('init', '?')))}, seed "
                               f"{_esc(str(proj.get('seed', '?')))}{_esc(pnote)}")
    head.add_row("row width", f"{info['row_width']} numbers")
    head.add_row("rows", f"{info['rows']}{_in_checkpoints(info['checkpoint_rows'])}")
    ranks = ", ".join(f"rank {r}: {n}" for r, n in info["shards"]["by_rank"].items())
    head.add_row("shards", f"{info['shards']['count']} ({_human_bytes(info['shards']['bytes'])}"
                           f"{'; ' + ranks if len(info['shards']['by_rank']) > 1 else ''})")
    if info["bytes_per_example"] is not None:
        ratio = f"{info['compression']:.1f}x smaller" if info["compression"] else "n/a"
        head.add_row("per example", f"{_human_bytes(info['bytes_per_example'])} logged vs "
                                    f"{_human_bytes(info['full_gradient_bytes_per_example'])} "
                                    f"full gradient ({info['full_gradient_numbers']} numbers); "
                                    f"{ratio}")
    out.print("[bold]LogIX log[/bold]")
    out.print(head)

    table = Table(title=f"modules ({len(manifest.modules)}; gradient and rank: out x in)")
    longest = max((len(m.name) for m in manifest.modules), default=4)
    table.add_column("name", overflow="fold", min_width=min(longest, 64))
    for column in ("type", "gradient", "rank", "offset", "width"):
        table.add_column(column, overflow="fold", no_wrap=column in ("gradient", "rank"),
                         justify="right" if column in ("offset", "width") else "left")
    for m in manifest.modules:
        table.add_row(_esc(m.name), _esc(m.type), f"{m.out_dim} x {m.in_dim}"
                      + (" (+bias)" if m.bias else ""), f"{m.rank_out} x {m.rank_in}",
                      str(m.offset), str(m.dim))
    table.add_row("total", "", "", "", "", str(info["row_width"]), style="bold")
    out.print(table)

    stats = info["statistics"]
    if not stats["present"]:
        out.print(f"statistics: none ({stats['file']} is missing; finalize() writes it)")
    elif stats["error"]:
        out.print(f"statistics: {stats['file']} is unreadable ({_esc(stats['error'])}); run "
                  "`logix verify`")
    elif not stats["entries"]:
        out.print("statistics: none collected")
    else:
        table = Table(title="statistics")
        for column in ("module", "kind", "shape", "count"):
            table.add_column(column, overflow="fold", justify="right" if column == "count"
                             else "left")
        for module, kinds in stats["entries"].items():
            for kind, entry in kinds.items():
                count = entry["count"]
                table.add_row(_esc(module), _esc(kind), " x ".join(map(str, entry["shape"])),
                              "-" if count is None else f"{count:g}")
        out.print(table)

    if info["indexes"]:
        out.print(_index_table(info["indexes"]))
    if args.shards:
        table = Table(title="shards")
        for column in ("file", "rank", "seq", "rows", "bytes", "checksum"):
            table.add_column(column, overflow="fold", no_wrap=column == "file",
                             justify="left" if column in ("file", "checksum") else "right")
        for s in manifest.shards:
            table.add_row(_esc(s.file), str(s.rank), str(s.seq), str(s.rows), str(s.bytes),
                          _esc(s.checksum[:15]))
        out.print(table)
    return EXIT_OK


def _cmd_verify(args) -> int:
    from logix.errors import LogFormatError
    from logix.progress import progress_bar
    from logix.storage.manifest import read_manifest
    from logix.storage.verify import verify

    project_dir = _project_dir(args.dir)
    out = _console()
    try:
        manifest = read_manifest(project_dir)[0]  # verify reports its structural problems
        total = sum(s.bytes for s in manifest.shards) if manifest else 0
        with progress_bar(total, "hashing shards", enabled=not args.no_hash,
                          min_total=256 << 20) as advance:
            report = verify(project_dir, hashing=not args.no_hash, advance=advance)
    except LogFormatError as e:
        out.print(f"[red]ERROR[/red] {_esc(str(e))}")
        out.print("[red]FAILED[/red]: the manifest cannot be read, so no shard was checked.")
        return EXIT_ERROR
    if args.verbose:
        sizes = {s.file: s for s in manifest.shards}
        for name in report.ok_shards:
            out.print(f"[green]ok[/green]    {_esc(name)}  {sizes[name].rows} rows  "
                      f"{_human_bytes(sizes[name].bytes)}")
    for message in report.errors:
        out.print(f"[red]ERROR[/red] {_esc(message)}")
    for message in report.warnings:
        out.print(f"[yellow]WARN[/yellow]  {_esc(message)}")
    failed = bool(report.errors) or (args.strict and bool(report.warnings))
    verdict = "[red]FAILED[/red]" if failed else "[green]OK[/green]"
    hashed = "" if report.hashed else " (checksums not checked: --no-hash)"
    out.print(f"{verdict}: {_plural(report.shards, 'shard')} "
              f"({_plural(report.rows, 'row')}{_in_checkpoints(report.checkpoint_rows)}) in "
              f"the manifest, "
              f"{_human_bytes(report.bytes_read)} read{hashed}; "
              f"{_plural(len(report.errors), 'error')}, "
              f"{_plural(len(report.warnings), 'warning')}")
    return EXIT_ERROR if failed else EXIT_OK


def _in_checkpoints(rows: int) -> str:
    return f", and {rows} in SOURCE checkpoints" if rows else ""


def _indexes(project_dir: str, manifest) -> List[Dict]:
    from logix.index.store import summaries

    return summaries(project_dir, manifest)


def _index_table(indexes: List[Dict]):
    table = _table_factory()(title=f"indexes ({len(indexes)})")
    for column in ("name", "faiss", "mode", "sketch", "rows", "bytes", "recall@10", "state"):
        table.add_column(column, overflow="fold", no_wrap=column == "name",
                         justify="right" if column in ("rows", "bytes") else "left")
    for i in indexes:
        if "error" in i:
            table.add_row(_esc(i["name"]), "", "", "", "", "", "", _esc(i["error"]))
            continue
        mode = i["mode"] + (f" ({i['hessian']})" if i["hessian"] else "")
        table.add_row(_esc(i["name"]), _esc(i["factory"]), _esc(mode),
                      str(i["sketch"] or "-"), str(i["rows"]), _human_bytes(i["bytes"]),
                      "-" if i.get("recall") is None else
                      f"{i['recall']:.3f} ({_times(i['speedup'])})",
                      _esc(i["state"] if i["state"] in ("fresh", "part")
                           else f"{i['state']}: {i['why']}"))
    return table


def _times(ratio: float) -> str:
    """A measured speed-up: two significant digits below 10 (0.17x is slower, not 0x)."""
    return f"{ratio:.0f}x" if ratio >= 10 else f"{ratio:.2g}x"

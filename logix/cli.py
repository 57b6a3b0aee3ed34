"""The `logix` command: look at a log folder, check it, read saved scores, search, plan.

    logix show DIR [--shards] [--json]     what a log holds (modules, rows, shards, statistics)
    logix verify DIR [-v] [--no-hash] [--strict]
                                           check every shard against the manifest
    logix top SCORES [--k N] [--query Q] [--json]
                                           most helpful / harmful training examples per query
    logix ui [ROOT ...] [--port P]         browse logs and scores in a local web page
    logix report ROOT ... -o report.html   the same pages as one self-contained HTML file
    logix index DIR [--kind K] [--sketch W] build or update a vector index of the log (FAISS)
    logix search DIR --queries FILE [--k N] most helpful training examples per query, via it
    logix serve DIR [--port P] [--queries-dir Q]
                                           answer searches over HTTP from a warm index
    logix plan CONFIG --examples N          row sizes, disk, memory and step overhead of a run
    logix check CONFIG                      the same row padded left, right, per attention kernel
    logix export DIR --to tensorboard|mlflow|wandb   summary, top-k, heat maps, LDS to a tracker
    logix build PROJECT --model M --data F  log a dataset (jsonl, csv, parquet, save_to_disk)
    logix score PROJECT --queries F         score queries against it (or --train F: on the fly)

Exit status: 0 fine; 1 the log or score file is damaged or unreadable (verify found an error, a
corrupt manifest, a newer format version), or check found rows that differ; 2 usage error (bad
arguments, a path that does not exist or is another kind of file than the command reads, a folder
that is not a LogIX log). The on-disk format is described in docs/format.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

from logix.index.backend import KINDS as INDEX_KINDS, QUANTIZERS
from logix.index.builder import SERVED_MODES
from logix.influence import curvature
from logix.storage.format import DTYPES

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


class CliError(Exception):
    """A message for the user (no traceback) and the exit status that goes with it."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------- entry point
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.handler(args)
    except CliError as e:
        _error(str(e))
        return e.code
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except BrokenPipeError:  # `logix show DIR | head`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    from logix import __version__

    parser = argparse.ArgumentParser(
        prog="logix", description="Inspect and check LogIX gradient logs and score files.",
        epilog="Exit status: 0 fine, 1 damaged or unreadable log/score file, 2 usage error. "
               "Format: docs/format.md.")
    parser.add_argument("--version", action="version", version=f"logix {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

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

    top = sub.add_parser("top", help="most helpful / harmful training examples per query",
                         description="Read a score file (save_scores, or compute_influence_all("
                                     "..., out=path)) and print, per query, the k training ids "
                                     "with the largest scores (helpful: training on them lowers "
                                     "the query's loss) and the k with the smallest (harmful).")
    top.add_argument("scores", metavar="SCORES", help="a score file (.safetensors)")
    top.add_argument("--k", type=_positive_int, default=10, help="how many of each (default 10)")
    top.add_argument("--query", default=None, metavar="Q",
                     help="only this query: its data id (as in the file's src_ids), a 0-based "
                          "row number, or '#I' for row I when an id looks like a row number")
    top.add_argument("--group", default=None, metavar="NAME",
                     help="rank by the scores of one influence group (files written with "
                          "influence_groups) instead of the total")
    top.add_argument("--json", action="store_true", help="print the result as JSON")
    top.add_argument("--content", default=None, metavar="DIR",
                     help="project folder whose example content (run.describe) to print beside "
                          "the ids (default: the project folder the score file sits in)")
    top.set_defaults(handler=_cmd_top)

    ui = sub.add_parser("ui", help="browse logs, scores and evaluations in a web page",
                        description="Serve a read-only dashboard of the projects under ROOT "
                                    "(a project folder or a folder of them) on a local port.")
    ui.add_argument("roots", metavar="ROOT", nargs="*", default=["logix_logs"],
                    help="project folders or folders of projects (default: ./logix_logs)")
    ui.add_argument("--port", type=_port, default=8765, help="port (default 8765; 0: any free)")
    ui.add_argument("--host", default="127.0.0.1",
                    help="address to bind (default 127.0.0.1: this machine only; there is no "
                         "authentication, so anyone who can reach another address can read "
                         "the logs)")
    ui.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                    help="another name the browser may use in the URL (repeatable); requests "
                         "for names other than loopback, the bound address and these are "
                         "refused (421)")
    ui.set_defaults(handler=_cmd_ui)

    report = sub.add_parser("report", help="write the dashboard as one HTML file",
                            description="Write every dashboard page of the projects under ROOT "
                                        "into one self-contained HTML file (opens offline).")
    report.add_argument("roots", metavar="ROOT", nargs="+",
                        help="project folders or folders of projects")
    report.add_argument("-o", "--out", default="report.html", help="output file (report.html)")
    report.add_argument("--queries", type=_positive_int, default=20,
                        help="queries shown per score file (default 20)")
    report.add_argument("--k", type=_positive_int, default=10,
                        help="helpful / harmful examples per query (default 10)")
    report.set_defaults(handler=_cmd_report)
    _add_search_commands(sub)

    check = sub.add_parser("check", help="same rows padded left, right, and per attention "
                                         "implementation",
                           description="Build a causal LM from a Hugging Face config (random "
                                       "weights, nothing downloaded), log one random sequence "
                                       "unpadded, right-padded, left-padded and under each "
                                       "attention implementation, and name every watched layer "
                                       "whose row differs (exit 1).")
    check.add_argument("config", metavar="CONFIG", help="a model's config.json (or its folder)")
    check.add_argument("--tokens", type=_positive_int, default=16,
                       help="sequence length (default 16)")
    check.add_argument("--pad", type=_positive_int, default=4, help="padding tokens (default 4)")
    check.add_argument("--rank", type=int, default=None,
                       help="LoGra rank (default: the config's lora.rank; 0: no projection)")
    check.add_argument("--name-filter", action="append", default=None,
                       help="watch only layers whose name contains this (repeatable)")
    check.add_argument("--tolerance", type=float, default=1e-4,
                       help="largest relative difference taken as the same (default 1e-4)")
    check.set_defaults(handler=_cmd_check)
    export = sub.add_parser("export", help="send a project to TensorBoard, MLflow or W&B",
                            description="Export a project's summary, top-k tables with example "
                                        "text, per-token heat maps and LDS / brittleness results "
                                        "to an experiment tracker (docs/export.md). Needs pip "
                                        "install \"logix[tensorboard]\" (or mlflow, wandb).")
    export.add_argument("dir", metavar="DIR", help="the project folder (<root_dir>/<project>)")
    export.add_argument("--to", required=True, choices=["tensorboard", "mlflow", "wandb"])
    export.add_argument("--scores", action="append", default=None, metavar="FILE",
                        help="a score file (repeatable; default: those in the project folder)")
    export.add_argument("--results", action="append", default=None, metavar="FILE",
                        help="an evaluation result file (repeatable; default: those in the "
                             "project folder)")
    export.add_argument("--k", type=_positive_int, default=10,
                        help="most helpful / harmful examples per query (default 10)")
    export.add_argument("--queries", type=_positive_int, default=20,
                        help="the first N queries of each score file (default 20)")
    export.add_argument("--out", default=None, metavar="DIR",
                        help="where the tracker's files go (default logix_export/<tracker>)")
    export.add_argument("--name", default=None, help="run name (default logix-<project>)")
    export.add_argument("--tracking-uri", default=None,
                        help="mlflow: a tracking server or store instead of SQLite in --out")
    export.add_argument("--no-heatmaps", action="store_true", help="leave heat maps out")
    export.set_defaults(handler=_cmd_export)

    plan = sub.add_parser("plan", help="plan a long run: row sizes, disk, memory, step overhead",
                          description="Build a causal LM from a Hugging Face config (random "
                                      "weights, nothing downloaded), watch it as a run would and "
                                      "print per module and in total: row width and bytes, disk "
                                      "for N examples, statistics memory, the measured step-time "
                                      "overhead of logging, and the largest rank that fits "
                                      "--disk-budget.")
    plan.add_argument("config", metavar="CONFIG", help="a model's config.json (or its folder)")
    plan.add_argument("--examples", type=_positive_int, required=True,
                      help="training examples (rows) to log")
    plan.add_argument("--tokens", type=_positive_int, default=512,
                      help="tokens per example (default 512)")
    plan.add_argument("--rank", type=int, default=None,
                      help="LoGra rank (default: the config's lora.rank; 0: no projection)")
    plan.add_argument("--hessian", choices=curvature.names(), default="ekfac",
                      help="curvature whose statistics are collected (default ekfac)")
    plan.add_argument("--disk-budget", default=None, help="e.g. 50GB: recommend a rank")
    plan.add_argument("--dtype", choices=list(DTYPES), default="float32",
                      help="log dtype (default float32)")
    plan.add_argument("--batch-size", type=_positive_int, default=8,
                      help="examples per timed step (default 8)")
    plan.add_argument("--steps", type=int, default=3,
                      help="at least this many interleaved pairs of steps timed without and with "
                           "logging, more until stable (default 3; 0: no timing)")
    plan.add_argument("--timing-budget", type=float, default=30.0, metavar="SECONDS",
                      help="seconds of timed steps at most, past the minimum (default 30)")
    plan.add_argument("--name-filter", action="append", default=None,
                      help="watch only layers whose name contains this (repeatable)")
    plan.set_defaults(handler=_cmd_plan)
    _add_dataset_commands(sub)
    return parser


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


# --------------------------------------------------------------------------- shared helpers
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


# --------------------------------------------------------------------------- show
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


# --------------------------------------------------------------------------- verify
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


# --------------------------------------------------------------------------- top
def _cmd_top(args) -> int:
    from logix.errors import LogFormatError, UsageError
    from logix.storage.scores import open_scores

    if not os.path.exists(args.scores):
        raise CliError(f"{args.scores!r} does not exist.", EXIT_USAGE)
    if os.path.isdir(args.scores):
        raise CliError(f"{args.scores!r} is a folder; pass a score file written by save_scores "
                       "or compute_influence_all(..., out=path).", EXIT_USAGE)
    try:
        scores = open_scores(args.scores, args.group, project_dir=args.content)
    except UsageError as e:  # not a score file, or no such group
        raise CliError(str(e), EXIT_USAGE) from None
    except LogFormatError as e:
        raise CliError(str(e)) from None
    with scores:
        n_test, n_train = scores.shape
        queries = range(n_test) if args.query is None else _query_rows(scores, args.query)
        results = [_top_one(scores, q, args.k) for q in queries]
        groups = scores.groups
    described = _attach_content(results, args.scores, args.content)
    if args.json:
        print(json.dumps(results, indent=1))
        return EXIT_OK

    out = _console()
    Table = _table_factory()
    group = f" (group {_esc(args.group)})" if args.group else ""
    others = (f" Groups in the file: {_esc(', '.join(groups))} (--group NAME)."
              if groups and not args.group else "")
    out.print(f"{_esc(args.scores)}{group}: {_plural(n_test, 'query')} x "
              f"{_plural(n_train, 'training example')}. Positive = helpful (training on it "
              f"lowers the query's loss), negative = harmful.{others}")
    for r in results:
        note = f"; {r['nonfinite']} non-finite scores ignored" if r["nonfinite"] else ""
        about = f" ({_esc(_describe_entry(r))})" if described and _describe_entry(r) else ""
        table = Table(title=f"query {r['query']}: {_esc(r['src_id'])}{about}{note}")
        table.add_column("#", justify="right")
        table.add_column("most helpful", overflow="fold")
        table.add_column("score", justify="right")
        table.add_column("most harmful", overflow="fold")
        table.add_column("score", justify="right")
        for i in range(max(len(r["helpful"]), len(r["harmful"]))):
            help_ = r["helpful"][i] if i < len(r["helpful"]) else None
            harm = r["harmful"][i] if i < len(r["harmful"]) else None
            table.add_row(str(i + 1), _esc(help_["id"]) + _describe_entry(help_, True)
                          if help_ else "", f"{help_['score']:.6g}" if help_ else "",
                          _esc(harm["id"]) + _describe_entry(harm, True) if harm else "",
                          f"{harm['score']:.6g}" if harm else "")
        if n_train == 0:
            table.caption = "no training examples in this file"
        out.print(table)
    return EXIT_OK


def _query_rows(scores, query: str) -> List[int]:
    """Rows of --query: the rows whose data id is `query`, or row number `query` ('#I' always
    means row I)."""
    n_test = scores.shape[0]
    by_id = [] if query.startswith("#") else [
        i for i, x in enumerate(scores.src_ids) if str(x) == query]
    number = query[1:] if query.startswith("#") else query
    row = int(number) if number.isdigit() else None
    if by_id and row is not None and row < n_test and by_id != [row]:
        raise CliError(f"--query {query} is ambiguous: it is the data id of row(s) {by_id} and "
                       f"also row number {row}. Pass --query '#{row}' for the row number.",
                       EXIT_USAGE)
    if by_id:
        return by_id
    if row is not None and row < n_test:
        return [row]
    ids = ", ".join(str(x) for x in scores.src_ids[:5]) + (", ..." if n_test > 5 else "")
    if row is not None:
        raise CliError(f"--query {query} is out of range: {scores.path!r} holds {n_test} queries "
                       f"(rows 0..{n_test - 1}), and no query has that id (ids: {ids}).",
                       EXIT_USAGE)
    raise CliError(f"--query {query} is not a query id of {scores.path!r} (ids: {ids}) nor a row "
                   "number.", EXIT_USAGE)


def _top_one(scores, query: int, k: int) -> Dict:
    from logix.storage.scores import top_of_row

    helpful, harmful, nonfinite = top_of_row(scores.row(query), scores.tgt_ids, k)
    return {"query": query, "src_id": scores.src_ids[query], "helpful": helpful,
            "harmful": harmful, "nonfinite": nonfinite}


def _attach_content(results: List[Dict], scores_path: str, content_dir: Optional[str]) -> bool:
    """Add "text" / "label" (from run.describe) to the query and to each listed example.
    Returns whether any content was found."""
    from logix.storage.content import load_content

    folder = content_dir
    if folder is None:  # the project folder the score file sits in, if any
        folder = os.path.dirname(os.path.abspath(scores_path))
        while not os.path.isfile(os.path.join(folder, "manifest.json")):
            if os.path.dirname(folder) == folder:
                return False
            folder = os.path.dirname(folder)
    elif not os.path.isdir(folder):
        raise CliError(f"--content {folder!r} is not a folder; pass the project folder "
                       "(<root_dir>/<project>) whose examples were described.", EXIT_USAGE)
    store = load_content(folder)
    if not len(store):
        return False
    for r in results:
        for entry, data_id in [(r, r["src_id"])] + [(e, e["id"]) for e in
                                                    r["helpful"] + r["harmful"]]:
            _add_content(entry, store, data_id)
    return True


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


# --------------------------------------------------------------------------- ui, report
def _cmd_ui(args) -> int:
    from logix.dashboard import serve
    from logix.dashboard.server import is_loopback

    for root in args.roots:
        if not os.path.isdir(root):
            raise CliError(f"{root!r} is not a folder; pass <root_dir> or a project folder.",
                           EXIT_USAGE)
    if not is_loopback(args.host):
        print(f"warning: --host {args.host} is not a loopback address: anyone who can reach it "
              "can read these logs, scores and example content (the dashboard has no "
              "authentication). Use --host 127.0.0.1 unless that is what you want; other "
              "machines reach it by the names given with --allow-host.",
              file=sys.stderr, flush=True)
    try:
        serve(args.roots, args.host, args.port, allowed_hosts=args.allow_host,
              ready=lambda url: print(f"LogIX dashboard on {url} (read-only; Ctrl-C stops)",
                                      flush=True))
    except OSError as e:
        raise CliError(f"cannot serve on {args.host}:{args.port}: {e}. Pick another --port "
                       "(0: any free one).", EXIT_USAGE) from None
    return EXIT_OK


def _cmd_report(args) -> int:
    from logix.dashboard import build_report

    for root in args.roots:
        if not os.path.isdir(root):
            raise CliError(f"{root!r} is not a folder; pass <root_dir> or a project folder.",
                           EXIT_USAGE)
    path = build_report(args.roots, args.out, max_queries=args.queries, k=args.k)
    print(f"wrote {path} ({_human_bytes(os.path.getsize(path))})")
    return EXIT_OK



def _cmd_export(args) -> int:
    from logix.errors import LogFormatError, UsageError
    from logix.export import collect, write

    options = {}
    if args.tracking_uri is not None:
        if args.to != "mlflow":
            raise CliError("--tracking-uri is for --to mlflow.", EXIT_USAGE)
        options["tracking_uri"] = args.tracking_uri
    project_dir = _project_dir(args.dir)
    try:
        export = collect(project_dir, args.scores, args.results, args.k, args.queries,
                         not args.no_heatmaps)
        for note in export.notes:
            print(f"note: {note}", file=sys.stderr)
        where = write(export, args.to, args.out, args.name, **options)
    except UsageError as e:
        raise CliError(str(e), EXIT_USAGE) from None
    except LogFormatError as e:
        raise CliError(str(e)) from None
    if args.to == "mlflow":  # a run id: say which store holds it
        from logix.export import DEFAULT_OUT
        from logix.export.mlflow import default_tracking_uri

        store = args.tracking_uri or default_tracking_uri(
            args.out or os.path.join(DEFAULT_OUT, "mlflow"))
        where = f"run {where} in {store}"
    tables = [t for t in export.tables if t.startswith("topk/")]
    print(f"exported {project_dir} to {args.to}: {_plural(len(tables), 'score file')}, "
          f"{_plural(len(export.images), 'heat map')}, "
          f"{_plural(len(export.evaluations), 'result file')} -> {where}")
    return EXIT_OK


# --------------------------------------------------------------------------- index, search
_HESSIANS = (curvature.AUTO, *curvature.names())


def _add_search_commands(sub) -> None:
    index = sub.add_parser("index", help="build or update a vector index of a log (FAISS)",
                           description="Build a FAISS index of the logged rows under "
                                       "DIR/index/NAME, or bring it up to date (only shards "
                                       "logged since the last build are read; a stale index is "
                                       "rebuilt). Needs pip install \"logix[search]\".")
    index.add_argument("dir", metavar="DIR", help="the project folder (<root_dir>/<project>)")
    index.add_argument("--kind", default="auto", choices=INDEX_KINDS,
                       help="auto: flat below 10,000 rows, else ivf with sq8 codes over a "
                            "256-wide sketch, nprobe calibrated to recall@10 >= 0.95 on the "
                            "log's own rows (default auto)")
    index.add_argument("--mode", default="dot", choices=SERVED_MODES,
                       help="dot serves every curvature; cosine is built for one (--hessian)")
    index.add_argument("--hessian", default=None, choices=_HESSIANS,
                       help="curvature of a cosine index")
    index.add_argument("--sketch", type=_positive_int, default=None, metavar="W",
                       help="index a seeded JL sketch of width W instead of full rows")
    index.add_argument("--quantize", default=None, choices=[q for q in QUANTIZERS if q],
                       help="compress the indexed vectors (8-bit scalar or product codes)")
    index.add_argument("--nprobe", type=_positive_int, default=None,
                       help="ivf: lists a search visits by default (default nlist/16, at least 8)")
    index.add_argument("--ef", type=_positive_int, default=None,
                       help="hnsw: search breadth stored with the index (default 128)")
    index.add_argument("--name", default=None, help="index name (default from the options)")
    index.add_argument("--rebuild", action="store_true", help="rebuild from scratch")
    index.set_defaults(handler=_cmd_index)

    search = sub.add_parser("search", help="most helpful training examples per query, via an "
                                           "index",
                            description="Print, per query, the k training examples with the "
                                        "largest scores: an index proposes candidates, their "
                                        "exact scores rank them. Without FAISS or an index, the "
                                        "exact streaming top-k answers (with a notice).")
    search.add_argument("dir", metavar="DIR", help="the training project folder")
    search.add_argument("--queries", required=True, metavar="FILE",
                        help="query gradients: a StepLog.save file or a logged query project")
    search.add_argument("--k", type=_positive_int, default=10, help="how many (default 10)")
    search.add_argument("--candidates", type=_positive_int, default=None,
                        help="candidates re-ranked per query (default max(4k, 100))")
    search.add_argument("--bottom", action="store_true", help="also the k most harmful")
    search.add_argument("--no-rerank", action="store_true",
                        help="return the index's approximate scores")
    search.add_argument("--index", default=None, metavar="NAME", help="which index")
    search.add_argument("--mode", default=None, choices=SERVED_MODES)
    search.add_argument("--hessian", default=None, choices=_HESSIANS,
                        help="curvature (default: the log's)")
    search.add_argument("--nprobe", type=_positive_int, default=None,
                        help="IVF lists visited per query (default: the index's, nlist/16)")
    search.add_argument("--ef", type=_positive_int, default=None,
                        help="HNSW search breadth (default: the index's)")
    search.add_argument("--json", action="store_true", help="print the result as JSON")
    search.set_defaults(handler=_cmd_search)
    _add_serve_command(sub)


def _add_serve_command(sub) -> None:
    serve = sub.add_parser("serve", help="answer search requests over HTTP from a warm index",
                           description="Keep one project's index, shards and norms open and "
                                       "answer JSON search requests (GET or POST /api/search, "
                                       "GET /api/health) on a local port; read-only. See "
                                       "docs/search.md.")
    serve.add_argument("dir", metavar="DIR", help="the training project folder")
    serve.add_argument("--port", type=_port, default=8766, help="port (default 8766; 0: any)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default 127.0.0.1; another needs --allow-remote)")
    serve.add_argument("--allow-remote", action="store_true",
                       help="allow a non-loopback --host (there is no authentication)")
    serve.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                       help="another name clients may use in the URL (repeatable)")
    serve.add_argument("--queries-dir", action="append", default=[], metavar="DIR",
                       help="a folder whose StepLog.save files requests may name by path "
                            "(repeatable; default none: queries come as rows)")
    serve.add_argument("--index", default=None, metavar="NAME",
                       help="the index to open at start (default: the one search picks)")
    serve.add_argument("--searches", type=_positive_int, default=2,
                       help="searches at a time (default 2); more wait, then get 503")
    serve.set_defaults(handler=_cmd_serve)


def _cmd_serve(args) -> int:
    from logix.dashboard.server import remote_warning
    from logix.errors import LogFormatError, UsageError
    from logix.index.service import serve

    project = _project_dir(args.dir)
    for folder in args.queries_dir:
        if not os.path.isdir(folder):
            raise CliError(f"--queries-dir {folder!r} is not a folder.", EXIT_USAGE)
    warning = remote_warning(args.host, "search service")
    if warning and args.allow_remote:
        print(warning, file=sys.stderr, flush=True)
    try:
        serve(project, args.host, args.port, allowed_hosts=args.allow_host,
              query_dirs=args.queries_dir, allow_remote=args.allow_remote,
              searches=args.searches, index=args.index,
              ready=lambda url: print(f"LogIX search service for {project} on {url} "
                                      "(read-only; Ctrl-C stops)", flush=True))
    except UsageError as e:
        raise CliError(str(e), EXIT_USAGE) from None
    except LogFormatError as e:
        raise CliError(str(e)) from None
    except OSError as e:
        raise CliError(f"cannot serve on {args.host}:{args.port}: {e}. Pick another --port "
                       "(0: any free one).", EXIT_USAGE) from None
    return EXIT_OK


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
                      f"{i['recall']:.3f} ({i['speedup']:.0f}x)",
                      _esc(i["state"] if i["state"] in ("fresh", "part")
                           else f"{i['state']}: {i['why']}"))
    return table


def _attributor(path: str):
    import logix

    return logix.Attributor(_project_dir(path))


def _cmd_index(args) -> int:
    from logix.errors import LogFormatError, UsageError

    try:
        m = _attributor(args.dir).build_index(
            args.kind, args.mode, sketch=args.sketch, quantize=args.quantize, name=args.name,
            rebuild=args.rebuild, hessian=args.hessian, nprobe=args.nprobe,
            **({"ef": args.ef} if args.ef else {}))
    except UsageError as e:
        raise CliError(str(e), EXIT_USAGE) from None
    except LogFormatError as e:
        raise CliError(str(e)) from None
    print(f"index {m.name}: {m.faiss['factory']} over {m.rows} rows "
          f"({_human_bytes(m.bytes)}, built in {m.build_seconds:.1f} s) in "
          f"{os.path.join(args.dir, 'index', m.name)}")
    return EXIT_OK


def _cmd_search(args) -> int:
    from logix.errors import LogFormatError, UsageError

    if not os.path.exists(args.queries):
        raise CliError(f"--queries {args.queries!r} does not exist.", EXIT_USAGE)
    try:
        result = _attributor(args.dir).search(
            args.queries, args.k, args.candidates, not args.no_rerank, args.bottom,
            index=args.index, mode=args.mode, hessian=args.hessian, nprobe=args.nprobe,
            ef=args.ef)
    except UsageError as e:
        raise CliError(str(e), EXIT_USAGE) from None
    except LogFormatError as e:
        raise CliError(str(e)) from None
    sides = ["top"] + (["bottom"] if args.bottom else [])
    rows = [{"src_id": src, **{side: [{"id": i, "score": float(s)} for i, s in
                                      zip(result[f"{side}_ids"][q], result[f"{side}_scores"][q])]
                               for side in sides}}
            for q, src in enumerate(result["src_ids"])]
    from logix.storage.content import load_content

    store = load_content(args.dir)  # what run.describe stored about the training examples
    for row in rows:
        for side in sides:
            for entry in row[side]:
                _add_content(entry, store, entry["id"])
    if args.json:
        print(json.dumps({"queries": rows, "search": result["meta"].get("search")}, indent=1,
                         default=str))
        return EXIT_OK
    out = _console()
    Table = _table_factory()
    how = result["meta"].get("search") or {}
    scores = "exact scores" if how.get("exact", True) else \
        "approximate scores (index distances, not re-ranked)"
    out.print(f"index {_esc(how.get('index') or 'none (exact stream)')}; {scores}, "
              "positive = helpful, negative = harmful.")
    for q, row in enumerate(rows):
        table = Table(title=f"query {q}: {_esc(row['src_id'])}")
        table.add_column("#", justify="right")
        for side in sides:
            table.add_column("most helpful" if side == "top" else "most harmful",
                             overflow="fold")
            table.add_column("score", justify="right")
        for i in range(args.k):
            cells = [str(i + 1)]
            for side in sides:
                entry = row[side][i] if i < len(row[side]) else None
                cells += [_esc(entry["id"]) + _describe_entry(entry, True),
                          f"{entry['score']:.6g}"] if entry else ["", ""]
            table.add_row(*cells)
        out.print(table)
    return EXIT_OK

# --------------------------------------------------------------------------- plan
def _plan_setup(hessian: str) -> Dict[str, List[str]]:
    """run.setup's spec for a logging run with this curvature: the rows, plus its statistics."""
    spec = curvature.get(hessian).setup_spec()
    spec["grad"] = ["log", *spec.get("grad", [])]
    return spec


def _causal_lm(config_path: str, command: str):
    """A causal LM with random weights from a Hugging Face config.json (or its folder), eager
    attention; nothing is downloaded."""
    import json

    path = os.path.join(config_path, "config.json") if os.path.isdir(config_path) \
        else config_path
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise CliError(f"cannot read the model config {path!r}: {e}", EXIT_USAGE) from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise CliError(f"{path!r} has no 'model_type': pass a Hugging Face config.json.",
                       EXIT_USAGE)
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        raise CliError(f"logix {command} needs transformers: pip install 'logix[huggingface]'.",
                       EXIT_USAGE) from None
    model_type = config.pop("model_type")
    config.pop("architectures", None)
    hf_config = AutoConfig.for_model(model_type, **config)
    hf_config._attn_implementation = "eager"
    return AutoModelForCausalLM.from_config(hf_config)


def _cmd_plan(args) -> int:
    import tempfile

    import logix
    from logix.errors import LogIXError

    model = _causal_lm(args.config, "plan")
    with tempfile.TemporaryDirectory() as root:  # nothing is written: a scratch root
        try:
            run = logix.init("plan", root_dir=root, log_dtype=args.dtype)
            run.watch(model, name_filter=args.name_filter)
            if args.rank != 0:
                run.add_lora(rank=args.rank)
            run.setup(_plan_setup(args.hessian))
            run.resource_plan(args.examples, args.tokens, disk_budget=args.disk_budget,
                              model=model if args.steps > 0 else None,
                              batch_size=args.batch_size, timed_steps=max(args.steps, 1),
                              timing_budget=args.timing_budget)
        except LogIXError as e:
            raise CliError(str(e), EXIT_USAGE) from None
    return EXIT_OK


def _cmd_check(args) -> int:
    import tempfile

    import torch

    import logix
    from logix.errors import LogIXError
    from logix.text.check import check_consistency

    model = _causal_lm(args.config, "check")
    vocab = model.config.vocab_size
    tokens = torch.randint(1, vocab, (args.tokens,), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as root:  # nothing is written: a scratch root
        try:
            run = logix.init("check", root_dir=root)
            run.watch(model, name_filter=args.name_filter)
            if args.rank != 0:
                run.add_lora(rank=args.rank)
            run.setup({"grad": ["log"]})
            run.eval()
            report = check_consistency(run, model, tokens.tolist(), pad_id=0, pad=args.pad,
                                       tolerance=args.tolerance)
        except LogIXError as e:
            raise CliError(str(e), EXIT_USAGE) from None
    print(report.render())
    return EXIT_OK if report.ok else EXIT_ERROR


# --------------------------------------------------------------------------- build, score
def _add_dataset_commands(sub) -> None:
    from logix.build.data import FORMATS, ORDERS

    def data_options(p) -> None:
        # build: no argparse defaults (None = not given), so --config values stay unless
        # overridden; the defaults are BuildConfig's
        p.add_argument("--model", help="a model folder (from_pretrained, local) or a Hugging "
                                       "Face config.json (random weights, seeded)")
        p.add_argument("--tokenizer", help="a tokenizer folder (default: the model folder)")
        p.add_argument("--format", choices=FORMATS,
                       help="auto (default): chat if the messages column is there, completion "
                            "if prompt and completion are, else text")
        for name, default in (("text", "text"), ("prompt", "prompt"),
                              ("completion", "completion"), ("messages", "messages")):
            p.add_argument(f"--{name}-column", help=f"default {default!r}")
        p.add_argument("--id-column", help="a column of example ids (default: the row number)")
        p.add_argument("--split", help="the split of a save_to_disk DatasetDict")
        p.add_argument("--max-length", type=_positive_int,
                       help="tokens per example; longer texts are cut into windows, each its "
                            "own id '<row>:<chunk>' (default 512)")
        p.add_argument("--batch-size", type=_positive_int, help="examples per batch (default 8)")
        p.add_argument("--batch-tokens", type=_positive_int, metavar="N",
                       help="fill each batch up to N padded tokens instead")
        p.add_argument("--batching", choices=ORDERS,
                       help="sorted: longest first, less padding (default); greedy: data order")
        p.add_argument("--device", help="default: cuda when available, else cpu")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    build = sub.add_parser("build", help="log a dataset into a project",
                           description="Log every example of a local dataset (jsonl, csv, "
                                       "parquet, or a datasets.save_to_disk folder) into a "
                                       "project: per-example LoGra rows (frozen pass, no weight "
                                       "gradients), the curvature's statistics, the texts; "
                                       "saves every choice in PROJECT/build.yaml. Rerunning "
                                       "logs only the ids not logged yet.")
    build.add_argument("project", metavar="PROJECT", nargs="?",
                       help="project folder <root_dir>/<name> (default: the --config's)")
    build.add_argument("--data", help="the training dataset")
    build.add_argument("--config", help="a saved build.yaml to replay (options given here "
                                        "override it)")
    build.add_argument("--limit", type=_positive_int, help="the first N rows only")
    build.add_argument("--rank", type=int, help="LoGra rank (default 16; 0: no projection)")
    build.add_argument("--hessian", choices=curvature.names(),
                       help="curvature whose statistics are collected (default ekfac)")
    build.add_argument("--dtype", choices=list(DTYPES), help="log dtype (default float32)")
    build.add_argument("--name-filter", action="append",
                       help="watch only layers whose name contains this (repeatable)")
    build.add_argument("--seed", type=int, help="projection and random-weight seed (default 0)")
    data_options(build)
    build.set_defaults(handler=_cmd_build)

    score = sub.add_parser("score", help="score queries against a built project or a dataset",
                           description="Score queries (a dataset with the build's column "
                                       "options, or --prompt/--completion pairs) against a "
                                       "project built with logix build, or with --train against "
                                       "a dataset on the fly (nothing stored; hessian none; top "
                                       "and bottom k kept). Writes a score file logix top "
                                       "reads.")
    score.add_argument("project", metavar="PROJECT", nargs="?",
                       help="a project built with logix build (its build.yaml gives the model, "
                            "tokenizer and column options)")
    score.add_argument("--queries", metavar="FILE", help="a query dataset")
    score.add_argument("--prompt", action="append", default=[], help="a query prompt "
                                                                     "(repeatable)")
    score.add_argument("--completion", action="append", default=[],
                       help="its completion, in the loss (repeatable, one per --prompt)")
    score.add_argument("--contrast", metavar="FILE",
                       help="a contrast dataset whose mean score is subtracted")
    score.add_argument("--aggregate", choices=("none", "mean", "sum", "max"), default="none",
                       help="one score row per query (none, default) or one over them")
    score.add_argument("--train", metavar="FILE",
                       help="score against this dataset on the fly instead of a built project")
    score.add_argument("--k", type=_positive_int, default=10,
                       help="on the fly: most helpful and harmful kept per row (default 10)")
    score.add_argument("--config", help="a build.yaml for the model and columns (default: "
                                        "PROJECT's)")
    score.add_argument("--rank", type=int, help="on the fly: LoGra rank (default 16)")
    score.add_argument("--seed", type=int, help="on the fly: projection and random-weight seed")
    score.add_argument("--name-filter", action="append",
                       help="on the fly: watch only layers whose name contains this")
    score.add_argument("--hessian", choices=_HESSIANS, help="default: the project's")
    score.add_argument("--mode", choices=("dot", "cosine", "l2"), help="default dot")
    score.add_argument("--damping", type=float)
    score.add_argument("-o", "--out", help="score file (default PROJECT/scores/NAME.safetensors)")
    data_options(score)
    score.set_defaults(handler=_cmd_score)


_DATA_FIELDS = ("model", "tokenizer", "format", "text_column", "prompt_column",
                "completion_column", "messages_column", "id_column", "split", "max_length",
                "batch_size", "batch_tokens", "batching", "device")


def _build_config(args, fields, base: Optional[str]):
    from logix.build import BuildConfig

    given = {f: getattr(args, f) for f in fields if getattr(args, f, None) is not None}
    return BuildConfig.load(base, **given) if base else BuildConfig.from_dict(given)


def _cmd_build(args) -> int:
    from logix.errors import LogIXError
    from logix.build import build

    if args.project is None and args.config is None:
        raise CliError("logix build needs a PROJECT folder (or --config of a saved build).",
                       EXIT_USAGE)
    try:
        cfg = _build_config(args, ("project", "data", "limit", "rank", "hessian", "dtype",
                                   "name_filter", "seed") + _DATA_FIELDS, args.config)
        if not cfg.model or not cfg.data:
            raise CliError("logix build needs --model and --data (or --config).", EXIT_USAGE)
        report = build(cfg, progress=not args.no_progress)
    except LogIXError as e:
        raise CliError(str(e), EXIT_USAGE) from None
    print(f"{report.project_dir}: {report.logged} examples logged ({report.tokens} tokens, "
          f"{report.batches} batches) in {report.seconds:.1f} s; {report.skipped} already "
          f"logged of {report.examples}")
    return EXIT_OK


def _cmd_score(args) -> int:
    from logix.errors import LogIXError
    from logix.build import BUILD_FILE, score

    base = args.config
    if base is None and args.project is not None:
        base = os.path.join(_project_dir(args.project), BUILD_FILE)
        if not os.path.isfile(base):
            raise CliError(f"{args.project!r} has no {BUILD_FILE} (not built by logix build): "
                           "pass --config or --model / --tokenizer.", EXIT_USAGE)
    try:
        cfg = _build_config(args, ("rank", "seed", "name_filter") + _DATA_FIELDS, base)
        if not cfg.model:
            raise CliError("logix score needs PROJECT, --config or --model.", EXIT_USAGE)
        report = score(args.project, args.queries, args.prompt, args.completion, args.out,
                       args.aggregate, args.contrast, args.train, args.k, args.hessian,
                       args.mode, args.damping, cfg=cfg, progress=not args.no_progress)
    except LogIXError as e:
        raise CliError(str(e), EXIT_USAGE) from None
    print(f"wrote {report.path}: {report.queries} queries"
          f"{f' minus {report.contrast} contrast' if report.contrast else ''} x {report.train} "
          f"training examples (hessian {report.hessian}, {report.seconds:.1f} s); read it with "
          f"logix top {report.path}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

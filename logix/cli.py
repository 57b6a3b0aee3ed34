"""The `logix` command: look at a log folder, check it, and read saved scores.

    logix show DIR [--shards] [--json]     what a log holds (modules, rows, shards, statistics)
    logix verify DIR [-v] [--no-hash] [--strict]
                                           check every shard against the manifest
    logix top SCORES [--k N] [--query Q] [--json]
                                           most helpful / harmful training examples per query
    logix ui [ROOT ...] [--port P]         browse logs and scores in a local web page
    logix report ROOT ... -o report.html   the same pages as one self-contained HTML file

Exit status: 0 fine; 1 the log or score file is damaged or unreadable (verify found an error, a
corrupt manifest, a newer format version); 2 usage error (bad arguments, a path that does not
exist, a folder that is not a LogIX log). The on-disk format is described in docs/format.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2

# safetensors dtype codes of the dtypes a log may hold, and bytes per element.
_ST_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1}
_HASH_CHUNK = 1 << 20
_MAX_HEADER = 100_000_000  # safetensors refuses larger headers
_STAT_SEP = "::"


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
                                        "has the recorded size and sha256, and holds a 'grad' "
                                        "tensor of the manifest's width, dtype and row count; "
                                        "report stray files and duplicate data ids. Exit 1 on "
                                        "any error. Run it on a log no process is writing.")
    verify.add_argument("dir", metavar="DIR", help="the project folder (<root_dir>/<project>)")
    verify.add_argument("-v", "--verbose", action="store_true", help="list shards that pass")
    verify.add_argument("--no-hash", action="store_true",
                        help="skip the sha256 check (sizes and headers only; fast)")
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
    ui.add_argument("roots", metavar="ROOT", nargs="*", default=["logix"],
                    help="project folders or folders of projects (default: ./logix)")
    ui.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: any free)")
    ui.add_argument("--host", default="127.0.0.1",
                    help="address to bind (default 127.0.0.1: this machine only)")
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
    plan.add_argument("--hessian", choices=["none", "kfac", "ekfac", "raw"], default="ekfac",
                      help="curvature whose statistics are collected (default ekfac)")
    plan.add_argument("--disk-budget", default=None, help="e.g. 50GB: recommend a rank")
    plan.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                      help="log dtype (default float32)")
    plan.add_argument("--batch-size", type=_positive_int, default=8,
                      help="examples per timed step (default 8)")
    plan.add_argument("--steps", type=int, default=3,
                      help="timed steps with and without logging (default 3; 0: no timing)")
    plan.add_argument("--name-filter", action="append", default=None,
                      help="watch only layers whose name contains this (repeatable)")
    plan.set_defaults(handler=_cmd_plan)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
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
    from logix.storage.format import MANIFEST
    from logix.storage.manifest import Manifest

    path = os.path.join(project_dir, MANIFEST)
    try:
        with open(path, "rb") as f:
            raw = json.loads(f.read())
    except OSError as e:
        raise CliError(f"{path!r} cannot be read: {e}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise CliError(f"{path!r} is corrupt: not readable JSON ({e}).") from None
    if not isinstance(raw, dict):
        raise CliError(f"{path!r} is corrupt: it holds a JSON {type(raw).__name__}, not the "
                       "manifest object.")
    try:
        manifest = Manifest.load(project_dir)
    except LogFormatError as e:
        raise CliError(str(e)) from None
    except (ValueError, TypeError, AttributeError) as e:  # not a JSON object, bad encoding
        raise CliError(f"{path!r} is not a valid LogIX manifest: {e}") from None
    problems = _manifest_type_problems(manifest)
    if problems:
        raise CliError(f"{path!r} has malformed fields: " + "; ".join(problems[:5]))
    return manifest, raw


def _manifest_type_problems(manifest) -> List[str]:
    """Fields whose type would make any arithmetic on the manifest fail."""
    problems = []
    ints = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    for m in manifest.modules:
        for key in ("in_dim", "out_dim", "rank_in", "rank_out", "offset"):
            if not ints(getattr(m, key)) or getattr(m, key) < 0:
                problems.append(f"module {m.name!r}: {key}={getattr(m, key)!r} is not a "
                                "non-negative integer")
    for s in manifest.shards:
        for key in ("rows", "bytes", "rank", "seq"):
            if not ints(getattr(s, key)) or getattr(s, key) < 0:
                problems.append(f"shard {s.file!r}: {key}={getattr(s, key)!r} is not a "
                                "non-negative integer")
        if not isinstance(s.file, str) or not isinstance(s.sha256, str):
            problems.append(f"shard {s.file!r}: file and sha256 must be strings")
    if not isinstance(manifest.projection, dict):
        problems.append(f"projection={manifest.projection!r} is not an object")
    return problems


def _statistics(project_dir: str) -> Dict:
    """{"present": bool, "error": str|None, "entries": {module: {kind: {"shape", "count"}}}}
    from the header of state/statistics.safetensors (sums are not loaded)."""
    from logix.storage.format import STATE_DIR, STATISTICS_FILE

    path = os.path.join(project_dir, STATE_DIR, STATISTICS_FILE)
    info = {"file": f"{STATE_DIR}/{STATISTICS_FILE}", "present": os.path.isfile(path),
            "error": None, "entries": {}, "orphan_counts": []}
    if not info["present"]:
        return info
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            keys = sorted(f.keys())
            counts = {}
            for key in keys:
                parts = key.split(_STAT_SEP)
                if len(parts) >= 3 and parts[-1] == "count":
                    counts[_STAT_SEP.join(parts[:-1])] = float(f.get_tensor(key).double().sum())
                elif len(parts) >= 2:
                    module, kind = parts[0], _STAT_SEP.join(parts[1:])
                    info["entries"].setdefault(module, {})[kind] = {
                        "shape": list(f.get_slice(key).get_shape()), "count": None}
    except (SafetensorError, OSError, RuntimeError) as e:
        info["error"] = f"{e}"
        return info
    for base, count in counts.items():
        module, _, kind = base.partition(_STAT_SEP)
        entry = info["entries"].get(module, {}).get(kind)
        if entry is None:
            info["orphan_counts"].append(base)
        else:
            entry["count"] = count
    return info


def _projections(project_dir: str) -> Dict:
    """Header facts of state/projections.safetensors: which matrices, their shapes, metadata."""
    from logix.storage.format import PROJECTIONS_FILE, STATE_DIR

    path = os.path.join(project_dir, STATE_DIR, PROJECTIONS_FILE)
    info = {"file": f"{STATE_DIR}/{PROJECTIONS_FILE}", "present": os.path.isfile(path),
            "error": None, "shapes": {}, "meta": None, "dims": None}
    if not info["present"]:
        return info
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            info["shapes"] = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        info["meta"] = json.loads(metadata["meta"]) if "meta" in metadata else None
        info["dims"] = json.loads(metadata["dims"]) if "dims" in metadata else None
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        info["error"] = f"{e}"
    return info


# --------------------------------------------------------------------------- show
def _summary(project_dir: str, manifest, list_shards: bool) -> Dict:
    from logix.storage.format import DTYPES

    itemsize = DTYPES[manifest.dtype].itemsize if manifest.dtype in DTYPES else None
    full = sum(m.in_dim * m.out_dim for m in manifest.modules)
    dim = manifest.dim
    shards_by_rank: Dict[int, int] = {}
    for s in manifest.shards:
        shards_by_rank[s.rank] = shards_by_rank.get(s.rank, 0) + 1
    out = {
        "path": os.path.abspath(project_dir),
        "project": manifest.project,
        "format_version": manifest.format_version,
        "dtype": manifest.dtype,
        "projection": dict(manifest.projection),
        "modules": [{"name": m.name, "type": m.type, "gradient": [m.out_dim, m.in_dim],
                     "rank": [m.rank_out, m.rank_in], "offset": m.offset, "width": m.dim,
                     "bias": m.bias} for m in manifest.modules],
        "row_width": dim,
        "rows": manifest.rows,
        "shards": {"count": len(manifest.shards),
                   "bytes": sum(s.bytes for s in manifest.shards),
                   "by_rank": {str(r): n for r, n in sorted(shards_by_rank.items())}},
        "bytes_per_example": dim * itemsize if itemsize else None,
        "full_gradient_numbers": full,
        "full_gradient_bytes_per_example": full * itemsize if itemsize else None,
        "compression": (full / dim) if dim else None,
        "statistics": _statistics(project_dir),
        "projections_file": _projections(project_dir),
    }
    if list_shards:
        out["shards"]["files"] = [{"file": s.file, "rank": s.rank, "seq": s.seq, "rows": s.rows,
                                   "bytes": s.bytes, "sha256": s.sha256}
                                  for s in manifest.shards]
    return out


def _cmd_show(args) -> int:
    project_dir = _project_dir(args.dir)
    manifest, _ = _load_manifest(project_dir)
    info = _summary(project_dir, manifest, args.shards)
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
    head.add_row("rows", f"{info['rows']}")
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

    table = Table(title=f"modules ({len(manifest.modules)})")
    for column in ("name", "type", "gradient (out x in)", "rank (out x in)", "offset", "width"):
        table.add_column(column, overflow="fold",
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

    if args.shards:
        table = Table(title="shards")
        for column in ("file", "rank", "seq", "rows", "bytes", "sha256"):
            table.add_column(column, overflow="fold", no_wrap=column == "file",
                             justify="left" if column in ("file", "sha256") else "right")
        for s in manifest.shards:
            table.add_row(_esc(s.file), str(s.rank), str(s.seq), str(s.rows), str(s.bytes),
                          _esc(str(s.sha256)[:12]))
        out.print(table)
    return EXIT_OK


# --------------------------------------------------------------------------- verify
@dataclass
class _Report:
    errors: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)

    def error(self, message: str) -> None:
        self.errors.append(message)

    def warn(self, message: str) -> None:
        self.warnings.append(message)


def _cmd_verify(args) -> int:
    project_dir = _project_dir(args.dir)
    out = _console()
    try:
        manifest, raw = _load_manifest(project_dir)
    except CliError as e:
        out.print(f"[red]ERROR[/red] {_esc(str(e))}")
        out.print("[red]FAILED[/red]: the manifest cannot be read, so no shard was checked.")
        return EXIT_ERROR
    report = _Report()
    _check_manifest(manifest, raw, report)
    seen_ids: Dict = {}
    duplicates: List = []
    checked_bytes = 0
    with _progress(sum(s.bytes for s in manifest.shards), not args.no_hash) as advance:
        for shard in manifest.shards:
            before = len(report.errors)
            size = _check_shard(project_dir, manifest, shard, report, not args.no_hash,
                                seen_ids, duplicates, advance)
            checked_bytes += size
            if args.verbose and len(report.errors) == before:
                out.print(f"[green]ok[/green]    {_esc(shard.file)}  {shard.rows} rows  "
                          f"{_human_bytes(shard.bytes)}")
    if duplicates:
        examples = "; ".join(f"{json.dumps(i)} in {a} and {b}" for i, a, b in duplicates[:5])
        verb = "appears" if len(duplicates) == 1 else "appear"
        report.warn(f"{_plural(len(duplicates), 'data id')} {verb} more than once in the log (e.g. "
                    f"{examples}); scores will list such examples once per row.")
    _check_stray_files(project_dir, manifest, report)
    _check_state(project_dir, manifest, report)

    for message in report.errors:
        out.print(f"[red]ERROR[/red] {_esc(message)}")
    for message in report.warnings:
        out.print(f"[yellow]WARN[/yellow]  {_esc(message)}")
    failed = bool(report.errors) or (args.strict and bool(report.warnings))
    verdict = "[red]FAILED[/red]" if failed else "[green]OK[/green]"
    hashed = "" if not args.no_hash else " (sha256 not checked: --no-hash)"
    out.print(f"{verdict}: {_plural(len(manifest.shards), 'shard')} "
              f"({_plural(manifest.rows, 'row')}) in the manifest, {_human_bytes(checked_bytes)} "
              f"read{hashed}; "
              f"{_plural(len(report.errors), 'error')}, "
              f"{_plural(len(report.warnings), 'warning')}")
    return EXIT_ERROR if failed else EXIT_OK


class _progress:
    """A transient progress bar on a terminal's stderr while hashing; nothing otherwise."""

    def __init__(self, total: int, hashing: bool) -> None:
        self.total, self.hashing, self.bar = total, hashing, None

    def __enter__(self):
        err = _console(stderr=True)
        if self.hashing and err.is_terminal and self.total > (256 << 20):
            from rich.progress import Progress

            self.bar = Progress(console=err, transient=True)
            self.bar.__enter__()
            task = self.bar.add_task("hashing shards", total=self.total)
            return lambda n: self.bar.advance(task, n)
        return lambda n: None

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False


def _check_manifest(manifest, raw: dict, report: _Report) -> None:
    from logix.storage.format import DTYPES

    if manifest.dtype not in DTYPES:
        report.error(f"manifest dtype {manifest.dtype!r} is not one of {sorted(DTYPES)}.")
    if raw.get("dim") is not None and raw.get("dim") != manifest.dim:
        report.error(f"manifest 'dim' is {raw.get('dim')} but its modules add up to "
                     f"{manifest.dim} columns.")
    listed = sum(s.get("rows", 0) for s in raw.get("shards", [])
                 if isinstance(s, dict) and s.get("checkpoint") is None)
    if raw.get("rows") is not None and raw.get("rows") != listed:  # index shards come on top
        report.error(f"manifest 'rows' is {raw.get('rows')} but its shards hold "
                     f"{listed} rows.")
    names = [m.name for m in manifest.modules]
    if len(set(names)) != len(names):
        report.error(f"module names repeat in the manifest: {names}.")
    spans = sorted((m.offset, m.offset + m.dim, m.name) for m in manifest.modules)
    for (a0, a1, a), (b0, b1, b) in zip(spans, spans[1:]):
        if b0 < a1:
            report.error(f"modules {a!r} [{a0}, {a1}) and {b!r} [{b0}, {b1}) overlap in the row.")
    for start, stop, name in spans:
        if stop > manifest.dim:
            report.error(f"module {name!r} columns [{start}, {stop}) run past the row width "
                         f"{manifest.dim}.")
    files = [s.file for s in manifest.shards]
    for f in sorted({f for f in files if files.count(f) > 1}):
        report.error(f"shard {f!r} is named more than once in the manifest.")


def _check_shard(project_dir: str, manifest, shard, report: _Report, hashing: bool,
                 seen_ids: Dict, duplicates: List, advance) -> int:
    """Check one shard; returns the bytes read. Reads the file once in chunks (bounded memory)."""
    from logix.storage.format import parse_shard_name

    name = shard.file
    if os.path.isabs(name) or os.path.normpath(name).startswith(".."):
        report.error(f"shard {name!r}: the path leaves the project folder.")
        return 0
    parsed = parse_shard_name(os.path.basename(name))
    if parsed is None:
        report.warn(f"shard {name!r}: the name does not follow shard-r<rank>-<seq>.safetensors.")
    elif parsed != (shard.rank, shard.seq):
        report.warn(f"shard {name!r}: the name says rank {parsed[0]} seq {parsed[1]}, the "
                    f"manifest rank {shard.rank} seq {shard.seq}.")
    path = os.path.join(project_dir, name)
    if not os.path.isfile(path):
        report.error(f"shard {name!r} is named in the manifest but missing.")
        return 0
    size = os.path.getsize(path)
    if size != shard.bytes:
        what = "truncated?" if size < shard.bytes else "extra bytes?"
        report.error(f"shard {name!r} is {size} bytes; the manifest says {shard.bytes} ({what}).")
    if hashing:
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
                    digest.update(chunk)
                    advance(len(chunk))
        except OSError as e:
            report.error(f"shard {name!r} cannot be read: {e}.")
            return 0
        if digest.hexdigest() != shard.sha256:
            report.error(f"shard {name!r}: sha256 {digest.hexdigest()[:16]}... does not match "
                         f"the manifest's {str(shard.sha256)[:16]}...; its bytes changed after "
                         "it was written.")
    ids = _check_shard_header(path, name, size, manifest, shard, report)
    if ids is not None:
        for i in ids:
            key = i if isinstance(i, (str, int)) else json.dumps(i)
            if key in seen_ids:
                duplicates.append((i, seen_ids[key], name))
            else:
                seen_ids[key] = name
    return size


def _check_shard_header(path: str, name: str, size: int, manifest, shard,
                        report: _Report) -> Optional[list]:
    """Parse the safetensors header by hand (exact messages), then open it with safetensors.
    Returns the shard's data ids, or None when they cannot be read."""
    from logix.storage.format import DATA_IDS_KEY, GRAD_KEY

    def bad(message: str) -> None:
        report.error(f"shard {name!r} is not a readable safetensors file: {message}.")

    try:
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                return bad(f"{size} bytes, shorter than the 8-byte header length")
            n = int.from_bytes(prefix, "little")
            if n > min(size - 8, _MAX_HEADER):
                return bad(f"the header claims {n} bytes but the file has {size - 8} after the "
                           "length (truncated?)")
            header = json.loads(f.read(n))
    except OSError as e:
        return bad(str(e))
    except (ValueError, UnicodeDecodeError) as e:
        return bad(f"the header is not JSON ({e})")
    if not isinstance(header, dict):
        return bad("the header is not a JSON object")
    data_size = size - 8 - n
    for key, spec in header.items():
        if key == "__metadata__":
            continue
        offsets = spec.get("data_offsets") if isinstance(spec, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and offsets[1] <= data_size):
            return bad(f"tensor {key!r} ends at byte {offsets and offsets[-1]} of a "
                       f"{data_size}-byte data section (truncated?)")
    grad = header.get(GRAD_KEY)
    if not isinstance(grad, dict):
        report.error(f"shard {name!r} has no {GRAD_KEY!r} tensor (it holds "
                     f"{[k for k in header if k != '__metadata__'][:5]}).")
    else:
        shape, dtype = grad.get("shape"), grad.get("dtype")
        want_dtype = _ST_DTYPE.get(manifest.dtype)
        if dtype != want_dtype:
            report.error(f"shard {name!r}: {GRAD_KEY!r} is {dtype}, the manifest says "
                         f"{manifest.dtype} ({want_dtype}).")
        if not (isinstance(shape, list) and len(shape) == 2):
            report.error(f"shard {name!r}: {GRAD_KEY!r} has shape {shape}, not [rows, width].")
        else:
            if shape[1] != manifest.dim:
                report.error(f"shard {name!r}: {GRAD_KEY!r} is {shape[1]} columns wide, the "
                             f"manifest's row width is {manifest.dim}.")
            if shape[0] != shard.rows:
                report.error(f"shard {name!r} holds {shape[0]} rows, the manifest says "
                             f"{shard.rows}.")
            start, stop = grad["data_offsets"]
            need = shape[0] * shape[1] * _ST_ITEMSIZE.get(dtype, 0)
            if dtype in _ST_ITEMSIZE and stop - start != need:
                report.error(f"shard {name!r}: {GRAD_KEY!r} spans {stop - start} bytes, its "
                             f"shape and dtype need {need}.")
    ids = None
    metadata = header.get("__metadata__") or {}
    if DATA_IDS_KEY not in metadata:
        report.error(f"shard {name!r} has no {DATA_IDS_KEY!r} in its metadata.")
    else:
        try:
            ids = json.loads(metadata[DATA_IDS_KEY])
        except (ValueError, TypeError) as e:
            report.error(f"shard {name!r}: metadata {DATA_IDS_KEY!r} is not JSON ({e}).")
        if ids is not None and not isinstance(ids, list):
            report.error(f"shard {name!r}: metadata {DATA_IDS_KEY!r} is not a JSON list.")
            ids = None
        if ids is not None and len(ids) != shard.rows:
            report.error(f"shard {name!r} names {len(ids)} data ids for {shard.rows} rows.")
        if ids is not None:
            odd = [i for i in ids if isinstance(i, bool) or not isinstance(i, (str, int))]
            if odd:
                report.warn(f"shard {name!r}: data ids should be str or int, found {odd[:3]}.")
    from safetensors import SafetensorError, safe_open

    try:  # the library itself must agree (this is what every reader uses)
        with safe_open(path, framework="pt") as f:
            if GRAD_KEY in f.keys():
                f.get_slice(GRAD_KEY).get_shape()
    except (SafetensorError, OSError, RuntimeError) as e:
        bad(f"safetensors refuses it ({e})")
    return ids


def _check_stray_files(project_dir: str, manifest, report: _Report) -> None:
    from logix.storage.format import LOGS_DIR, STATE_DIR, TMP_SUFFIX
    from logix.storage.manifest import INDEX_PREFIX, INDEX_SUFFIX

    named = {os.path.normpath(s.file) for s in manifest.shards}
    logs = os.path.join(project_dir, LOGS_DIR)
    if os.path.isdir(logs):
        for entry in sorted(os.listdir(logs)):
            rel = os.path.normpath(os.path.join(LOGS_DIR, entry))
            if rel in named or (entry.startswith(INDEX_PREFIX) and entry.endswith(INDEX_SUFFIX)):
                continue  # index-r<rank>.jsonl: a writer's list of its completed shards
            if entry.endswith(TMP_SUFFIX):
                report.warn(f"{rel!r} is a leftover temporary file from an interrupted write; "
                            "it holds no logged rows and can be deleted.")
            else:
                report.warn(f"{rel!r} is in {LOGS_DIR}/ but not named in the manifest; readers "
                            "ignore it (a shard written after the last manifest update, or a "
                            "foreign file).")
    for folder in (project_dir, os.path.join(project_dir, STATE_DIR)):
        if not os.path.isdir(folder):
            continue
        for entry in sorted(os.listdir(folder)):
            if entry.endswith(TMP_SUFFIX):
                rel = os.path.relpath(os.path.join(folder, entry), project_dir)
                report.warn(f"{rel!r} is a leftover temporary file from an interrupted write; "
                            "it can be deleted.")


def _check_state(project_dir: str, manifest, report: _Report) -> None:
    modules = {m.name: m for m in manifest.modules}
    proj = _projections(project_dir)
    if not proj["present"]:
        message = (f"{proj['file']} is missing; queries need it to project test gradients "
                   "the same way.")
        (report.error if manifest.shards else report.warn)(message)
    elif proj["error"]:
        report.error(f"{proj['file']} is not readable: {proj['error']}.")
    else:
        if proj["meta"] is not None and proj["meta"] != manifest.projection:
            report.error(f"{proj['file']} says projection {proj['meta']}, the manifest "
                         f"{manifest.projection}.")
        dims = proj["dims"] or {}
        for name, m in modules.items():
            if name in dims and list(dims[name]) != [m.in_dim, m.out_dim]:
                report.error(f"{proj['file']}: module {name!r} has [in, out] {dims[name]}, the "
                             f"manifest [{m.in_dim}, {m.out_dim}].")
            for side, rank, full in (("p_in", m.rank_in, m.in_dim),
                                     ("p_out", m.rank_out, m.out_dim)):
                shape = proj["shapes"].get(f"{name}{_STAT_SEP}{side}")
                if shape is None and rank != full:
                    report.error(f"{proj['file']} has no {name}{_STAT_SEP}{side} but module "
                                 f"{name!r} is projected to rank {rank} of {full}.")
                elif shape is not None and shape != [rank, full]:
                    report.error(f"{proj['file']}: {name}{_STAT_SEP}{side} is {shape}, the "
                                 f"manifest needs [{rank}, {full}].")
    stats = _statistics(project_dir)
    if not stats["present"]:
        report.warn(f"{stats['file']} is missing (finalize() was not called?); queries with a "
                    "preconditioner need it.")
        return
    if stats["error"]:
        report.error(f"{stats['file']} is not readable: {stats['error']}.")
        return
    for base in stats["orphan_counts"]:
        report.warn(f"{stats['file']}: {base}{_STAT_SEP}count has no matching statistic.")
    for module, kinds in stats["entries"].items():
        m = modules.get(module)
        if m is None:
            report.warn(f"{stats['file']} holds statistics of {module!r}, which is not in the "
                        "manifest.")
            continue
        expected = {"forward": [m.rank_in] * 2, "backward": [m.rank_out] * 2,
                    "grad": [m.dim] * 2}
        for kind, entry in kinds.items():
            if kind in expected and entry["shape"] != expected[kind]:
                report.error(f"{stats['file']}: {module}{_STAT_SEP}{kind} is {entry['shape']}, "
                             f"the manifest's ranks need {expected[kind]}.")
            if kind in expected and entry["count"] is None:
                report.error(f"{stats['file']}: {module}{_STAT_SEP}{kind} has no count.")


# --------------------------------------------------------------------------- top
def _cmd_top(args) -> int:
    from logix.errors import LogFormatError
    from logix.storage.scores import open_scores

    if not os.path.exists(args.scores):
        raise CliError(f"{args.scores!r} does not exist.", EXIT_USAGE)
    if os.path.isdir(args.scores):
        raise CliError(f"{args.scores!r} is a folder; pass a score file written by save_scores "
                       "or compute_influence_all(..., out=path).", EXIT_USAGE)
    try:
        scores = open_scores(args.scores, args.group)
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
    import torch

    row = scores.row(query)  # [n_train]
    finite = torch.isfinite(row)
    index = finite.nonzero().flatten()
    values = row[index]
    k = min(k, values.numel())
    best = torch.topk(values, k, largest=True, sorted=True)
    worst = torch.topk(values, k, largest=False, sorted=True)

    def entries(result):
        return [{"id": scores.tgt_ids[int(index[j])], "score": float(v)}
                for v, j in zip(result.values.tolist(), result.indices.tolist())]

    return {"query": query, "src_id": scores.src_ids[query], "helpful": entries(best),
            "harmful": entries(worst), "nonfinite": int((~finite).sum())}


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
            content = store.get(data_id)
            entry.update({k: content[k] for k in ("text", "label") if k in content})
    return True


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

    for root in args.roots:
        if not os.path.isdir(root):
            raise CliError(f"{root!r} is not a folder; pass <root_dir> or a project folder.",
                           EXIT_USAGE)
    try:
        serve(args.roots, args.host, args.port,
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


# --------------------------------------------------------------------------- plan
_PLAN_SETUP = {"none": {"grad": ["log"]}, "raw": {"grad": ["log", "covariance"]},
               "kfac": {"grad": ["log"], "forward": ["covariance"], "backward": ["covariance"]},
               "ekfac": {"grad": ["log"], "forward": ["covariance"], "backward": ["covariance"]}}


def _cmd_plan(args) -> int:
    import json
    import tempfile

    import logix
    from logix.errors import LogIXError

    path = os.path.join(args.config, "config.json") if os.path.isdir(args.config) \
        else args.config
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise CliError(f"cannot read the model config {path!r}: {e}", EXIT_USAGE) from None
    if "model_type" not in config:
        raise CliError(f"{path!r} has no 'model_type': pass a Hugging Face config.json.",
                       EXIT_USAGE)
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        raise CliError("logix plan needs transformers: pip install 'logix[huggingface]'.",
                       EXIT_USAGE) from None
    model_type = config.pop("model_type")
    config.pop("architectures", None)
    hf_config = AutoConfig.for_model(model_type, **config)
    hf_config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(hf_config)
    with tempfile.TemporaryDirectory() as root:  # nothing is written: a scratch root
        try:
            run = logix.init("plan", root_dir=root, log_dtype=args.dtype)
            run.watch(model, name_filter=args.name_filter)
            if args.rank != 0:
                run.add_lora(rank=args.rank)
            run.setup(_PLAN_SETUP[args.hessian])
            run.resource_plan(args.examples, args.tokens, disk_budget=args.disk_budget,
                              model=model if args.steps > 0 else None,
                              batch_size=args.batch_size, timed_steps=max(args.steps, 1))
        except LogIXError as e:
            raise CliError(str(e), EXIT_USAGE) from None
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

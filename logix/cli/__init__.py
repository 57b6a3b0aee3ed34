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
import os
import sys
from typing import Optional, Sequence

from logix.cli import build, dashboard, export, inspect, planning, scores, search
from logix.cli._common import EXIT_ERROR, EXIT_OK, EXIT_USAGE, CliError, _error

__all__ = ["main", "CliError", "EXIT_OK", "EXIT_ERROR", "EXIT_USAGE"]


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
    # Registration order is the order `logix --help` lists the commands in.
    inspect.add_parser(sub)  # show, verify
    scores.add_parser(sub)  # top
    dashboard.add_parser(sub)  # ui, report
    search.add_parser(sub)  # index, search, serve
    planning.add_check_parser(sub)
    export.add_parser(sub)
    planning.add_plan_parser(sub)
    build.add_parser(sub)  # build, score
    return parser

"""`logix index`, `logix search` and `logix serve`: a vector index of a log, and searches over
it."""

from __future__ import annotations

import json
import os
import sys

from logix.cli._common import (
    EXIT_OK, EXIT_USAGE, CliError, _positive_int, _port, _console, _table_factory, _esc,
    _human_bytes, _project_dir, _add_content, _describe_entry, _HESSIANS,
)
from logix.index.backend import KINDS as INDEX_KINDS, QUANTIZERS
from logix.index.builder import SERVED_MODES


def add_parser(sub) -> None:
    """Register `logix index`, `logix search` and `logix serve`."""
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
                        help="query gradients: a StepRows.save file or a logged query project")
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
                       help="a folder whose StepRows.save files requests may name by path "
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

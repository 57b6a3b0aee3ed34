"""`logix ui` and `logix report`: the read-only dashboard, served or written to one HTML file."""

from __future__ import annotations

import os
import sys

from logix.cli._common import EXIT_OK, EXIT_USAGE, CliError, _positive_int, _port, _human_bytes


def add_parser(sub) -> None:
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

"""`logix export`: a project's summary, top-k, heat maps and evaluation results to a tracker."""

from __future__ import annotations

import os
import sys

from logix.cli._common import EXIT_OK, EXIT_USAGE, CliError, _positive_int, _plural, _project_dir


def add_parser(sub) -> None:
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

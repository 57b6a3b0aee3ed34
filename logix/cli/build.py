"""`logix build` and `logix score`: log a dataset, and score queries against it."""

from __future__ import annotations

import argparse
import os
from typing import Optional

from logix.cli._common import EXIT_OK, EXIT_USAGE, CliError, _positive_int, _project_dir, _HESSIANS
from logix.influence import curvature
from logix.storage.format import DTYPES


def add_parser(sub) -> None:
    """Register `logix build` and `logix score`."""
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
    score.add_argument("--damping", type=_damping,
                       help="auto (default), relative, or a number (absolute)")
    score.add_argument("-o", "--out", help="score file (default PROJECT/scores/NAME.safetensors)")
    data_options(score)
    score.set_defaults(handler=_cmd_score)


_DATA_FIELDS = ("model", "tokenizer", "format", "text_column", "prompt_column",
                "completion_column", "messages_column", "id_column", "split", "max_length",
                "batch_size", "batch_tokens", "batching", "device")


def _damping(text: str):
    """--damping: 'auto', 'relative' or a number."""
    if text in ("auto", "relative"):
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, relative or a number, got {text!r}"
                                         ) from None


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

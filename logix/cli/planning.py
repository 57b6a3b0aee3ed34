"""`logix plan` and `logix check`: a random-weight model from a config, its rows' sizes and costs,
and the same rows padded left, right and per attention kernel."""

from __future__ import annotations

from typing import Dict, List

from logix.cli._common import EXIT_OK, EXIT_ERROR, EXIT_USAGE, CliError, _positive_int
from logix.errors import UsageError
from logix.influence import curvature
from logix.storage.format import DTYPES


def add_check_parser(sub) -> None:
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


def add_plan_parser(sub) -> None:
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


def _plan_setup(hessian: str) -> Dict[str, List[str]]:
    """run.setup's spec for a logging run with this curvature: the rows, plus its statistics."""
    spec = curvature.get(hessian).setup_spec()
    spec["grad"] = ["log", *spec.get("grad", [])]
    return spec


def _causal_lm(config_path: str):
    """The model `logix build` loads from this path (a config.json, or its folder, gives seeded
    random weights; nothing is downloaded), or a usage error."""
    from logix.build.commands import load_model

    try:
        return load_model(config_path)
    except UsageError as e:
        raise CliError(str(e), EXIT_USAGE) from None


def _cmd_plan(args) -> int:
    import tempfile

    import logix
    from logix.errors import LogIXError

    model = _causal_lm(args.config)
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

    model = _causal_lm(args.config)
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

"""`logix top`: the most helpful and harmful training examples per query of a score file."""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

from logix.cli._common import (
    EXIT_OK, EXIT_USAGE, CliError, _positive_int, _console, _table_factory, _plural, _esc,
    _add_content, _describe_entry,
)


def add_parser(sub) -> None:
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

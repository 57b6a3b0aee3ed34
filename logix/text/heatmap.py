"""Heat maps of per-token scores (`token_influence` results, or a score file read back with
`load_scores`): blue = the training example supports (helps) that token, red = it opposes it,
white = no effect; prompt tokens are printed dim / italic."""

from __future__ import annotations

import html
import math
from typing import Dict, List, Optional, Tuple, Union

from logix.dashboard.plots import heat_color
from logix.errors import UsageError
from logix.storage.format import atomic_write


def token_scores(result: Dict, query: int = 0, train: Union[None, int, str] = None
                 ) -> Tuple[List[str], List[float], List[bool], object, float]:
    """(token strings, scores, completion flags, training id, sequence score) of one query
    against one training example: `train` is a training id, or None for the example with the
    highest sequence score. Tokens without a completion flag count as completion."""
    if "token_influence" not in result:
        raise UsageError("This result has no per-token scores; compute them with "
                         "logix.text.token_influence(run, query_log(..., per_token=True)).")
    n_query = len(result["src_ids"])
    if not isinstance(query, int) or not 0 <= query < n_query:
        raise UsageError(f"query must be a row index in [0, {n_query}), got {query!r}.")
    tgt_ids = list(result["tgt_ids"])
    if train is None:
        column = int(result["influence"][query].argmax())
    elif train in tgt_ids:
        column = tgt_ids.index(train)
    else:
        raise UsageError(f"Training id {train!r} is not among the scored ones (e.g. "
                         f"{tgt_ids[:3]}); pass one of result['tgt_ids'] or None.")
    rows = [k for k, q in enumerate(result["token_query"]) if q == query]
    values = result["token_influence"][rows, column].tolist()
    texts = [result["token_text"][k] for k in rows]
    flags = result.get("token_completion")
    completion = [True] * len(rows) if flags is None else [bool(flags[k]) for k in rows]
    return texts, values, completion, tgt_ids[column], float(result["influence"][query, column])


def _scale(values: List[float]) -> float:
    return max((abs(v) for v in values if math.isfinite(v)), default=0.0)


def print_heatmap(result: Dict, query: int = 0, train: Union[None, int, str] = None,
                  console=None):
    """Print one query's tokens coloured by their scores for one training example (rich);
    returns the printed `rich.text.Text`."""
    from rich.console import Console
    from rich.text import Text

    texts, values, completion, train_id, total = token_scores(result, query, train)
    scale = _scale(values)
    line = Text()
    for text, value, scored in zip(texts, values, completion):
        style = f"black on {heat_color(value, scale)}" + ("" if scored else " italic dim")
        line.append(text.replace("\n", "\u21b5"), style=style)  # one line per query
    console = console or Console()
    console.print(f"query {result['src_ids'][query]!r} x training example {train_id!r}: "
                  f"score {total:.4g} = sum of the token scores (max |token| {scale:.3g})")
    console.print(line)
    return line


def heatmap_html(result: Dict, query: int = 0, train: Union[None, int, str] = None,
                 path: Optional[str] = None) -> str:
    """One query's tokens as an HTML fragment of coloured spans (each with its score as a
    tooltip); written to `path` as a standalone page when given. Returns the HTML."""
    texts, values, completion, train_id, total = token_scores(result, query, train)
    scale = _scale(values)
    spans = "".join(
        f'<span title="{value:.4g}" style="background:{heat_color(value, scale)}'
        f'{"" if scored else ";opacity:0.6;font-style:italic"}">{html.escape(text)}</span>'
        for text, value, scored in zip(texts, values, completion))
    body = (f"<p>query {html.escape(repr(result['src_ids'][query]))} x training example "
            f"{html.escape(repr(train_id))}: score {total:.4g}</p>"
            f'<pre style="white-space:pre-wrap;font-family:monospace">{spans}</pre>')
    if path is not None:
        atomic_write(path, ("<!doctype html><meta charset='utf-8'><title>LogIX token scores"
                            f"</title>{body}").encode("utf-8"))
    return body


def heatmap_png(result: Dict, path: str, query: int = 0, train: Union[None, int, str] = None,
                width: int = 80) -> str:
    """One query's tokens as a PNG (monospace, wrapped at `width` characters); needs matplotlib
    (`pip install logix[viz]`). Returns the path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise UsageError("heatmap_png needs matplotlib: pip install 'logix[viz]' (or use "
                         "heatmap_html).") from e
    texts, values, completion, train_id, total = token_scores(result, query, train)
    scale = _scale(values)
    cells, row, col = [], 0, 0  # (row, col, text, value, scored)
    for text, value, scored in zip(texts, values, completion):
        for n, piece in enumerate(text.split("\n")):
            if n:
                row, col = row + 1, 0
            if col + len(piece) > width and col:
                row, col = row + 1, 0
            cells.append((row, col, piece, value, scored))
            col += len(piece)
    rows = row + 1
    # One data unit is 0.1 inch across (a 12 pt monospace character) and 0.24 inch down.
    fig = plt.figure(figsize=((width + 2) * 0.1, (rows + 2) * 0.24))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(-1, width + 1)
    ax.set_ylim(rows + 1.5, -0.5)
    ax.axis("off")
    ax.text(0, -0.2, f"query {result['src_ids'][query]!r} x training example {train_id!r}: "
                     f"score {total:.4g}", fontsize=10, family="monospace", va="top")
    for r, c, piece, value, scored in cells:
        if not piece:
            continue
        rgb = tuple(int(v) / 255 for v in heat_color(value, scale)[4:-1].split(","))
        ax.add_patch(plt.Rectangle((c, r + 0.9), len(piece), 0.95, color=rgb, lw=0))
        ax.text(c, r + 1.75, piece, fontsize=12, family="monospace",
                style="normal" if scored else "italic", alpha=1.0 if scored else 0.6)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

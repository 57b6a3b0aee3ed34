"""HTML of every dashboard page, built from the JSON of data.py with markup.render (every value
escaped). The live server and the static report render the same markup; only links differ
(URLs there, #anchors in the report)."""

from __future__ import annotations

import datetime
import json
import math
import re
import time
from typing import Any, Dict, List, Optional
from urllib.parse import quote, urlencode

from logix.dashboard import plots
from logix.dashboard.markup import Markup, join, render, static, url
from logix.dashboard.words import group_words

SIGN_NOTE = ("Positive score: training on the example lowers the query's loss (helpful); "
             "negative: it raises it (harmful).")


class Links:
    """Where a page links to: server URLs, or anchors inside one report file."""

    def __init__(self, report: bool = False) -> None:
        self.report = report

    def projects(self) -> Markup:
        return url("#projects" if self.report else "/")

    def project(self, key: str) -> Markup:
        return url(f"#{anchor('project', key)}" if self.report else f"/project/{_quote(key)}")

    def scores(self, key: str, file: str, query: Optional[int] = None,
               group: Optional[str] = None) -> Markup:
        if self.report:
            return url(f"#{anchor('scores', key, file)}")
        params = {k: v for k, v in (("query", query), ("group", group)) if v is not None}
        query_string = f"?{urlencode(params, errors='surrogateescape')}" if params else ""
        return url(f"/scores/{_quote(key)}/{_quote(file)}{query_string}")

    def evaluation(self, key: str, file: str) -> Markup:
        return url(f"#{anchor('evaluation', key, file)}" if self.report else
                   f"/evaluation/{_quote(key)}/{_quote(file)}")

    def example(self, key: str, data_id, norm: Optional[str] = None) -> Optional[Markup]:
        """A training example's page (None in the report, which has no example pages); the id
        travels as JSON, so 7 and "7" stay apart."""
        if self.report:
            return None
        params = {"id": json.dumps(data_id), **({"norm": norm} if norm else {})}
        return url(f"/example/{_quote(key)}?{urlencode(params)}")


def id_link(links: Links, key: str, data_id) -> Markup:
    """A training id, as a link to its example page where there is one."""
    href = links.example(key, data_id)
    if href is None:
        return render("$id", id=id_text(data_id))
    return render('<a class="example-link" href="$h">$id</a>', h=href, id=id_text(data_id))


def _quote(value: str) -> str:
    # surrogateescape: a non-UTF-8 file name's bytes go into the URL as they are (%FF)
    return quote(value, errors="surrogateescape")


def anchor(*parts: str) -> str:
    return "-".join(re.sub(r"[^A-Za-z0-9_]+", "_", p) for p in parts)


def layout(title: str, body: Markup, report: bool = False) -> Markup:
    """A whole HTML document; style and script are inlined (no network needed to open it)."""
    return render(static("templates", "page.html"), title=title, body=body,
                  mode="report" if report else "live", style=static("static", "style.css"),
                  script=static("static", "app.js"))


def error_box(message: str) -> Markup:
    return render('<div class="error" role="alert">$m</div>', m=message)


def error_page(message: str, back: Markup) -> Markup:
    return render('<h1>Cannot show this page</h1>$box<p><a href="$back">back to the projects'
                  '</a></p>', box=error_box(message), back=back)


# --------------------------------------------------------------------------- projects
_PROJECT_FIELDS = ("state", "rows", "width", "modules", "shards", "checkpoints", "disk",
                   "last write")


def projects_page(data: Dict[str, Any], links: Links) -> Markup:
    rows = []
    for row in data["projects"]:
        name = render('<a href="$href">$key</a>', href=links.project(row["key"]), key=row["key"])
        if "error" in row:
            cells = render('<td>$name</td><td colspan="$n" class="error-cell">$error</td>',
                           name=name, n=len(_PROJECT_FIELDS), error=row["error"])
        else:
            cells = render("<td>$name</td>$cells", name=name, cells=join(
                render('<td data-field="$f" class="num">$v</td>', f=f, v=_cell(f, row))
                for f in _PROJECT_FIELDS))
        rows.append(render('<tr data-key="$key">$cells</tr>', key=row["key"], cells=cells))
    if not rows:
        rows.append(render('<tr><td colspan="$n" class="muted">no projects found</td></tr>',
                           n=len(_PROJECT_FIELDS) + 1))
    live = "" if links.report else render(
        '<p class="muted" id="live-note">Live: this table refreshes every 2 s.</p>')
    return render('<h1>LogIX projects</h1>\n<p class="muted">Roots: $roots</p>\n$problems\n'
                  '<table id="projects" class="grid"><thead><tr>$head</tr></thead>'
                  '<tbody>$rows</tbody></table>\n$live',
                  roots=", ".join(data["roots"]),
                  problems=join(map(error_box, data["problems"])),
                  head=join(render("<th>$h</th>", h=h) for h in ("project",) + _PROJECT_FIELDS),
                  rows=join(rows), live=live)


def _cell(field: str, row: Dict[str, Any]) -> str:
    field = field.replace(" ", "_")
    if field == "disk":
        return human_bytes(row["disk_bytes"])
    if field == "last_write":
        return when(row["last_write"])
    return str(row.get(field, "-"))


def human_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def when(stamp: Optional[float]) -> str:
    if stamp is None:
        return "-"
    age = max(time.time() - stamp, 0)
    ago = f"{age:.0f} s ago" if age < 120 else f"{age / 60:.0f} min ago" if age < 7200 \
        else f"{age / 3600:.0f} h ago"
    return datetime.datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M:%S") + f" ({ago})"


# --------------------------------------------------------------------------- project
def _crumbs(links: Links, key: Optional[str] = None) -> Markup:
    if key is None:
        return render('<p class="crumbs"><a href="$p">projects</a> /</p>', p=links.projects())
    return render('<p class="crumbs"><a href="$p">projects</a> / <a href="$href">$key</a> /</p>',
                  p=links.projects(), href=links.project(key), key=key)


def project_page(data: Dict[str, Any], links: Links) -> Markup:
    key = data["key"]
    head = render("$crumbs\n<h1>$key</h1>", crumbs=_crumbs(links), key=key)
    if "error" in data:
        return join([head, error_box(data["error"]), _file_lists(data, links)], "\n")
    s = data["summary"]
    facts = [("folder", s["path"]), ("dtype", s["dtype"]), ("rows", s["rows"]),
             ("row width", s["row_width"]), ("shards", s["shards"]["count"]),
             ("shard bytes", human_bytes(s["shards"]["bytes"])),
             ("disk", human_bytes(data["row"]["disk_bytes"])),
             ("state", data["row"]["state"]), ("last write", when(data["row"]["last_write"])),
             ("described examples", data["content"]["described"])]
    parts = [head, render('<table class="facts">$rows</table>', rows=join(
        render("<tr><th>$k</th><td>$v</td></tr>", k=k, v=v) for k, v in facts))]
    parts += [error_box(e) for e in data["content"]["errors"]]
    parts += [_verify_html(data["verify"]), _modules_html(s), _projection_html(s)]
    parts.append(render('<h2>Curvature spectra</h2><p class="muted">Eigenvalues of each '
                        'statistic (sum / count), largest first, log scale.</p>'))
    spectra = data["spectra"]
    if "error" in spectra:
        parts.append(error_box(spectra["error"]))
    else:
        figures = []
        for module, kinds in spectra["modules"].items():
            series = [(kind, range(1, len(v["eigenvalues"]) + 1), v["eigenvalues"])
                      for kind, v in kinds.items() if "eigenvalues" in v]
            figures.append(plots.line_plot(series, title=f"module {module}", xlabel="index",
                                           ylabel="eigenvalue", log_y=True, x_integer=True))
        parts.append(render('<div class="plots" id="spectra">$f</div>', f=join(figures))
                     if figures else render('<p class="muted">no statistics collected</p>'))
    growth = data["growth"]
    parts.append(render('<h2>Log growth</h2><div class="plots">$plot</div>', plot=plots.line_plot(
        [("rows", growth["shard"], growth["rows"])], title="rows after each shard",
        xlabel="shard", ylabel="rows", markers=len(growth["rows"]) < 3, x_integer=True)))
    parts.append(_file_lists(data, links))
    return join(parts, "\n")


def _verify_html(verify: Dict[str, Any]) -> Markup:
    status = "OK" if verify["ok"] else "FAILED"
    hashed = "" if verify["hashed"] else " (sizes and headers; checksums not checked)"
    items = [render('<li class="err">ERROR $e</li>', e=e) for e in verify["errors"]]
    items += [render('<li class="warn">WARN $w</li>', w=w) for w in verify["warnings"]]
    return render('<h2>Verify</h2><p id="verify-status" class="$cls">$status: $n_err errors, '
                  '$n_warn warnings$hashed</p>$items', cls=status.lower(), status=status,
                  n_err=len(verify["errors"]), n_warn=len(verify["warnings"]), hashed=hashed,
                  items=render('<ul class="issues">$i</ul>', i=join(items)) if items else "")


def _modules_html(s: Dict[str, Any]) -> Markup:
    itemsize = (s["bytes_per_example"] // s["row_width"]) if s["row_width"] and \
        s["bytes_per_example"] else None
    rows = [render("<tr>$cells</tr>", cells=join(render("<td>$v</td>", v=v) for v in (
        m["name"], m["type"],
        f"{m['gradient'][0]} x {m['gradient'][1]}" + (" (+bias)" if m["bias"] else ""),
        f"{m['rank'][0]} x {m['rank'][1]}", m["offset"], m["width"],
        human_bytes(m["width"] * itemsize) if itemsize else "-"))) for m in s["modules"]]
    head = ("name", "type", "gradient (out x in)", "rank (out x in)", "offset", "width",
            "bytes / example")
    return render('<h2>Modules ($n)</h2><table id="modules" class="grid"><thead><tr>$head</tr>'
                  '</thead><tbody>$rows</tbody></table>', n=len(s["modules"]),
                  head=join(render("<th>$h</th>", h=h) for h in head), rows=join(rows))


def _projection_html(s: Dict[str, Any]) -> Markup:
    proj, pfile = s["projection"], s["projections_file"]
    ratio = f"{s['compression']:.1f}x fewer numbers than the full gradient" \
        if s["compression"] else "-"
    if not pfile["present"]:
        detail = error_box(f"{pfile['file']} is missing (finalize() writes it).")
    elif pfile["error"]:
        detail = error_box(f"{pfile['file']} is not readable: {pfile['error']}")
    elif not pfile["shapes"]:
        detail = render('<p class="muted">matrices: none (identity)</p>')
    else:
        detail = render('<details id="projection-matrices"><summary>$n matrices</summary>'
                        '<p class="muted">$s</p></details>', n=len(pfile["shapes"]),
                        s=", ".join(f"{k} {v[0]}x{v[1]}" for k, v in pfile["shapes"].items()))
    return render('<h2>Projection</h2><p id="projection-summary"><b>$init</b>, $ranks, '
                  '$modules modules, seed $seed; $ratio</p>$detail',
                  init=proj.get("init", "?"), ranks=_ranks(s["modules"]),
                  modules=len(s["modules"]), seed=proj.get("seed", "?"), ratio=ratio,
                  detail=detail)


def _ranks(modules: List[Dict[str, Any]]) -> str:
    """"rank 16" when every module is projected to 16 x 16, else the ranks that occur."""
    ranks = sorted({tuple(m["rank"]) for m in modules})
    if len(ranks) == 1 and ranks[0][0] == ranks[0][1]:
        return f"rank {ranks[0][0]}"
    shown = ", ".join(f"{o} x {i}" for o, i in ranks[:4]) + (", ..." if len(ranks) > 4 else "")
    return f"ranks (out x in) {shown}"


def _file_lists(data: Dict[str, Any], links: Links) -> Markup:
    key = data["key"]
    scores = join(render('<li><a class="score-link" href="$href">$file</a> '
                         '<span class="muted">$size</span></li>',
                         href=links.scores(key, f["file"]), file=f["file"],
                         size=human_bytes(f["bytes"])) for f in data["score_files"])
    evals = join(render('<li><a class="eval-link" href="$href">$file</a></li>',
                        href=links.evaluation(key, f["file"]), file=f["file"])
                 for f in data["evaluation_files"])
    none_scores = render('<p class="muted">none (save_scores(path, result) into the project '
                         'folder)</p>')
    none_evals = render('<p class="muted">none (logix.evaluation.save_results)</p>')
    return render("<h2>Score files</h2>$s<h2>Evaluation results</h2>$e",
                  s=render("<ul>$i</ul>", i=scores) if scores else none_scores,
                  e=render("<ul>$i</ul>", i=evals) if evals else none_evals)


# --------------------------------------------------------------------------- scores
def scores_page(views: List[Dict[str, Any]], links: Links) -> Markup:
    """One score file; `views` holds one query's data (server) or several (report)."""
    first = views[0]
    key, file = first["key"], first["file"]
    parts = [_crumbs(links, key), render("<h1>Scores: $file</h1>", file=file),
             render('<p class="muted">$q queries x $t training examples. $note</p>',
                    q=first["shape"][0], t=first["shape"][1], note=SIGN_NOTE)]
    if first["meta"]:
        parts.append(meta_html(first["meta"]))
    shown = {v["query"] for v in views}
    options = join(render(
        '<option value="$index"$selected$disabled>$index: $id$label</option>',
        index=q["index"], id=id_text(q["id"]), label=f" - {q['label']}" if q["label"] else "",
        selected=render(" selected") if q["index"] == first["query"] else "",
        disabled=render(" disabled") if links.report and q["index"] not in shown else "")
        for q in first["queries"])
    parts.append(render('<label>Query <select class="query-select" data-target="$target">'
                        '$options</select></label>',
                        target=links.scores(key, file, group=first["group"]), options=options))
    if first["groups"]:
        rank_by = ""
        if not links.report:
            group_links = [render('<a href="$h">total</a>', h=links.scores(key, file,
                                                                            first["query"]))]
            group_links += [render('<a href="$h">$g</a>', h=links.scores(key, file,
                                                                          first["query"], g), g=g)
                            for g in first["groups"]]
            rank_by = render(" &middot; rank by: $l", l=join(group_links, " | "))
        ranked = render(" &middot; ranked by <b>$g</b>", g=first["group"]) \
            if first["group"] else ""
        parts.append(render("<p>Groups: $groups$rank_by$ranked</p>",
                            groups=", ".join(map(str, first["groups"])), rank_by=rank_by,
                            ranked=ranked))
    for view in views:
        parts.append(render('<div class="query-view" data-query="$q"$hidden>$body</div>',
                            q=view["query"], body=_query_html(view, links),
                            hidden=render(" hidden") if view is not first else ""))
    return join(parts, "\n")


def _query_html(v: Dict[str, Any], links: Links) -> Markup:
    parts = [render('<h2>Query $q: <span class="query-id">$id</span></h2>', q=v["query"],
                    id=id_text(v["src_id"])),
             render('<div class="query-content">$c</div>', c=content_html(v["src_content"]))]
    if v["nonfinite"]:
        parts.append(error_box(f'{v["nonfinite"]} non-finite scores of this query are ignored.'))
    for title, entries, css in (("Most helpful", v["helpful"], "helpful"),
                                ("Most harmful", v["harmful"], "harmful")):
        head = render("<th>#</th><th>id</th><th>score</th>$groups<th>content</th>",
                      groups=join(render("<th>group $g</th>", g=g) for g in v["groups"]))
        rows = join(render(
            '<tr><td>$rank</td><td class="id">$id</td><td class="score num">$score</td>$groups'
            '<td>$content</td></tr>', rank=e["rank"], id=id_link(links, v["key"], e["id"]),
            score=f"{e['score']:.6g}",
            groups=join(render('<td class="num">$v</td>', v=_num(e["groups"].get(g)))
                        for g in v["groups"]),
            content=content_html(e["content"])) for e in entries)
        parts.append(render('<div class="topk"><h3>$title</h3><table class="grid $css">'
                            '<thead><tr>$head</tr></thead><tbody>$rows</tbody></table></div>',
                            title=title, css=css, head=head, rows=rows))
    parts.append(_tokens_html(v, links))
    extra = [plots.histogram(v["distribution"], title="all scores of this query",
                             xlabel="score", mark=0.0)]
    if v["group_totals"]:
        totals = v["group_totals"]
        extra.append(plots.bar_plot(list(totals), list(totals.values()),
                                    title="sum of scores per group", ylabel="sum"))
    parts.append(render('<div class="plots">$p</div>', p=join(extra)))
    return join(parts, "\n")


def _tokens_html(v: Dict[str, Any], links: Links) -> Markup:
    """The query's words coloured by their scores for each shown training example, on one
    colour scale for the query (legend), beside the example's text."""
    tokens = v["tokens"]
    if tokens is None:
        return join([])
    title = render("<h3>Per-token scores</h3>")
    if "error" in tokens:
        return join([title, error_box(tokens["error"])])
    if not tokens["tokens"]:
        return join([title, render('<p class="muted">none for this query</p>')])
    entries = v["helpful"] + v["harmful"]
    words = [group_words(tokens["tokens"], tokens["rows"].get(json.dumps(e["id"]), []),
                         tokens.get("completion")) for e in entries]
    scale = max((abs(w["score"]) for row in words for w in row), default=0.0)
    rows = [render('<tr><td class="id">$id</td><td class="num">$score</td>'
                   '<td class="heat">$words</td><td><div class="train-text">$content</div></td>'
                   '</tr>', id=id_link(links, v["key"], e["id"]), score=f"{e['score']:.4g}",
                   words=heat_words(row, scale), content=content_html(e["content"]))
            for e, row in zip(entries, words)]
    prompt = (" Prompt words are italic and underlined (dotted); only the completion is in the "
              "query's loss.") if tokens.get("completion") else ""
    return render('<div class="token-heat">$title<p class="muted">The query\'s words coloured '
                  'by their score for each '
                  'training example: blue helps, red hurts, one scale for the whole query (a '
                  'word\'s score is the sum of its tokens\'; hover for the tokens).$prompt</p>'
                  '$legend<table class="grid tokens"><thead><tr><th>training id</th>'
                  '<th>score</th><th>query words</th><th>training example</th></tr></thead>'
                  '<tbody>$rows</tbody></table></div>', title=title, prompt=prompt,
                  legend=plots.heat_legend(scale), rows=join(rows))


def heat_words(words: List[Dict[str, Any]], scale: float) -> Markup:
    """Words as coloured spans; the title holds the word's score and its tokens' scores."""
    spans = []
    for w in words:
        detail = " + ".join(f"{t!r} {_num(x)}" for t, x in w["tokens"])
        spans.append(render('<span class="$cls" style="background:$color" title="$title">$t'
                            '</span>', cls="tok" if w["completion"] else "tok prompt",
                            color=plots.heat_color(w["score"], scale), t=w["text"],
                            title=f"{w['score']:.4g}" + (f" = {detail}" if len(w["tokens"]) > 1
                                                         else "")))
    return join(spans)


def meta_html(meta: Dict[str, Any]) -> Markup:
    """A score file's meta in one line per key, long values summarised ("damping: 16 values,
    0.0012 to 0.045"); everything in full under <details>."""
    items = join(render('<li><b>$k</b>: $v</li>', k=k, v=summarise(v)) for k, v in meta.items())
    return render('<ul class="meta" id="score-meta">$items</ul><details class="meta-details">'
                  '<summary>all metadata</summary><pre>$full</pre></details>', items=items,
                  full=json.dumps(meta, indent=1, default=str))


def summarise(value: Any) -> str:
    """A value in a few words: numbers to 4 digits, many numbers as their count and range,
    other collections by their short parts and sizes."""
    values = list(value.values()) if isinstance(value, dict) else value
    if isinstance(values, list) and values and all(_number(x) is not None for x in values):
        if len(values) > 3 or not isinstance(value, dict):
            numbers = [float(x) for x in values]
            if len(set(numbers)) == 1:
                return f"{len(numbers)} values, all {numbers[0]:.3g}"
            return f"{len(numbers)} values, {min(numbers):.3g} to {max(numbers):.3g}"
    if isinstance(value, dict):
        shown = [f"{k} {summarise(v)}" if not isinstance(v, (dict, list)) else
                 f"{k}: {len(v)} entries" for k, v in list(value.items())[:6]]
        return ", ".join(shown) + (f", ... ({len(value)} entries)" if len(value) > 6 else "")
    if isinstance(value, list):
        return f"{len(value)} items"
    number = _number(value)
    if number is not None and not isinstance(value, int):
        return f"{number:.4g}"
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def content_html(content: Dict[str, Any]) -> Markup:
    if content.get("missing"):
        return render('<span class="missing">no stored content for this id '
                      '(run.describe(ids, texts=..., images=..., labels=...))</span>')
    parts = []
    if "image" in content:
        parts.append(render('<img class="example" alt="example image" src="$src">',
                            src=url(content["image"])))
    if "label" in content:
        parts.append(render('<span class="label-tag">$l</span>', l=content["label"]))
    if "text" in content:
        parts.append(render('<span class="text">$t</span>', t=content["text"]))
    return join(parts)


def id_text(data_id) -> str:
    return data_id if isinstance(data_id, str) else json.dumps(data_id)


def _number(value) -> Optional[float]:
    """A finite number read from a file, or None (absent, null, or not a number at all)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _num(value) -> str:
    """A number as 4 significant digits; '-' for None; anything else as it is (escaped later)."""
    if value is None:
        return "-"
    number = _number(value)
    return f"{number:.4g}" if number is not None else str(value)


# --------------------------------------------------------------------------- example
NORM_NOTES = {
    "max": "normalised: each score divided by its query's largest |score| over all training "
           "examples (1 = this example is the query's most helpful, -1 its most harmful), so "
           "queries with large and small gradients compare",
    "raw": "raw scores as stored (their size differs from query to query)",
}


def example_page(data: Dict[str, Any], links: Links) -> Markup:
    key, norm = data["key"], data["norm"]
    toggle = join([render("<b>$n</b>", n=n) if n == norm else
                   render('<a href="$h">$n</a>', h=links.example(key, data["id"], n), n=n)
                   for n in NORM_NOTES], " | ")
    parts = [_crumbs(links, key),
             render('<h1>Training example <span class="example-id">$id</span></h1>',
                    id=id_text(data["id"])),
             render('<div class="query-content">$c</div>', c=content_html(data["content"])),
             render('<p id="norm-note">Scores: $note (norm=$norm). View: $toggle</p>'
                    '<p class="muted">$sign</p>', note=NORM_NOTES[norm], norm=norm,
                    toggle=toggle, sign=SIGN_NOTE)]
    parts += [error_box(p) for p in data["problems"]]
    words = {id(e): _example_words(e) for e in data["helps"] + data["hurts"]}
    scale = max((abs(w["score"]) for row in words.values() for w in row or []), default=0.0)
    with_words = any(words.values())
    if with_words:
        parts.append(render('<p class="muted">Queries with per-token scores show their words '
                            'coloured by this example\'s score for each (scaled like the score '
                            'column, one scale for the page):</p>$legend',
                            legend=plots.heat_legend(scale)))
    head = render("<th>#</th><th>query</th><th>query content</th><th>score file</th>"
                  "<th>score ($norm)</th><th>raw score</th>$words", norm=norm,
                  words=render("<th>query words</th>") if with_words else "")
    for title, entries, css in (("Queries it helps most", data["helps"], "helps"),
                                ("Queries it hurts most", data["hurts"], "hurts")):
        rows = join(render(
            '<tr><td>$rank</td><td class="id"><a href="$href">$qid</a></td><td>$label</td>'
            '<td>$file</td><td class="score num">$score</td><td class="num">$raw</td>$words</tr>',
            rank=n + 1, href=links.scores(key, e["file"], e["query"]), qid=id_text(e["query_id"]),
            label=e["query_label"] or "", file=e["file"], score=f"{e['score']:.4g}",
            raw=f"{e['raw']:.4g}", words=render('<td class="heat">$w</td>', w=heat_words(
                words[id(e)], scale) if words[id(e)] else "") if with_words else "")
            for n, e in enumerate(entries))
        body = render('<table class="grid $css"><thead><tr>$head</tr></thead><tbody>$rows'
                      '</tbody></table>', css=css, head=head, rows=rows) if entries else \
            render('<p class="muted">none</p>')
        parts.append(render('<div class="topk"><h3>$t</h3>$b</div>', t=title, b=body))
    files = join(render('<li><a href="$h">$f</a> <span class="muted">$n queries; $s</span></li>',
                        h=links.scores(key, f["file"]), f=f["file"], n=f["queries"],
                        s="scores this example" if f["scored"] else "does not score it")
                 for f in data["files"])
    parts.append(render("<h2>Score files</h2>$l", l=render("<ul>$i</ul>", i=files) if files
                        else render('<p class="muted">none in this project</p>')))
    parts.append(_train_tokens_html(data, links))
    return join(parts, "\n")


def _train_tokens_html(data: Dict[str, Any], links: Links) -> Markup:
    """This example's own words coloured by their share of its score for each query whose
    training-side token scores a score file holds (logix.text.train_token_scores)."""
    pairs = data.get("train_tokens") or []
    title = render("<h2>This example's own tokens</h2>")
    if not pairs:
        return join([title, render(
            '<p id="train-tokens" class="muted">Not available: no score file holds this '
            'example\'s own per-token scores. Compute them for a query with '
            'logix.text.train_token_scores and save them with the scores '
            '(logix.text.attach_train_tokens, then save_scores).</p>')])
    words = [group_words(p["tokens"], p["values"], p["completion"]) for p in pairs]
    scale = max((abs(w["score"]) for row in words for w in row), default=0.0)
    rows = join(render('<tr><td class="id"><a href="$href">$qid</a></td><td>$file</td>'
                       '<td class="num">$score</td><td class="heat">$words</td></tr>',
                       href=links.scores(data["key"], p["file"], p["query"]),
                       qid=id_text(p["query_id"]), file=p["file"], score=f"{p['score']:.4g}",
                       words=heat_words(row, scale))
                for p, row in zip(pairs, words))
    return render('$title<div id="train-tokens" class="token-heat"><p class="muted">This '
                  'example\'s words coloured by their share of its score for each query (raw '
                  'scores, one scale for the page; a word\'s score is the sum of its tokens\', '
                  'and the tokens sum to the score). Words outside its training loss are italic '
                  'and underlined (dotted).</p>$legend<table class="grid tokens"><thead><tr>'
                  '<th>query</th><th>score file</th><th>score</th><th>this example\'s words'
                  '</th></tr></thead><tbody>$rows</tbody></table></div>', title=title,
                  legend=plots.heat_legend(scale), rows=rows)


def _example_words(entry: Dict[str, Any]) -> Optional[List[Dict[str, Any]]]:
    """The entry's query words with this example's token scores, scaled as its score is
    (divided by the query's largest |score| in the normalised view); None without tokens."""
    tokens = entry.get("tokens")
    if not tokens or not tokens.get("tokens") or tokens.get("values") is None:
        return None
    factor = entry["score"] / entry["raw"] if entry["raw"] else 0.0
    values = [None if v is None else v * factor for v in tokens["values"]]
    return group_words(tokens["tokens"], values, tokens.get("completion"))


# --------------------------------------------------------------------------- evaluation
def _k_order(k: str):
    try:
        return (0, int(k), "")
    except (TypeError, ValueError):
        return (1, 0, str(k))


def _flip(r: Dict[str, Any]) -> str:
    base = _number(r.get("base_margin"))
    if base is not None and base <= 0:
        return "wrong to begin with"
    return "no flip" if r.get("k_flip") is None else str(r["k_flip"])


def _pairs(mapping) -> str:
    if not isinstance(mapping, dict):
        return str(mapping)
    ordered = sorted(mapping.items(), key=lambda kv: _k_order(kv[0]))
    return ", ".join(f"k={k}: {_num(v)}" for k, v in ordered)


def evaluation_page(data: Dict[str, Any], links: Links) -> Markup:
    parts = [_crumbs(links, data["key"]), render("<h1>Evaluation: $n</h1>", n=data["name"]),
             render('<p class="muted">$f ($k)</p>', f=data["file"], k=data["kind"])]
    if data["kind"] == "lds":
        per_query = data["per_query"] if isinstance(data["per_query"], list) else []
        numbers = [_number(v) for v in per_query]
        mean = _number(data["lds"])
        parts.append(render(
            '<p class="big">LDS <span id="lds-value">$mean</span> <span class="muted">mean '
            'Spearman correlation over $n of $total queries</span></p>',
            mean="undefined" if data["lds"] is None else
            (f"{mean:.4f}" if mean is not None else str(data["lds"])),
            n=sum(v is not None for v in numbers), total=len(per_query)))
        ordered = sorted((v for v in numbers if v is not None), reverse=True)
        parts.append(render('<div class="plots">$h$l</div>', h=plots.histogram(
            numbers, bins=20, title="LDS per query", xlabel="Spearman rho", mark=mean),
            l=plots.line_plot([("rho", range(1, len(ordered) + 1), ordered)],
                              title="queries sorted by LDS", xlabel="query (sorted)",
                              ylabel="rho", x_integer=True)))
    else:
        results = [r for r in data["results"] if isinstance(r, dict)] \
            if isinstance(data["results"], list) else []
        rows, series = [], []
        for r in results:
            margins = r.get("margins") if isinstance(r.get("margins"), dict) else {}
            rows.append(render(
                '<tr><td>$test</td><td class="num">$base</td><td class="num">$flip</td>'
                '<td>$margins</td><td>$random</td></tr>', test=r.get("test_index"),
                base=_num(r.get("base_margin")), flip=_flip(r), margins=_pairs(r.get("margins")),
                random=_pairs(r.get("random_flip_fraction"))))
            ks = sorted((k for k in margins if _k_order(k)[0] == 0), key=_k_order)
            series.append((f"test {r.get('test_index')}", [0] + [int(k) for k in ks],
                           [_number(r.get("base_margin"))] + [_number(margins[k]) for k in ks]))
        flipped = sum(r.get("k_flip") is not None for r in results)
        parts.append(render(
            '<p class="big">$flipped of $n predictions flipped</p><table id="brittleness" '
            'class="grid"><thead><tr><th>test</th><th>base margin</th><th>k to flip</th>'
            '<th>margin after removing top-k</th><th>random removal: fraction flipped</th></tr>'
            '</thead><tbody>$rows</tbody></table>', flipped=flipped, n=len(results),
            rows=join(rows)))
        parts.append(render('<div class="plots">$p</div>', p=plots.line_plot(
            series, title="margin after removing the k most helpful", xlabel="k",
            ylabel="margin", x_integer=True)))
    return join(parts, "\n")

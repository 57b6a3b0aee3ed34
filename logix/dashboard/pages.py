"""HTML of every dashboard page, built from the JSON of data.py. The live server and the static
report render the same markup; only links differ (URLs there, #anchors in the report)."""

from __future__ import annotations

import datetime
import json
import re
import time
from html import escape
from importlib import resources
from string import Template
from typing import Any, Dict, List, Optional
from urllib.parse import quote, urlencode

from logix.dashboard import plots

SIGN_NOTE = ("Positive score: training on the example lowers the query's loss (helpful); "
             "negative: it raises it (harmful).")


class Links:
    """Where a page links to: server URLs, or anchors inside one report file."""

    def __init__(self, report: bool = False) -> None:
        self.report = report

    def projects(self) -> str:
        return "#projects" if self.report else "/"

    def project(self, key: str) -> str:
        return f"#{anchor('project', key)}" if self.report else f"/project/{quote(key)}"

    def scores(self, key: str, file: str, query: Optional[int] = None,
               group: Optional[str] = None) -> str:
        if self.report:
            return f"#{anchor('scores', key, file)}"
        params = {k: v for k, v in (("query", query), ("group", group)) if v is not None}
        return f"/scores/{quote(key)}/{quote(file)}" + (f"?{urlencode(params)}" if params else "")

    def evaluation(self, key: str, file: str) -> str:
        return f"#{anchor('evaluation', key, file)}" if self.report else \
            f"/evaluation/{quote(key)}/{quote(file)}"


def anchor(*parts: str) -> str:
    return "-".join(re.sub(r"[^A-Za-z0-9_]+", "_", p) for p in parts)


def layout(title: str, body: str, report: bool = False) -> str:
    """A whole HTML document; style and script are inlined (no network needed to open it)."""
    files = resources.files("logix.dashboard")
    page = Template((files / "templates" / "page.html").read_text(encoding="utf-8"))
    return page.substitute(title=escape(title), body=body, mode="report" if report else "live",
                           style=(files / "static" / "style.css").read_text(encoding="utf-8"),
                           script=(files / "static" / "app.js").read_text(encoding="utf-8"))


def error_box(message: str) -> str:
    return f'<div class="error" role="alert">{escape(message)}</div>'


# --------------------------------------------------------------------------- projects
def projects_page(data: Dict[str, Any], links: Links) -> str:
    parts = ['<h1>LogIX projects</h1>',
             f'<p class="muted">Roots: {escape(", ".join(data["roots"]))}</p>']
    parts += [error_box(p) for p in data["problems"]]
    head = ("project", "state", "rows", "width", "modules", "shards", "checkpoints", "disk",
            "last write")
    rows = []
    for row in data["projects"]:
        name = f'<a href="{links.project(row["key"])}">{escape(row["key"])}</a>'
        if "error" in row:
            cells = (f'<td>{name}</td><td colspan="{len(head) - 1}" class="error-cell">'
                     f'{escape(row["error"])}</td>')
        else:
            cells = f"<td>{name}</td>" + "".join(
                f'<td data-field="{f}" class="num">{escape(_cell(f, row))}</td>'
                for f in head[1:])
        rows.append(f'<tr data-key="{escape(row["key"])}">{cells}</tr>')
    if not rows:
        rows.append(f'<tr><td colspan="{len(head)}" class="muted">no projects found</td></tr>')
    parts.append(f'<table id="projects" class="grid"><thead><tr>'
                 f'{"".join(f"<th>{h}</th>" for h in head)}</tr></thead>'
                 f'<tbody>{"".join(rows)}</tbody></table>')
    if not links.report:
        parts.append('<p class="muted" id="live-note">Live: this table refreshes every 2 s.</p>')
    return "\n".join(parts)


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
def project_page(data: Dict[str, Any], links: Links) -> str:
    key = data["key"]
    parts = [f'<p class="crumbs"><a href="{links.projects()}">projects</a> /</p>',
             f'<h1>{escape(key)}</h1>']
    if "error" in data:
        return "\n".join(parts + [error_box(data["error"]), _file_lists(data, links)])
    s = data["summary"]
    facts = [("folder", s["path"]), ("dtype", s["dtype"]), ("rows", s["rows"]),
             ("row width", s["row_width"]), ("shards", s["shards"]["count"]),
             ("shard bytes", human_bytes(s["shards"]["bytes"])),
             ("disk", human_bytes(data["row"]["disk_bytes"])),
             ("state", data["row"]["state"]), ("last write", when(data["row"]["last_write"])),
             ("described examples", data["content"]["described"])]
    parts.append('<table class="facts">' + "".join(
        f"<tr><th>{escape(k)}</th><td>{escape(str(v))}</td></tr>" for k, v in facts) + "</table>")
    parts += [error_box(e) for e in data["content"]["errors"]]
    parts.append(_verify_html(data["verify"]))
    parts.append(_modules_html(s))
    parts.append(_projection_html(s))
    parts.append('<h2>Curvature spectra</h2>'
                 '<p class="muted">Eigenvalues of each statistic (sum / count), largest first, '
                 'log scale.</p>')
    spectra = data["spectra"]
    if "error" in spectra:
        parts.append(error_box(spectra["error"]))
    else:
        figures = []
        for module, kinds in spectra["modules"].items():
            series = [(kind, range(1, len(v["eigenvalues"]) + 1), v["eigenvalues"])
                      for kind, v in kinds.items() if "eigenvalues" in v]
            figures.append(plots.line_plot(series, title=f"module {module}", xlabel="index",
                                           ylabel="eigenvalue", log_y=True))
        parts.append(f'<div class="plots" id="spectra">{"".join(figures)}</div>'
                     if figures else '<p class="muted">no statistics collected</p>')
    growth = data["growth"]
    parts.append('<h2>Log growth</h2><div class="plots">' + plots.line_plot(
        [("rows", growth["shard"], growth["rows"])], title="rows after each shard",
        xlabel="shard", ylabel="rows", markers=len(growth["rows"]) < 3) + "</div>")
    parts.append(_file_lists(data, links))
    return "\n".join(parts)


def _verify_html(verify: Dict[str, Any]) -> str:
    status = "OK" if verify["ok"] else "FAILED"
    hashed = "" if verify["hashed"] else " (sizes and headers; checksums not checked)"
    items = [f'<li class="err">ERROR {escape(e)}</li>' for e in verify["errors"]]
    items += [f'<li class="warn">WARN {escape(w)}</li>' for w in verify["warnings"]]
    return (f'<h2>Verify</h2><p id="verify-status" class="{status.lower()}">{status}: '
            f'{len(verify["errors"])} errors, {len(verify["warnings"])} warnings{hashed}</p>'
            + (f'<ul class="issues">{"".join(items)}</ul>' if items else ""))


def _modules_html(s: Dict[str, Any]) -> str:
    itemsize = (s["bytes_per_example"] // s["row_width"]) if s["row_width"] and \
        s["bytes_per_example"] else None
    rows = []
    for m in s["modules"]:
        rows.append("<tr>" + "".join(f"<td>{escape(str(v))}</td>" for v in (
            m["name"], m["type"], f"{m['gradient'][0]} x {m['gradient'][1]}"
            + (" (+bias)" if m["bias"] else ""), f"{m['rank'][0]} x {m['rank'][1]}",
            m["offset"], m["width"], human_bytes(m["width"] * itemsize) if itemsize else "-"))
            + "</tr>")
    head = ("name", "type", "gradient (out x in)", "rank (out x in)", "offset", "width",
            "bytes / example")
    return (f'<h2>Modules ({len(s["modules"])})</h2><table id="modules" class="grid"><thead><tr>'
            + "".join(f"<th>{h}</th>" for h in head) + f'</tr></thead><tbody>{"".join(rows)}'
            f'</tbody></table>')


def _projection_html(s: Dict[str, Any]) -> str:
    proj = s["projection"]
    pfile = s["projections_file"]
    ratio = f"{s['compression']:.1f}x fewer numbers than the full gradient" \
        if s["compression"] else "-"
    lines = [f"init <b>{escape(str(proj.get('init', '?')))}</b>, seed "
             f"{escape(str(proj.get('seed', '?')))}; {ratio}"]
    if not pfile["present"]:
        lines.append(error_box(f"{pfile['file']} is missing (finalize() writes it)."))
    elif pfile["error"]:
        lines.append(error_box(f"{pfile['file']} is not readable: {pfile['error']}"))
    else:
        shapes = ", ".join(f"{escape(k)} {v[0]}x{v[1]}" for k, v in pfile["shapes"].items())
        lines.append(f'<p class="muted">matrices: {shapes or "none (identity)"}</p>')
    return "<h2>Projection</h2><p>" + "".join(lines) + "</p>"


def _file_lists(data: Dict[str, Any], links: Links) -> str:
    key = data["key"]
    scores = "".join(f'<li><a class="score-link" href="{links.scores(key, f["file"])}">'
                     f'{escape(f["file"])}</a> <span class="muted">{human_bytes(f["bytes"])}'
                     f'</span></li>' for f in data["score_files"])
    evals = "".join(f'<li><a class="eval-link" href="{links.evaluation(key, f["file"])}">'
                    f'{escape(f["file"])}</a></li>' for f in data["evaluation_files"])
    return ('<h2>Score files</h2>' + (f"<ul>{scores}</ul>" if scores else
                                      '<p class="muted">none (save_scores(path, result) into '
                                      'the project folder)</p>')
            + '<h2>Evaluation results</h2>' + (f"<ul>{evals}</ul>" if evals else
                                               '<p class="muted">none (logix.evaluation.'
                                               'save_results)</p>'))


# --------------------------------------------------------------------------- scores
def scores_page(views: List[Dict[str, Any]], links: Links) -> str:
    """One score file; `views` holds one query's data (server) or several (report)."""
    first = views[0]
    key, file = first["key"], first["file"]
    parts = [f'<p class="crumbs"><a href="{links.projects()}">projects</a> / '
             f'<a href="{links.project(key)}">{escape(key)}</a> /</p>',
             f'<h1>Scores: {escape(file)}</h1>',
             f'<p class="muted">{first["shape"][0]} queries x {first["shape"][1]} training '
             f'examples. {SIGN_NOTE}</p>']
    if first["meta"]:
        parts.append('<p class="muted">' + ", ".join(
            f"{escape(str(k))}: {escape(json.dumps(v))}" for k, v in first["meta"].items())
            + "</p>")
    shown = {v["query"] for v in views}
    options = "".join(
        f'<option value="{q["index"]}"{" selected" if q["index"] == first["query"] else ""}'
        f'{"" if not links.report or q["index"] in shown else " disabled"}>'
        f'{q["index"]}: {escape(_id(q["id"]))}{" - " + escape(q["label"]) if q["label"] else ""}'
        f'</option>' for q in first["queries"])
    target = links.scores(key, file, group=first["group"])
    parts.append(f'<label>Query <select class="query-select" data-target="{escape(target)}">'
                 f'{options}</select></label>')
    if first["groups"]:
        group_links = [f'<a href="{links.scores(key, file, first["query"])}">total</a>'] + [
            f'<a href="{links.scores(key, file, first["query"], g)}">{escape(g)}</a>'
            for g in first["groups"]] if not links.report else []
        parts.append(f'<p>Groups: {escape(", ".join(first["groups"]))}'
                     + (f' &middot; rank by: {" | ".join(group_links)}' if group_links else "")
                     + (f' &middot; ranked by <b>{escape(first["group"])}</b>'
                        if first["group"] else "") + "</p>")
    for view in views:
        hidden = " hidden" if view is not first else ""
        parts.append(f'<div class="query-view" data-query="{view["query"]}"{hidden}>'
                     f'{_query_html(view)}</div>')
    return "\n".join(parts)


def _query_html(v: Dict[str, Any]) -> str:
    parts = [f'<h2>Query {v["query"]}: <span class="query-id">{escape(_id(v["src_id"]))}'
             f'</span></h2>', f'<div class="query-content">{content_html(v["src_content"])}</div>']
    if v["nonfinite"]:
        parts.append(error_box(f'{v["nonfinite"]} non-finite scores of this query are ignored.'))
    for title, entries, css in (("Most helpful", v["helpful"], "helpful"),
                                ("Most harmful", v["harmful"], "harmful")):
        head = "<th>#</th><th>id</th><th>score</th>" + "".join(
            f"<th>group {escape(g)}</th>" for g in v["groups"]) + "<th>content</th>"
        rows = "".join(
            f'<tr><td>{e["rank"]}</td><td class="id">{escape(_id(e["id"]))}</td>'
            f'<td class="score num">{e["score"]:.6g}</td>'
            + "".join(f'<td class="num">{_num(e["groups"].get(g))}</td>' for g in v["groups"])
            + f'<td>{content_html(e["content"])}</td></tr>' for e in entries)
        parts.append(f'<div class="topk"><h3>{title}</h3><table class="grid {css}">'
                     f'<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>')
    parts.append(_tokens_html(v))
    extra = [plots.histogram(v["distribution"], title="all scores of this query",
                             xlabel="score", mark=0.0)]
    if v["group_totals"]:
        totals = v["group_totals"]
        extra.append(plots.bar_plot(list(totals), list(totals.values()),
                                    title="sum of scores per group", ylabel="sum"))
    parts.append(f'<div class="plots">{"".join(extra)}</div>')
    return "\n".join(parts)


def _flip(r: Dict[str, Any]) -> str:
    if r["base_margin"] is not None and r["base_margin"] <= 0:
        return "wrong to begin with"
    return str(r["k_flip"]) if r["k_flip"] is not None else "no flip"


def _tokens_html(v: Dict[str, Any]) -> str:
    tokens = v["tokens"]
    if tokens is None:
        return ""
    if "error" in tokens:
        return "<h3>Per-token scores</h3>" + error_box(tokens["error"])
    if not tokens["tokens"]:
        return '<h3>Per-token scores</h3><p class="muted">none for this query</p>'
    rows = []
    for e in v["helpful"] + v["harmful"]:
        values = tokens["rows"].get(json.dumps(e["id"]), [])
        scale = max((abs(x) for x in values if x is not None), default=0.0)
        spans = "".join(
            f'<span class="tok" style="background:{plots.heat_color(x or 0.0, scale)}" '
            f'title="{_num(x)}">{escape(t)}</span>' for t, x in zip(tokens["tokens"], values))
        rows.append(f'<tr><td class="id">{escape(_id(e["id"]))}</td><td class="num">'
                    f'{e["score"]:.4g}</td><td class="heat">{spans}</td></tr>')
    return ('<h3>Per-token scores</h3><p class="muted">Each query token coloured by its score '
            'for the training example: blue helpful, red harmful (scaled per row).</p>'
            f'<table class="grid tokens"><tbody>{"".join(rows)}</tbody></table>')


def content_html(content: Dict[str, Any]) -> str:
    if content.get("missing"):
        return ('<span class="missing">no stored content for this id '
                '(run.describe(ids, texts=..., images=..., labels=...))</span>')
    parts = []
    if "image" in content:
        parts.append(f'<img class="example" alt="example image" src="{content["image"]}">')
    if "label" in content:
        parts.append(f'<span class="label-tag">{escape(str(content["label"]))}</span>')
    if "text" in content:
        parts.append(f'<span class="text">{escape(content["text"])}</span>')
    return "".join(parts)


def _id(data_id) -> str:
    return data_id if isinstance(data_id, str) else json.dumps(data_id)


def _num(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4g}"


# --------------------------------------------------------------------------- evaluation
def evaluation_page(data: Dict[str, Any], links: Links) -> str:
    key = data["key"]
    parts = [f'<p class="crumbs"><a href="{links.projects()}">projects</a> / '
             f'<a href="{links.project(key)}">{escape(key)}</a> /</p>',
             f'<h1>Evaluation: {escape(data["name"])}</h1>',
             f'<p class="muted">{escape(data["file"])} ({escape(data["kind"])})</p>']
    if data["kind"] == "lds":
        per_query = data["per_query"]
        mean = data["lds"]
        parts.append(f'<p class="big">LDS <span id="lds-value">'
                     f'{"undefined" if mean is None else f"{mean:.4f}"}</span> '
                     f'<span class="muted">mean Spearman correlation over '
                     f'{sum(v is not None for v in per_query)} of {len(per_query)} queries</span>'
                     '</p>')
        ordered = sorted((v for v in per_query if v is not None), reverse=True)
        parts.append('<div class="plots">' + plots.histogram(
            per_query, bins=20, title="LDS per query", xlabel="Spearman rho", mark=mean)
            + plots.line_plot([("rho", range(1, len(ordered) + 1), ordered)],
                              title="queries sorted by LDS", xlabel="query (sorted)",
                              ylabel="rho") + "</div>")
    else:
        rows, series = [], []
        for r in data["results"]:
            ks = sorted(r["margins"], key=int)
            rows.append(f'<tr><td>{r["test_index"]}</td><td class="num">'
                        f'{_num(r["base_margin"])}</td><td class="num">'
                        f'{_flip(r)}</td><td>'
                        + ", ".join(f"k={k}: {_num(r['margins'][k])}" for k in ks)
                        + "</td><td>" + ", ".join(
                            f"k={k}: {_num(f)}" for k, f in sorted(
                                r["random_flip_fraction"].items(), key=lambda kv: int(kv[0])))
                        + "</td></tr>")
            series.append((f"test {r['test_index']}", [0] + [int(k) for k in ks],
                           [r["base_margin"]] + [r["margins"][k] for k in ks]))
        flipped = sum(r["k_flip"] is not None for r in data["results"])
        parts.append(f'<p class="big">{flipped} of {len(data["results"])} predictions flipped'
                     '</p><table id="brittleness" class="grid"><thead><tr><th>test</th>'
                     '<th>base margin</th><th>k to flip</th><th>margin after removing top-k'
                     '</th><th>random removal: fraction flipped</th></tr></thead><tbody>'
                     + "".join(rows) + "</tbody></table>")
        parts.append('<div class="plots">' + plots.line_plot(
            series, title="margin after removing the k most helpful", xlabel="k",
            ylabel="margin") + "</div>")
    return "\n".join(parts)

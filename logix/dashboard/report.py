"""`logix report`: every dashboard page in one self-contained HTML file (inline style, script,
SVG plots and images; nothing fetched when it is opened)."""

from __future__ import annotations

import os
from typing import List

from logix.dashboard import pages
from logix.dashboard.data import Dashboard, DashboardError
from logix.dashboard.markup import Markup, join, render


def build_report(roots: List[str], out: str, max_queries: int = 20, k: int = 10) -> str:
    """Write the report of the projects under `roots` to `out` (atomically); returns `out`.
    Each score file shows its first `max_queries` queries with their top `k`."""
    from logix.storage.format import atomic_write

    dashboard, links = Dashboard(roots), pages.Links(report=True)
    projects = dashboard.projects()
    sections = [_section("projects", pages.projects_page(projects, links))]
    for row in projects["projects"]:
        key = row["key"]
        project = dashboard.project(key)
        sections.append(_section(pages.anchor("project", key), pages.project_page(project, links)))
        for f in project["score_files"]:
            body = _scores(dashboard, links, key, f["file"], max_queries, k)
            sections.append(_section(pages.anchor("scores", key, f["file"]), body))
        for f in project["evaluation_files"]:
            try:
                body = pages.evaluation_page(dashboard.evaluation(key, f["file"]), links)
            except DashboardError as e:
                body = render("<h1>$f</h1>$box", f=f["file"], box=pages.error_box(str(e)))
            sections.append(_section(pages.anchor("evaluation", key, f["file"]), body))
    html = pages.layout("LogIX report", join(sections, "\n"), report=True)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    atomic_write(out, html.encode("utf-8"))
    return out


def _scores(dashboard: Dashboard, links: pages.Links, key: str, file: str, max_queries: int,
            k: int) -> Markup:
    try:
        first = dashboard.scores(key, file, 0, k)
        views = [first] + [dashboard.scores(key, file, q, k)
                           for q in range(1, min(max_queries, first["shape"][0]))]
    except DashboardError as e:
        return render("<h1>Scores: $f</h1>$box", f=file, box=pages.error_box(str(e)))
    return pages.scores_page(views, links)


def _section(anchor: str, body: Markup) -> Markup:
    return render('<section class="report-page" id="$a">$body</section>', a=anchor, body=body)

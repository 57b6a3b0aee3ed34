"""The LogIX dashboard: `logix ui` (a local read-only web server) and `logix report` (the same
views in one self-contained HTML file). See docs/dashboard.md."""

from logix.dashboard.report import build_report
from logix.dashboard.server import make_server, serve

__all__ = ["build_report", "make_server", "serve"]

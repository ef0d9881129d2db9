"""Reports: stages side by side in JSON, Markdown and self-contained HTML, with provenance for every number."""

from edgeslim.report._api import FORMATS, compare_stages, render_table, report

__all__ = ["FORMATS", "compare_stages", "render_table", "report"]

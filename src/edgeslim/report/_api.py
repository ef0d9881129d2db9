"""The ``report`` verb: stages side by side in JSON, Markdown and a self-contained HTML page.

Every number keeps its provenance (measured on runtime R on this host, computed by X, predicted for D).
Changes are relative to the first stage; a figure that got worse is flagged, never hidden. MAC ratios are
reported as "fewer MACs", never as a speedup: only measured latency is a speedup.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from edgeslim.core.errors import ConfigError, near
from edgeslim.core.io import check_output, write_json, write_text
from edgeslim.core.metrics import Metrics

FORMATS = ("json", "md", "html")
HIGHER_IS_BETTER = ("accuracy", "throughput")


def _as_metrics(s: Metrics | dict) -> Metrics:
    return s if isinstance(s, Metrics) else Metrics.from_dict(s)


def fmt(value: float, unit: str) -> str:
    """A figure formatted for people by its unit."""
    if unit == "bytes":
        return f"{value / 1e6:.2f} MB" if value >= 1e6 else f"{value / 1e3:.1f} KB"
    if unit == "fraction":
        return f"{value * 100:.2f}%"
    if unit == "ms":
        return f"{value:.3g} ms"
    if unit == "MACs":
        return f"{value / 1e9:.2f} G" if value >= 1e9 else f"{value / 1e6:.2f} M"
    if unit == "count":
        return f"{value / 1e6:.2f} M" if value >= 1e6 else f"{int(value):,}"
    if unit == "MB":
        return f"{value:.1f} MB"
    return f"{value:.4g} {unit}".strip()


def change(name: str, unit: str, base: float, value: float) -> tuple[str, bool | None]:
    """The change from ``base`` to ``value`` in words, and whether it is worse (None: no change)."""
    if unit == "fraction":
        d = (value - base) * 100
        return f"{d:+.2f} pt", (d < 0 if abs(d) >= 0.005 else None)
    if base <= 0 or value <= 0:
        return "", None
    higher_better = name.startswith(HIGHER_IS_BETTER)
    r = value / base if higher_better else base / value
    if abs(r - 1) < 0.005:
        return "same", None
    if name.startswith("latency"):
        words = ("faster", "slower")
    elif name.startswith("throughput"):
        words = ("more", "less")
    elif name == "macs":
        words = ("fewer MACs", "more MACs")
    elif name == "params":
        words = ("fewer", "more")
    elif name.startswith(("size", "peak_memory")):
        words = ("smaller", "larger")
    else:
        words = ("better", "worse")
    return (f"{r:.2f}x {words[0]}", False) if r > 1 else (f"{1 / r:.2f}x {words[1]}", True)


def compare_stages(stages: list[Metrics]) -> list[dict[str, Any]]:
    """One row per figure name (first-seen order): values per stage and the change vs the first stage."""
    names: list[str] = []
    for s in stages:
        names += [n for n in s.figures if n not in names]
    rows = []
    for n in names:
        cells = []
        base = stages[0].figures.get(n)
        for i, s in enumerate(stages):
            f = s.figures.get(n)
            if f is None:
                cells.append(None)
                continue
            c, worse = change(n, f.unit, base.value, f.value) if (i and base) else ("", None)
            cells.append({"value": f.value, "unit": f.unit, "text": fmt(f.value, f.unit), "change": c, "worse": worse})
        rows.append({"figure": n, "cells": cells})
    return rows


def render_table(stages: list[Metrics | dict]) -> str:
    """The side-by-side table as fixed-width text (for terminals)."""
    stages = [_as_metrics(s) for s in stages]
    rows = compare_stages(stages)
    head = ["figure"] + [s.label for s in stages]
    body = [[r["figure"]] + [("" if c is None else c["text"] + (f" ({c['change']})" if c["change"] else "")
                              + (" !" if c["worse"] else "")) for c in r["cells"]] for r in rows]
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    line = lambda cols: "  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()  # noqa: E731
    out = [line(head), line(["-" * w for w in widths])] + [line(b) for b in body]
    if any(c and c["worse"] for r in rows for c in r["cells"]):
        out.append("! = worse than the first column")
    return "\n".join(out)


def _regressions(stages: list[Metrics], rows: list[dict]) -> list[str]:
    return [f"{stages[i].label}: {r['figure']} {c['text']} ({c['change']} than {stages[0].label})"
            for r in rows for i, c in enumerate(r["cells"]) if c and c["worse"]]


def _markdown(title: str, stages: list[Metrics], rows: list[dict], notes: list[str]) -> str:
    esc = lambda t: str(t).replace("|", "\\|")  # noqa: E731
    md = [f"# {title}", "", "| figure | " + " | ".join(esc(s.label) for s in stages) + " |",
          "|---|" + "---|" * len(stages)]
    for r in rows:
        cells = ["" if c is None else c["text"] + (f" ({c['change']})" if c["change"] else "")
                 + (" **worse**" if c["worse"] else "") for c in r["cells"]]
        md.append(f"| {r['figure']} | " + " | ".join(esc(c) for c in cells) + " |")
    md += ["", "Changes are relative to the first column. MAC counts are computed, not measured: fewer MACs is not "
           "a speedup; only measured latency is."]
    regs = _regressions(stages, rows)
    md += ["", "## Regressions", ""] + ([f"- {x}" for x in regs] or ["- none"])
    if notes:
        md += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    md += ["", "## Where each number comes from", ""]
    for s in stages:
        md.append(f"### {s.label}")
        md += [f"- `{f.name}`: {f.source} — {f.detail}" for f in s.figures.values()]
        md.append("")
    host = stages[0].context.get("host")
    if host:
        md += ["## Host", "", "- " + ", ".join(f"{k}: {v}" for k, v in host.items())]
    return "\n".join(md) + "\n"


CHART_FIGURES = ("accuracy", "size_bytes", "latency_p50_ms@t1b1", "macs")
COLORS = ("#4c78a8", "#f58518", "#54a24b", "#b279a2", "#e45756", "#72b7b2")


def _svg(stages: list[Metrics], rows: list[dict]) -> str:
    """Grouped horizontal bars: each key figure per stage, scaled to the largest value of that figure."""
    by_name = {r["figure"]: r for r in rows}
    picked = [n for n in CHART_FIGURES if n in by_name] or [r["figure"] for r in rows[:4]]
    bar, gap, left, width = 16, 14, 190, 360
    y = 10
    parts = []
    for n in picked:
        cells = by_name[n]["cells"]
        top = max((c["value"] for c in cells if c), default=1) or 1
        parts.append(f'<text x="0" y="{y + 12}" font-weight="bold">{html.escape(n)}</text>')
        y += 18
        for i, c in enumerate(cells):
            if c is None:
                continue
            w = max(1.0, width * c["value"] / top)
            label = html.escape(stages[i].label[:28])
            parts.append(f'<text x="0" y="{y + 12}">{label}</text>'
                         f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar}" fill="{COLORS[i % len(COLORS)]}"/>'
                         f'<text x="{left + w + 6:.1f}" y="{y + 12}">{html.escape(c["text"])}'
                         f'{(" " + html.escape(c["change"])) if c["change"] else ""}</text>')
            y += bar + 4
        y += gap
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 200}" height="{y}" '
            f'font-family="sans-serif" font-size="12">' + "".join(parts) + "</svg>")


def _html(title: str, stages: list[Metrics], rows: list[dict], notes: list[str]) -> str:
    e = html.escape
    th = "".join(f"<th>{e(s.label)}</th>" for s in stages)
    trs = []
    for r in rows:
        tds = "".join(
            "<td></td>" if c is None else
            f'<td class="{"worse" if c["worse"] else ""}">{e(c["text"])}'
            f'{"<br><small>" + e(c["change"]) + "</small>" if c["change"] else ""}</td>'
            for c in r["cells"])
        trs.append(f"<tr><th>{e(r['figure'])}</th>{tds}</tr>")
    regs = _regressions(stages, rows)
    prov = "".join(
        f"<h3>{e(s.label)}</h3><ul>" + "".join(
            f"<li><code>{e(f.name)}</code>: {e(f.source)} — {e(f.detail)}</li>" for f in s.figures.values())
        + "</ul>" for s in stages)
    host = stages[0].context.get("host") or {}
    css = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}table{border-collapse:collapse}"
           "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th:first-child{text-align:left}"
           ".worse{background:#fde0dc}small{color:#555}code{background:#f4f4f4}")
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{css}</style></head><body>"
        f"<h1>{e(title)}</h1><table><tr><th>figure</th>{th}</tr>{''.join(trs)}</table>"
        "<p>Changes are relative to the first column. MAC counts are computed, not measured: fewer MACs is not a "
        "speedup; only measured latency is.</p>"
        f"<h2>Before → after</h2>{_svg(stages, rows)}"
        f"<h2>Regressions</h2><ul>{''.join(f'<li>{e(x)}</li>' for x in regs) or '<li>none</li>'}</ul>"
        + (f"<h2>Notes</h2><ul>{''.join(f'<li>{e(n)}</li>' for n in notes)}</ul>" if notes else "")
        + f"<h2>Where each number comes from</h2>{prov}"
        f"<h2>Host</h2><p>{e(', '.join(f'{k}: {v}' for k, v in host.items()))}</p></body></html>\n"
    )


def report(
    stages: list[Metrics | dict],
    out_dir: str | Path,
    *,
    title: str = "edgeslim report",
    formats: tuple[str, ...] = FORMATS,
    force: bool = False,
    notes: tuple[str, ...] | list[str] = (),
) -> dict[str, Path]:
    """Write the stages side by side as ``report.json``, ``report.md`` and ``report.html`` in ``out_dir``.

    Args:
        stages: :class:`Metrics` (or their dicts) in pipeline order; changes are relative to the first.
        out_dir: output folder (created if needed).
        formats: any of ``json``, ``md``, ``html``.
        force: overwrite existing report files (otherwise refused before anything is written).
        notes: extra lines to include (e.g. what a step did).

    Returns:
        format -> path written.
    """
    if not stages:
        raise ConfigError("report needs at least one stage of Metrics")
    for f in formats:
        if f not in FORMATS:
            raise ConfigError(f"unknown report format {f!r}{near(f, FORMATS)}; valid: {', '.join(FORMATS)}")
    ms = [_as_metrics(s) for s in stages]
    out = Path(out_dir)
    paths = {f: out / f"report.{f}" for f in formats}
    for p in paths.values():
        check_output(p, force=force)
    rows = compare_stages(ms)
    notes = list(notes)
    writers = {
        "json": lambda p: write_json(p, {"title": title, "stages": [s.to_dict() for s in ms], "comparison": rows,
                                         "regressions": _regressions(ms, rows), "notes": notes}, force=force),
        "md": lambda p: write_text(p, _markdown(title, ms, rows, notes), force=force),
        "html": lambda p: write_text(p, _html(title, ms, rows, notes), force=force),
    }
    for f, p in paths.items():
        writers[f](p)
    return paths


__all__ = ["FORMATS", "change", "compare_stages", "fmt", "render_table", "report"]

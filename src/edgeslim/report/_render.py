"""Renderers: fixed-width text, Markdown, and a self-contained HTML page with an inline SVG chart.

The HTML loads nothing: inline CSS, no scripts, no fonts, no external images. All text is escaped.
"""

from __future__ import annotations

import html
import math
from typing import Any

from edgeslim.core.metrics import Metrics
from edgeslim.report._compare import figure_title

LEGEND = (
    "Changes are relative to the first stage; latency and throughput are relative to the FP32 stage on the same "
    'runtime where there is one ("vs" names it). Changes within the measurement\'s noise (two binomial '
    "standard errors for accuracy, 3% for speed) are shown but not marked worse. ~ marks a predicted figure (not measured); † marks a "
    "comparison of numbers from different sources (see where each number comes from). MAC counts are "
    "computed, not measured: fewer MACs is not a speedup; only measured latency is."
)
COLORS = ("#4c78a8", "#f58518", "#54a24b", "#b279a2", "#72b7b2", "#9d755d", "#bab0ac")


def _parts(c: dict[str, Any] | None) -> tuple[str, str]:
    """A cell's value (``~`` when predicted) and its change (``†`` when the sources differ), as text."""
    if c is None:
        return "—", ""
    dagger = "†" if c.get("sources_differ") else ""
    vs = f" vs {c['baseline']}" if c.get("baseline") and c["change"] else ""
    return ("~" if c["source"] == "predicted" else "") + c["text"], c["change"] + vs + dagger


def _title(r: dict[str, Any]) -> str:
    return r.get("title") or figure_title(r["figure"])


def _cell_text(c: dict[str, Any] | None, worse_mark: str) -> str:
    v, chg = _parts(c)
    return v + (f" ({chg})" if chg else "") + (worse_mark if c and c["worse"] else "")


def table_text(stages: list[Metrics], rows: list[dict[str, Any]]) -> str:
    """The side-by-side table as fixed-width text."""
    table = [["figure"] + [s.label for s in stages]] + [
        [_title(r)] + [_cell_text(c, " !") for c in r["cells"]] for r in rows
    ]
    widths = [max(len(x[i]) for x in table) for i in range(len(table[0]))]
    table.insert(1, ["-" * w for w in widths])
    out = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip() for cols in table]
    marks = {"!": "worse than the first stage", "~": "predicted, not measured", "†": "from a different source"}
    used = [f"{k} = {v}" for k, v in marks.items() if any(k in x for b in table[2:] for x in b[1:])]
    return "\n".join(out + (["; ".join(used)] if used else []))


def _flat(v: Any, nested: bool = False) -> str:
    if isinstance(v, dict):
        text = ", ".join(f"{k}={_flat(x, True)}" for k, x in v.items())
        return f"({text})" if nested else text
    return ", ".join(_flat(x, True) for x in v) if isinstance(v, (list, tuple)) else str(v)


def _host_lines(stages: list[Metrics]) -> list[str]:
    """The host(s) in ``context["host"]``, shown once; several hosts are listed with their stages and a warning."""
    seen: dict[str, list[str]] = {}
    for s in stages:
        if s.context.get("host"):
            seen.setdefault(_flat(s.context["host"]), []).append(s.label)
    if len(seen) < 2:
        return list(seen) or ["not recorded"]
    return ["the stages ran on different hosts: comparisons across hosts are not like for like"] + [
        f"{', '.join(labels)}: {h}" for h, labels in seen.items()
    ]


def _context(s: Metrics) -> str:
    return _flat({k: v for k, v in s.context.items() if k != "host"})


def markdown(
    title: str, stages: list[Metrics], rows: list[dict[str, Any]], regs: list[dict[str, Any]], notes: list[str]
) -> str:
    """The report as Markdown: table, regressions, notes, provenance, host."""

    def esc(t: Any) -> str:
        return " ".join(str(t).split()).replace("|", "\\|").replace("<", "\\<")

    md = [
        f"# {esc(title)}",
        "",
        "| figure | " + " | ".join(esc(s.label) for s in stages) + " |",
        "|---|" + "---:|" * len(stages),
    ]
    md += [
        f"| {esc(_title(r))} | " + " | ".join(esc(_cell_text(c, " **worse**")) for c in r["cells"]) + " |" for r in rows
    ]
    md += ["", LEGEND, "", "## Regressions", ""] + ([f"- {esc(x['text'])}" for x in regs] or ["- none"])
    if notes:
        md += ["", "## Notes", ""] + [f"- {esc(n)}" for n in notes]
    md += ["", "## Where each number comes from", ""]
    for s in stages:
        md += [f"### {esc(s.label)}", ""]
        if _context(s):
            md.append(f"- context: {esc(_context(s))}")
        md += [
            f"- {esc(figure_title(f.name))} (`{f.name}`, {esc(f.source)}): {esc(f.detail) or 'no detail recorded'}"
            for f in s.figures.values()
        ]
        md.append("")
    md += ["## Host", ""] + [f"- {esc(x)}" for x in _host_lines(stages)]
    return "\n".join(md) + "\n"


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def chart_figures(rows: list[dict[str, Any]]) -> list[str]:
    """The key figures to chart: accuracy, size, the first p50 latency, MACs (else the first four rows)."""
    names = [r["figure"] for r in rows]
    lat = next((n for n in names if n.startswith("latency_p50")), None)
    return [n for n in ("accuracy", "size_bytes", lat, "macs") if n in names] or names[:4]


def svg(stages: list[Metrics], rows: list[dict[str, Any]]) -> str:
    """Grouped horizontal bars, one group per key figure, each bar relative to the first stage (dashed = 1x)."""
    e, by, groups = html.escape, {r["figure"]: r for r in rows}, []
    for n in chart_figures(rows):
        cells = [c if c and math.isfinite(c["value"]) else None for c in by[n]["cells"]]
        base = cells[0]["value"] if cells[0] else 0.0
        ref = base if base > 0 else max([abs(c["value"]) for c in cells if c] + [0.0]) or 1.0
        groups.append((n, cells, ref, base > 0))
    left, bar_w, bar_h, label_w = 200, 340, 16, 270
    px = bar_w / max([1.0] + [abs(c["value"]) / ref for _, cells, ref, _ in groups for c in cells if c])
    parts, y = [], 4
    for n, cells, ref, relative in groups:
        how = f"relative to {stages[0].label}" if relative else "scaled to the largest value"
        parts.append(
            f'<text x="0" y="{y + 12}" font-weight="bold">{e(figure_title(n))} <tspan font-weight="normal" '
            f'fill="#555">({e(how)})</tspan></text>'
        )
        y0 = y = y + 18
        for i, c in enumerate(cells):
            if c is None:
                continue
            w = max(1.0, px * abs(c["value"]) / ref)
            value = e(_cell_text(c, " worse"))
            color, stroke = ("#c0392b", ' stroke="#c0392b" stroke-width="2"') if c["worse"] else ("#222", "")
            x_text = left + max(w, px if relative else 0) + 6  # past the 1x line
            parts.append(
                f'<text x="0" y="{y + 12}">{e(_short(stages[i].label, 28))}</text><rect x="{left}" '
                f'y="{y}" width="{w:.1f}" height="{bar_h}" fill="{COLORS[i % len(COLORS)]}"{stroke}><title>'
                f'{e(stages[i].label)}: {value}</title></rect><text x="{x_text:.1f}" y="{y + 12}" '
                f'fill="{color}">{value}</text>'
            )
            y += bar_h + 4
        if relative:
            parts.append(
                f'<line x1="{left + px:.1f}" y1="{y0 - 2}" x2="{left + px:.1f}" y2="{y}" '
                'stroke="#333" stroke-dasharray="4 3"/>'
            )
        y += 12
    return (
        f'<svg width="{left + bar_w + label_w}" height="{y}" viewBox="0 0 {left + bar_w + label_w} {y}" '
        'font-family="sans-serif" font-size="12" role="img" aria-label="key figures per stage, relative to '
        'the first stage">' + "".join(parts) + "</svg>"
    )


CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
    "th:first-child{text-align:left}thead th{background:#f2f2f2}td.worse{background:#fde0dc}td.better{background:"
    "#e3f4e1}small{color:#555}code{background:#f4f4f4;padding:0 3px}li.worse{color:#a93226}p.legend{color:#555}"
)


def html_page(
    title: str, stages: list[Metrics], rows: list[dict[str, Any]], regs: list[dict[str, Any]], notes: list[str]
) -> str:
    """The report as one self-contained HTML page."""
    e = html.escape
    head = "".join(f"<th>{e(s.label)}</th>" for s in stages)
    trs = []
    for r in rows:
        tds = []
        for c in r["cells"]:
            (v, chg), cls = _parts(c), {True: "worse", False: "better"}.get(c and c["worse"], "")
            chg += " — worse" if c and c["worse"] else ""
            tds.append(f'<td class="{cls}">{e(v)}' + (f"<br><small>{e(chg)}</small>" if chg else "") + "</td>")
        trs.append(f'<tr><th title="{e(r["figure"])}">{e(_title(r))}</th>{"".join(tds)}</tr>')
    reg = "".join(f'<li class="worse">{e(x["text"])}</li>' for x in regs) or "<li>none</li>"
    prov = []
    for s in stages:
        ctx = f"<p><small>context: {e(_context(s))}</small></p>" if _context(s) else ""
        items = "".join(
            f"<li>{e(figure_title(f.name))} (<code>{e(f.name)}</code>, {e(f.source)}): {e(f.detail or 'no detail recorded')}</li>"
            for f in s.figures.values()
        )
        prov.append(f"<h3>{e(s.label)}</h3>{ctx}<ul>{items}</ul>")
    note_html = f"<h2>Notes</h2><ul>{''.join(f'<li>{e(n)}</li>' for n in notes)}</ul>" if notes else ""
    host = "".join(f"<li>{e(x)}</li>" for x in _host_lines(stages))
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{e(title)}</title>'
        f"<style>{CSS}</style></head><body><h1>{e(title)}</h1>"
        f"<table><thead><tr><th>figure</th>{head}</tr></thead><tbody>{''.join(trs)}</tbody></table>"
        f'<p class="legend">{e(LEGEND)}</p><h2>Key figures</h2>{svg(stages, rows)}'
        f"<h2>Regressions</h2><ul>{reg}</ul>{note_html}"
        f"<h2>Where each number comes from</h2>{''.join(prov)}<h2>Host</h2><ul>{host}</ul></body></html>\n"
    )

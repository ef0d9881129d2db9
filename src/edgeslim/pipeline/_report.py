"""The optimize report: JSON, Markdown and one self-contained HTML page with inline SVG Pareto plots.

The plots show every completed trial (accuracy vs latency, accuracy vs file size) on the search figures, the
Pareto front, the budget's limits as dashed lines, the FP32 baseline and the chosen candidate. Axis titles say
where each figure came from (measured on runtime R on host H, or predicted for device D). The HTML loads
nothing (inline CSS and SVG, no scripts) and escapes all text.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from edgeslim.core.io import write_json, write_text
from edgeslim.report._render import CSS

GREEN, GREY, BLUE, RED = "#54a24b", "#9d9d9d", "#4c78a8", "#c0392b"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points ``(accuracy, cost)`` no other point beats (higher accuracy, lower cost)."""
    return [
        i
        for i, (a, c) in enumerate(points)
        if not any(a2 >= a and c2 <= c and (a2 > a or c2 < c) for j, (a2, c2) in enumerate(points) if j != i)
    ]


def _rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in doc["trials"]["rows"] if r["state"] == "complete" and r.get("figures")]


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    span = hi - lo
    step = 10 ** math.floor(math.log10(span / n)) if span > 0 else 1.0
    for m in (1, 2, 2.5, 5, 10):
        if span / (step * m) <= n:
            step *= m
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _num(v: float) -> str:
    return f"{v:.4g}"


def scatter_svg(doc: dict[str, Any], x_key: str, x_title: str, x_limit: float | None, x_limit_label: str) -> str:
    """Accuracy (y) against ``x_key`` (x) for every completed trial, front, budget lines, baseline and choice."""
    e = html.escape
    rows = _rows(doc)
    base = doc["baseline"]["figures"]
    budget = doc["budget"]
    floor = base["accuracy"] - budget["max_accuracy_drop"] if budget.get("max_accuracy_drop") is not None else None
    pts = [(r["figures"][x_key], r["figures"]["accuracy"]) for r in rows]
    xs = [p[0] for p in pts] + [base[x_key]] + ([x_limit] if x_limit else [])
    ys = [p[1] for p in pts] + [base["accuracy"]] + ([floor] if floor is not None else [])
    x0, x1 = 0.0, max(xs) * 1.08
    y0, y1 = min(ys), max(ys)
    pad = max((y1 - y0) * 0.1, 0.002)
    y0, y1 = max(0.0, y0 - pad), min(1.0, y1 + pad) if y1 + pad > y0 else y0 + 0.01
    w, h, left, right, top, bottom = 760, 430, 70, 170, 20, 58
    pw, ph = w - left - right, h - top - bottom

    def px(v: float) -> float:
        return left + (v - x0) / (x1 - x0) * pw

    def py(v: float) -> float:
        return top + (1 - (v - y0) / (y1 - y0)) * ph

    out = [f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#999"/>']
    for t in _ticks(x0, x1):
        out.append(
            f'<line x1="{px(t):.1f}" y1="{top + ph}" x2="{px(t):.1f}" y2="{top + ph + 5}" stroke="#555"/>'
            f'<text x="{px(t):.1f}" y="{top + ph + 18}" text-anchor="middle">{_num(t)}</text>'
        )
    for t in _ticks(y0, y1):
        out.append(
            f'<line x1="{left - 5}" y1="{py(t):.1f}" x2="{left}" y2="{py(t):.1f}" stroke="#555"/>'
            f'<text x="{left - 8}" y="{py(t) + 4:.1f}" text-anchor="end">{100 * t:.4g}</text>'
        )
    out.append(f'<text x="{left + pw / 2}" y="{h - 22}" text-anchor="middle">{e(x_title)}</text>')
    out.append(
        f'<text x="14" y="{top + ph / 2}" text-anchor="middle" transform="rotate(-90 14 {top + ph / 2})">'
        f"{e(doc.get('metric', 'top-1 accuracy'))}, % (search subset, measured)</text>"
    )
    if floor is not None and y0 <= floor <= y1:
        out.append(
            f'<line x1="{left}" y1="{py(floor):.1f}" x2="{left + pw}" y2="{py(floor):.1f}" stroke="{RED}" '
            f'stroke-dasharray="6 4"/><text x="{left + 6}" y="{py(floor) - 5:.1f}" fill="{RED}">'
            f"{e(doc.get('metric', 'accuracy'))} floor ({100 * budget['max_accuracy_drop']:.2g} pt drop)</text>"
        )
    if x_limit is not None and x0 <= x_limit <= x1:
        out.append(
            f'<line x1="{px(x_limit):.1f}" y1="{top}" x2="{px(x_limit):.1f}" y2="{top + ph}" stroke="{RED}" '
            f'stroke-dasharray="6 4"/><text x="{px(x_limit) + 4:.1f}" y="{top + 12}" fill="{RED}">'
            f"{e(x_limit_label)}</text>"
        )
    front = sorted((pts[i] for i in pareto_front([(a, c) for c, a in pts])), key=lambda p: p[0])
    if len(front) > 1:
        out.append(
            f'<polyline fill="none" stroke="{BLUE}" stroke-width="1.5" points="'
            + " ".join(f"{px(c):.1f},{py(a):.1f}" for c, a in front)
            + '"/>'
        )
    chosen = doc["chosen"]["trial"]
    for r, (c, a) in zip(rows, pts, strict=True):
        ok = not r["violations"]
        tip = (
            f"trial {r['number']}: {r['description']}; {doc.get('metric', 'accuracy')} {100 * a:.2f}%, {x_key} {_num(c)}"
            + ("; meets the budget" if ok else "; " + "; ".join(v["text"] for v in r["violations"]))
        )
        out.append(
            f'<circle cx="{px(c):.1f}" cy="{py(a):.1f}" r="5" fill="{GREEN if ok else GREY}" '
            f'fill-opacity="0.85" stroke="#333" stroke-width="0.5"><title>{e(tip)}</title></circle>'
        )
        if r["number"] == chosen:
            out.append(
                f'<circle class="chosen" cx="{px(c):.1f}" cy="{py(a):.1f}" r="10" fill="none" stroke="{RED}" '
                f'stroke-width="2.5"><title>{e("chosen: " + tip)}</title></circle><text x="{px(c) + 12:.1f}" '
                f'y="{py(a) - 8:.1f}" fill="{RED}" font-weight="bold">chosen #{r["number"]}</text>'
            )
    bx, by = px(base[x_key]), py(base["accuracy"])
    out.append(
        f'<rect x="{bx - 5:.1f}" y="{by - 5:.1f}" width="10" height="10" fill="#222"><title>FP32 baseline: '
        f"accuracy {100 * base['accuracy']:.2f}%, {x_key} {_num(base[x_key])}</title></rect>"
        f'<text x="{bx - 8:.1f}" y="{by - 9:.1f}" text-anchor="end">FP32</text>'
    )
    ly = top + 40
    for color, label, shape in (
        (GREEN, "meets the budget", "c"),
        (GREY, "misses the budget", "c"),
        ("#222", "FP32 input model", "s"),
        (BLUE, "Pareto front", "l"),
        (RED, "chosen / budget limit", "r"),
    ):
        mark = {
            "c": f'<circle cx="{left + pw + 14}" cy="{ly}" r="5" fill="{color}"/>',
            "s": f'<rect x="{left + pw + 9}" y="{ly - 5}" width="10" height="10" fill="{color}"/>',
            "l": f'<line x1="{left + pw + 6}" y1="{ly}" x2="{left + pw + 22}" y2="{ly}" stroke="{color}" '
            'stroke-width="2"/>',
            "r": f'<circle cx="{left + pw + 14}" cy="{ly}" r="7" fill="none" stroke="{color}" stroke-width="2"/>',
        }
        out.append(mark[shape] + f'<text x="{left + pw + 26}" y="{ly + 4}">{e(label)}</text>')
        ly += 20
    title = f"accuracy vs {x_key}: {len(rows)} completed trials"
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="pareto" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
        f'font-family="sans-serif" font-size="12" role="img" aria-label="{e(title)}"><title>{e(title)}</title>'
        + "".join(out)
        + "</svg>"
    )


def _latency_axis(doc: dict[str, Any]) -> tuple[str, float | None, str]:
    base = doc["baseline"]["figures"]
    b = doc["budget"]
    prov = doc["baseline"]["provenance"]["latency_ms"].split(" (")[0].split(", host")[0]
    title = f"latency, ms, batch 1: {prov}"
    if b.get("max_latency_ms") is not None:
        return title, float(b["max_latency_ms"]), f"limit {b['max_latency_ms']:g} ms"
    if b.get("min_speedup") is not None:
        return title, base["latency_ms"] / b["min_speedup"], f"{b['min_speedup']:g}x speedup"
    return title, None, ""


def _fig(f: dict[str, Any] | None, k: str) -> str:
    if not f or f.get(k) is None:
        return "—"
    v = f[k]
    return f"{100 * v:.2f}%" if k == "accuracy" else f"{v:.4g}"


def _deploy(doc: dict[str, Any]) -> str:
    """The chosen candidate's runtime and threads (the budget's unless the space searched them)."""
    d = doc["chosen"].get("deployment") or {"runtime": doc["runtime"], "threads": doc["threads"]}
    return f"runtime {d['runtime']}, {d['threads']} thread(s)"


def _trial_cells(r: dict[str, Any], base: dict[str, Any]) -> list[str]:
    f = r.get("figures")
    drop = f"{100 * (f['accuracy'] - base['accuracy']):+.2f}" if f else "—"
    speed = f"{base['latency_ms'] / f['latency_ms']:.2f}x" if f else "—"
    if r.get("duplicate_of") is not None:
        status = f"duplicate of #{r['duplicate_of']} (skipped)"
    elif r.get("error"):
        status = "failed: " + r["error"]
    elif r.get("gated"):
        status = "gated: " + r["gated"]
    elif r.get("deadline"):
        status = "stopped by max_minutes: " + r["deadline"]
    elif r.get("worker_lost"):
        status = f"its worker ({r.get('worker') or '?'}) stopped answering; re-queued"
    elif r["state"] != "complete":
        status = r["state"]
    else:
        status = "meets budget" if not r["violations"] else "; ".join(v["text"] for v in r["violations"])
    if r.get("stage"):  # the multi-fidelity ladder: probe (no recovery), sweep (smallest), promoted (largest)
        status += f" [{r['stage']}]"
    if r.get("requeued"):
        status += " [re-queued after a stopped run]"
    if r.get("retry_of") is not None:
        status += f" [retry of #{r['retry_of']}]"
    return [
        str(r["number"]),
        r["description"] or "—",
        _fig(f, "accuracy"),
        drop,
        _fig(f, "latency_ms"),
        speed,
        _fig(f, "size_mb"),
        _fig(f, "size_zipped_mb"),
        status,
        f"{r['seconds']:.1f}" if r.get("seconds") is not None else "—",
        ", ".join(r.get("cached_steps") or []) or "—",
    ]


TRIAL_HEAD = [
    "#",
    "candidate",
    "accuracy",
    "Δ pt",
    "latency ms",
    "speedup",
    "size MB",
    "zipped MB",
    "budget",
    "s",
    "cached",
]


def _times(ratio: float, better: str, worse: str) -> str:
    return f"{ratio:.2f}x {better}" if ratio >= 1 else f"{1 / ratio:.2f}x {worse}"


def _final_table(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    base, fin = doc["baseline_final"], doc["chosen"]["final"]
    head = ["figure", "FP32 input model", f"chosen (trial {doc['chosen']['trial']})", "change"]
    rows = [
        [
            f"{doc.get('metric', 'top-1 accuracy')} ({doc['final_data']})",
            _fig(base, "accuracy"),
            _fig(fin, "accuracy"),
            f"{100 * (fin['accuracy'] - base['accuracy']):+.2f} pt",
        ],
        [
            f"latency ms ({doc['latency_source']})",
            _fig(base, "latency_ms"),
            _fig(fin, "latency_ms"),
            _times(base["latency_ms"] / fin["latency_ms"], "faster", "slower"),
        ],
        [
            "ONNX file size MB",
            _fig(base, "size_mb"),
            _fig(fin, "size_mb"),
            _times(base["size_mb"] / fin["size_mb"], "smaller", "larger"),
        ],
    ]
    if "size_zipped_mb" in fin and "size_zipped_mb" in base:
        rows.append(
            [
                "ONNX file size zipped MB (zlib level 9)",
                _fig(base, "size_zipped_mb"),
                _fig(fin, "size_zipped_mb"),
                _times(base["size_zipped_mb"] / fin["size_zipped_mb"], "smaller", "larger"),
            ]
        )
    for k, label in (("peak_memory_mb", "peak memory MB"), ("energy_mj", "energy per inference mJ (estimated)")):
        if k in fin:
            rows.append([label, _fig(base, k), _fig(fin, k), f"{fin[k] / base[k]:.2f}x" if base.get(k) else "—"])
    return head, rows


def _step_rows(doc: dict[str, Any]) -> list[list[str]]:
    out = []
    for name, s in doc["chosen"]["steps"].items():
        cost = s.get("seconds", s.get("quantize_seconds", 0) + s.get("export_seconds", 0))
        bought = []
        if "macs_after" in s:
            bought.append(f"MACs {s['macs_before']:,} -> {s['macs_after']:,}")
        if name in ("factorize", "cluster") and "summary" in s:
            bought.append(s["summary"])
        if "torch_accuracy_search" in s:
            metric = doc.get("metric", "accuracy")
            bought.append(f"torch {metric} on the search subset after it {100 * s['torch_accuracy_search']:.2f}%")
        if "quantize_summary" in s:
            bought.append(s["quantize_summary"])
        if "validation" in s:
            v = s["validation"]
            agree = f", top-1 agreement {v['top1_agreement']:.3f}" if v.get("top1_agreement") is not None else ""
            sqnr = f", SQNR {v['sqnr_db']:.1f} dB" if v.get("sqnr_db") is not None else ""
            bought.append(f"ONNX vs torch: cosine {v['cosine']:.5f}{sqnr}{agree} on {v['samples']} samples")
        out.append([name, f"{cost:.1f} s" + (" (cached)" if s.get("cached") else ""), "; ".join(bought)])
    return out


def markdown(doc: dict[str, Any]) -> str:
    def esc(t: Any) -> str:
        return " ".join(str(t).split()).replace("|", "\\|").replace("<", "\\<")

    def table(head: list[str], rows: list[list[str]]) -> list[str]:
        return ["| " + " | ".join(esc(h) for h in head) + " |", "|" + "---|" * len(head)] + [
            "| " + " | ".join(esc(c) for c in r) + " |" for r in rows
        ]

    c = doc["chosen"]
    verdict = (
        "**Meets the budget.**"
        if c["meets_budget"]
        else "**Nothing met the budget**; the closest candidate is saved: "
        + "; ".join(v["text"] for v in c["violations"])
    )
    md = (
        [
            f"# {esc(doc['title'])}",
            "",
            verdict,
            "",
            f"Chosen: trial {c['trial']}, {esc(c['description'])} -> `{esc(c['artifact'])}` (recipe `{esc(c['recipe'])}`)",
            "",
            "## Budget",
            "",
        ]
        + [f"- {esc(x)}" for x in doc["budget_lines"]]
        + [
            f"- target: {esc(doc['target'])} ({esc(doc['latency_source'])}), runtime {esc(doc['runtime'])}, "
            f"{doc['threads']} thread(s)",
            f"- chosen deployment: {esc(_deploy(doc))}",
            "",
            "## Final figures (re-measured after the search)",
            "",
        ]
    )
    md += table(*_final_table(doc))
    md += ["", "## What each step cost and bought", ""] + table(["step", "cost", "bought"], _step_rows(doc))
    md += [
        "",
        "## Trials",
        "",
        f"Search figures: {esc(doc.get('metric', 'accuracy'))} on {esc(doc['search_data'])}; latency "
        f"{esc(doc['latency_source'])}. Stopped: {esc(doc['study']['stopped'])}.",
        "",
    ]
    base = doc["baseline"]["figures"]
    md += table(TRIAL_HEAD, [_trial_cells(r, base) for r in doc["trials"]["rows"]])
    if doc["notes"]:
        md += ["", "## Notes", ""] + [f"- {esc(n)}" for n in doc["notes"]]
    md += ["", "## Where the numbers come from", ""]
    for k, v in doc["chosen"]["final_provenance"].items():
        md.append(f"- chosen `{k}`: {esc(v)}")
    md += [
        "",
        "## Host",
        "",
        f"- {esc(', '.join(f'{k}={v}' for k, v in doc['host'].items()))}",
        f"- study {esc(doc['study']['name'])} in {esc(doc['study']['storage'])}",
    ]
    return "\n".join(md) + "\n"


def html_page(doc: dict[str, Any]) -> str:
    e = html.escape

    def table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
        return (
            f'<table class="{cls}"><thead><tr>'
            + "".join(f"<th>{e(h)}</th>" for h in head)
            + "</tr></thead><tbody>"
            + "".join("<tr>" + "".join(f"<td>{e(x)}</td>" for x in r) + "</tr>" for r in rows)
            + "</tbody></table>"
        )

    c = doc["chosen"]
    verdict = (
        '<p class="ok">Meets the budget.</p>'
        if c["meets_budget"]
        else '<p class="bad">Nothing met the budget; the closest candidate is saved: '
        + e("; ".join(v["text"] for v in c["violations"]))
        + "</p>"
    )
    lat_title, lat_limit, lat_label = _latency_axis(doc)
    size_limit = doc["budget"].get("max_size_mb")
    base = doc["baseline"]["figures"]
    trial_rows = []
    for r in doc["trials"]["rows"]:
        cls = "chosen" if r["number"] == c["trial"] else ""
        trial_rows.append(f'<tr class="{cls}">' + "".join(f"<td>{e(x)}</td>" for x in _trial_cells(r, base)) + "</tr>")
    trials = (
        "<table><thead><tr>"
        + "".join(f"<th>{e(h)}</th>" for h in TRIAL_HEAD)
        + "</tr></thead><tbody>"
        + "".join(trial_rows)
        + "</tbody></table>"
    )
    prov = "".join(f"<li><code>{e(k)}</code>: {e(v)}</li>" for k, v in c["final_provenance"].items())
    notes = "".join(f"<li>{e(n)}</li>" for n in doc["notes"])
    css = CSS + (
        "p.ok{color:#1e7b34;font-weight:bold}p.bad{color:#a93226;font-weight:bold}tr.chosen td{background:"
        "#fdebd0;font-weight:bold}td{text-align:left}svg{display:block;margin:1em 0}"
    )
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
        f'content="width=device-width, initial-scale=1"><title>{e(doc["title"])}</title><style>{css}</style>'
        f"</head><body><h1>{e(doc['title'])}</h1>{verdict}"
        f"<p>Chosen: trial {e(str(c['trial']))}, {e(c['description'])} &rarr; <code>{e(c['artifact'])}</code></p>"
        "<h2>Budget</h2><ul>"
        + "".join(f"<li>{e(x)}</li>" for x in doc["budget_lines"])
        + f"<li>target {e(doc['target'])} ({e(doc['latency_source'])}), runtime {e(doc['runtime'])}, "
        f"{doc['threads']} thread(s)</li><li>chosen deployment: {e(_deploy(doc))}</li></ul>"
        "<h2>Final figures (re-measured after the search)</h2>"
        + table(*_final_table(doc))
        + "<h2>Pareto plots (search figures)</h2>"
        + f"<p>Accuracy on {e(doc['search_data'])}; latency {e(doc['latency_source'])}.</p>"
        + scatter_svg(doc, "latency_ms", lat_title, lat_limit, lat_label)
        + scatter_svg(
            doc,
            "size_mb",
            "ONNX file size, MB (2**20 bytes), measured",
            size_limit,
            f"limit {size_limit:g} MB" if size_limit else "",
        )
        + "<h2>What each step cost and bought</h2>"
        + table(["step", "cost", "bought"], _step_rows(doc))
        + f"<h2>Trials</h2><p>Stopped: {e(doc['study']['stopped'])}.</p>{trials}"
        + (f"<h2>Notes</h2><ul>{notes}</ul>" if notes else "")
        + f"<h2>Where the numbers come from</h2><ul>{prov}</ul><h2>Host</h2><ul><li>"
        + e(", ".join(f"{k}={v}" for k, v in doc["host"].items()))
        + f"</li><li>study {e(doc['study']['name'])} in {e(doc['study']['storage'])}</li></ul></body></html>\n"
    )


def write_report(doc: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``report.html`` into ``out`` (the run folder's own outputs,
    replaced on every run)."""
    paths = {"json": out / "report.json", "md": out / "report.md", "html": out / "report.html"}
    write_json(paths["json"], _finite(doc), force=True)
    write_text(paths["md"], markdown(doc), force=True)
    write_text(paths["html"], html_page(doc), force=True)
    return paths


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj

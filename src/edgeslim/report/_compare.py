"""Figures formatted by unit, and every stage compared with the first: the numbers behind each report format.

Ratios are shown as a factor >= 1 with a word that says which way it went ("3.9x smaller", "1.2x slower");
accuracy-like fractions as a difference in points ("-0.20 pt"). MAC rows say "fewer MACs", never "faster":
only measured latency is a speedup. A figure without a known better direction is compared but never judged.
"""

from __future__ import annotations

import math
from typing import Any

from edgeslim.core.metrics import Metrics

# name prefix -> (higher is better?, word when better, word when worse); first match wins; then by unit
_BY_NAME: tuple[tuple[str, bool, str, str], ...] = (
    ("latency", False, "faster", "slower"), ("throughput", True, "more throughput", "less throughput"),
    ("size", False, "smaller", "larger"), ("peak_memory", False, "less memory", "more memory"),
    ("macs", False, "fewer MACs", "more MACs"), ("flops", False, "fewer FLOPs", "more FLOPs"),
    ("params", False, "fewer params", "more params"), ("energy", False, "less energy", "more energy"),
    *((n, True, "higher", "lower") for n in ("accuracy", "top", "agreement", "sqnr")),
    *((n, False, "lower", "higher") for n in ("error", "loss")))
_BY_UNIT: dict[str, tuple[bool, str, str]] = {
    "bytes": (False, "smaller", "larger"), "MB": (False, "less memory", "more memory"),
    "ms": (False, "faster", "slower"), "MACs": (False, "fewer MACs", "more MACs"),
    "items/s": (True, "more throughput", "less throughput")}
SAME = 0.005  # relative change (or points) below which two numbers count as the same


def direction(name: str, unit: str) -> tuple[bool | None, str, str]:
    """Whether higher is better for a figure (None: unknown), and its words for better and worse."""
    for prefix, higher, good, bad in _BY_NAME:
        if name.lower().startswith(prefix):
            return higher, good, bad
    return _BY_UNIT.get(unit, (None, "higher", "lower"))


def _sig3(v: float) -> str:
    """``v`` with three significant digits, trailing zeros kept (0.600, 1.00, 12.3, 123, 1234)."""
    return f"{v:.{max(0, 2 - math.floor(math.log10(abs(v))))}f}" if v and math.isfinite(v) else str(v)


_SCALES = {"bytes": ((1e9, " GB", 2), (1e6, " MB", 2), (1e3, " KB", 1), (1, " B", 0)),
           "MACs": ((1e9, "G MACs", 2), (1e6, "M MACs", 2), (1e3, "K MACs", 2), (1, " MACs", 0)),
           "count": ((1e9, "G", 2), (1e6, "M", 2), (1e3, "K", 2), (1, "", 0))}


def fmt(value: float, unit: str) -> str:
    """A figure formatted for people by its unit (bytes -> KB/MB, fraction -> %, ms to 3 digits, MACs -> M/G)."""
    v = float(value)
    if unit == "fraction":
        return f"{v * 100:.2f}%"
    if unit == "MB":
        return f"{v:.1f} MB"
    if not math.isfinite(v) or unit not in _SCALES:
        return f"{_sig3(v)} {unit}".strip()
    scale, suffix, digits = next((x for x in _SCALES[unit] if abs(v) >= x[0]), _SCALES[unit][-1])
    return f"{v / scale:,.{digits}f}{suffix}"


def _factor(r: float) -> str:
    return f"{r:.2f}x" if r < 1.095 else f"{r:.1f}x"


def change(name: str, unit: str, base: float, value: float) -> dict[str, Any]:
    """How ``value`` compares with ``base``: ``change`` (words), ``worse`` (None: same, or no better direction
    known), ``ratio`` (value / base), ``factor`` (the factor in the words, >= 1), ``delta_pt`` (fractions)."""
    higher, good, bad = direction(name, unit)
    out: dict[str, Any] = {"change": "", "worse": None, "ratio": None, "factor": None, "delta_pt": None}
    if not (math.isfinite(base) and math.isfinite(value)):
        return out
    up = value > base
    judged = None if higher is None else (up != higher)
    up_word, down_word = ("higher", "lower") if higher is None else (good, bad) if higher else (bad, good)
    if unit == "fraction":
        d = (value - base) * 100
        same = abs(d) < SAME
        out.update(change="±0.00 pt" if same else f"{d:+.2f} pt", worse=None if same else judged, delta_pt=round(d, 6))
    elif base > 0 and value > 0:
        r = value / base
        f, same = (r if up else 1 / r), abs(r - 1) < SAME
        out.update(change="same" if same else f"{_factor(f)} {up_word if up else down_word}",
                   worse=None if same else judged, ratio=round(r, 6), factor=round(f, 6))
    else:  # a zero or negative value has no ratio: show the difference instead
        same = value == base
        out.update(change="same" if same else f"{'+' if up else '-'}{fmt(abs(value - base), unit)}",
                   worse=None if same else judged)
    return out


def compare_stages(stages: list[Metrics]) -> list[dict[str, Any]]:
    """Rows ``{"figure", "cells"}``, one per figure name in first-seen order; a cell is None where a stage lacks
    the figure, else ``value``, ``unit``, ``text``, ``source`` and, vs the first stage, :func:`change`'s keys."""
    names: list[str] = []
    for s in stages:
        names += [n for n in s.figures if n not in names]
    rows = []
    for n in names:
        base = stages[0].figures.get(n)
        cells: list[dict[str, Any] | None] = []
        for i, s in enumerate(stages):
            f = s.figures.get(n)
            if f is None:
                cells.append(None)
                continue
            cell: dict[str, Any] = {"value": f.value, "unit": f.unit, "text": fmt(f.value, f.unit),
                                    "source": f.source, "change": "", "worse": None}
            if i and base is not None:
                if base.unit != f.unit:
                    cell["change"] = f"not compared: unit {f.unit!r} vs {base.unit!r}"
                else:
                    cell.update(change(n, f.unit, base.value, f.value))
                cell["sources_differ"] = base.source != f.source
            cells.append(cell)
        rows.append({"figure": n, "cells": cells})
    return rows


def regressions(stages: list[Metrics], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every (stage, figure) that got worse than the first stage, with a sentence that says so."""
    out = []
    for r in rows:
        first = r["cells"][0]
        for i, c in enumerate(r["cells"]):
            if c and c["worse"]:
                out.append({"stage": stages[i].label, "figure": r["figure"], "value": c["value"],
                            "first_value": first["value"], "change": c["change"],
                            "text": f"{stages[i].label}: {r['figure']} {c['text']} vs {first['text']} in "
                                    f"{stages[0].label} ({c['change']})"})
    return out

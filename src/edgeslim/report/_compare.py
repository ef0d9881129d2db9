"""Figures formatted by unit, and every stage compared with the first: the numbers behind each report format.

Ratios are shown as a factor >= 1 with a word that says which way it went ("3.9x smaller", "1.2x slower");
accuracy-like fractions as a difference in points ("-0.20 pt"). MAC rows say "fewer MACs", never "faster":
only measured latency is a speedup. A figure without a known better direction is compared but never judged.

Speed (latency, throughput) is compared with the FP32 stage on the same runtime when there is one (an INT8 file
on ONNX Runtime against the FP32 file on ONNX Runtime, not against torch eager), else with the first stage on that
runtime, else with the first stage. A change inside the measurement's noise is shown but not judged worse:
for accuracy-like fractions measured on n samples, a difference within two binomial standard errors
(``2 * sqrt(p1(1-p1)/n1 + p2(1-p2)/n2)``; -0.01 pt is 1 image of 10,000); for latency and throughput, a change
below :data:`SPEED_NOISE`.
"""

from __future__ import annotations

import math
import re
from typing import Any

from edgeslim.core.metrics import Metrics

# name prefix -> (higher is better?, word when better, word when worse); first match wins; then by unit
_BY_NAME: tuple[tuple[str, bool, str, str], ...] = (
    ("latency", False, "faster", "slower"),
    ("throughput", True, "more throughput", "less throughput"),
    ("size", False, "smaller", "larger"),
    ("peak_memory", False, "less memory", "more memory"),
    ("macs", False, "fewer MACs", "more MACs"),
    ("flops", False, "fewer FLOPs", "more FLOPs"),
    ("params", False, "fewer params", "more params"),
    ("energy", False, "less energy", "more energy"),
    *((n, True, "higher", "lower") for n in ("accuracy", "top", "agreement", "sqnr")),
    *((n, False, "lower", "higher") for n in ("error", "loss")),
)
_BY_UNIT: dict[str, tuple[bool, str, str]] = {
    "bytes": (False, "smaller", "larger"),
    "MB": (False, "less memory", "more memory"),
    "ms": (False, "faster", "slower"),
    "MACs": (False, "fewer MACs", "more MACs"),
    "items/s": (True, "more throughput", "less throughput"),
}
SAME = 0.005  # relative change (or points) below which two numbers count as the same
SPEED_NOISE = 0.03  # relative latency/throughput change treated as timing noise on a shared CPU
_SPEED = ("latency", "throughput")
_SAMPLED = ("accuracy", "top", "agreement")

_WORDS = {
    "accuracy": "accuracy (top-1)",
    "size_bytes": "file size",
    "size_zipped_bytes": "file size, zipped",
    "params": "parameters",
    "macs": "MACs",
    "peak_memory_mb": "peak memory",
    "top1_agreement": "top-1 agreement",
    "cosine": "cosine similarity",
    "sqnr_db": "SQNR",
    "throughput_ips": "throughput",
    "predicted_latency_ms": "predicted latency",
    "estimated_energy_mj": "estimated energy",
    "memory_required_mb": "memory required",
    "fully_runs": "runs fully",
}


def figure_title(name: str) -> str:
    """A figure's key in words for tables: ``latency_p50_ms@t1b1`` -> ``latency p50, 1 thread, batch 1``."""
    base, _, at = name.partition("@")
    lat = re.fullmatch(r"latency_(p\d+)_ms", base)
    words = f"latency {lat.group(1)}" if lat else _WORDS.get(base, base.replace("_", " "))
    tb = re.fullmatch(r"t(\d+)b(\d+)", at)
    if tb:
        t, b = int(tb.group(1)), int(tb.group(2))
        return f"{words}, {t} thread{'s' * (t != 1)}, batch {b}"
    return f"{words} on {at}" if at else words


def _samples(stage: Metrics, name: str) -> int | None:
    """How many samples a fraction was measured on (context, else the figure's detail), or None."""
    if name == "accuracy" and isinstance(stage.context.get("accuracy_samples"), int):
        return stage.context["accuracy_samples"]
    f = stage.figures.get(name)
    m = re.search(r"\bon ([\d,]+) (?:real |validation )?samples", f.detail if f else "")
    return int(m.group(1).replace(",", "")) if m else None


def noise_pt(base: float, value: float, n_base: int | None, n_value: int | None) -> float | None:
    """Two binomial standard errors of the difference of two fractions, in points (None: sample counts unknown).

    Each proportion is estimated as (k + 1) / (n + 2), so a fraction of exactly 0 or 1 still has an error."""
    if not n_base or not n_value:
        return None
    var = 0.0
    for p, n in ((base, n_base), (value, n_value)):
        q = (p * n + 1) / (n + 2)
        var += q * (1 - q) / n
    return 200 * math.sqrt(var)


def direction(name: str, unit: str) -> tuple[bool | None, str, str]:
    """Whether higher is better for a figure (None: unknown), and its words for better and worse."""
    for prefix, higher, good, bad in _BY_NAME:
        if name.lower().startswith(prefix):
            return higher, good, bad
    return _BY_UNIT.get(unit, (None, "higher", "lower"))


def _sig3(v: float) -> str:
    """``v`` with three significant digits, trailing zeros kept (0.600, 1.00, 12.3, 123, 1234)."""
    return f"{v:.{max(0, 2 - math.floor(math.log10(abs(v))))}f}" if v and math.isfinite(v) else str(v)


_SCALES = {
    "bytes": ((1e9, " GB", 2), (1e6, " MB", 2), (1e3, " KB", 1), (1, " B", 0)),
    "MACs": ((1e9, "G MACs", 2), (1e6, "M MACs", 2), (1e3, "K MACs", 2), (1, " MACs", 0)),
    "count": ((1e9, "G", 2), (1e6, "M", 2), (1e3, "K", 2), (1, "", 0)),
}


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


def change(name: str, unit: str, base: float, value: float, *, noise: float | None = None) -> dict[str, Any]:
    """How ``value`` compares with ``base``: ``change`` (words), ``worse`` (None: same, within noise, or no better
    direction known), ``ratio`` (value / base), ``factor`` (the factor in the words, >= 1), ``delta_pt``
    (fractions), ``within_noise``.

    Args:
        noise: for fractions, the difference in points below which the change is noise (see :func:`noise_pt`);
            latency and throughput use :data:`SPEED_NOISE`.
    """
    higher, good, bad = direction(name, unit)
    out: dict[str, Any] = {
        "change": "",
        "worse": None,
        "ratio": None,
        "factor": None,
        "delta_pt": None,
        "within_noise": False,
    }
    if not (math.isfinite(base) and math.isfinite(value)):
        return out
    up = value > base
    judged = None if higher is None else (up != higher)
    up_word, down_word = ("higher", "lower") if higher is None else (good, bad) if higher else (bad, good)
    if unit == "fraction":
        d = (value - base) * 100
        same = abs(d) < SAME
        quiet = not same and noise is not None and abs(d) <= noise
        text = "±0.00 pt" if same else f"{d:+.2f} pt" + (f" (within noise, ±{noise:.2f} pt)" if quiet else "")
        out.update(change=text, worse=None if same or quiet else judged, delta_pt=round(d, 6), within_noise=quiet)
    elif base > 0 and value > 0:
        r = value / base
        f, same = (r if up else 1 / r), abs(r - 1) < SAME
        quiet = not same and name.lower().startswith(_SPEED) and abs(r - 1) < SPEED_NOISE
        text = "same" if same else f"{_factor(f)} {up_word if up else down_word}" + (" (within noise)" if quiet else "")
        out.update(
            change=text,
            worse=None if same or quiet else judged,
            ratio=round(r, 6),
            factor=round(f, 6),
            within_noise=quiet,
        )
    else:  # a zero or negative value has no ratio: show the difference instead
        same = value == base
        out.update(
            change="same" if same else f"{'+' if up else '-'}{fmt(abs(value - base), unit)}",
            worse=None if same else judged,
        )
    return out


def compare_stages(stages: list[Metrics]) -> list[dict[str, Any]]:
    """Rows ``{"figure", "cells"}``, one per figure name in first-seen order; a cell is None where a stage lacks
    the figure, else ``value``, ``unit``, ``text``, ``source`` and, vs the first stage, :func:`change`'s keys."""
    names: list[str] = []
    for s in stages:
        names += [n for n in s.figures if n not in names]
    rows = []
    for n in names:
        speed = n.lower().startswith(_SPEED)
        cells: list[dict[str, Any] | None] = []
        for i, s in enumerate(stages):
            f = s.figures.get(n)
            if f is None:
                cells.append(None)
                continue
            cell: dict[str, Any] = {
                "value": f.value,
                "unit": f.unit,
                "text": fmt(f.value, f.unit),
                "source": f.source,
                "change": "",
                "worse": None,
            }
            j = speed_baseline(stages, i, n) if speed else 0
            base = stages[j].figures.get(n) if j is not None else None
            if j is not None and j != i and base is not None:
                if base.unit != f.unit:
                    cell["change"] = f"not compared: unit {f.unit!r} vs {base.unit!r}"
                else:
                    noise = (
                        noise_pt(base.value, f.value, _samples(stages[j], n), _samples(s, n))
                        if f.unit == "fraction" and n.lower().startswith(_SAMPLED)
                        else None
                    )
                    cell.update(change(n, f.unit, base.value, f.value, noise=noise))
                cell["sources_differ"] = base.source != f.source
                if j:
                    cell["baseline"] = stages[j].label
            cells.append(cell)
        rows.append({"figure": n, "title": figure_title(n), "cells": cells})
    return rows


def _runtime(s: Metrics) -> str | None:
    return s.context.get("runtime")


def _precision(s: Metrics) -> str | None:
    t = s.context.get("target")
    return t.get("precision") if isinstance(t, dict) else None


def speed_baseline(stages: list[Metrics], i: int, name: str) -> int | None:
    """The stage that stage ``i``'s speed figure ``name`` is compared with (None for stage 0).

    An FP32 stage is compared with an earlier FP32 stage on the same runtime, else with the first stage. Any other
    stage (INT8, FP16, unknown) with the first FP32 stage on the same runtime wherever it is listed, else with an
    earlier stage on that runtime, else with the first stage."""
    if i == 0:
        return None
    have = [j for j, s in enumerate(stages) if j != i and name in s.figures]
    rt = _runtime(stages[i])
    same = [j for j in have if rt is not None and _runtime(stages[j]) == rt]
    fp32 = [j for j in same if _precision(stages[j]) == "fp32"]
    if _precision(stages[i]) == "fp32":
        return fp32[0] if fp32 and fp32[0] < i else 0
    if fp32:
        return fp32[0]
    if same and same[0] < i:
        return same[0]
    return 0 if i else None


def regressions(stages: list[Metrics], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every (stage, figure) that got worse than the first stage, with a sentence that says so."""
    out = []
    for r in rows:
        first = r["cells"][0]
        for i, c in enumerate(r["cells"]):
            if c and c["worse"]:
                j = next((k for k, s in enumerate(stages) if s.label == c.get("baseline")), 0)
                ref = r["cells"][j] or first
                out.append(
                    {
                        "stage": stages[i].label,
                        "figure": r["figure"],
                        "value": c["value"],
                        "first_value": first["value"] if first else None,
                        "baseline": stages[j].label,
                        "baseline_value": ref["value"],
                        "change": c["change"],
                        "text": f"{stages[i].label}: {figure_title(r['figure'])} {c['text']} vs {ref['text']} "
                        f"in {stages[j].label} ({c['change']})",
                    }
                )
    return out

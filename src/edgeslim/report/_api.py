"""The ``report`` verb: stages side by side in JSON, Markdown and a self-contained HTML page.

Every number keeps its provenance (measured on runtime R on this host, computed by X, predicted for D).
Changes are relative to the first stage; a figure that got worse is flagged and listed, never hidden. MAC
ratios read "fewer MACs", never a speedup: only measured latency is a speedup.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from edgeslim._version import __version__
from edgeslim.core.errors import ConfigError, near
from edgeslim.core.io import check_output, write_json, write_text
from edgeslim.core.metrics import Figure, Metrics
from edgeslim.report._compare import change, compare_stages, fmt, regressions
from edgeslim.report._render import html_page, markdown, table_text

log = logging.getLogger(__name__)

FORMATS = ("json", "md", "html")
_RENDER = {"md": markdown, "html": html_page}


def _stages(stages: Sequence[Metrics | Mapping[str, Any]]) -> list[Metrics]:
    """The stages as :class:`Metrics` (from Metrics or their dict form), every value a float."""
    if isinstance(stages, (Metrics, Mapping, str)):
        raise ConfigError(
            f"stages must be a list of Metrics in pipeline order, e.g. [baseline, quantized]; got one "
            f"{type(stages).__name__}"
        )
    out = []
    for i, s in enumerate(stages):
        try:
            d = s.to_dict() if isinstance(s, Metrics) else s
            figs = dict(d.get("figures") or {})
            out.append(
                Metrics(
                    str(d["label"]),
                    context=dict(d.get("context") or {}),
                    figures={
                        k: Figure(
                            str(v.get("name", k)),
                            math.nan if v["value"] is None else float(v["value"]),
                            str(v["unit"]),
                            str(v["source"]),
                            str(v.get("detail") or ""),
                        )
                        for k, v in figs.items()
                    },
                )
            )
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise ConfigError(
                f"stage {i} ({type(s).__name__}) is not a Metrics or its dict (label, figures of "
                f"name/value/unit/source/detail, context): {type(err).__name__}: {err}"
            ) from None
    if not out:
        raise ConfigError("report needs at least one stage of Metrics (got none)")
    return out


def render_table(stages: Sequence[Metrics | Mapping[str, Any]]) -> str:
    """The stages side by side as fixed-width text (for terminals), changes relative to the first stage.

    Args:
        stages: :class:`Metrics` or their dicts, in pipeline order.

    Raises:
        ConfigError: no stages, or a stage that is not a Metrics or its dict.
    """
    ms = _stages(stages)
    return table_text(ms, compare_stages(ms))


def _finite(obj: Any) -> Any:
    """``obj`` with NaN and infinities as None (read back as NaN), so that the JSON is strict."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def report(
    stages: Sequence[Metrics | Mapping[str, Any]],
    out_dir: str | Path,
    *,
    title: str = "edgeslim report",
    formats: str | Iterable[str] = FORMATS,
    force: bool = False,
    notes: str | Iterable[str] = (),
) -> dict[str, Path]:
    """Write the stages side by side as ``report.json``, ``report.md`` and ``report.html`` in ``out_dir``.

    Every output path is checked before anything is written, and each file is written atomically.

    Args:
        stages: :class:`Metrics` (or their ``to_dict()`` form, e.g. from a saved ``report.json``) in pipeline
            order; changes are relative to the first.
        out_dir: output folder (created if needed).
        title: the report's title.
        formats: any of ``json``, ``md``, ``html``.
        force: overwrite existing report files; otherwise they are refused before anything is written.
        notes: lines to include as they are (e.g. what a step did).

    Returns:
        format -> path written.

    Raises:
        ConfigError: no stages, a stage that is not a Metrics, or an unknown format.
        OutputExistsError: a report file exists and ``force`` is False.
    """
    ms = _stages(stages)
    fs = list(dict.fromkeys(str(f).lower() for f in ([formats] if isinstance(formats, str) else formats)))
    for f in fs or ["(none given)"]:
        if f not in FORMATS:
            raise ConfigError(f"unknown report format {f!r}{near(str(f), FORMATS)}; valid: {', '.join(FORMATS)}")
    notes = [notes] if isinstance(notes, str) else [str(n) for n in notes]
    out, title = Path(out_dir), str(title)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir {str(out)!r} is a file, not a folder")
    paths = {f: out / f"report.{f}" for f in fs}
    for p in paths.values():  # refuse before writing (or rendering) anything
        check_output(p, force=force)
    rows = compare_stages(ms)
    regs = regressions(ms, rows)
    doc = {
        "title": title,
        "edgeslim_version": __version__,
        "first_stage": ms[0].label,
        "stages": [s.to_dict() for s in ms],
        "comparison": rows,
        "regressions": regs,
        "notes": notes,
    }
    rendered = {f: _finite(doc) if f == "json" else _RENDER[f](title, ms, rows, regs, notes) for f in fs}
    for f, p in paths.items():
        (write_json if f == "json" else write_text)(p, rendered[f], force=force)
    if regs:
        log.info(
            "report: %d figure(s) got worse than %r: %s", len(regs), ms[0].label, "; ".join(r["text"] for r in regs)
        )
    log.info("report: wrote %s", ", ".join(str(p) for p in paths.values()))
    return paths


__all__ = ["FORMATS", "change", "compare_stages", "fmt", "render_table", "report"]

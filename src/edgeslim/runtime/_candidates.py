"""Which registered runtimes can run one artifact: the candidates of ``measure --runtime all`` for a file."""

from __future__ import annotations

from typing import Any

from edgeslim.core.artifact import Artifact
from edgeslim.runtime._runners import RUNTIMES, missing


def artifact_candidates(
    artifact: Artifact, *, threads: int = 1
) -> tuple[dict[str, tuple[str, Any]], list[dict[str, Any]]]:
    """Every registered runtime that loads ``artifact``'s format, as :func:`compare_runtimes` candidates.

    Returns:
        ``(candidates, rows)``: runtime -> ``(runtime, artifact)`` for each runtime that loads the format, and one
        ``n/a`` row for each installed runtime that cannot (nothing is left out silently; runtimes that are
        not installed get their row from ``compare_runtimes``).
    """
    candidates: dict[str, tuple[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    for name in RUNTIMES:
        cls = RUNTIMES.get(name)
        if artifact.format in cls.formats:
            candidates[name] = (name, artifact)
        elif not missing(name):
            rows.append(
                {
                    "label": name,
                    "runtime": name,
                    "threads": threads,
                    "status": "n/a",
                    "note": f"cannot load format {artifact.format!r}; loads "
                    f"{', '.join(cls.formats) or 'torch modules'}",
                }
            )
    return candidates, rows

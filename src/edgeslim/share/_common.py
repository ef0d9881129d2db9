"""Shared plumbing of the share/ verbs: the report, pattern-field checks and example batches.

Layer selection, module surgery and counting live in :mod:`edgeslim.core.modules` / :mod:`edgeslim.core.counting`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass
class ShareReport:
    """What a share/ verb did, layer by layer; attached to the returned model as ``model.report``.

    Attributes:
        technique: the verb's config kind (``cluster``, ``prune``, ``tie``, ``factorize``, ``separable``).
        config: the config as a dict.
        layers: one dict per considered layer: ``name``, ``status`` (``done`` or ``skipped``), ``reason`` for
            skipped layers, and technique details (clusters, rank, params before/after, ...).
        totals: model-level figures (params before/after, MACs before/after when example inputs were given).
    """

    technique: str  # the Report protocol's name of the verb (edgeslim.core.report)
    config: dict[str, Any]
    layers: list[dict[str, Any]] = field(default_factory=list)
    totals: dict[str, Any] = field(default_factory=dict)

    def done(self) -> list[dict[str, Any]]:
        return [r for r in self.layers if r["status"] == "done"]

    def skipped(self) -> list[dict[str, Any]]:
        return [r for r in self.layers if r["status"] == "skipped"]

    def add(self, name: str, **details: Any) -> None:
        self.layers.append({"name": name, "status": "done", **details})

    def skip(self, name: str, reason: str) -> None:
        log.info("%s: %s left as is: %s", self.technique, name, reason)
        self.layers.append({"name": name, "status": "skipped", "reason": reason})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        extra = ", ".join(f"{k} {v}" for k, v in self.totals.items())
        return f"{self.technique}: {len(self.done())} layers changed, {len(self.skipped())} left as is" + (
            f"; {extra}" if extra else ""
        )


def check_patterns(config: Any, *fields: str) -> None:
    """Raise unless each named config field is a tuple of non-empty strings."""
    for f in fields:
        if not all(isinstance(p, str) and p for p in getattr(config, f)):
            raise config._bad(f, "must be module names or fnmatch patterns (non-empty strings)")


def example_batch(data: Any, n: int, seed: int = 0) -> torch.Tensor:
    """Up to ``n`` input samples from an ImageDataset, a tensor or an iterable of (x, y) batches."""
    from edgeslim.core.errors import DataError

    if data is None:
        raise DataError("this step needs data: pass data=<an ImageDataset or a tensor of real samples>")
    if hasattr(data, "normalized") and hasattr(data, "take"):
        if len(data) == 0:
            raise DataError("the data passed is empty")
        return data.take(min(n, len(data)), seed=seed).normalized()
    if isinstance(data, torch.Tensor):
        x = data[:n]
    else:
        xs: list[torch.Tensor] = []
        for b in data:
            xs.append(b[0] if isinstance(b, (tuple, list)) else b)
            if sum(len(t) for t in xs) >= n:
                break
        x = torch.cat(xs)[:n] if xs else torch.empty(0)
    if len(x) == 0:
        raise DataError("the data passed is empty")
    return x.float()

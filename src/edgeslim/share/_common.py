"""Shared plumbing of the share/ verbs: layer selection by fnmatch patterns, module surgery, the report."""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from edgeslim.core.errors import ConfigError, near

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
            f"; {extra}" if extra else "")


def select(model: nn.Module, layers: Sequence[str], skip: Sequence[str], eligible: Callable[[nn.Module], bool],
           what: str) -> list[tuple[str, nn.Module]]:
    """Layers of ``model`` of an eligible type whose names match ``layers`` (all when empty) and not ``skip``.

    Every pattern must match at least one eligible layer; otherwise a :class:`ConfigError` names the pattern
    and the nearest eligible names.
    """
    named = [(n, m) for n, m in model.named_modules() if n]
    cands = [(n, m) for n, m in named if eligible(m)]
    names = [n for n, _ in cands]
    for field_name, patterns in (("layers", layers), ("exclude", skip)):
        for p in patterns:
            if any(fnmatch.fnmatchcase(n, p) for n in names):
                continue
            other = next((f"{n!r} is a {type(m).__name__}" for n, m in named if fnmatch.fnmatchcase(n, p)), "")
            raise ConfigError(
                f"{field_name} pattern {p!r} matches no {what}{f' ({other})' if other else ''}"
                f"{near(p, names)}; {what} names: {', '.join(names[:12])}{' ...' if len(names) > 12 else ''}"
            )
    chosen = [(n, m) for n, m in cands if not layers or any(fnmatch.fnmatchcase(n, p) for p in layers)]
    return [(n, m) for n, m in chosen if not any(fnmatch.fnmatchcase(n, p) for p in skip)]


def check_patterns(config: Any, *fields: str) -> None:
    """Raise unless each named config field is a tuple of non-empty strings."""
    for f in fields:
        if not all(isinstance(p, str) and p for p in getattr(config, f)):
            raise config._bad(f, "must be module names or fnmatch patterns (non-empty strings)")


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` by ``new``."""
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


def n_params(model: nn.Module) -> int:
    """Parameters counted once even when tied."""
    return sum(p.numel() for p in model.parameters())


def macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass on ``x[:1]`` (torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x[:1])
    model.train(was)
    return int(fc.get_total_flops() // 2)


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

"""Minimal unstructured magnitude pruning, the first step of the Deep Compression pipeline.

This is only what Deep Compression needs before clustering (prune -> fine-tune -> cluster -> fine-tune ->
entropy-code). The full pruning technique (schedules, global criteria, N:M, structured pruning with physical
removal) belongs to a separate ``prune/`` package.

Masks are kept as a weight parametrization (``weight = original * mask``), so fine-tuning with
:func:`edgeslim.train.fit` never revives a pruned weight: its gradient is zero and its value stays zero.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from edgeslim.core.errors import ConfigError
from edgeslim.share._common import ShareReport, select

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class PruneMask(nn.Module):
    """A weight parametrization that multiplies the weight by a fixed 0/1 mask."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.float32))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


def prune_mask(module: nn.Module) -> torch.Tensor | None:
    """The boolean mask of a layer pruned by :func:`magnitude_prune`, or ``None``."""
    if parametrize.is_parametrized(module, "weight"):
        for p in module.parametrizations["weight"]:
            if isinstance(p, PruneMask):
                return p.mask.bool()
    return None


def bake_masks(module: nn.Module) -> None:
    """Remove :class:`PruneMask` parametrizations in place, keeping the (zeroed) weights."""
    for m in list(module.modules()):
        if prune_mask(m) is not None:
            # a deep copy shares its parametrized class with the original, and removing a parametrization
            # deletes the property from that class: give the module a class of its own first
            cls = type(m)
            own = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
            m.__class__ = type(cls.__name__, cls.__bases__, own)
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
            m._parameters = {"weight": m._parameters.pop("weight"), **m._parameters}  # the usual key order


def magnitude_prune(model: nn.Module, sparsity: float | Mapping[str, float], *, layers: Sequence[str] = (),
                    skip: Sequence[str] = ()) -> nn.Module:
    """Zero the smallest-magnitude weights of each Linear/Conv layer and keep them zero during fine-tuning.

    Args:
        model: the model (not modified).
        sparsity: the fraction of weights to zero in every selected layer, in [0, 1); or a mapping from
            module name / fnmatch pattern to a per-layer fraction (the first matching key wins; layers no key
            matches are left dense and reported).
        layers: names or fnmatch patterns of the layers to prune (default: every Linear and Conv layer).
        skip: names or patterns of layers to leave dense.

    Returns:
        a new model whose pruned layers carry a :class:`PruneMask` parametrization, with ``.report`` (a
        :class:`ShareReport`) listing each layer's sparsity. Pruning a pruned layer again counts its zeros.

    Raises:
        ConfigError: a sparsity outside [0, 1), or a pattern that matches no Linear/Conv layer.
    """
    rates = dict(sparsity) if isinstance(sparsity, Mapping) else None
    for key, s in (rates or {"sparsity": sparsity}).items():
        if not isinstance(s, (int, float)) or not 0.0 <= float(s) < 1.0:
            raise ConfigError(f"sparsity {s!r} for {key!r} is not allowed; use a fraction in [0, 1)")
    model = copy.deepcopy(model)
    chosen = select(model, tuple(layers), tuple(skip), lambda m: isinstance(m, PRUNABLE), "Linear/Conv layer")
    if rates:
        select(model, tuple(rates), (), lambda m: isinstance(m, PRUNABLE), "Linear/Conv layer")
    report = ShareReport("prune", {"sparsity": rates or float(sparsity), "layers": list(layers), "skip": list(skip)})
    kept = total = 0
    for name, m in chosen:
        if getattr(m, "centroids", None) is not None:
            report.skip(name, "clustered (prune before clustering)")
            continue
        s = float(sparsity) if rates is None else next(
            (float(v) for k, v in rates.items() if fnmatch.fnmatchcase(name, k)), None)
        if s is None:
            report.skip(name, "no sparsity given for this layer")
            continue
        bake_masks(m)
        w = m.weight.detach()
        n_keep = w.numel() - int(round(s * w.numel()))
        mask = torch.zeros(w.numel(), dtype=torch.bool)
        mask[torch.topk(w.abs().flatten(), n_keep).indices] = True
        mask = mask.view_as(w) & (w != 0)
        parametrize.register_parametrization(m, "weight", PruneMask(mask))
        kept += int(mask.sum())
        total += w.numel()
        report.add(name, weights=w.numel(), sparsity=round(1 - int(mask.sum()) / w.numel(), 4))
    report.totals = {"weights": total, "nonzero": kept,
                     "sparsity": round(1 - kept / total, 4) if total else 0.0}
    model.report = report
    return model

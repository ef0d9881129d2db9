"""Minimal unstructured magnitude pruning, the first step of the Deep Compression pipeline.

This is only what Deep Compression needs before clustering (prune -> fine-tune -> cluster -> fine-tune ->
entropy-code). The full pruning technique (schedules, global criteria, N:M, structured pruning with physical
removal) belongs to a separate ``prune/`` package.

Masks are the one weight parametrization of :mod:`edgeslim.core.masks` (``weight = original * mask``), so fine-tuning with
:func:`edgeslim.train.fit` never revives a pruned weight: its gradient is zero and its value stays zero.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from edgeslim.core import recipe as _recipe
from edgeslim.core.errors import ConfigError
from edgeslim.core.masks import MASKABLE, WeightMask, attach_mask, mask_of, masked_layers, strip_masks
from edgeslim.core.modules import first_match, select
from edgeslim.share._common import ShareReport

PRUNABLE = MASKABLE
PruneMask = WeightMask  # the one mask type (edgeslim.core.masks); this name is kept for one release
prune_mask = mask_of
bake_masks = strip_masks


def magnitude_prune(
    model: nn.Module, sparsity: float | Mapping[str, float], *, layers: Sequence[str] = (), skip: Sequence[str] = ()
) -> nn.Module:
    """Zero the smallest-magnitude weights of each Linear/Conv layer and keep them zero during fine-tuning.

    Args:
        model: the model (not modified).
        sparsity: the fraction of weights to zero in every selected layer, in [0, 1); or a mapping from
            module name / fnmatch pattern to a per-layer fraction (the first matching key wins; layers no key
            matches are left dense and reported).
        layers: names or fnmatch patterns of the layers to prune (default: every Linear and Conv layer).
        skip: names or patterns of layers to leave dense.

    Returns:
        a new model whose pruned layers carry a :class:`~edgeslim.core.masks.WeightMask` parametrization, with ``.report`` (a
        :class:`ShareReport`) listing each layer's sparsity. Pruning a pruned layer again counts its zeros.

    Raises:
        ConfigError: a sparsity outside [0, 1), or a pattern that matches no Linear/Conv layer.
    """
    rates = dict(sparsity) if isinstance(sparsity, Mapping) else None
    for key, s in (rates or {"sparsity": sparsity}).items():
        if not isinstance(s, (int, float)) or not 0.0 <= float(s) < 1.0:
            raise ConfigError(f"sparsity {s!r} for {key!r} is not allowed; use a fraction in [0, 1)")
    _recipe.check_next(model, "prune")
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
        s = (
            float(sparsity)
            if rates is None
            else next((float(rates[k]) for k in [first_match(name, rates)] if k is not None), None)
        )
        if s is None:
            report.skip(name, "no sparsity given for this layer")
            continue
        strip_masks(m)
        w = m.weight.detach()
        n_keep = w.numel() - int(round(s * w.numel()))
        mask = torch.zeros(w.numel(), dtype=torch.bool)
        mask[torch.topk(w.abs().flatten(), n_keep).indices] = True
        mask = mask.view_as(w) & (w != 0)
        attach_mask(m, mask)
        kept += int(mask.sum())
        total += w.numel()
        report.add(name, weights=w.numel(), sparsity=round(1 - int(mask.sum()) / w.numel(), 4))
    report.totals = {"weights": total, "nonzero": kept, "sparsity": round(1 - kept / total, 4) if total else 0.0}
    model.report = report
    return _recipe.record(
        model, "mask", {"sparsity": rates or float(sparsity)}, {"masked": masked_layers(model)}, report
    )

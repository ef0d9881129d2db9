"""Attention-head and FFN-neuron pruning of BERT-style encoders with physical removal (:func:`prune_transformer`).

Layers with ``attention.self.{query,key,value}``, ``attention.output.dense``, ``intermediate.dense`` and
``output.dense`` lose whole heads (``heads_ratio``) and FFN neurons (``ratio``) while the hidden size is kept, so the
model stays a valid Hugging Face model (loadable, exportable). Units are ranked by the ``score_units`` of the
configured criterion of the ``IMPORTANCE`` registry, over all the weights a unit owns.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from edgeslim.core.counting import call
from edgeslim.core.errors import ConfigError, ModelError
from edgeslim.prune._config import PruneConfig
from edgeslim.prune._importance import IMPORTANCE, unit_criteria
from edgeslim.prune._inspect import blame_module, check_not_empty, layer_ratios, match_modules


def bert_layers(model: nn.Module) -> dict[str, nn.Module]:
    """BERT-style encoder layers (``attention.self.query`` ... ``intermediate.dense``, ``output.dense``)."""
    found = {}
    for n, m in model.named_modules():
        att = getattr(m, "attention", None)
        if (
            att is not None
            and hasattr(getattr(att, "self", None), "query")
            and hasattr(att, "output")
            and hasattr(getattr(m, "intermediate", None), "dense")
            and hasattr(getattr(m, "output", None), "dense")
        ):
            found[n] = m
    return found


def _round_keep(total: int, ratio: float, multiple: int) -> int:
    keep = total - int(math.floor(total * ratio))
    if multiple > 1:
        keep = max(multiple, int(round(keep / multiple)) * multiple)
    return min(max(keep, 1), total)


def _slice_linear(lin: nn.Linear, idx: torch.Tensor, dim: int) -> None:
    with torch.no_grad():
        w = lin.weight.index_select(dim, idx).clone()
        lin.weight = nn.Parameter(w)
        if dim == 0:
            if lin.bias is not None:
                lin.bias = nn.Parameter(lin.bias.index_select(0, idx).clone())
            lin.out_features = len(idx)
        else:
            lin.in_features = len(idx)


def prune_transformer(model: nn.Module, cfg: PruneConfig, example_inputs: Any, data: Any) -> tuple[nn.Module, dict]:
    """Remove attention heads (``heads_ratio``) and FFN neurons (``ratio``) of every BERT-style layer."""
    crit = IMPORTANCE.get(cfg.importance)
    if crit.score_units is None:
        raise ConfigError(
            f"PruneConfig.importance={str(cfg.importance)!r} is not available for transformer "
            f"heads/FFN; valid: {', '.join(unit_criteria())}"
        )
    ignored = match_modules(model, cfg.exclude, "exclude")
    layers = bert_layers(model)
    ratios = layer_ratios(model, cfg)
    report: dict[str, Any] = {"layers": {}, "ignored": sorted(ignored)}
    for name, layer in layers.items():
        if name in ignored:
            continue
        att = layer.attention.self
        heads = int(att.num_attention_heads)
        hd = int(att.attention_head_size)
        entry: dict[str, Any] = {}
        if cfg.heads_ratio > 0:
            drop = min(int(math.floor(heads * cfg.heads_ratio)), heads - 1)
            q, k, v, o = att.query.weight, att.key.weight, att.value.weight, layer.attention.output.dense.weight
            per_head = [
                q.detach().reshape(heads, -1),
                k.detach().reshape(heads, -1),
                v.detach().reshape(heads, -1),
                o.detach().t().reshape(heads, -1),
            ]
            score = crit.score_units(per_head, seed=cfg.seed)
            keep_heads = torch.sort(torch.argsort(score, descending=True)[: heads - drop]).values
            idx = (keep_heads.view(-1, 1) * hd + torch.arange(hd).view(1, -1)).flatten()
            for lin in (att.query, att.key, att.value):
                _slice_linear(lin, idx, 0)
            _slice_linear(layer.attention.output.dense, idx, 1)
            att.num_attention_heads = len(keep_heads)
            att.all_head_size = len(keep_heads) * hd
            entry["heads"] = [heads, len(keep_heads)]
            entry["kept_heads"] = keep_heads.tolist()
        r = ratios.get(f"{name}.intermediate.dense", ratios.get(name, cfg.ratio))
        r = min(r, cfg.max_layer_ratio)
        inter, out = layer.intermediate.dense, layer.output.dense
        width = inter.out_features
        keep = _round_keep(width, r, cfg.round_to)
        score = crit.score_units([inter.weight.detach(), out.weight.detach().t()], seed=cfg.seed)
        idx = torch.sort(torch.argsort(score, descending=True)[:keep]).values
        _slice_linear(inter, idx, 0)
        _slice_linear(out, idx, 1)
        entry["ffn"] = [width, keep]
        report["layers"][name] = entry
    if not report["layers"]:
        raise ModelError(f"{type(model).__name__}: no BERT-style encoder layer left to prune (all ignored?)")
    check_not_empty(model)
    with blame_module(model, "running the pruned transformer"), torch.no_grad():
        call(model.eval(), example_inputs)
    return model, report

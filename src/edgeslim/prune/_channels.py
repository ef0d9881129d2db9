"""CNN channel pruning with physical removal (:func:`prune_channels`), through Torch-Pruning's dependency graph.

The graph couples every layer that must lose the same channels (residual adds, depthwise/grouped convs,
concatenation, BatchNorm, flatten -> Linear) and the pruner removes them from all of them at once, with kept widths
rounded to ``round_to``. Channels are ranked by a criterion of the ``IMPORTANCE`` registry. Windowed attention whose
heads the graph cannot split (Swin, MaxViT) is kept, with the layers it depends on, and each kept layer is reported.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from edgeslim.core.counting import call, count_macs
from edgeslim.core.errors import ConfigError, DataError, ModelError
from edgeslim.prune._config import PruneConfig, Scope
from edgeslim.prune._importance import IMPORTANCE, torch_pruning
from edgeslim.prune._inspect import (
    blame_module,
    check_not_empty,
    executed,
    layer_ratios,
    match_modules,
    output_layers,
    weighted,
)
from edgeslim.prune._tp_compat import (
    attention_bound_roots,
    fresh_defaults,
    kept_width_pruner,
    opaque_calls,
    shuffle_bound_roots,
    tolerate_unmapped_reshapes,
)


def _calib_grads(model: nn.Module, data: Any, cfg: PruneConfig) -> None:
    """Accumulate loss gradients on a few calibration batches (for the Taylor criterion)."""
    if data is None:
        raise DataError("importance='taylor' needs data=: a labelled dataset or an iterable of (inputs, labels)")
    if getattr(model, "edgeslim_task", None) == "detect":
        raise ConfigError(
            f"PruneConfig.importance='taylor' ranks channels by a classification loss; {type(model).__name__} is a "
            "detector: use a weight criterion (importance='l1', 'l2' or 'bn_scale')"
        )
    batches = data.batches(64) if hasattr(data, "batches") else data
    model.zero_grad(set_to_none=True)
    model.eval()
    seen = 0
    for x, y in batches:
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        seen += 1
        if seen >= cfg.calib_batches:
            break
    if not seen:
        raise DataError("importance='taylor': data= yielded no batches")


def functional_attention(model: nn.Module, example_inputs: Any, attn: Iterable[str]) -> list[nn.Module]:
    """The attention modules among ``attn`` (names) with a projection layer that never runs as a module.

    torchvision's ``ShiftedWindowAttention`` (Swin V1/V2) passes ``qkv.weight`` / ``proj.weight`` to a function,
    so the graph never sees those layers: it would take the attention for an element-wise op, let the residual
    width it reads and writes be pruned, and leave the unpruned weights to fail at run time (a matmul shape error).
    """
    mods = dict(model.named_modules())
    cand = {n: mods[n] for n in attn if n in mods}
    ran = {id(m) for m in executed(model, example_inputs, weighted(c for a in cand.values() for c in a.modules()))}
    return [
        a
        for a in cand.values()  # (V2's cpb_mlp does run as modules; its qkv and proj do not)
        if any(id(c) not in ran for c in weighted(a.modules()))
    ]


def _tp_prune_once(
    model: nn.Module,
    cfg: PruneConfig,
    ratio: float,
    example_inputs: Any,
    data: Any,
    ignored: list[nn.Module],
    ratio_dict: dict[nn.Module, float],
    skipped: dict[str, str] | None = None,
    opaque: list[nn.Module] = (),
) -> list:
    tp = torch_pruning()
    crit = IMPORTANCE.get(cfg.importance)
    heads = {m: m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    hits: list = []
    ignored = list(ignored) + list(opaque)  # an opaque attention is kept, and with it the residual width it touches

    def make(ign: list[nn.Module]) -> Any:
        with blame_module(model, "tracing the dependency graph", exact=False), opaque_calls(list(opaque)) as widths:
            return tp.pruner.MetaPruner(
                model,
                example_inputs,
                importance=crit.make(),
                global_pruning=cfg.scope == Scope.GLOBAL,
                pruning_ratio=ratio,
                pruning_ratio_dict=dict(ratio_dict) or None,
                max_pruning_ratio=cfg.max_layer_ratio,
                ignored_layers=ign,
                round_to=cfg.round_to if cfg.round_to > 1 else None,
                customized_pruners={type(m): kept_width_pruner(widths) for m in opaque} or None,
                **{**fresh_defaults(), "num_heads": dict(heads)},
            )

    with torch.random.fork_rng(devices=[]), tolerate_unmapped_reshapes(hits):
        torch.manual_seed(cfg.seed)
        pruner = make(ignored)
        if opaque and skipped is not None:
            skipped.update(attention_bound_roots(pruner.DG, model, ignored, list(opaque)))
        if getattr(pruner.DG, "_es_unmapped", False):  # a channel shuffle: keep the layers crossing it
            shuffle = shuffle_bound_roots(pruner.DG, hits, model, ignored)
            mods = dict(model.named_modules())
            pruner = make(list(ignored) + [mods[n] for n in shuffle])
            if skipped is not None:
                skipped.update(shuffle)
        if crit.needs_grad:
            _calib_grads(model, data, cfg)
        with blame_module(model, "pruning"):
            pruner.step()
        model.zero_grad(set_to_none=True)
        _sync_attributes(model)
        return [list(h) for h in pruner.pruning_history()]


def _sync_attributes(model: nn.Module) -> None:
    """Update width attributes that forward() reads but the pruner does not know (torchvision ViT, MHA)."""
    for m in model.modules():
        if hasattr(m, "conv_proj") and hasattr(m, "hidden_dim"):  # torchvision VisionTransformer
            m.hidden_dim = m.conv_proj.out_channels
        if isinstance(m, nn.MultiheadAttention):
            m.embed_dim = m.out_proj.out_features if m.out_proj.out_features else m.embed_dim
            m.kdim = m.vdim = m.embed_dim
            m.head_dim = m.embed_dim // m.num_heads


def window_attention_modules(model: nn.Module) -> list[str]:
    """Names of windowed / relative-position attention modules: a per-head relative position bias table, or (Swin
    V2) the relative position index its continuous bias MLP is gathered with."""
    return [
        n
        for n, m in model.named_modules()
        if n
        and (hasattr(m, "num_heads") or hasattr(m, "n_heads"))
        and any(
            isinstance(getattr(m, k, None), torch.Tensor)
            for k in ("relative_position_bias_table", "relative_position_index")
        )
    ]


def window_attention_layers(model: nn.Module) -> dict[str, str]:
    """Projection layers of attention blocks the dependency graph cannot split into heads, with the reason.

    Windowed / relative-position attention (torchvision Swin V1/V2 ``ShiftedWindowAttention(V2)``, MaxViT
    ``RelativePositionalMultiHeadAttention``) reshapes its projections into heads and indexes a per-head bias
    table; DepGraph cannot couple their heads, so their projections (and with them the residual width they
    read and write) are kept while the MLP, convolution and patch-merging widths around them are pruned.
    Swin's attention runs ``F.linear`` on ``qkv.weight`` / ``proj.weight`` (see :func:`functional_attention`):
    it is traced as one opaque node, kept, so every layer writing its residual width is kept too, and each of
    those is listed in the report with the attention it serves. ``nn.MultiheadAttention`` (ViT) is handled by
    the pruner itself.
    """
    out: dict[str, str] = {}
    for n in window_attention_modules(model):
        m = model.get_submodule(n)
        for cn, c in m.named_modules():
            if cn and isinstance(c, (nn.Linear, nn.modules.conv._ConvNd)):
                out[f"{n}.{cn}"] = (
                    f"projection of windowed/relative-position attention {n!r} "
                    f"({type(m).__name__}): heads are not traceable, the layer is kept"
                )
    return out


def prune_channels(model: nn.Module, cfg: PruneConfig, example_inputs: Any, data: Any) -> tuple[nn.Module, dict]:
    """Remove channels of ``model`` (a private copy; modified and returned) as ``cfg`` asks."""
    ignored_map = match_modules(model, cfg.exclude, "exclude")
    outs = output_layers(model, example_inputs) if cfg.ignore_output_layer else []
    for n in outs:  # a detector's class-logit and box convs: their widths are the output layout
        ignored_map[n] = dict(model.named_modules())[n]
    ratio_dict = layer_ratios(model, cfg)
    info: dict[str, Any] = {
        "ignored": sorted(ignored_map),
        "output_layer": outs[-1] if len(outs) == 1 else (outs or None),
        "skipped": {},
    }
    for n, why in window_attention_layers(model).items():
        if n not in ignored_map:
            ignored_map[n] = dict(model.named_modules())[n]
            info["skipped"][n] = why

    attn = set(window_attention_modules(model))
    names = {id(m): n for n, m in model.named_modules()}
    opaque = [names[id(m)] for m in functional_attention(model, example_inputs, attn)] if attn else []

    def run(m: nn.Module, ratio: float) -> list:
        mods = dict(m.named_modules())
        # the attention blocks' own tensors (relative position bias tables, V2 logit scales: one per head)
        params = [t for a in attn if a in mods for t in mods[a]._parameters.values() if t is not None]
        return _tp_prune_once(
            m,
            cfg,
            ratio,
            example_inputs,
            data,
            [mods[n] for n in ignored_map] + params,
            {mods[n]: r for n, r in ratio_dict.items()},
            info["skipped"],
            [mods[n] for n in opaque],
        )

    if cfg.target_macs is None:
        info["history"] = run(model, cfg.ratio)
        info["channel_ratio"] = cfg.ratio
    else:
        base = count_macs(model, example_inputs)
        goal = base * (1 - cfg.target_macs)
        lo, hi = 0.0, cfg.max_layer_ratio
        best: tuple[float, nn.Module, list] | None = None
        best_gap = math.inf
        reached = False
        for _ in range(10):  # bisection on the channel ratio; each trial prunes a fresh copy
            mid = (lo + hi) / 2
            trial = copy.deepcopy(model)
            hist = run(trial, mid)
            macs = count_macs(trial, example_inputs)
            reached = reached or macs <= goal * 1.02
            gap = abs(macs - goal) / base
            if gap < best_gap:  # rounding makes MACs a step function of the ratio: keep the closest trial
                best, best_gap = (mid, trial, hist), gap
            if macs <= goal:
                hi = mid
            else:
                lo = mid
            if best_gap < 0.01:
                break
        if best is None or not reached:
            raise ModelError(
                f"cannot remove {cfg.target_macs:.0%} of the MACs of {type(model).__name__} with max_layer_ratio="
                f"{cfg.max_layer_ratio} and {len(ignored_map)} ignored layers; raise max_layer_ratio or lower "
                "target_macs"
            )
        model = best[1]
        info["history"] = best[2]
        info["channel_ratio"] = round(best[0], 4)
    check_not_empty(model)
    with blame_module(model, "running the pruned model"), torch.no_grad():
        call(model.eval(), example_inputs)
    return model, info

"""Graph analysis and rewriting with torch.fx: fold BatchNorm, find quantizable ops, insert fake-quant.

Placement follows what ONNX Runtime's QDQ fusion needs to run integer kernels: the activation inputs and
the output of every Conv/Linear/Add/AvgPool/Concat are quantized, an activation (ReLU, ReLU6) that is the
only consumer of such an op is folded into its output range, and weights are quantized per channel.
Ops that only select or move values (MaxPool, flatten, reshape-like) fed by a quantized value get an output
quantizer that shares its input's scale and zero point: ORT then drops the DequantizeLinear/QuantizeLinear pair
around them and runs them on the integers (MaxPool as NhwcMaxPool on uint8), so the integer chain is not broken.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn
from torch.nn import functional as F

from edgeslim.core.errors import QuantizationError
from edgeslim.core.modules import first_match, require_matches, set_module
from edgeslim.quantize._modules import ActQuant, QuantWeight

WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Linear)
ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh)
ACT_FUNCS = {F.relu, torch.relu, F.relu6, F.hardtanh}
ADD_FUNCS = {operator.add, torch.add, operator.iadd}
POOL_MODULES = (nn.AdaptiveAvgPool2d, nn.AvgPool2d)
POOL_FUNCS = {F.adaptive_avg_pool2d, F.avg_pool2d}
CAT_FUNCS = {torch.cat, torch.concat}
#: value-preserving ops (each output element is one of the input elements): their output shares the input's scale
SHARED_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.Flatten)
SHARED_FUNCS = {F.max_pool1d, F.max_pool2d, torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
SHARED_METHODS = {"flatten", "view", "reshape", "squeeze", "unsqueeze"}


@dataclass
class Placement:
    """Where quantization goes in a traced graph (the analysis step; nothing is changed yet)."""

    weighted: list[str] = field(default_factory=list)  # module names quantized
    excluded: dict[str, str] = field(default_factory=dict)  # module name -> reason
    int8_layers: list[str] = field(default_factory=list)  # quantized layers kept at 8-bit weights (weight_bits=4)
    ops: list[str] = field(default_factory=list)  # other quantized op nodes (add, pool, cat)
    float_ops: dict[str, str] = field(default_factory=dict)  # node -> reason it stays float
    values: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)  # node name -> clamp
    shared: dict[str, str] = field(default_factory=dict)  # value -> the value whose scale and zero point it uses


def trace_and_fold(model: nn.Module, *, inplace: bool = False) -> torch.fx.GraphModule:
    """Symbolically trace an eval-mode copy of ``model`` and fold BatchNorm into the preceding convs.

    Layers that compute their weight (masks, codebooks) are made dense first, in ``model`` itself: pass a copy.
    ``inplace``: fold into ``model``'s own modules instead of a second copy (for a copy the caller made).
    """
    from torch.fx.experimental.optimization import fuse

    from edgeslim.core.recipe import materialize

    try:
        return fuse(materialize(model).eval(), inplace=inplace)
    except Exception as e:  # torch.fx raises many types on untraceable code
        raise QuantizationError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(e).__name__}: {e}); "
            "models with data-dependent control flow need their traceable parts quantized separately"
        ) from None


def _act_clamp(gm: torch.fx.GraphModule, n: torch.fx.Node) -> tuple[float | None, float | None] | None:
    """The output range an activation node guarantees, or None if ``n`` is no foldable activation."""
    if n.op == "call_module":
        m = gm.get_submodule(str(n.target))
        if isinstance(m, nn.ReLU):
            return (0.0, None)
        if isinstance(m, (nn.ReLU6, nn.Hardtanh)):
            lo, hi = (0.0, 6.0) if isinstance(m, nn.ReLU6) else (m.min_val, m.max_val)
            return (lo, hi) if lo == 0.0 else None
    if n.op == "call_function" and n.target in ACT_FUNCS:
        if n.target in (F.relu, torch.relu):
            return (0.0, None)
        if n.target is F.relu6:
            return (0.0, 6.0)
        lo = n.args[1] if len(n.args) > 1 else n.kwargs.get("min_val", -1.0)
        hi = n.args[2] if len(n.args) > 2 else n.kwargs.get("max_val", 1.0)
        return (float(lo), float(hi)) if lo == 0.0 else None
    return None


def _kind(gm: torch.fx.GraphModule, n: torch.fx.Node) -> str:
    if n.op == "call_module":
        m = gm.get_submodule(str(n.target))
        if isinstance(m, WEIGHTED):
            return "weighted"
        if isinstance(m, POOL_MODULES):
            return "pool"
        if isinstance(m, SHARED_MODULES):
            return "shared"
    if n.op == "call_method" and n.target in SHARED_METHODS:
        return "shared"
    if n.op == "call_function":
        if n.target in SHARED_FUNCS:
            return "shared"
        if n.target in ADD_FUNCS and sum(isinstance(a, torch.fx.Node) for a in n.args) == 2:
            return "add"
        if n.target in POOL_FUNCS:
            return "pool"
        if n.target in CAT_FUNCS:
            return "cat"
    return "other"


def weighted_modules(gm: torch.fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_module" and _kind(gm, n) == "weighted"]


def plan(
    gm: torch.fx.GraphModule, exclude: tuple[str, ...], quantize_output: bool, int8_layers: tuple[str, ...] = ()
) -> Placement:
    """Decide which layers and values are quantized; raise if nothing can be."""
    p = Placement()
    names = weighted_modules(gm)
    if not names:
        raise QuantizationError("the model has no quantizable layers (Conv1d, Conv2d, Linear); nothing to quantize")
    for field_name, pats in (("exclude", exclude), ("int8_layers", int8_layers)):
        require_matches(names, pats, field=f"QuantConfig.{field_name}", what="quantizable layer")
    output_nodes = {a for n in gm.graph.nodes if n.op == "output" for a in _flatten_args(n.args)}

    def mark(value: torch.fx.Node, clamp: tuple[float | None, float | None] = (None, None)) -> None:
        if value.name not in p.values:
            p.values[value.name] = clamp

    for n in gm.graph.nodes:
        kind = _kind(gm, n)
        if kind == "weighted":
            name = str(n.target)
            pat = first_match(name, exclude)
            if pat is not None:
                p.excluded[name] = f"excluded by QuantConfig.exclude pattern {pat!r}"
                continue
            p.weighted.append(name)
            if first_match(name, int8_layers):
                p.int8_layers.append(name)
        elif kind in ("add", "pool", "cat"):
            p.ops.append(n.name)
        elif kind == "shared" and isinstance(n.args[0], torch.fx.Node) and n.args[0].name in p.values:
            if n not in output_nodes or quantize_output:
                src = n.args[0].name
                p.shared[n.name] = p.shared.get(src, src)
                mark(n)
            continue
        else:
            if n.op in ("call_function", "call_method", "call_module") and _act_clamp(gm, n) is None:
                tgt = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
                p.float_ops.setdefault(n.name, f"{tgt}: no integer kernel; runs on dequantized values")
            continue
        inputs = [a for a in _flatten_args(n.args) if isinstance(a, torch.fx.Node)]
        for a in inputs:
            mark(a)
        out, clamp = n, (None, None)
        users = list(n.users)
        if len(users) == 1:
            c = _act_clamp(gm, users[0])
            if c is not None:
                out, clamp = users[0], c
                p.float_ops.pop(out.name, None)
        if out in output_nodes and not quantize_output:
            continue
        mark(out, clamp)
    return p


def _flatten_args(args) -> list:
    out = []
    for a in args:
        if isinstance(a, (list, tuple)):
            out.extend(_flatten_args(a))
        elif isinstance(a, dict):
            out.extend(_flatten_args(list(a.values())))
        else:
            out.append(a)
    return out


def apply(
    gm: torch.fx.GraphModule,
    p: Placement,
    *,
    qmin: int,
    qmax: int,
    per_channel: bool,
    weight_qmax: int,
    fp16: bool = False,
    layer_qmax: dict[str, int] | None = None,
) -> tuple[torch.fx.GraphModule, dict[str, ActQuant]]:
    """Insert one ActQuant per planned value and wrap planned layers in QuantWeight (in place on ``gm``).

    ``layer_qmax`` overrides ``weight_qmax`` for the named layers (8-bit layers of a 4-bit model, depthwise layers that
    keep the full range under ``reduce_range``).
    """
    layer_qmax = layer_qmax or {}
    for name in p.weighted:
        set_module(
            gm,
            name,
            QuantWeight(
                gm.get_submodule(name), per_channel=per_channel, qmax=layer_qmax.get(name, weight_qmax), fp16=fp16
            ),
        )
    quants: dict[str, ActQuant] = {}
    if not fp16:
        by_name = {n.name: n for n in gm.graph.nodes}
        by_value: dict[str, ActQuant] = {}
        for i, (vname, clamp) in enumerate(p.values.items()):
            node = by_name[vname]
            mod_name = f"act_quant_{i}"
            aq = ActQuant(qmin, qmax, clamp)
            if vname in p.shared:
                aq.share(by_value[p.shared[vname]])
            by_value[vname] = aq
            gm.add_submodule(mod_name, aq)
            quants[f"{mod_name}:{vname}"] = aq
            with gm.graph.inserting_after(node):
                qn = gm.graph.call_module(mod_name, (node,))
            node.replace_all_uses_with(qn, delete_user_cb=lambda u, qn=qn: u is not qn)
    gm.graph.lint()
    gm.recompile()
    return gm, quants

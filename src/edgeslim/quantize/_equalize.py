"""Data-free and data-light corrections before/after quantization (Nagel et al., ICCV 2019).

- Cross-layer equalization (CLE): for two convolutions in a row, ``A -> ReLU -> B``, output channel ``i`` of
  A is divided by ``s_i`` and input channel ``i`` of B multiplied by it, with ``s_i = sqrt(r_A[i] / r_B[i])``
  so both weight ranges become equal. This is exact for ReLU (positively homogeneous) but not for ReLU6,
  whose clip at 6 does not scale: as in the paper, equalized ReLU6 are replaced by ReLU (which changes the
  float model only where an activation exceeded 6; the report says which). Depthwise convolutions pass
  channel ``i`` through, so chains ``expand -> depthwise -> project`` equalize pair by pair, repeated
  until the scales settle.
- Bias correction (empirical): after quantization, the mean output error of each quantized layer on the
  calibration data, per output channel, is subtracted from its bias.
"""

from __future__ import annotations

import logging

import torch
import torch.fx
from torch import nn

from edgeslim.core.modules import set_module
from edgeslim.quantize import _graph

log = logging.getLogger(__name__)


def _pairs(gm: torch.fx.GraphModule) -> list[tuple[str, str, list[torch.fx.Node]]]:
    """(A, B, activations between) for convs where A's output feeds only B through at most one ReLU/ReLU6."""
    out = []
    for n in gm.graph.nodes:
        if n.op != "call_module" or not isinstance(gm.get_submodule(str(n.target)), nn.Conv2d):
            continue
        acts: list[torch.fx.Node] = []
        cur = n
        while len(cur.users) == 1:
            nxt = next(iter(cur.users))
            if _graph._act_clamp(gm, nxt) is not None and not acts:
                acts.append(nxt)
                cur = nxt
                continue
            if nxt.op == "call_module" and isinstance(gm.get_submodule(str(nxt.target)), nn.Conv2d):
                b = gm.get_submodule(str(nxt.target))
                a = gm.get_submodule(str(n.target))
                if b.groups == 1 or b.groups == b.in_channels == a.out_channels:
                    out.append((str(n.target), str(nxt.target), acts))
            break
    return out


@torch.no_grad()
def equalize(gm: torch.fx.GraphModule, iterations: int = 20) -> dict:
    """Cross-layer equalization in place on a BatchNorm-folded graph; returns what was done."""
    pairs = _pairs(gm)
    relu6 = []
    for _, _, acts in pairs:
        for act in acts:
            m = gm.get_submodule(str(act.target)) if act.op == "call_module" else None
            if isinstance(m, (nn.ReLU6, nn.Hardtanh)):
                set_module(gm, str(act.target), nn.ReLU())
                relu6.append(str(act.target))
    for _ in range(iterations):
        biggest = 0.0
        for a_name, b_name, _ in pairs:
            a, b = gm.get_submodule(a_name), gm.get_submodule(b_name)
            r_a = a.weight.abs().flatten(1).amax(1)
            if b.groups == 1:
                r_b = b.weight.abs().transpose(0, 1).flatten(1).amax(1)
            else:  # depthwise: input channel i is output channel i
                r_b = b.weight.abs().flatten(1).amax(1)
            s = torch.sqrt(r_a / r_b.clamp_min(1e-12)).clamp(1e-4, 1e4)
            s = torch.where((r_a > 0) & (r_b > 0), s, torch.ones_like(s))
            a.weight.div_(s.view(-1, 1, 1, 1))
            if a.bias is not None:
                a.bias.div_(s)
            if b.groups == 1:
                b.weight.mul_(s.view(1, -1, 1, 1))
            else:
                b.weight.mul_(s.view(-1, 1, 1, 1))
            biggest = max(biggest, float((s - 1).abs().max()))
        if biggest < 1e-4:
            break
    gm.recompile()
    return {"pairs": [[a, b] for a, b, _ in pairs], "relu6_replaced_by_relu": relu6}


@torch.no_grad()
def correct_bias(model: nn.Module, batches: list[torch.Tensor]) -> list[str]:
    """Empirical bias correction of every quantized layer in place; returns the corrected layer names."""
    from edgeslim.quantize._modules import QuantWeight

    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantWeight) and m.enabled and not m.fp16}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for name, qw in layers.items():

        def hook(mod: QuantWeight, inputs: tuple, output: torch.Tensor, name: str = name) -> None:
            ref = mod.layer(inputs[0])  # the float layer on the same (quantized) input
            diff = (output - ref).transpose(0, 1).flatten(1)  # (C, N*H*W)
            sums[name] = sums.get(name, 0) + diff.sum(1)
            counts[name] = counts.get(name, 0) + diff.shape[1]

        hooks.append(qw.register_forward_hook(hook))
    try:
        for b in batches:
            model(b)
    finally:
        for h in hooks:
            h.remove()
    done = []
    for name, qw in layers.items():
        if name not in sums:
            continue
        err = sums[name] / counts[name]
        layer = qw.layer
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0]))
        layer.bias.sub_(err)
        done.append(name)
    return done

"""AdaRound: learned rounding of weights, layer by layer (Nagel et al., ICML 2020; as in AIMET and BRECQ).

Each weight is rounded down or up, not to nearest: a continuous relaxation ``h(V)`` (rectified sigmoid) of
the up/down choice is trained per layer, with a regulariser ``sum(1 - |2h - 1|^beta)`` that pushes ``h`` to 0
or 1. As in the paper's asymmetric reconstruction, the rounded layer sees the inputs produced by the
already-quantized layers before it (quantized activations included), while its target is the float layer's
output on the float model's own inputs, both taken through the layer's ReLU/ReLU6 when it has one:
``|| f(W~ x_q) - f(W x) ||^2``. So each layer also learns to undo the error that piled up before it.
Schedule: the first 20% of the iterations reconstruct only (no regulariser), then ``beta`` anneals 20 -> 2.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from edgeslim.core.progress import bar
from edgeslim.quantize._modules import ActQuant, QuantWeight

log = logging.getLogger(__name__)

ZETA, GAMMA = 1.1, -0.1
ACT_FUNCS = {F.relu: F.relu, torch.relu: F.relu, F.relu6: F.relu6}


def _h(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def _forward(layer: nn.Module, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, w, b) if isinstance(layer, nn.Linear) else layer._conv_forward(x, w, b)


class _Stop(Exception):
    pass


def _inputs(model: nn.Module, module: nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    """The inputs ``module`` receives in ``model`` on ``batches`` (the forward stops at the module)."""
    got: list[torch.Tensor] = []

    def hook(m: nn.Module, args: tuple) -> None:
        got.append(args[0].detach())
        raise _Stop

    h = module.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for b in batches:
                try:
                    model(b)
                except _Stop:
                    pass
    finally:
        h.remove()
    return torch.cat(got)


def _activation(gm: torch.fx.GraphModule, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The ReLU/ReLU6 that is the only consumer of layer ``name`` (identity if there is none)."""
    for n in gm.graph.nodes:
        if n.op == "call_module" and n.target == name and len(n.users) == 1:
            u = next(iter(n.users))
            if u.op == "call_module":
                m = gm.get_submodule(str(u.target))
                if isinstance(m, (nn.ReLU, nn.ReLU6)):
                    return m
                if isinstance(m, nn.Hardtanh):
                    return lambda t, m=m: F.hardtanh(t, m.min_val, m.max_val)
            if u.op == "call_function" and u.target in ACT_FUNCS and len(u.args) == 1 and not u.kwargs:
                return ACT_FUNCS[u.target]
    return lambda t: t


def _order(gm: nn.Module) -> list[tuple[str, QuantWeight]]:
    mods = dict(gm.named_modules())
    names = (
        [str(n.target) for n in gm.graph.nodes if n.op == "call_module"]
        if isinstance(gm, torch.fx.GraphModule)
        else list(mods)
    )
    return [
        (n, mods[n]) for n in names if isinstance(mods.get(n), QuantWeight) and mods[n].enabled and not mods[n].fp16
    ]


def adaround(
    model: nn.Module,
    batches: list[torch.Tensor],
    *,
    iterations: int = 1000,
    batch_size: int = 32,
    lr: float = 1e-2,
    reg: float = 0.01,
    warmup: float = 0.2,
    beta: tuple[float, float] = (20.0, 2.0),
    seed: int = 0,
) -> list[str]:
    """Learn the rounding of every enabled integer QuantWeight in ``model`` in place, in graph order.

    Returns the names of the layers whose learned rounding reconstructs their (activated) output better than
    rounding to nearest (the others are rounded to nearest, so no layer gets worse on the calibration data).
    """
    layers = _order(model)
    # the float reference: same graph, every quantizer off, the float weights kept
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, ActQuant):
            m.state = "off"
        elif isinstance(m, QuantWeight):
            m.enabled = False
    ref_mods = dict(ref.named_modules())
    g = torch.Generator().manual_seed(seed)
    done = []
    for name, qw in bar(layers, desc="AdaRound", unit="layer"):
        t0 = time.perf_counter()
        layer = qw.layer
        act = _activation(model, name) if isinstance(model, torch.fx.GraphModule) else (lambda t: t)
        x_q = _inputs(model, qw, batches)  # what the layer sees after the already-rounded layers
        w = layer.weight.detach().clone()
        with torch.no_grad():
            target = act(_forward(layer, _inputs(ref, ref_mods[name], batches), w, layer.bias))
        bias = qw.quantized_bias()
        bias = None if bias is None else bias.detach()
        shape = (-1,) + (1,) * (w.ndim - 1)
        s = qw.scale.detach().reshape(shape) if qw.per_channel else qw.scale.detach().reshape(())
        lo, hi = (-128, 127) if qw.qmax >= 63 else (-qw.qmax - 1, qw.qmax)
        w_floor = torch.floor(w / s)
        rest = (w / s - w_floor).clamp(0.01, 0.99)
        v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))  # h(v) == rest: start at the float
        opt = torch.optim.Adam([v], lr=lr)
        warm = int(iterations * warmup)

        def recon(wq: torch.Tensor, idx: torch.Tensor | slice) -> torch.Tensor:
            out = act(_forward(layer, x_q[idx], wq, bias))  # noqa: B023 - called only in this iteration
            return (out - target[idx]).pow(2).sum(1).mean()  # noqa: B023  # sum over channels, mean over the rest

        curve = []  # reconstruction loss (without the regulariser) at the start, end of warm-up and end
        for it in range(iterations):
            idx = torch.randint(0, len(x_q), (min(batch_size, len(x_q)),), generator=g)
            h = _h(v)
            loss = recon(s * torch.clamp(w_floor + h, lo, hi), idx)
            if it in (0, warm, iterations - 1):
                curve.append(float(loss.detach()))
            if it >= warm:
                rel = (it - warm) / max(1, iterations - warm)
                b = beta[1] + (beta[0] - beta[1]) * (1 - rel)
                loss = loss + reg * (1 - (2 * h - 1).abs().pow(b)).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            learned = s * torch.clamp(w_floor + (_h(v) >= 0.5).float(), lo, hi)
            nearest = s * torch.clamp(torch.round(w / s), lo, hi)
            err = {
                k: sum(float(recon(wk, slice(i, i + 256))) for i in range(0, len(x_q), 256))
                for k, wk in (("learned", learned), ("nearest", nearest))
            }
            # keep the learned rounding only where it reconstructs the layer better than rounding to nearest
            if err["learned"] <= err["nearest"]:
                layer.weight.copy_(learned)
                done.append(name)
            else:
                layer.weight.copy_(nearest)
                log.info("adaround: %s keeps round-to-nearest (%.3g < %.3g)", name, err["nearest"], err["learned"])
            flipped = float((learned != nearest).float().mean())
            log.debug(
                "adaround: %s nearest %.4g learned %.4g, %.1f%% of weights rounded away from nearest",
                name,
                err["nearest"],
                err["learned"],
                100 * flipped,
                extra={
                    "adaround": {
                        "layer": name,
                        "nearest": err["nearest"],
                        "learned": err["learned"],
                        "kept": name in done,
                        "flipped": flipped,
                        "loss_curve": curve,
                        "seconds": time.perf_counter() - t0,
                    }
                },
            )
    log.info("adaround: %d of %d layers", len(done), len(layers))
    return done

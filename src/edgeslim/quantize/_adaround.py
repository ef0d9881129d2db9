"""AdaRound: learned rounding of weights, layer by layer (Nagel et al., ICML 2020).

Each weight is rounded down or up, not to nearest: a continuous relaxation ``h(V)`` (rectified sigmoid) of
the up/down choice is trained per layer to reproduce the float layer's output on calibration inputs, with a
regulariser whose annealed exponent pushes ``h`` to 0 or 1. Layers are processed in graph order and each
sees the inputs produced by the already-rounded layers before it, so errors do not pile up.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn import functional as F

from edgeslim.quantize._modules import QuantWeight

log = logging.getLogger(__name__)

ZETA, GAMMA = 1.1, -0.1


def _h(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def _forward(layer: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w, layer.bias) if isinstance(layer, nn.Linear) else layer._conv_forward(x, w, layer.bias)


def adaround(model: nn.Module, batches: list[torch.Tensor], *, iterations: int = 300, batch_size: int = 32,
             lr: float = 1e-2, reg: float = 0.01, seed: int = 0) -> list[str]:
    """Learn the rounding of every enabled integer QuantWeight in ``model`` in place.

    Returns the names of the layers whose learned rounding reconstructs their output better than rounding to
    nearest (the others are rounded to nearest, so no layer gets worse).
    """
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantWeight) and m.enabled and not m.fp16]
    g = torch.Generator().manual_seed(seed)
    done = []
    for name, qw in layers:
        captured: list[torch.Tensor] = []
        hook = qw.register_forward_hook(lambda m, i, o: captured.append(i[0].detach()))
        with torch.no_grad():
            for b in batches:
                model(b)
        hook.remove()
        x = torch.cat(captured)
        layer = qw.layer
        w = layer.weight.detach().clone()
        with torch.no_grad():
            target = _forward(layer, x, w)
        shape = (-1,) + (1,) * (w.ndim - 1)
        s = (qw.scale.detach().reshape(shape) if qw.per_channel else qw.scale.detach().reshape(()))
        lo, hi = (-128, 127) if qw.qmax >= 63 else (-qw.qmax - 1, qw.qmax)
        w_floor = torch.floor(w / s)
        rest = (w / s - w_floor).clamp(0.01, 0.99)
        v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))  # h(v) == rest: start at the float
        opt = torch.optim.Adam([v], lr=lr)
        warm = iterations // 5
        for it in range(iterations):
            idx = torch.randint(0, len(x), (min(batch_size, len(x)),), generator=g)
            h = _h(v)
            wq = s * torch.clamp(w_floor + h, lo, hi)
            loss = F.mse_loss(_forward(layer, x[idx], wq), target[idx])
            if it >= warm:
                beta = 20 + (2 - 20) * (it - warm) / max(1, iterations - warm)
                loss = loss + reg * (1 - (2 * h - 1).abs().pow(beta)).sum() / h.numel()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            learned = s * torch.clamp(w_floor + (_h(v) >= 0.5).float(), lo, hi)
            nearest = s * torch.clamp(torch.round(w / s), lo, hi)
            err = {k: float(F.mse_loss(_forward(layer, x, wk), target)) for k, wk in (("learned", learned),
                                                                                   ("nearest", nearest))}
            # keep the learned rounding only where it reconstructs the layer better than rounding to nearest
            if err["learned"] <= err["nearest"]:
                layer.weight.copy_(learned)
                done.append(name)
            else:
                layer.weight.copy_(nearest)
                log.info("adaround: %s keeps round-to-nearest (%.3g < %.3g)", name, err["nearest"], err["learned"])
    log.info("adaround: %d layers", len(done))
    return done

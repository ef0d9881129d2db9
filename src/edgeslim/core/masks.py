"""Weight masks: the one sparsity parametrization every technique uses.

A masked layer computes with ``weight = original * mask`` (a ``torch.nn.utils.parametrize`` parametrization), so
fine-tuning keeps masked weights at zero: their gradient is zero and the mask is re-applied on every forward pass.
Unstructured and N:M pruning attach masks; clustering keeps a pruned layer's zeros; :func:`strip_masks` bakes them
into plain weights. An optional AGP schedule (Zhu & Gupta 2017) lives inside the mask: it counts training steps and
raises its own sparsity along ``s_t = s_f * (1 - (1 - t / T) ** 3)``, recomputing the mask from the surviving
weights every ``every`` steps, so it survives the deep copies verbs and the trainer make.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

#: layer types whose ``weight`` can carry a mask
MASKABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class WeightMask(nn.Module):
    """A weight parametrization multiplying the weight by a 0/1 mask; optionally AGP-scheduled.

    Args:
        mask: initial boolean/0-1 mask shaped like the weight.
        final: AGP final sparsity (0 disables the schedule).
        steps: AGP ramp length in training steps.
        every: AGP mask update period in training steps.
    """

    def __init__(self, mask: torch.Tensor, final: float = 0.0, steps: int = 1, every: int = 1) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.float32))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.final, self.steps, self.every = float(final), int(steps), int(every)

    def target(self, step: int) -> float:
        """AGP sparsity after ``step`` training steps."""
        t = min(max(step, 0) / self.steps, 1.0)
        return self.final * (1.0 - (1.0 - t) ** 3)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.final > 0 and self.training and torch.is_grad_enabled():
            with torch.no_grad():
                self.step += 1
                s = int(self.step)
                if s % self.every == 0 or s == self.steps:
                    self.mask.copy_(magnitude_mask((w * self.mask).detach(), self.target(s)))
        return w * self.mask


def get_mask(module: nn.Module) -> WeightMask | None:
    """The :class:`WeightMask` of a layer's weight, or ``None``."""
    if parametrize.is_parametrized(module, "weight"):
        for p in module.parametrizations["weight"]:
            if isinstance(p, WeightMask):
                return p
    return None


def mask_of(module: nn.Module) -> torch.Tensor | None:
    """The boolean keep-mask of a masked layer, or ``None``."""
    m = get_mask(module)
    return None if m is None else m.mask.bool()


def magnitude_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the ``1 - sparsity`` largest-magnitude entries of ``w`` (ties broken by position)."""
    k = int(round(sparsity * w.numel()))
    mask = torch.ones(w.numel(), dtype=torch.float32, device=w.device)
    if k > 0:
        idx = torch.argsort(w.abs().flatten(), stable=True)[:k]
        mask[idx] = 0.0
    return mask.view_as(w)


def nm_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` largest of every ``m`` consecutive weights along the flattened input dimension.

    ``w`` is ``(out, in, *kernel)``; groups run along ``in * prod(kernel)`` in memory order, which must be
    a multiple of ``m``.
    """
    rows = w.reshape(w.shape[0], -1)
    groups = rows.abs().reshape(rows.shape[0], -1, m)
    keep = torch.topk(groups, n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.float32).scatter_(-1, keep, 1.0)
    return mask.reshape(w.shape)


def attach_mask(module: nn.Module, mask: torch.Tensor, *, final: float = 0.0, steps: int = 1, every: int = 1) -> None:
    """Set (or replace) a layer's mask in place; the weight values themselves are not changed."""
    existing = get_mask(module)
    if existing is not None:
        existing.mask.copy_(mask.to(existing.mask.dtype))
        existing.final, existing.steps, existing.every = float(final), int(steps), int(every)
        return
    parametrize.register_parametrization(module, "weight", WeightMask(mask, final, steps, every), unsafe=True)


def strip_masks(model: nn.Module) -> nn.Module:
    """Remove every mask in place, keeping the zeroed weights as plain parameters; returns ``model``."""
    for m in list(model.modules()):
        if get_mask(m) is not None:
            # a deep copy shares its parametrized class with the original, and removing a parametrization
            # deletes the property from that class: give the module a class of its own first
            cls = type(m)
            own = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
            m.__class__ = type(cls.__name__, cls.__bases__, own)
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
            m._parameters = {"weight": m._parameters.pop("weight"), **m._parameters}  # the usual key order
    return model


def masked_layers(model: nn.Module) -> list[str]:
    """Names of the layers that carry a mask."""
    return sorted(n for n, m in model.named_modules() if get_mask(m) is not None)

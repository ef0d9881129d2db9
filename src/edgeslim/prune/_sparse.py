"""Unstructured and N:M sparsity: magnitude masks (one-shot or AGP-scheduled) and honest storage sizes.

Masks are weight parametrizations (``weight = original * mask``), so fine-tuning with
:func:`edgeslim.train.fit` keeps pruned weights at zero: their gradient is zero and the mask is re-applied
on every forward pass. An AGP mask (Zhu & Gupta 2017) also counts training steps and raises its own
sparsity along ``s_t = s_f * (1 - (1 - t / T) ** 3)``, recomputing the mask from the surviving weights
every ``every`` steps; it lives inside the model, so it survives the deep copy :func:`fit` makes.

Zeros do not make a dense runtime faster: ONNX Runtime and every CPU BLAS compute them anyway. What they
buy is storage (see :func:`sparse_storage`) and, for 2:4 on hardware with sparse tensor cores, speed.
"""

from __future__ import annotations

import bz2
import lzma
import math
import zlib

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class SparsityMask(nn.Module):
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


def get_mask(module: nn.Module) -> SparsityMask | None:
    """The :class:`SparsityMask` of a layer's weight, or ``None``."""
    if parametrize.is_parametrized(module, "weight"):
        for p in module.parametrizations["weight"]:
            if isinstance(p, SparsityMask):
                return p
    return None


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
    """Set (or replace) a layer's sparsity mask; the weight values themselves are not changed."""
    existing = get_mask(module)
    if existing is not None:
        existing.mask.copy_(mask.to(existing.mask.dtype))
        existing.final, existing.steps, existing.every = float(final), int(steps), int(every)
        return
    parametrize.register_parametrization(module, "weight", SparsityMask(mask, final, steps, every), unsafe=True)


def strip_masks(model: nn.Module) -> nn.Module:
    """Remove sparsity masks in place, keeping the zeroed weights as plain parameters (for export)."""
    for m in list(model.modules()):
        if get_mask(m) is not None:
            # a deep copy shares its parametrized class with the original, and removing a parametrization
            # deletes the property from that class: give the module a class of its own first
            cls = type(m)
            own = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
            m.__class__ = type(cls.__name__, cls.__bases__, own)
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
            m._parameters = {"weight": m._parameters.pop("weight"), **m._parameters}
    return model


def sparse_storage(model: nn.Module) -> dict:
    """Bytes needed to store the model's weights densely and in sparse formats (measured, not estimated).

    Formats, over all Conv/Linear weights (other parameters, biases and BatchNorm are stored dense in all):
    ``dense_fp32``; ``bitmask`` (1 bit per weight + FP32 non-zeros); ``csr_u16`` (16-bit column indices
    + FP32 values + row pointers); ``bitmask_lzma`` / ``bitmask_zlib`` / ``bitmask_bz2`` (the bitmask
    stream entropy-coded by each codec, measured by actually compressing it).
    """
    prunable_numel = nnz = 0
    masks: list[np.ndarray] = []
    values: list[np.ndarray] = []
    other_bytes = 0
    csr = 0
    prunable_ids = set()
    for m in model.modules():
        if isinstance(m, PRUNABLE):
            w = m.weight.detach().float().cpu()
            prunable_ids.add(id(m))
            nz = w != 0
            prunable_numel += w.numel()
            nnz += int(nz.sum())
            masks.append(nz.flatten().numpy())
            values.append(w[nz].numpy().astype(np.float32))
            rows = w.shape[0]
            csr += int(nz.sum()) * (2 + 4) + (rows + 1) * 4
    for mod in model.modules():
        for name, p in mod.named_parameters(recurse=False):
            if id(mod) in prunable_ids and name in ("weight", "original"):
                continue
            if name == "original":  # the masked weight's storage of a parametrized layer
                continue
            other_bytes += p.numel() * 4
    bits = np.packbits(np.concatenate(masks)) if masks else np.zeros(0, np.uint8)
    vals = np.concatenate(values).tobytes() if values else b""
    raw = bits.tobytes()
    dense = prunable_numel * 4
    out = {
        "weights": prunable_numel,
        "nonzero": nnz,
        "sparsity": 1 - nnz / prunable_numel if prunable_numel else 0.0,
        "other_params_bytes": other_bytes,
        "dense_fp32": dense + other_bytes,
        "bitmask": len(raw) + len(vals) + other_bytes,
        "csr_u16": csr + other_bytes,
        "bitmask_lzma": len(lzma.compress(raw, preset=9)) + len(lzma.compress(vals, preset=6)) + other_bytes,
        "bitmask_zlib": len(zlib.compress(raw, 9)) + len(zlib.compress(vals, 9)) + other_bytes,
        "bitmask_bz2": len(bz2.compress(raw, 9)) + len(bz2.compress(vals, 9)) + other_bytes,
    }
    best = min(("bitmask", "csr_u16", "bitmask_lzma", "bitmask_zlib", "bitmask_bz2"), key=lambda k: out[k])
    out["best_format"] = best
    out["best_ratio_vs_dense"] = round(out["dense_fp32"] / out[best], 3) if out[best] else math.nan
    return out

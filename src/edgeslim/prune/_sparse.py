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
from torch import nn

from edgeslim.core.masks import (  # noqa: F401  (re-exported: edgeslim.prune's public mask helpers)
    MASKABLE,
    WeightMask,
    attach_mask,
    get_mask,
    magnitude_mask,
    masked_layers,
    nm_mask,
    strip_masks,
)

PRUNABLE = MASKABLE
SparsityMask = WeightMask  # the name used before the mask type moved to edgeslim.core.masks


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

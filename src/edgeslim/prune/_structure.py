"""The structure of a pruned model as data: record it (:func:`snapshot`, :func:`structure_diff`) and replay it on
a fresh copy of the original architecture without any pruning library (:func:`apply_structure`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edgeslim.core.errors import ModelError, near

_ATTR_TYPES = (int, tuple, list)


def snapshot(model: nn.Module) -> dict[str, dict]:
    """Shapes of every direct parameter/buffer and the int-like attributes of every module."""
    snap = {}
    for n, m in model.named_modules():
        attrs = {
            k: v
            for k, v in vars(m).items()
            if not k.startswith("_") and isinstance(v, _ATTR_TYPES) and not isinstance(v, bool) and _plain(v)
        }
        tensors = {k: list(v.shape) for k, v in list(m._parameters.items()) + list(m._buffers.items()) if v is not None}
        snap[n] = {"attrs": attrs, "tensors": tensors}
    return snap


def _plain(v: Any) -> bool:
    if isinstance(v, int):
        return True
    return all(isinstance(x, int) and not isinstance(x, bool) for x in v)


def structure_diff(before: dict[str, dict], model: nn.Module) -> dict[str, dict]:
    """What changed between a snapshot and the (pruned) model: new tensor shapes and attribute values."""
    after = snapshot(model)
    diff = {}
    for n, a in after.items():
        b = before.get(n)
        if b is None:
            raise ModelError(f"pruning added module {n!r}; structured pruning must only shrink modules")
        attrs = {k: list(v) if isinstance(v, tuple) else v for k, v in a["attrs"].items() if b["attrs"].get(k) != v}
        tensors = {k: s for k, s in a["tensors"].items() if b["tensors"].get(k) != s}
        if attrs or tensors:
            diff[n] = {"attrs": attrs, "tensors": tensors}
    return diff


def apply_structure(model: nn.Module, structure: dict[str, dict]) -> nn.Module:
    """Resize a fresh copy of the original architecture to a recorded structure, in place.

    Parameters and buffers get new (uninitialised) storage of the recorded shapes and attributes take
    their recorded values; load the pruned state_dict afterwards.
    """
    modules = dict(model.named_modules())
    for n, change in structure.items():
        m = modules.get(n)
        if m is None:
            raise ModelError(
                f"recipe names module {n!r}, which this model lacks{near(n, modules)}; "
                "load the recipe into the architecture it was made from"
            )
        for k, v in change.get("attrs", {}).items():
            old = getattr(m, k, None)
            setattr(m, k, tuple(v) if isinstance(old, tuple) else v)
        for k, shape in change.get("tensors", {}).items():
            if k in m._parameters and m._parameters[k] is not None:
                old = m._parameters[k]
                m._parameters[k] = nn.Parameter(torch.zeros(shape, dtype=old.dtype), requires_grad=old.requires_grad)
            elif k in m._buffers and m._buffers[k] is not None:
                old = m._buffers[k]
                m._buffers[k] = torch.zeros(shape, dtype=old.dtype)
            else:
                raise ModelError(f"recipe resizes {n}.{k}, which this model does not have")
    return model

"""Counting a torch model: multiply-accumulates of one forward pass and parameters.

MACs come from ``torch.utils.flop_counter`` (flops / 2) on one sample (batch 1), in eval mode with gradients
off. Attention is counted too: PyTorch's fused attention fast path (``aten::_native_multi_head_attention``, taken by
``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` in eval mode without gradients) is invisible to the flop
counter, so it is switched off while counting, and CPU scaled-dot-product attention, which the counter has no
formula for, is counted by one here (``2 * b * heads * s_q * s_k * (d_qk + d_v)`` flops).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from edgeslim.core.errors import EdgeslimError, ModelError

__all__ = ["call", "count_macs", "count_params", "first_sample"]


def call(model: nn.Module, example_inputs: Any) -> Any:
    """Run ``model`` on example inputs given as a tensor, a tuple of positional inputs or a dict of kwargs."""
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def first_sample(example_inputs: Any) -> Any:
    """The first sample (batch 1) of example inputs given as a tensor, a tuple/list or a dict."""
    if isinstance(example_inputs, torch.Tensor):
        return example_inputs[:1]
    if isinstance(example_inputs, dict):
        return {k: v[:1] if isinstance(v, torch.Tensor) else v for k, v in example_inputs.items()}
    if isinstance(example_inputs, (tuple, list)):
        return type(example_inputs)(v[:1] if isinstance(v, torch.Tensor) else v for v in example_inputs)
    return example_inputs


def _sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    """Flops of softmax(q k^T) v: two batched matmuls (``q k^T`` and ``p v``)."""
    *batch, s_q, d_qk = query_shape
    s_k, d_v = key_shape[-2], value_shape[-1]
    n = 1
    for b in batch:
        n *= int(b)
    return 2 * n * int(s_q) * int(s_k) * (int(d_qk) + int(d_v))


def _extra_formulas() -> dict[Any, Any]:
    """Flop formulas for attention kernels ``torch.utils.flop_counter`` does not know (CPU SDPA)."""
    aten = torch.ops.aten
    ops = [getattr(aten, name) for name in ("_scaled_dot_product_flash_attention_for_cpu",) if hasattr(aten, name)]
    return dict.fromkeys(ops, _sdpa_flops)


@contextlib.contextmanager
def _no_fused_attention() -> Iterator[None]:
    """Turn off the fused MHA / encoder-layer fast path (its kernels are not counted) for the duration."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    was = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(was)


def count_macs(model: nn.Module, example_inputs: Any) -> int:
    """Multiply-accumulates of one forward pass of ``model`` at batch 1.

    Args:
        model: any module; it runs in eval mode with gradients off and its training flag is restored after.
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs; only the first
            sample of each tensor is used.

    Raises:
        ModelError: the forward pass fails (the message names the model and the error).
    """
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    try:
        with (
            torch.no_grad(),
            _no_fused_attention(),
            FlopCounterMode(display=False, custom_mapping=_extra_formulas()) as fc,
        ):
            call(model, first_sample(example_inputs))
    except EdgeslimError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of the user's forward becomes one clear line
        msg = str(e).splitlines()[0][:300] if str(e) else ""
        raise ModelError(
            f"cannot count the MACs of {type(model).__name__}: its forward pass failed ({type(e).__name__}: {msg})"
        ) from e
    finally:
        model.train(was)
    return int(fc.get_total_flops() // 2)


def count_params(model: nn.Module) -> int:
    """Parameters of ``model``; a parameter shared by several modules (tied weights) is counted once."""
    return sum(p.numel() for p in model.parameters())  # parameters() yields a shared parameter once

"""The output layout edgeslim's detectors share, and the post-process (NMS) that runs outside their graph.

A detector's forward returns one tensor ``[B, A, 4 + C]``: for each of ``A`` anchor points a box ``x1, y1, x2,
y2`` in input pixels, then ``C`` class scores after a sigmoid (the YOLOv8 layout, without its transpose). NMS is
never part of the model or its exported file, so integer graphs stay free of data-dependent ops; it runs here on
torch tensors or on the numpy arrays a runtime returns.

A torch model says it is such a detector with attributes: ``edgeslim_task = "detect"``, ``num_classes`` and
``edgeslim_output = DETECT_LAYOUT``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from edgeslim.core.errors import ConfigError, ModelError

#: the output layout of edgeslim detectors (recorded on the model as ``edgeslim_output``)
DETECT_LAYOUT = "boxes_xyxy_pixels+class_scores_sigmoid"


def is_detector(model: Any) -> bool:
    """True when ``model`` declares the edgeslim detection layout."""
    return getattr(model, "edgeslim_task", None) == "detect" and getattr(model, "edgeslim_output", None) == (
        DETECT_LAYOUT
    )


def check_detector(model: Any, what: str = "model") -> int:
    """The class count of a torch detector in the edgeslim layout, or a ModelError saying what is missing."""
    if getattr(model, "edgeslim_task", None) != "detect":
        raise ModelError(
            f"{what} {type(model).__name__} does not declare a detection output layout (edgeslim_task="
            f"{getattr(model, 'edgeslim_task', None)!r}); detectors must set edgeslim_task='detect', num_classes "
            f"and edgeslim_output={DETECT_LAYOUT!r} (forward -> [B, A, 4 + num_classes])"
        )
    layout = getattr(model, "edgeslim_output", None)
    if layout != DETECT_LAYOUT:
        raise ModelError(
            f"{what} {type(model).__name__} has output layout edgeslim_output={layout!r}; the only one known is "
            f"{DETECT_LAYOUT!r}"
        )
    n = getattr(model, "num_classes", None)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ModelError(f"{what} {type(model).__name__} has num_classes={n!r}; a detector needs an integer >= 1")
    return n


def check_output(out: Any, num_classes: int, what: str = "detector output") -> None:
    """Raise a ModelError unless ``out`` has the shape ``[B, A, 4 + num_classes]``."""
    shape = tuple(out.shape)
    if len(shape) != 3 or shape[2] != 4 + num_classes:
        raise ModelError(
            f"{what} has shape {shape}; the detection layout {DETECT_LAYOUT!r} for {num_classes} classes is "
            f"[batch, anchors, {4 + num_classes}] (4 box coordinates + class scores)"
        )


def detect_postprocess(
    output: torch.Tensor | np.ndarray,
    *,
    conf: float = 0.001,
    iou: float = 0.6,
    max_det: int = 100,
    pre_nms: int = 3000,
) -> list[dict[str, torch.Tensor]]:
    """Detections per image from a detector's ``[B, A, 4 + C]`` output: class-aware NMS outside the graph.

    Every (anchor, class) pair scoring at least ``conf`` is a candidate (multi-label, as in mAP evaluation);
    the ``pre_nms`` best go through ``torchvision.ops.batched_nms`` at IoU ``iou`` and the ``max_det`` best stay.
    Use ``conf=0.001`` for mAP, ``conf=0.25`` to show detections.

    Returns:
        one dict per image: ``boxes`` ``[N, 4]`` xyxy pixels, ``scores`` ``[N]``, ``labels`` ``[N]`` (0-based).
    """
    from torchvision.ops import batched_nms

    if not 0 <= conf < 1:
        raise ConfigError(f"conf={conf!r} is not allowed; use a score threshold in [0, 1)")
    if not 0 < iou <= 1:
        raise ConfigError(f"iou={iou!r} is not allowed; use an IoU threshold in (0, 1]")
    for name, v in (("max_det", max_det), ("pre_nms", pre_nms)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name}={v!r} is not allowed; use an integer >= 1")
    out = torch.from_numpy(np.asarray(output)) if not isinstance(output, torch.Tensor) else output
    if out.ndim != 3 or out.shape[2] < 5:
        raise ModelError(
            f"detector output has shape {tuple(out.shape)}; expected [batch, anchors, 4 + classes] ({DETECT_LAYOUT})"
        )
    out = out.detach().float().cpu()
    results = []
    for o in out:
        boxes, scores = o[:, :4], o[:, 4:]
        a_idx, c_idx = (scores >= conf).nonzero(as_tuple=True)
        s = scores[a_idx, c_idx]
        if len(s) > pre_nms:
            s, top = s.topk(pre_nms)
            a_idx, c_idx = a_idx[top], c_idx[top]
        b = boxes[a_idx]
        keep = batched_nms(b, s, c_idx, iou)[:max_det]
        results.append({"boxes": b[keep], "scores": s[keep], "labels": c_idx[keep]})
    return results


__all__ = ["DETECT_LAYOUT", "check_detector", "check_output", "detect_postprocess", "is_detector"]

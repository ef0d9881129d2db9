"""Read the raw output of a YOLOv8-style detector file (an Ultralytics ONNX / OpenVINO / TFLite export).

Files exported by Ultralytics for YOLOv8 / YOLO11 detection (``export(format="onnx")`` and its siblings, without
``nms=True``) return one tensor ``[B, 4 + C, A]``: for each of ``A`` anchor points, a box ``cx, cy, w, h`` in input
pixels (or in [0, 1] of the input side for the TFLite export, ``normalized=True``) and then ``C`` class scores
after a sigmoid, with no objectness score. :func:`from_yolov8` turns it into edgeslim's detection layout
``[B, A, 4 + C]`` (box ``x1, y1, x2, y2`` in input pixels, then the class scores), which every edgeslim
post-process (NMS outside the graph) and mAP evaluation reads. Nothing here imports ``ultralytics``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgeslim.core.errors import ConfigError, ModelError


def from_yolov8(
    output: Any,
    *,
    num_classes: int | None = None,
    input_size: float | None = None,
    what: str = "YOLOv8 output",
) -> np.ndarray:
    """A YOLOv8-layout output ``[B, 4 + C, A]`` as edgeslim's layout ``[B, A, 4 + C]`` (xyxy pixels + scores).

    Args:
        output: the file's output (numpy array or torch tensor), ``[B, 4 + C, A]``; a single image's
            ``[4 + C, A]`` is taken as ``B = 1``.
        num_classes: ``C``, checked against the output when given (a file transposed to ``[B, A, 4 + C]`` is then
            recognised and named in the error). Without it, ``C = rows - 4``.
        input_size: when the boxes are normalised to [0, 1] (TFLite exports), the input side in pixels they are
            scaled by; ``None`` for pixel boxes (ONNX, OpenVINO, PyTorch).
        what: how the output is named in error messages (e.g. the file's path).

    Returns:
        float32 ``[B, A, 4 + C]``: ``x1, y1, x2, y2`` then the ``C`` class scores, unchanged.

    Raises:
        ModelError: the output is not ``[B, 4 + C, A]`` (wrong rank, too few rows, or not ``4 + num_classes`` rows).
        ConfigError: ``num_classes`` or ``input_size`` is not allowed.
    """
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
    ):
        raise ConfigError(f"num_classes={num_classes!r} is not allowed; use an integer >= 1 (or None to infer it)")
    if input_size is not None and (
        isinstance(input_size, bool) or not isinstance(input_size, (int, float)) or input_size <= 0
    ):
        raise ConfigError(f"input_size={input_size!r} is not allowed; use the input side in pixels (> 0), or None")
    if hasattr(output, "detach"):  # a torch tensor
        output = output.detach().cpu().numpy()
    out = np.asarray(output, dtype=np.float32)
    if out.ndim == 2:
        out = out[None]
    layout = "[batch, 4 + classes, anchors] (cx, cy, w, h, then class scores; Ultralytics' YOLOv8 export)"
    if out.ndim != 3:
        raise ModelError(f"{what} has shape {tuple(np.shape(output))}; a YOLOv8-style output is {layout}")
    rows = out.shape[1]
    if num_classes is not None and rows != 4 + num_classes:
        hint = (
            f"; it looks transposed ([batch, anchors, {4 + num_classes}]), which is not a YOLOv8 export's layout"
            if out.shape[2] == 4 + num_classes
            else ""
        )
        raise ModelError(
            f"{what} has shape {tuple(out.shape)}: {rows} rows, but {num_classes} classes need {4 + num_classes} "
            f"(4 box values + class scores){hint}; expected {layout}"
        )
    if rows < 5:
        raise ModelError(f"{what} has shape {tuple(out.shape)}: {rows} rows, at least 5 needed; expected {layout}")
    boxes = out[:, :4, :]
    if input_size is not None:
        boxes = boxes * np.float32(input_size)
    cx, cy, w, h = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    xyxy = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)  # [B, A, 4]
    return np.concatenate([xyxy, out[:, 4:, :].transpose(0, 2, 1)], axis=-1).astype(np.float32, copy=False)


__all__ = ["from_yolov8"]

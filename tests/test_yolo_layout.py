"""edgeslim.core.yolo_layout.from_yolov8: Ultralytics' YOLOv8 export layout [B, 4 + C, A] -> edgeslim's [B, A, 4 + C]."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeslim.core.errors import ConfigError, ModelError
from edgeslim.core.yolo_layout import from_yolov8


def _yolo_output(rng: np.random.Generator, batch: int = 2, classes: int = 3, anchors: int = 7):
    """A synthetic YOLOv8 output and the xyxy boxes / scores it encodes."""
    x1 = rng.uniform(0, 100, (batch, anchors))
    y1 = rng.uniform(0, 100, (batch, anchors))
    w = rng.uniform(1, 50, (batch, anchors))
    h = rng.uniform(1, 50, (batch, anchors))
    scores = rng.uniform(0, 1, (batch, anchors, classes))
    out = np.concatenate([np.stack([x1 + w / 2, y1 + h / 2, w, h], axis=1), scores.transpose(0, 2, 1)], axis=1).astype(
        np.float32
    )
    xyxy = np.stack([x1, y1, x1 + w, y1 + h], axis=-1)
    return out, xyxy, scores


def test_boxes_and_scores_land_in_edgeslim_layout():
    out, xyxy, scores = _yolo_output(np.random.default_rng(0))
    got = from_yolov8(out, num_classes=3)
    assert got.shape == (2, 7, 7) and got.dtype == np.float32
    np.testing.assert_allclose(got[..., :4], xyxy, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(got[..., 4:], scores.astype(np.float32))
    # anchor a of image b keeps its own box and scores (no mix-up between the anchor and class axes)
    b, a = 1, 5
    cx, cy, w, h = out[b, :4, a]
    np.testing.assert_allclose(got[b, a, :4], [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], atol=1e-5)
    np.testing.assert_array_equal(got[b, a, 4:], out[b, 4:, a])


def test_torch_input_single_image_and_inferred_classes():
    out, xyxy, _ = _yolo_output(np.random.default_rng(1), batch=1, classes=10, anchors=525)
    got = from_yolov8(torch.from_numpy(out[0]))  # [4 + C, A], a tensor, classes inferred
    assert got.shape == (1, 525, 14)
    np.testing.assert_allclose(got[0, :, :4], xyxy[0], atol=1e-4)


def test_normalised_boxes_are_scaled_by_the_input_side():
    out, xyxy, _ = _yolo_output(np.random.default_rng(2))
    norm = out.copy()
    norm[:, :4] /= 160.0
    got = from_yolov8(norm, num_classes=3, input_size=160)
    np.testing.assert_allclose(got[..., :4], xyxy, atol=1e-3)
    assert not np.allclose(from_yolov8(norm, num_classes=3)[..., :4], xyxy, atol=1e-3)


def test_bad_layouts_name_the_shape_and_the_expected_layout():
    out, _, _ = _yolo_output(np.random.default_rng(3), classes=10, anchors=525)
    with pytest.raises(ModelError, match=r"looks transposed"):
        from_yolov8(out.transpose(0, 2, 1), num_classes=10, what="model.onnx output0")
    with pytest.raises(ModelError, match=r"model.onnx output0 has shape \(2, 525, 14\)"):
        from_yolov8(out.transpose(0, 2, 1), num_classes=10, what="model.onnx output0")
    with pytest.raises(ModelError, match=r"12 rows, but 10 classes need 14"):
        from_yolov8(out[:, :12], num_classes=10)
    with pytest.raises(ModelError, match=r"at least 5"):
        from_yolov8(np.zeros((1, 4, 9), np.float32))
    with pytest.raises(ModelError, match=r"shape \(2, 14, 5, 5\)"):
        from_yolov8(np.zeros((2, 14, 5, 5), np.float32))
    with pytest.raises(ConfigError, match=r"num_classes=0"):
        from_yolov8(out, num_classes=0)
    with pytest.raises(ConfigError, match=r"input_size=-1"):
        from_yolov8(out, input_size=-1)

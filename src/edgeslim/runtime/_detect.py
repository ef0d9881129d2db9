"""Detection accuracy of a model or a deployed file: run it, post-process outside the graph, score with COCO mAP.

``evaluate_detector`` runs a torch detector (``runtime="torch"``) or its exported file in its runtime
(``"onnxruntime"``, or any registered runtime), applies :func:`edgeslim.core.detection.detect_postprocess` to the
``[B, A, 4 + C]`` output and scores the detections with pycocotools through
:func:`edgeslim.core.metrics.coco_map`: the mAP is that of the file as deployed, not of the torch model.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeslim.core.detection import check_detector, check_output, detect_postprocess
from edgeslim.core.errors import DataError, ModelError
from edgeslim.core.progress import bar
from edgeslim.runtime._runners import load, positive_int

log = logging.getLogger(__name__)


def evaluate_detector(
    target: Any,
    dataset: Any,
    *,
    runtime: str = "torch",
    threads: int = 1,
    batch_size: int = 16,
    conf: float = 0.001,
    iou: float = 0.6,
    max_det: int = 100,
) -> dict[str, Any]:
    """COCO mAP of a detector on a detection dataset, measured in ``runtime``.

    Args:
        target: a torch detector in the edgeslim layout (``runtime="torch"``), or an exported file / Artifact
            (``runtime="onnxruntime"`` ...) whose output is ``[B, A, 4 + dataset.num_classes]``.
        dataset: a :class:`edgeslim.data.DetectionDataset` (images in ``[0, 1]``, targets with ``image_id``).
        runtime: where the model runs.
        threads: intra-op threads of the runtime.
        batch_size: images per run (1 for files with a fixed batch of 1).
        conf, iou, max_det: post-process settings (see :func:`edgeslim.core.detection.detect_postprocess`).

    Returns:
        :func:`edgeslim.core.metrics.coco_map`'s dict (``map``, ``map50``, ``map75``, ``per_class``) plus
        ``runtime`` (the runner's description) and ``images``.
    """
    from edgeslim.core.metrics import coco_map

    batch_size = positive_int("batch_size", batch_size)
    if dataset is None or len(dataset) == 0:
        raise DataError("cannot evaluate a detector on an empty dataset")
    n_cls = getattr(dataset, "num_classes", None)
    if isinstance(target, nn.Module):
        model_cls = check_detector(target)
        if n_cls is not None and model_cls < n_cls:
            raise ModelError(
                f"detector {type(target).__name__} has num_classes={model_cls}, the dataset has {n_cls} classes"
            )
        n_cls = model_cls
    elif n_cls is None:
        raise DataError(f"dataset {type(dataset).__name__} has no num_classes: cannot check the file's output layout")
    runner = load(target, runtime, threads=threads)
    if runner.fixed_batch:
        batch_size = runner.fixed_batch
    detections: list[dict] = []
    what = f"{runtime} output of {getattr(target, 'path', target) if not isinstance(target, nn.Module) else type(target).__name__}"
    with runner, bar(desc=f"mAP on {runtime}", total=len(dataset), unit="img") as pb:
        for s in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(s, min(s + batch_size, len(dataset)))]
            x = torch.stack([im for im, _ in items]).numpy()
            if runner.fixed_batch and len(x) < runner.fixed_batch:
                x = np.concatenate([x, np.zeros((runner.fixed_batch - len(x), *x.shape[1:]), x.dtype)])
            out = runner.run(x)
            check_output(out, n_cls, what)
            for (_, t), d in zip(items, detect_postprocess(out[: len(items)], conf=conf, iou=iou, max_det=max_det)):
                detections.append(
                    {
                        "image_id": int(t["image_id"]),
                        "boxes": d["boxes"].numpy(),
                        "scores": d["scores"].numpy(),
                        "labels": d["labels"].numpy(),
                    }
                )
            pb.update(len(items))
    result = dict(coco_map(dataset, detections))
    result["runtime"] = runner.describe()
    result["images"] = len(dataset)
    return result

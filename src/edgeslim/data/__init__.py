"""Datasets: built-in sources (Fashion-MNIST, MNIST-5k, digits, ELPV), users' image folders, calibration sampling,
detection sets in COCO format (the generated ``fmnist-detect``, users' ``coco:`` files).

>>> train, val = edgeslim.data.load("fashion-mnist")
>>> train, val = edgeslim.data.load("fmnist-detect", size=160)      # DetectionDataset: (image, target) items
>>> train, val = edgeslim.data.load("coco:data/annotations/instances.json", size=320)
>>> calib = edgeslim.data.calibration_subset(train, 512)
>>> train, val = edgeslim.data.load("elpv")  # solar cells, 224x224, ImageNet mean/std (pip install elpv-dataset)
>>> train, val = edgeslim.data.load("folder:photos", preprocess=ImagePreprocess(input_size=224, normalize="imagenet"))
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgeslim.core.errors import ConfigError, DataError, near
from edgeslim.data._dataset import ImageDataset, calibration_subset, stratified_split
from edgeslim.data._detection import DetectionDataset, check_classes, coco_source, collate_detection, read_coco
from edgeslim.data._fmnist_detect import fmnist_detect
from edgeslim.data._folder import FolderDataset, ImagePreprocess, folder_shape, model_preprocess
from edgeslim.data._sources import SOURCES, image_folder
from edgeslim.data._text import TextDataset, load_text, text_names

__all__ = [
    "ImageDataset",
    "DetectionDataset",
    "collate_detection",
    "check_classes",
    "read_coco",
    "FolderDataset",
    "ImagePreprocess",
    "folder_shape",
    "model_preprocess",
    "load",
    "calibration_subset",
    "stratified_split",
    "image_folder",
    "names",
    "SOURCES",
    "TextDataset",
    "load_text",
    "text_names",
]


#: built-in sources whose items are (image, target) detection pairs; they take ``size`` and ``limit``
DETECTION_SOURCES = {"fmnist-detect": fmnist_detect}
#: built-in sources that take ``preprocess`` / ``model`` (resized and normalised per item, like image folders)
PREPROCESSED = ("elpv",)


def names() -> list[str]:
    """Names of the built-in dataset sources."""
    return sorted([*SOURCES.names(), *DETECTION_SOURCES])


def load(
    name: str,
    *,
    root: str | Path | None = None,
    seed: int = 0,
    preprocess: ImagePreprocess | Mapping | None = None,
    model: Any = None,
    size: int | None = None,
    limit: int | None = None,
) -> tuple[ImageDataset, ImageDataset] | tuple[DetectionDataset, DetectionDataset]:
    """Load a dataset as ``(train, val)``.

    Args:
        name: a built-in source (see :func:`names`), ``folder:<path>`` for an image folder (streamed from disk),
            or ``coco:<file.json|folder>`` for users' detection data in COCO format. ``elpv`` (solar cells) is
            resized and normalised per item too, by ``preprocess``.
        root: where to look for the files first (built-in sources look in system and cache folders too); for
            ``fmnist-detect``, the folder the generated set is kept in (default ``~/.cache/edgeslim/data``).
        seed: seed of the deterministic train/val split where the source has no official one (for
            ``fmnist-detect``: the generation seed).
        preprocess: for ``folder:`` and ``elpv`` data, resize / crop / normalisation (:class:`ImagePreprocess`).
        model: for ``folder:`` data with ``normalize="model"``, the model whose own preprocessing is used; for
            detection data without ``size``, a detector whose ``input_size`` gives it.
        size: detection data only: side of the square images (generated data: 160 or 320; ``coco:`` data: a
            multiple of 32); default the ``model``'s ``input_size``, else 320.
        limit: detection data only: keep the first ``limit`` images of each split (``fmnist-detect`` then
            generates only those; they are the full set's first images).
    """
    name = str(name)
    if name.startswith("coco:") or name in DETECTION_SOURCES:
        if preprocess is not None:
            raise DataError(f"preprocess applies to folder:<path> datasets; detection data {name!r} takes size=")
        own = getattr(model, "input_size", None) if getattr(model, "edgeslim_task", None) == "detect" else None
        if size is None and isinstance(own, int) and not isinstance(own, bool):
            size = own
        if name.startswith("coco:"):
            return coco_source(name[len("coco:") :], size=320 if size is None else size, seed=seed, limit=limit)
        return DETECTION_SOURCES[name](root=root, seed=seed, size=320 if size is None else size, limit=limit)
    if size is not None or limit is not None:
        raise DataError(f"size= and limit= apply to detection data (fmnist-detect, coco:<path>), not to {name!r}")
    if name.startswith("folder:"):
        return image_folder(str(name)[len("folder:") :], preprocess=preprocess, model=model, seed=seed)
    if name not in SOURCES:
        raise ConfigError(
            f"unknown dataset {name!r}{near(name, names())}; valid: {', '.join(names())}, folder:<path>, coco:<path>"
        )
    source = SOURCES.get(name)
    if name in PREPROCESSED:
        return source(root=root, seed=seed, preprocess=preprocess, model=model)
    if preprocess is not None:
        raise DataError(
            f"preprocess (--input-size, --normalize) applies to folder:<path> and {', '.join(PREPROCESSED)} datasets; "
            f"{name!r} has its own fixed size and normalisation"
        )
    return source(root=root, seed=seed)

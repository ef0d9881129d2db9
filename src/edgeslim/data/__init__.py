"""Datasets: built-in sources (Fashion-MNIST, MNIST-5k, digits, ELPV), users' image folders, calibration sampling.

>>> train, val = edgeslim.data.load("fashion-mnist")
>>> calib = edgeslim.data.calibration_subset(train, 512)
>>> train, val = edgeslim.data.load("elpv")  # solar cells, 224x224, ImageNet mean/std (pip install elpv-dataset)
>>> train, val = edgeslim.data.load("folder:photos", preprocess=ImagePreprocess(input_size=224, normalize="imagenet"))
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgeslim.core.errors import DataError
from edgeslim.data._dataset import ImageDataset, calibration_subset, stratified_split
from edgeslim.data._folder import FolderDataset, ImagePreprocess, folder_shape, model_preprocess
from edgeslim.data._sources import SOURCES, image_folder
from edgeslim.data._text import TextDataset, load_text, text_names

__all__ = [
    "ImageDataset",
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


#: built-in sources that take ``preprocess`` / ``model`` (resized and normalised per item, like image folders)
PREPROCESSED = ("elpv",)


def names() -> list[str]:
    """Names of the built-in dataset sources."""
    return SOURCES.names()


def load(
    name: str,
    *,
    root: str | Path | None = None,
    seed: int = 0,
    preprocess: ImagePreprocess | Mapping | None = None,
    model: Any = None,
) -> tuple[ImageDataset, ImageDataset]:
    """Load a dataset as ``(train, val)``.

    Args:
        name: a built-in source (see :func:`names`), or ``folder:<path>`` for an image folder (streamed from disk).
            ``elpv`` (solar cells) is resized and normalised per item too, by ``preprocess``.
        root: where to look for the files first (built-in sources look in system and cache folders too).
        seed: seed of the deterministic train/val split where the source has no official one.
        preprocess: for ``folder:`` and ``elpv`` data, resize / crop / normalisation (:class:`ImagePreprocess`).
        model: for ``folder:`` data with ``normalize="model"``, the model whose own preprocessing is used.
    """
    if str(name).startswith("folder:"):
        return image_folder(str(name)[len("folder:") :], preprocess=preprocess, model=model, seed=seed)
    source = SOURCES.get(name)
    if name in PREPROCESSED:
        return source(root=root, seed=seed, preprocess=preprocess, model=model)
    if preprocess is not None:
        raise DataError(
            f"preprocess (--input-size, --normalize) applies to folder:<path> and {', '.join(PREPROCESSED)} datasets; "
            f"{name!r} has its own fixed size and normalisation"
        )
    return source(root=root, seed=seed)

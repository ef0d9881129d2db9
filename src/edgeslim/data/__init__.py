"""Datasets: built-in sources (Fashion-MNIST, MNIST-5k, digits), users' image folders, calibration sampling.

>>> train, val = edgeslim.data.load("fashion-mnist")
>>> calib = edgeslim.data.calibration_subset(train, 512)
"""

from __future__ import annotations

from pathlib import Path

from edgeslim.data._dataset import ImageDataset, calibration_subset, stratified_split
from edgeslim.data._sources import SOURCES, image_folder
from edgeslim.data._text import TextDataset, load_text, text_names

__all__ = [
    "ImageDataset",
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


def names() -> list[str]:
    """Names of the built-in dataset sources."""
    return SOURCES.names()


def load(name: str, *, root: str | Path | None = None, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
    """Load a dataset as ``(train, val)``.

    Args:
        name: a built-in source (see :func:`names`), or ``folder:<path>`` for an image folder.
        root: where to look for the files first (built-in sources look in system and cache folders too).
        seed: seed of the deterministic train/val split where the source has no official one.
    """
    if str(name).startswith("folder:"):
        return image_folder(str(name)[len("folder:") :], seed=seed)
    return SOURCES.get(name)(root=root, seed=seed)

"""ELPV: 2,624 electroluminescence images of solar-cell crops, the pictures an inspection camera on a module line takes.

The images come from PyPI ``elpv-dataset`` (Buerhop-Lutz et al. 2018, Deitsch et al. 2019; CC-BY-NC-SA 4.0: installed
on the user's machine, never shipped with edgeslim). Each is a 300x300 8-bit grayscale cell of a monocrystalline or a
polycrystalline module, rated by experts with a defect probability of 0, 1/3, 2/3 or 1.

Labels: two classes, ``functional`` (probability < 0.5: ratings 0 and 1/3) and ``defective`` (>= 0.5: ratings 2/3
and 1). That is the binary task Deitsch et al. evaluate beside the four-way one; it is what an inspection station
decides (pass or pull the module), and the uncertain middle ratings (1/3, 2/3: 15% of the cells) go to the side
their rater leaned to. The split is 1,803 functional / 821 defective.

Split: seeded, 75 / 25 train / validation, stratified by label *and* cell type (mono / poly), so both splits keep
the same four proportions; ``seed`` picks a different but equally stratified split.

Pixels: the package's whole uint8 array (236 MB) stays in memory; each item is resized (stretched by default: the
cell fills the frame, and a center crop would cut defects at its borders), replicated to three channels (unless
``grayscale``) and normalised (ImageNet mean/std by default) only when it is asked for, as image folders are.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeslim.core.errors import DataError
from edgeslim.data._dataset import stratified_split
from edgeslim.data._folder import (
    STATS_SAMPLES,
    FolderDataset,
    ImagePreprocess,
    Normalize,
    Resize,
    _dataset_stats,
    _Decoder,
    _resolve,
    as_preprocess,
)

log = logging.getLogger(__name__)

ELPV_CLASSES = ("functional", "defective")
#: defect probability at or above which a cell is labelled defective
DEFECT_THRESHOLD = 0.5
#: share of every (label, cell type) stratum held out for validation
VAL_FRACTION = 0.25
#: the preprocessing used when none is given: 224x224, whole cell stretched, ImageNet mean/std, RGB
DEFAULT_PREPROCESS = ImagePreprocess(input_size=224, resize=Resize.STRETCH, normalize=Normalize.IMAGENET)
INSTALL = (
    "pip install elpv-dataset==1.0.0.post1 (or pip install 'edgeslim[elpv]'; the images are CC-BY-NC-SA 4.0: "
    "installed on your machine, never redistributed with edgeslim)"
)


class _ArrayDecoder(_Decoder):
    """Turns row ``i`` of an in-memory uint8 ``(N, H, W)`` grayscale array into uint8 ``(C, h, w)``."""

    def __init__(self, pixels: np.ndarray, like: _Decoder, grayscale: bool) -> None:
        super().__init__(like.out_hw, like.resize_short, grayscale)
        self.pixels = pixels

    def __call__(self, i: Any) -> torch.Tensor:  # type: ignore[override]
        from PIL import Image

        self.decoded += 1
        out = self.fit(Image.fromarray(self.pixels[int(i)]))  # resized in grayscale: 3x less work
        return out if self.mode == "L" else out.expand(3, -1, -1).contiguous()


def load_elpv_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(images uint8 (N, 300, 300), defect probabilities (N,), cell types (N,) 'mono'/'poly')`` from the package."""
    try:
        from elpv_dataset.utils import load_dataset
    except ImportError:
        raise DataError(f"dataset 'elpv' needs the elpv-dataset package: {INSTALL}") from None
    try:
        images, probs, types = load_dataset()
    except Exception as e:  # a damaged install: missing PNGs or labels.csv
        raise DataError(f"dataset 'elpv': the installed elpv-dataset package cannot be read ({e}); {INSTALL}") from None
    images = np.asarray(images)
    if images.ndim != 3 or images.dtype != np.uint8 or not len(images) == len(probs) == len(types):
        raise DataError(
            f"dataset 'elpv': unexpected package contents (images {images.shape} {images.dtype}, {len(probs)} labels, "
            f"{len(types)} cell types); {INSTALL}"
        )
    return images, np.asarray(probs, dtype=np.float64), np.asarray(types).astype(str)


def elpv_labels(probs: np.ndarray) -> np.ndarray:
    """0 (functional) where the defect probability is below :data:`DEFECT_THRESHOLD`, else 1 (defective)."""
    return (np.asarray(probs) >= DEFECT_THRESHOLD).astype(np.int64)


def elpv_split(labels: np.ndarray, types: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, val) indices, :data:`VAL_FRACTION` of every (label, cell type) stratum held out."""
    kinds = {t: k for k, t in enumerate(sorted(set(types.tolist())))}
    strata = np.asarray(labels) * len(kinds) + np.array([kinds[t] for t in types.tolist()], dtype=np.int64)
    return stratified_split(strata, VAL_FRACTION, seed)


def elpv_preprocess(preprocess: ImagePreprocess | Mapping | None) -> ImagePreprocess:
    """The preprocessing of ELPV items: an ImagePreprocess as given, a mapping's fields over
    :data:`DEFAULT_PREPROCESS` (so ``{"input_size": 96}`` keeps stretch and ImageNet mean/std), None the default."""
    if preprocess is None:
        return DEFAULT_PREPROCESS
    if isinstance(preprocess, Mapping):
        return as_preprocess({**DEFAULT_PREPROCESS.to_dict(), **dict(preprocess)})
    return as_preprocess(preprocess)


def elpv_shape(preprocess: ImagePreprocess | Mapping | None = None) -> tuple[tuple[int, int, int], int]:
    """``(input_shape, num_classes)`` of ELPV under a preprocessing, without reading the images."""
    pre = elpv_preprocess(preprocess)
    side = pre.input_size or DEFAULT_PREPROCESS.input_size
    return (1 if pre.grayscale else 3, side, side), len(ELPV_CLASSES)


def elpv(
    root: str | Path | None = None,
    seed: int = 0,
    *,
    preprocess: ImagePreprocess | Mapping | None = None,
    model: Any = None,
) -> tuple[FolderDataset, FolderDataset]:
    """ELPV solar cells, functional vs defective (see the module docstring for the label scheme and split).

    Args:
        root: not used (the images come from the installed ``elpv-dataset`` package); giving one is an error.
        seed: seed of the stratified 75/25 split.
        preprocess: size / resize / normalisation: an :class:`ImagePreprocess` as it is, or a mapping of some of
            its fields over :data:`DEFAULT_PREPROCESS` (224x224 stretched, ImageNet mean/std; the CLI's
            ``--input-size`` / ``--resize`` / ``--normalize`` arrive so). An ``input_size`` of None means 224.
        model: the model whose own mean/std ``normalize="model"`` reads.
    """
    if root is not None:
        raise DataError(
            f"dataset 'elpv' reads the installed elpv-dataset package, not a folder (root={str(root)!r}); leave root "
            "out, or put the images in class folders and use folder:<path>"
        )
    pre = elpv_preprocess(preprocess)
    if pre.input_size is None and not (Normalize(pre.normalize) is Normalize.MODEL and model is not None):
        pre = pre.replace(input_size=DEFAULT_PREPROCESS.input_size)
    images, probs, types = load_elpv_arrays()
    labels = elpv_labels(probs)
    like, mean, std, info = _resolve(pre, model, Path("elpv"), None)
    dec = _ArrayDecoder(images, like, pre.grayscale)
    info = {**info, "labels": f"defective = defect probability >= {DEFECT_THRESHOLD}"}
    full = FolderDataset(
        "elpv",
        "all",
        list(range(len(images))),
        torch.from_numpy(labels),
        ELPV_CLASSES,
        mean or (0.0,) * dec.shape[0],
        std or (1.0,) * dec.shape[0],
        "elpv_dataset.utils.load_dataset",
        dec,
        info,
    )
    tr, va = elpv_split(labels, types, seed)
    train, val = full.subset(tr, "train"), full.subset(va, "val")
    if mean is None:  # normalize="dataset": statistics of training images, used by both splits
        mean, std, train = _dataset_stats(train, seed)
        info["from"] = f"dataset statistics of {min(len(train), STATS_SAMPLES)} training images"
        for ds in (train, val):
            ds.mean, ds.std = mean, std
    log.info("elpv: %d train / %d val cells, %s", len(train), len(val), info["resize"])
    return train, val

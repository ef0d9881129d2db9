"""Users' image folders, streamed from disk with the preprocessing vision models expect.

``root/<class>/<image>`` (or ``root/train/<class>`` and ``root/val/<class>``) becomes a :class:`FolderDataset`: the
file list and labels are read at once, the pixels only when a sample is asked for (``batches``, ``take``,
``__getitem__``). :class:`ImagePreprocess` says how each image becomes a tensor: resized (shorter side to
``input_size / crop_fraction``, then center-cropped to ``input_size``, as torchvision and timm evaluate) or
stretched, then normalised by a preset: ``imagenet`` mean/std, ``0.5`` (mean 0.5, std 0.5), ``model`` (the model's
own, from timm's ``pretrained_cfg`` or torchvision's weights metadata) or ``dataset`` (statistics of up to
:data:`STATS_SAMPLES` training images).

``normalized()`` (every sample as one tensor) decodes the whole split once and keeps it, as long as that stays
below ``EDGESLIM_DATA_MEMORY_MB`` (default 2048 MB); above it, it raises and names ``batches()`` / ``take()``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeslim.core.config import Config, StrEnum
from edgeslim.core.errors import DataError
from edgeslim.data._dataset import ImageDataset, stratified_split

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: most training images decoded to compute ``normalize="dataset"`` statistics (a seeded sample)
STATS_SAMPLES = 256
#: default cap, in MB, on what ``normalized()`` may hold in memory (override: EDGESLIM_DATA_MEMORY_MB)
MEMORY_CAP_MB = 2048


class Resize(StrEnum):
    """``crop``: shorter side to ``input_size / crop_fraction``, then a centered ``input_size`` square;
    ``stretch``: resized to ``input_size`` x ``input_size`` whatever the aspect ratio."""

    CROP = "crop"
    STRETCH = "stretch"


class Normalize(StrEnum):
    """Per-channel mean/std: ``imagenet``, ``0.5`` (0.5/0.5), ``model`` (the model's own), ``dataset``."""

    IMAGENET = "imagenet"
    HALF = "0.5"
    MODEL = "model"
    DATASET = "dataset"

    @classmethod
    def _missing_(cls, value: object) -> Normalize | None:
        # YAML reads an unquoted `normalize: 0.5` as a number
        return cls.HALF if isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0.5 else None


@dataclass(frozen=True)
class ImagePreprocess(Config):
    """How an image file becomes a model input.

    Attributes:
        input_size: side of the square input (e.g. 224); ``None`` keeps the first image's size (every image is
            stretched to it), or with ``normalize="model"`` takes the model's own input size.
        resize: ``crop`` (default) or ``stretch`` (:class:`Resize`); used when ``input_size`` is set.
        crop_fraction: with ``crop``, the share of the resized image kept (0.875: 256 -> 224).
        normalize: ``imagenet``, ``0.5``, ``model`` or ``dataset`` (default; :class:`Normalize`).
        grayscale: one channel instead of RGB.
    """

    kind = "image_preprocess"

    input_size: int | None = None
    resize: Resize = Resize.CROP
    crop_fraction: float = 0.875
    normalize: Normalize = Normalize.DATASET
    grayscale: bool = False

    def validate(self) -> None:
        if self.input_size is not None and not 1 <= self.input_size <= 4096:
            raise self._bad("input_size", "give a side length in pixels from 1 to 4096, or None")
        if not 0.0 < self.crop_fraction <= 1.0:
            raise self._bad("crop_fraction", "give a fraction in (0, 1], e.g. 0.875")


def model_preprocess(model: Any) -> dict | None:
    """The preprocessing a model declares (mean, std, input_size, crop_fraction), or None.

    edgeslim records it for ``torchvision:`` and ``timm:`` sources; any timm model carries a ``pretrained_cfg``.
    """
    pre = getattr(model, "edgeslim_preprocess", None)
    if isinstance(pre, Mapping) and pre.get("mean") and pre.get("std"):
        return dict(pre)
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, Mapping) and cfg.get("mean") and cfg.get("std"):
        return {
            "mean": tuple(float(v) for v in cfg["mean"]),
            "std": tuple(float(v) for v in cfg["std"]),
            "input_size": int(cfg.get("input_size", (3, 224, 224))[-1]),
            "crop_fraction": float(cfg.get("crop_pct") or 0.875),
            "from": "timm pretrained_cfg",
        }
    return None


class _Decoder:
    """Reads one file into uint8 ``(C, H, W)`` at the dataset's size; counts its decodes."""

    def __init__(self, out_hw: tuple[int, int], resize_short: int | None, grayscale: bool) -> None:
        self.out_hw = out_hw
        self.resize_short = resize_short  # None: stretch to out_hw
        self.mode = "L" if grayscale else "RGB"
        self.decoded = 0

    @property
    def shape(self) -> tuple[int, int, int]:
        return (1 if self.mode == "L" else 3, *self.out_hw)

    def __call__(self, path: Path) -> torch.Tensor:
        from PIL import Image

        try:
            with Image.open(path) as f:
                im = f.convert(self.mode)
        except Exception as e:  # PIL raises many types for bad files
            raise DataError(f"cannot read image {str(path)!r}: {e}") from None
        self.decoded += 1
        return self.fit(im)

    def fit(self, im: Any) -> torch.Tensor:
        """A PIL image resized (and cropped) to the dataset's size, as uint8 ``(C, H, W)``."""
        from PIL import Image

        h, w = self.out_hw
        if self.resize_short is None:
            im = im.resize((w, h), Image.BILINEAR)
        else:
            s = self.resize_short
            scale = s / min(im.width, im.height)
            rw, rh = max(w, round(im.width * scale)), max(h, round(im.height * scale))
            im = im.resize((rw, rh), Image.BILINEAR)
            left, top = (rw - w) // 2, (rh - h) // 2
            im = im.crop((left, top, left + w, top + h))
        a = np.asarray(im, dtype=np.uint8)
        return torch.from_numpy(a[None].copy() if a.ndim == 2 else a.transpose(2, 0, 1).copy())


def _cap_bytes() -> int:
    raw = os.environ.get("EDGESLIM_DATA_MEMORY_MB", str(MEMORY_CAP_MB))
    try:
        return int(float(raw) * 2**20)
    except ValueError:
        raise DataError(f"EDGESLIM_DATA_MEMORY_MB={raw!r} is not a number of megabytes") from None


class _Batches(Sequence):
    """``(x, y)`` batches of a folder dataset, decoded when indexed (a list-like view: len, index, iterate)."""

    def __init__(self, ds: FolderDataset, size: int) -> None:
        self.ds, self.size = ds, size

    def __len__(self) -> int:
        return (len(self.ds) + self.size - 1) // self.size

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        lo, hi = i * self.size, min(len(self.ds), (i + 1) * self.size)
        return self.ds._normalize(self.ds._u8_range(lo, hi)), self.ds.labels[lo:hi]


class FolderDataset(ImageDataset):
    """An :class:`ImageDataset` whose pixels stay on disk until asked for; same interface, same verbs.

    ``images`` and ``normalized()`` decode every file once and keep the result (within the memory cap);
    ``batches()``, ``take()`` and indexing decode only what they return. ``decoded`` counts the files read.
    """

    def __init__(
        self,
        name: str,
        split: str,
        files: Sequence[Path],
        labels: torch.Tensor,
        classes: tuple[str, ...],
        mean: tuple[float, ...],
        std: tuple[float, ...],
        source: str,
        decoder: _Decoder,
        preprocess: dict,
    ) -> None:
        self.name, self.split, self.files, self.labels = name, split, tuple(files), labels
        self.classes, self.mean, self.std, self.source = classes, tuple(mean), tuple(std), source
        self._decoder = decoder
        self.preprocess = preprocess
        self._u8: torch.Tensor | None = None
        self._cache = None
        if len(self.files) != len(self.labels):
            raise DataError(f"dataset {name!r}: {len(self.files)} files but {len(self.labels)} labels")

    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return f"FolderDataset({self.name!r}, {self.split!r}, {len(self)} images of {self.input_shape})"

    def __len__(self) -> int:
        return len(self.files)

    @property
    def decoded(self) -> int:
        """How many image files have been decoded so far (by this dataset and the splits it shares files with)."""
        return self._decoder.decoded

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self._decoder.shape

    def _check_cap(self, bytes_per_value: int, what: str) -> None:
        need = len(self) * int(np.prod(self.input_shape)) * bytes_per_value
        cap = _cap_bytes()
        if need > cap:
            raise DataError(
                f"dataset {self.name!r} ({self.split}): {what} of its {len(self):,} images of shape "
                f"{self.input_shape} needs {need / 2**20:,.0f} MB, more than the {cap / 2**20:,.0f} MB cap "
                "(EDGESLIM_DATA_MEMORY_MB); stream it with .batches(size), or use .take(n) for a subset"
            )

    def _u8_range(self, lo: int, hi: int) -> torch.Tensor:
        if self._u8 is not None:
            return self._u8[lo:hi]
        out = torch.empty((hi - lo, *self.input_shape), dtype=torch.uint8)
        for j, i in enumerate(range(lo, hi)):
            out[j] = self._decoder(self.files[i])
        return out

    def _normalize(self, u8: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        return (u8.float() / 255.0 - mean) / std

    @property
    def images(self) -> torch.Tensor:  # type: ignore[override]
        """Every image as uint8 ``(N, C, H, W)``: decoded once, then kept (within the memory cap)."""
        if self._u8 is None:
            self._check_cap(1, "holding the uint8 pixels")
            log.info("decoding %d images of %s (%s)", len(self), self.name, self.split)
            self._u8 = self._u8_range(0, len(self))
        return self._u8

    def normalized(self) -> torch.Tensor:
        """All images as normalised float32 ``(N, C, H, W)``, decoded once and kept (within the memory cap)."""
        if self._cache is None:
            self._check_cap(5, "holding the normalised float32 inputs (and their uint8 pixels)")
            self._cache = self._normalize(self.images)
        return self._cache

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self._cache is not None:
            return self._cache[i], int(self.labels[i])
        return self._normalize(self._u8_range(i, i + 1))[0], int(self.labels[i])

    def subset(self, indices: Any, split: str | None = None) -> FolderDataset:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        out = FolderDataset(
            self.name,
            split or self.split,
            [self.files[i] for i in idx],
            self.labels[torch.as_tensor(idx, dtype=torch.long)],
            self.classes,
            self.mean,
            self.std,
            self.source,
            self._decoder,
            self.preprocess,
        )
        if self._u8 is not None:  # already decoded: the subset shares the pixels
            out._u8 = self._u8[torch.as_tensor(idx, dtype=torch.long)]
        return out

    def batches(self, batch_size: int = 256) -> Sequence[tuple[torch.Tensor, torch.Tensor]]:  # type: ignore[override]
        """Fixed-order (x, y) batches of normalised inputs, each decoded when it is used."""
        if self._cache is not None:
            return super().batches(batch_size)
        return _Batches(self, batch_size)

    def describe(self) -> dict:
        return {**super().describe(), "preprocess": dict(self.preprocess), "streamed": self._u8 is None}


def _scan(root: Path) -> tuple[dict[str, Path], list[str], dict[str, tuple[list[Path], list[int]]]]:
    if not root.is_dir():
        raise DataError(f"image folder {str(root)!r} does not exist or is not a folder")
    split_dirs = {s: root / s for s in ("train", "val") if (root / s).is_dir()}
    layout = split_dirs if len(split_dirs) == 2 else {"all": root}
    classes = sorted(
        {p.name for d in layout.values() for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")}
    )
    if not classes:
        raise DataError(f"image folder {str(root)!r} has no class subfolders (expected {root}/<class>/<image>)")
    parts: dict[str, tuple[list[Path], list[int]]] = {}
    for split, d in layout.items():
        files: list[Path] = []
        labels: list[int] = []
        for ci, c in enumerate(classes):
            if (d / c).is_dir():
                found = sorted(p for p in (d / c).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
                files += found
                labels += [ci] * len(found)
        if not files:
            raise DataError(f"image folder {str(d)!r} holds no images with suffixes {sorted(IMAGE_SUFFIXES)}")
        parts[split] = (files, labels)
    return layout, classes, parts


def _resolve(
    pre: ImagePreprocess, model: Any, first: Path, size: tuple[int, int] | None
) -> tuple[_Decoder, tuple[float, ...] | None, tuple[float, ...] | None, dict]:
    """The decoder and (for fixed presets) mean/std of a preprocessing; ``dataset`` stats come later."""
    channels = 1 if pre.grayscale else 3
    input_size, crop = pre.input_size, pre.crop_fraction
    mean = std = None
    norm = Normalize(pre.normalize)
    origin = norm.value
    if norm is Normalize.MODEL:
        mp = model_preprocess(model) if model is not None else None
        if mp is None:
            raise DataError(
                "normalize='model' needs a model that declares its preprocessing (timm models, torchvision:NAME "
                f"sources){'' if model is not None else '; no model was given'}; use imagenet, 0.5 or dataset"
            )
        mean, std, origin = tuple(mp["mean"]), tuple(mp["std"]), str(mp.get("from", "model"))
        if input_size is None:
            input_size, crop = int(mp["input_size"]), float(mp.get("crop_fraction", crop))
    elif norm is Normalize.IMAGENET:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    elif norm is Normalize.HALF:
        mean, std = (0.5,) * channels, (0.5,) * channels
    if mean is not None and len(mean) != channels:
        raise DataError(
            f"normalize={norm.value!r} has {len(mean)} channel means but the images are "
            f"{'grayscale' if channels == 1 else 'RGB'}; use 0.5 or dataset"
        )
    if size is not None:  # an exact (height, width), stretched (image_folder(size=...))
        dec = _Decoder((int(size[0]), int(size[1])), None, pre.grayscale)
        how = f"stretched to {size[0]}x{size[1]}"
    elif input_size is None:
        from PIL import Image

        try:
            with Image.open(first) as f:
                hw = (f.height, f.width)
        except Exception as e:  # PIL raises many types for bad files
            raise DataError(f"cannot read image {str(first)!r}: {e}") from None
        dec = _Decoder(hw, None, pre.grayscale)
        how = f"stretched to the first image's size {hw[0]}x{hw[1]} (give input_size to choose)"
    elif Resize(pre.resize) is Resize.STRETCH:
        dec = _Decoder((input_size, input_size), None, pre.grayscale)
        how = f"stretched to {input_size}x{input_size}"
    else:
        short = max(input_size, round(input_size / crop))
        dec = _Decoder((input_size, input_size), short, pre.grayscale)
        how = f"shorter side to {short}, center crop {input_size}x{input_size}"
    info = {"resize": how, "normalize": norm.value, "from": origin, "grayscale": pre.grayscale}
    return dec, mean, std, info


def _dataset_stats(ds: FolderDataset, seed: int) -> tuple[tuple[float, ...], tuple[float, ...], FolderDataset]:
    """Per-channel mean/std of up to STATS_SAMPLES seeded training images (all of a small split, then kept)."""
    sample = ds.take(STATS_SAMPLES, seed=seed) if len(ds) > STATS_SAMPLES else ds
    u8 = sample._u8_range(0, len(sample))
    if sample is ds:
        ds._u8 = u8  # a small split is then decoded once, not twice
    x = u8.float() / 255.0
    mean = tuple(float(v) for v in x.mean(dim=(0, 2, 3)))
    std = tuple(max(float(v), 1e-3) for v in x.std(dim=(0, 2, 3)))
    return mean, std, ds


def as_preprocess(preprocess: ImagePreprocess | Mapping | None) -> ImagePreprocess:
    if preprocess is None:
        return ImagePreprocess()
    if isinstance(preprocess, ImagePreprocess):
        return preprocess
    if isinstance(preprocess, Mapping):
        return ImagePreprocess.from_dict(dict(preprocess))
    raise DataError(
        f"preprocess must be an ImagePreprocess or a mapping of its fields, got {type(preprocess).__name__}"
    )


def image_folder(
    root: str | Path,
    *,
    preprocess: ImagePreprocess | Mapping | None = None,
    model: Any = None,
    size: tuple[int, int] | None = None,
    grayscale: bool = False,
    seed: int = 0,
    val_fraction: float = 0.2,
) -> tuple[FolderDataset, FolderDataset]:
    """Users' own images: ``root/<class>/<image>``, or ``root/train/<class>`` and ``root/val/<class>``.

    Args:
        root: the folder.
        preprocess: resize / crop / normalisation (:class:`ImagePreprocess`; default: the first image's size,
            dataset statistics).
        model: the model the data is for, read by ``normalize="model"``.
        size: an exact ``(height, width)`` every image is stretched to (overrides ``preprocess.input_size``).
        grayscale: one channel (same as ``preprocess.grayscale``).
        seed: seed of the stratified split (without train/val subfolders) and of the statistics sample.
        val_fraction: the share of each class held out for validation without train/val subfolders.

    Files are listed at once and decoded when used; see :class:`FolderDataset`.
    """
    pre = as_preprocess(preprocess)
    if grayscale and not pre.grayscale:
        pre = pre.replace(grayscale=True)
    root = Path(root)
    _, classes, parts = _scan(root)
    first = next(iter(parts.values()))[0][0]
    dec, mean, std, info = _resolve(pre, model, first, size)
    name = f"folder:{root}"
    full = {
        split: FolderDataset(
            name,
            split,
            files,
            torch.tensor(labels, dtype=torch.long),
            tuple(classes),
            mean or (0.0,) * dec.shape[0],
            std or (1.0,) * dec.shape[0],
            str(root),
            dec,
            info,
        )
        for split, (files, labels) in parts.items()
    }
    if "all" in full:
        tr_idx, va_idx = stratified_split(full["all"].labels.numpy(), val_fraction, seed)
        train, val = full["all"].subset(tr_idx, "train"), full["all"].subset(va_idx, "val")
    else:
        train, val = full["train"], full["val"]
    if mean is None:  # dataset statistics, from the training split; validation uses the same
        mean, std, train = _dataset_stats(train, seed)
        info["from"] = f"dataset statistics of {min(len(train), STATS_SAMPLES)} training images"
        for ds in (train, val):
            ds.mean, ds.std = mean, std
    log.info("image folder %s: %d train / %d val images, %s", root, len(train), len(val), info["resize"])
    return train, val


def folder_shape(
    root: str | Path, *, preprocess: ImagePreprocess | Mapping | None = None, model: Any = None
) -> tuple[tuple[int, int, int], int]:
    """``(input_shape, num_classes)`` of an image folder, without decoding its images (a model is sized by it)."""
    pre = as_preprocess(preprocess)
    if Normalize(pre.normalize) is Normalize.MODEL and model is None:
        pre = pre.replace(normalize=Normalize.DATASET)  # only the size matters here
    _, classes, parts = _scan(Path(root))
    dec, *_ = _resolve(pre, model, next(iter(parts.values()))[0][0], None)
    return dec.shape, len(classes)

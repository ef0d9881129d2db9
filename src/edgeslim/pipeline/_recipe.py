"""``edgeslim.save`` / ``edgeslim.load``: one recipe file for any chain of steps.

The file holds where the model came from (a zoo name and dataset, a torchvision / timm / hf source with its literal
arguments, or a user factory), the ordered steps every verb recorded (technique, config, the structure replay
needs) and one state_dict; it is read with ``weights_only=True``, never as a pickled module. ``load`` rebuilds zoo,
torchvision, timm and hf models by itself; a model from user code needs ``model=`` (a fresh instance): edgeslim
never runs code because a file names it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from edgeslim.core import recipe as _recipe
from edgeslim.core.errors import ModelError


def save(model: nn.Module, path: str | os.PathLike, *, force: bool = False, half: bool = False) -> Path:
    """Write ``model``'s recipe and state_dict to ``path`` (atomically; an existing file needs ``force``).

    Any model can be saved: one no verb has touched saves as an empty recipe plus its weights. ``half=True`` stores
    floating-point tensors as FP16 (half the file; the reload is then close to, not bit-identical with, the model).
    """
    return Path(_recipe.save(model, path, force=force, half=half))


def load(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """The model saved at ``path``: its recipe replayed on ``model`` (or on a fresh zoo model built from the
    recorded source), then its state_dict loaded strictly. ``model`` is not modified."""
    blob = _recipe.read(path)
    if model is None:
        model = build_source(blob.get("source"), str(path))
    return _recipe.load(path, model, blob=blob)


def build_source(source: Any, where: str) -> nn.Module:
    """A fresh (randomly initialised) model of the recorded source; its weights come from the recipe file.

    Zoo, ``torchvision:``, ``timm:`` and ``hf:`` sources are rebuilt from the record (their literal arguments
    included; an ``hf:`` folder must still exist, its config.json is read); a user's factory is not.
    """
    from edgeslim import models
    from edgeslim.models import _sources

    kinds = ("zoo", "factory", *_sources.NAMED_KINDS)
    if not isinstance(source, dict) or source.get("kind") not in kinds:
        raise ModelError(
            f"{where} does not record which model it was made from; pass model=<a fresh instance of the "
            "original architecture> (CLI: --base MODEL)"
        )
    if source["kind"] == "factory":
        raise ModelError(
            f"{where} was made from user code {source.get('spec')!r}; edgeslim does not run code "
            "because a file names it: pass model=<a fresh instance> (CLI: --base "
            f"{source.get('spec')!r})"
        )
    if source["kind"] in _sources.NAMED_KINDS:
        model = _sources.build_spec(_sources.from_record(source), hf_weights=False)
        model.edgeslim_source = source
        return model
    shape, classes = source.get("input_shape"), source.get("num_classes")
    if shape and classes:  # recorded since folder: data; older recipes name a built-in dataset
        return models.build(source["name"], input_shape=tuple(shape), num_classes=int(classes))
    return models.build(source["name"], source.get("dataset", "fashion-mnist"))


def steps(path: str | os.PathLike) -> list[dict]:
    """The recorded steps of a recipe file (technique, config, state, summary), without loading weights."""
    return _recipe.read(path)["steps"]

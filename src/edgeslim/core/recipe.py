"""The one recipe: every verb records the step it took, and any chain of steps replays on a fresh model.

A model returned by a verb carries ``model.edgeslim_recipe``: the ordered steps that made it, each a plain dict::

    {"technique": "prune", "config": {...}, "state": {...}, "summary": "prune (channel): MACs ..."}

``config`` is the step's config as a dict (it round-trips through the technique's Config class), ``state`` is
what replay needs beyond the config to rebuild the same *structure* (removed channels, masked layers, codebook
sizes, ranks, tied groups, the quantizer's learnable scales); the values come from the state_dict saved beside it.
Each technique registers how to replay its steps in :data:`STEPS` (a registry, filled when the technique's package
is imported); :func:`replay` runs them in order. Saving and loading a recipe file is ``edgeslim.save`` /
``edgeslim.load`` (``pipeline/``).

Step orders that make no sense are declared as data in :data:`FORBIDDEN`; every verb calls :func:`check_next`
before it works, so such a chain fails at once with one :class:`ConfigError` that says why.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from torch import nn

from edgeslim.core.errors import ConfigError, EdgeslimError, ModelError
from edgeslim.core.registry import Registry

RECIPE_ATTR = "edgeslim_recipe"
SOURCE_ATTR = "edgeslim_source"

#: technique -> ``replay(model, step) -> model``: rebuild the step's structure on ``model`` (values come later
#: from the state_dict)
STEPS: Registry[Callable[[nn.Module, dict], nn.Module]] = Registry("recipe step")

#: (earlier technique, later technique) -> why that order is refused. "*" as the later technique: anything.
FORBIDDEN: dict[tuple[str, str], str] = {
    ("quantize", "*"): "the model is already quantized (fake-quantized graph); apply every other step before "
    "quantize, or fine-tune it with edgeslim.quantize.qat",
    ("cluster", "prune"): "clustered layers compute their weight from a shared codebook, which pruning cannot "
    "slice or mask; prune first, then cluster (Deep Compression's order)",
    ("cluster", "factorize"): "factorizing replaces the clustered layers by dense low-rank ones and so undoes the "
    "clustering; factorize first, then cluster",
    ("cluster", "separable"): "the depthwise-separable rewrite replaces the clustered layers by dense ones and so "
    "undoes the clustering; apply separable first, then cluster",
    ("cluster", "cluster"): "the model is already clustered; strip_clustering first to cluster again",
    ("tie", "prune"): "pruning would resize one user of a shared (tied) parameter and not the others; prune "
    "first, then tie",
    ("tie", "cluster"): "clustering gives each tied layer a codebook of its own and so unties them; cluster "
    "first, then tie",
    ("tie", "factorize"): "factorizing replaces each tied layer by a low-rank pair of its own and so unties them; "
    "factorize first, then tie",
    ("tie", "separable"): "the depthwise-separable rewrite replaces each tied layer by layers of its own and so "
    "unties them; apply separable first, then tie",
}


def steps_of(model: Any) -> list[dict]:
    """The recorded steps of ``model`` (a new list; empty for a model no verb has touched)."""
    return [dict(s) for s in getattr(model, RECIPE_ATTR, None) or []]


def check_next(model: Any, technique: str) -> None:
    """Raise :class:`ConfigError` when ``technique`` may not follow a step already applied to ``model``."""
    for step in steps_of(model):
        done = step.get("technique")
        why = FORBIDDEN.get((done, technique)) or FORBIDDEN.get((done, "*"))
        if why:
            raise ConfigError(f"{technique} after {done} is not supported: {why}")


def record(
    model: nn.Module,
    technique: str,
    config: Any = None,
    state: dict | None = None,
    report: Any = None,
    *,
    previous: Any = None,
) -> nn.Module:
    """Append one step to ``model``'s recipe (the steps of ``previous``, default ``model``'s own, come first)."""
    if technique not in STEPS:
        raise ModelError(f"no replay is registered for technique {technique!r}; registered: {', '.join(STEPS)}")
    steps = steps_of(model if previous is None else previous)
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    summary = ""
    if report is not None and hasattr(report, "summary"):
        summary = str(report.summary())
    steps.append(
        {"technique": technique, "config": copy.deepcopy(cfg), "state": copy.deepcopy(state or {}), "summary": summary}
    )
    setattr(model, RECIPE_ATTR, steps)
    return model


def replay(model: nn.Module, steps: list[dict]) -> nn.Module:
    """A copy of ``model`` rebuilt through ``steps`` (structure only; load the saved state_dict afterwards)."""
    model = copy.deepcopy(model)
    for i, step in enumerate(steps):
        if not isinstance(step, dict) or "technique" not in step:
            raise ModelError(f"recipe step {i} is not a step (a mapping with 'technique', 'config', 'state')")
        try:
            handler = STEPS.get(step["technique"])
        except ConfigError as e:
            raise ModelError(f"recipe step {i}: {e}") from None
        previous = steps[:i]
        try:
            model = handler(model, step)
        except ModelError:
            raise
        except (EdgeslimError, KeyError, AttributeError, RuntimeError) as e:  # the model is not the one recorded
            msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
            raise ModelError(
                f"recipe step {i} ({step['technique']}) does not match this model: {msg}; load the "
                "recipe into the architecture it was made from"
            ) from None
        setattr(model, RECIPE_ATTR, [dict(s) for s in previous] + [dict(step)])
    return model


def materialize(model: nn.Module) -> nn.Module:
    """In place: every layer computes with a plain dense ``weight`` parameter (masks baked, codebooks expanded).

    Layers that compute their weight (a technique's own layer type) implement ``edgeslim_dense_()``, which turns
    them back into their dense class in place; masks are baked by :func:`edgeslim.core.masks.strip_masks`. Verbs
    that rewrite weights (quantize, export) call this on their copy.
    """
    from edgeslim.core.masks import strip_masks

    for m in list(model.modules()):
        dense = getattr(m, "edgeslim_dense_", None)
        if callable(dense):
            dense()
    return strip_masks(model)


# ---------------------------------------------------------------------------------------------- the file
FORMAT = "edgeslim.recipe/1"


def save(model: nn.Module, path: Any, *, force: bool = False, half: bool = False) -> Any:
    """Write ``model``'s recipe (source, ordered steps) and its state_dict to one file, atomically.

    The file is read back with ``torch.load(weights_only=True)``: plain data and tensors, never a pickled module.
    ``half=True`` stores floating-point tensors as FP16 (half the file; :func:`load` casts them back, so the
    reloaded model is then close to, not bit-identical with, the saved one).
    """
    import torch

    from edgeslim._version import __version__
    from edgeslim.core.io import save_torch

    if not isinstance(model, nn.Module):
        raise ModelError(f"save() needs a torch.nn.Module, got {type(model).__name__}")
    blob = {
        "format": FORMAT,
        "edgeslim": __version__,
        "source": getattr(model, SOURCE_ATTR, None),
        "steps": steps_of(model),
        "state_dict": {
            k: (v.detach().cpu().half() if half and v.is_floating_point() else v.detach().cpu().clone())
            for k, v in model.state_dict().items()
        },
        "half": bool(half),
        "torch": str(torch.__version__),
    }
    return save_torch(blob, path, force=force)


def read(path: Any) -> dict:
    """The recipe file's contents (``format``, ``source``, ``steps``, ``state_dict``), with clear errors."""
    from pathlib import Path

    import torch

    p = Path(path)
    if not p.is_file():
        raise ModelError(f"recipe file {str(p)!r} does not exist")
    try:
        # memory-mapped: a caller that only wants the steps or the source never reads the weights from disk
        blob = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for corrupt or foreign files
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        first = next((ln for ln in lines if "Unpickler error" in ln), lines[0] if lines else type(e).__name__)[:200]
        raise ModelError(f"cannot read recipe file {str(p)!r}: not an edgeslim recipe, or corrupt ({first})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        fmt = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
        raise ModelError(
            f"{str(p)!r} is not an edgeslim recipe file (format {fmt!r}, expected {FORMAT!r}); "
            "write one with edgeslim.save(model, path)"
        )
    if not isinstance(blob.get("steps"), list) or not isinstance(blob.get("state_dict"), dict):
        raise ModelError(f"recipe file {str(p)!r} lacks its steps or its state_dict")
    return blob


def load(path: Any, model: nn.Module, *, blob: dict | None = None) -> nn.Module:
    """Replay the recipe at ``path`` on a copy of ``model`` (a fresh instance of the original architecture; its
    weights do not matter) and load the saved state_dict strictly. ``model`` is not modified. ``blob``: the file's
    contents when the caller has already :func:`read` them (the file is then not read again)."""
    blob = read(path) if blob is None else blob
    out = replay(model, blob["steps"])
    load_state_strict(out, blob["state_dict"], str(path))
    if blob.get("source") is not None:
        setattr(out, SOURCE_ATTR, blob["source"])
    return out.eval()


def load_state_strict(model: nn.Module, state: dict, source: str) -> nn.Module:
    """Load ``state`` into ``model``; any missing, unexpected or reshaped entry is one clear ModelError."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if wrong:
            parts.append(f"{len(wrong)} with other shapes (e.g. {wrong[:3]})")
        raise ModelError(f"weights in {source!r} do not match the model: " + "; ".join(parts))
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    return model


@STEPS.register("materialize")
def _replay_materialize(model: nn.Module, step: dict) -> nn.Module:
    return materialize(model)


@STEPS.register("mask")
def _replay_mask(model: nn.Module, step: dict) -> nn.Module:
    """Attach (all-ones) masks to the recorded layers; the mask values come from the state_dict."""
    import torch

    from edgeslim.core.masks import attach_mask

    for name in step.get("state", {}).get("masked", []):
        m = model.get_submodule(name)
        attach_mask(m, torch.ones_like(m.weight))
    return model

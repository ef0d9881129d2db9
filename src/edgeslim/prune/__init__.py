"""Pruning: unstructured magnitude (one-shot or AGP), N:M, and structured channel/head pruning with physical removal.

>>> p = edgeslim.prune(model, PruneConfig(method="channel", target_macs=0.5, importance="l2"),
...                    example_inputs=x)                     # a physically smaller model
>>> print(p.prune_report.summary())
>>> p = edgeslim.train.fit(p, train, val, TrainConfig(epochs=3)).model       # recover accuracy
>>> from edgeslim.prune import load_pruned, save_pruned
>>> save_pruned(p, "out/resnet18-pruned")                                   # recipe .json + state_dict .pt
>>> q = load_pruned(edgeslim.models.build("resnet18"), "out/resnet18-pruned")

``magnitude``/``nm`` keep their masks through fine-tuning (a weight parametrization; ``strip_masks`` bakes
them before export) and only save storage (``sparse_storage``); ``channel`` removes channels, FFN neurons and
attention heads and makes dense runtimes faster. Every call returns a new model with a ``prune_report``
(:class:`PruneReport`) and never modifies its input.
"""

from edgeslim.core.counting import count_macs  # re-exported: it was public here first
from edgeslim.prune._api import (
    PruneReport,
    apply_recipe,
    load_pruned,
    prune,
    prune_finetune,
    read_recipe,
    replay,
    save_pruned,
)
from edgeslim.prune._config import PruneConfig, PruneMethod, Schedule, Scope
from edgeslim.prune._importance import IMPORTANCE, Criterion
from edgeslim.prune._sparse import SparsityMask, get_mask, magnitude_mask, nm_mask, sparse_storage, strip_masks
from edgeslim.prune._vocab import VocabMap, VocabPruned, VocabReport, prune_vocabulary

__all__ = [
    "IMPORTANCE",
    "Criterion",
    "PruneConfig",
    "PruneMethod",
    "PruneReport",
    "Schedule",
    "Scope",
    "SparsityMask",
    "VocabMap",
    "VocabPruned",
    "VocabReport",
    "apply_recipe",
    "count_macs",
    "get_mask",
    "load_pruned",
    "magnitude_mask",
    "nm_mask",
    "prune",
    "prune_finetune",
    "prune_vocabulary",
    "read_recipe",
    "replay",
    "save_pruned",
    "sparse_storage",
    "strip_masks",
]

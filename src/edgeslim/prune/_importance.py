"""Channel importance criteria: a registry of small factories returning Torch-Pruning ``Importance`` callables.

Each criterion scores every channel of a coupled group (all layers that must lose the same channels);
the lowest-scoring channels are removed. ``random`` is the baseline every other criterion must beat.

    l1, l2     group-summed L1 / L2 norm of the weights (Li et al. 2017)
    bn_scale   |gamma| of the BatchNorm layers in the group (Liu et al. 2017, network slimming)
    taylor     first-order Taylor |w * dL/dw| on a few calibration batches (Molchanov et al. 2019); needs data
    fpgm       distance to the geometric median of the layer's filters (He et al. 2019)
    random     uniform random scores (seeded by ``PruneConfig.seed``)

Every criterion scores channel groups of a CNN through Torch-Pruning (``make()``); those that need no gradients
also score the heads and FFN neurons of a transformer layer (``score_units(weights, seed=...)``: one tensor per
layer of the unit group, each with the units along its first dimension, summed over the group).

A custom criterion: ``IMPORTANCE.register("mine")(Criterion(make, needs_grad, description, score_units))``, where
``make()`` returns a Torch-Pruning ``Importance`` and ``score_units`` (optional) scores transformer units.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from edgeslim.core.errors import ConfigError
from edgeslim.core.registry import Registry

UnitScorer = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Criterion:
    """A registered criterion.

    Attributes:
        make: builds the Torch-Pruning ``Importance`` that ranks CNN channel groups.
        needs_grad: the criterion reads loss gradients, so pruning needs ``data``.
        description: one line for listings.
        score_units: ``(weights, *, seed) -> scores`` for transformer heads / FFN neurons: ``weights`` are the
            tensors of one unit group (e.g. the query, key, value and output projections of every head), each
            with the units along dim 0; returns one score per unit (higher is kept). None: not available there.
    """

    make: Callable[[], Any]
    needs_grad: bool = False
    description: str = ""
    score_units: UnitScorer | None = None


IMPORTANCE: Registry[Criterion] = Registry("channel importance criterion")


def unit_criteria() -> list[str]:
    """Names of the registered criteria that can score transformer heads / FFN neurons."""
    return [n for n in IMPORTANCE.names() if IMPORTANCE.get(n).score_units is not None]


def _summed(per_tensor: Callable[[torch.Tensor], torch.Tensor], weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """``per_tensor`` of each weight viewed as ``(units, -1)``, summed over the weights of the group."""
    n = int(weights[0].shape[0])
    total = torch.zeros(n)
    for w in weights:
        total += per_tensor(w.detach().reshape(n, -1)).float()
    return total


def _l1_units(weights: Sequence[torch.Tensor], *, seed: int = 0) -> torch.Tensor:
    return _summed(lambda r: r.abs().sum(1), weights)


def _l2_units(weights: Sequence[torch.Tensor], *, seed: int = 0) -> torch.Tensor:
    return _summed(lambda r: r.norm(dim=1), weights)


def _fpgm_units(weights: Sequence[torch.Tensor], *, seed: int = 0) -> torch.Tensor:
    """Summed distance of each unit to the others (far from the geometric median: kept)."""
    return _summed(lambda r: torch.cdist(r, r).sum(1), weights)


def _random_units(weights: Sequence[torch.Tensor], *, seed: int = 0) -> torch.Tensor:
    return torch.rand(int(weights[0].shape[0]), generator=torch.Generator().manual_seed(seed))


def torch_pruning() -> Any:
    """Import Torch-Pruning, or say how to install it."""
    try:
        import torch_pruning as tp
    except ImportError:
        raise ConfigError(
            "structured (channel) pruning needs Torch-Pruning: pip install 'torch-pruning>=1.6.1'"
        ) from None
    return tp


IMPORTANCE.register("l1")(
    Criterion(
        lambda: torch_pruning().importance.GroupMagnitudeImportance(p=1),
        False,
        "L1 norm of the group's weights",
        _l1_units,
    )
)
IMPORTANCE.register("l2")(
    Criterion(
        lambda: torch_pruning().importance.GroupMagnitudeImportance(p=2),
        False,
        "L2 norm of the group's weights",
        _l2_units,
    )
)
IMPORTANCE.register("bn_scale")(
    Criterion(lambda: torch_pruning().importance.BNScaleImportance(), False, "|gamma| of the group's BatchNorm layers")
)
IMPORTANCE.register("taylor")(
    Criterion(
        lambda: torch_pruning().importance.GroupTaylorImportance(),
        True,
        "first-order Taylor |w * grad| on calibration batches",
    )
)
IMPORTANCE.register("fpgm")(
    Criterion(
        lambda: torch_pruning().importance.FPGMImportance(p=2),
        False,
        "distance to the filters' geometric median",
        _fpgm_units,
    )
)
IMPORTANCE.register("random")(
    Criterion(
        lambda: torch_pruning().importance.RandomImportance(), False, "uniform random (the baseline)", _random_units
    )
)

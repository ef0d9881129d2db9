"""Channel importance criteria: a registry of small factories returning Torch-Pruning ``Importance`` callables.

Each criterion scores every channel of a coupled group (all layers that must lose the same channels);
the lowest-scoring channels are removed. ``random`` is the baseline every other criterion must beat.

    l1, l2     group-summed L1 / L2 norm of the weights (Li et al. 2017)
    bn_scale   |gamma| of the BatchNorm layers in the group (Liu et al. 2017, network slimming)
    taylor     first-order Taylor |w * dL/dw| on a few calibration batches (Molchanov et al. 2019); needs data
    fpgm       distance to the geometric median of the layer's filters (He et al. 2019)
    random     uniform random scores (seeded by ``PruneConfig.seed``)

A custom criterion: ``@IMPORTANCE.register("mine")`` on a function ``(config) -> Importance``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgeslim.core.errors import ConfigError
from edgeslim.core.registry import Registry


@dataclass(frozen=True)
class Criterion:
    """A registered criterion: ``make()`` builds the Torch-Pruning importance; ``needs_grad`` asks for data."""

    make: Callable[[], Any]
    needs_grad: bool = False
    description: str = ""


IMPORTANCE: Registry[Criterion] = Registry("channel importance criterion")


def torch_pruning() -> Any:
    """Import Torch-Pruning, or say how to install it."""
    try:
        import torch_pruning as tp
    except ImportError:
        raise ConfigError(
            "structured (channel) pruning needs Torch-Pruning: pip install 'torch-pruning>=1.6.1'"
        ) from None
    return tp


IMPORTANCE.register("l1")(Criterion(lambda: torch_pruning().importance.GroupMagnitudeImportance(p=1), False,
                                    "L1 norm of the group's weights"))
IMPORTANCE.register("l2")(Criterion(lambda: torch_pruning().importance.GroupMagnitudeImportance(p=2), False,
                                    "L2 norm of the group's weights"))
IMPORTANCE.register("bn_scale")(Criterion(lambda: torch_pruning().importance.BNScaleImportance(), False,
                                          "|gamma| of the group's BatchNorm layers"))
IMPORTANCE.register("taylor")(Criterion(lambda: torch_pruning().importance.GroupTaylorImportance(), True,
                                        "first-order Taylor |w * grad| on calibration batches"))
IMPORTANCE.register("fpgm")(Criterion(lambda: torch_pruning().importance.FPGMImportance(p=2), False,
                                      "distance to the filters' geometric median"))
IMPORTANCE.register("random")(Criterion(lambda: torch_pruning().importance.RandomImportance(), False,
                                        "uniform random (the baseline)"))

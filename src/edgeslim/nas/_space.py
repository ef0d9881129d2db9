"""The per-layer width search space of a trained CNN (NetAdapt / AMC style).

A *unit* is a set of layers that must keep the same output channels: Torch-Pruning's dependency graph couples them
(a residual stage, a depthwise conv and the pointwise conv feeding it, a flatten feeding a Linear). Each unit gets its
own width, a multiple of ``round_to`` between ``min_keep`` of its full width and the full width. A point of the space
is ``{unit: width}``; :meth:`WidthSpace.realize` turns it into a physically smaller model with ``edgeslim.prune``
(the weights are inherited: the lowest-ranked channels of each unit are removed).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from edgeslim.core.errors import ConfigError, ModelError
from edgeslim.core.modules import select
from edgeslim.nas._layers import Layer, trace_layers


@dataclasses.dataclass(frozen=True)
class Unit:
    """Layers sharing one output width.

    Attributes:
        name: the unit's root layer (the first coupled Conv/Linear); prune's ``layer_ratios`` key.
        full: its width in the model the space was made from.
        choices: the widths it may take, ascending (the last is ``full``).
        writers: Conv/Linear layers whose output channels it sets.
        readers: Conv/Linear layers whose input channels it sets.
    """

    name: str
    full: int
    choices: tuple[int, ...]
    writers: tuple[str, ...]
    readers: tuple[str, ...]

    @property
    def smallest(self) -> int:
        return self.choices[0]


def _choices(full: int, round_to: int, min_keep: float) -> tuple[int, ...]:
    lo = max(round_to, math.ceil(full * min_keep / round_to) * round_to)
    out = list(range(lo, full, round_to))
    return tuple(out + [full])


def _grid(choices: Sequence[int], points: int) -> tuple[int, ...]:
    """``points`` of ``choices`` evenly spread (both ends included): the widths the table times."""
    if len(choices) <= points:
        return tuple(choices)
    idx = sorted({round(i * (len(choices) - 1) / (points - 1)) for i in range(points)})
    return tuple(choices[i] for i in idx)


@dataclasses.dataclass
class WidthSpace:
    """The searchable units of a model, its layers (for latency) and the example input it was traced with."""

    units: dict[str, Unit]
    fixed: dict[str, str]
    layers: list[Layer]
    round_to: int
    grid_points: int
    output_layer: str | None
    excluded: list[str]
    example: torch.Tensor

    def grid(self, unit: str | None, base: int) -> tuple[int, ...]:
        """The grid points timed for a width that follows ``unit`` (a fixed width: itself)."""
        if unit is None or unit not in self.units:
            return (base,)
        return _grid(self.units[unit].choices, self.grid_points)

    def full(self) -> dict[str, int]:
        return {n: u.full for n, u in self.units.items()}

    def smallest(self) -> dict[str, int]:
        return {n: u.smallest for n, u in self.units.items()}

    def sample(self, rng: random.Random, low: float | None = None) -> dict[str, int]:
        """A random point: each unit keeps a uniform random fraction in [``low`` (default: its smallest), 1]."""
        out = {}
        for n, u in self.units.items():
            lo = u.smallest / u.full if low is None else max(low, u.smallest / u.full)
            keep = rng.uniform(lo, 1.0) * u.full
            out[n] = min(u.choices, key=lambda w: abs(w - keep))
        return out

    def widths_of(self, model: nn.Module) -> dict[str, int]:
        """Each unit's current width in ``model`` (the space's model or one realized from it)."""
        mods = dict(model.named_modules())
        out = {}
        for n in self.units:
            m = mods.get(n)
            if m is None:
                raise ModelError(f"unit {n!r} of the width space is not a layer of this model")
            out[n] = m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features
        return out

    def check(self, assign: dict[str, int]) -> None:
        for n, w in assign.items():
            if n not in self.units:
                raise ConfigError(f"unit {n!r} is not in the width space; units: {', '.join(self.units)}")
            if w not in self.units[n].choices:
                raise ConfigError(f"width {w} of unit {n!r} is not allowed; choices: {list(self.units[n].choices)}")

    def realize(self, model: nn.Module, assign: dict[str, int], *, importance: str = "l1") -> nn.Module:
        """A copy of ``model`` (this space's model, or one realized from it) with the units narrowed to ``assign``.

        Units not in ``assign``, or already at most that wide, keep their width (widths only shrink). Returns the
        model ``edgeslim.prune`` made, with its recorded prune step.
        """
        import copy

        from edgeslim.prune import PruneConfig, prune

        self.check(assign)
        now = self.widths_of(model)
        cut = {n: w for n, w in assign.items() if w < now[n]}
        if not cut:
            return copy.deepcopy(model)
        keep = [n for n in [*self.units, *self.fixed] if n not in cut]
        ratios = {n: 1 - (w + 0.5) / now[n] for n, w in cut.items()}
        cfg = PruneConfig(
            method="channel",
            ratio=0.5,
            layer_ratios=ratios,
            exclude=tuple(keep + self.excluded),
            round_to=self.round_to,
            max_layer_ratio=0.999,
            importance=importance,
        )
        out = prune(model, cfg, example_inputs=self.example)
        got = self.widths_of(out)
        wrong = {n: (w, got[n]) for n, w in cut.items() if got[n] != w}
        if wrong:
            raise ModelError(f"pruning did not give the asked widths (unit: asked, got): {wrong}")
        return out


def width_space(
    model: nn.Module,
    example_inputs: Any,
    *,
    round_to: int = 8,
    min_keep: float = 0.25,
    exclude: Sequence[str] = (),
    grid_points: int = 5,
) -> WidthSpace:
    """The width space of ``model``: its coupled units, each with its allowed widths.

    The layer producing the model output (the classifier) keeps its width; so do the units a glob of ``exclude``
    names (any layer of the unit). A unit too narrow to lose ``round_to`` channels is fixed (listed in ``fixed``).

    Raises:
        ConfigError: an ``exclude`` glob matches no layer; nothing is left to search after the exclusions.
    """
    try:
        import torch_pruning as tp
    except ImportError:
        raise ConfigError("the width search needs Torch-Pruning: pip install 'torch-pruning>=1.6.1'") from None

    layers = trace_layers(model, example_inputs)
    x = example_inputs[:1].float()

    def weighted(m):
        return isinstance(m, (nn.Conv2d, nn.Linear))

    excluded_set = (
        {
            n
            for n, _ in select(
                model,
                tuple(exclude),
                (),
                weighted,
                "Conv2d/Linear layer",
                owner="NASConfig",
                fields=("exclude", "skip"),
            )
        }
        if exclude
        else set()
    )
    names = {id(m): n for n, m in model.named_modules()}
    out_name = layers[-1].name
    was = model.training
    model.eval()
    try:
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    except Exception as e:  # noqa: BLE001 (a tracing failure of any type becomes one line naming the model)
        raise ModelError(
            f"cannot trace the dependency graph of {type(model).__name__}: "
            f"{(str(e).splitlines() or [type(e).__name__])[0][:200]}"
        ) from None
    finally:
        model.train(was)
    units: dict[str, Unit] = {}
    fixed: dict[str, str] = {}
    mods = dict(model.named_modules())
    for group in dg.get_all_groups(ignored_layers=[mods[out_name]], root_module_types=(nn.Conv2d, nn.Linear)):
        writers, readers = [], []
        for dep, _ in group:
            m = dep.target.module
            if not weighted(m) or id(m) not in names:
                continue
            n = names[id(m)]
            if dg.is_out_channel_pruning_fn(dep.handler):
                writers.append(n)
            elif dg.is_in_channel_pruning_fn(dep.handler):
                readers.append(n)
        if not writers:
            continue
        root = writers[0]
        m = mods[root]
        full = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
        hit = [w for w in writers if w in excluded_set]
        if hit:
            fixed[root] = f"excluded (NASConfig.exclude matches {hit[0]!r})"
            continue
        ch = _choices(full, round_to, min_keep)
        if len(ch) < 2:
            fixed[root] = f"{full} channels: no narrower width with round_to={round_to}, min_keep={min_keep}"
            continue
        units[root] = Unit(root, full, ch, tuple(dict.fromkeys(writers)), tuple(dict.fromkeys(readers)))
    by_out = {w: u.name for u in units.values() for w in u.writers}
    by_in = {r: u.name for u in units.values() for r in u.readers}
    layers = [
        dataclasses.replace(layer, cout_unit=by_out.get(layer.name), cin_unit=by_in.get(layer.name)) for layer in layers
    ]
    return WidthSpace(units, fixed, layers, round_to, grid_points, out_name, sorted(excluded_set), x)

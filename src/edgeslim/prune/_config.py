"""The pruning config: one frozen dataclass for unstructured, N:M and structured (channel/head) pruning."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from edgeslim.core.config import Config, StrEnum, renamed


class PruneMethod(StrEnum):
    """What is removed.

    ``magnitude``: single weights (unstructured; zeros, no speed-up on dense runtimes).
    ``nm``: N of every M consecutive weights along the input dimension (2:4 semi-structured).
    ``channel``: whole channels/filters, FFN neurons and attention heads, physically removed.
    ``block``: whole residual blocks (``y = tail(x + branch(x))`` becomes ``tail(x)``): depth pruning, fewer
    kernels launched (see ``edgeslim.prune._blocks``).
    """

    MAGNITUDE = "magnitude"
    NM = "nm"
    CHANNEL = "channel"
    BLOCK = "block"


class Scope(StrEnum):
    """Where weights/channels are ranked: within each layer, or across all layers at once."""

    LAYER = "layer"
    GLOBAL = "global"


class Schedule(StrEnum):
    """``oneshot``: the final sparsity at once. ``agp``: Zhu & Gupta's cubic ramp, updated during training."""

    ONESHOT = "oneshot"
    AGP = "agp"


@dataclass(frozen=True)
class PruneConfig(Config):
    """How to prune.

    Attributes:
        method: ``magnitude`` (unstructured), ``nm`` (N:M), ``channel`` (structured, physical removal) or
            ``block`` (whole residual blocks removed; needs ``data`` to choose them).
        ratio: fraction removed: of the weights (``magnitude``), or of the channels of every prunable
            layer (``channel``; with ``scope="global"`` of all channels together). Unused by ``nm``.
        target_macs: ``channel`` only: instead of ``ratio``, search the channel ratio that removes this
            fraction of the multiply-accumulates (e.g. 0.5 halves the MACs).
        importance: channel criterion (a registry: ``l1``, ``l2``, ``bn_scale``, ``taylor``, ``fpgm``,
            ``random``; ``taylor`` needs ``data``).
        scope: rank within each layer (``layer``) or across layers (``global``).
        max_layer_ratio: no layer loses more than this fraction of its channels / weights.
        layer_ratios: per-layer ratios by module-name glob (``{"layer4.*": 0.6}``), overriding ``ratio``.
        exclude: module-name globs left untouched; each must match a module (``ignored_layers`` is its old name,
            deprecated).
        ignore_output_layer: leave the layer producing the model output (the classifier) untouched; for a
            detector (``edgeslim_task == "detect"``) every head's class-logit and box conv, or the layers a model
            declares in ``edgeslim_output_layers``.
        round_to: kept channel counts are multiples of this (SIMD-friendly widths); 1 disables.
        heads_ratio: fraction of attention heads removed from each attention block (``channel`` only).
        n: kept weights per group (``nm``).
        m: group size (``nm``).
        schedule: ``oneshot`` or ``agp`` (``magnitude``/``layer`` only: the mask follows the AGP ramp
            while the model trains with :func:`edgeslim.train.fit`).
        schedule_steps: training steps over which AGP ramps from 0 to ``ratio``.
        schedule_every: AGP recomputes the masks every this many training steps.
        calib_batches: batches of ``data`` used by data-driven criteria (``taylor``).
        recalibrate_bn: after pruning, re-estimate the BatchNorm running statistics on this many inputs of
            ``data`` (0: off). Removing channels shifts what every BatchNorm sees; without this a pruned CNN
            scores near chance until it is fine-tuned (see :func:`edgeslim.train.recalibrate_bn`).
        seed: seeds the ``random`` criterion.
        blocks: ``block`` only: how many residual blocks to remove (chosen greedily: at each step the block whose
            removal changes the model's output least on ``block_samples`` inputs of ``data``).
        block_samples: inputs the ``block`` criterion compares outputs on.
    """

    kind = "prune"
    method: PruneMethod = PruneMethod.CHANNEL
    ratio: float = 0.3
    target_macs: float | None = None
    importance: str = "l1"
    scope: Scope = Scope.LAYER
    max_layer_ratio: float = 0.9
    layer_ratios: dict[str, float] = dataclasses.field(default_factory=dict)
    exclude: tuple[str, ...] = ()
    ignore_output_layer: bool = True
    round_to: int = 8
    heads_ratio: float = 0.0
    n: int = 2
    m: int = 4
    schedule: Schedule = Schedule.ONESHOT
    schedule_steps: int = 1000
    schedule_every: int = 50
    calib_batches: int = 4
    recalibrate_bn: int = 0
    seed: int = 0
    blocks: int = 1
    block_samples: int = 512
    ignored_layers: tuple[str, ...] = renamed("exclude")

    def __hash__(self) -> int:  # layer_ratios is a dict
        return hash(tuple((k, str(v)) for k, v in self.to_dict().items()))

    def validate(self) -> None:
        from edgeslim.prune._importance import IMPORTANCE

        if not 0 < self.ratio < 1:
            raise self._bad("ratio", "must be in (0, 1) (the fraction removed)")
        if self.target_macs is not None:
            if self.method != PruneMethod.CHANNEL:
                raise self._bad("target_macs", "only method='channel' can target a MAC reduction")
            if not 0 < self.target_macs < 1:
                raise self._bad("target_macs", "must be in (0, 1) (the fraction of MACs removed) or None")
        if self.importance not in IMPORTANCE:
            IMPORTANCE.get(self.importance)  # raises a ConfigError that lists the valid names
        if not 0 < self.max_layer_ratio < 1:
            raise self._bad("max_layer_ratio", "must be in (0, 1): no layer may be pruned away entirely")
        if not isinstance(self.layer_ratios, dict):
            raise self._bad("layer_ratios", "must be a mapping of module-name glob -> ratio in (0, 1)")
        for k, v in self.layer_ratios.items():
            if not isinstance(k, str) or not isinstance(v, (int, float)) or not 0 < v < 1:
                raise self._bad("layer_ratios", f"entry {k!r}: {v!r} must be a ratio in (0, 1)")
        if any(not isinstance(x, str) or not x for x in self.exclude):
            raise self._bad("exclude", "must be non-empty module-name globs")
        if self.round_to < 1:
            raise self._bad("round_to", "must be >= 1 (1 disables rounding)")
        if not 0 <= self.heads_ratio < 1:
            raise self._bad("heads_ratio", "must be in [0, 1)")
        if self.heads_ratio and self.method != PruneMethod.CHANNEL:
            raise self._bad("heads_ratio", "only method='channel' removes attention heads")
        if not (1 <= self.n < self.m):
            raise self._bad("n", f"N:M needs 1 <= n < m (m={self.m})")
        if self.m > 64:
            raise self._bad("m", "must be <= 64")
        if self.schedule == Schedule.AGP:
            if self.method != PruneMethod.MAGNITUDE:
                raise self._bad("schedule", "agp is for method='magnitude' (N:M and channel pruning are one-shot)")
            if self.scope != Scope.LAYER:
                raise self._bad("schedule", "agp ramps each layer's own mask: use scope='layer'")
        if self.schedule_steps < 1:
            raise self._bad("schedule_steps", "must be >= 1")
        if self.schedule_every < 1:
            raise self._bad("schedule_every", "must be >= 1")
        if self.calib_batches < 1:
            raise self._bad("calib_batches", "must be >= 1")
        if isinstance(self.blocks, bool) or not isinstance(self.blocks, int) or self.blocks < 1:
            raise self._bad("blocks", "must be an integer >= 1 (residual blocks removed by method='block')")
        if isinstance(self.block_samples, bool) or not isinstance(self.block_samples, int) or self.block_samples < 1:
            raise self._bad("block_samples", "must be an integer >= 1")
        if self.method == PruneMethod.BLOCK and self.heads_ratio:
            raise self._bad("heads_ratio", "method='block' removes whole blocks, not attention heads")
        if not isinstance(self.recalibrate_bn, int) or self.recalibrate_bn < 0:
            raise self._bad(
                "recalibrate_bn",
                "must be an integer >= 0 (inputs used to re-estimate BatchNorm statistics; 0 turns it off)",
            )

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["layer_ratios"] = dict(self.layer_ratios)
        return d

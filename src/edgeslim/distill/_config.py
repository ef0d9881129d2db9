"""DistillConfig: which losses, their weights, temperature and the layers paired for feature losses."""

from __future__ import annotations

from dataclasses import dataclass

from edgeslim.core.config import Config
from edgeslim.core.errors import near


@dataclass(frozen=True)
class DistillConfig(Config):
    """Distillation settings (plain data; the teacher and data are arguments of :func:`distill`).

    Attributes:
        losses: names from :data:`LOSSES` (``kd``, ``hint``, ``attention``, ``hidden_state``, ``attention_map``,
            ``rkd``, ``similarity``), combined as a weighted sum.
        weights: one weight per loss (empty: 1.0 each).
        temperature: softmax temperature of the ``kd`` loss (> 0); the term is scaled by T².
        hard_weight: weight of the cross-entropy on the true labels (the Hinton hard-label term).
        student_layers: student module names whose outputs feed the feature/relation losses, paired in order
            with ``teacher_layers``. Without layers, ``rkd`` and ``similarity`` use the logits.
        teacher_layers: teacher module names, one per student layer.
        cache_teacher: precompute the teacher's outputs once per training row when the data are fixed
            (no augmentation); the teacher is always frozen.
    """

    kind = "distill"
    losses: tuple[str, ...] = ("kd",)
    weights: tuple[float, ...] = ()
    temperature: float = 4.0
    hard_weight: float = 1.0
    student_layers: tuple[str, ...] = ()
    teacher_layers: tuple[str, ...] = ()
    cache_teacher: bool = True

    def validate(self) -> None:
        from edgeslim.distill._losses import FEATURE_LOSSES, LOSSES

        if not self.losses:
            raise self._bad("losses", f"give at least one of {', '.join(LOSSES.names())}")
        for name in self.losses:
            if name not in LOSSES:
                raise self._bad(
                    "losses", f"unknown loss {name!r}{near(name, LOSSES.names())}; valid: {', '.join(LOSSES.names())}"
                )
        if self.weights and len(self.weights) != len(self.losses):
            raise self._bad("weights", f"give one weight per loss ({len(self.losses)}) or none")
        if any(w < 0 for w in self.weights):
            raise self._bad("weights", "must be >= 0")
        if not self.temperature > 0:
            raise self._bad("temperature", "must be > 0")
        if self.hard_weight < 0:
            raise self._bad("hard_weight", "must be >= 0")
        if len(self.student_layers) != len(self.teacher_layers):
            raise self._bad("teacher_layers", f"must pair with student_layers ({len(self.student_layers)} names)")
        needs = [n for n in self.losses if n in FEATURE_LOSSES]
        if needs and not self.student_layers:
            raise self._bad("student_layers", f"loss {needs[0]!r} needs student_layers/teacher_layers pairs")

    def weight_of(self, i: int) -> float:
        return float(self.weights[i]) if self.weights else 1.0

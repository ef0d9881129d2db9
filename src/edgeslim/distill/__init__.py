"""Knowledge distillation: loss registry (kd, hint, attention, hidden_state, attention_map, rkd, similarity),
``distill()`` on the project trainer, a ``kd_loss_fn`` callback for QAT/fine-tuning, and student builders."""

from edgeslim.distill._api import DistillReport, distill, kd_loss_fn
from edgeslim.distill._config import DistillConfig
from edgeslim.distill._losses import LOSSES, LossContext
from edgeslim.distill._students import cnn_student, layer_drop_student

__all__ = [
    "LOSSES",
    "DistillConfig",
    "DistillReport",
    "LossContext",
    "cnn_student",
    "distill",
    "kd_loss_fn",
    "layer_drop_student",
]

"""Training: seeded fit/evaluate with progress, per-epoch checkpoints and resume; baseline checkpoints."""

from edgeslim.train._baseline import train_baseline
from edgeslim.train._bn import recalibrate_bn
from edgeslim.train._trainer import LossFn, Optimizer, StepFn, TrainConfig, TrainResult, evaluate, fit

__all__ = [
    "LossFn",
    "Optimizer",
    "StepFn",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "fit",
    "recalibrate_bn",
    "train_baseline",
]

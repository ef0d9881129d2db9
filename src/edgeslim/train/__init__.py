"""Training: seeded fit/evaluate with progress, per-epoch checkpoints and resume; baseline checkpoints."""

from edgeslim.train._baseline import train_baseline
from edgeslim.train._trainer import LossFn, Optimizer, StepFn, TrainConfig, TrainResult, evaluate, fit

__all__ = ["LossFn", "Optimizer", "StepFn", "TrainConfig", "TrainResult", "evaluate", "fit", "train_baseline"]

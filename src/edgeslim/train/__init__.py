"""Training: seeded fit/evaluate (and train_detector for detectors) with progress, per-epoch checkpoints and resume; baseline checkpoints."""

from edgeslim.train._baseline import train_baseline
from edgeslim.train._bn import recalibrate_bn
from edgeslim.train._detect import DetectTrainConfig, DetectTrainResult, detection_loss, train_detector
from edgeslim.train._trainer import LossFn, Optimizer, StepFn, TrainConfig, TrainResult, evaluate, fit

__all__ = [
    "DetectTrainConfig",
    "DetectTrainResult",
    "LossFn",
    "Optimizer",
    "StepFn",
    "TrainConfig",
    "TrainResult",
    "detection_loss",
    "evaluate",
    "fit",
    "recalibrate_bn",
    "train_baseline",
    "train_detector",
]

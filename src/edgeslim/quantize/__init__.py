"""Quantization: static post-training INT8 (calibrated), dynamic INT8, FP16, quantization-aware training.

>>> q = edgeslim.quantize(model, edgeslim.QuantConfig(calibration="entropy"), calib=train)
>>> q.report.summary()
"""

from edgeslim.quantize._api import QuantizedModel, QuantReport, quantize
from edgeslim.quantize._calibrate import CALIBRATORS, Observer, Stats
from edgeslim.quantize._capture import OnnxQuantizedModel, compare_speed
from edgeslim.quantize._config import (
    ActivationType,
    Capture,
    Placement,
    QuantConfig,
    QuantMode,
    WeightRange,
)
from edgeslim.quantize._modules import ActQuant, QuantWeight
from edgeslim.quantize._qat import (
    QATConfig,
    QATMethod,
    qat,
    restore_quantized,
    save_quantized,
)
from edgeslim.quantize._sensitivity import (
    BudgetConfig,
    BudgetResult,
    BudgetSearch,
    BudgetStep,
    Fallback,
    LayerSensitivity,
    RankBy,
    SensitivityMode,
    SensitivityReport,
    quantize_with_budget,
    sensitivity,
)

__all__ = [
    "CALIBRATORS",
    "ActQuant",
    "ActivationType",
    "BudgetConfig",
    "BudgetResult",
    "BudgetSearch",
    "BudgetStep",
    "Capture",
    "Fallback",
    "LayerSensitivity",
    "Observer",
    "OnnxQuantizedModel",
    "Placement",
    "QATConfig",
    "QATMethod",
    "QuantConfig",
    "QuantMode",
    "QuantReport",
    "QuantWeight",
    "QuantizedModel",
    "RankBy",
    "SensitivityMode",
    "SensitivityReport",
    "Stats",
    "WeightRange",
    "compare_speed",
    "qat",
    "quantize",
    "quantize_with_budget",
    "restore_quantized",
    "save_quantized",
    "sensitivity",
]

"""edgeslim: make PyTorch models small, fast and frugal for edge devices, and prove it with measured numbers.

Public verbs (one per step, same shape everywhere; each returns something new and never mutates its input)::

    q   = edgeslim.quantize(model, edgeslim.QuantConfig(...), calib=train)
    art = edgeslim.export(q, "onnx", example_inputs=val)
    m   = edgeslim.measure(art, data=val, runtime="onnxruntime")
    edgeslim.report([m_before, m_after], "out/")

``import edgeslim`` imports torch but none of the optional or heavy backends (onnx, onnxruntime, yaml, ...);
those load when a verb needs them.
"""

from edgeslim._version import __version__
from edgeslim.core.artifact import Artifact
from edgeslim.core.errors import (
    ConfigError,
    DataError,
    EdgeslimError,
    ExportError,
    ModelError,
    OutputExistsError,
    QuantizationError,
    RuntimeBackendError,
)
from edgeslim.core.metrics import Figure, Metrics
from edgeslim.export._api import ValidationFloors, export
from edgeslim.quantize._api import QuantizedModel, quantize
from edgeslim.quantize._config import QuantConfig
from edgeslim.report._api import report
from edgeslim.runtime._measure import measure
from edgeslim.train._trainer import TrainConfig

from edgeslim import data, models  # noqa: E402  (subpackages users reach as edgeslim.data / edgeslim.models)

__all__ = [
    "Artifact", "ConfigError", "DataError", "EdgeslimError", "ExportError", "Figure", "Metrics", "ModelError",
    "OutputExistsError", "QuantConfig", "QuantizationError", "QuantizedModel", "RuntimeBackendError",
    "TrainConfig", "ValidationFloors", "__version__", "data", "export", "measure", "models", "quantize", "report",
]

"""edgeslim: make PyTorch models small, fast and frugal for edge devices, and prove it with measured numbers.

Public verbs (one per step, same shape everywhere; each returns something new and never mutates its input)::

    q   = edgeslim.quantize(model, edgeslim.QuantConfig(...), data=train)
    art = edgeslim.export(q, "onnx", example_inputs=val)
    m   = edgeslim.measure(art, data=val, runtime="onnxruntime")
    edgeslim.report([m_before, m_after], "out/")
    p   = edgeslim.prune(model, edgeslim.PruneConfig(method="channel", target_macs=0.5), example_inputs=x)
    s   = edgeslim.distill(student, teacher, edgeslim.DistillConfig(...), data=(train, val))
    edgeslim.save(q, "model.recipe");  q2 = edgeslim.load("model.recipe")   # any chain: steps + state_dict
    n   = edgeslim.search_widths(model, edgeslim.NASConfig(latency_ratio=0.25), data=(train, val), example_inputs=x)
    best = edgeslim.optimize(model, data=(train, val), budget=edgeslim.Budget(max_accuracy_drop=0.005, min_speedup=3))

Helpers of one technique live in its subpackage (``from edgeslim.prune import save_pruned``);
``edgeslim.share`` (the storage format, codecs) and ``edgeslim.devices`` (profiles, predictions) are reached
as subpackages; the sharing verbs ``cluster``, ``tie_layers``, ``factorize`` and ``separable`` are top-level.

``import edgeslim`` imports torch but none of the optional or heavy backends (onnx, onnxruntime, yaml, ...);
those load when a verb needs them.
"""

from edgeslim import data, devices, models, nas, share  # noqa: E402  (subpackages users reach as edgeslim.data, ...)
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
from edgeslim.distill._api import distill
from edgeslim.distill._config import DistillConfig
from edgeslim.export._api import ValidationFloors, export
from edgeslim.nas._config import NASConfig
from edgeslim.nas._search import search_widths
from edgeslim.pipeline._budget import Budget
from edgeslim.pipeline._optimize import optimize
from edgeslim.pipeline._recipe import load, save
from edgeslim.pipeline._space import Space
from edgeslim.prune._api import prune
from edgeslim.prune._config import PruneConfig
from edgeslim.quantize._api import QuantizedModel, quantize
from edgeslim.quantize._config import QuantConfig
from edgeslim.quantize._sensitivity import BudgetConfig
from edgeslim.report._api import report
from edgeslim.runtime._measure import measure
from edgeslim.share import (
    ClusterConfig,
    FactorizeConfig,
    SeparableConfig,
    TieConfig,
    cluster,
    factorize,
    separable,
    tie_layers,
)
from edgeslim.train._trainer import TrainConfig

__all__ = [
    "Artifact",
    "Budget",
    "BudgetConfig",
    "ClusterConfig",
    "ConfigError",
    "DataError",
    "DistillConfig",
    "EdgeslimError",
    "ExportError",
    "FactorizeConfig",
    "Figure",
    "Metrics",
    "ModelError",
    "NASConfig",
    "OutputExistsError",
    "PruneConfig",
    "QuantConfig",
    "QuantizationError",
    "QuantizedModel",
    "RuntimeBackendError",
    "SeparableConfig",
    "Space",
    "TieConfig",
    "TrainConfig",
    "ValidationFloors",
    "__version__",
    "cluster",
    "data",
    "devices",
    "distill",
    "export",
    "factorize",
    "load",
    "measure",
    "models",
    "nas",
    "optimize",
    "prune",
    "quantize",
    "report",
    "save",
    "search_widths",
    "separable",
    "share",
    "tie_layers",
]

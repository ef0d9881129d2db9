"""Hardware-aware neural architecture search: per-layer widths under a latency budget measured on a runtime.

>>> small = edgeslim.nas.search_widths(model, edgeslim.nas.NASConfig(latency_ratio=0.25), data=(train, val),
...                                    example_inputs=x)
>>> print(small.report.summary())          # widths per unit, predicted and *measured* latency, accuracy
>>> space = edgeslim.nas.width_space(model, x)                       # the coupled units and their widths
>>> pred = edgeslim.nas.build_predictor(model, space)                # the per-layer table (cached per host) + fit
>>> edgeslim.nas.check_predictor(model, pred, samples=50)            # median error, Kendall tau vs measured
>>> edgeslim.nas.latency_shares(pred, ("host", "raspberry-pi-4"))    # why the two searches differ

The latency model is a per-layer lookup table timed here (:class:`LatencyTable`, one file per runtime, version,
thread count and host CPU+ISA) and a fitted ``a * sum + c * weight MB + b`` for what the sum misses. The width search composes
channel pruning: it calls ``edgeslim.prune``'s public API (``prune``, ``apply_recipe``) to narrow units with
inherited weights, and that is this package's one dependency on another technique.
"""

from edgeslim.nas._config import NASConfig
from edgeslim.nas._hardware import device_ratio, latency_shares, roofline_ms
from edgeslim.nas._layers import Layer, LayerOp, micro_onnx, trace_layers
from edgeslim.nas._predictor import (
    Predictor,
    affine_fit,
    build_predictor,
    check_predictor,
    export_onnx,
    kendall_tau,
    latency_fit,
    measure_models,
    requests,
)
from edgeslim.nas._search import NASReport, search_widths
from edgeslim.nas._space import Unit, WidthSpace, width_space
from edgeslim.nas._table import LatencyTable, default_dir, host_key

__all__ = [
    "LatencyTable",
    "Layer",
    "LayerOp",
    "NASConfig",
    "NASReport",
    "Predictor",
    "Unit",
    "WidthSpace",
    "affine_fit",
    "build_predictor",
    "check_predictor",
    "default_dir",
    "device_ratio",
    "export_onnx",
    "host_key",
    "kendall_tau",
    "latency_fit",
    "latency_shares",
    "measure_models",
    "micro_onnx",
    "requests",
    "roofline_ms",
    "search_widths",
    "trace_layers",
    "width_space",
]

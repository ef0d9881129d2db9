"""Runtimes (onnxruntime, torch; openvino, litert, executorch as extras) behind one interface (``load(target, runtime, threads=...) -> Runner``; ``runner.run(x) -> y``),
the latency harness, static ONNX counts, and the ``measure`` verb.

>>> m = edgeslim.runtime.measure(artifact, data=val, threads=(1, 2), batch_sizes=(1, 8))
>>> m["latency_p50_ms@t1b1"], m["accuracy"], m["peak_memory_mb"]
"""

from edgeslim.runtime._candidates import artifact_candidates
from edgeslim.runtime._compare import compare_runtimes
from edgeslim.runtime._detect import evaluate_detector
from edgeslim.runtime._executorch import ExecuTorchRunner
from edgeslim.runtime._litert import LiteRtRunner
from edgeslim.runtime._measure import interleaved_latency, latency, measure
from edgeslim.runtime._openvino import OpenVinoRunner  # noqa: I001 (each registers itself; its package loads lazily)
from edgeslim.runtime._runners import RUNTIMES, OrtRunner, Runner, TorchRunner, load, missing, optimized_op_types
from edgeslim.runtime._static import onnx_macs, onnx_params
from edgeslim.runtime._tune import best_for_budget, fusion_check, sweep

__all__ = [
    "RUNTIMES",
    "ExecuTorchRunner",
    "LiteRtRunner",
    "OpenVinoRunner",
    "OrtRunner",
    "Runner",
    "TorchRunner",
    "artifact_candidates",
    "best_for_budget",
    "compare_runtimes",
    "evaluate_detector",
    "fusion_check",
    "interleaved_latency",
    "latency",
    "load",
    "measure",
    "missing",
    "onnx_macs",
    "onnx_params",
    "optimized_op_types",
    "sweep",
]

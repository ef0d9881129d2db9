"""Real-time tuning: a thread x batch sweep (throughput vs p99) and a graph-fusion check."""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from edgeslim.core.artifact import Artifact
from edgeslim.core.errors import ConfigError
from edgeslim.runtime._measure import latency
from edgeslim.runtime._runners import _require, load, optimized_op_types, positive_int

log = logging.getLogger(__name__)

FUSION_OPS = ("Conv", "BatchNormalization", "Relu", "Clip", "FusedConv", "QLinearConv")


def sweep(
    target: Any,
    *,
    threads: Iterable[int] = (1, 2),
    batch_sizes: Iterable[int] = (1, 4, 16),
    runtime: str = "onnxruntime",
    input_shape: tuple[int, ...] | None = None,
    runs: int = 50,
    max_seconds: float = 3.0,
) -> list[dict[str, float]]:
    """Latency and throughput for every (threads, batch) pair, measured interleaved per setting.

    Args:
        target: an artifact (or what ``runtime`` loads).
        threads: intra-op thread counts.
        batch_sizes: batch sizes.
        runtime: a registered runtime name.
        input_shape: one sample's shape; defaults to ``target.input_shape``.
        runs: timed runs per setting (at most; each setting also stops after ``max_seconds``).

    Returns:
        One row per setting: ``threads``, ``batch``, ``p50_ms``, ``p99_ms``, ``throughput_ips`` (samples/s at p50).
    """
    ts = tuple(positive_int("threads", t) for t in threads)
    bs = tuple(positive_int("batch_sizes", b) for b in batch_sizes)
    if not ts or not bs:
        raise ConfigError("sweep needs at least one thread count and one batch size")
    shape = tuple(input_shape or getattr(target, "input_shape", ()) or ())
    if not shape:
        raise ConfigError("sweep: input_shape is required when the target is not an Artifact with input_shape")
    rng = np.random.default_rng(0)
    rows = []
    for t in ts:
        runner = load(target, runtime, threads=t)
        for b in bs:
            x = rng.standard_normal((b, *shape), dtype=np.float32)
            lat = latency(runner, x, warmup=5, runs=runs, max_seconds=max_seconds)
            rows.append(
                {
                    "threads": t,
                    "batch": b,
                    "p50_ms": lat["p50_ms"],
                    "p99_ms": lat["p99_ms"],
                    "throughput_ips": b / lat["p50_ms"] * 1e3,
                    "runs": lat["runs"],
                }
            )
            log.info(
                "sweep t=%d b=%d p50=%.3f ms p99=%.3f ms %.0f samples/s",
                t,
                b,
                lat["p50_ms"],
                lat["p99_ms"],
                rows[-1]["throughput_ips"],
            )
    return rows


def best_for_budget(rows: list[dict[str, float]], p99_budget_ms: float) -> dict[str, float]:
    """The highest-throughput setting whose p99 latency is within ``p99_budget_ms``.

    Raises:
        ConfigError: when the budget is not positive or no setting meets it (the fastest p99 is named).
    """
    if not p99_budget_ms > 0:
        raise ConfigError(f"p99_budget_ms={p99_budget_ms!r} is not allowed; use a number > 0")
    ok = [r for r in rows if r["p99_ms"] <= p99_budget_ms]
    if not ok:
        best = min(rows, key=lambda r: r["p99_ms"])
        raise ConfigError(
            f"no setting meets p99 <= {p99_budget_ms} ms; the lowest p99 is {best['p99_ms']:.3f} ms "
            f"(threads={best['threads']}, batch={best['batch']})"
        )
    return max(ok, key=lambda r: r["throughput_ips"])


def fusion_check(target: Artifact | str | Path) -> dict[str, Any]:
    """Conv/BN/ReLU counts in the exported ONNX graph and in the graph ONNX Runtime optimizes it to.

    ``folded`` is True when no BatchNormalization survives in the optimized graph and no standalone Relu follows
    a Conv there (ORT fused Conv+ReLU into FusedConv, or the activation into QLinearConv).
    """
    onnx = _require("onnx", "onnx")
    path = Path(target.path if isinstance(target, Artifact) else target)
    g = onnx.load(str(path)).graph
    exported = collections.Counter(n.op_type for n in g.node)
    optimized = optimized_op_types(path)
    producer_ops = _conv_fed_relus(path)
    return {
        "exported": {k: exported.get(k, 0) for k in FUSION_OPS},
        "optimized": {k: optimized.get(k, 0) for k in FUSION_OPS},
        "exported_nodes": sum(exported.values()),
        "optimized_nodes": sum(optimized.values()),
        "folded": optimized.get("BatchNormalization", 0) == 0 and producer_ops == 0,
    }


def _conv_fed_relus(path: Path) -> int:
    """Relu/Clip nodes fed directly by a Conv in ORT's optimized graph (should be 0 after fusion)."""
    import tempfile

    ort, onnx = _require("onnxruntime", "onnxruntime"), _require("onnx", "onnx")
    with tempfile.TemporaryDirectory() as td:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(Path(td) / "opt.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        g = onnx.load(so.optimized_model_filepath).graph
    prod = {o: n.op_type for n in g.node for o in n.output}
    return sum(1 for n in g.node if n.op_type in ("Relu", "Clip") and prod.get(n.input[0]) == "Conv")

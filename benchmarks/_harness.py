"""What the benchmarks share: one way to open an ONNX Runtime session and one record of the host they ran on.

Latency is timed by :func:`edgeslim.runtime.interleaved_latency` (every variant takes a turn in every round, so
load drifting on a shared host hits them alike); this file holds only what the library does not.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def ort_session(path: str | Path, threads: int = 1) -> Any:
    """An ONNX Runtime CPU session as edgeslim's runner opens one (sequential, 1 inter-op thread), for models with
    several inputs (text encoders) and for batched accuracy runs."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # ORT's default, said explicitly
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def host() -> dict[str, Any]:
    """The hardware and software a benchmark ran on (edgeslim's ``host_info``) and the load when it is called."""
    from edgeslim.core.metrics import host_info

    return {**host_info(), "cpus": os.cpu_count(), "load_avg": [round(v, 2) for v in os.getloadavg()]}


def latency_rounds(
    arts: dict[str, Any], rounds: int, runs: int, *, warmup: int = 10, max_seconds: float = 5.0
) -> dict[str, float]:
    """Median over interleaved rounds of each ONNX artifact's per-round median latency (ms): ONNX Runtime, 1 thread,
    batch 1, an all-zeros input (as ``edgeslim.measure`` without data); ``warmup`` untimed runs at every turn."""
    import numpy as np

    import edgeslim as es

    runners = {k: es.runtime.load(a, "onnxruntime", threads=1) for k, a in arts.items()}
    runs_of = {k: (lambda r=r, x=np.zeros((1, *arts[k].input_shape), np.float32): r.run(x)) for k, r in runners.items()}
    res = es.runtime.interleaved_latency(
        runs_of, rounds=rounds, runs=runs, warmup=0, rewarm=warmup, max_seconds_per_turn=max_seconds
    )
    return {k: r["median_of_rounds_ms"] for k, r in res.items()}


def latency_by_threads(
    arts: dict[str, Any], x: Any, threads: tuple[int, ...] = (1, 2), *, rounds: int, runs: int, shuffle: bool = False
) -> dict[str, dict[Any, float]]:
    """label -> {threads: median over interleaved rounds of per-round medians (ms), ``f"spread{t}"``: their
    round spread in percent}: every artifact (or ONNX file) in ONNX Runtime, batch ``x``, one interleaved run per
    thread count."""
    import edgeslim as es

    lat: dict[str, dict[Any, float]] = {}
    for t in threads:
        res = es.runtime.interleaved_latency(
            {k: es.runtime.load(a, "onnxruntime", threads=t) for k, a in arts.items()},
            x,
            rounds=rounds,
            runs=runs,
            warmup=10,
            shuffle=shuffle,
        )
        for k, r in res.items():
            lat.setdefault(k, {})[t] = r["median_of_rounds_ms"]
            lat[k][f"spread{t}"] = r["round_spread_pct"]
    return lat

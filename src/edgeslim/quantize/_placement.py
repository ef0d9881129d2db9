"""Host-measured placement (ONNX capture, static): a layer whose integer kernel is slower than its float one *on
this host* stays float, and the whole file is timed to prove the choice.

Integer kernels are not faster everywhere. On x86 without VNNI, ONNX Runtime's ``QLinearConv`` on a 3-channel stem
convolution (im2col with K = 27) or a narrow depthwise convolution at high resolution runs 1.5-2.5x *slower* than
its float NCHWc convolution, while wide pointwise convolutions gain 1.5-2x; with VNNI the balance moves. Which
layers lose depends on the CPU, the threads and the shapes, so it is measured, not listed:

1. **profile** the float graph and the all-integer graph in ONNX Runtime (its profiler: each kernel's time per run,
   median over :data:`PROFILE_RUNS` runs, at the deployment's thread count) and pair every Conv/Gemm/MatMul with its
   integer kernel (ORT names the fused ``QLinearConv`` after the node it replaces; a float NCHWc convolution after
   its output tensor);
2. the layers whose integer kernel is slower by more than :data:`MIN_LOSS` (relative) and :data:`MIN_LOSS_US` are
   candidates, worst first;
3. leaving a layer float adds a QuantizeLinear / DequantizeLinear (and maybe a layout transpose) at the border of the
   integer region, which the kernel times do not show, so a few candidate sets (the worst one; those
   :data:`RATIOS` times slower or more; all) are built and **the whole files are timed** interleaved with the all-integer one; the smallest set within 1% of
   the fastest file is kept only when that file is faster by at least :data:`MIN_GAIN` and in
   :data:`MIN_ROUNDS_WON` of :data:`ROUNDS` rounds. Otherwise every layer stays integer, and the record says so.

The decision and every figure it rests on (per-layer kernel times, each file's median, runtime, threads, host) go
to ``QuantReport.placement``; the layers kept float carry the measured reason. Accuracy can only gain (fewer layers
are quantized).
"""

from __future__ import annotations

import json
import logging
import re
import statistics
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: profiled runs per graph (after warm-up); the per-kernel median is taken
PROFILE_RUNS = 30
#: a layer is a candidate when its integer kernel is this much slower than its float one (relative) ...
MIN_LOSS = 0.10
#: ... and by at least this many microseconds
MIN_LOSS_US = 2.0
#: a candidate set is kept when its whole file is at least this much faster than the all-integer file
MIN_GAIN = 0.02
#: candidate sets beyond the worst layer and all of them: the layers at least this many times slower in integer
RATIOS = (2.0, 1.5, 1.25)
#: timing rounds of the whole files (interleaved), and how many of them a kept set must win against all-integer
ROUNDS = 5
MIN_ROUNDS_WON = 4
#: the layer ops whose kernels are compared
MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: ORT kernels that run those layers (float fused forms and integer forms)
_KERNELS = {
    "Conv",
    "FusedConv",
    "NhwcFusedConv",
    "ConvTranspose",
    "Gemm",
    "FusedGemm",
    "MatMul",
    "FusedMatMul",
    "QLinearConv",
    "QLinearMatMul",
    "QGemm",
    "ConvInteger",
    "MatMulInteger",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
}
_SUFFIX = re.compile(r"(_token_\d+|_nchwc|_kernel_time)+$")
_ACTIVATIONS = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Add"}


def kernel_times(graph: bytes, feeds: Mapping[str, np.ndarray], threads: int, runs: int = PROFILE_RUNS) -> dict:
    """``{kernel name: median microseconds per run}`` of the Conv/Gemm/MatMul kernels ONNX Runtime runs for
    ``graph`` (all optimizations on, ``threads`` intra-op threads), with each kernel's op type."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as td:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(td) / "placement")
        sess = ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"])
        for _ in range(3):
            sess.run(None, dict(feeds))
        for _ in range(runs):
            sess.run(None, dict(feeds))
        events = json.loads(Path(sess.end_profiling()).read_text())
    times: dict[str, list[float]] = {}
    ops: dict[str, str] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        op = e.get("args", {}).get("op_name", "")
        if op not in _KERNELS:
            continue
        times.setdefault(e["name"], []).append(float(e["dur"]))
        ops[e["name"]] = op
    # the first 3 profiled runs are the warm-up: keep the last ``runs`` of each kernel
    return {k: (statistics.median(v[-runs:]), ops[k]) for k, v in times.items()}


def _owner(kernel: str, nodes: Mapping[str, Any], producer: Mapping[str, Any]) -> str | None:
    """The float graph's MAC node a profiled kernel runs (by node name, or by output tensor for fused forms)."""
    base = _SUFFIX.sub("", kernel)
    if base in nodes:
        return base
    n = producer.get(base)
    for _ in range(3):  # a fused activation's output names the convolution (Conv -> Clip -> ...)
        if n is None:
            return None
        if n.op_type in MAC_OPS:
            return n.name
        if n.op_type not in _ACTIVATIONS:
            return None
        n = producer.get(n.input[0])
    return None


def per_layer(graph: bytes, times: Mapping[str, tuple[float, str]]) -> dict[str, tuple[float, str]]:
    """Kernel times keyed by the float graph's MAC node names (unpaired kernels dropped)."""
    import onnx

    model = onnx.load_from_string(graph)
    nodes = {n.name: n for n in model.graph.node if n.op_type in MAC_OPS}
    producer = {o: n for n in model.graph.node for o in n.output}
    out: dict[str, tuple[float, str]] = {}
    for k, (us, op) in times.items():
        owner = _owner(k, nodes, producer)
        if owner is not None:
            prev = out.get(owner)
            out[owner] = (us + (prev[0] if prev else 0.0), op)
    return out


def place(
    graph: bytes,
    build: Callable[[Mapping[str, str]], bytes],
    excluded: Mapping[str, str],
    feeds: Mapping[str, np.ndarray],
    *,
    threads: int = 1,
) -> tuple[dict[str, str], dict[str, Any]]:
    """(node -> reason for the layers that stay float, the record) for the float ``graph``.

    ``build(extra)`` returns the quantized graph with the nodes of ``extra`` float as well as ``excluded``.
    """
    from edgeslim.core.metrics import host_info
    from edgeslim.runtime._measure import interleaved_latency

    qall = build({})
    f_times = per_layer(graph, kernel_times(graph, feeds, threads))
    q_times = per_layer(graph, kernel_times(qall, feeds, threads))
    info = host_info()
    record: dict[str, Any] = {
        "runtime": "onnxruntime (CPUExecutionProvider)",
        "threads": threads,
        "batch": 1,
        "host": info.get("cpu", ""),
        "isa": info.get("isa", []),
        "profile_runs": PROFILE_RUNS,
        "min_loss": MIN_LOSS,
        "min_gain": MIN_GAIN,
        "layers": [],
        "variants": [],
        "float_nodes": [],
    }
    losing = []
    for node, (q_us, q_op) in q_times.items():
        if node in excluded or node not in f_times:
            continue
        f_us, f_op = f_times[node]
        record["layers"].append(
            {"node": node, "float_us": round(f_us, 1), "integer_us": round(q_us, 1), "float_op": f_op, "op": q_op}
        )
        if q_us > f_us * (1 + MIN_LOSS) and q_us - f_us >= MIN_LOSS_US:
            losing.append((q_us - f_us, node, f_us, q_us))
    losing.sort(reverse=True)
    record["slower_in_integer"] = [n for _, n, _, _ in losing]
    if not losing:
        record["decision"] = "every integer kernel is at least as fast as its float one here: all stay integer"
        return {}, record
    sets: list[list[str]] = []
    for pick in (
        losing[:1],  # the worst one
        *([e for e in losing if e[3] >= r * e[2]] for r in RATIOS),  # the clear losers (often a chain: stem, dw, pw)
        losing,  # all
    ):
        names = [n for _, n, _, _ in pick]
        if names and set(names) not in [set(x) for x in sets]:
            sets.append(names)
    graphs = {"all integer": qall, "float": graph}
    for i, s in enumerate(sets):
        graphs[f"set{i}"] = build(dict.fromkeys(s, "placement"))
    ms, wins = _time_files(graphs, feeds, threads, interleaved_latency)
    record["all_integer_ms"] = round(ms["all integer"], 4)
    record["float_ms"] = round(ms["float"], 4)
    for i, s in enumerate(sets):
        record["variants"].append({"float_nodes": s, "ms": round(ms[f"set{i}"], 4), "rounds_won": wins[f"set{i}"]})
    # the fewest float layers among the files within 1% of the fastest (less to go wrong elsewhere), which must
    # beat all-integer by MIN_GAIN and in most rounds (a fluke of one noisy round does not decide)
    fastest = min(ms[f"set{i}"] for i in range(len(sets)))
    best = min((i for i in range(len(sets)) if ms[f"set{i}"] <= fastest * 1.01), key=lambda i: len(sets[i]))
    best_ms = ms[f"set{best}"]
    if best_ms > ms["all integer"] * (1 - MIN_GAIN) or wins[f"set{best}"] < MIN_ROUNDS_WON:
        record["decision"] = (
            f"{len(losing)} layer(s) run slower in integer, but no file with them float was >= {MIN_GAIN:.0%} faster "
            f"in at least {MIN_ROUNDS_WON} of {ROUNDS} rounds (best {best_ms:.3f} ms vs {ms['all integer']:.3f} ms all "
            "integer): all stay integer"
        )
        return {}, _float_faster(record, ms)
    by_node = {n: (f, q) for _, n, f, q in losing}
    chosen = sets[best]
    record["float_nodes"] = chosen
    record["chosen_ms"] = round(best_ms, 4)
    record["decision"] = (
        f"{len(chosen)} layer(s) kept float: the file runs {best_ms:.3f} ms vs {ms['all integer']:.3f} ms with every "
        f"layer integer ({ms['all integer'] / best_ms:.2f}x; float model {ms['float']:.3f} ms; ORT, {threads} thread(s))"
    )
    reasons = {
        n: (
            f"integer kernel slower on this host: {by_node[n][1]:.0f} us vs {by_node[n][0]:.0f} us float (ORT profile, "
            f"{threads} thread(s)); the file with it float runs {best_ms:.3f} ms vs {ms['all integer']:.3f} ms all "
            "integer (QuantConfig.placement='measured')"
        )
        for n in chosen
    }
    return reasons, _float_faster(record, ms)


def _float_faster(record: dict[str, Any], ms: Mapping[str, float]) -> dict[str, Any]:
    """Say it when even the best quantized file is slower than the float model here (nothing silent)."""
    best = min(v for k, v in ms.items() if k != "float")
    if ms["float"] < best:
        record["decision"] += (
            f"; WARNING: the float model is faster here ({ms['float']:.3f} ms vs {best:.3f} ms): keep FP32 for speed"
        )
    return record


def _time_files(
    graphs: Mapping[str, bytes], feeds: Mapping[str, np.ndarray], threads: int, timer: Any
) -> tuple[dict[str, float], dict[str, int]]:
    """(median ms, rounds won against the all-integer file) of each graph, timed interleaved in ORT."""
    from edgeslim.core.onnx_model import ort_session

    runners = {}
    for k, g in graphs.items():
        s = ort_session(g, threads=threads)
        runners[k] = lambda s=s: s.run(None, dict(feeds))
    t = _once(runners["all integer"])  # runs per turn: about 0.2 s of the all-integer file
    runs = int(np.clip(200.0 / max(t, 1e-3), 5, 200))
    lat = timer(runners, rounds=ROUNDS, runs=runs, warmup=3, shuffle=True)
    ref = lat["all integer"]["round_p50_ms"]
    wins = {k: sum(a < b for a, b in zip(v["round_p50_ms"], ref, strict=True)) for k, v in lat.items()}
    return {k: float(v["median_of_rounds_ms"]) for k, v in lat.items()}, wins


def _once(run: Callable[[], Any]) -> float:
    import time

    run()
    t0 = time.perf_counter()
    run()
    return (time.perf_counter() - t0) * 1000

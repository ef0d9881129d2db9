"""Which nodes near a graph's outputs stay float: found by measurement, not by a hand list (ONNX capture, static).

A detector's head ends in arithmetic that 8 bits cannot carry: one Concat joins box pixels in [0, 160] with class
scores in [0, 1] (one shared int8 scale leaves the scores 1-2 levels), a distribution-focal softmax feeds a small
Conv whose output is a box side, anchor-point Adds and stride Muls turn grid units into pixels. Which of these
break depends on the model, so two rules run on the calibrated graph (see docs/design-quantize-capture.md):

1. **range ratio** (cheap, the whole graph): a Concat whose inputs' calibrated ranges differ by more than
   :data:`MAX_RANGE_RATIO` times stays float: ORT gives a quantized Concat one scale for all its inputs, so the
   narrow input keeps ``256 / ratio`` levels or fewer.
2. **post-processing stays float**: the nodes after the last Conv/Gemm/MatMul of each branch (walking back from
   the outputs) feed no integer kernel, so quantizing them saves nothing and only adds error (a detector's
   box decode: 0.3 px on a 16 px box moves its IoU at the 0.95 threshold).
3. **tail sensitivity** (measured): where an output joins several quantities in a Concat (a detector's boxes and
   scores), each of those last Conv/Gemm/MatMul nodes is quantized *alone* (ORT's own QDQ writer,
   ``nodes_to_quantize=[node]``, edgeslim's ranges) and run on calibration samples; when any *part* of an output
   (each input of the output Concat along its axis, scored on its own so the small scores are not hidden behind
   the large box pixels) falls below ``QuantConfig.tail_sqnr_db`` against float, the node stays float, with the
   measured SQNR as its reason. A plain output (logits) keeps its last layer integer.

Nodes of the tail that ORT has no integer kernel for (Sigmoid, Mul, Sub, Div, Softmax, ...) are float anyway; they
are listed too, so the report names every float node of the head.
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from edgeslim.core.onnx_model import ort_session, run_session, slice_inputs
from edgeslim.quantize import _onnx
from edgeslim.quantize._config import QuantConfig

log = logging.getLogger(__name__)

#: a Concat whose inputs' ranges differ by more than this factor keeps float (8 bits: 256 / 16 = 16 levels left)
MAX_RANGE_RATIO = 16.0
#: calibration samples the sensitivity pass runs each candidate on
SENSITIVITY_SAMPLES = 16
#: at most this many tail nodes are measured (the ones nearest the outputs first)
MAX_CANDIDATES = 48


def _graph(graph: bytes) -> Any:
    """The graph with inferred shapes: ONNX Runtime's symbolic inference first (it follows Shape -> Range ->
    Expand chains such as a detector's anchor grid, which ONNX's own inference leaves unknown), else ONNX's."""
    onnx = _onnx._onnx()
    model = onnx.load_from_string(graph)
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        return SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception as e:  # noqa: BLE001 - an op the symbolic inference does not know: ONNX's own inference
        log.debug("symbolic shape inference failed (%s); using onnx.shape_inference", type(e).__name__)
        return onnx.shape_inference.infer_shapes(model)


def _names(model: Any) -> None:
    for i, n in enumerate(model.graph.node):
        if not n.name:
            n.name = _onnx.node_name(n, i)


def range_ratio_rule(graph: bytes, ranges: Mapping[str, Any], excluded: Mapping[str, str]) -> dict[str, str]:
    """node -> reason for every Concat whose inputs' calibrated ranges differ by more than MAX_RANGE_RATIO."""
    model = _graph(graph)
    _names(model)
    inits = {i.name for i in model.graph.initializer}
    out: dict[str, str] = {}
    for n in model.graph.node:
        if n.op_type != "Concat" or n.name in excluded:
            continue
        widths = []
        for t in n.input:
            r = ranges.get(t)
            if t in inits or r is None or not all(math.isfinite(v) for v in r):
                continue
            widths.append((float(r[1]) - float(r[0]), t, r))
        widths = [w for w in widths if w[0] > 0]
        if len(widths) < 2:
            continue
        lo, hi = min(widths), max(widths)
        ratio = hi[0] / lo[0]
        if ratio > MAX_RANGE_RATIO:
            levels = max(1, int(255 / ratio))
            out[n.name] = (
                f"range ratio: it joins {hi[1]!r} in [{hi[2][0]:.3g}, {hi[2][1]:.3g}] with {lo[1]!r} in "
                f"[{lo[2][0]:.3g}, {lo[2][1]:.3g}] ({ratio:.0f}x apart): one shared int8 scale would leave the "
                f"narrow input about {levels} levels (limit {MAX_RANGE_RATIO:.0f}x)"
            )
    return out


def tail(graph: bytes) -> list[Any]:
    """The nodes from every graph output back to (and including) the last Conv/Gemm/MatMul of each branch, nearest
    the outputs first (breadth-first)."""
    model = _graph(graph)
    _names(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    seen: set[str] = set()
    order = []
    queue = collections.deque(o.name for o in model.graph.output)
    while queue:
        t = queue.popleft()
        n = producer.get(t)
        if n is None or n.name in seen:
            continue
        seen.add(n.name)
        order.append(n)
        if n.op_type in _onnx.MAC_OPS:
            continue  # the integer region starts here: what feeds it is not the tail
        queue.extend(i for i in n.input if i)
    return order


def output_parts(graph: bytes) -> dict[str, list[tuple[str, int, int, int]]]:
    """output -> its parts ``(label, axis, start, stop)``: the inputs of a graph-output Concat along its axis
    (e.g. boxes and class scores; also through one Transpose, with the axis as it lands in the output), or the
    whole output."""
    model = _graph(graph)
    producer = {o: n for n in model.graph.node for o in n.output}
    shapes = {
        vi.name: [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        for vi in [*model.graph.value_info, *model.graph.output, *model.graph.input]
    }
    out: dict[str, list[tuple[str, int, int, int]]] = {}
    for o in model.graph.output:
        n = producer.get(o.name)
        parts = [(o.name, 0, 0, -1)]
        perm: list[int] | None = None
        if n is not None and n.op_type == "Transpose":  # e.g. [B, 4 + C, A] -> [B, A, 4 + C]
            perm = next((list(a.ints) for a in n.attribute if a.name == "perm"), None)
            n = producer.get(n.input[0])
        if n is not None and n.op_type == "Concat":
            cat = n.output[0]
            axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
            rank = len(shapes.get(cat, []))
            axis = axis + rank if axis < 0 else axis
            sizes = [(shapes.get(t) or [None] * (axis + 1))[axis] if axis < len(shapes.get(t) or []) else None
                     for t in n.input]  # fmt: skip
            out_axis = axis if perm is None else (perm.index(axis) if axis in perm else None)
            if rank and out_axis is not None and None not in sizes and len(sizes) > 1:
                parts, start = [], 0
                for t, s in zip(n.input, sizes, strict=True):
                    parts.append((f"{o.name}[{t}]", out_axis, start, start + int(s)))
                    start += int(s)
        out[o.name] = parts
    return out


def detector_output(graph: bytes, parts: Mapping[str, Any]) -> str | None:
    """The graph's single output when it is a detector's (a Concat of 4 box values and C >= 1 class scores along
    one axis, the boxes in one or more leading inputs), else None."""
    if len(parts) != 1:
        return None
    name, p = next(iter(parts.items()))
    sizes = [stop - start for _, _, start, stop in p]
    if len(p) < 2 or min(sizes) < 1:
        return None
    # the leading inputs hold the 4 box values (one input, or e.g. x1y1 and x2y2 when the exporter merged nested
    # Concats), the rest the C >= 1 class scores
    lead = [sum(sizes[: k + 1]) for k in range(len(sizes) - 1)]
    return name if 4 in lead else None


def part_sqnr(
    ref: list[np.ndarray], out: list[np.ndarray], names: list[str], parts: Mapping[str, Any]
) -> dict[str, float]:
    """SQNR (dB) of every output part of ``out`` against ``ref``."""
    res: dict[str, float] = {}
    for name, r, o in zip(names, ref, out, strict=True):
        for label, axis, start, stop in parts.get(name, [(name, 0, 0, -1)]):
            if stop >= 0:
                r_, o_ = np.take(r, range(start, stop), axis=axis), np.take(o, range(start, stop), axis=axis)
            else:
                r_, o_ = r, o
            r_, o_ = r_.astype(np.float64).ravel(), o_.astype(np.float64).ravel()
            noise = float(((r_ - o_) ** 2).sum())
            res[label] = math.inf if noise == 0 else float(10 * np.log10(max((r_**2).sum(), 1e-30) / noise))
    return res


def sensitivity(
    graph: bytes,
    ranges: Mapping[str, Any],
    excluded: Mapping[str, str],
    config: QuantConfig,
    batches: list[Any],
) -> tuple[dict[str, str], dict[str, Any]]:
    """(node -> reason for the tail nodes that stay float, the record of what was measured).

    The record (``report.tail``): ``threshold_db``, ``samples``, ``range_ratio`` (the Concats kept float by the
    range rule), ``measured``: one entry per candidate (``node``, ``op``, ``min_part_sqnr_db``, ``worst_part``,
    ``float``), ``float_by_design``: tail nodes ORT has no integer kernel for."""
    float_nodes = dict(range_ratio_rule(graph, ranges, excluded))
    record: dict[str, Any] = {
        "threshold_db": config.tail_sqnr_db,
        "range_ratio_limit": MAX_RANGE_RATIO,
        "range_ratio": sorted(float_nodes),
        "measured": [],
        "float_by_design": [],
        "after_last_mac": [],
    }
    parts = output_parts(graph)
    record["detector_output"] = detector_output(graph, parts)
    nodes = tail(graph)
    record["float_by_design"] = [
        {"node": n.name, "op": n.op_type} for n in nodes if n.op_type not in _onnx.QUANTIZED_OPS
    ]
    quantizable = [n for n in nodes if n.op_type in _onnx.QUANTIZED_OPS and n.name not in excluded]
    for n in quantizable:  # the integer region stops at the last Conv/Gemm/MatMul of each branch
        if n.op_type not in _onnx.MAC_OPS and n.name not in float_nodes:
            float_nodes[n.name] = (
                f"{n.op_type} after the last Conv/Gemm/MatMul of its branch (the graph's post-processing): no integer "
                "kernel downstream needs its int8 data, so quantizing it only adds error"
            )
            record["after_last_mac"].append({"node": n.name, "op": n.op_type})
    candidates = [n for n in quantizable if n.op_type in _onnx.MAC_OPS][:MAX_CANDIDATES]
    parted = any(len(p) > 1 for p in parts.values())
    if config.tail_sqnr_db is None or not batches or not parted:
        record["samples"] = 0
        record["sensitivity"] = (
            "off (QuantConfig.tail_sqnr_db=None)"
            if config.tail_sqnr_db is None
            else "not run: no output joins several quantities in a Concat (a plain output, e.g. logits, keeps its "
            "last Conv/Gemm/MatMul integer)"
            if not parted
            else "not run: no calibration data"
        )
        return float_nodes, record
    record["sensitivity"] = (
        f"{len(candidates)} tail Conv/Gemm/MatMul node(s) quantized alone, each output part's SQNR vs float"
    )
    x = slice_inputs(batches[0], 0, SENSITIVITY_SAMPLES)
    sess = ort_session(graph)
    names = [o.name for o in sess.get_outputs()]
    ref = run_session(sess, x, chunk=SENSITIVITY_SAMPLES)
    record["samples"] = len(ref[0]) if ref else 0
    for n in candidates:
        if n.name in float_nodes:
            continue
        touched = [t for t in [*n.input, *n.output] if t in ranges]
        if not touched:
            continue
        try:
            q = _onnx.write_qdq(graph, ranges, excluded, config, only=[n.name])
            out = run_session(ort_session(q), x, chunk=SENSITIVITY_SAMPLES)
        except Exception as e:  # noqa: BLE001 - a candidate ORT cannot quantize alone is said, not fatal
            record["measured"].append({"node": n.name, "op": n.op_type, "error": _onnx._describe(e)})
            continue
        sq = part_sqnr(ref, out, names, parts)
        worst = min(sq, key=sq.get)
        keep_float = sq[worst] < config.tail_sqnr_db
        record["measured"].append(
            {
                "node": n.name,
                "op": n.op_type,
                "min_part_sqnr_db": round(sq[worst], 2) if math.isfinite(sq[worst]) else None,
                "worst_part": worst,
                "float": keep_float,
            }
        )
        if keep_float:
            float_nodes[n.name] = (
                f"tail sensitivity: quantized alone it drops output part {worst!r} to {sq[worst]:.1f} dB SQNR "
                f"against float (threshold {config.tail_sqnr_db:g} dB, {record['samples']} calibration samples)"
            )
    log.info(
        "quantize: tail sensitivity: %d of %d tail candidates kept float, %d Concat(s) by the range ratio",
        sum(m.get("float", False) for m in record["measured"]),
        len(candidates),
        len(record["range_ratio"]),
    )
    return float_nodes, record

"""Static figures of an ONNX graph: parameter count and multiply-accumulates (from ONNX shape inference)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from edgeslim.core.errors import ModelError
from edgeslim.runtime._runners import _require

log = logging.getLogger(__name__)

# inputs that carry data (weights, activations, biases); the other inputs of these ops are scales / zero points
_DATA_INPUTS = {
    "QuantizeLinear": {0},
    "DequantizeLinear": {0},
    "DynamicQuantizeLinear": {0},
    "QLinearConv": {0, 3, 8},
    "QGemm": {0, 3, 6},
    "ConvInteger": {0, 1},
    "MatMulInteger": {0, 1},
}
# op -> (index of the activation input, index of the weight input)
_MAC_OPS = {
    "Conv": (0, 1),
    "ConvTranspose": (0, 1),
    "QLinearConv": (0, 3),
    "ConvInteger": (0, 1),
    "Gemm": (0, 1),
    "QGemm": (0, 3),
    "MatMul": (0, 1),
    "QLinearMatMul": (0, 3),
    "MatMulInteger": (0, 1),
}
_INT64 = 7  # onnx.TensorProto.INT64: shape constants, never weights


def _load(model: Any) -> Any:
    onnx = _require("onnx", "onnx")
    if isinstance(model, onnx.ModelProto):
        return model
    from edgeslim.core.artifact import load_onnx

    return load_onnx(model)


def onnx_params(model: str | Path | Any) -> int:
    """Elements of the ONNX initializers that hold weights and biases.

    Quantization scales and zero points and int64 shape constants are not parameters and are not counted.

    Args:
        model: a path to an ``.onnx`` file or an ``onnx.ModelProto``.
    """
    g = _load(model).graph
    uses: dict[str, list[bool]] = {}
    for n in g.node:
        data = _DATA_INPUTS.get(n.op_type, {0, 3} if n.op_type.startswith("QLinear") else None)
        for i, name in enumerate(n.input):
            uses.setdefault(name, []).append(data is None or i in data)
    return sum(int(np.prod(t.dims)) for t in g.initializer if t.data_type != _INT64 and any(uses.get(t.name, [True])))


def measured_shapes(model: Any, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, list[int]]:
    """The shapes the tensors ``names`` take when ONNX Runtime runs ``model`` on ``feeds`` (one Shape node each)."""
    onnx = _require("onnx", "onnx")
    ort = _require("onnxruntime", "onnxruntime")
    from onnx import TensorProto, helper

    m = onnx.ModelProto()
    m.CopyFrom(_load(model))
    del m.graph.output[:]
    for i, name in enumerate(names):
        m.graph.node.append(helper.make_node("Shape", [name], [f"__shape_{i}"]))
        m.graph.output.append(helper.make_tensor_value_info(f"__shape_{i}", TensorProto.INT64, None))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return {n: [int(d) for d in s] for n, s in zip(names, sess.run(None, feeds), strict=True)}


def onnx_node_macs(model: str | Path | Any, feeds: dict[str, np.ndarray] | None = None) -> list[int | None]:
    """MACs at batch 1 of each node of the graph, in ``graph.node`` order: an int for Conv/ConvTranspose/Gemm/MatMul
    (and their integer forms), 0 for other ops, None where shape inference cannot give the node's shapes.

    With ``feeds`` (one sample for each input), shapes come from running the graph in ONNX Runtime, which knows
    them where static shape inference does not (reshapes computed from Shape ops)."""
    onnx = _require("onnx", "onnx")
    m = onnx.ModelProto()
    m.CopyFrom(_load(model))
    for inp in m.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if len(dims) and not dims[0].dim_value:
            dims[0].dim_value = 1  # fix the batch dimension (clears dim_param)
    g = onnx.shape_inference.infer_shapes(m).graph
    shapes: dict[str, list[int]] = {t.name: list(t.dims) for t in g.initializer}
    for vi in [*g.input, *g.value_info, *g.output]:
        dims = vi.type.tensor_type.shape.dim
        if vi.type.tensor_type.HasField("shape") and all(d.dim_value > 0 for d in dims):
            shapes[vi.name] = [d.dim_value for d in dims]
    if feeds is not None:
        wanted = sorted(
            {
                t
                for n in g.node
                if n.op_type in _MAC_OPS
                for t in (n.input[_MAC_OPS[n.op_type][0]], n.input[_MAC_OPS[n.op_type][1]], n.output[0])
                if t not in shapes
            }
        )
        if wanted:
            shapes.update(measured_shapes(m, feeds, wanted))
    out: list[int | None] = []
    for n in g.node:
        if n.op_type not in _MAC_OPS:
            out.append(0)
            continue
        ia, iw = _MAC_OPS[n.op_type]
        a, w, o = shapes.get(n.input[ia]), shapes.get(n.input[iw]), shapes.get(n.output[0])
        if a is None or w is None or o is None:
            out.append(None)
        elif "Conv" in n.op_type:  # out elements x (in-channels per group x kernel); transposed: per input element
            out.append(int(np.prod(a if n.op_type == "ConvTranspose" else o)) * int(np.prod(w[1:])))
        elif n.op_type in ("Gemm", "QGemm"):
            trans_a = any(at.name == "transA" and at.i for at in n.attribute)
            out.append(int(np.prod(o)) * (a[0] if trans_a else a[-1]))
        else:
            out.append(int(np.prod(o)) * a[-1])
    return out


def onnx_macs_detail(model: str | Path | Any) -> tuple[int, list[str]]:
    """MACs of Conv/ConvTranspose/Gemm/MatMul (and their integer forms) at batch 1, and the nodes skipped.

    A node is skipped (and named in the returned list) when shape inference cannot give its shapes.
    """
    g = _load(model).graph
    per_node = onnx_node_macs(model)
    total = sum(m for m in per_node if m)
    skipped = [f"{n.op_type} {n.name or n.output[0]}" for n, m in zip(g.node, per_node) if m is None]
    if skipped:
        log.warning("MAC count skipped %d node(s) without inferred shapes: %s", len(skipped), ", ".join(skipped))
    return total, skipped


def onnx_macs(model: str | Path | Any) -> int:
    """Multiply-accumulates of an ONNX model at batch 1 (Conv, ConvTranspose, Gemm, MatMul and integer forms).

    Raises:
        ModelError: when shape inference cannot give the shapes of some of those nodes (they are named).
    """
    total, skipped = onnx_macs_detail(model)
    if skipped:
        raise ModelError(f"cannot count MACs of {len(skipped)} node(s) without inferred shapes: {', '.join(skipped)}")
    return total

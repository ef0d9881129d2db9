"""The cost of an ONNX graph, node by node: MACs, bytes moved, op class and precision (:func:`graph_cost`).

Per node: MACs (Conv/Gemm/MatMul and integer forms) and bytes moved (inputs + weights + outputs), with the
element size of the node's precision (int8 when it reads a DequantizeLinear output or is a QLinear/Integer op,
as ONNX Runtime fuses QDQ pairs into integer kernels; Q/DQ nodes themselves are folded and cost nothing).
Each node gets an op class (dense conv, depthwise conv, 1x1 conv, gemm, elementwise, pool). The graph ONNX Runtime
really executes on this host (its optimized graph, shapes from one run) can be costed instead of the exported one.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeslim.core.errors import ConfigError, ModelError
from edgeslim.runtime._static import _MAC_OPS, _load

log = logging.getLogger(__name__)

_ELEM = {1: 4, 2: 1, 3: 1, 6: 4, 7: 8, 10: 2, 11: 8, 16: 2}  # ONNX TensorProto dtype -> bytes
_FREE = {
    "QuantizeLinear",
    "DequantizeLinear",
    "Reshape",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "Shape",
    "Constant",
    "Identity",
    "Gather",
    "Cast",
}
_INT_OPS = ("QLinear", "QGemm", "ConvInteger", "MatMulInteger")
COMPUTE_CLASSES = ("conv", "dwconv", "conv1x1", "gemm")
LIGHT_CLASSES = ("elementwise", "pool")
_POOL = (
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "QLinearAveragePool",
    "QLinearGlobalAveragePool",
)


def op_class(op_type: str, weight_shape: Sequence[int] | None, group: int = 1) -> str:
    """The cost class of a node: conv (dense kxk), dwconv (depthwise), conv1x1, gemm, pool or elementwise."""
    if op_type in _MAC_OPS:
        if "Conv" not in op_type:
            return "gemm"
        w = list(weight_shape or [])
        if group > 1 and len(w) > 1 and w[1] == 1:
            return "dwconv"
        return "conv1x1" if len(w) > 2 and int(np.prod(w[2:])) == 1 else "conv"
    return "pool" if op_type in _POOL else "elementwise"


@dataclasses.dataclass(frozen=True)
class NodeCost:
    """One ONNX node's cost at batch 1."""

    name: str
    op_type: str
    precision: str
    macs: int
    bytes: int
    op_class: str = "elementwise"


@dataclasses.dataclass(frozen=True)
class GraphCost:
    """The per-node costs of a graph plus its weight and peak-activation bytes."""

    nodes: tuple[NodeCost, ...]
    weight_bytes: int
    peak_activation_bytes: int
    op_counts: dict

    @property
    def macs(self) -> int:
        return sum(n.macs for n in self.nodes)

    def macs_by_precision(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for n in self.nodes:
            out[n.precision] = out.get(n.precision, 0) + n.macs
        return out

    @property
    def bytes(self) -> int:
        return sum(n.bytes for n in self.nodes)


def _path(artifact: Any) -> Any:
    return getattr(artifact, "path", artifact)


# ONNX Runtime's fused float kernels (com.microsoft), seen in its optimized graph: (activation, weight) input index
_COST_MAC_OPS = {**_MAC_OPS, "FusedConv": (0, 1), "FusedGemm": (0, 1), "FusedMatMul": (0, 1)}
RUNTIME_GRAPHS = ("onnxruntime",)


def graph_cost(artifact: Any, batch: int = 1, *, as_run_by: str | None = None) -> GraphCost:
    """Per-node MACs and bytes of an ONNX artifact/path/ModelProto at ``batch``.

    Args:
        as_run_by: ``None`` costs the exported graph, with Q/DQ pairs folded into integer kernels (what an INT8
            runtime does ideally; used for device predictions). ``"onnxruntime"`` costs the graph ONNX Runtime
            really executes on this host: its extended-level optimized graph (Conv+Relu fused, QDQ groups turned
            into QLinear kernels), where the Q/DQ nodes it could not fuse are real kernels with a cost. Shapes
            come from one run of that graph on zeros. Used to calibrate on, and predict for, the host.

    Raises:
        ModelError: when the file cannot be read or shape inference leaves compute nodes without shapes.
    """
    import onnx

    if as_run_by not in (None, *RUNTIME_GRAPHS):
        raise ConfigError(
            f"graph_cost(as_run_by={as_run_by!r}) is not supported; use None or one of {', '.join(RUNTIME_GRAPHS)}"
        )
    try:
        m = onnx.ModelProto()
        m.CopyFrom(_load(_path(artifact)))
    except Exception as e:  # noqa: BLE001 - any load failure becomes a clear error
        raise ModelError(f"cannot read ONNX model {str(_path(artifact))!r}: {str(e)[:200]}") from None
    for inp in m.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if len(dims) and not dims[0].dim_value:
            dims[0].dim_value = batch
    if as_run_by == "onnxruntime":
        m, shapes = _ort_executed_graph(m, str(_path(artifact)), batch)
        g = m.graph
    else:
        g = onnx.shape_inference.infer_shapes(m, data_prop=True).graph  # data_prop: Shape->Reshape chains
        shapes = _static_shapes(g)
    inits = {t.name for t in g.initializer}
    free = _FREE - {"QuantizeLinear", "DequantizeLinear"} if as_run_by else _FREE
    if as_run_by is None and any(o not in shapes for n in g.node if n.op_type in _MAC_OPS for o in n.output):
        try:  # ONNX Runtime's symbolic inference resolves computed Slice/Reshape shapes (e.g. channel shuffle)
            from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

            g = SymbolicShapeInference.infer_shapes(m, auto_merge=True).graph
            shapes = _static_shapes(g)
        except Exception as e:  # noqa: BLE001 - fall through to the clear error below
            log.debug("symbolic shape inference failed: %s", e)
    producer = {o: n for n in g.node for o in n.output}

    def nbytes(name: str, int8: bool) -> int:
        if name not in shapes:
            return 0
        dims, dt = shapes[name]
        return int(np.prod(dims)) * (1 if int8 and dt == 1 else _ELEM.get(dt, 4))

    def is_q(name: str) -> bool:
        p = producer.get(name)
        return p is not None and p.op_type == "DequantizeLinear"

    src = (lambda i: i) if as_run_by else (lambda i: _src(i, producer))  # exported graph: the int8 a kernel reads
    nodes, skipped = [], []
    for n in g.node:
        if n.op_type in free:
            continue
        qdq = n.op_type in ("QuantizeLinear", "DequantizeLinear")  # only reached for a runtime's executed graph
        # exported graph: an op reading a DequantizeLinear output becomes an integer kernel; in an executed graph
        # that fusion has happened already, and what still reads a DQ output is a float op
        int8 = n.op_type.startswith(_INT_OPS) or (not as_run_by and any(is_q(i) for i in n.input if i))
        prec = "int8" if int8 or qdq else "fp32"
        macs, w = 0, None
        if n.op_type in _COST_MAC_OPS:
            ia, iw = _COST_MAC_OPS[n.op_type]
            a, w, out = (
                shapes.get(n.input[ia], (None,))[0],
                shapes.get(n.input[iw], (None,))[0],
                shapes.get(n.output[0], (None,))[0],
            )
            if a is None or w is None or out is None:
                w = None
                skipped.append(n.name or n.output[0])
            elif "Conv" in n.op_type:
                macs = int(np.prod(a if n.op_type == "ConvTranspose" else out)) * int(np.prod(w[1:]))
            elif n.op_type in ("Gemm", "QGemm"):
                trans_a = any(at.name == "transA" and at.i for at in n.attribute)
                macs = int(np.prod(out)) * (a[0] if trans_a else a[-1])
            else:
                macs = int(np.prod(out)) * a[-1]
        moved = sum(nbytes(src(i), int8) for i in n.input if i) + sum(nbytes(o, int8) for o in n.output)
        group = next((at.i for at in n.attribute if at.name == "group"), 1)
        nodes.append(NodeCost(n.name or n.output[0], n.op_type, prec, macs, moved, op_class(n.op_type, w, group)))
    if skipped:
        raise ModelError(f"shape inference gave no shapes for {len(skipped)} compute node(s): {', '.join(skipped)}")
    weight_bytes = sum(nbytes(t, False) for t in inits)
    return GraphCost(
        tuple(nodes), weight_bytes, _peak_activation(g, shapes, inits, nbytes), dict(Counter(n.op_type for n in g.node))
    )


def _ort_executed_graph(m: Any, where: str, batch: int) -> tuple[Any, dict[str, tuple[list[int], int]]]:
    """ONNX Runtime's extended-level optimized graph of ``m`` and the shape of every tensor in it (one run on zeros,
    batch ``batch``; other dynamic dimensions are set to 1)."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as td:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # no host-specific NCHWc
        so.optimized_model_filepath = str(Path(td) / "opt.onnx")
        so.log_severity_level = 3
        try:
            src = where if Path(where).is_file() else m.SerializeToString()  # a file keeps its external data
            ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
            opt = onnx.load(so.optimized_model_filepath)
        except Exception as e:  # noqa: BLE001 - a clear error instead of ORT's
            raise ModelError(f"ONNX Runtime cannot load {where!r} to cost its executed graph: {str(e)[:200]}") from None
    probe = onnx.ModelProto()
    probe.CopyFrom(opt)
    have = {o.name for o in probe.graph.output}
    inits = {t.name for t in probe.graph.initializer}
    for n in probe.graph.node:
        probe.graph.output.extend(onnx.ValueInfoProto(name=o) for o in n.output if o and o not in have | inits)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {}
    for i in sess.get_inputs():
        dims = [d if isinstance(d, int) and d > 0 else (batch if k == 0 else 1) for k, d in enumerate(i.shape)]
        dt = {
            "tensor(float)": np.float32,
            "tensor(int64)": np.int64,
            "tensor(int32)": np.int32,
            "tensor(float16)": np.float16,
            "tensor(uint8)": np.uint8,
            "tensor(int8)": np.int8,
        }.get(i.type, np.float32)
        feeds[i.name] = np.zeros(dims, dtype=dt)
    outs = sess.run(None, feeds)
    shapes = {t.name: (list(t.dims), t.data_type) for t in opt.graph.initializer}
    for name, v in [*feeds.items(), *((o.name, v) for o, v in zip(sess.get_outputs(), outs))]:
        a = np.asarray(v)
        shapes[name] = (list(a.shape), int(onnx.helper.np_dtype_to_tensor_dtype(a.dtype)))
    return opt, shapes


def _static_shapes(g: Any) -> dict[str, tuple[list[int], int]]:
    """Tensor name -> (dims, ONNX elem type) for every tensor whose shape is fully known."""
    shapes: dict[str, tuple[list[int], int]] = {t.name: (list(t.dims), t.data_type) for t in g.initializer}
    for vi in [*g.input, *g.value_info, *g.output]:
        tt = vi.type.tensor_type
        if tt.HasField("shape") and all(d.dim_value > 0 for d in tt.shape.dim):
            shapes[vi.name] = ([d.dim_value for d in tt.shape.dim], tt.elem_type)
    return shapes


def _src(name: str, producer: dict) -> str:
    """Look through a DequantizeLinear to the int8 tensor it reads (what an integer kernel really loads)."""
    p = producer.get(name)
    return p.input[0] if p is not None and p.op_type == "DequantizeLinear" else name


def _peak_activation(g: Any, shapes: dict, inits: set, nbytes: Callable) -> int:
    """Peak bytes of live activations in graph order (a tensor lives from its producer to its last consumer)."""
    last: dict[str, int] = {}
    for i, n in enumerate(g.node):
        for name in n.input:
            last[name] = i
    for o in g.output:
        last[o.name] = len(g.node)
    live = {i.name: nbytes(i.name, False) for i in g.input if i.name not in inits}
    peak = sum(live.values())
    for i, n in enumerate(g.node):
        for o in n.output:
            live[o] = nbytes(o, False)
        peak = max(peak, sum(live.values()))
        for name in [k for k in live if last.get(k, -1) <= i]:
            del live[name]
    return peak

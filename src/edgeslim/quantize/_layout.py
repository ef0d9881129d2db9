"""Q/DQ layouts per runtime: where the quantize/dequantize pairs of a static INT8 graph sit for the runtime that runs it.

ONNX Runtime's QDQ writer (``_onnx.write_qdq``) lays a graph out for ONNX Runtime: every quantizable op's output is
quantized, so each Conv fuses into a ``QLinearConv`` that writes int8, and pooling / concat / reshape-like ops carry
int8 data between them. OpenVINO reads the same Q/DQ pairs as ``FakeQuantize`` and its low-precision transformations
(LPT) want them elsewhere; measured on YOLOv8n at 160x160 (OpenVINO 2026.4, 1 thread, AVX2 host) the ORT layout ran
15% slower than NNCF's OpenVINO placement for the same convolutions, in three places:

- a Q/DQ pair on a Conv's output feeding its activation (SiLU = ``x * sigmoid(x)``, HardSwish, ...) stops OpenVINO
  from fusing the activation into the convolution as a post-op: 57 such pairs ran as 84 separate int8 "Subgraph"
  kernels (1.5 ms of 4.8). The activation's output is quantized anyway (the next Conv's input), so the pair is dropped.
- a Q/DQ pair after a precision-preserving op (Split, MaxPool, nearest Resize, Concat, reshape-like) makes OpenVINO
  dequantize and requantize the data (a zero-point Subtract per pair): LPT carries the input's quantization through
  such ops by itself, so the pair is dropped.
- a Concat whose inputs have different scales must requantize them: its inputs' quantizers get one shared range (the
  union), as NNCF's "unified scale" groups do, unless their ranges are more than ``CONCAT_RANGE_RATIO`` apart.

The result keeps ONNX semantics (ORT runs it, with some Convs in float where no DequantizeLinear feeds them
directly), so the same file validates against torch in ORT and deploys to OpenVINO. Activations stay asymmetric
uint8: symmetric int8 activations (NNCF's default) ran the same convolutions ~3% faster in OpenVINO here but lost
6 mAP points on this AVX2 host in OpenVINO (not in ONNX Runtime, same file), so that trade is not made.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np

#: ops whose output values are a subset / rearrangement of their inputs': a quantized input stays quantized through
#: them (Resize only in nearest mode: a linear resize makes values between the grid's; Pad only with zeros, which
#: every range holds exactly, and then OpenVINO folds it into the next convolution's padding)
PRESERVING = frozenset(
    {
        "Pad",
        "Split",
        "MaxPool",
        "Resize",
        "Reshape",
        "Transpose",
        "Flatten",
        "Squeeze",
        "Unsqueeze",
        "Slice",
        "Concat",
        "Identity",
        "DepthToSpace",
        "SpaceToDepth",
    }
)
#: elementwise activations OpenVINO fuses into the producing Conv/MatMul as a post-op
ACTIVATIONS = frozenset(
    {"Relu", "Clip", "LeakyRelu", "Elu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Softplus", "Mul"}
)
#: gates of a self-gated activation (``x * gate(x)``: SiLU, HardSwish written out)
GATES = frozenset({"Sigmoid", "HardSigmoid"})
#: a Concat's inputs share one range only when their ranges' widths are at most this far apart
CONCAT_RANGE_RATIO = 16.0
#: integer-kernel ops whose outputs OpenVINO fuses activations into
PRODUCERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


class QdqGraph:
    """A Q/DQ ONNX model with its producer / consumer maps, rebuilt after each batch of pair removals."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.inits = {i.name: i for i in model.graph.initializer}
        self.refresh()

    def refresh(self) -> None:
        nodes = self.model.graph.node
        self.producer = {o: n for n in nodes for o in n.output}
        self.consumers: dict[str, list[Any]] = defaultdict(list)
        for n in nodes:
            for t in n.input:
                if t:
                    self.consumers[t].append(n)
        self.outputs = {o.name for o in self.model.graph.output}

    def op(self, tensor: str) -> str | None:
        p = self.producer.get(tensor)
        return p.op_type if p is not None else None

    def is_activation_q(self, n: Any) -> bool:
        """A QuantizeLinear of an activation (not of a weight / bias initializer) whose outputs only feed DQs."""
        return (
            n.op_type == "QuantizeLinear"
            and n.input[0] not in self.inits
            and n.output[0] not in self.outputs
            and bool(self.consumers[n.output[0]])
            and all(c.op_type == "DequantizeLinear" for c in self.consumers[n.output[0]])
            and not any(d.output[0] in self.outputs for d in self.consumers[n.output[0]])
        )

    def drop_pair(self, q: Any, drop: set[int], rename: dict[str, str]) -> None:
        drop.add(id(q))
        for d in self.consumers[q.output[0]]:
            drop.add(id(d))
            rename[d.output[0]] = q.input[0]

    def apply(self, drop: set[int], rename: dict[str, str]) -> int:
        keep = [n for n in self.model.graph.node if id(n) not in drop]
        for n in keep:
            for i, t in enumerate(n.input):
                if t in rename:
                    n.input[i] = rename[t]
        del self.model.graph.node[:]
        self.model.graph.node.extend(keep)
        self.refresh()
        return len(rename)


def _preserves(g: QdqGraph, n: Any) -> bool:
    if n.op_type not in PRESERVING:
        return False
    if n.op_type == "Resize":
        mode = next((a.s.decode() for a in n.attribute if a.name == "mode"), "nearest")
        return mode == "nearest"
    if n.op_type == "Pad":
        mode = next((a.s.decode() for a in n.attribute if a.name == "mode"), "constant")
        if mode != "constant":
            return False
        if len(n.input) > 2 and n.input[2]:
            return n.input[2] in g.inits and not _array(g, n.input[2]).any()
        return True
    return True


def quantized_source(g: QdqGraph, tensor: str, _depth: int = 0) -> list[Any] | None:
    """The DequantizeLinear nodes ``tensor`` comes from through precision-preserving ops (one per data input of
    each Concat on the way), or None when some path reaches a float value."""
    p = g.producer.get(tensor)
    if p is None or _depth > 64:
        return None
    if p.op_type == "DequantizeLinear":
        return [p] if p.input[0] not in g.inits else None
    if not _preserves(g, p):
        return None
    data = list(p.input) if p.op_type == "Concat" else [p.input[0]]
    found: list[Any] = []
    for t in data:
        src = quantized_source(g, t, _depth + 1)
        if src is None:
            return None
        found += src
    return found


def _fused_activation_pairs(g: QdqGraph) -> tuple[set[int], dict[str, str]]:
    drop: set[int] = set()
    rename: dict[str, str] = {}
    for q in g.model.graph.node:
        if not g.is_activation_q(q) or g.op(q.input[0]) not in PRODUCERS:
            continue
        dq_outs = [d.output[0] for d in g.consumers[q.output[0]]]
        users = [u for t in dq_outs for u in g.consumers[t]]
        # judge the pattern as it will be once the pair is gone (the activation reads the Conv's output)
        if users and _gated_activation(g, dq_outs, users):
            g.drop_pair(q, drop, rename)
    return drop, rename


def _gated_activation(g: QdqGraph, dq_outs: list[str], users: list[Any]) -> bool:
    """Whether every reader of the Conv's dequantized output is an elementwise activation of that output alone (a
    gate's Mul multiplies it by a Sigmoid/HardSigmoid of it), so OpenVINO fuses the chain into the Conv."""
    gates = {u.output[0] for u in users if u.op_type in GATES}
    allowed = set(dq_outs) | gates
    for u in users:
        if u.op_type not in ACTIVATIONS:
            return False
        if u.op_type == "Mul" and not set(u.input) <= allowed:
            return False
        if u.op_type in GATES and not all(m.op_type == "Mul" and m in users for m in g.consumers[u.output[0]]):
            return False
    return True


def _width(g: QdqGraph, dq: Any) -> float:
    scale = _array(g, dq.input[1])
    return float(np.max(scale)) * 255.0


def _array(g: QdqGraph, name: str) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(g.inits[name])


def _scalar_params(g: QdqGraph, dq: Any) -> tuple[float, int, Any] | None:
    if len(dq.input) < 3 or dq.input[1] not in g.inits or dq.input[2] not in g.inits:
        return None
    s, z = _array(g, dq.input[1]), _array(g, dq.input[2])
    if s.size != 1 or z.size != 1:
        return None
    return float(s), int(z), z.dtype


def _unify(g: QdqGraph, group: list[Any]) -> bool:
    """Give every quantizer of ``group`` (its DQs and the Qs feeding them) the union of their ranges."""
    from onnx import numpy_helper

    params = [_scalar_params(g, d) for d in group]
    if any(p is None for p in params):
        return False
    dtype = params[0][2]
    if any(p[2] != dtype for p in params):
        return False
    qmin, qmax = (0, 255) if dtype == np.uint8 else (-128, 127)
    lo = min((qmin - z) * s for s, z, _ in params)
    hi = max((qmax - z) * s for s, z, _ in params)
    if dtype == np.uint8:
        scale = (hi - lo) / 255.0
        zp = int(np.clip(round(-lo / scale), 0, 255)) if scale > 0 else 0
    else:  # symmetric int8 activations
        scale = max(-lo, hi) / 127.0
        zp = 0
    if scale <= 0:
        return False
    names = set()
    for d in group:
        for dq in g.consumers[d.input[0]]:  # every DQ of the tensor, and the Q making it
            if dq.op_type == "DequantizeLinear" and len(dq.input) >= 3:
                names.add((dq.input[1], dq.input[2]))
        q = g.producer.get(d.input[0])
        if q is not None and q.op_type == "QuantizeLinear" and len(q.input) >= 3:
            names.add((q.input[1], q.input[2]))
    for s_name, z_name in names:
        g.inits[s_name].CopyFrom(numpy_helper.from_array(np.array(scale, dtype=np.float32), s_name))
        g.inits[z_name].CopyFrom(numpy_helper.from_array(np.array(zp, dtype=dtype), z_name))
    return True


def _drop_preserving_pairs(g: QdqGraph) -> int:
    """Drop the Q/DQ pairs on the outputs of precision-preserving ops other than Concat (those go with their shared
    ranges, :func:`_share_concat_ranges`) whose data inputs are quantized already."""
    drop: set[int] = set()
    rename: dict[str, str] = {}
    for q in g.model.graph.node:
        if not g.is_activation_q(q):
            continue
        p = g.producer.get(q.input[0])
        if p is None or not _preserves(g, p) or p.op_type == "Concat":
            continue
        if quantized_source(g, q.input[0]) is not None:
            g.drop_pair(q, drop, rename)
    return g.apply(drop, rename)


def _share_concat_ranges(g: QdqGraph) -> tuple[int, list[str]]:
    """Concats in graph order: the quantizers of each one's inputs (traced through precision-preserving ops and the
    Concats before it) join one group with one range (union-find over the quantized tensors, so a tensor feeding two
    Concats ties both), and its own output pair goes. A Concat whose groups' ranges are more than
    ``CONCAT_RANGE_RATIO`` apart, or with a float input, keeps its output quantizer (it requantizes)."""
    parent: dict[str, str] = {}
    member: dict[str, Any] = {}

    def find(t: str) -> str:
        while parent[t] != t:
            parent[t] = parent[parent[t]]
            t = parent[t]
        return t

    unified: set[str] = set()
    requant: list[str] = []
    for n in list(g.model.graph.node):
        if n.op_type != "Concat":
            continue
        srcs = quantized_source(g, n.output[0])
        if not srcs or any(_scalar_params(g, d) is None for d in srcs):
            requant.append(n.name)
            continue
        for d in srcs:
            parent.setdefault(d.input[0], d.input[0])
            member.setdefault(d.input[0], d)
        roots = {find(d.input[0]) for d in srcs}
        widths = [_width(g, member[r]) for r in roots]
        if max(widths) > CONCAT_RANGE_RATIO * max(min(widths), 1e-12):
            requant.append(n.name)
            continue
        first, *rest = sorted(roots)
        for r in rest:
            parent[r] = first
        group = [member[t] for t in parent if find(t) == first]
        if _unify(g, group):
            unified |= {d.input[0] for d in group}
            drop: set[int] = set()
            rename: dict[str, str] = {}
            for q in g.consumers[n.output[0]]:
                if g.is_activation_q(q):
                    g.drop_pair(q, drop, rename)
            g.apply(drop, rename)
        else:
            requant.append(n.name)
    return len(unified), requant


def for_openvino(graph: bytes) -> tuple[bytes, dict[str, Any]]:
    """``graph`` (ORT's QDQ layout) laid out for OpenVINO; returns the new graph and what was changed."""
    import onnx

    model = onnx.load_from_string(graph)
    for i, n in enumerate(model.graph.node):
        if not n.name:
            n.name = f"{n.op_type}_{i}"
    g = QdqGraph(model)
    drop, rename = _fused_activation_pairs(g)
    fused = g.apply(drop, rename)
    preserved = _drop_preserving_pairs(g)
    unified, requant = _share_concat_ranges(g)
    record = {
        "runtime": "openvino",
        "activation_pairs_dropped": fused,
        "preserving_pairs_dropped": preserved,
        "concat_inputs_unified": unified,
        "concats_requantized": requant,
    }
    return model.SerializeToString(), record


def integer_input(g: QdqGraph, tensor: str) -> bool:
    """OpenVINO's view: a Conv/MatMul input is integer when it reaches a DequantizeLinear through
    precision-preserving ops (a weight: when it is a DequantizeLinear of an initializer)."""
    p = g.producer.get(tensor)
    if p is not None and p.op_type == "DequantizeLinear" and p.input[0] in g.inits:
        return True
    return quantized_source(g, tensor) is not None


#: runtime -> Q/DQ layout pass (None: ORT's writer's layout as is)
LAYOUTS: dict[str, Callable[[bytes], tuple[bytes, dict[str, Any]]] | None] = {
    "onnxruntime": None,
    "openvino": for_openvino,
}


def runtime_of(model: Any) -> str:
    """The runtime a quantized model's Q/DQ pairs are laid out for (``QuantConfig.runtime``; ``onnxruntime`` for
    anything else)."""
    from edgeslim.quantize._config import QuantConfig

    config = getattr(model, "config", None)
    return config.runtime if isinstance(config, QuantConfig) else "onnxruntime"

"""Clean-up of a QDQ ONNX graph written by the torch exporter, so ONNX Runtime runs integer kernels.

The exporter writes fake-quantized weights as ``QuantizeLinear(float weight) -> DequantizeLinear``, keeps
float biases, and routes shared constants through Identity/Constant nodes. This pass:

1. turns Constant nodes into initializers and bypasses Identity nodes on initializers;
2. folds ``QuantizeLinear`` of a constant into an int8 initializer feeding the ``DequantizeLinear``
   (the file then stores 1 byte per weight);
3. quantizes the float bias of every Conv/Gemm whose input and weight are dequantized to int32 with scale
   ``input_scale * weight_scale`` behind a ``DequantizeLinear`` (what ORT's QDQ fusion needs for QLinearConv);
4. gives every layer kept in float (a Conv/ConvTranspose/Gemm with a float weight) that reads a per-tensor
   ``DequantizeLinear`` its own per-axis ``DequantizeLinear`` of the same values. ORT's WeightBiasQuantization
   pass (ORT 1.32, at every enabled optimization level) otherwise quantizes such a layer's float weight to
   per-tensor INT8 on load, so a layer the user kept in float would silently run in INT8, per tensor;
5. removes what became unused.
"""

from __future__ import annotations

from collections import Counter

import numpy as np


def _np(init) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(init)


def _quantize(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int, dtype: np.dtype) -> np.ndarray:
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * x.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
        zp = zp.reshape(shape)
    info = np.iinfo(dtype)
    # the same float32 arithmetic as torch's fake quantization: round(x * (1 / scale)) + zero_point
    inv = (np.float32(1.0) / scale.astype(np.float32)).astype(np.float32)
    q = np.round((x.astype(np.float32) * inv).astype(np.float32)).astype(np.float64) + zp.astype(np.float64)
    return np.clip(q, info.min, info.max).astype(dtype)


def fold_qdq(model):
    """Rewrite ``model`` (an onnx.ModelProto) in place as described in the module docstring; return it."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    # 1. Constant -> initializer, Identity(initializer) -> initializer
    rename: dict[str, str] = {}
    keep = []
    for n in g.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
            t = helper.get_attribute_value(n.attribute[0])
            t.name = n.output[0]
            g.initializer.append(t)
            inits[t.name] = g.initializer[-1]
            continue
        if n.op_type == "Identity" and (n.input[0] in inits or n.input[0] in rename):
            rename[n.output[0]] = rename.get(n.input[0], n.input[0])
            continue
        keep.append(n)
    for n in keep:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
    for o in g.output:
        if o.name in rename:
            o.name = rename[o.name]
    # 2. Q(constant) -> int initializer; other ops on constants only (e.g. the rounded bias) -> initializer
    producers = {}
    nodes = []
    for n in _toposort(keep, {i.name for i in g.input} | set(inits)):
        if (
            n.op_type not in ("QuantizeLinear", "DequantizeLinear")
            and n.input
            and all(i in inits for i in n.input if i)
        ):
            for t in _evaluate(n, inits):
                g.initializer.append(t)
                inits[t.name] = g.initializer[-1]
            continue
        if n.op_type == "QuantizeLinear" and n.input[0] in inits and n.input[1] in inits:
            x = _np(inits[n.input[0]]).astype(np.float64)
            scale = _np(inits[n.input[1]]).astype(np.float64)
            zp_init = inits.get(n.input[2]) if len(n.input) > 2 else None
            zp = _np(zp_init) if zp_init is not None else np.zeros((), np.uint8)
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            q = _quantize(x, scale, zp, axis, zp.dtype)
            t = numpy_helper.from_array(q, n.output[0])
            g.initializer.append(t)
            inits[t.name] = g.initializer[-1]
            continue
        nodes.append(n)
        for o in n.output:
            producers[o] = n
    # 3. int32 bias for Conv/Gemm fed by DQ input and DQ weight
    new_nodes = []
    for n in nodes:
        if n.op_type in ("Conv", "Gemm") and len(n.input) == 3 and n.input[2] in inits:
            dq_x, dq_w = producers.get(n.input[0]), producers.get(n.input[1])
            if dq_x is not None and dq_w is not None and dq_x.op_type == dq_w.op_type == "DequantizeLinear":
                b = _np(inits[n.input[2]]).astype(np.float64)
                sx = _np(inits[dq_x.input[1]]).astype(np.float64)
                sw = _np(inits[dq_w.input[1]]).astype(np.float64)
                bscale = (sx.astype(np.float32) * sw.astype(np.float32)).astype(np.float64)
                if bscale.size == 1:  # per-tensor weights: one bias scale
                    bscale = bscale.reshape(())
                qb = np.clip(np.round(b / bscale), -(2**31), 2**31 - 1).astype(np.int32)
                base = n.input[2]
                g.initializer.extend(
                    [
                        numpy_helper.from_array(qb, base + "_int32"),
                        numpy_helper.from_array(bscale.astype(np.float32), base + "_int32_scale"),
                    ]
                )
                new_nodes.append(
                    helper.make_node(
                        "DequantizeLinear",
                        [base + "_int32", base + "_int32_scale"],
                        [base + "_dq"],
                        name=base + "_DequantizeLinear",
                        **({"axis": 0} if bscale.ndim else {}),
                    )
                )
                n.input[2] = base + "_dq"
        new_nodes.append(n)
    # 4. float layers reading a per-tensor DQ get a private per-axis DQ (see the module docstring)
    for n in list(new_nodes):
        if n.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(n.input) < 2 or n.input[1] not in inits:
            continue
        dq = producers.get(n.input[0])
        w = inits[n.input[1]]
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[1] not in inits or w.data_type != 1:
            continue  # not fed by a DQ, or the weight is not float32 (WeightBiasQuantization skips those)
        scale = _np(inits[dq.input[1]])
        if scale.size != 1:
            continue
        attrs = {a.name: a.i for a in n.attribute if a.type == 2}
        if n.op_type == "Gemm" and attrs.get("transA", 0):
            continue
        dims = list(w.dims)  # the input's channel count, from the weight's shape
        if n.op_type == "Conv":
            channels = dims[1] * attrs.get("group", 1)
        elif n.op_type == "ConvTranspose":
            channels = dims[0]
        else:  # Gemm: B is (K, N), or (N, K) when transposed
            channels = dims[1] if attrs.get("transB", 0) else dims[0]
        if channels < 2:
            continue  # a one-element scale counts as per-tensor
        base = f"{n.input[0]}_axis_for_{n.input[1]}"
        extra = [numpy_helper.from_array(np.full(channels, scale.reshape(()), scale.dtype), base + "_scale")]
        if len(dq.input) > 2 and dq.input[2] in inits:
            zp = _np(inits[dq.input[2]])
            extra.append(numpy_helper.from_array(np.full(channels, zp.reshape(()), zp.dtype), base + "_zp"))
        g.initializer.extend(extra)
        new_nodes.append(
            helper.make_node(
                "DequantizeLinear",
                [dq.input[0]] + [t.name for t in extra],
                [base],
                name=base + "_DequantizeLinear",
                axis=1,
            )
        )
        n.input[0] = base
    del g.node[:]
    g.node.extend(_toposort(new_nodes, {i.name for i in g.input} | {i.name for i in g.initializer}))
    # 5. drop unused initializers
    used = Counter(name for n in g.node for name in n.input)
    outputs = {o.name for o in g.output}
    alive = [i for i in g.initializer if used[i.name] or i.name in outputs]
    del g.initializer[:]
    g.initializer.extend(alive)
    compact_names(model)
    return model


def compact_names(model) -> None:
    """Give internal tensors and nodes short names (the exporter's path-like names cost ~5% of the file).

    Graph inputs and outputs keep their names.
    """
    g = model.graph
    keep = {i.name for i in g.input} | {o.name for o in g.output}
    mapping: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        if name not in mapping:
            mapping[name] = f"t{len(mapping)}"
        return mapping[name]

    for t in g.initializer:
        t.name = short(t.name)
    for i, n in enumerate(g.node):
        n.name = f"n{i}"
        for k, v in enumerate(n.input):
            n.input[k] = short(v)
        for k, v in enumerate(n.output):
            n.output[k] = short(v)
    vis = [v for v in g.value_info if v.name in mapping]
    for v in vis:
        v.name = mapping[v.name]
    del g.value_info[:]
    g.value_info.extend(vis)


def _evaluate(node, inits: dict) -> list:
    """Evaluate one node whose inputs are all constants with ONNX's reference implementation."""
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    feeds = {i: _np(inits[i]) for i in node.input if i}
    graph = helper.make_graph(
        [node],
        "fold",
        [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for k, v in feeds.items()],
        [helper.make_tensor_value_info(o, 0, None) for o in node.output],
    )
    outs = ReferenceEvaluator(helper.make_model(graph)).run(None, feeds)
    return [numpy_helper.from_array(np.asarray(v), name) for name, v in zip(node.output, outs)]


def _toposort(nodes: list, available: set[str]) -> list:
    """Order nodes so each comes after the producers of its inputs."""
    avail = set(available) | {""}
    pending = list(nodes)
    out = []
    while pending:
        rest = []
        for n in pending:
            if all(i in avail for i in n.input):
                out.append(n)
                avail.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):  # a cycle or a missing input: keep the original order for the rest
            out.extend(rest)
            break
        pending = rest
    return out

"""Calibration statistics collected in ONNX Runtime, in one pass over the calibration data.

Both captures calibrate here. The ONNX capture observes every float activation of its graph; the fx capture exports
its fake-quant graph once (its weights quantized, as the integer model will have them), removes the activation
QuantizeLinear/DequantizeLinear pairs so the values flow in float, and observes each quantizer's input tensor. Every
observed tensor becomes an extra graph output, the data runs through ONNX Runtime a few samples at a time (its CPU
kernels are 2-10x faster than torch eager on convolution nets, depthwise ones most), and each value updates its
:class:`~edgeslim.quantize._calibrate.Observer` in one pass (min, max and a histogram whose range grows exactly).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from edgeslim.core.onnx_model import (
    as_feeds,
    batch_len,
    fixed_batch,
    module_of,
    ort_session,
    slice_inputs,
    to_onnx,
)
from edgeslim.quantize._calibrate import Observer

log = logging.getLogger(__name__)

#: samples per ONNX Runtime run while calibrating (every observed tensor of the graph comes back per run)
CALIB_BATCH = 8


def observe_graph(graph: bytes, observers: Mapping[str, Observer], batches: list[Any]) -> set[str]:
    """Run ``graph`` on ``batches`` once, feeding each tensor named in ``observers`` to its observer.

    Tensors that are graph inputs are observed from the feeds. Returns the names whose values were not all finite
    (e.g. a -inf attention mask: no 8-bit range holds them; those observers are left as they were).
    """
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load_from_string(graph)
    graph_inputs = {i.name for i in model.graph.input}
    outputs = {o.name for o in model.graph.output}
    for name in observers:
        if name not in outputs and name not in graph_inputs:
            model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    sess = _session(model.SerializeToString())
    out_names = [o.name for o in sess.get_outputs()]
    in_names = [i.name for i in sess.get_inputs()]
    wanted = [i for i, n in enumerate(out_names) if n in observers]
    infinite: set[str] = set()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torch's spinning OpenMP workers would take the cores ONNX Runtime's threads need
    try:
        _run(sess, out_names, [out_names[j] for j in wanted], in_names, observers, batches, infinite)
    finally:
        torch.set_num_threads(threads)
    return infinite


def _session(graph: bytes) -> Any:
    """A session with ONNX Runtime's graph optimizations on (fusions and its blocked layouts: 1.3-1.6x faster passes on
    convolution nets). Every observed tensor is a graph output, which no fusion removes, so each keeps its value; a
    graph the optimizer refuses runs unoptimized."""
    try:
        return ort_session(graph, optimize=True, spin=False)
    except Exception as e:  # noqa: BLE001 - an optimizer failure on an unusual graph: run it as it is
        log.info(
            "calibration graph runs unoptimized (%s)", str(e).splitlines()[0][:150] if str(e) else type(e).__name__
        )
        return ort_session(graph, optimize=False, spin=False)


def _run(sess, out_names, fetch, in_names, observers, batches, infinite) -> None:
    step = fixed_batch(sess) or CALIB_BATCH  # a file exported with a static batch takes that many samples a run
    for b in batches:
        for i in range(0, batch_len(b), step):
            feeds = _typed_feeds(sess, as_feeds(slice_inputs(b, i, i + step), in_names))
            values = sess.run(fetch, feeds)
            pairs = [*zip(fetch, values, strict=True)]
            pairs += [(k, v) for k, v in feeds.items() if k in observers]
            for name, v in pairs:
                if v is None or v.size == 0 or not np.issubdtype(v.dtype, np.floating) or name in infinite:
                    continue
                if not observers[name].observe(torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))):
                    infinite.add(name)  # a non-finite value (e.g. a -inf attention mask): no 8-bit range holds it


def _typed_feeds(sess: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from edgeslim.core.onnx_model import _NP_TYPES

    types = {i.name: _NP_TYPES.get(i.type) for i in sess.get_inputs()}
    return {
        k: v.astype(types[k]) if types.get(k) is not None and v.dtype != types[k] else v
        for k, v in feeds.items()
        if k in types
    }


@contextlib.contextmanager
def _constant_weights(gm: torch.nn.Module) -> Iterator[None]:
    """Within the block each enabled weight quantizer (in eval mode) computes nothing: its layer holds the weight
    (and bias) as the integer model will have them, so the graph exports them as float constants. Exported as
    QuantizeLinear/DequantizeLinear on the float weight instead, ONNX Runtime (graph optimizations off, so every
    observed tensor stays as the graph computes it) would re-quantize every weight on every calibration run."""
    from edgeslim.quantize._modules import QuantWeight

    saved = []
    try:
        for m in gm.modules():
            if not isinstance(m, QuantWeight) or not m.enabled or m.training:
                continue
            layer = m.layer
            with torch.no_grad():
                w = m.quantized_weight().detach().clone()
                b = m.quantized_bias()
                b = None if b is None else b.detach().clone()
            saved.append((m, layer.weight.data, None if layer.bias is None else layer.bias.data))
            layer.weight.data = w
            if b is not None:
                layer.bias.data = b
            m.enabled = False
        yield
    finally:
        for m, w, b in saved:
            m.layer.weight.data = w
            if b is not None:
                m.layer.bias.data = b
            m.enabled = True


def fx_calibration_graph(
    gm: torch.nn.Module, quantizers: Mapping[str, torch.nn.Module], example: Any
) -> tuple[bytes, dict[str, str]]:
    """The fx capture's graph for calibration: ``gm`` exported with its weights fake-quantized and its activation
    quantizers removed, and the tensor each quantizer observes (``{quantizer module name: tensor name}``).

    The quantizers are exported as QuantizeLinear/DequantizeLinear pairs (nodes scoped by their module name), then
    each pair is bypassed. Raises ``RuntimeError`` when a quantizer cannot be found in the exported graph.
    """
    import onnx

    saved = {name: (q.state, q.scale.detach().clone(), q.zero_point.detach().clone()) for name, q in quantizers.items()}
    try:
        for q in quantizers.values():
            q.state = "quant"
            q.scale.data.fill_(1.0)
            q.zero_point.data.fill_(q.qmin if q.qmin < 0 else 0)
        with _constant_weights(gm):
            graph = to_onnx(gm, example)
    finally:
        for name, (state, scale, zp) in saved.items():
            q = quantizers[name]
            q.state = state
            q.scale.data.copy_(scale)
            q.zero_point.data.copy_(zp)
    model = onnx.load_from_string(graph)
    g = model.graph
    by_module: dict[str, list] = {}
    for n in g.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            by_module.setdefault(module_of(n.name), []).append(n)
    rename: dict[str, str] = {}
    drop = set()
    tensor_of: dict[str, str] = {}
    for name in quantizers:
        pair = by_module.get(name, [])
        qs = [n for n in pair if n.op_type == "QuantizeLinear"]
        dqs = [n for n in pair if n.op_type == "DequantizeLinear"]
        if len(qs) != 1 or len(dqs) != 1 or dqs[0].input[0] != qs[0].output[0]:
            raise RuntimeError(f"quantizer {name!r} is not one QuantizeLinear/DequantizeLinear pair in the export")
        tensor_of[name] = qs[0].input[0]
        rename[dqs[0].output[0]] = qs[0].input[0]
        drop.update((id(qs[0]), id(dqs[0])))
    for name, t in tensor_of.items():  # a quantizer fed straight by another one's output (e.g. Dropout in between)
        while t in rename:
            t = rename[t]
        tensor_of[name] = t
    keep = [n for n in g.node if id(n) not in drop]
    for n in keep:
        for i, t in enumerate(n.input):
            while t in rename:
                t = rename[t]
            n.input[i] = t
    extra = []
    for o in g.output:  # a quantized graph output (quantize_output=True): an Identity keeps its name
        if o.name in rename:
            src = o.name
            while src in rename:
                src = rename[src]
            extra.append(onnx.helper.make_node("Identity", [src], [o.name], name=f"{o.name}_observed"))
    del g.node[:]
    g.node.extend([*keep, *extra])
    del g.value_info[:]
    return model.SerializeToString(), tensor_of

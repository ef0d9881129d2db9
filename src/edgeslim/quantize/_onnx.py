"""Post-training quantization on the exported ONNX graph (``QuantConfig(capture="onnx")``).

Why this capture (see docs/design-quantize-capture.md): the ONNX export records every convolution, linear and
matmul however the model calls it (``nn.Conv2d`` subclasses calling ``F.conv2d``, functional weights,
``nn.MultiheadAttention``, Hugging Face attention), and ONNX Runtime's own QDQ writer places Q/DQ where ORT's CPU
kernels fuse them into integer kernels. So the steps are:

1. analysis: export the float model to ONNX (:func:`edgeslim.core.onnx_model.to_onnx`, or take the user's file),
   run ORT's ``quant_pre_process`` (shape inference and graph optimization; when it fails, say so and go on
   without it), and decide which nodes stay float and why;
2. statistics: every float activation becomes a graph output, the calibration data runs through ONNX Runtime and
   edgeslim's own calibration methods (:data:`~edgeslim.quantize.CALIBRATORS`) turn the observed values into one
   range per tensor;
3. apply: ORT's ``quantize_static`` writes the QDQ graph (U8 activations by default, S8 weights per channel) from
   exactly those ranges (given as its calibration cache, so ORT does not calibrate again).

The ranges, the excluded nodes and whether pre-processing ran are plain data: a recipe replays them on a fresh
float model without data (:func:`build_qdq`), and the result is the same file.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgeslim.core.errors import ConfigError, QuantizationError
from edgeslim.core.modules import first_match
from edgeslim.core.onnx_model import (
    module_of,
)
from edgeslim.quantize._api import weight_qmax
from edgeslim.quantize._calibrate import CALIBRATORS, Observer
from edgeslim.quantize._config import ActivationType, QuantConfig, QuantMode

log = logging.getLogger(__name__)

#: the ops whose multiply-accumulates count (their integer forms come out of ORT's fusion)
MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: ops ORT runs as integer kernels, or that move int8 data so the integer chain is never broken (pooling, padding,
#: resize, concat, reshape-like); Softmax, LayerNormalization, Sigmoid, Mul ... stay float (no gain, real loss)
QUANTIZED_OPS = (
    *MAC_OPS,
    "Add",
    "Concat",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "Pad",
    "Resize",
    "Reshape",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Flatten",
    "Split",
    "Slice",
    "Relu",
    "Clip",
)
#: a calibrated range beyond this magnitude is no activation but a mask constant (e.g. -3.4e38 for padded tokens)
RANGE_LIMIT = 1e6
#: op types whose output is integer on ORT's CPU (dynamic quantization's kernels)
INTEGER_MAC_OPS = ("ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "QGemm")


def _onnx():
    import onnx

    return onnx


def preprocess(graph: bytes) -> tuple[bytes, str | None]:
    """ORT's ``quant_pre_process`` on ``graph``: (the pre-processed graph, None) or (``graph``, why it failed).

    Either way, Constant nodes become initializers (ORT's quantizer treats a Constant's output as an activation
    that needs a calibrated range, and a constant has none)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as td:
        src, dst = Path(td) / "float.onnx", Path(td) / "pre.onnx"
        src.write_bytes(graph)
        try:
            # ORT writes sym_shape_infer_temp.onnx and external-data files into the working folder (and leaves them
            # there when shape inference fails): run it inside the temporary folder, never in the user's
            with _quiet(), contextlib.chdir(td):
                quant_pre_process(str(src), str(dst))
            return constants_to_initializers(dst.read_bytes()), None
        except Exception as e:  # noqa: BLE001 - ORT's pre-processing fails on some ViT/ConvNeXt graphs
            return constants_to_initializers(graph), _describe(e)


def _describe(e: BaseException) -> str:
    """An exception in one line: its type, its message (or where it was raised when it has none)."""
    import traceback

    msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    if not msg:
        frames = traceback.extract_tb(e.__traceback__)
        if frames:
            f = frames[-1]
            msg = f"raised in {Path(f.filename).name}:{f.lineno} ({f.name})"
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def constants_to_initializers(graph: bytes) -> bytes:
    """``graph`` with every Constant node holding a tensor turned into an initializer of the same name, and no
    stale ``value_info`` (ORT's optimizer can reuse a removed tensor's name for a new initializer, e.g. a folded
    BatchNorm's bias, and a leftover int64 value_info of that name then breaks the quantized graph)."""
    onnx = _onnx()
    from onnx import helper

    model = onnx.load_from_string(graph)
    keep = []
    for n in model.graph.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
            t = helper.get_attribute_value(n.attribute[0])
            t.name = n.output[0]
            model.graph.initializer.append(t)
        else:
            keep.append(n)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    # a bias shared with another node (the exporter merges equal constants, e.g. zero biases) would be quantized
    # as an int8 activation, not as the int32 bias ORT's Conv/Gemm fusion needs: give each its own copy
    inits = {i.name: i for i in model.graph.initializer}
    uses = collections.Counter(t for n in keep for t in n.input)
    for n in keep:
        if (
            n.op_type in ("Conv", "ConvTranspose", "Gemm")
            and len(n.input) > 2
            and n.input[2] in inits
            and uses[n.input[2]] > 1
        ):
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[n.input[2]])
            copy.name = f"{n.input[2]}__bias_of_{n.output[0]}"
            model.graph.initializer.append(copy)
            uses[n.input[2]] -= 1
            n.input[2] = copy.name
    produced = {o for n in keep for o in n.output}
    vis = [vi for vi in model.graph.value_info if vi.name in produced]
    del model.graph.value_info[:]
    model.graph.value_info.extend(vis)
    return model.SerializeToString()


@contextlib.contextmanager
def _quiet():
    """ORT's quantization tools log warnings (pre-processing advice, shape guesses) through the root logger."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def float_activations(model) -> list[str]:
    """Names of the float tensors that are not weights: graph inputs and node outputs (shape-inferred types)."""
    onnx = _onnx()
    g = onnx.shape_inference.infer_shapes(model).graph
    inits = {i.name for i in g.initializer}
    produced = {i.name for i in g.input} | {o for n in g.node if n.op_type != "Constant" for o in n.output}
    out = []
    for vi in [*g.input, *g.value_info, *g.output]:
        if (
            vi.name in produced
            and vi.name not in inits
            and vi.name not in out
            and vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        ):
            out.append(vi.name)
    return out


def calibrate(
    graph: bytes, batches: list[Any], config: QuantConfig, means: dict[str, np.ndarray] | None = None
) -> dict[str, tuple[float, float]]:
    """One clipping range per float activation of ``graph``, from edgeslim's calibration method on ``batches``.

    One pass over the data in ONNX Runtime (``_observe.observe_graph``): min, max and a histogram per tensor. Graph
    inputs keep their observed range (clipping input data only loses information). ``means`` (for bias correction)
    receives the per-channel mean (axis 1) of every Conv/Gemm data input, from the same pass.
    """
    from edgeslim.quantize._observe import observe_graph

    onnx = _onnx()
    model = onnx.load_from_string(graph)
    names = float_activations(model)
    graph_inputs = {i.name for i in model.graph.input}
    entropy = config.calibration == "entropy"
    same = shared_ranges(model, set(names))
    observers = {n: Observer(count_zeros=entropy) for n in names if n not in same}
    mean_of: dict[str, str] = {}  # Conv/Gemm data input -> the tensor whose channel means it takes
    if means is not None:
        for n in model.graph.node:
            if n.op_type in ("Conv", "Gemm") and n.input and n.input[0]:
                t = n.input[0]
                while t in same:  # a zero Pad's output: its input's means (the border zeros are left out)
                    t = same[t]
                mean_of[n.input[0]] = t
                observers.setdefault(t, Observer(count_zeros=entropy)).channel_sums = True
    signed = config.activation_type == ActivationType.INT8
    qmin, qmax = (-128, 127) if signed else (0, 255)
    infinite = observe_graph(graph, observers, batches)
    for x, t in mean_of.items():
        obs = observers[t]
        if obs.channel_count and t not in infinite:
            means[x] = obs.channel_total / obs.channel_count
    observers = {n: o for n, o in observers.items() if n in names and n not in same}
    method = CALIBRATORS.get(config.calibration)
    ranges = dict.fromkeys(infinite, (-math.inf, math.inf))
    for n, obs in observers.items():
        if obs.lo == float("inf") or n in infinite:
            continue
        fn = CALIBRATORS.get("minmax") if n in graph_inputs else method
        lo, hi = fn(obs.stats(qmin, qmax, config.percentile))
        ranges[n] = (float(min(lo, 0.0)), float(max(hi, 0.0)))
    for _ in range(len(same)):  # a tensor may take its range from another one that takes it in turn
        todo = {t: src for t, src in same.items() if t not in ranges and src in ranges}
        if not todo:
            break
        ranges.update({t: ranges[src] for t, src in todo.items()})
    return ranges


def shared_ranges(model, activations: set[str]) -> dict[str, str]:
    """``{tensor: tensor whose range it takes}``: float activations whose range follows from another one's, so they
    are not observed (each observed tensor is copied out of ONNX Runtime on every run and histogrammed).

    - A zero-padding Pad's output (constant mode, value 0) takes its input's range: padding adds zeros, and every
      range holds zero already (EfficientNet-style "same" padding puts one before every convolution).
    - The input of a ReLU, or of a Clip whose bounds hold zero, that is its only consumer takes the activation's
      output range: any range between the bounds quantizes ``y`` exactly as it quantizes ``clip(y)``, and ORT's QDQ
      writer folds such activations into the producer's output anyway (the producer's own range goes unused).
    """
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    inputs = {i.name for i in model.graph.input}
    consumers: dict[str, int] = {}
    for n in model.graph.node:
        for t in n.input:
            consumers[t] = consumers.get(t, 0) + 1

    def const(name: str) -> np.ndarray | None:
        return numpy_helper.to_array(inits[name]) if name in inits else None

    out: dict[str, str] = {}
    for n in model.graph.node:
        if not n.input or n.input[0] not in activations or n.output[0] not in activations:
            continue
        x, y = n.input[0], n.output[0]
        if n.op_type == "Pad":
            mode = next((a.s.decode() for a in n.attribute if a.name == "mode"), "constant")
            value = const(n.input[2]) if len(n.input) > 2 and n.input[2] else np.zeros(1)
            if mode == "constant" and value is not None and not value.any():
                out[y] = x
        elif n.op_type in ("Relu", "Clip") and consumers.get(x) == 1 and x not in outputs and x not in inputs:
            names = list(n.input[1:3]) if n.op_type == "Clip" else []
            bounds = [const(t) if t else None for t in names]
            if any(t and b is None for t, b in zip(names, bounds, strict=True)):
                continue  # a bound computed at run time
            attrs = {a.name: a.f for a in n.attribute}  # Clip before opset 11 keeps its bounds as attributes
            lo = float(bounds[0]) if bounds and bounds[0] is not None else attrs.get("min", -np.inf)
            hi = float(bounds[1]) if len(bounds) > 1 and bounds[1] is not None else attrs.get("max", np.inf)
            if lo <= 0.0 <= hi:
                out[x] = y
    return out


#: the largest int32 bias ORT's fused integer Conv/Gemm may be given (half of int32: the accumulator adds to it)
BIAS_LIMIT = 2.0**30


def widen_for_bias(
    graph: bytes, ranges: Mapping[str, Any], config: QuantConfig
) -> tuple[dict[str, tuple[float, float]], dict[str, dict[str, float]]]:
    """Ranges whose biased Conv/Gemm inputs are wide enough for the int32 bias to fit.

    ORT stores a Conv/Gemm bias as int32 in units of ``input_scale * weight_scale``. An input that is nearly dead
    during calibration (a range of 1e-5, common after pruning, in a random-init or rarely active head) gives a
    scale so small that ``bias / (input_scale * weight_scale)`` overflows int32: the bias saturates and the output
    is wrong by the whole bias (a class logit of -4.6 becomes 0, a score of 0.01 becomes 0.5). The input's range is
    widened just enough for the largest ``|bias|`` to fit in :data:`BIAS_LIMIT`; its values, all tiny, then
    quantize to zero, which is what they contribute to the output next to the bias anyway. Only for layers whose
    weight or bias reaches them through an Identity (shared weights in the export): for a weight and bias that are
    initializers of the layer itself ORT's QDQ writer raises the offending channels' weight scales instead, which
    costs only those channels. Returns the new ranges and, per widened tensor, the old and new upper ends (said in
    the report).
    """
    onnx = _onnx()
    from onnx import numpy_helper

    g = onnx.load_from_string(graph).graph
    inits = {i.name: i for i in g.initializer}
    direct = set(inits)
    for n in g.node:  # an initializer passed through Identity (shared weights in the export) is still constant
        if n.op_type == "Identity" and n.input[0] in inits:
            inits[n.output[0]] = inits[n.input[0]]
    signed = config.activation_type == ActivationType.INT8
    levels = 255.0
    need: dict[str, float] = {}  # tensor -> smallest scale its consumers' biases allow
    for n in g.node:
        if n.op_type not in ("Conv", "Gemm") or len(n.input) < 3 or not n.input[2]:
            continue
        x, w, b = n.input[0], n.input[1], n.input[2]
        if x not in ranges or w not in inits or b not in inits:
            continue
        if w in direct and b in direct:
            # ORT's QDQ writer raises the scale of each weight channel whose bias would not fit (its
            # _adjust_weight_quant_params_for_bias_tensors): only that channel loses resolution. Widening the shared
            # input range instead coarsens every channel: one near-dead channel of EfficientNet-Lite0's stem
            # widened its input 0.96 -> 12,216 and the INT8 file fell to cosine 0.16 against FP32.
            continue
        wt = np.abs(numpy_helper.to_array(inits[w]).astype(np.float64))
        bias = np.abs(numpy_helper.to_array(inits[b]).astype(np.float64)).ravel()
        wt = np.moveaxis(wt, out_axis(n), 0)  # output channels first (a Gemm without transB: transposed)
        if config.per_channel and wt.shape[0] == bias.size:
            w_scale = wt.reshape(wt.shape[0], -1).max(axis=1) / 127.0
        else:
            w_scale = np.full(bias.size, wt.max() / 127.0)
        ok = w_scale > 0
        if not ok.any():
            continue
        s = float((bias[ok] / (BIAS_LIMIT * w_scale[ok])).max())
        need[x] = max(need.get(x, 0.0), s)
    out = {k: (float(v[0]), float(v[1])) for k, v in ranges.items()}
    widened: dict[str, dict[str, float]] = {}
    for t, s in need.items():
        lo, hi = out[t]
        if not all(math.isfinite(v) for v in (lo, hi)) or (hi - lo) / levels >= s:
            continue
        if signed:  # symmetric: the range is [-m, m]
            m = max(abs(lo), abs(hi), s * levels / 2)
            new = (-m, m)
        else:
            new = (lo, lo + s * levels)
        widened[t] = {"old_high": hi, "new_high": new[1]}
        out[t] = new
    return out, widened


def node_name(n, i: int) -> str:
    return n.name or f"{n.op_type}_{i}"


def plan_exclusions(
    graph: bytes, ranges: Mapping[str, Any], exclude: tuple[str, ...], by_module: bool, *, check_ranges: bool = True
) -> dict[str, str]:
    """node name -> why it stays float: the user's ``exclude`` patterns (matched against the module that ran the node
    with ``by_module``, else against node names, as for ONNX input files) and, with ``check_ranges`` (static mode), nodes touching a tensor with
    no usable range."""
    from edgeslim.core.modules import require_matches

    onnx = _onnx()
    g = onnx.load_from_string(graph).graph
    inits = {i.name for i in g.initializer}
    floats = set(float_activations(onnx.load_from_string(graph)))
    mac_nodes = [(node_name(n, i), n) for i, n in enumerate(g.node) if n.op_type in MAC_OPS]
    keys = {name: (module_of(name) if by_module else name) for name, _ in mac_nodes}
    if exclude:
        candidates = sorted({k for k in keys.values() if k} | (set() if by_module else set(keys)))
        require_matches(
            candidates,
            exclude,
            field="QuantConfig.exclude",
            what="module running a Conv/Gemm/MatMul" if by_module else "Conv/Gemm/MatMul node",
        )
    out: dict[str, str] = {}
    for name, _node in mac_nodes:
        pat = first_match(keys[name], exclude) or first_match(name, exclude)
        if pat is not None:
            out[name] = f"excluded by QuantConfig.exclude pattern {pat!r}"
    for i, n in enumerate(g.node):
        if not check_ranges or n.op_type not in QUANTIZED_OPS:
            continue
        name = node_name(n, i)
        if name in out:
            continue
        for t in [*n.input, *n.output]:
            if not t or t in inits or t not in floats:
                continue
            r = ranges.get(t)
            if r is None:
                out[name] = f"its tensor {t!r} was never reached during calibration (no range)"
                break
            if not all(math.isfinite(v) and abs(v) <= RANGE_LIMIT for v in r):
                out[name] = (
                    f"its tensor {t!r} holds values up to {max(abs(r[0]), abs(r[1])):.3g} (a mask constant, "
                    "not an activation): 8 bits cannot represent it"
                )
                break
    return out


def channel_sqnr_db(w: np.ndarray, axis: int, per_channel: bool, qmax: int, quantile: float = 0.1) -> float:
    """The ``quantile`` of the output channels' weight SQNRs (dB, capped at 200) with symmetric integer weights in
    [-qmax, qmax] (ORT's signed weights): one scale per channel along ``axis``, or one for the tensor. The ONNX
    capture's counterpart of ``QuantWeight.channel_sqnr_db``."""
    import torch

    from edgeslim.quantize._modules import channel_sqnr_quantile_db

    w = np.moveaxis(np.asarray(w, np.float64), axis, 0).reshape(w.shape[axis], -1)
    amax = np.abs(w).max(axis=1, keepdims=True) if per_channel else np.full((len(w), 1), np.abs(w).max())
    scale = np.maximum(amax, 1e-12) / qmax
    wq = np.clip(np.round(w / scale), -qmax, qmax) * scale
    return channel_sqnr_quantile_db(torch.from_numpy(w), torch.from_numpy(wq), quantile)


def weight_axes(model) -> dict[str, tuple[str, int]]:
    """Every Conv / Gemm / MatMul weight that is an initializer: ``{initializer: (node, per-channel axis)}``, the
    axis ONNX Runtime's QDQ writer quantizes it along (:func:`out_axis`)."""
    inits = {i.name: i for i in model.graph.initializer}
    out: dict[str, tuple[str, int]] = {}
    for i, n in enumerate(model.graph.node):
        if n.op_type not in ("Conv", "Gemm", "MatMul") or len(n.input) < 2 or n.input[1] not in inits:
            continue
        if len(inits[n.input[1]].dims) < 2:
            continue
        out.setdefault(n.input[1], (n.name or node_name(n, i), out_axis(n)))
    return out


def depthwise_weights(model) -> dict[str, str]:
    """The weights of depthwise 2-D Convs (one input and one output channel per group): ``{initializer: node}`` (in
    a quantized graph, the initializer behind the weight's DequantizeLinear). Under ``reduce_range`` they keep the
    full 8-bit range, as in the fx capture (:func:`quantize._api.keeps_full_range`)."""
    inits = {i.name: i for i in model.graph.initializer}
    dq = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    out: dict[str, str] = {}
    for i, n in enumerate(model.graph.node):
        w = dq.get(n.input[1], n.input[1]) if n.op_type == "Conv" and len(n.input) > 1 else None
        if w not in inits:
            continue
        dims = list(inits[w].dims)
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        if len(dims) == 4 and group > 1 and dims[1] == 1 and dims[0] == group:
            out[w] = n.name or node_name(n, i)
    return out


def out_axis(n) -> int:
    """The axis of a Conv / Gemm / MatMul weight that holds the output channels (the one ORT's QDQ writer quantizes
    per channel along): Conv 0; Gemm 0 when ``transB`` else 1; MatMul 1."""
    if n.op_type == "Conv":
        return 0
    if n.op_type == "Gemm":
        return 0 if any(a.name == "transB" and a.i for a in n.attribute) else 1
    return 1


def choose_granularity(graph: bytes, excluded: Mapping[str, str], config: QuantConfig) -> dict[str, dict[str, Any]]:
    """With ``config.per_tensor_sqnr_db`` (static INT8, per-channel): the weights whose output channels keep that
    SQNR with one scale for the whole tensor (all but the worst tenth of them) are quantized per tensor (the fx
    capture's rule, see ``quantize._api.choose_granularity``). Returns ``{initializer: {"node", "per_tensor_sqnr_db",
    "per_channel_sqnr_db"}}``."""
    floor = config.per_tensor_sqnr_db
    if floor is None or not config.per_channel or config.mode != QuantMode.STATIC:
        return {}
    from onnx import numpy_helper

    model = _onnx().load_from_string(graph)
    inits = {i.name: i for i in model.graph.initializer}
    depthwise = depthwise_weights(model)
    chosen: dict[str, dict[str, Any]] = {}
    for name, (node, axis) in weight_axes(model).items():
        if node in excluded:
            continue
        qmax = weight_qmax(config, 8, full_range=name in depthwise)
        w = numpy_helper.to_array(inits[name])
        if w.dtype.kind != "f" or w.shape[axis] < 2:
            continue
        per_tensor_db = channel_sqnr_db(w, axis, False, qmax)
        if per_tensor_db >= floor:
            chosen[name] = {
                "node": node,
                "per_tensor_sqnr_db": round(per_tensor_db, 2),
                "per_channel_sqnr_db": round(channel_sqnr_db(w, axis, True, qmax), 2),
            }
    return chosen


def write_qdq(
    graph: bytes,
    ranges: Mapping[str, Any],
    excluded: Mapping[str, str],
    config: QuantConfig,
    *,
    only: list[str] | None = None,
    per_tensor: list[str] | tuple[str, ...] = (),
) -> bytes:
    """ORT's ``quantize_static`` on ``graph`` with edgeslim's ranges (its calibration cache) and exclusions
    (``only``: quantize just these nodes, for the tail sensitivity pass; ``per_tensor``: weight initializers
    quantized with one scale although ``config.per_channel``, through ORT's per-tensor overrides)."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.calibrate import (
        TensorData,
        TensorsData,
        save_tensors_data,
    )

    onnx = _onnx()
    model = onnx.load_from_string(graph)
    for i, n in enumerate(model.graph.node):  # ORT identifies nodes by name: give unnamed nodes the names we use
        if not n.name:
            n.name = node_name(n, i)
    usable = {k: v for k, v in ranges.items() if all(math.isfinite(x) and abs(x) <= RANGE_LIMIT for x in v)}
    data = TensorsData(
        CalibrationMethod.MinMax,
        {k: TensorData(lowest=np.float32(lo), highest=np.float32(hi)) for k, (lo, hi) in usable.items()},
    )
    signed = config.activation_type == ActivationType.INT8
    overrides: dict[str, list[dict[str, Any]]] = {w: [{"symmetric": True}] for w in per_tensor}
    if config.weights_7bit:  # depthwise weights keep the full range (ORT's depthwise kernel does not saturate)
        for w in depthwise_weights(model):
            axis = {} if w in overrides or not config.per_channel else {"axis": 0}
            overrides[w] = [{**axis, "symmetric": True, "reduce_range": False}]
    with tempfile.TemporaryDirectory() as td:
        src, dst, cache = Path(td) / "float.onnx", Path(td) / "int8.onnx", Path(td) / "ranges.json"
        onnx.save(model, str(src))
        save_tensors_data(data, cache)
        with _quiet():
            quantize_static(
                str(src),
                str(dst),
                calibration_data_reader=None,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(QUANTIZED_OPS),
                per_channel=config.per_channel,
                reduce_range=config.weights_7bit,
                activation_type=QuantType.QInt8 if signed else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=sorted(excluded),
                nodes_to_quantize=list(only or []),
                calibrate_method=CalibrationMethod.MinMax,
                calibration_cache_path=str(cache),
                extra_options={
                    "ActivationSymmetric": signed,
                    "WeightSymmetric": True,
                    "ForceQuantizeNoInputCheck": True,
                    **({"TensorQuantOverrides": overrides} if overrides else {}),
                },
            )
        return float_inputs_for(dst.read_bytes(), excluded, model)


def _subgraph_reads(graph: Any) -> set[str]:
    """Names read inside the If/Loop/Scan bodies of ``graph`` (they may read the outer graph's initializers)."""
    out: set[str] = set()
    for n in graph.node:
        for a in n.attribute:
            for g in [a.g] if a.HasField("g") else list(a.graphs):
                out |= {t for m in g.node for t in m.input} | _subgraph_reads(g)
    return out


def _readers(model: Any) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for m in model.graph.node:
        for t in m.input:
            out.setdefault(t, []).append(m)
    return out


def _quantized_after(n: Any, readers: Mapping[str, list[Any]]) -> bool:
    """Whether ``n``'s output feeds a QuantizeLinear, directly or through a sole ReLU/Clip (which ONNX Runtime fuses
    into ``n`` first): the output half of the DQ -> node -> Q pattern its optimizer turns into an integer kernel."""
    after = readers.get(n.output[0], [])
    if len(after) == 1 and after[0].op_type in ("Relu", "Clip"):
        after = readers.get(after[0].output[0], [])
    return any(r.op_type == "QuantizeLinear" for r in after)


def ort_may_fuse(model: Any) -> set[str]:
    """Float Conv/Gemm/MatMul nodes of a loaded Q/DQ ``model`` between a DequantizeLinear and a QuantizeLinear,
    whose constant float weights ONNX Runtime's optimizer may quantize itself, running them as integer kernels."""
    producer = {o: n for n in model.graph.node for o in n.output}
    readers = _readers(model)
    inits = {i.name for i in model.graph.initializer}
    out = set()
    for n in model.graph.node:
        if n.op_type not in MAC_OPS or len(n.input) < 2 or n.input[1] not in inits:
            continue
        p = producer.get(n.input[0])
        if p is not None and p.op_type == "DequantizeLinear" and _quantized_after(n, readers):
            out.add(n.name)
    return out


def float_inputs_for(quantized: bytes, excluded: Mapping[str, str], float_model: Any) -> bytes:
    """Excluded Conv/Gemm/MatMul nodes read their float inputs, not the dequantized ones, where that costs nothing.

    ORT's QDQ writer leaves an excluded node between a DequantizeLinear (its input, quantized for another reader)
    and a QuantizeLinear (its output, the next layer's input); ONNX Runtime's graph optimizer then fuses that float
    node into an integer kernel anyway (it quantizes the constant weights itself), so the layer kept float for
    accuracy or speed would run in integer. Reading the value before the Q/DQ pair keeps it float, as the report says.
    Done only where the pair's input is the float graph's own tensor, made by an op that is not a Conv/Gemm/MatMul
    (e.g. a Pad): a ReLU/Clip the writer folded into the pair would be lost, and a quantized Conv would lose its
    integer kernel (its output then has a float reader). In those cases the layer keeps its dequantized input and
    ONNX Runtime may fuse it (the report's reason says so).
    """
    mac = set(excluded)
    onnx = _onnx()
    model = onnx.load_from_string(quantized)
    producer = {o: n for n in model.graph.node for o in n.output}
    fproducer = {o: n for n in float_model.graph.node for o in n.output}
    readers = _readers(model)
    changed = False
    for n in model.graph.node:
        if n.op_type not in MAC_OPS or n.name not in mac or not _quantized_after(n, readers):
            continue  # not excluded, or no DQ -> node -> Q pattern: ONNX Runtime keeps it float as it is
        for j in (0, 1) if n.op_type == "MatMul" else (0,):
            if j >= len(n.input):
                continue
            dq = producer.get(n.input[j])
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is None or q.op_type != "QuantizeLinear":
                continue
            made, fp = producer.get(q.input[0]), fproducer.get(q.input[0])
            if made is None or fp is None or made.op_type != fp.op_type or made.op_type in MAC_OPS:
                continue
            n.input[j] = q.input[0]
            changed = True
    used = {t for n in model.graph.node for t in n.input} | {o.name for o in model.graph.output}
    for _ in range(2 if changed else 0):  # a DQ nobody reads any more, then its Q
        keep = [
            n
            for n in model.graph.node
            if n.op_type not in ("QuantizeLinear", "DequantizeLinear") or any(o in used for o in n.output)
        ]
        del model.graph.node[:]
        model.graph.node.extend(keep)
        used = {t for n in model.graph.node for t in n.input} | {o.name for o in model.graph.output}
    # and no initializer nobody reads (ORT's writer leaves the float copies of shared biases it duplicated)
    used |= _subgraph_reads(model.graph)
    unused = [i for i in model.graph.initializer if i.name not in used]
    if not changed and not unused:
        return quantized
    for i in unused:
        model.graph.initializer.remove(i)
    return model.SerializeToString()


def bias_deltas(graph: bytes, quantized: bytes, means: Mapping[str, np.ndarray]) -> dict[str, list[float]]:
    """Bias correction on the ONNX graph: for each Conv/Gemm whose weights ``quantized`` dequantizes, the shift of
    its mean output that weight rounding causes, ``-sum(dW * E[x])`` per output channel (``E[x]``: the float input's
    per-channel mean on the calibration data), to add to its bias. The weight-error term of Nagel et al.'s bias
    correction (DFQ, 2019), with measured input means; activation rounding is left alone (unbiased to first order).

    Returns ``{node name: [delta per output channel]}`` for nodes found in both graphs.
    """
    from onnx import numpy_helper

    onnx = _onnx()
    fmodel, qmodel = onnx.load_from_string(graph), onnx.load_from_string(quantized)
    finit = {i.name: i for i in fmodel.graph.initializer}
    qinit = {i.name: i for i in qmodel.graph.initializer}
    qprod = {o: n for n in qmodel.graph.node for o in n.output}
    qnodes = {n.name: n for n in qmodel.graph.node if n.name}
    out: dict[str, list[float]] = {}
    for i, n in enumerate(fmodel.graph.node):
        name = n.name or node_name(n, i)
        q = qnodes.get(name)
        if n.op_type not in ("Conv", "Gemm") or q is None or len(n.input) < 2 or n.input[1] not in finit:
            continue
        mean = means.get(n.input[0])
        dq = qprod.get(q.input[1])
        if mean is None or dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in qinit:
            continue
        w = numpy_helper.to_array(finit[n.input[1]]).astype(np.float64)
        wq = numpy_helper.to_array(qinit[dq.input[0]]).astype(np.float64)
        scale = numpy_helper.to_array(qinit[dq.input[1]]).astype(np.float64)
        zp = numpy_helper.to_array(qinit[dq.input[2]]).astype(np.float64) if len(dq.input) > 2 else np.zeros(1)
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        if scale.size > 1:
            shape = [1] * wq.ndim
            shape[axis] = -1
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        dw = (wq - zp) * scale - w
        if n.op_type == "Conv":
            groups = next((a.i for a in n.attribute if a.name == "group"), 1)
            cout, cin_g = dw.shape[0], dw.shape[1]
            if mean.shape[0] != cin_g * groups or cout % groups:
                continue
            per_in = dw.reshape(cout, cin_g, -1).sum(-1)  # [Cout, Cin/g]
            m = mean.reshape(groups, cin_g)[np.arange(cout) // (cout // groups)]  # each output's group's inputs
            delta = -(per_in * m).sum(1)
        else:
            attrs = {a.name: a.i for a in n.attribute if a.name in ("transA", "transB")}
            if attrs.get("transA"):
                continue
            wmat = dw.T if attrs.get("transB") else dw  # [K, N]
            if wmat.ndim != 2 or mean.shape[0] != wmat.shape[0]:
                continue
            delta = -(mean @ wmat)
        out[name] = [float(v) for v in delta]
    return out


def with_bias_deltas(graph: bytes, deltas: Mapping[str, list[float]]) -> bytes:
    """``graph`` with ``deltas[node]`` added to each named Conv/Gemm's bias (a zero bias made for nodes without)."""
    from onnx import numpy_helper

    if not deltas:
        return graph
    onnx = _onnx()
    model = onnx.load_from_string(graph)
    inits = {i.name: i for i in model.graph.initializer}
    users: dict[str, int] = {}
    for n in model.graph.node:
        for t in n.input:
            users[t] = users.get(t, 0) + 1
    for i, n in enumerate(model.graph.node):
        name = n.name or node_name(n, i)
        if name not in deltas:
            continue
        d = np.asarray(deltas[name], dtype=np.float32)
        if len(n.input) > 2 and n.input[2]:
            if n.input[2] not in inits:
                continue
            b = numpy_helper.to_array(inits[n.input[2]]).astype(np.float32)
            if b.shape != d.shape:
                continue
            if users.get(n.input[2], 0) > 1:  # a bias shared with another node gets its own copy
                new = f"{name}_bias_corrected"
                model.graph.initializer.append(numpy_helper.from_array(b + d, new))
                n.input[2] = new
            else:
                inits[n.input[2]].CopyFrom(numpy_helper.from_array(b + d, n.input[2]))
        else:
            new = f"{name}_bias_corrected"
            model.graph.initializer.append(numpy_helper.from_array(d, new))
            if len(n.input) == 2:
                n.input.append(new)
            else:  # an empty bias name
                n.input[2] = new
    return model.SerializeToString()


def write_dynamic(graph: bytes, excluded: Mapping[str, str], config: QuantConfig) -> bytes:
    """ORT's ``quantize_dynamic``: INT8 weights, activations quantized per batch at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as td:
        src, dst = Path(td) / "float.onnx", Path(td) / "dyn.onnx"
        onnx = _onnx()
        model = onnx.load_from_string(graph)
        for i, n in enumerate(model.graph.node):
            if not n.name:
                n.name = node_name(n, i)
        onnx.save(model, str(src))
        with _quiet():
            quantize_dynamic(
                str(src),
                str(dst),
                per_channel=config.per_channel,
                reduce_range=config.weights_7bit,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=sorted(excluded),
                op_types_to_quantize=["MatMul", "Gemm", "Conv"],
            )
        return dst.read_bytes()


def write_fp16(graph: bytes) -> bytes:
    try:
        from onnxconverter_common import float16
    except ImportError:
        raise QuantizationError(
            "fp16 on the ONNX graph needs onnxconverter-common: pip install onnxconverter-common"
        ) from None
    onnx = _onnx()
    return float16.convert_float_to_float16(onnx.load_from_string(graph), keep_io_types=True).SerializeToString()


def build_qdq(
    graph: bytes,
    ranges: Mapping[str, Any],
    excluded: Mapping[str, str],
    config: QuantConfig,
    per_tensor: list[str] | tuple[str, ...] = (),
    record: dict[str, Any] | None = None,
) -> bytes:
    """The quantized graph for ``config.mode`` (the apply step; deterministic given its inputs). Static graphs
    are laid out for ``config.runtime`` (``record`` receives what the layout pass changed)."""
    if config.mode == QuantMode.STATIC:
        from edgeslim.quantize._layout import LAYOUTS

        qdq = write_qdq(graph, ranges, excluded, config, per_tensor=per_tensor)
        layout = LAYOUTS[config.runtime]
        if layout is None:
            return qdq
        qdq, changed = layout(qdq)
        if record is not None:
            record.update(changed)
        return qdq
    if config.mode == QuantMode.DYNAMIC:
        return write_dynamic(graph, excluded, config)
    return write_fp16(graph)


def integer_macs(
    quantized: bytes, feeds: dict[str, np.ndarray] | None = None, runtime: str = "onnxruntime"
) -> dict[str, Any]:
    """Which Conv/ConvTranspose/Gemm/MatMul run in integer kernels in ``quantized`` and their share of the MACs.

    A node counts as integer when both its data inputs are ``DequantizeLinear`` outputs and its bias (if any) a
    dequantized int32 tensor (ORT then fuses the node into QLinearConv/QGemm/QLinearMatMul), or when it is an integer
    op already (dynamic quantization's ConvInteger/MatMulInteger). For ``runtime="openvino"`` (a graph laid out
    for it) a data input counts when it reaches a DequantizeLinear through precision-preserving ops (OpenVINO's
    low-precision transformations carry the quantization through them) and the bias may stay float.

    Returns:
        ``integer_macs``, ``total_macs``, ``share`` (``None`` when the graph has no MACs), ``nodes``: one entry per
        MAC node (``node``, ``op``, ``macs``, ``integer``) and ``unknown``: nodes whose shapes were not inferred.
    """
    from edgeslim.runtime._static import onnx_node_macs

    onnx = _onnx()
    model = onnx.load_from_string(quantized)
    per_node = onnx_node_macs(model, feeds)
    producer = {o: n for n in model.graph.node for o in n.output}
    int32 = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT32}

    lpt = None
    if runtime == "openvino":
        from edgeslim.quantize._layout import QdqGraph, integer_input

        lpt = QdqGraph(model)

    def from_dq(t: str) -> bool:
        if lpt is not None:
            return integer_input(lpt, t)
        return t in producer and producer[t].op_type == "DequantizeLinear"

    def int_bias(n) -> bool:  # ORT fuses Conv/Gemm with a bias only when it is a dequantized int32 tensor
        if lpt is not None:
            return True
        if n.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(n.input) < 3 or not n.input[2]:
            return True
        return from_dq(n.input[2]) and producer[n.input[2]].input[0] in int32

    nodes, unknown = [], []
    total = integer = 0
    for i, (n, macs) in enumerate(zip(model.graph.node, per_node, strict=True)):
        if n.op_type not in (*MAC_OPS, *INTEGER_MAC_OPS):
            continue
        if macs is None:
            unknown.append(node_name(n, i))
            continue
        data = (0, 3) if n.op_type in ("QLinearConv", "QLinearMatMul", "QGemm") else (0, 1)
        is_int = n.op_type in INTEGER_MAC_OPS or (
            all(from_dq(n.input[j]) for j in data if j < len(n.input)) and int_bias(n)
        )
        total += macs
        integer += macs if is_int else 0
        nodes.append({"node": node_name(n, i), "op": n.op_type, "macs": int(macs), "integer": bool(is_int)})
    return {
        "integer_macs": int(integer),
        "total_macs": int(total),
        "share": (integer / total) if total else None,
        "nodes": nodes,
        "unknown": unknown,
    }


def float_reason(node: str, op: str, excluded: Mapping[str, str], config: QuantConfig) -> str:
    """Why a MAC node of the quantized graph runs in float."""
    if node in excluded:
        return excluded[node]
    if config.mode == QuantMode.FP16:
        return "fp16 mode: every layer runs in half precision, none in integer kernels"
    if config.mode == QuantMode.DYNAMIC and op == "MatMul":
        return "dynamic mode quantizes MatMul with a constant weight only; this one multiplies two activations"
    return "ONNX Runtime's quantizer left it in float (its inputs are not quantized tensors)"


def state_json(ranges: Mapping[str, Any]) -> dict[str, list[float]]:
    """Ranges as plain lists of Python floats (recipe state)."""
    return {k: [float(v[0]), float(v[1])] for k, v in ranges.items()}


def check_onnx_config(config: QuantConfig) -> None:
    """Refuse settings the ONNX capture does not do (they need the torch fake-quant model: ``capture="fx"``)."""
    torch_only = {
        "adaround": config.adaround,
        "equalize": config.equalize,
        "int8_layers": bool(config.int8_layers),
        "quantize_output": config.quantize_output,
        "weight_range": config.weight_range != "minmax",
        "weight_bits": config.weight_bits != 8,
    }
    bad = [k for k, v in torch_only.items() if v]
    if bad:
        raise ConfigError(
            f"QuantConfig.{bad[0]}={getattr(config, bad[0])!r} needs the torch fake-quant model: it is "
            "not available with capture='onnx'; use capture='fx' (or 'auto', which then picks fx)"
        )


def needs_fx(config: QuantConfig) -> str | None:
    """The first setting only the torch (fx) capture does, or None."""
    try:
        check_onnx_config(config)
    except ConfigError as e:
        return str(e).split(" needs", 1)[0]
    return None

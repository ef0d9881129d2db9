"""Roofline latency, energy and memory-fit predictions from an ONNX graph, and operator pre-flight.

Per node: MACs (Conv/Gemm/MatMul and integer forms) and bytes moved (inputs + weights + outputs), with the
element size of the node's precision (int8 when it reads a DequantizeLinear output or is a QLinear/Integer op,
as ONNX Runtime fuses QDQ pairs into integer kernels; Q/DQ nodes themselves are folded and cost nothing).
Each node gets an op class (dense conv, depthwise conv, 1x1 conv, gemm, elementwise, pool) and node time is
``max(2*MACs / (peak_p * eff[p/class]), bytes / (bandwidth * bw_factor[p])) + overhead[p/kind]``, plus one fixed
cost per call. The per-class efficiencies, bandwidth factors and overheads are fitted by non-negative least squares
on measured host latencies (:func:`calibrate`), shrunk toward a prior so a few samples cannot overfit.

What transfers to other device profiles: the efficiencies (fraction of the profile's peak reached by each op class
and precision) and the bandwidth factors (effective / nominal bandwidth) are multiplied by the profile's own peaks
and bandwidth. What is host-specific: the per-node and per-call overheads (ONNX Runtime dispatch on this CPU); for
another CPU they are scaled by host/device fp32 peak (an ASSUMPTION: dispatch speed follows core speed), for an
accelerator they are used as measured here (an ASSUMPTION, no data). Everything except ``host`` is *predicted*.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edgeslim.core.errors import ConfigError, ModelError
from edgeslim.devices._profile import Device, get_device
from edgeslim.runtime._static import _MAC_OPS, _load

log = logging.getLogger(__name__)

_ELEM = {1: 4, 2: 1, 3: 1, 6: 4, 7: 8, 10: 2, 11: 8, 16: 2}  # ONNX TensorProto dtype -> bytes
_FREE = {"QuantizeLinear", "DequantizeLinear", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Shape", "Constant",
         "Identity", "Gather", "Cast"}
_INT_OPS = ("QLinear", "QGemm", "ConvInteger", "MatMulInteger")
COMPUTE_CLASSES = ("conv", "dwconv", "conv1x1", "gemm")
LIGHT_CLASSES = ("elementwise", "pool")
_POOL = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "QLinearAveragePool",
         "QLinearGlobalAveragePool")


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

# Horowitz, "Computing's energy problem (and what we can do about it)", ISSCC 2014, 45 nm, 0.9 V (pJ):
# int8 mult 0.2, int32 add 0.1, fp16 mult 1.1 + add 0.4, fp32 mult 3.7 + add 0.9; DRAM 64-bit access 1.3-2.6 nJ
# (we use 640 pJ per 32-bit word = 160 pJ/byte as in the paper's summary table).
HOROWITZ_PJ_PER_MAC = {"int8": 0.2 + 0.1, "fp16": 1.1 + 0.4, "fp32": 3.7 + 0.9}
HOROWITZ_PJ_PER_DRAM_BYTE = 640.0 / 4
HOROWITZ_SOURCE = ("M. Horowitz, 'Computing's energy problem (and what we can do about it)', ISSCC 2014, "
                   "doi:10.1109/ISSCC.2014.6757323 (45 nm)")
ENERGY_ASSUMPTION = ("compute energy scaled linearly from 45 nm to the device's process node (assumption); DRAM "
                     "energy per byte not scaled (off-chip I/O); peripheral/static power ignored")


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
        raise ConfigError(f"graph_cost(as_run_by={as_run_by!r}) is not supported; use None or one of "
                          f"{', '.join(RUNTIME_GRAPHS)}")
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
            a, w, out = (shapes.get(n.input[ia], (None,))[0], shapes.get(n.input[iw], (None,))[0],
                         shapes.get(n.output[0], (None,))[0])
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
    return GraphCost(tuple(nodes), weight_bytes, _peak_activation(g, shapes, inits, nbytes),
                     dict(Counter(n.op_type for n in g.node)))


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
        dt = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
              "tensor(float16)": np.float16, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}.get(i.type, np.float32)
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


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Host-calibrated cost parameters (see the module docstring for which of them transfer to other devices).

    Attributes:
        efficiency: ``"fp32/conv"``-style keys (precision/op class) -> fraction of the device peak reached, in (0, 1].
        overhead_s: ``"fp32/compute"`` / ``"fp32/light"``-style keys -> fixed seconds per node (host-specific).
        bandwidth_factor: precision -> effective / nominal DRAM bandwidth (> 1: caches help).
        call_overhead_s: fixed seconds per inference call (host-specific).
        host_peak_fp32: the fp32 peak (ops/s) of the host the calibration was fitted on.
        error_pct: sample label -> in-sample (pred - meas) / meas * 100.
    """

    efficiency: dict
    overhead_s: dict
    bandwidth_factor: dict
    call_overhead_s: float = 0.0
    host_peak_fp32: float | None = None
    error_pct: dict = dataclasses.field(default_factory=dict)

    @property
    def median_abs_error_pct(self) -> float:
        return float(np.median([abs(v) for v in self.error_pct.values()])) if self.error_pct else float("nan")

    def eff(self, precision: str, cls: str) -> float:
        return self.efficiency.get(f"{precision}/{cls}", self.efficiency.get(f"fp32/{cls}", 0.5))

    def overhead(self, precision: str, cls: str) -> float:
        kind = "light" if cls in LIGHT_CLASSES else "compute"
        return self.overhead_s.get(f"{precision}/{kind}", self.overhead_s.get(f"fp32/{kind}", 0.0))

    def to_dict(self) -> dict:
        return {"efficiency": self.efficiency, "overhead_s": self.overhead_s,
                "bandwidth_factor": self.bandwidth_factor, "call_overhead_s": self.call_overhead_s,
                "host_peak_fp32": self.host_peak_fp32, "error_pct": self.error_pct}


_PRECS = ("fp32", "int8")
# The prior (uncalibrated roofline): 50% of peak for every op class, nominal bandwidth, 5 us per compute node,
# 2 us per light node, 20 us per call. Calibration shrinks toward it, so one or two samples cannot run away.
DEFAULT_CALIBRATION = Calibration(
    {f"{p}/{c}": 0.5 for p in (*_PRECS, "fp16") for c in COMPUTE_CLASSES},
    {f"{p}/{k}": v for p in (*_PRECS, "fp16") for k, v in (("compute", 5e-6), ("light", 2e-6))},
    {p: 1.0 for p in (*_PRECS, "fp16")}, 20e-6)


def _overhead_scale(dev: Device, cal: Calibration) -> float:
    """Per-node/per-call overheads are host-specific: scale them to another CPU by host/device fp32 peak."""
    if dev.measured or not cal.host_peak_fp32 or dev.kind != "cpu":
        return 1.0
    return cal.host_peak_fp32 / dev.peak("fp32")


def predict_latency(artifact: Any, device: str | Device, calibration: Calibration | None = None, *,
                    batch: int = 1, cost: GraphCost | None = None) -> dict[str, Any]:
    """Per-op-class roofline latency of ``artifact`` on ``device`` ("predicted for D").

    Returns:
        ``latency_ms``, ``label``, per-node ``layers`` (name, op, class, precision, macs, bytes, bound, ms).
    """
    dev = get_device(device) if isinstance(device, str) else device
    cal = calibration or DEFAULT_CALIBRATION
    cost = cost or graph_cost(artifact, batch)
    ovh = _overhead_scale(dev, cal)
    layers, total = [], cal.call_overhead_s * ovh
    for n in cost.nodes:
        eff = dev.efficiency or cal.eff(n.precision, n.op_class)
        t_c = 2 * n.macs / (dev.peak(n.precision) * eff)
        t_m = n.bytes / (dev.mem_bandwidth_gbs * 1e9 * cal.bandwidth_factor.get(n.precision, 1.0))
        t = max(t_c, t_m) + cal.overhead(n.precision, n.op_class) * ovh
        total += t
        layers.append({"name": n.name, "op": n.op_type, "class": n.op_class, "precision": n.precision,
                       "macs": n.macs, "bytes": n.bytes, "bound": "compute" if t_c >= t_m else "memory",
                       "ms": t * 1e3})
    return {"latency_ms": total * 1e3, "label": f"predicted for {dev.name}", "device": dev.name,
            "layers": layers, "macs": cost.macs, "bytes": cost.bytes,
            "call_overhead_ms": cal.call_overhead_s * ovh * 1e3}


def _param_names() -> list[str]:
    return ([f"eff:{p}/{c}" for p in _PRECS for c in COMPUTE_CLASSES] + [f"bw:{p}" for p in _PRECS]
            + [f"ovh:{p}/{k}" for p in _PRECS for k in ("compute", "light")] + ["call"])


def _features(cost: GraphCost, dev: Device, cal: Calibration) -> np.ndarray:
    """Linear features of the cost model: each node's roofline term goes to the parameter that scales it.

    The max() of each node is resolved with the current ``cal`` (which term binds), so fitting iterates.
    """
    idx = {k: i for i, k in enumerate(_param_names())}
    f = np.zeros(len(idx))
    bw = dev.mem_bandwidth_gbs * 1e9
    for n in cost.nodes:
        p = n.precision if n.precision in _PRECS else "fp32"
        t_c = 2 * n.macs / dev.peak(p)
        t_m = n.bytes / bw
        if n.op_class in COMPUTE_CLASSES and t_c / cal.eff(p, n.op_class) >= t_m / cal.bandwidth_factor.get(p, 1.0):
            f[idx[f"eff:{p}/{n.op_class}"]] += t_c
        else:
            f[idx[f"bw:{p}"]] += t_m
        f[idx[f"ovh:{p}/{'light' if n.op_class in LIGHT_CLASSES else 'compute'}"]] += 1
    f[idx["call"]] = 1
    return f


def _to_vector(cal: Calibration) -> np.ndarray:
    out = []
    for k in _param_names():
        kind, _, key = k.partition(":")
        if kind == "eff":
            out.append(1 / cal.efficiency[key])
        elif kind == "bw":
            out.append(1 / cal.bandwidth_factor[key])
        elif kind == "ovh":
            out.append(cal.overhead_s[key])
        else:
            out.append(cal.call_overhead_s)
    return np.asarray(out)


def _from_vector(x: np.ndarray, host_peak: float) -> Calibration:
    eff, bw, ovh = dict(DEFAULT_CALIBRATION.efficiency), dict(DEFAULT_CALIBRATION.bandwidth_factor), {}
    ovh = dict(DEFAULT_CALIBRATION.overhead_s)
    call = 0.0
    for k, v in zip(_param_names(), x):
        kind, _, key = k.partition(":")
        if kind == "eff":
            eff[key] = float(1 / max(v, 1.0))
        elif kind == "bw":
            bw[key] = float(1 / max(v, 1e-2))
        elif kind == "ovh":
            ovh[key] = float(v)
        else:
            call = float(v)
    return Calibration(eff, ovh, bw, call, host_peak)


def calibrate(samples: Sequence[tuple[str, Any, float]], device: str | Device = "host", *,
              prior_weight: float = 0.1, iterations: int = 4) -> Calibration:
    """Fit the per-class efficiencies, bandwidth factors and overheads to measured latencies on ``device``.

    Args:
        samples: ``(label, artifact, measured_latency_ms)`` at batch 1 on ``device`` (normally ``host``).
        device: the device the latencies were measured on.
        prior_weight: weight of the pull toward :data:`DEFAULT_CALIBRATION` per parameter (relative units), so a
            parameter no sample informs stays at the prior and few samples cannot overfit.
        iterations: refits after re-deciding which roofline term binds each node.

    Solved by non-negative least squares on relative error (each sample's row divided by its measured latency),
    with lower bounds efficiency <= 1 and bandwidth factor <= 100. ``error_pct`` holds the in-sample error.
    """
    if not samples:
        raise ConfigError("calibrate(samples=[]) is not allowed; give at least one (label, artifact, ms) sample")
    dev = get_device(device) if isinstance(device, str) else device
    data = []
    for label, art, ms in samples:
        if not ms > 0:
            raise ConfigError(f"calibrate: measured latency of {label!r} is {ms!r}; use a number > 0")
        data.append((label, art, ms, art if isinstance(art, GraphCost) else graph_cost(art)))
    x0 = _to_vector(DEFAULT_CALIBRATION)
    names = _param_names()
    lb = np.asarray([1.0 if k.startswith("eff") else (1e-2 if k.startswith("bw") else 0.0) for k in names])
    cal = DEFAULT_CALIBRATION
    for _ in range(max(1, iterations)):
        a = np.stack([_features(c, dev, cal) / (ms / 1e3) for *_, ms, c in data])
        y = np.ones(len(data))
        # prior rows: sqrt(w) * x_j / x0_j = sqrt(w)  (relative pull toward the uncalibrated value)
        a = np.vstack([a, np.diag(np.sqrt(prior_weight) / x0)])
        y = np.concatenate([y, np.full(len(x0), np.sqrt(prior_weight))])
        z = _nnls(a, y - a @ lb)
        cal = _from_vector(lb + z, dev.peak("fp32"))
    errs = {label: (predict_latency(None, dev, cal, cost=c)["latency_ms"] - ms) / ms * 100 for label, _, ms, c in data}
    return dataclasses.replace(cal, error_pct=errs)


def _nnls(a: np.ndarray, y: np.ndarray, iters: int = 3000) -> np.ndarray:
    """Non-negative least squares (scipy's active-set solver when installed, else projected gradient)."""
    scale = np.maximum(np.abs(a).max(axis=0), 1e-30)
    an = a / scale
    try:
        from scipy.optimize import nnls

        return nnls(an, y, maxiter=50 * an.shape[1])[0] / scale
    except ImportError:
        pass
    x = np.maximum(np.linalg.lstsq(an, y, rcond=None)[0], 0)
    step = 1 / max(np.linalg.norm(an, 2) ** 2, 1e-30)
    for _ in range(iters):
        x = np.maximum(x - step * an.T @ (an @ x - y), 0)
    return x / scale


def estimate_energy(artifact: Any, device: str | Device, *, cost: GraphCost | None = None) -> dict[str, Any]:
    """Estimated energy per inference (mJ): MACs by precision x pJ/MAC + DRAM bytes x pJ/byte (Horowitz 2014).

    The bytes counted are the per-node bytes moved (an upper bound on DRAM traffic: caches absorb some).
    """
    dev = get_device(device) if isinstance(device, str) else device
    cost = cost or graph_cost(artifact)
    scale = dev.process_nm / 45.0
    compute_pj = 0.0
    for p, macs in cost.macs_by_precision().items():
        p_dev = p if p in dev.peak_gops else ("fp16" if "fp16" in dev.peak_gops else p)
        compute_pj += macs * HOROWITZ_PJ_PER_MAC[p_dev] * scale
    dram_pj = cost.bytes * HOROWITZ_PJ_PER_DRAM_BYTE
    return {"energy_mj": (compute_pj + dram_pj) * 1e-9, "compute_mj": compute_pj * 1e-9, "dram_mj": dram_pj * 1e-9,
            "label": f"estimated for {dev.name}", "source": HOROWITZ_SOURCE, "assumption": ENERGY_ASSUMPTION}


def rapl_paths() -> list[Path]:
    """Readable RAPL package energy counters (``/sys/class/powercap/intel-rapl:N/energy_uj``)."""
    out = []
    for p in sorted(Path("/sys/class/powercap").glob("intel-rapl:*/energy_uj")):
        if p.parent.name.count(":") == 1:
            try:
                int(p.read_text())
                out.append(p)
            except (OSError, ValueError):
                pass
    return out


def measure_energy(fn: Callable[[], Any], runs: int = 50) -> dict[str, Any]:
    """RAPL-measured package energy per call of ``fn`` (mJ), labelled "measured"; says so when not readable.

    The package counter includes everything else running on the package (a shared host inflates it).
    """
    paths = rapl_paths()
    if not paths:
        return {"energy_mj": None, "label": "not measured: RAPL (/sys/class/powercap/intel-rapl*) not readable here"}
    fn()
    e0 = [int(p.read_text()) for p in paths]
    for _ in range(runs):
        fn()
    e1 = [int(p.read_text()) for p in paths]
    uj = sum((b - a) if b >= a else b for a, b in zip(e0, e1))  # wrap-around: count from zero
    return {"energy_mj": uj / 1e3 / runs, "label": "measured (RAPL package energy, whole package)", "runs": runs}


def memory_fit(artifact: Any, device: str | Device, *, cost: GraphCost | None = None) -> dict[str, Any]:
    """Weights + peak activation bytes (batch 1) vs the device's RAM; ``fits`` False flags a model that doesn't fit."""
    dev = get_device(device) if isinstance(device, str) else device
    cost = cost or graph_cost(artifact)
    need_mb = (cost.weight_bytes + cost.peak_activation_bytes) / 2**20
    return {"weights_mb": cost.weight_bytes / 2**20, "peak_activation_mb": cost.peak_activation_bytes / 2**20,
            "required_mb": need_mb, "ram_mb": dev.ram_mb, "fits": need_mb <= dev.ram_mb, "device": dev.name}


@dataclasses.dataclass(frozen=True)
class Preflight:
    """Which of the model's ops the device's accelerator cannot run."""

    device: str
    unsupported: dict  # op type -> count
    reasons: tuple[str, ...]
    fallback: str

    @property
    def fully_runs(self) -> bool:
        return not self.unsupported and not self.reasons

    def __str__(self) -> str:
        if self.fully_runs:
            return f"{self.device}: fully runs: yes"
        ops = ", ".join(f"{k} x{v}" for k, v in sorted(self.unsupported.items()))
        why = "; ".join(self.reasons)
        return (f"{self.device}: fully runs: no; unsupported: {ops or '-'}"
                f"{'; ' + why if why else ''}; fallback: {self.fallback}")


def preflight(artifact: Any, device: str | Device) -> Preflight:
    """List the ONNX ops of ``artifact`` that ``device`` does not support, and whether it fully runs there.

    An INT8-only device also needs every compute node quantized: float compute nodes are listed as unsupported.
    """
    dev = get_device(device) if isinstance(device, str) else device
    cost = graph_cost(artifact)
    bad = Counter(op for op, k in cost.op_counts.items() for _ in range(k) if not dev.supports(op)
                  and op not in ("Constant", "Shape", "Identity"))
    reasons = []
    if "fp32" not in dev.precisions and "fp16" not in dev.precisions:
        flt = Counter(n.op_type for n in cost.nodes if n.precision == "fp32" and n.macs)
        if flt:
            reasons.append(f"{dev.name} runs {'/'.join(dev.precisions)} only: {sum(flt.values())} float compute "
                           f"node(s) ({', '.join(sorted(flt))}) need full-integer quantization")
            for op, k in flt.items():
                bad[op] += k
    return Preflight(dev.name, dict(bad), tuple(reasons), dev.fallback)

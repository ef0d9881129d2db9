"""Roofline latency, energy and memory-fit predictions from an ONNX graph, and operator pre-flight.

Per node: MACs (Conv/Gemm/MatMul and integer forms) and bytes moved (inputs + weights + outputs), with the
element size of the node's precision (int8 when it reads a DequantizeLinear output or is a QLinear/Integer op,
as ONNX Runtime fuses QDQ pairs into integer kernels; Q/DQ nodes themselves are folded and cost nothing).
Node time = max(2*MACs / (peak * efficiency), bytes / bandwidth) + a per-node overhead; efficiency and overhead
are calibrated against measured host latency (:func:`calibrate`). Everything except ``host`` is *predicted*.
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


def graph_cost(artifact: Any, batch: int = 1) -> GraphCost:
    """Per-node MACs and bytes of an ONNX artifact/path/ModelProto at ``batch``.

    Raises:
        ModelError: when the file cannot be read or shape inference leaves compute nodes without shapes.
    """
    import onnx

    try:
        m = onnx.ModelProto()
        m.CopyFrom(_load(_path(artifact)))
    except Exception as e:  # noqa: BLE001 - any load failure becomes a clear error
        raise ModelError(f"cannot read ONNX model {str(_path(artifact))!r}: {str(e)[:200]}") from None
    inits = {t.name for t in m.graph.initializer}
    for inp in m.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if len(dims) and not dims[0].dim_value:
            dims[0].dim_value = batch
    g = onnx.shape_inference.infer_shapes(m).graph
    shapes: dict[str, tuple[list[int], int]] = {t.name: (list(t.dims), t.data_type) for t in g.initializer}
    for vi in [*g.input, *g.value_info, *g.output]:
        tt = vi.type.tensor_type
        if tt.HasField("shape") and all(d.dim_value > 0 for d in tt.shape.dim):
            shapes[vi.name] = ([d.dim_value for d in tt.shape.dim], tt.elem_type)
    producer = {o: n for n in g.node for o in n.output}

    def nbytes(name: str, int8: bool) -> int:
        if name not in shapes:
            return 0
        dims, dt = shapes[name]
        return int(np.prod(dims)) * (1 if int8 and dt == 1 else _ELEM.get(dt, 4))

    def is_q(name: str) -> bool:
        p = producer.get(name)
        return p is not None and p.op_type == "DequantizeLinear"

    nodes, skipped = [], []
    for n in g.node:
        if n.op_type in _FREE:
            continue
        int8 = n.op_type.startswith(_INT_OPS) or any(is_q(i) for i in n.input if i)
        prec = "int8" if int8 else "fp32"
        macs = 0
        if n.op_type in _MAC_OPS:
            ia, iw = _MAC_OPS[n.op_type]
            a, w, out = (shapes.get(n.input[ia], (None,))[0], shapes.get(n.input[iw], (None,))[0],
                         shapes.get(n.output[0], (None,))[0])
            if a is None or w is None or out is None:
                skipped.append(n.name or n.output[0])
            elif "Conv" in n.op_type:
                macs = int(np.prod(a if n.op_type == "ConvTranspose" else out)) * int(np.prod(w[1:]))
            elif n.op_type in ("Gemm", "QGemm"):
                trans_a = any(at.name == "transA" and at.i for at in n.attribute)
                macs = int(np.prod(out)) * (a[0] if trans_a else a[-1])
            else:
                macs = int(np.prod(out)) * a[-1]
        moved = sum(nbytes(_src(i, producer), int8) for i in n.input if i) + sum(nbytes(o, int8) for o in n.output)
        nodes.append(NodeCost(n.name or n.output[0], n.op_type, prec, macs, moved))
    if skipped:
        raise ModelError(f"shape inference gave no shapes for {len(skipped)} compute node(s): {', '.join(skipped)}")
    weight_bytes = sum(nbytes(t, False) for t in inits)
    return GraphCost(tuple(nodes), weight_bytes, _peak_activation(g, shapes, inits, nbytes),
                     dict(Counter(n.op_type for n in g.node)))


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
    """Host-calibrated roofline parameters: efficiency per precision and per-node overhead (seconds)."""

    efficiency: dict
    overhead_s: float
    bandwidth_factor: float = 1.0  # effective / nominal DRAM bandwidth for memory-bound nodes (> 1: caches help)
    error_pct: dict = dataclasses.field(default_factory=dict)  # model label -> (pred - meas) / meas * 100

    @property
    def median_abs_error_pct(self) -> float:
        return float(np.median([abs(v) for v in self.error_pct.values()])) if self.error_pct else float("nan")


DEFAULT_CALIBRATION = Calibration({"fp32": 0.5, "int8": 0.5, "fp16": 0.5}, 5e-6, 1.0)


def _roofline_terms(cost: GraphCost, dev: Device) -> dict[str, tuple[float, float]]:
    """Per precision: (compute seconds at 100% efficiency summed over compute-bound nodes, memory-bound seconds)."""
    out: dict[str, list[float]] = {}
    bw = dev.mem_bandwidth_gbs * 1e9
    for n in cost.nodes:
        t_c = 2 * n.macs / dev.peak(n.precision)
        t_m = n.bytes / bw
        acc = out.setdefault(n.precision, [0.0, 0.0])
        if t_c >= t_m:
            acc[0] += t_c
        else:
            acc[1] += t_m
    return {k: (v[0], v[1]) for k, v in out.items()}


def predict_latency(artifact: Any, device: str | Device, calibration: Calibration | None = None, *,
                    batch: int = 1, cost: GraphCost | None = None) -> dict[str, Any]:
    """Roofline latency of ``artifact`` on ``device`` ("predicted for D").

    Returns:
        ``latency_ms``, ``label``, per-node ``layers`` (name, op, precision, macs, bytes, ms), the efficiency used.
    """
    dev = get_device(device) if isinstance(device, str) else device
    cal = calibration or DEFAULT_CALIBRATION
    cost = cost or graph_cost(artifact, batch)
    bw = dev.mem_bandwidth_gbs * 1e9 * cal.bandwidth_factor
    layers, total = [], 0.0
    for n in cost.nodes:
        eff = dev.efficiency or cal.efficiency.get(n.precision, cal.efficiency.get("fp32", 0.5))
        t = max(2 * n.macs / (dev.peak(n.precision) * eff), n.bytes / bw) + cal.overhead_s
        total += t
        layers.append({"name": n.name, "op": n.op_type, "precision": n.precision, "macs": n.macs,
                       "bytes": n.bytes, "ms": t * 1e3})
    return {"latency_ms": total * 1e3, "label": f"predicted for {dev.name}", "device": dev.name,
            "layers": layers, "macs": cost.macs, "bytes": cost.bytes}


def calibrate(samples: Sequence[tuple[str, Any, float]], device: str | Device = "host") -> Calibration:
    """Fit efficiency per precision and per-node overhead so predictions match measured host latencies.

    Args:
        samples: ``(label, artifact, measured_latency_ms)`` at batch 1 on ``device`` (normally ``host``).
        device: the device the latencies were measured on.

    Model: ``measured = sum_p compute_p / eff_p + memory / bandwidth_factor + overhead * nodes``; solved by non-negative least squares
    on relative error (each sample's row is divided by its measured latency). The calibration error of each
    sample is recorded in ``error_pct``.
    """
    if not samples:
        raise ConfigError("calibrate(samples=[]) is not allowed; give at least one (label, artifact, ms) sample")
    dev = get_device(device) if isinstance(device, str) else device
    precs = sorted({p for _, a, _ in samples for p in _roofline_terms(graph_cost(a), dev)})
    rows, ys, costs = [], [], []
    for label, art, ms in samples:
        if not ms > 0:
            raise ConfigError(f"calibrate: measured latency of {label!r} is {ms!r}; use a number > 0")
        cost = graph_cost(art)
        terms = _roofline_terms(cost, dev)
        mem = sum(v[1] for v in terms.values())
        rows.append([terms.get(p, (0.0, 0.0))[0] for p in precs] + [mem, len(cost.nodes)])
        ys.append(ms / 1e3)
        costs.append((label, art, ms, cost))
    a = np.asarray(rows) / np.asarray([[ms / 1e3] for *_, ms, _ in costs])
    y = np.asarray(ys) / np.asarray([ms / 1e3 for *_, ms, _ in costs])
    coef = _nnls(a, y)
    eff = {p: float(min(1.0, 1 / c)) if c > 1e-9 else 1.0 for p, c in zip(precs, coef[:-2])}
    bw_factor = float(min(100.0, 1 / coef[-2])) if coef[-2] > 1e-9 else 100.0
    cal = Calibration({**DEFAULT_CALIBRATION.efficiency, **eff}, float(coef[-1]), bw_factor)
    errs = {label: (predict_latency(art, dev, cal, cost=cost)["latency_ms"] - ms) / ms * 100
            for label, art, ms, cost in costs}
    return dataclasses.replace(cal, error_pct=errs)


def _nnls(a: np.ndarray, y: np.ndarray, iters: int = 2000) -> np.ndarray:
    """Non-negative least squares by projected gradient (tiny problems; no scipy dependency)."""
    scale = np.maximum(np.abs(a).max(axis=0), 1e-30)
    an = a / scale
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

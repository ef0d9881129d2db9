"""Roofline latency prediction from a graph's cost, with parameters calibrated on measured host latencies.

Node time is ``max(2*MACs / (peak_p * eff[p/class]), bytes / (bandwidth * bw_factor[p])) + overhead[p/kind]``, plus
one fixed cost per call. The per-class efficiencies, bandwidth factors and overheads are fitted by non-negative least
squares on measured host latencies (:func:`calibrate`), shrunk toward a prior so a few samples cannot overfit.

What transfers to other device profiles: the efficiencies (fraction of the profile's peak reached by each op class
and precision) and the bandwidth factors (effective / nominal bandwidth) are multiplied by the profile's own peaks
and bandwidth. What is host-specific: the per-node and per-call overheads (ONNX Runtime dispatch on this CPU); for
another CPU they are scaled by host/device fp32 peak (an ASSUMPTION: dispatch speed follows core speed), for an
accelerator they are used as measured here (an ASSUMPTION, no data). Everything except ``host`` is *predicted*.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from edgeslim.core.errors import ConfigError
from edgeslim.devices._cost import COMPUTE_CLASSES, LIGHT_CLASSES, GraphCost, graph_cost
from edgeslim.devices._profile import Device, get_device


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
        return {
            "efficiency": self.efficiency,
            "overhead_s": self.overhead_s,
            "bandwidth_factor": self.bandwidth_factor,
            "call_overhead_s": self.call_overhead_s,
            "host_peak_fp32": self.host_peak_fp32,
            "error_pct": self.error_pct,
        }


_PRECS = ("fp32", "int8")
# The prior (uncalibrated roofline): 50% of peak for every op class, nominal bandwidth, 5 us per compute node,
# 2 us per light node, 20 us per call. Calibration shrinks toward it, so one or two samples cannot run away.
DEFAULT_CALIBRATION = Calibration(
    {f"{p}/{c}": 0.5 for p in (*_PRECS, "fp16") for c in COMPUTE_CLASSES},
    {f"{p}/{k}": v for p in (*_PRECS, "fp16") for k, v in (("compute", 5e-6), ("light", 2e-6))},
    dict.fromkeys((*_PRECS, "fp16"), 1.0),
    20e-6,
)


def _overhead_scale(dev: Device, cal: Calibration) -> float:
    """Per-node/per-call overheads are host-specific: scale them to another CPU by host/device fp32 peak."""
    if dev.measured or not cal.host_peak_fp32 or dev.kind != "cpu":
        return 1.0
    return cal.host_peak_fp32 / dev.peak("fp32")


def predict_latency(
    artifact: Any,
    device: str | Device,
    calibration: Calibration | None = None,
    *,
    batch: int = 1,
    cost: GraphCost | None = None,
) -> dict[str, Any]:
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
        layers.append(
            {
                "name": n.name,
                "op": n.op_type,
                "class": n.op_class,
                "precision": n.precision,
                "macs": n.macs,
                "bytes": n.bytes,
                "bound": "compute" if t_c >= t_m else "memory",
                "ms": t * 1e3,
            }
        )
    return {
        "latency_ms": total * 1e3,
        "label": f"predicted for {dev.name}",
        "device": dev.name,
        "layers": layers,
        "macs": cost.macs,
        "bytes": cost.bytes,
        "call_overhead_ms": cal.call_overhead_s * ovh * 1e3,
    }


def _param_names() -> list[str]:
    return (
        [f"eff:{p}/{c}" for p in _PRECS for c in COMPUTE_CLASSES]
        + [f"bw:{p}" for p in _PRECS]
        + [f"ovh:{p}/{k}" for p in _PRECS for k in ("compute", "light")]
        + ["call"]
    )


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


def calibrate(
    samples: Sequence[tuple[str, Any, float]],
    device: str | Device = "host",
    *,
    prior_weight: float = 0.1,
    iterations: int = 4,
) -> Calibration:
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

"""Latency of a point of the width space: the table's per-layer figures summed, plus a fitted model of what the sum
misses, and the check of that prediction against whole sub-networks exported and timed for real.

The sum of isolated layers misses what happens between them in one graph: the runtime's per-call cost, the
layout changes it makes once per graph instead of once per layer, the element-wise ops (residual adds, pooling)
that are not in the table, and the weights: a layer timed alone runs again and again with its weights hot in cache,
while in a whole network every layer reads its weights after the other layers evicted them. So
``predicted = a * sum(layer ms) + c * weight MB + b`` is fitted by least squares on a few sub-networks of the same
space, each exported to ONNX and timed (:meth:`Predictor.fit`); of the nested models (``a * sum``, ``+ b``, ``+ c``)
the one that predicts the fit points best when each is left out in turn is kept (:func:`latency_fit`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import random
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeslim.core.errors import ModelError
from edgeslim.nas._hardware import device_ratio, overhead_ratio
from edgeslim.nas._space import WidthSpace
from edgeslim.nas._table import LatencyTable, table_info

log = logging.getLogger(__name__)


def requests(space: WidthSpace) -> list[tuple[Any, int, int]]:
    """Every ``(op, cin, cout)`` grid point the space's layers need from the table."""
    out = []
    for layer in space.layers:
        gout = space.grid(layer.cout_unit, layer.cout)
        if layer.op.depthwise:
            out += [(layer.op, w, w) for w in gout]
            continue
        gin = space.grid(layer.cin_unit, layer.cin)
        out += [(layer.op, a, b) for a in gin for b in gout]
    return out


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """``model`` as an FP32 ONNX file, written the way ``edgeslim.export`` writes it (:func:`core.onnx_model.to_onnx`)."""
    from edgeslim.core.io import write_bytes
    from edgeslim.core.onnx_model import to_onnx

    return write_bytes(path, to_onnx(copy.deepcopy(model).eval(), example[:1]), force=True)


def measure_models(
    models: Mapping[str, nn.Module],
    example: torch.Tensor,
    *,
    runtime: str = "onnxruntime",
    threads: int = 1,
    rounds: int = 5,
    runs: int = 30,
    sessions: int = 1,
) -> dict[str, dict[str, Any]]:
    """Export each model to ONNX and time them side by side (interleaved rounds, batch 1).

    With ``sessions`` > 1 the whole interleaved timing is repeated that many times on the same exported files
    (each session reshuffles the order): ``ms`` is then the median of the sessions' figures, and ``sessions_ms``
    lists them, so the noise between two timings of the same model can be told from a prediction error.

    Returns:
        label -> ``ms`` (median of the round medians; over sessions: their median), ``spread_pct`` (interquartile
        range of the round medians, first session) and ``sessions_ms``.
    """
    from edgeslim.runtime import RUNTIMES, interleaved_latency

    x = example[:1].float().numpy()
    per: dict[str, list[float]] = {k: [] for k in models}
    spread: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="edgeslim-nas-") as td:
        runners = {}
        for i, (label, m) in enumerate(models.items()):
            p = export_onnx(m, example, Path(td) / f"m{i}.onnx")
            runners[label] = RUNTIMES.get(runtime)(p, threads=threads)
        for s in range(max(1, sessions)):
            got = interleaved_latency(
                runners, x, rounds=rounds, runs=runs, warmup=3, rewarm=2, shuffle=True, seed=1000 * s
            )
            for k, v in got.items():
                per[k].append(v["median_of_rounds_ms"])
                spread.setdefault(k, v["round_spread_pct"])
    return {k: {"ms": float(np.median(v)), "spread_pct": spread[k], "sessions_ms": v} for k, v in per.items()}


@dataclasses.dataclass
class Predictor:
    """Latency (ms) of points of ``space`` on ``table``'s runtime: ``a * sum(layer ms) + c * weight MB + b``.

    Attributes:
        space: the width space.
        table: the measured per-layer table (covering the space's grid).
        a, b: the fitted scale and per-graph offset (1 and 0 until :meth:`fit`).
        c: ms per MB of FP32 weights (0 unless the fit keeps the weight term).
        form: which nested model the fit kept: ``ratio``, ``affine`` or ``affine+weights``.
        fit_samples: ``[{"sum_ms", "weight_mb", "measured_ms", "predicted_ms"}]`` the fit used.
    """

    space: WidthSpace
    table: LatencyTable
    a: float = 1.0
    b: float = 0.0
    c: float = 0.0
    form: str = "sum"
    fit_samples: list[dict] = dataclasses.field(default_factory=list)
    device: Any = None
    host: Any = None

    @property
    def label(self) -> str:
        """``measured on <runtime>`` terms for the host, ``predicted for D`` for a device profile."""
        return f"predicted for {self.device.name}" if self.device is not None else "host table"

    def with_device(self, name: str | None) -> Predictor:
        """The same predictor scaled to device profile ``name`` (None or ``host``: the host's own figures)."""
        if name in (None, "host"):
            return dataclasses.replace(self, device=None, host=None)
        from edgeslim.devices import get_device

        return dataclasses.replace(self, device=get_device(name), host=self.host or get_device("host"))

    def layer_ms(self, assign: Mapping[str, int] | None = None) -> dict[str, float]:
        """Each layer's table latency (ms) at the widths ``assign`` (units left out: full width)."""
        assign = dict(assign or {})
        out = {}
        for layer in self.space.layers:
            cin, cout = layer.widths(assign)
            ms = self.table.estimate(
                layer.op,
                cin,
                cout,
                self.space.grid(layer.cin_unit, layer.cin),
                self.space.grid(layer.cout_unit, layer.cout),
            )
            if self.device is not None:
                ms *= device_ratio(layer.op, cin, cout, self.host, self.device)
            out[layer.name] = ms
        return out

    def sum_ms(self, assign: Mapping[str, int] | None = None) -> float:
        return float(sum(self.layer_ms(assign).values()))

    def weight_mb(self, assign: Mapping[str, int] | None = None) -> float:
        """FP32 weights (MB) of the Conv/Linear layers at the widths ``assign``."""
        assign = dict(assign or {})
        total = 0
        for layer in self.space.layers:
            cin, cout = layer.widths(assign)
            oh, ow = layer.op.out_size()
            total += layer.op.macs(cin, cout) // max(oh * ow, 1) + cout
        return total * 4 / 1e6

    def predict(self, assign: Mapping[str, int] | None = None) -> float:
        """Latency (ms) of the point ``assign``: on the host's runtime, or "predicted for D" with a device."""
        b = self.b * (overhead_ratio(self.host, self.device) if self.device is not None else 1.0)
        c = self.c * (self.host.mem_bandwidth_gbs / self.device.mem_bandwidth_gbs if self.device is not None else 1.0)
        return self.a * self.sum_ms(assign) + (c * self.weight_mb(assign) if self.c else 0.0) + b

    def fit(self, model: nn.Module, *, samples: int = 6, seed: int = 0, rounds: int = 5) -> Predictor:
        """Fit ``a``, ``b`` and ``c`` on ``samples`` sub-networks of ``model`` (the full model, the smallest and
        random points), each exported and timed on the table's runtime. Returns self."""
        rng = random.Random(seed)
        # both ends of the space anchor the line; random points fill the middle
        points = [self.space.full(), self.space.smallest()]
        points += [self.space.sample(rng) for _ in range(max(0, samples - 2))]
        nets = {f"fit{i}": self.space.realize(model, p) for i, p in enumerate(points)}
        got = measure_models(
            nets, self.space.example, runtime=self.table.runtime, threads=self.table.threads, rounds=rounds
        )
        self.fit_points(points, [got[f"fit{i}"]["ms"] for i in range(len(points))])
        log.info(
            "latency predictor (%s): measured = %.3f * sum(layers) %+.4f * weight MB %+.3f ms on %d sub-networks",
            self.form,
            self.a,
            self.c,
            self.b,
            len(points),
        )
        return self

    def fit_points(self, points: list[Mapping[str, int]], measured: list[float]) -> Predictor:
        """Fit the model on points of the space whose latencies were measured. Returns self."""
        sums = [self.sum_ms(p) for p in points]
        wts = [self.weight_mb(p) for p in points]
        self.a, self.b, self.c, self.form = latency_fit(sums, wts, measured)
        self.fit_samples = [
            {"sum_ms": s, "weight_mb": w, "measured_ms": m, "predicted_ms": self.a * s + self.c * w + self.b}
            for s, w, m in zip(sums, wts, measured, strict=True)
        ]
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "form": self.form,
            "a": self.a,
            "b_ms": self.b,
            "c_ms_per_weight_mb": self.c,
            "fit_samples": self.fit_samples,
            "table": table_info(self.table),
            "device": self.device.name if self.device is not None else "host",
            "label": self.label,
        }


def affine_fit(x: list[float], y: list[float]) -> tuple[float, float]:
    """``y = a x + b`` (least squares, ``a > 0``) or ``y = a x`` (ratio through zero), whichever predicts the points
    better when each is left out in turn (with a handful of noisy timings a free offset can overfit one outlier).
    One point, or no spread in ``x``: the ratio."""
    xa, ya = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(xa) == 0:
        raise ModelError("no sub-network to fit the latency model on")

    def ratio(xs: np.ndarray, ys: np.ndarray) -> tuple[float, float]:
        return float(ys.sum() / max(xs.sum(), 1e-12)), 0.0

    def affine(xs: np.ndarray, ys: np.ndarray) -> tuple[float, float]:
        if len(xs) < 2 or np.ptp(xs) < 1e-9 * max(1.0, float(xs.max())):
            return ratio(xs, ys)
        a, b = np.polyfit(xs, ys, 1)
        return (float(a), float(b)) if a > 0 else ratio(xs, ys)

    if len(xa) < 4:
        return affine(xa, ya)

    def loo(fn: object) -> float:
        errs = []
        for i in range(len(xa)):
            keep = np.arange(len(xa)) != i
            a, b = fn(xa[keep], ya[keep])  # type: ignore[operator]
            errs.append(abs(a * xa[i] + b - ya[i]) / ya[i])
        return float(np.median(errs))

    return affine(xa, ya) if loo(affine) <= loo(ratio) else ratio(xa, ya)


def latency_fit(sums: list[float], weights: list[float], measured: list[float]) -> tuple[float, float, float, str]:
    """``measured = a * sum + c * weights + b``, or a nested form of it (``c = 0``: :func:`affine_fit`), whichever
    predicts the points better when each is left out in turn. The weight term needs >= 6 points, ``a > 0`` and
    ``c >= 0`` (more weights never make a network faster).

    Returns:
        ``(a, b, c, form)`` with ``form`` one of ``ratio``, ``affine``, ``affine+weights``.
    """
    x, w, y = (np.asarray(v, np.float64) for v in (sums, weights, measured))
    if not (len(x) == len(w) == len(y)):
        raise ModelError("latency_fit needs as many weights and measurements as sums")

    def simple(idx: np.ndarray) -> tuple[float, float, float]:
        a, b = affine_fit(list(x[idx]), list(y[idx]))
        return a, b, 0.0

    def full(idx: np.ndarray) -> tuple[float, float, float] | None:
        if len(idx) < 5 or np.ptp(w[idx]) < 1e-9:
            return None
        X = np.stack([x[idx], w[idx], np.ones(len(idx))], axis=1)
        (a, c, b), *_ = np.linalg.lstsq(X, y[idx], rcond=None)
        return (float(a), float(b), float(c)) if a > 0 and c >= 0 else None

    a, b, c = simple(np.arange(len(x)))
    form = "ratio" if b == 0.0 else "affine"
    got = full(np.arange(len(x))) if len(x) >= 6 else None
    if got is None:
        return a, b, c, form

    def loo(fn: object) -> float:
        errs = []
        for i in range(len(x)):
            keep = np.flatnonzero(np.arange(len(x)) != i)
            co = fn(keep) or simple(keep)  # type: ignore[operator]
            errs.append(abs(co[0] * x[i] + co[2] * w[i] + co[1] - y[i]) / y[i])
        return float(np.median(errs))

    if loo(full) < loo(simple):
        return got[0], got[1], got[2], "affine+weights"
    return a, b, c, form


def kendall_tau(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b of two equally long sequences (ties counted as neither concordant nor discordant)."""
    n = len(x)
    if n != len(y) or n < 2:
        raise ModelError("Kendall's tau needs two sequences of the same length >= 2")
    conc = disc = tx = ty = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                tx += 1
            elif dy == 0:
                ty += 1
            elif dx == dy:
                conc += 1
            else:
                disc += 1
    denom = np.sqrt((conc + disc + tx) * (conc + disc + ty))
    return float((conc - disc) / denom) if denom else 0.0


def build_predictor(
    model: nn.Module,
    space: WidthSpace,
    *,
    runtime: str = "onnxruntime",
    threads: int = 1,
    directory: Any = None,
    allow_build: bool = True,
    fit_samples: int = 6,
    seed: int = 0,
    rounds: int = 5,
) -> Predictor:
    """Open (or build) the table covering ``space`` on ``runtime``/``threads`` for this host and fit the overhead
    model on ``fit_samples`` measured sub-networks (0: no fit, ``a=1, b=0``)."""
    table = LatencyTable(runtime, threads, directory=directory)
    t0 = time.perf_counter()
    n = table.measure(requests(space), allow_build=allow_build, rounds=rounds)
    if n:
        log.info("latency table: %d entries timed in %.0f s -> %s", n, time.perf_counter() - t0, table.path)
    pred = Predictor(space, table)
    if fit_samples:
        pred.fit(model, samples=fit_samples, seed=seed, rounds=rounds)
    return pred


def check_predictor(
    model: nn.Module,
    predictor: Predictor,
    *,
    samples: int = 50,
    seed: int = 1,
    rounds: int = 5,
    refit: int = 6,
    sessions: int = 1,
) -> dict[str, Any]:
    """Sample ``samples`` held-out sub-networks of the predictor's space, prune, export and time each on the
    table's runtime, and compare with the prediction.

    With ``refit`` > 0, that many fit sub-networks (the full and smallest points and random ones, none of them
    held out) are timed *in the same interleaved session* as the held-out ones and the model is re-fitted on them
    only: on a shared host the load, and with it every latency, drifts between sessions (ResNet-18 here: 1.5x
    between two runs minutes apart), and a fit timed in another session carries that drift into every prediction.
    The fit from the predictor's own session is reported too (``asbuilt_*``).

    With ``sessions`` >= 2 the same exported sub-networks are timed that many times (independent interleaved
    sessions); the measured figure is their median, and ``measurement_tau`` is Kendall's tau between two sessions
    (the mean over pairs): the ranking the noise of the measurement itself allows, a ceiling for the predictor's.

    Returns:
        ``median_abs_error_pct``, ``max_abs_error_pct``, ``kendall_tau`` (of the held-out sub-networks), the same
        for the raw sum (``sum_*``), the affine-only model (``affine_*``) and the as-built fit,
        ``measurement_tau`` (sessions >= 2), and per sub-network ``rows``.
    """
    space = predictor.space
    rng = random.Random(seed)
    points = [space.sample(rng) for _ in range(samples)]
    fit_points = (
        [space.full(), space.smallest()] + [space.sample(rng) for _ in range(max(0, refit - 2))] if refit else []
    )
    t0 = time.perf_counter()
    nets = {f"s{i}": space.realize(model, p) for i, p in enumerate(points)}
    nets.update({f"f{i}": space.realize(model, p) for i, p in enumerate(fit_points)})
    t_prune = time.perf_counter() - t0
    got = measure_models(
        nets,
        space.example,
        runtime=predictor.table.runtime,
        threads=predictor.table.threads,
        rounds=rounds,
        sessions=sessions,
    )
    pred = dataclasses.replace(predictor, fit_samples=[])
    if refit:
        pred.fit_points(fit_points, [got[f"f{i}"]["ms"] for i in range(len(fit_points))])
    fa, fb = (
        affine_fit([pred.sum_ms(p) for p in fit_points], [got[f"f{i}"]["ms"] for i in range(len(fit_points))])
        if refit
        else (predictor.a, predictor.b)
    )
    rows = []
    for i, p in enumerate(points):
        s, meas = pred.sum_ms(p), got[f"s{i}"]["ms"]
        pm = pred.predict(p)
        rows.append(
            {
                "widths": p,
                "sum_ms": s,
                "weight_mb": pred.weight_mb(p),
                "predicted_ms": pm,
                "affine_predicted_ms": fa * s + fb,
                "measured_ms": meas,
                "sessions_ms": got[f"s{i}"]["sessions_ms"],
                "asbuilt_predicted_ms": predictor.predict(p),
                "spread_pct": got[f"s{i}"]["spread_pct"],
                "error_pct": (pm - meas) / meas * 100,
            }
        )
    meas = [r["measured_ms"] for r in rows]

    def med(key: str) -> float:
        return float(np.median([abs(r[key] - r["measured_ms"]) / r["measured_ms"] * 100 for r in rows]))

    mtau = None
    if sessions >= 2:
        per = [[r["sessions_ms"][k] for r in rows] for k in range(sessions)]
        pairs = [kendall_tau(per[a], per[b]) for a in range(sessions) for b in range(a + 1, sessions)]
        mtau = float(np.mean(pairs))
    err = [abs(r["error_pct"]) for r in rows]
    return {
        "samples": samples,
        "sessions": sessions,
        "median_abs_error_pct": float(np.median(err)),
        "max_abs_error_pct": float(max(err)),
        "kendall_tau": kendall_tau([r["predicted_ms"] for r in rows], meas),
        "measurement_tau": mtau,
        "affine_median_abs_error_pct": med("affine_predicted_ms"),
        "affine_kendall_tau": kendall_tau([r["affine_predicted_ms"] for r in rows], meas),
        "sum_median_abs_error_pct": med("sum_ms"),
        "sum_kendall_tau": kendall_tau([r["sum_ms"] for r in rows], meas),
        "asbuilt_median_abs_error_pct": med("asbuilt_predicted_ms"),
        "fit": {
            "form": pred.form,
            "a": pred.a,
            "b_ms": pred.b,
            "c_ms_per_weight_mb": pred.c,
            "samples": len(fit_points),
            "same_session": bool(refit),
        },
        "median_spread_pct": float(np.median([r["spread_pct"] for r in rows])),
        "measured_ms_range": [float(min(meas)), float(max(meas))],
        "seconds_prune_export": round(t_prune, 1),
        "seconds": round(time.perf_counter() - t0, 1),
        "predictor": predictor.to_dict(),
        "rows": rows,
    }

"""Latency of a point of the width space: the table's per-layer figures summed, plus a fitted model of what the sum
misses, and the check of that prediction against whole sub-networks exported and timed for real.

The sum of isolated layers misses what happens between them in one graph: the runtime's per-call cost, the
layout changes it makes once per graph instead of once per layer, the element-wise ops (residual adds, pooling)
that are not in the table. ``predicted = a * sum(layer ms) + b`` is fitted by least squares on a few sub-networks of
the same space, each exported to ONNX and timed (:meth:`Predictor.fit`).
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
) -> dict[str, dict[str, float]]:
    """Export each model to ONNX and time them side by side (interleaved rounds, batch 1).

    Returns:
        label -> ``ms`` (median of the round medians) and ``spread_pct`` (interquartile range of the round medians).
    """
    from edgeslim.runtime import RUNTIMES, interleaved_latency

    x = example[:1].float().numpy()
    with tempfile.TemporaryDirectory(prefix="edgeslim-nas-") as td:
        runners = {}
        for i, (label, m) in enumerate(models.items()):
            p = export_onnx(m, example, Path(td) / f"m{i}.onnx")
            runners[label] = RUNTIMES.get(runtime)(p, threads=threads)
        got = interleaved_latency(runners, x, rounds=rounds, runs=runs, warmup=3, rewarm=2, shuffle=True)
    return {k: {"ms": v["median_of_rounds_ms"], "spread_pct": v["round_spread_pct"]} for k, v in got.items()}


@dataclasses.dataclass
class Predictor:
    """Latency (ms) of points of ``space`` on ``table``'s runtime: ``a * sum(layer ms) + b``.

    Attributes:
        space: the width space.
        table: the measured per-layer table (covering the space's grid).
        a, b: the fitted scale and per-graph offset (1 and 0 until :meth:`fit`).
        fit_samples: ``[{"sum_ms", "measured_ms", "widths"}]`` the fit used.
    """

    space: WidthSpace
    table: LatencyTable
    a: float = 1.0
    b: float = 0.0
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

    def predict(self, assign: Mapping[str, int] | None = None) -> float:
        """Latency (ms) of the point ``assign``: on the host's runtime, or "predicted for D" with a device."""
        b = self.b * (overhead_ratio(self.host, self.device) if self.device is not None else 1.0)
        return self.a * self.sum_ms(assign) + b

    def fit(self, model: nn.Module, *, samples: int = 6, seed: int = 0, rounds: int = 5) -> Predictor:
        """Fit ``a`` and ``b`` on ``samples`` sub-networks of ``model`` (the full model and random points), each
        exported and timed on the table's runtime. Returns self."""
        rng = random.Random(seed)
        # both ends of the space anchor the line; random points fill the middle
        points = [self.space.full(), self.space.smallest()]
        points += [self.space.sample(rng) for _ in range(max(0, samples - 2))]
        nets = {f"fit{i}": self.space.realize(model, p) for i, p in enumerate(points)}
        got = measure_models(
            nets, self.space.example, runtime=self.table.runtime, threads=self.table.threads, rounds=rounds
        )
        sums = [self.sum_ms(p) for p in points]
        meas = [got[f"fit{i}"]["ms"] for i in range(len(points))]
        self.a, self.b = affine_fit(sums, meas)
        self.fit_samples = [
            {"sum_ms": s, "measured_ms": m, "predicted_ms": self.a * s + self.b}
            for s, m in zip(sums, meas, strict=True)
        ]
        log.info(
            "latency predictor: measured = %.3f * sum(layers) %+.3f ms on %d sub-networks", self.a, self.b, len(points)
        )
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b_ms": self.b,
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
    model: nn.Module, predictor: Predictor, *, samples: int = 50, seed: int = 1, rounds: int = 5, refit: int = 6
) -> dict[str, Any]:
    """Sample ``samples`` held-out sub-networks of the predictor's space, prune, export and time each on the
    table's runtime, and compare with the prediction.

    With ``refit`` > 0, that many fit sub-networks (the full and smallest points and random ones, none of them
    held out) are timed *in the same interleaved session* as the held-out ones and ``a, b`` are re-fitted on them
    only: on a shared host the load, and with it every latency, drifts between sessions (ResNet-18 here: 1.5x
    between two runs minutes apart), and a fit timed in another session carries that drift into every prediction.
    The fit from the predictor's own session is reported too (``asbuilt_*``).

    Returns:
        ``median_abs_error_pct``, ``max_abs_error_pct``, ``kendall_tau`` (of the held-out sub-networks), the same
        for the raw sum (``sum_*``) and the as-built fit, and per sub-network ``rows``.
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
        nets, space.example, runtime=predictor.table.runtime, threads=predictor.table.threads, rounds=rounds
    )
    a, b = predictor.a, predictor.b
    if refit:
        a, b = affine_fit(
            [predictor.sum_ms(p) for p in fit_points], [got[f"f{i}"]["ms"] for i in range(len(fit_points))]
        )
    rows = []
    for i, p in enumerate(points):
        s, meas = predictor.sum_ms(p), got[f"s{i}"]["ms"]
        pred = a * s + b
        rows.append(
            {
                "widths": p,
                "sum_ms": s,
                "predicted_ms": pred,
                "measured_ms": meas,
                "asbuilt_predicted_ms": predictor.a * s + predictor.b,
                "spread_pct": got[f"s{i}"]["spread_pct"],
                "error_pct": (pred - meas) / meas * 100,
            }
        )
    meas = [r["measured_ms"] for r in rows]

    def med(key: str) -> float:
        return float(np.median([abs(r[key] - r["measured_ms"]) / r["measured_ms"] * 100 for r in rows]))

    err = [abs(r["error_pct"]) for r in rows]
    return {
        "samples": samples,
        "median_abs_error_pct": float(np.median(err)),
        "max_abs_error_pct": float(max(err)),
        "kendall_tau": kendall_tau([r["predicted_ms"] for r in rows], meas),
        "sum_median_abs_error_pct": med("sum_ms"),
        "asbuilt_median_abs_error_pct": med("asbuilt_predicted_ms"),
        "fit": {"a": a, "b_ms": b, "samples": len(fit_points), "same_session": bool(refit)},
        "median_spread_pct": float(np.median([r["spread_pct"] for r in rows])),
        "measured_ms_range": [float(min(meas)), float(max(meas))],
        "seconds_prune_export": round(t_prune, 1),
        "seconds": round(time.perf_counter() - t0, 1),
        "predictor": predictor.to_dict(),
        "rows": rows,
    }

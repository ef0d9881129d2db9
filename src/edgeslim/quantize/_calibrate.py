"""Activation observers and calibration methods (a registry).

An :class:`Observer` collects a tensor's min/max in a first pass and a histogram over that range in a
second pass; a calibration method turns the statistics into a clipping range ``(lo, hi)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from edgeslim.core.registry import Registry

BINS = 2048


@dataclass
class Stats:
    """What an observer saw: min, max and a histogram of ``BINS`` bins over [min, max]."""

    lo: float
    hi: float
    hist: np.ndarray | None  # counts, len BINS, over [lo, hi]
    qmin: int
    qmax: int
    percentile: float
    zeros: float = 0.0  # exact zeros observed (e.g. after ReLU); zero is exact on the integer grid

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(self.lo, self.hi, BINS + 1)

    @property
    def centers(self) -> np.ndarray:
        e = self.edges
        return (e[:-1] + e[1:]) / 2


Calibrator = Callable[[Stats], tuple[float, float]]
CALIBRATORS: Registry[Calibrator] = Registry("calibration method")


@CALIBRATORS.register("minmax")
def minmax(s: Stats) -> tuple[float, float]:
    """The full observed range."""
    return s.lo, s.hi


def _cdf_range(s: Stats, lower_mass: float, upper_mass: float) -> tuple[float, float]:
    c = np.cumsum(s.hist) / max(1.0, float(s.hist.sum()))
    e = s.edges
    lo = e[int(np.searchsorted(c, lower_mass, side="left"))] if s.lo < 0 else s.lo
    hi = e[min(BINS, int(np.searchsorted(c, upper_mass, side="left")) + 1)]
    return float(min(lo, 0.0)), float(max(hi, 0.0))


@CALIBRATORS.register("percentile")
def percentile(s: Stats) -> tuple[float, float]:
    """Clip the tails: keep ``percentile`` % of the mass (split over both tails for signed tensors)."""
    if s.hist is None or s.hi <= s.lo:
        return s.lo, s.hi
    tail = (100.0 - s.percentile) / 100.0
    if s.lo < 0:
        return _cdf_range(s, tail / 2, 1 - tail / 2)
    return _cdf_range(s, 0.0, 1 - tail)


def _quant_mse(s: Stats, lo: float, hi: float) -> float:
    """Expected squared error of quantizing the histogram's values to ``[lo, hi]`` on the integer grid."""
    x = s.centers
    scale = max((hi - lo) / (s.qmax - s.qmin), 1e-12)
    zp = np.round(s.qmin - lo / scale)
    q = np.clip(np.round(x / scale + zp), s.qmin, s.qmax)
    err = (x - (q - zp) * scale) ** 2
    return float((err * s.hist).sum() / max(1.0, float(s.hist.sum())))


@CALIBRATORS.register("mse")
def mse(s: Stats) -> tuple[float, float]:
    """The clipping range with the least expected quantization error (rounding plus clipping)."""
    if s.hist is None or s.hi <= s.lo:
        return s.lo, s.hi
    best, best_range = float("inf"), (s.lo, s.hi)
    for a in np.geomspace(0.01, 1.0, 120):
        lo, hi = min(0.0, s.lo * a), max(0.0, s.hi * a)
        err = _quant_mse(s, lo, hi)
        if err < best:
            best, best_range = err, (lo, hi)
    return float(best_range[0]), float(best_range[1])


@CALIBRATORS.register("entropy")
def entropy(s: Stats) -> tuple[float, float]:
    """KL-divergence threshold search (TensorRT's entropy calibration) on the magnitude histogram."""
    if s.hist is None or s.hi <= s.lo:
        return s.lo, s.hi
    amax = max(abs(s.lo), abs(s.hi))
    # magnitude histogram over [0, amax]
    mag_edges = np.linspace(0, amax, BINS + 1)
    centers = np.abs(s.centers)
    mag = np.histogram(centers, bins=mag_edges, weights=s.hist)[0]
    # exact zeros (half of every post-ReLU tensor) quantize exactly: leave them out, or their spike in the
    # first bin dominates the divergence and drags the threshold down
    mag[0] = max(0.0, mag[0] - s.zeros)
    levels = (s.qmax - s.qmin + 1) // (2 if s.lo < 0 else 1)
    levels = max(levels, 2)
    best_kl, best_i = float("inf"), BINS
    total = mag.sum()
    if total <= 0:
        return s.lo, s.hi
    for i in range(levels, BINS + 1, 16):
        p = mag[:i].astype(np.float64).copy()
        p[i - 1] += mag[i:].sum()
        # quantize the first i bins into `levels` groups, expand back uniformly over non-empty bins
        chunk = mag[:i]
        starts = (np.arange(levels) * i) // levels
        sizes = np.diff(np.append(starts, i))
        nz = chunk > 0
        sums = np.add.reduceat(chunk, starts)
        counts = np.add.reduceat(nz.astype(np.float64), starts)
        q = np.repeat(sums / np.maximum(counts, 1), sizes) * nz
        pm = p / p.sum()
        qs = q.sum()
        if qs <= 0:
            continue
        qm = q / qs
        mask = pm > 0
        kl = float(np.sum(pm[mask] * np.log(pm[mask] / np.maximum(qm[mask], 1e-12))))
        if kl < best_kl:
            best_kl, best_i = kl, i
    t = mag_edges[best_i]
    return float(min(0.0, max(s.lo, -t))), float(max(0.0, min(s.hi, t)))


class Observer:
    """Collects one activation tensor's statistics over calibration batches (two passes)."""

    def __init__(self) -> None:
        self.lo = float("inf")
        self.hi = float("-inf")
        self.hist: np.ndarray | None = None
        self.zeros = 0.0

    def observe_range(self, x: torch.Tensor) -> None:
        x = x.detach()
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))

    def observe_hist(self, x: torch.Tensor) -> None:
        if self.hi <= self.lo:
            return
        x = x.detach().float().flatten()
        h = torch.histc(x, bins=BINS, min=self.lo, max=self.hi).numpy().astype(np.float64)
        self.hist = h if self.hist is None else self.hist + h
        self.zeros += float((x == 0).sum())

    def stats(self, qmin: int, qmax: int, percentile_: float) -> Stats:
        return Stats(self.lo, self.hi, self.hist, qmin, qmax, percentile_, self.zeros)

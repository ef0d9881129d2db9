"""Activation observers and calibration methods (a registry).

An :class:`Observer` collects a tensor's min/max and a histogram in one pass over the calibration data
(:meth:`Observer.observe`): the histogram's bins are aligned at zero and its range doubles (merging pairs of bins,
which is exact) whenever a batch goes beyond it, so no second pass over the data is needed. The two-pass form
(``observe_range`` then ``observe_hist`` over exactly [min, max]) is kept for callers that want it. A calibration
method turns the statistics into a clipping range ``(lo, hi)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from edgeslim.core.registry import Registry

BINS = 2048
#: bins of the one-pass histogram over [-R, R]; at least ``BINS // 2`` of them cover [0, max] of a non-negative
#: tensor (R < 2 max), and in practice the first batch sets R = max and later growth is rare
ONE_PASS_BINS = 8192
#: the one-pass histogram counts at most this many values per sample of a batch (an evenly strided subset, its
#: offset moving from batch to batch; min and max always see every value): 256 calibration images give every tensor a
#: histogram of 2M values, which fixes a clipping range as well as all of them, at a fraction of the cost
HIST_VALUES_PER_SAMPLE = 8192


@dataclass
class Stats:
    """What an observer saw: min, max and a histogram over [hist_lo, hist_hi] (default: [min, max])."""

    lo: float
    hi: float
    hist: np.ndarray | None  # counts over [hist_lo, hist_hi], equal-width bins
    qmin: int
    qmax: int
    percentile: float
    zeros: float = 0.0  # exact zeros observed (e.g. after ReLU); zero is exact on the integer grid
    hist_lo: float | None = None
    hist_hi: float | None = None

    @property
    def edges(self) -> np.ndarray:
        a = self.lo if self.hist_lo is None else self.hist_lo
        b = self.hi if self.hist_hi is None else self.hist_hi
        return np.linspace(a, b, (BINS if self.hist is None else len(self.hist)) + 1)

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
    hi = e[min(len(s.hist), int(np.searchsorted(c, upper_mass, side="left")) + 1)]
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


def _quant_mse(s: Stats, lo: float, hi: float, centers: np.ndarray | None = None) -> float:
    """Expected squared error of quantizing the histogram's values to ``[lo, hi]`` on the integer grid (``centers``:
    the bins' centers, when the caller has them)."""
    x = s.centers if centers is None else centers
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
    centers = s.centers
    for a in np.geomspace(0.01, 1.0, 120):
        lo, hi = min(0.0, s.lo * a), max(0.0, s.hi * a)
        err = _quant_mse(s, lo, hi, centers)
        if err < best:
            best, best_range = err, (lo, hi)
    return float(best_range[0]), float(best_range[1])


@CALIBRATORS.register("entropy")
def entropy(s: Stats) -> tuple[float, float]:
    """KL-divergence threshold search (TensorRT's entropy calibration) on the magnitude histogram."""
    if s.hist is None or s.hi <= s.lo:
        return s.lo, s.hi
    amax = max(abs(s.lo), abs(s.hi))
    if s.hist_lo is not None:  # a one-pass histogram's bins are zero-aligned: fold negatives onto positives (exact)
        width = (s.hist_hi - s.hist_lo) / len(s.hist)
        mag = np.bincount(np.floor(np.abs(s.centers) / width + 1e-6).astype(np.int64), weights=s.hist)
        if len(mag) > BINS:  # at most the two-pass histogram's bins: the threshold search reads single bins (its
            # first candidates hold one bin per level), and finer bins of a sampled histogram are noise
            k = -(-len(mag) // BINS)
            mag = np.concatenate([mag, np.zeros(-len(mag) % k)]).reshape(-1, k).sum(1)
            width *= k
        mag_edges = np.arange(len(mag) + 1) * width
    else:  # magnitude histogram over [0, amax]
        mag_edges = np.linspace(0, amax, BINS + 1)
        centers = np.abs(s.centers)
        mag = np.histogram(centers, bins=mag_edges, weights=s.hist)[0]
    nbins = len(mag)
    step = max(1, round(16 * nbins / BINS))
    # exact zeros (half of every post-ReLU tensor) quantize exactly: leave them out, or their spike in the
    # first bin dominates the divergence and drags the threshold down
    mag[0] = max(0.0, mag[0] - s.zeros)
    levels = (s.qmax - s.qmin + 1) // (2 if s.lo < 0 else 1)
    levels = max(levels, 2)
    best_kl, best_i = float("inf"), nbins
    total = mag.sum()
    if total <= 0:
        return s.lo, s.hi
    for i in range(levels, nbins + 1, step):
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
    """Collects one activation tensor's statistics over calibration batches: in one pass (:meth:`observe`), or in
    two (:meth:`observe_range` on every batch, then :meth:`observe_hist` on every batch)."""

    def __init__(self, count_zeros: bool = True) -> None:
        self.lo = float("inf")
        self.hi = float("-inf")
        self.hist: np.ndarray | None = None
        self.zeros = 0.0
        self.count_zeros = count_zeros  # only the entropy method reads it; counting costs a pass over the tensor
        self._radius = 0.0  # the one-pass histogram covers [-radius, radius] in ONE_PASS_BINS bins
        self._calls = 0
        self.channel_sums = False  # also sum each channel (axis 1) for its mean (the ONNX capture's bias correction)
        self.channel_total: np.ndarray | None = None
        self.channel_count = 0.0

    def observe(self, x: torch.Tensor) -> bool:
        """One pass: min, max and a zero-aligned histogram whose range doubles when a batch goes beyond it.

        ``x`` is a batch (its first dimension counts the samples); the histogram counts at most
        ``HIST_VALUES_PER_SAMPLE`` values per sample, evenly strided over the tensor. Returns False, leaving the
        statistics as they were, when ``x`` holds a non-finite value (its min or max is then inf or NaN: the check
        costs no pass of its own).
        """
        samples = int(x.shape[0]) if x.ndim > 1 else 1
        if self.channel_sums and x.ndim >= 2:
            # per-sample sums in float32 (fast, accurate enough: at most H*W values each), then added in float64
            per_sample = x.detach().float()
            if x.ndim > 2:
                per_sample = per_sample.sum(list(range(2, x.ndim)))
            s = per_sample.double().sum(0).numpy()
            self.channel_total = s if self.channel_total is None else self.channel_total + s
            self.channel_count += x.numel() / max(int(x.shape[1]), 1)
        x = x.detach().float().reshape(-1)
        if x.numel() == 0:
            return True
        lo, hi = torch.aminmax(x)
        lo, hi = float(lo), float(hi)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return False
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        if self.count_zeros:
            self.zeros += float(x.numel() - int(torch.count_nonzero(x)))
        amax = max(abs(lo), abs(hi))
        if amax == 0.0:
            return True
        if self.hist is None:
            self._radius = amax
            self.hist = np.zeros(ONE_PASS_BINS, np.float64)
        while amax > self._radius:  # double the range: each new bin is two old ones (exact, bins stay zero-aligned)
            half, quarter = ONE_PASS_BINS // 2, ONE_PASS_BINS // 4
            merged = np.zeros_like(self.hist)
            merged[quarter:half] = self.hist[:half].reshape(-1, 2).sum(1)
            merged[half : half + quarter] = self.hist[half:].reshape(-1, 2).sum(1)
            self.hist, self._radius = merged, 2 * self._radius
        stride = -(-x.numel() // (HIST_VALUES_PER_SAMPLE * samples))
        if stride > 1:  # the offset moves from call to call so no position is always skipped
            x = x[self._calls % stride :: stride]
        self._calls += 1
        r = self._radius
        # the bin of each value (all lie in [-r, r]); bincount is ~3x faster than histc with this many bins
        idx = ((x + r) * (ONE_PASS_BINS / (2 * r))).to(torch.int32).clamp_(0, ONE_PASS_BINS - 1)
        h = torch.bincount(idx, minlength=ONE_PASS_BINS).numpy()
        self.hist += h * (stride if stride > 1 else 1)
        return True

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
        if not self._radius or self.hist is None:
            return Stats(self.lo, self.hi, self.hist, qmin, qmax, percentile_, self.zeros)
        # one-pass histogram: keep the bins from the one holding min to the one holding max
        width = 2 * self._radius / ONE_PASS_BINS
        first = int(np.clip(np.floor((self.lo + self._radius) / width), 0, ONE_PASS_BINS - 1))
        last = int(np.clip(np.ceil((self.hi + self._radius) / width), first + 1, ONE_PASS_BINS))
        return Stats(
            self.lo,
            self.hi,
            self.hist[first:last],
            qmin,
            qmax,
            percentile_,
            self.zeros,
            hist_lo=-self._radius + first * width,
            hist_hi=-self._radius + last * width,
        )

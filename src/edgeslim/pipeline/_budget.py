"""The user's budget: what must hold for a candidate to be deployable, and where it is judged.

A :class:`Budget` is plain data (a frozen :class:`~edgeslim.core.config.Config`): limits on accuracy drop,
latency (absolute, or as a speedup over the FP32 ONNX file on the same runtime), file size (raw bytes, and
compressed bytes for a download), peak memory and energy per inference, and the target they are judged on:

- ``target="host"``: latency (and peak memory) are MEASURED here on ``runtime`` with ``threads`` threads;
- ``target=<device profile>`` (a name from :func:`edgeslim.devices.device_names` or a profile YAML file):
  latency, memory and energy are PREDICTED for that device (roofline calibrated on this host) and labelled so.

Accuracy is always measured here, on the runtime, on real validation data. :meth:`Budget.check` says which
limit a candidate's figures break and by how much.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeslim.core.config import Config, StrEnum
from edgeslim.core.errors import ConfigError, near

log = logging.getLogger(__name__)

HOST = "host"
MB = 2**20  # one MB in bytes for size and memory budgets (the unit peak RSS is reported in)


class Prefer(StrEnum):
    """What the chosen candidate is best at, among those that meet the budget: ``latency`` (fastest; ties by
    accuracy), ``accuracy`` (most accurate; ties by latency) or ``size`` (smallest file; ties by latency)."""

    LATENCY = "latency"
    ACCURACY = "accuracy"
    SIZE = "size"


# the limit fields, in the order they are judged
LIMITS = (
    "max_accuracy_drop",
    "max_latency_ms",
    "min_speedup",
    "max_size_mb",
    "max_zipped_size_mb",
    "max_peak_memory_mb",
    "max_energy_mj",
)
#: the size-like limits and the figure each judges
SIZE_LIMITS = (
    ("max_size_mb", "size_mb", "MB"),
    ("max_zipped_size_mb", "size_zipped_mb", "MB"),
    ("max_peak_memory_mb", "peak_memory_mb", "MB"),
    ("max_energy_mj", "energy_mj", "mJ"),
)


@dataclass(frozen=True)
class Violation:
    """One limit a candidate breaks: ``excess`` is the relative amount over the limit (0.25 = 25 % over)."""

    field: str
    limit: float
    value: float
    excess: float
    text: str

    def to_dict(self) -> dict[str, Any]:
        return {"field": self.field, "limit": self.limit, "value": self.value, "excess": self.excess, "text": self.text}


@dataclass(frozen=True)
class Budget(Config):
    """What must hold for a candidate, and where it is judged. ``None`` leaves a figure unconstrained.

    Attributes:
        max_accuracy_drop: allowed top-1 drop below the FP32 model on the same data, as a fraction
            (0.005 = 0.5 points).
        max_latency_ms: batch-1 latency limit in ms (median of timed runs after warm-up; or predicted).
        min_speedup: instead of ``max_latency_ms``: at least this many times faster than the FP32 ONNX file of
            the input model on the same runtime and threads (or the same device prediction).
        max_size_mb: file size limit of the deployable artifact: its raw bytes, what a runtime maps into memory
            (MB = 2**20 bytes). Weight clustering never lowers it (every weight is still stored in full).
        max_zipped_size_mb: compressed size limit of the deployable artifact: its bytes after zlib level 9 (MB =
            2**20 bytes), what a download or an over-the-air update moves and what a compressed filesystem
            stores. A separate limit, not a second meaning of ``max_size_mb``, because the two answer different
            questions and disagree on what helps: weight clustering (``Space.cluster``) leaves the raw bytes
            unchanged and lowers only this one.
        max_peak_memory_mb: peak memory limit: measured extra peak RSS of loading and running the file
            (host), or weights + peak activations (predicted for a device profile).
        max_energy_mj: energy per inference limit in mJ (estimated from MACs and bytes moved, Horowitz 2014).
        target: ``host`` (measured here) or a device profile name / YAML path (predicted for it).
        runtime: the runtime latency is measured on and accuracy is measured with (one that runs ONNX files).
        threads: intra-op threads of the deployment (fixed; not searched).
        prefer: which of the candidates that meet the budget is chosen (:class:`Prefer`).
    """

    kind = "budget"
    max_accuracy_drop: float | None = 0.01
    max_latency_ms: float | None = None
    min_speedup: float | None = None
    max_size_mb: float | None = None
    max_zipped_size_mb: float | None = None
    max_peak_memory_mb: float | None = None
    max_energy_mj: float | None = None
    target: str = HOST
    runtime: str = "onnxruntime"
    threads: int = 1
    prefer: Prefer = Prefer.LATENCY

    def validate(self) -> None:
        for f in LIMITS:
            v = getattr(self, f)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise self._bad(f, "must be a number >= 0, or None (no limit)")
            if f != "max_accuracy_drop" and v == 0:
                raise self._bad(f, "must be > 0, or None (no limit)")
        if self.max_accuracy_drop is not None and self.max_accuracy_drop >= 1:
            raise self._bad("max_accuracy_drop", "is a fraction in [0, 1): 0.005 allows a 0.5-point drop")
        if self.max_latency_ms is not None and self.min_speedup is not None:
            raise ConfigError(
                f"Budget: max_latency_ms={self.max_latency_ms!r} and min_speedup={self.min_speedup!r} "
                "both limit latency; give one of them"
            )
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
            raise self._bad("threads", "must be an integer >= 1")
        if not isinstance(self.target, str) or not self.target:
            raise self._bad("target", "'host' or a device profile name / YAML path")
        self._check_runtime()
        if self.threads > (os.cpu_count() or 1):
            log.warning(
                "Budget.threads=%d is more than this host's %d cores: latency is measured oversubscribed",
                self.threads,
                os.cpu_count() or 1,
            )
        if not self.on_host:
            try:
                dev = self.device()
            except ConfigError as e:
                raise ConfigError(f"Budget.target={self.target!r}: {e} (or 'host': measured here)") from None
            if self.latency_limited and not has_latency_predictor(dev):
                which = "max_latency_ms" if self.max_latency_ms is not None else "min_speedup"
                raise ConfigError(
                    f"Budget.{which}={getattr(self, which)!r} cannot be judged for target={self.target!r}: device "
                    f"{dev.name!r} ({dev.kind_}) has no latency predictor (its profile gives no efficiency and "
                    "host-calibrated efficiencies only transfer to CPUs); set efficiency in the profile, "
                    "use target='host', or drop the latency limit"
                )

    def _check_runtime(self) -> None:
        from edgeslim.runtime import RUNTIMES

        onnx_runtimes = [n for n in RUNTIMES.names() if "onnx" in RUNTIMES.get(n).formats]
        if self.runtime not in onnx_runtimes:
            raise ConfigError(
                f"Budget.runtime={self.runtime!r} is not allowed{near(str(self.runtime), onnx_runtimes)}"
                f"; optimize deploys ONNX files, valid: {', '.join(onnx_runtimes)}"
            )
        from edgeslim.runtime import missing

        how = missing(self.runtime)
        if how:
            raise ConfigError(f"Budget.runtime={self.runtime!r} is not installed here; install it with: {how}")

    # ------------------------------------------------------------------------------------------ views
    @property
    def on_host(self) -> bool:
        return self.target == HOST

    @property
    def latency_limited(self) -> bool:
        return self.max_latency_ms is not None or self.min_speedup is not None

    def device(self) -> Any:
        """The target's :class:`~edgeslim.devices.Device` (``host``: this machine's measured profile)."""
        from edgeslim.devices import get_device, load_profile

        t = str(self.target)
        if t.endswith((".yaml", ".yml")) or os.sep in t:
            if not Path(t).is_file():
                raise ConfigError(f"Budget.target={t!r}: device profile file does not exist")
            return load_profile(t)
        return get_device(t)

    def device_name(self) -> str:
        return HOST if self.on_host else self.device().name

    def latency_limit_ms(self, baseline_ms: float) -> float | None:
        """The latency limit in ms: ``max_latency_ms``, or the baseline's latency over ``min_speedup``."""
        if self.max_latency_ms is not None:
            return float(self.max_latency_ms)
        if self.min_speedup is not None:
            return baseline_ms / self.min_speedup
        return None

    def describe(self) -> list[str]:
        """One line per active limit, in words."""
        out = []
        where = (
            f"batch 1, {self.threads} thread(s) on {self.runtime}, measured here"
            if self.on_host
            else f"batch 1, predicted for {self.target}"
        )
        if self.max_accuracy_drop is not None:
            out.append(f"accuracy drop <= {100 * self.max_accuracy_drop:.2f} points below the FP32 model")
        if self.max_latency_ms is not None:
            out.append(f"latency <= {self.max_latency_ms:g} ms ({where})")
        if self.min_speedup is not None:
            out.append(f"speedup >= {self.min_speedup:g}x over the FP32 ONNX file of the input model ({where})")
        if self.max_size_mb is not None:
            out.append(f"file size <= {self.max_size_mb:g} MB")
        if self.max_zipped_size_mb is not None:
            out.append(f"zipped file size <= {self.max_zipped_size_mb:g} MB (zlib level 9)")
        if self.max_peak_memory_mb is not None:
            out.append(f"peak memory <= {self.max_peak_memory_mb:g} MB")
        if self.max_energy_mj is not None:
            out.append(f"energy per inference <= {self.max_energy_mj:g} mJ (estimated)")
        return out or [f"no limits: the Pareto front is searched and the choice follows prefer={self.prefer.value!r}"]

    # ------------------------------------------------------------------------------------------ judging
    def check(self, figs: dict[str, float], baseline: dict[str, float]) -> list[Violation]:
        """The limits ``figs`` break, judged against ``baseline`` (the FP32 model's figures on the same data).

        Both hold ``accuracy`` (fraction) and ``latency_ms``; ``figs`` also ``size_mb``, ``size_zipped_mb``,
        ``peak_memory_mb`` and ``energy_mj`` when those are limited.
        """
        out: list[Violation] = []
        if self.max_accuracy_drop is not None:
            drop = baseline["accuracy"] - figs["accuracy"]
            if drop > self.max_accuracy_drop + 1e-12:
                over = drop - self.max_accuracy_drop
                out.append(
                    Violation(
                        "max_accuracy_drop",
                        self.max_accuracy_drop,
                        drop,
                        over / max(self.max_accuracy_drop, 1e-3),
                        f"accuracy drop {100 * drop:.2f} pt > {100 * self.max_accuracy_drop:.2f} pt "
                        f"allowed ({100 * over:.2f} pt over)",
                    )
                )
        limit = self.latency_limit_ms(baseline["latency_ms"])
        if limit is not None and figs["latency_ms"] > limit:
            lat = figs["latency_ms"]
            if self.min_speedup is not None:
                speed = baseline["latency_ms"] / lat
                text = (
                    f"speedup {speed:.2f}x < {self.min_speedup:g}x required (latency {lat:.4g} ms > "
                    f"{limit:.4g} ms, {100 * (lat / limit - 1):.0f}% over)"
                )
                out.append(Violation("min_speedup", self.min_speedup, speed, lat / limit - 1, text))
            else:
                out.append(
                    Violation(
                        "max_latency_ms",
                        limit,
                        lat,
                        lat / limit - 1,
                        f"latency {lat:.4g} ms > {limit:g} ms allowed ({100 * (lat / limit - 1):.0f}% over)",
                    )
                )
        for f, name, unit in SIZE_LIMITS:
            lim = getattr(self, f)
            if lim is not None and figs[name] > lim:
                v = figs[name]
                out.append(
                    Violation(
                        f,
                        lim,
                        v,
                        v / lim - 1,
                        f"{_WORDS.get(name, name.rsplit('_', 1)[0].replace('_', ' '))} {v:.4g} "
                        f"{unit} > {lim:g} {unit} allowed ({100 * (v / lim - 1):.0f}% over)",
                    )
                )
        return out

    def constraint_values(self, figs: dict[str, float], baseline: dict[str, float]) -> dict[str, float]:
        """One number per active limit, <= 0 when it holds (relative excess; Optuna's constraint convention)."""
        vals: dict[str, float] = {}
        if self.max_accuracy_drop is not None:
            vals["max_accuracy_drop"] = (
                baseline["accuracy"] - figs["accuracy"] - self.max_accuracy_drop - 1e-12
            ) / max(self.max_accuracy_drop, 1e-3)
        limit = self.latency_limit_ms(baseline["latency_ms"])
        if limit is not None:
            vals["min_speedup" if self.min_speedup is not None else "max_latency_ms"] = figs["latency_ms"] / limit - 1
        for f, name, _ in SIZE_LIMITS:
            if getattr(self, f) is not None:
                vals[f] = figs[name] / getattr(self, f) - 1
        return vals


_WORDS = {"size_zipped_mb": "zipped size"}


def has_latency_predictor(dev: Any) -> bool:
    """Whether latency can be predicted for ``dev``: its profile gives an efficiency, or it is a CPU (the host
    calibration's efficiencies transfer to CPUs)."""
    return dev.efficiency is not None or dev.kind_ == "cpu"

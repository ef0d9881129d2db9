"""Metrics with provenance: every figure says where it came from.

A :class:`Figure` is one number with its unit and its source, e.g. ``measured on onnxruntime 1.32
(CPUExecutionProvider), 1 thread, batch 1, host AMD EPYC 7B13`` or ``computed by torch.utils.flop_counter``
or ``predicted for raspberry-pi-4``. :class:`Metrics` is an ordered collection of figures for one model
or artifact, plus the host it was measured on.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Figure:
    """One number and where it came from.

    Attributes:
        name: e.g. ``accuracy``, ``size_bytes``, ``macs``, ``latency_p50_ms``.
        value: the number.
        unit: e.g. ``fraction``, ``bytes``, ``ms``, ``MACs``.
        source: ``measured``, ``computed`` or ``predicted``.
        detail: how: runtime and version, threads, batch, samples, host; or the device predicted for.
    """

    name: str
    value: float
    unit: str
    source: str
    detail: str = ""


@dataclass
class Metrics:
    """Figures for one model or artifact, in insertion order."""

    label: str
    figures: dict[str, Figure] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, value: float, unit: str, source: str, detail: str = "") -> Figure:
        f = Figure(name, float(value), unit, source, detail)
        self.figures[name] = f
        return f

    def __getitem__(self, name: str) -> float:
        return self.figures[name].value

    def get(self, name: str, default: float | None = None) -> float | None:
        f = self.figures.get(name)
        return f.value if f else default

    def __contains__(self, name: str) -> bool:
        return name in self.figures

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "figures": {k: asdict(v) for k, v in self.figures.items()},
            "context": self.context,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Metrics:
        return cls(d["label"], {k: Figure(**v) for k, v in d.get("figures", {}).items()}, d.get("context", {}))


#: the /proc/cpuinfo flags that decide which integer / vector kernels a runtime can use
ISA_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_int8",
    "amx_bf16",
    "asimd",
    "asimddp",
    "i8mm",
    "sve",
    "bf16",
)


def host_info() -> dict[str, Any]:
    """The CPU, its vector ISA flags, core count and software versions of this machine (for every measured
    figure: INT8 speed-ups depend on VNNI/AVX-512 being there)."""
    cpu = platform.processor() or platform.machine()
    flags: set[str] = set()
    named = False
    try:
        with open("/proc/cpuinfo") as f:  # the first CPU's entries
            for line in f:
                if line.startswith("model name") and not named:
                    cpu, named = line.split(":", 1)[1].strip(), True
                elif line.startswith(("flags", "Features")) and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "os": platform.platform(),
        "python": platform.python_version(),
    }
    if flags:
        info["isa"] = " ".join(f for f in ISA_FLAGS if f in flags) or "none of " + ", ".join(ISA_FLAGS[:4])
    for mod in ("torch", "onnxruntime", "onnx"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return info


def compare(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    """Cosine similarity, SQNR (dB) and top-1 agreement of ``out`` against ``ref`` (both ``(N, classes)``)."""
    r = ref.astype(np.float64).ravel()
    o = out.astype(np.float64).ravel()
    cos = float(r @ o / max(np.linalg.norm(r) * np.linalg.norm(o), 1e-30))
    noise = float(((r - o) ** 2).sum())
    sqnr = float("inf") if noise == 0 else float(10 * np.log10(max((r**2).sum(), 1e-30) / noise))
    agree = float((ref.reshape(len(ref), -1).argmax(1) == out.reshape(len(out), -1).argmax(1)).mean())
    return {"cosine": cos, "sqnr_db": sqnr, "top1_agreement": agree}

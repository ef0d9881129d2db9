"""Device profiles: frozen, validated :class:`Device` configs loaded from ``profiles/*.yaml`` (package data)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edgeslim.core.config import Config
from edgeslim.core.errors import ConfigError, near

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
KINDS = ("cpu", "gpu", "npu")


@dataclasses.dataclass(frozen=True)
class Device(Config):
    """One target device: peak throughput per precision, memory, power, operator support, with sources.

    Attributes:
        name: profile name (the YAML file's stem).
        description: human-readable description.
        kind: ``cpu``, ``gpu`` or ``npu``.
        measured: True for the host, whose peak/bandwidth/RAM are measured when loaded.
        peak_gops: peak ops per second (1 MAC = 2 ops) in GOPS per precision (``fp32``/``fp16``/``int8``).
        mem_bandwidth_gbs: DRAM bandwidth, GB/s.
        ram_mb: memory available to the model, MB.
        tdp_w: thermal design power, W.
        process_nm: silicon process node, nm (scales the energy estimate; a stated assumption).
        precisions: precisions the device computes in.
        operators: ``"all"`` or the ONNX op types the device's accelerator runs.
        fallback: where unsupported ops run.
        efficiency: fraction of the roofline reached; None = use the host-calibrated value.
        sources: where each number comes from (URL / datasheet / "assumption").
    """

    # not registered in CONFIGS (a Device has no meaningful default); loaded by :func:`load_profile` instead
    kind: ClassVar[str] = "config"

    name: str = ""
    description: str = ""
    kind_: str = dataclasses.field(default="cpu", metadata={"yaml": "kind"})
    measured: bool = False
    peak_gops: dict = dataclasses.field(default_factory=dict)
    mem_bandwidth_gbs: float = 0.0
    ram_mb: float = 0.0
    tdp_w: float = 0.0
    process_nm: float = 45.0
    precisions: tuple[str, ...] = ()
    operators: Any = "all"
    fallback: str = ""
    efficiency: float | None = None
    sources: dict = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        if not self.name:
            raise self._bad("name", "give the device a name")
        if self.kind_ not in KINDS:
            raise self._bad("kind_", f"valid: {', '.join(KINDS)}")
        bad = [p for p in self.precisions if p not in PRECISIONS]
        if not self.precisions or bad:
            raise self._bad("precisions", f"a non-empty list of {', '.join(PRECISIONS)}")
        if not isinstance(self.peak_gops, dict) or not self.peak_gops:
            raise self._bad("peak_gops", "a mapping precision -> GOPS > 0")
        for p, v in self.peak_gops.items():
            if p not in PRECISIONS or not isinstance(v, (int, float)) or v <= 0:
                raise self._bad("peak_gops", f"keys in {', '.join(PRECISIONS)} and values > 0")
        for f in ("mem_bandwidth_gbs", "ram_mb", "tdp_w", "process_nm"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or v <= 0:
                raise self._bad(f, "a number > 0")
        if self.efficiency is not None and not 0 < self.efficiency <= 1:
            raise self._bad("efficiency", "null or a fraction in (0, 1]")
        if not (self.operators == "all" or (isinstance(self.operators, tuple) and self.operators)):
            raise self._bad("operators", "'all' or a non-empty list of ONNX op types")
        if not self.sources:
            raise self._bad("sources", "a mapping field -> public source (URL/datasheet) or 'assumption'")

    def supports(self, op_type: str) -> bool:
        """Whether the device's accelerator runs ONNX op ``op_type``."""
        return self.operators == "all" or op_type in self.operators

    def peak(self, precision: str) -> float:
        """Peak ops/s for ``precision``; a precision the device lacks uses its best available one (fp32 → fp16)."""
        for p in (precision, "fp16" if precision == "fp32" else "fp32", "int8", "fp16"):
            if p in self.peak_gops:
                return float(self.peak_gops[p]) * 1e9
        raise ConfigError(f"device {self.name!r} has no peak_gops")  # unreachable after validate()


REQUIRED = (
    "name",
    "description",
    "kind",
    "peak_gops",
    "mem_bandwidth_gbs",
    "ram_mb",
    "tdp_w",
    "process_nm",
    "precisions",
    "operators",
    "fallback",
    "sources",
)


def _profiles_dir() -> Path:
    return Path(str(resources.files("edgeslim.devices") / "profiles"))


def device_names() -> list[str]:
    """Names of the shipped device profiles."""
    return sorted(p.stem for p in _profiles_dir().glob("*.yaml"))


def load_profile(path: str | os.PathLike) -> Device:
    """Load and validate one profile YAML; a missing field raises :class:`ConfigError` naming file and field."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"device profile {str(path)!r} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if isinstance(data, dict) and list(data) == ["device"]:
        data = data["device"] or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping under 'device:'")
    for f in REQUIRED:
        if f not in data:
            raise ConfigError(f"{path}: device profile is missing field {f!r}; required: {', '.join(REQUIRED)}")
    data = dict(data)
    data["kind_"] = data.pop("kind")
    if isinstance(data.get("operators"), list):
        data["operators"] = tuple(data["operators"])
    try:
        dev = Device.from_dict(data, source=str(path))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return _measure_host(dev) if dev.measured else dev


@functools.cache
def get_device(name: str) -> Device:
    """The shipped profile ``name`` (host figures measured on first use). Unknown names list the valid ones."""
    if isinstance(name, Device):
        return name
    names = device_names()
    if name not in names:
        raise ConfigError(f"unknown device {name!r}{near(str(name), names)}; valid: {', '.join(names)}")
    return load_profile(_profiles_dir() / f"{name}.yaml")


def _measure_host(dev: Device) -> Device:
    """Replace the host's peak FP32 GOPS, bandwidth and RAM with figures measured now (single thread)."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(1)  # single-thread peak: predictions are for 1-thread runs
    try:
        a = torch.randn(512, 512)
        for _ in range(3):
            a @ a
        t = []
        for _ in range(10):
            t0 = time.perf_counter()
            a @ a
            t.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(prev)
    fp32 = 2 * 512**3 / min(t) / 1e9
    big = np.ones(16 * 2**20, dtype=np.float32)
    out = np.empty_like(big)
    np.copyto(out, big)
    t = []
    for _ in range(3):
        t0 = time.perf_counter()
        np.copyto(out, big)
        t.append(time.perf_counter() - t0)
    bw = 2 * big.nbytes / min(t) / 1e9  # read + write
    ram = dev.ram_mb
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) / 1024
    except OSError:
        log.info("cannot read /proc/meminfo; host RAM left at %s MB", ram)
    log.info("host measured: %.1f GFLOPS fp32 (torch 1-thread matmul), %.1f GB/s copy, %.0f MB RAM", fp32, bw, ram)
    return dev.replace(peak_gops={"fp32": fp32, "int8": 2 * fp32}, mem_bandwidth_gbs=bw, ram_mb=ram)

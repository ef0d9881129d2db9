"""Figures predicted for a device profile, added to a host measurement of the same ONNX artifact."""

from __future__ import annotations

from typing import Any

from edgeslim.core.artifact import Artifact
from edgeslim.core.errors import ConfigError
from edgeslim.core.metrics import Metrics
from edgeslim.devices._cost import graph_cost
from edgeslim.devices._energy import estimate_energy, memory_fit
from edgeslim.devices._preflight import preflight
from edgeslim.devices._profile import Device, get_device
from edgeslim.devices._roofline import calibrate, predict_latency

HOST_FIGURE = "latency_p50_ms@t1b1"


def add_device_predictions(metrics: Metrics, artifact: Any, device: str | Device) -> Metrics:
    """Add "predicted for D" latency, energy, memory-fit and operator pre-flight figures to ``metrics``.

    The roofline is calibrated on this model's own host latency (``latency_p50_ms@t1b1`` measured on
    onnxruntime), then transferred to the device profile.

    Args:
        metrics: what :func:`edgeslim.runtime.measure` returned for ``artifact`` on onnxruntime, with 1 thread
            and batch 1 among its settings.
        artifact: the ``onnx`` :class:`Artifact` that was measured.
        device: a device profile name (see :func:`edgeslim.devices.device_names`) or a :class:`Device`.

    Returns:
        ``metrics``, with ``predicted_latency_ms@D``, ``estimated_energy_mj@D``, ``memory_required_mb@D`` and
        ``fully_runs@D`` added.

    Raises:
        ConfigError: not an ONNX artifact, or no host onnxruntime figure at 1 thread, batch 1 to calibrate on.
    """
    dev = device if isinstance(device, Device) else get_device(device)
    if not isinstance(artifact, Artifact) or artifact.format != "onnx":
        raise ConfigError(
            f"predictions for {dev.name} are made from an ONNX graph: measure an .onnx artifact "
            "(export it first), not a torch model or another format"
        )
    host_ms = metrics.figures.get(HOST_FIGURE)
    if host_ms is None or metrics.context.get("runtime") != "onnxruntime":
        raise ConfigError(
            f"predictions for {dev.name} need a host onnxruntime measurement at 1 thread, batch 1 "
            "(CLI: include 1 in --threads and --batch) to calibrate the prediction"
        )
    cal = calibrate([("host", graph_cost(artifact, as_run_by="onnxruntime"), host_ms.value)], "host")
    lat = predict_latency(artifact, dev, cal)
    en, fit, pf = estimate_energy(artifact, dev), memory_fit(artifact, dev), preflight(artifact, dev)
    src = f"predicted for {dev.name}: roofline calibrated on this model's host latency (t1 b1)"
    metrics.add(
        f"predicted_latency_ms@{dev.name}",
        lat["latency_ms"],
        "ms",
        src,
        f"host calibration error {cal.median_abs_error_pct:.1f}% (in-sample, 1 sample, fit pulled toward the "
        "default roofline; benchmarks/hw_predict.py reports leave-one-model-out error)",
    )
    metrics.add(
        f"estimated_energy_mj@{dev.name}", en["energy_mj"], "mJ", en["label"], f"{en['source']}; {en['assumption']}"
    )
    metrics.add(
        f"memory_required_mb@{dev.name}",
        fit["required_mb"],
        "MB",
        f"weights + peak activations vs {dev.ram_mb:.0f} MB",
        "fits" if fit["fits"] else f"DOES NOT FIT in {dev.ram_mb:.0f} MB",
    )
    metrics.add(f"fully_runs@{dev.name}", float(pf.fully_runs), "bool", "operator pre-flight", str(pf))
    return metrics

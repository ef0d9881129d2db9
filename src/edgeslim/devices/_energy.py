"""Energy per inference (estimated from the graph's cost, Horowitz 2014; or measured with RAPL) and whether a model
fits a device's memory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgeslim.devices._cost import GraphCost, graph_cost
from edgeslim.devices._profile import Device, get_device

# Horowitz, "Computing's energy problem (and what we can do about it)", ISSCC 2014, 45 nm, 0.9 V (pJ):
# int8 mult 0.2, int32 add 0.1, fp16 mult 1.1 + add 0.4, fp32 mult 3.7 + add 0.9; DRAM 64-bit access 1.3-2.6 nJ
# (we use 640 pJ per 32-bit word = 160 pJ/byte as in the paper's summary table).
HOROWITZ_PJ_PER_MAC = {"int8": 0.2 + 0.1, "fp16": 1.1 + 0.4, "fp32": 3.7 + 0.9}
HOROWITZ_PJ_PER_DRAM_BYTE = 640.0 / 4
HOROWITZ_SOURCE = (
    "M. Horowitz, 'Computing's energy problem (and what we can do about it)', ISSCC 2014, "
    "doi:10.1109/ISSCC.2014.6757323 (45 nm)"
)
ENERGY_ASSUMPTION = (
    "compute energy scaled linearly from 45 nm to the device's process node (assumption); DRAM "
    "energy per byte not scaled (off-chip I/O); peripheral/static power ignored"
)


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
    return {
        "energy_mj": (compute_pj + dram_pj) * 1e-9,
        "compute_mj": compute_pj * 1e-9,
        "dram_mj": dram_pj * 1e-9,
        "label": f"estimated for {dev.name}",
        "source": HOROWITZ_SOURCE,
        "assumption": ENERGY_ASSUMPTION,
    }


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
    return {
        "weights_mb": cost.weight_bytes / 2**20,
        "peak_activation_mb": cost.peak_activation_bytes / 2**20,
        "required_mb": need_mb,
        "ram_mb": dev.ram_mb,
        "fits": need_mb <= dev.ram_mb,
        "device": dev.name,
    }

"""Pre-flight: which of a model's ONNX ops a device's accelerator cannot run, and what happens to them."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

from edgeslim.devices._cost import graph_cost
from edgeslim.devices._profile import Device, get_device


@dataclasses.dataclass(frozen=True)
class Preflight:
    """Which of the model's ops the device's accelerator cannot run."""

    device: str
    unsupported: dict  # op type -> count
    reasons: tuple[str, ...]
    fallback: str

    @property
    def fully_runs(self) -> bool:
        return not self.unsupported and not self.reasons

    def __str__(self) -> str:
        if self.fully_runs:
            return f"{self.device}: fully runs: yes"
        ops = ", ".join(f"{k} x{v}" for k, v in sorted(self.unsupported.items()))
        why = "; ".join(self.reasons)
        return (
            f"{self.device}: fully runs: no; unsupported: {ops or '-'}"
            f"{'; ' + why if why else ''}; fallback: {self.fallback}"
        )


def preflight(artifact: Any, device: str | Device) -> Preflight:
    """List the ONNX ops of ``artifact`` that ``device`` does not support, and whether it fully runs there.

    An INT8-only device also needs every compute node quantized: float compute nodes are listed as unsupported.
    """
    dev = get_device(device) if isinstance(device, str) else device
    cost = graph_cost(artifact)
    bad = Counter(
        op
        for op, k in cost.op_counts.items()
        for _ in range(k)
        if not dev.supports(op) and op not in ("Constant", "Shape", "Identity")
    )
    reasons = []
    if "fp32" not in dev.precisions and "fp16" not in dev.precisions:
        flt = Counter(n.op_type for n in cost.nodes if n.precision == "fp32" and n.macs)
        if flt:
            reasons.append(
                f"{dev.name} runs {'/'.join(dev.precisions)} only: {sum(flt.values())} float compute "
                f"node(s) ({', '.join(sorted(flt))}) need full-integer quantization"
            )
            for op, k in flt.items():
                bad[op] += k
    return Preflight(dev.name, dict(bad), tuple(reasons), dev.fallback)

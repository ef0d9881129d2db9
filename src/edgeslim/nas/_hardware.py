"""The latency table carried to a device we don't have: each layer's host figure scaled by the two rooflines.

A layer's host latency is multiplied by ``roofline(device) / roofline(host)`` where ``roofline = max(2 * MACs /
peak FP32 ops, bytes moved / memory bandwidth)``, both nominal (the host's are measured when its profile loads).
So a compute-bound pointwise conv scales with the peak ratio and a memory-bound depthwise conv with the bandwidth
ratio: the layers' *shares* of the latency differ between host and device, and so do the widths a search keeps.
The per-graph offset ``b`` is scaled by the host/device peak ratio (an ASSUMPTION, as in ``edgeslim.devices``:
dispatch speed follows core speed). Every figure for a profile is "predicted for D".
"""

from __future__ import annotations

from typing import Any

from edgeslim.nas._layers import LayerOp


def roofline_ms(op: LayerOp, cin: int, cout: int, device: Any) -> float:
    """The nominal roofline time (ms) of one layer on ``device`` (an ``edgeslim.devices.Device``), FP32."""
    macs = op.macs(cin, cout)
    oh, ow = op.out_size()
    per = 1 if op.depthwise else cin // max(op.groups, 1)
    weights = cout * per * op.kernel[0] * op.kernel[1] + cout
    moved = 4 * (cin * op.height * op.width + cout * oh * ow + weights)
    return max(2 * macs / device.peak("fp32"), moved / (device.mem_bandwidth_gbs * 1e9)) * 1e3


def device_ratio(op: LayerOp, cin: int, cout: int, host: Any, device: Any) -> float:
    """How much slower (> 1) or faster one layer runs on ``device`` than on ``host``, by their rooflines."""
    h = roofline_ms(op, cin, cout, host)
    return roofline_ms(op, cin, cout, device) / h if h > 0 else 1.0


def overhead_ratio(host: Any, device: Any) -> float:
    return host.peak("fp32") / device.peak("fp32")


def latency_shares(
    predictor: Any, devices: tuple[str, ...] = ("host", "raspberry-pi-4"), assign: dict[str, int] | None = None
) -> dict[str, Any]:
    """Each layer's share (%) of the summed layer latency, on the host (its table, measured) and on each profile
    (scaled, predicted), at the widths ``assign`` (default: the full model).

    Returns:
        ``{"devices": {name: {"label", "sum_ms", "shares": {layer: pct}}}, "layers": [{"name", "op", <name>_pct
        ...}], "most_different": [layers whose share moves most between the first two devices]}``.
    """
    from edgeslim.devices import get_device

    host = get_device("host")
    base = predictor.with_device(None).layer_ms(assign)
    out: dict[str, Any] = {"devices": {}}
    for name in devices:
        if name == "host":
            ms, label = base, f"measured on this host ({predictor.table.describe()})"
        else:
            dev = get_device(name)
            ms = {}
            for layer in predictor.space.layers:
                cin, cout = layer.widths(dict(assign or {}))
                ms[layer.name] = base[layer.name] * device_ratio(layer.op, cin, cout, host, dev)
            label = f"predicted for {name}"
        total = sum(ms.values())
        out["devices"][name] = {"label": label, "sum_ms": total, "shares": {k: v / total * 100 for k, v in ms.items()}}
    rows = []
    for layer in predictor.space.layers:
        kind = (
            "depthwise"
            if layer.op.depthwise
            else ("pointwise" if layer.op.op == "conv" and layer.op.kernel == (1, 1) else layer.op.op)
        )
        row = {"name": layer.name, "op": kind}
        for name in devices:
            row[f"{name}_pct"] = out["devices"][name]["shares"][layer.name]
        rows.append(row)
    out["layers"] = rows
    if len(devices) >= 2:
        a, b = f"{devices[0]}_pct", f"{devices[1]}_pct"
        out["most_different"] = sorted(rows, key=lambda r: -abs(r[a] - r[b]))[:5]
        by_kind: dict[str, list[float]] = {}
        for r in rows:
            by_kind.setdefault(r["op"], [0.0, 0.0])
            by_kind[r["op"]][0] += r[a]
            by_kind[r["op"]][1] += r[b]
        out["share_by_op"] = {k: {devices[0]: v[0], devices[1]: v[1]} for k, v in by_kind.items()}
    return out

"""Host latency-prediction error: per-op-class roofline calibrated on host, leave-one-MODEL-out, vs measured ORT.

Calibration/evaluation set: the zoo models small_cnn / mobilenet_v2 / resnet18 (Fashion-MNIST checkpoints, the
target's set), the same zoo architectures at another input size, and torchvision models at small input
(weights=None), each FP32 and INT8 (es.quantize PTQ, 128 real Fashion-MNIST calibration images resized/replicated
to the input shape -> es.export ONNX QDQ). Latency: ONNX Runtime, 1 thread, batch 1, a real image as input,
interleaved rounds in shuffled order, median of per-round medians. Each model's prediction uses a calibration fitted
on the OTHER models only (its FP32 and INT8 versions are held out together). Host costs come from the graph ONNX
Runtime executes (``graph_cost(..., as_run_by="onnxruntime")``: fused kernels, unfused Q/DQ nodes costed); device
predictions from the exported graph. A table of variants shows how the error depends on the prior weight (and on a
nested leave-one-model-out choice of it) and what costing the exported graph instead would give. Also prints the predicted latency and
Horowitz energy for every device profile, and whether RAPL is readable. Writes benchmarks/results/hw_predict.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np

from edgeslim.core.io import write_json
from edgeslim.devices import (
    DEFAULT_CALIBRATION,
    calibrate,
    device_names,
    estimate_energy,
    get_device,
    graph_cost,
    measure_energy,
    memory_fit,
    predict_latency,
    preflight,
)

HERE = Path(__file__).resolve().parent
GRID = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)  # prior weights of the sensitivity table and the nested choice
log = logging.getLogger("hw_predict")
TORCHVISION = {
    "mobilenet_v3_small": 96,
    "resnet34": 64,
    "squeezenet1_1": 96,
    "mnasnet0_5": 96,
    "efficientnet_b0": 64,
    "shufflenet_v2_x0_5": 96,
    "resnet18": 96,
    "mobilenet_v2": 96,
}


def _specs(smoke: bool) -> list:
    import torchvision

    import edgeslim as es
    from edgeslim.models import _zoo

    specs = [
        (n, "zoo", lambda n=n: es.models.load(n, "fashion-mnist"), 1, 28)
        for n in (["small_cnn"] if smoke else ["small_cnn", "mobilenet_v2", "resnet18"])
    ]
    if smoke:
        return specs + [("zoo_small_cnn@56", "zoo-arch", lambda: _zoo._small_cnn(1, 10, 56), 1, 56)]
    specs += [
        ("zoo_mobilenet_v2@64", "zoo-arch", lambda: _zoo._mobilenet_v2(3, 10, 64), 3, 64),
        ("zoo_resnet18@64", "zoo-arch", lambda: _zoo._resnet18(3, 10, 64), 3, 64),
        ("zoo_small_cnn@56", "zoo-arch", lambda: _zoo._small_cnn(1, 10, 56), 1, 56),
    ]
    specs += [
        (f"tv_{n}@{s}", "torchvision", lambda n=n: getattr(torchvision.models, n)(weights=None, num_classes=10), 3, s)
        for n, s in TORCHVISION.items()
    ]
    return specs


def _images(shape: list, base) -> np.ndarray:
    import torch.nn.functional as F

    x = (
        base
        if shape[-1] == base.shape[-1]
        else F.interpolate(base, size=tuple(shape[2:]), mode="bilinear", align_corners=False)
    )
    return (x.repeat(1, shape[1], 1, 1) if shape[1] != x.shape[1] else x).contiguous()


def collect(work: Path, smoke: bool) -> dict:
    """Export FP32 + INT8 ONNX for every spec into ``work``; returns label -> meta (a failure is recorded)."""
    import torch

    import edgeslim as es

    train, _ = es.data.load("fashion-mnist")
    base = train.take(256, seed=1).normalized()
    qcfg = es.QuantConfig(per_channel=False, equalize=True, bias_correction=True, num_samples=128)
    meta, failed = {}, {}
    for label, kind, fn, c, s in _specs(smoke):
        try:
            torch.manual_seed(0)
            model = fn().eval()
            calib = _images([1, c, s, s], base)
            for prec in ("fp32", "int8"):
                m = model if prec == "fp32" else es.quantize(model, qcfg, calib=calib)
                path = work / f"{label}_{prec}.onnx"
                es.export(m, "onnx", example_inputs=calib[:1], path=path, force=True, validate=False)
                meta[f"{label} {prec}"] = {
                    "model": label,
                    "kind": kind,
                    "precision": prec,
                    "path": str(path),
                    "shape": [1, c, s, s],
                }
        except Exception as e:  # noqa: BLE001 - a model that does not quantize/export is reported, not fatal
            failed[label] = repr(e)[:300]
            log.warning("skipped %s: %s", label, failed[label])
    return {"models": meta, "failed": failed}


def measure(meta: dict, rounds: int, per_round_s: float) -> dict:
    """Interleaved ORT latency (1 thread, batch 1, real image): median of per-round medians, plus the noise."""
    from _harness import ort_session

    import edgeslim as es

    _, val = es.data.load("fashion-mnist")
    img = val.take(1, seed=0).normalized()
    runs = {}
    for k, v in meta.items():
        s = ort_session(v["path"], 1)
        feed = {s.get_inputs()[0].name: _images(v["shape"], img).numpy()}
        runs[k] = lambda s=s, feed=feed: s.run(None, feed)
    res = es.runtime.interleaved_latency(
        runs, rounds=rounds, runs=200, warmup=10, rewarm=0, shuffle=True, max_seconds_per_turn=per_round_s, min_runs=5
    )
    return {
        k: {"median_ms": r["median_of_rounds_ms"], "rounds_ms": r["round_p50_ms"], "iqr_pct": r["round_spread_pct"]}
        for k, r in res.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--per-round-s", type=float, default=0.15)
    ap.add_argument("--smoke", action="store_true", help="small_cnn at two sizes only, 2 rounds")
    ap.add_argument("--work", default=None, help="folder for the exported ONNX files (reused when it has meta.json)")
    ap.add_argument("--out", default=str(HERE / "results" / "hw_predict.json"))
    ap.add_argument("--prior-weight", type=float, default=0.1, help="calibrate()'s pull toward the default roofline")
    ap.add_argument("--host-note", default="", help="what else ran on the host while measuring (goes in the JSON)")
    ap.add_argument(
        "--reuse-measurements",
        action="store_true",
        help="refit/re-report from the latencies cached in --work/measured.json (no new measurement)",
    )
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(a.work or f"/tmp/edgeslim-hw-predict{'-smoke' if a.smoke else ''}")
    work.mkdir(parents=True, exist_ok=True)
    if (work / "meta.json").is_file():
        col = json.loads((work / "meta.json").read_text())
    else:
        col = collect(work, a.smoke)
        (work / "meta.json").write_text(json.dumps(col, indent=1))
    meta = col["models"]
    # host: the graph ONNX Runtime really executes (fused kernels, unfused Q/DQ costed); devices: the exported graph
    hcosts = {k: graph_cost(v["path"], as_run_by="onnxruntime") for k, v in meta.items()}  # fail fast, before timing
    costs = {k: graph_cost(v["path"]) for k, v in meta.items()}
    cache = work / "measured.json"
    if a.reuse_measurements and cache.is_file():
        meas = json.loads(cache.read_text())
        hp = meas.pop("_host")
        log.warning("reusing the latencies measured at %s from %s", meas.pop("_measured_at", "?"), cache)
        host = dataclasses.replace(
            get_device("host"), peak_gops=hp["peak_gops"], mem_bandwidth_gbs=hp["mem_bandwidth_gbs"]
        )
    else:
        meas = measure(meta, 2 if a.smoke else a.rounds, a.per_round_s)
        host = get_device("host")  # peak and bandwidth measured now, beside the latencies
        write_json(
            cache,
            {
                **meas,
                "_measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                "_host": {"peak_gops": host.peak_gops, "mem_bandwidth_gbs": host.mem_bandwidth_gbs},
            },
            force=True,
        )
    samples = [(k, hcosts[k], meas[k]["median_ms"]) for k in meta]
    full = calibrate(samples, host, prior_weight=a.prior_weight)

    def lomo(cost_of: dict, weight: float | None) -> dict[str, float]:
        """Leave-one-MODEL-out predicted ms (FP32 + INT8 of a model held out together); weight None = nested CV."""
        smp = [(k, cost_of[k], meas[k]["median_ms"]) for k in meta]
        out = {}
        for model in sorted({v["model"] for v in meta.values()}):
            train = [x for x in smp if meta[x[0]]["model"] != model]
            w = weight if weight is not None else choose_weight(train)
            cal = calibrate(train, host, prior_weight=w)
            for k in (k for k, v in meta.items() if v["model"] == model):
                out[k] = predict_latency(None, host, cal, cost=cost_of[k])["latency_ms"]
        return out

    def choose_weight(train: list) -> float:
        """Inner leave-one-model-out on the training models only: the prior weight with the lowest median error."""
        scores = []
        for w in GRID:
            e = []
            for model in {meta[x[0]]["model"] for x in train}:
                cal = calibrate([x for x in train if meta[x[0]]["model"] != model], host, prior_weight=w)
                e += [
                    abs(predict_latency(None, host, cal, cost=c)["latency_ms"] - ms) / ms
                    for k, c, ms in train
                    if meta[k]["model"] == model
                ]
            scores.append((float(np.median(e)), w))
        return min(scores)[1]

    def med_err(pred: dict, sel=lambda k: True) -> float:
        e = [abs(pred[k] - meas[k]["median_ms"]) / meas[k]["median_ms"] * 100 for k in meta if sel(k)]
        return float(np.median(e)) if e else float("nan")

    zoo = lambda k: meta[k]["kind"] == "zoo"  # noqa: E731
    pred_main = lomo(hcosts, a.prior_weight)
    variants = {f"executed graph, prior weight {a.prior_weight} (default)": pred_main}
    if not a.smoke:
        for w in GRID:
            if w != a.prior_weight:
                variants[f"executed graph, prior weight {w}"] = lomo(hcosts, w)
        variants["executed graph, prior weight by nested leave-one-model-out"] = lomo(hcosts, None)
        variants[f"exported graph (Q/DQ folded), prior weight {a.prior_weight}"] = lomo(costs, a.prior_weight)
    variants["uncalibrated roofline (default parameters), executed graph"] = {
        k: predict_latency(None, host, DEFAULT_CALIBRATION, cost=hcosts[k])["latency_ms"] for k in meta
    }
    sensitivity = {name: {"all": med_err(p), "zoo (target set)": med_err(p, zoo)} for name, p in variants.items()}
    rows = []
    for k, v in meta.items():
        ms, pred = meas[k]["median_ms"], pred_main[k]
        uncal = variants["uncalibrated roofline (default parameters), executed graph"][k]
        row = {
            "label": k,
            **{f: v[f] for f in ("model", "kind", "precision", "shape")},
            "macs": costs[k].macs,
            "nodes": len(costs[k].nodes),
            "executed_nodes": len(hcosts[k].nodes),
            "measured_ms": ms,
            "measured_iqr_pct": meas[k]["iqr_pct"],
            "predicted_host_ms": pred,
            "error_pct": (pred - ms) / ms * 100,
            "uncalibrated_error_pct": (uncal - ms) / ms * 100,
            "devices": {},
        }
        for d in device_names():
            dev, c = (host, hcosts[k]) if d == "host" else (get_device(d), costs[k])
            row["devices"][d] = {
                "predicted_ms": predict_latency(None, dev, full, cost=c)["latency_ms"],
                "energy_mj": estimate_energy(None, dev, cost=costs[k])["energy_mj"],
                "fits": memory_fit(None, dev, cost=costs[k])["fits"],
                "fully_runs": preflight(v["path"], dev).fully_runs,
            }
        rows.append(row)

    def med(sel) -> float:
        e = [abs(r["error_pct"]) for r in rows if sel(r)]
        return float(np.median(e)) if e else float("nan")

    summary = {
        "all": med(lambda r: True),
        "zoo (target set)": med(lambda r: r["kind"] == "zoo"),
        "fp32": med(lambda r: r["precision"] == "fp32"),
        "int8": med(lambda r: r["precision"] == "int8"),
        "uncalibrated roofline, all": float(np.median([abs(r["uncalibrated_error_pct"]) for r in rows])),
    }
    noise = float(np.median([r["measured_iqr_pct"] for r in rows]))
    rapl = measure_energy(lambda: None, runs=1)
    state = a.host_note or f"load avg {os.getloadavg()[0]:.1f}"
    print(
        f"Host: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs ({state}); ORT 1 thread, batch 1, {a.rounds} interleaved rounds; median round-to-round "
        f"IQR {noise:.1f}%. Host prediction = leave-one-model-out calibration."
    )
    print(f"{'model':<26}{'prec':>5}{'kind':>12}{'MMACs':>8}{'meas ms':>9}{'IQR%':>6}{'pred ms':>9}{'err %':>8}")
    for r in rows:
        print(
            f"{r['model']:<26}{r['precision']:>5}{r['kind']:>12}{r['macs'] / 1e6:>8.1f}{r['measured_ms']:>9.3f}"
            f"{r['measured_iqr_pct']:>6.1f}{r['predicted_host_ms']:>9.3f}{r['error_pct']:>8.1f}"
        )
    print(
        "median |error|, leave-one-model-out: "
        + ", ".join(f"{k} {v:.1f}%" for k, v in summary.items())
        + "  (goal: zoo <= 25%)"
    )
    print("leave-one-model-out median |error| by variant (all / zoo target set):")
    for name, v in sensitivity.items():
        print(f"  {name:<66} {v['all']:5.1f}% / {v['zoo (target set)']:5.1f}%")
    print(
        f"fit on all samples: in-sample median {full.median_abs_error_pct:.1f}%; efficiency "
        + ", ".join(f"{k} {v:.2f}" for k, v in full.efficiency.items() if not k.startswith("fp16"))
        + "; bandwidth factor "
        + ", ".join(f"{k} {v:.2f}" for k, v in full.bandwidth_factor.items() if k != "fp16")
        + "; overhead us/node "
        + ", ".join(f"{k} {v * 1e6:.1f}" for k, v in full.overhead_s.items() if not k.startswith("fp16"))
        + f"; per call {full.call_overhead_s * 1e6:.1f} us"
    )
    if col.get("failed"):
        print(
            "not in the set (failed to quantize/export): "
            + "; ".join(f"{k}: {v[:80]}" for k, v in col["failed"].items())
        )
    devs = device_names()
    print(
        "\nPredicted for D (ms, per-class efficiencies from the host fit x the profile's peaks/bandwidth) / estimated"
        " energy (mJ, Horowitz ISSCC 2014 45 nm scaled to node: assumption); '!' = does not fit in RAM, '*' = not "
        "fully supported (fallback)"
    )
    print(f"{'model':<31}" + "".join(f"{d[:17]:>19}" for d in devs))
    for r in rows:
        cells = [
            f"{v['predicted_ms']:.3g}/{v['energy_mj']:.3g}{'' if v['fits'] else '!'}{'' if v['fully_runs'] else '*'}"
            for v in (r["devices"][d] for d in devs)
        ]
        print(f"{r['label']:<31}" + "".join(f"{c:>19}" for c in cells))
    print(f"\nRAPL: {rapl['label']}")
    out = {
        "rows": rows,
        "median_abs_error_pct_lomo": summary,
        "variants_median_abs_error_pct_lomo": sensitivity,
        "prior_weight": a.prior_weight,
        "failed": col.get("failed", {}),
        "calibration_all": full.to_dict(),
        "host": {
            "cpus": os.cpu_count(),
            "peak_gops": host.peak_gops,
            "mem_bandwidth_gbs": host.mem_bandwidth_gbs,
            "load_avg_1min": os.getloadavg()[0],
            "median_round_iqr_pct": noise,
            "note": a.host_note or "not stated",
        },
        "rapl": rapl["label"],
        "labels": {
            "host": "measured (ORT) and predicted (leave-one-model-out calibration)",
            "others": "predicted for D",
            "energy": "estimated (Horowitz 2014, 45 nm, node scaling assumed)",
        },
        "transfer": {
            "transfers": "per-class efficiencies (fraction of peak) and bandwidth factors, scaled by each "
            "profile's peak_gops / mem_bandwidth_gbs (profiles with a fixed efficiency use it)",
            "host_specific": "per-node and per-call overheads; scaled by host/device fp32 peak on CPUs, "
            "unscaled on accelerators (assumptions)",
        },
        "smoke": a.smoke,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(a.out, out, force=True)


if __name__ == "__main__":
    main()

"""Host latency-prediction error (leave-one-out calibrated roofline vs measured ORT) and energy per device profile.

Zoo models small_cnn / mobilenet_v2 / resnet18 (Fashion-MNIST checkpoints) and their INT8 versions
(QuantConfig(per_channel=False, equalize=True, bias_correction=True), 512 calibration train images), exported to
ONNX and measured on ONNX Runtime, 1 thread, batch 1, interleaved (round-robin) so all rows share the same host
load. Each model's host prediction uses a calibration fitted on the OTHER five models only (leave-one-out).
Prints a table and writes benchmarks/results/hw_predict.json.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

import edgeslim as es
from edgeslim.core.io import write_json
from edgeslim.devices import (calibrate, device_names, estimate_energy, get_device, graph_cost, measure_energy,
                              memory_fit, predict_latency, preflight)
from edgeslim.runtime import load

HERE = Path(__file__).resolve().parent
log = logging.getLogger("hw_predict")


def interleaved_latency(runners: dict, x: np.ndarray, rounds: int, runs: int) -> dict[str, float]:
    for r in runners.values():
        for _ in range(10):
            r.run(x)
    per: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for k, r in runners.items():
            ts = []
            for _ in range(runs):
                t0 = time.perf_counter_ns()
                r.run(x)
                ts.append(time.perf_counter_ns() - t0)
            per[k].append(float(np.median(ts)) / 1e6)
    return {k: float(np.median(v)) for k, v in per.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="small_cnn,mobilenet_v2,resnet18")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--smoke", action="store_true", help="small_cnn only, few runs")
    ap.add_argument("--out", default=str(HERE / "results" / "hw_predict.json"))
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    models = ["small_cnn"] if a.smoke else a.models.split(",")
    rounds, runs = (1, 10) if a.smoke else (a.rounds, a.runs)
    train, val = es.data.load("fashion-mnist")
    work = Path(tempfile.mkdtemp(prefix="edgeslim-hw-"))
    arts = {}
    qcfg = es.QuantConfig(per_channel=False, equalize=True, bias_correction=True, num_samples=512)
    for name in models:
        model = es.models.load(name, "fashion-mnist")
        arts[f"{name} fp32"] = es.export(model, "onnx", example_inputs=val, path=work / f"{name}_fp32.onnx")
        q = es.quantize(model, qcfg, calib=train)
        arts[f"{name} int8"] = es.export(q, "onnx", example_inputs=val, path=work / f"{name}_int8.onnx")
        log.warning("exported %s", name)
    x = val.take(1, seed=0).normalized().numpy()
    runners = {k: load(v, "onnxruntime", threads=1) for k, v in arts.items()}
    measured = interleaved_latency(runners, x, rounds, runs)
    samples = [(k, arts[k], measured[k]) for k in arts]
    host = get_device("host")
    rows = []
    for k, art, ms in samples:
        others = [s for s in samples if s[0] != k]
        cal = calibrate(others, host) if others else calibrate(samples, host)
        pred = predict_latency(art, host, cal)["latency_ms"]
        cost = graph_cost(art)
        rapl = measure_energy(lambda r=runners[k]: r.run(x), runs=runs)
        row = {"model": k, "macs": cost.macs, "measured_ms": ms, "predicted_host_ms": pred,
               "error_pct": (pred - ms) / ms * 100, "loo": bool(others),
               "rapl_mj": rapl["energy_mj"], "rapl_label": rapl["label"], "devices": {}}
        full = calibrate(samples, host)
        for d in device_names():
            dev = host if d == "host" else get_device(d)
            row["devices"][d] = {
                "predicted_ms": predict_latency(art, dev, full, cost=cost)["latency_ms"],
                "energy_mj": estimate_energy(art, dev, cost=cost)["energy_mj"],
                "fits": memory_fit(art, dev, cost=cost)["fits"],
                "fully_runs": preflight(art, dev).fully_runs}
        rows.append(row)
    errs = [abs(r["error_pct"]) for r in rows]
    full = calibrate(samples, host)
    devs = device_names()
    print(f"Host: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; latency measured on a shared, "
          "loaded 2-core host (ORT 1 thread, batch 1, interleaved); host prediction = leave-one-out calibration")
    print(f"{'model':<20}{'MACs':>12}{'meas ms':>10}{'pred ms':>10}{'err %':>8}")
    for r in rows:
        print(f"{r['model']:<20}{r['macs']:>12,}{r['measured_ms']:>10.3f}{r['predicted_host_ms']:>10.3f}"
              f"{r['error_pct']:>8.1f}")
    print(f"median |error| (leave-one-out) = {np.median(errs):.1f}%   (goal <= 25%); in-sample fit median "
          f"{full.median_abs_error_pct:.1f}%; calibrated efficiency {full.efficiency}, overhead "
          f"{full.overhead_s * 1e6:.1f} us/node")
    print("\nPredicted latency (ms) / estimated energy (mJ, Horowitz ISSCC 2014 45 nm scaled to node: assumption);"
          " '!' = does not fit in RAM, '*' = not fully supported (fallback)")
    print(f"{'model':<20}" + "".join(f"{d[:17]:>19}" for d in devs))
    for r in rows:
        cells = []
        for d in devs:
            v = r["devices"][d]
            cells.append(f"{v['predicted_ms']:.3g}/{v['energy_mj']:.3g}{'' if v['fits'] else '!'}"
                         f"{'' if v['fully_runs'] else '*'}")
        print(f"{r['model']:<20}" + "".join(f"{c:>19}" for c in cells))
    print(f"\nRAPL: {rows[0]['rapl_label']}")
    out = {"rows": rows, "median_abs_error_pct_loo": float(np.median(errs)),
           "calibration_all": {"efficiency": full.efficiency, "overhead_s": full.overhead_s,
                               "in_sample_error_pct": full.error_pct},
           "host": {"cpus": os.cpu_count(), "peak_gops": host.peak_gops, "mem_bandwidth_gbs": host.mem_bandwidth_gbs,
                    "note": "shared, loaded 2-core host"},
           "labels": {"host": "measured (ORT) and predicted (leave-one-out)", "others": "predicted for D",
                      "energy": "estimated (Horowitz 2014, 45 nm, node scaling assumed)"},
           "smoke": a.smoke}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(a.out, out, force=True)


if __name__ == "__main__":
    main()

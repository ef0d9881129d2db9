"""Benchmark: AdaRound vs round-to-nearest, MobileNetV2 on Fashion-MNIST, W4A8 and W8A8 per-channel.

Every row uses the same 512 class-balanced calibration samples (activation ranges: MSE) and is scored on the
full 10k validation split in ONNX Runtime (the exported INT8 QDQ file; 4-bit weights in int8 containers).
RTN and AdaRound rows share the weight scales (minmax or per-channel MSE grid search), so the only difference
is the rounding. AdaRound: sequential per-layer reconstruction on quantized inputs against the float model's
outputs, rectified sigmoid, regulariser off for the first 20% of iterations, beta 20 -> 2.
Rows are cached in the results file as they finish, so a killed run resumes (--fresh to start over).
AdaRound rows also record, per layer, the reconstruction loss at the start, end of warm-up and end of the
optimisation, the full-data error of learned vs nearest rounding, and the share of weights rounded away from
nearest; and every row checks that the exported file predicts what the torch model predicts (so the learned
rounding is what ONNX Runtime runs).

    python benchmarks/quantize_adaround.py [--iterations 1000] [--ada-samples 256] [--fresh]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from _harness import ort_session

import edgeslim as es
from edgeslim.core.io import write_json
from edgeslim.core.metrics import host_info

HERE = Path(__file__).parent


def ort_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    s = ort_session(path, 2)
    name = s.get_inputs()[0].name
    pred = np.concatenate([s.run(None, {name: x[i : i + 500]})[0].argmax(1) for i in range(0, len(x), 500)])
    return float((pred == y).mean())


class _Collect(logging.Handler):
    """Keeps the per-layer records that edgeslim.quantize._adaround logs at DEBUG."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.layers: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        if hasattr(record, "adaround"):
            self.layers.append(record.adaround)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--ada-samples", type=int, default=256)
    ap.add_argument("--rows", default="w4-rtn-minmax,w4-ada-minmax,w4-rtn-mse,w4-ada-mse,w8-rtn,w8-ada")
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results" / "quantize_adaround.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    out = Path(args.out)
    prev = {} if args.fresh or not out.exists() else json.loads(out.read_text())
    done, notes = prev.get("rows", {}), prev.get("notes", {})  # notes: hand-written status of rows not yet run

    train, val = es.data.load("fashion-mnist")
    xv, yv = val.normalized().numpy(), val.labels.numpy()
    model = es.models.load("mobilenet_v2", dataset="fashion-mnist", pretrained=True)
    base = es.QuantConfig(num_samples=512, adaround_iterations=args.iterations, adaround_samples=args.ada_samples)
    configs = {
        "w4-rtn-mse": base.replace(weight_bits=4, weight_range="mse"),
        "w4-ada-mse": base.replace(weight_bits=4, weight_range="mse", adaround=True),
        "w4-rtn-minmax": base.replace(weight_bits=4),
        "w4-ada-minmax": base.replace(weight_bits=4, adaround=True),
        "w8-rtn": base,
        "w8-ada": base.replace(adaround=True),
    }
    collect = _Collect()
    ada_log = logging.getLogger("edgeslim.quantize._adaround")
    ada_log.setLevel(logging.DEBUG)
    ada_log.addHandler(collect)
    ada_log.propagate = False
    n_check = 2000
    work = Path(tempfile.mkdtemp(prefix="edgeslim-ada-"))
    if "fp32" not in done:
        art = es.export(model, "onnx", example_inputs=val, path=work / "fp32.onnx")
        done["fp32"] = {"accuracy": ort_accuracy(art.path, xv, yv), "seconds": 0.0}
    for key in args.rows.split(","):
        if key in done:
            continue
        cfg = configs[key]
        collect.layers = []
        t0 = time.perf_counter()
        q = es.quantize(model, cfg, calib=train)
        secs = time.perf_counter() - t0
        art = es.export(q, "onnx", example_inputs=val, path=work / f"{key}.onnx")
        with torch.inference_mode():
            tq = torch.cat([q(torch.from_numpy(xv[i : i + 500])).argmax(1) for i in range(0, n_check, 500)]).numpy()
        s = ort_session(art.path, 2)
        oq = s.run(None, {s.get_inputs()[0].name: xv[:n_check]})[0].argmax(1)
        done[key] = {
            "accuracy": ort_accuracy(art.path, xv, yv),
            "seconds": secs,
            "config": cfg.to_dict(),
            "adarounded_layers": len(q.report.corrections.get("adarounded_layers", [])),
            "layers": len(q.report.quantized_layers),
            "export_check": {
                "samples": n_check,
                "torch_fakequant_top1": float((tq == yv[:n_check]).mean()),
                "ort_top1": float((oq == yv[:n_check]).mean()),
                "prediction_agreement": float((tq == oq).mean()),
            },
        }
        if collect.layers:
            done[key]["per_layer"] = collect.layers
            ls = collect.layers
            done[key]["summary"] = {
                "layers_loss_decreased": sum(r["loss_curve"][-1] < r["loss_curve"][0] for r in ls),
                "layers_learned_better_than_nearest": sum(r["learned"] < r["nearest"] for r in ls),
                "mean_flipped": float(np.mean([r["flipped"] for r in ls])),
                "sum_err_nearest": float(sum(r["nearest"] for r in ls)),
                "sum_err_learned": float(sum(r["learned"] for r in ls)),
            }
        print(
            f"{key:14s} top-1 {done[key]['accuracy'] * 100:6.2f}  ({secs:.0f} s)  {done[key].get('summary', '')}",
            flush=True,
        )
        write_json(
            out,
            {
                "benchmark": "quantize_adaround",
                "rows": done,
                "iterations": args.iterations,
                "ada_samples": args.ada_samples,
                "validation_samples": len(yv),
                "evaluated_in": "onnxruntime",
                "notes": notes,
                "host": host_info(),
                "torch": torch.__version__,
                "onnxruntime": ort.__version__,
            },
            force=True,
        )
    fp = done["fp32"]["accuracy"]
    print(f"\nMobileNetV2 Fashion-MNIST, top-1 on {len(yv)} val in ONNX Runtime (FP32 {fp * 100:.2f})")
    for k, r in done.items():
        print(f"  {k:14s} {r['accuracy'] * 100:6.2f}  drop {(fp - r['accuracy']) * 100:5.2f} pt")
    for w in ("mse", "minmax"):
        a, b = done.get(f"w4-ada-{w}"), done.get(f"w4-rtn-{w}")
        if a and b:
            print(f"  W4A8 AdaRound gain over RTN ({w} scales): {(a['accuracy'] - b['accuracy']) * 100:+.2f} pt")


if __name__ == "__main__":
    main()

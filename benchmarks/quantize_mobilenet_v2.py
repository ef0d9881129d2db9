"""Benchmark: INT8 post-training quantization of MobileNetV2 on Fashion-MNIST, edgeslim vs the anchors.

Rows, all from the same FP32 ONNX file and the same 512 class-balanced calibration samples:
  - FP32 (torch eager) and FP32 (ONNX Runtime)
  - edgeslim PTQ with each calibration method (the default is marked)
  - ONNX Runtime quantize_static with its defaults, and with the settings its docs recommend for x86
    (quant_pre_process, U8 activations, per-channel S8 weights)
  - NNCF nncf.quantize (when nncf is installed: pip install nncf)
Accuracy is top-1 on the full 10k validation split, run in ONNX Runtime. Latency is the median over
interleaved rounds of per-round medians, batch 1, at 1 and 2 threads, on this host.

    python benchmarks/quantize_mobilenet_v2.py [--rounds 3] [--runs 300] [--eval-samples N]

Prints a table and writes benchmarks/results/quantize_mobilenet_v2.json. Not a test: numbers vary run to run.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
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
from edgeslim.data import calibration_subset

HERE = Path(__file__).parent


def ort_runners(paths: dict[str, Path]) -> dict:
    """For :func:`latencies`: per file, ``make(threads) -> Runner`` (edgeslim's ONNX Runtime runner of that file)."""
    return {k: (lambda threads, p=p: es.runtime.load(p, "onnxruntime", threads=threads)) for k, p in paths.items()}


def ort_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    s = ort_session(path, 2)
    name = s.get_inputs()[0].name
    pred = np.concatenate([s.run(None, {name: x[i : i + 500]})[0].argmax(1) for i in range(0, len(x), 500)])
    return float((pred == y).mean())


def latencies(runners: dict, x1: np.ndarray, threads: int, rounds: int, runs: int) -> dict[str, float]:
    """Median over rounds of the per-round median latency (ms), rows interleaved within each round."""
    made = {k: make(threads) for k, make in runners.items()}
    res = es.runtime.interleaved_latency(made, x1, rounds=rounds, runs=runs, warmup=30, rewarm=0)
    return {k: r["median_of_rounds_ms"] for k, r in res.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--eval-samples", type=int, default=None, help="default: the full 10k validation split")
    ap.add_argument("--out", default=str(HERE / "results" / "quantize_mobilenet_v2.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)

    train, val = es.data.load("fashion-mnist")
    if args.eval_samples:
        val = val.take(args.eval_samples, seed=0)
    xv, yv = val.normalized().numpy(), val.labels.numpy()
    calib = calibration_subset(train, 512, seed=0)
    xc = calib.normalized().numpy()
    model = es.models.load("mobilenet_v2", "fashion-mnist")
    work = Path(tempfile.mkdtemp(prefix="edgeslim-bench-"))
    rows: list[dict] = []
    files: dict[str, Path] = {}

    fp32 = es.export(model, "onnx", example_inputs=val, path=work / "fp32.onnx")
    files["FP32 (ORT)"] = fp32.path
    default_cal = es.QuantConfig().calibration
    ptq_seconds: dict[str, float] = {}
    variants = {
        f"edgeslim PTQ {m}" + (" (default)" if m == default_cal else ""): es.QuantConfig(calibration=m)
        for m in ("minmax", "percentile", "entropy", "mse")
    }
    variants["edgeslim PTQ per-tensor"] = es.QuantConfig(per_channel=False)
    variants["edgeslim PTQ per-tensor + CLE + bias corr."] = es.QuantConfig(
        per_channel=False, equalize=True, bias_correction=True
    )
    for label, cfg in variants.items():
        t0 = time.perf_counter()
        q = es.quantize(model, cfg, calib=train)
        art = es.export(q, "onnx", example_inputs=val, path=work / f"{len(files)}.onnx")
        ptq_seconds[label] = time.perf_counter() - t0
        files[label] = art.path

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"input": xc[i : i + 1]} for i in range(len(xc))])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(fp32.path), str(work / "ort-default.onnx"), Reader())
    files["ORT quantize_static (defaults)"] = work / "ort-default.onnx"
    quant_pre_process(str(fp32.path), str(work / "fp32-pre.onnx"))
    quantize_static(
        str(work / "fp32-pre.onnx"),
        str(work / "ort-tuned.onnx"),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    files["ORT quantize_static (U8S8 per-channel)"] = work / "ort-tuned.onnx"
    try:
        import nncf
        import onnx

        nq = nncf.quantize(
            onnx.load(str(fp32.path)),
            nncf.Dataset([{"input": xc[i : i + 1]} for i in range(len(xc))]),
            subset_size=len(xc),
        )
        onnx.save(nq, str(work / "nncf.onnx"))
        files[f"NNCF {nncf.__version__} quantize"] = work / "nncf.onnx"
    except ImportError:
        print("nncf not installed: its row is skipped (pip install nncf)", file=sys.stderr)

    x1 = xv[:1]
    runners = ort_runners(files)

    def torch_runner(t: int):
        return es.runtime.load(model, "torch", threads=t)

    runners = {"FP32 (torch eager)": torch_runner, **runners}
    lat = {t: latencies(runners, x1, t, args.rounds, args.runs) for t in (1, 2)}
    torch.set_num_threads(2)
    with torch.inference_mode():
        torch_acc = float((model(torch.from_numpy(xv)).argmax(1).numpy() == yv).mean())
    for k in runners:
        p = files.get(k)
        rows.append(
            {
                "row": k,
                "accuracy": torch_acc if p is None else ort_accuracy(p, xv, yv),
                "size_bytes": os.path.getsize(fp32.path) if p is None else os.path.getsize(p),
                "latency_ms_1t": lat[1][k],
                "latency_ms_2t": lat[2][k],
            }
        )
    base = next(r for r in rows if r["row"] == "FP32 (ORT)")
    eager = next(r for r in rows if r["row"] == "FP32 (torch eager)")
    print(
        f"\nMobileNetV2 on Fashion-MNIST, {len(yv)} validation samples, batch 1, ONNX Runtime {ort.__version__}, "
        f"host {host_info()['cpu']} ({os.cpu_count()} cores)"
    )
    hdr = (
        f"{'row':44s} {'top-1':>7s} {'drop pt':>8s} {'size KB':>9s} {'smaller':>8s} {'1T ms':>7s} {'2T ms':>7s} "
        f"{'vs FP32 1T':>10s} {'vs FP32 2T':>10s} {'vs eager 1T':>11s}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        r["drop_pt"] = (base["accuracy"] - r["accuracy"]) * 100
        r["size_ratio"] = base["size_bytes"] / r["size_bytes"]
        r["speedup_1t"] = base["latency_ms_1t"] / r["latency_ms_1t"]
        r["speedup_2t"] = base["latency_ms_2t"] / r["latency_ms_2t"]
        r["speedup_vs_eager_1t"] = eager["latency_ms_1t"] / r["latency_ms_1t"]
        print(
            f"{r['row']:44s} {r['accuracy'] * 100:7.2f} {r['drop_pt']:8.2f} {r['size_bytes'] / 1024:9.1f} "
            f"{r['size_ratio']:7.2f}x {r['latency_ms_1t']:7.3f} {r['latency_ms_2t']:7.3f} {r['speedup_1t']:9.2f}x "
            f"{r['speedup_2t']:9.2f}x {r['speedup_vs_eager_1t']:10.2f}x"
        )
    print("\nedgeslim PTQ wall time (calibration on 512 samples + conversion + export/validation):")
    for k, v in ptq_seconds.items():
        print(f"  {k:44s} {v:5.1f} s")
    write_json(
        args.out,
        {
            "benchmark": "quantize_mobilenet_v2",
            "rows": rows,
            "ptq_seconds": ptq_seconds,
            "rounds": args.rounds,
            "runs": args.runs,
            "host": host_info(),
            "python": platform.python_version(),
            "validation_samples": len(yv),
            "calibration_samples": len(xc),
        },
        force=True,
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

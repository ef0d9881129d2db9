"""Benchmark: the shipped MobileNetV2-FMNIST, FP32 and INT8, on every installed runtime, side by side.

Candidates (one file per runtime and precision, each exported by ``edgeslim.export`` and validated there):
  - torch eager FP32 (the reference every agreement figure is measured against)
  - ONNX Runtime and OpenVINO: the same ONNX files (FP32; INT8 = edgeslim PTQ, Q/DQ)
  - LiteRT: .tflite from litert-torch (FP32; INT8 = PT2E re-quantization, calibrated on the same training split)
  - ExecuTorch: .pte lowered to XNNPACK (FP32; INT8 = XNNPACKQuantizer PT2E, same calibration)
Accuracy is top-1 on the validation split (10k, or ``--eval-samples``); latency is batch 1, ``--threads`` threads,
``--runs`` runs per candidate split over ``--rounds`` interleaved rounds (every candidate once per round), on
the same real input. Runtimes whose extra is not installed appear as rows saying what to install.

    python benchmarks/runtimes_mobilenet_v2.py [--eval-samples 2000] [--runs 300] [--rounds 5] [--threads 1]

Prints a table and writes benchmarks/results/runtimes_mobilenet_v2.json. Not a test: numbers vary run to run.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import logging
import platform
import tempfile
import time
from pathlib import Path

import edgeslim as es
from edgeslim.core.artifact import Artifact
from edgeslim.core.errors import EdgeslimError
from edgeslim.core.io import write_json
from edgeslim.core.metrics import host_info
from edgeslim.runtime import compare_runtimes, missing
from edgeslim.runtime._compare import render_rows

HERE = Path(__file__).parent
FORMATS = (
    ("onnxruntime", "onnx", ".onnx"),
    ("openvino", "onnx", ".onnx"),
    ("litert", "tflite", ".tflite"),
    ("executorch", "executorch", ".pte"),
)


def version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval-samples", type=int, default=0, help="validation samples (0: all 10k)")
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(HERE / "results" / "runtimes_mobilenet_v2.json"))
    ap.add_argument("--artifacts", help="keep the exported files here and reuse them on a rerun")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    model = es.models.load("mobilenet_v2", dataset="fashion-mnist", pretrained=True).eval()
    train, val = es.data.load("fashion-mnist")
    if a.eval_samples:
        val = val.take(a.eval_samples, seed=0)
    t0 = time.perf_counter()
    q = es.quantize(model, es.QuantConfig(), calib=train)  # needed for INT8 exports (cheap next to them)
    ptq_s = time.perf_counter() - t0

    candidates: dict[str, tuple[str, object]] = {"torch FP32": ("torch", model)}
    failed: list[dict] = []
    export_s: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        td = Path(a.artifacts or tmp)
        arts: dict[tuple[str, str], object] = {}
        for prec, m in (("fp32", model), ("int8", q)):
            for runtime, fmt, sfx in FORMATS:
                label = f"{runtime} {prec.upper()}"
                if missing(runtime):
                    candidates[label] = (runtime, None)
                    continue
                try:
                    f = td / f"mobilenet_v2-{prec}{sfx}"
                    if (
                        (fmt, prec) not in arts
                        and a.artifacts
                        and f.is_file()
                        and f.with_name(f.name + ".json").is_file()
                    ):
                        arts[fmt, prec] = Artifact.load(f)
                    if (fmt, prec) not in arts:
                        t0 = time.perf_counter()
                        arts[fmt, prec] = es.export(m, fmt, example_inputs=val, calib=train, path=f, force=True)
                        export_s[f"{fmt} {prec}"] = round(time.perf_counter() - t0, 1)
                    candidates[label] = (runtime, arts[fmt, prec])
                except EdgeslimError as e:
                    failed.append(
                        {"label": label, "runtime": runtime, "status": "failed", "note": str(e), "threads": a.threads}
                    )
        validation = {
            f"{fmt} {prec}": {k: v for k, v in art.validation.items() if k != "floors"}
            for (fmt, prec), art in arts.items()
        }
        sizes = {
            f"{fmt} {prec}": art.size_bytes + (art.path.with_suffix(".bin").stat().st_size if fmt == "openvino" else 0)
            for (fmt, prec), art in arts.items()
        }
        meta = {f"{fmt} {prec}": art.meta.get("int8") for (fmt, prec), art in arts.items() if art.meta.get("int8")}
        rows = (
            compare_runtimes(candidates, data=val, reference=model, threads=a.threads, runs=a.runs, rounds=a.rounds)
            + failed
        )
    for r in rows:
        fmt_prec = f"{r.get('format')} {r.get('precision')}"
        r["size_bytes"] = sizes.get(fmt_prec) if r.get("runtime") != "torch" else None
        r.pop("path", None)

    by = {r["label"]: r for r in rows if r.get("status") == "ok"}
    int8_vs_fp32 = {}
    for runtime, _, _ in FORMATS:
        f, i = by.get(f"{runtime} FP32"), by.get(f"{runtime} INT8")
        if f and i:
            int8_vs_fp32[runtime] = {
                "fp32": {"p50_ms": f["p50_ms"], "accuracy": f["accuracy"], "size_bytes": f["size_bytes"]},
                "int8": {"p50_ms": i["p50_ms"], "accuracy": i["accuracy"], "size_bytes": i["size_bytes"]},
                "speedup": f["p50_ms"] / i["p50_ms"],
                "accuracy_drop_pt": 100 * (f["accuracy"] - i["accuracy"]),
                "size_ratio": f["size_bytes"] / i["size_bytes"] if f["size_bytes"] and i["size_bytes"] else None,
                "int8_slower_than_fp32": i["p50_ms"] > f["p50_ms"],
            }
    host = host_info()
    out = {
        "benchmark": "runtimes_mobilenet_v2",
        "model": "mobilenet_v2 fashion-mnist (shipped checkpoint)",
        "quantization": "es.quantize(QuantConfig()) PTQ on the training split (ONNX/OpenVINO); tflite/executorch "
        "INT8 re-quantized with their PT2E quantizers on the same split",
        "rows": rows,
        "int8_vs_fp32": int8_vs_fp32,
        "validation_at_export": validation,
        "int8_methods": meta,
        "validation_samples": len(val),
        "threads": a.threads,
        "batch": 1,
        "runs": a.runs,
        "rounds": a.rounds,
        "ptq_seconds": round(ptq_s, 1),
        "export_seconds": export_s,
        "host": host,
        "python": platform.python_version(),
        "software": {
            d: version(d)
            for d in ("torch", "onnxruntime", "openvino", "ai-edge-litert", "litert-torch", "executorch", "torchao")
        },
        "note": "latency measured on a shared 2-core host (other jobs running): compare rows within this run only",
    }
    write_json(a.out, out, force=True)
    print(render_rows(rows))
    for rt, d in int8_vs_fp32.items():
        print(
            f"{rt}: INT8 {d['speedup']:.2f}x vs FP32 ({'SLOWER' if d['int8_slower_than_fp32'] else 'faster'}), "
            f"accuracy drop {d['accuracy_drop_pt']:+.2f} pt, size /{d['size_ratio'] or float('nan'):.2f}"
        )
    print(f"{len(val)} validation samples, batch 1, {a.threads} thread(s); wrote {a.out}")


if __name__ == "__main__":
    main()

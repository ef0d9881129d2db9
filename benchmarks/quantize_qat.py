"""Benchmark: quantization-aware training of MobileNetV2 on Fashion-MNIST against PTQ, measured on ONNX Runtime.

Two halves:
  train    (GPU-friendly; ``--device cuda``): PTQ (per-channel weights, mse calibration on 512 class-balanced
           training images, per-tensor u8 activations) and then QAT from it with each method (``lsq``, ``ste``),
           optionally with a KD term from the FP32 model; writes each model with ``save_quantized`` (recipe +
           state_dict) and a JSON record into ``--out``.
  measure  (CPU, here): ``restore_quantized`` on the shipped float model, export to INT8 ONNX, top-1 on the 10k
           validation split in ONNX Runtime, the learned scales found in the ONNX file, size and latency
           (1 thread, batch 1, median of interleaved rounds).

    python benchmarks/quantize_qat.py train --device cuda --out DIR [--epochs 2]
    python benchmarks/quantize_qat.py measure --trained DIR

Not a test: numbers vary run to run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _harness import latency_rounds

import edgeslim as es
from edgeslim.core.io import write_json
from edgeslim.core.metrics import host_info
from edgeslim.quantize._qat import QATConfig, qat, restore_quantized, save_quantized
from edgeslim.train import TrainConfig, evaluate

HERE = Path(__file__).parent
QCFG = es.QuantConfig(per_channel=True)  # the library default: per-channel weights, mse calibration


def kd_loss(teacher, temperature: float = 2.0, alpha: float = 1.0):
    teacher = teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def loss(out, y, x):
        with torch.no_grad():
            t = teacher.to(x.device)(x)
        return (
            alpha
            * temperature**2
            * F.kl_div(
                F.log_softmax(out / temperature, 1),
                F.log_softmax(t / temperature, 1),
                log_target=True,
                reduction="batchmean",
            )
        )

    return loss


def part_train(args) -> None:
    train, val = es.data.load("fashion-mnist")
    if args.smoke:
        train, val = train.take(256, seed=0), val.take(200, seed=0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = es.models.load("mobilenet_v2")
    calib = es.data.calibration_subset(train, 512)
    t0 = time.perf_counter()
    ptq = es.quantize(model, QCFG, calib=calib)
    rec: dict = {
        "device": args.device,
        "torch": torch.__version__,
        "host": host_info(),
        "fp32_accuracy": evaluate(model.to(args.device), val),
        "ptq_seconds": round(time.perf_counter() - t0, 1),
    }
    model = model.cpu()
    rec["ptq_accuracy_torch"] = evaluate(ptq.to(args.device), val)
    ptq = ptq.cpu()
    save_quantized(ptq, out / "ptq.pt", force=True)
    tc = TrainConfig(
        epochs=args.epochs, lr=args.lr, optimizer="adamw", weight_decay=0.0, warmup_steps=0, batch_size=128
    )
    rows = {}
    for name, method, kd in (("qat-lsq", "lsq", False), ("qat-lsq-kd", "lsq", True), ("qat-ste", "ste", False)):
        t0 = time.perf_counter()
        try:
            q = qat(
                ptq,
                QATConfig(method=method),
                data=(train, val),
                train_config=tc,
                loss_fn=kd_loss(model) if kd else None,
                progress=False,
                device=args.device,
            )
        except Exception as e:  # record and go on: one failing variant must not lose the others
            rows[name] = {"error": f"{type(e).__name__}: {e}"}
            print(name, rows[name], flush=True)
            continue
        save_quantized(q, out / f"{name}.pt", force=True)
        rows[name] = {"history": q.qat_history, "seconds": round(time.perf_counter() - t0, 1)}
        print(name, q.qat_history[-1], flush=True)
    rec["qat"] = rows
    write_json(out / "quantize_qat_train.json", rec, force=True)


def part_measure(args) -> None:
    torch.set_num_threads(1)
    train, val = es.data.load("fashion-mnist")
    if args.samples < len(val):
        val = val.take(args.samples, seed=0)
    rec = json.loads((Path(args.trained) / "quantize_qat_train.json").read_text())
    model = es.models.load("mobilenet_v2")
    rows, arts = [], {}
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        arts["FP32"] = es.export(model, "onnx", example_inputs=val, path=tmp / "fp32.onnx")
        for name in ("ptq", "qat-lsq", "qat-lsq-kd", "qat-ste"):
            f = Path(args.trained) / f"{name}.pt"
            if not f.exists():
                continue
            q = restore_quantized(es.models.load("mobilenet_v2"), f)
            arts[name] = es.export(q, "onnx", example_inputs=val, path=tmp / f"{name}.onnx")
        lat = latency_rounds(arts, args.rounds, args.runs)
        for k, a in arts.items():
            m = es.measure(a, data=val, threads=1, runs=10, peak_memory=False)
            rows.append(
                {"variant": k, "accuracy_ort": m["accuracy"], "onnx_bytes": a.size_bytes, "latency_p50_ms": lat[k]}
            )
    base = rows[0]
    print(
        f"MobileNetV2-FMNIST, {len(val)} validation images, ONNX Runtime 1 thread batch 1 "
        f"(QAT trained on {rec['device']})"
    )
    print(f"{'variant':<12} {'top-1':>7} {'vs FP32':>8} {'bytes':>9} {'p50 ms':>7}")
    for r in rows:
        print(
            f"{r['variant']:<12} {r['accuracy_ort']:>7.4f} {100 * (r['accuracy_ort'] - base['accuracy_ort']):>+7.2f}p "
            f"{r['onnx_bytes']:>9} {r['latency_p50_ms']:>7.3f}"
        )
    write_json(
        args.json,
        {
            "benchmark": "quantize_qat",
            "host": host_info(),
            "rows": rows,
            "train": rec,
            "target": "QAT INT8 within 0.1 pt of FP32",
        },
        force=True,
    )
    print(f"wrote {args.json}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="part", required=True)
    t = sub.add_parser("train")
    t.add_argument("--device", default="cpu")
    t.add_argument("--out", required=True)
    t.add_argument("--epochs", type=int, default=2)
    t.add_argument("--lr", type=float, default=1e-5)
    t.add_argument("--smoke", action="store_true")
    m = sub.add_parser("measure")
    m.add_argument("--trained", required=True)
    m.add_argument("--samples", type=int, default=10000)
    m.add_argument("--rounds", type=int, default=5)
    m.add_argument("--runs", type=int, default=100)
    m.add_argument("--json", type=Path, default=HERE / "results" / "quantize_qat.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    part_train(args) if args.part == "train" else part_measure(args)


if __name__ == "__main__":
    main()

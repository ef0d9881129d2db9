"""Case study: ResNet-18-FMNIST teacher -> small CNN student with no-KD, KD, hint and RKD (same student size).

Accuracy on the Fashion-MNIST test split (or a slice), params, MACs and ONNX Runtime FP32 batch-1 latency measured
side by side (interleaved rounds). Teacher logits/features are computed once and cached (edgeslim.distill cache).

    PYTHONPATH=src python benchmarks/distill_fmnist.py --smoke                  # seconds, CPU
    PYTHONPATH=src python benchmarks/distill_fmnist.py --train-size 10000 --epochs 3
    PYTHONPATH=src python benchmarks/distill_fmnist.py --device cuda --epochs 15 --train-size 0 --out DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _harness import host

import edgeslim as es
from edgeslim.core.counting import count_macs, count_params
from edgeslim.data import load as load_data
from edgeslim.distill import DistillConfig, cnn_student, distill
from edgeslim.models import load as load_model
from edgeslim.train import TrainConfig, evaluate, fit

log = logging.getLogger("distill_fmnist")


def onnx_file(model, shape, path) -> int:
    """Export ``model`` to ``path`` (batch 1, input ``x``); the file's size in bytes."""
    torch.onnx.export(
        model.eval(),
        (torch.zeros(1, *shape),),
        str(path),
        dynamo=False,
        input_names=["x"],
        output_names=["y"],
        opset_version=17,
    )
    return os.path.getsize(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--train-size", type=int, default=10000, help="training rows (0: all 60k)")
    ap.add_argument("--val-size", type=int, default=0, help="test rows (0: all 10k)")
    ap.add_argument("--width", type=float, default=1.0, help="small_cnn width multiplier of the student")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.smoke:
        args.epochs, args.train_size, args.val_size, args.rounds = 1, 256, 256, 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, val = load_data("fashion-mnist")
    if args.train_size:
        train = train.take(args.train_size)
    if args.val_size:
        val = val.take(args.val_size)
    teacher = load_model("resnet18", "fashion-mnist")
    shape = train.input_shape
    tc = TrainConfig(epochs=args.epochs, batch_size=128, lr=0.05, augment=False, seed=0, warmup_steps=50)
    ck = Path(tempfile.mkdtemp(prefix="distill_fmnist_"))
    rows = {"teacher (ResNet-18)": teacher}
    variants = {
        "student no-KD": None,
        "student KD (T=4)": DistillConfig(losses=("kd",), temperature=4.0, hard_weight=0.5),
        "student hint+KD": DistillConfig(
            losses=("kd", "hint"),
            weights=(1.0, 1.0),
            hard_weight=0.5,
            student_layers=("features.8",),
            teacher_layers=("layer3",),
        ),
        "student RKD+KD": DistillConfig(losses=("kd", "rkd"), weights=(1.0, 1.0), hard_weight=0.5),
    }
    seconds = {}
    for name, cfg in variants.items():
        torch.manual_seed(0)
        student = cnn_student("small_cnn", width=args.width, in_channels=shape[0])
        t0 = time.perf_counter()
        if cfg is None:
            rows[name] = fit(student, train, val, tc, device=args.device, progress=False).model
        else:
            rows[name] = distill(
                student,
                teacher,
                cfg,
                data=(train, val),
                train_config=tc,
                device=args.device,
                checkpoint_dir=ck / "cache",
                progress=False,
            )
        seconds[name] = round(time.perf_counter() - t0, 1)
        log.info("%s trained in %.1fs", name, seconds[name])
    result = {}
    runners = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, m) in enumerate(rows.items()):
            path = Path(tmp) / f"{i}.onnx"
            size = onnx_file(m, shape, path)
            runners[name] = es.runtime.load(path, "onnxruntime", threads=1)
            result[name] = {
                "accuracy": round(evaluate(m, val, device=args.device), 4),
                "params": count_params(m),
                "macs": count_macs(m.cpu(), torch.zeros(1, *shape)),
                "onnx_bytes": size,
                "train_seconds": seconds.get(name),
            }
        x = val.take(1).normalized().numpy().astype(np.float32)
        # interleaved rounds so every row sees the same host load
        lat = es.runtime.interleaved_latency(runners, x, rounds=args.rounds, runs=50, warmup=0, rewarm=5)
        times = {n: lat[n]["round_p50_ms"] for n in runners}
    t_ms = statistics.median(times["teacher (ResNet-18)"])
    print(f"\n{'row':22} {'acc':>7} {'params':>9} {'MACs':>11} {'ORT p50 ms':>10} {'speedup':>8}")
    for n, r in result.items():
        r["ort_ms_median"] = round(statistics.median(times[n]), 4)
        r["measured_speedup_vs_teacher"] = round(t_ms / r["ort_ms_median"], 2)
        r["size_ratio_vs_teacher"] = round(r["onnx_bytes"] / result["teacher (ResNet-18)"]["onnx_bytes"], 4)
        print(
            f"{n:22} {r['accuracy']:7.4f} {r['params']:9d} {r['macs']:11d} {r['ort_ms_median']:10.3f} "
            f"{r['measured_speedup_vs_teacher']:7.2f}x"
        )
    note = (
        "ONNX Runtime FP32, 1 thread, batch 1, median of interleaved rounds; measured on a shared, loaded 2-core host"
        if os.cpu_count() and os.cpu_count() <= 4
        else "ONNX Runtime FP32, 1 thread, batch 1"
    )
    print(note)
    meta = {
        "args": vars(args),
        "train_rows": len(train),
        "val_rows": len(val),
        "note": note,
        "host": host(),
        "rows": result,
    }
    name = "distill_fmnist_smoke.json" if args.smoke else "distill_fmnist.json"
    (out / name).write_text(json.dumps(meta, indent=2))
    for n, m in rows.items():
        if n.startswith("student"):
            torch.save(m.state_dict(), out / f"distill_fmnist_{n.split()[1].lower().replace('+', '_')}.pt")


if __name__ == "__main__":
    main()

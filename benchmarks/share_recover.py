"""Benchmark: recovering accuracy after sharing/factorization, and clustering composed with INT8.

Parts:
  train    (GPU-friendly; ``--device cuda``) fine-tunes, with Hinton KD from the unmodified model as teacher:
             a. MobileNetV2-FMNIST with ALBERT-style tied blocks (``tie_layers(auto=True)``, shared BN statistics);
             b. ResNet-18-FMNIST with every 3x3 block convolution replaced by a depthwise-separable pair
                (activation least-squares fit, then fine-tune).
           Writes FP16 state_dicts and a JSON record into ``--out``; the models are rebuilt by replaying the same
           (deterministic) share step on the shipped model and loading that state_dict.
  measure  (CPU, here) exports every model to ONNX and measures top-1 on the 10k validation split in ONNX Runtime,
           file size, MACs and latency (1 thread, batch 1, median of interleaved rounds); and composes clustering
           with INT8 (cluster -> quantize -> export), checking that the cluster structure survives quantization
           (distinct int8 values per output channel <= clusters) and measuring the zipped file size.

    python benchmarks/share_recover.py train --device cuda --out DIR [--epochs 4]
    python benchmarks/share_recover.py measure --trained DIR

Not a test: numbers vary run to run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _harness import latency_rounds
from torch import nn

import edgeslim as es
from edgeslim.core.io import save_torch, write_json
from edgeslim.core.metrics import host_info
from edgeslim.share import ClusterConfig, SeparableConfig, TieConfig, cluster, separable, strip_clustering, tie_layers
from edgeslim.train import TrainConfig, evaluate, fit

HERE = Path(__file__).parent
SEP_LAYERS = ("layer*.*.conv1", "layer*.*.conv2")


def kd_loss(teacher: nn.Module, temperature: float = 4.0, alpha: float = 0.9):
    """Hinton KD term added to the trainer's cross-entropy: alpha * T^2 * KL(teacher_T || student_T)."""
    teacher = teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def loss(out: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
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


def build(variant: str, train=None) -> tuple[nn.Module, nn.Module]:
    """(teacher, student before fine-tuning) for a variant; deterministic, so replayable here."""
    if variant == "tie_mobilenet_v2":
        base = es.models.load("mobilenet_v2")
        return base, tie_layers(base, TieConfig(auto=True))
    if variant == "separable_resnet18":
        base = es.models.load("resnet18")
        return base, separable(base, SeparableConfig(layers=SEP_LAYERS, fit="activations", samples=256), data=train)
    raise SystemExit(f"unknown variant {variant}")


def part_train(args) -> None:
    train, val = es.data.load("fashion-mnist")
    if args.smoke:
        val = val.take(200, seed=0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record: dict = {"host": host_info(), "device": args.device, "torch": torch.__version__, "variants": {}}
    for variant in ("tie_mobilenet_v2", "separable_resnet18"):
        t0 = time.perf_counter()
        teacher, student = build(variant, train)
        acc0 = evaluate(student.to(args.device), val)
        student = student.cpu()
        rows = {"accuracy_before_finetune": acc0}
        cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=256, warmup_steps=50)
        for kd in (False, True):
            res = fit(
                student,
                train,
                val,
                cfg,
                loss_fn=kd_loss(teacher) if kd else None,
                progress=False,
                device=args.device,
                max_steps_per_epoch=2 if args.smoke else None,
            )
            tag = "kd" if kd else "ce"
            rows[f"accuracy_{tag}"] = res.best_accuracy
            rows[f"history_{tag}"] = res.history
            cache: dict = {}  # tied parameters appear under several keys: store each tensor once
            half = {
                k: cache.setdefault(v.data_ptr(), v.half() if v.is_floating_point() else v)
                for k, v in res.model.state_dict().items()
            }
            save_torch(half, out / f"{variant}-{tag}.pt", force=True)
        rows["seconds"] = round(time.perf_counter() - t0, 1)
        record["variants"][variant] = rows
        print(variant, {k: v for k, v in rows.items() if not k.startswith("history")}, flush=True)
    write_json(out / "share_recover_train.json", record, force=True)


def _zipped(path: Path) -> int:
    with tempfile.TemporaryDirectory() as td:
        z = Path(td) / "a.zip"
        with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as f:
            f.write(path, path.name)
        return z.stat().st_size


def _distinct_int8_per_channel(onnx_path: Path) -> int:
    """Largest number of distinct values in one output channel of any int8 conv/gemm weight in the file."""
    import onnx
    from onnx import numpy_helper

    worst = 0
    for init in onnx.load(str(onnx_path)).graph.initializer:
        if init.data_type == onnx.TensorProto.INT8 and len(init.dims) >= 2:
            w = numpy_helper.to_array(init)
            w = w.reshape(w.shape[0], -1)
            worst = max(worst, max(len(np.unique(r)) for r in w))
    return worst


def part_measure(args) -> None:
    torch.set_num_threads(1)
    train, val = es.data.load("fashion-mnist")
    if args.samples < len(val):
        val = val.take(args.samples, seed=0)
    calib = train.take(512, seed=0)
    trained = json.loads((Path(args.trained) / "share_recover_train.json").read_text()) if args.trained else None
    results: dict = {"host": host_info(), "trained_on": trained and trained["device"], "rows": []}
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        # --- recovery rows (models fine-tuned in the `train` part) ---
        if trained:
            for variant in ("tie_mobilenet_v2", "separable_resnet18"):
                teacher, student = build(variant, train)
                arts = {
                    "original": es.export(teacher, "onnx", example_inputs=val, path=tmp / f"{variant}0.onnx"),
                    "replaced, no fine-tune": es.export(
                        student, "onnx", example_inputs=val, path=tmp / f"{variant}1.onnx"
                    ),
                }
                for tag, label in (("ce", "fine-tuned, CE only"), ("kd", "fine-tuned, CE + KD")):
                    sd = torch.load(Path(args.trained) / f"{variant}-{tag}.pt", weights_only=True)
                    m = build(variant, train)[1]
                    m.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
                    arts[label] = es.export(m.eval(), "onnx", example_inputs=val, path=tmp / f"{variant}{tag}.onnx")
                lat = latency_rounds(arts, args.rounds, args.runs)
                for label, art in arts.items():
                    met = es.measure(art, data=val, threads=1, runs=20, peak_memory=False)
                    results["rows"].append(
                        {
                            "model": variant,
                            "variant": label,
                            "accuracy_ort": met["accuracy"],
                            "onnx_bytes": art.size_bytes,
                            "macs": int(met["macs"]),
                            "params": int(met["params"]),
                            "latency_p50_ms": lat[label],
                            "vs_original": lat[label] / lat["original"],
                        }
                    )
        # --- clustering composed with INT8 ---
        for name in ("small_cnn", "mobilenet_v2"):
            base = es.models.load(name)
            qcfg = es.QuantConfig(per_channel=True)
            variants = {"FP32": base}
            for k in (16, 32):
                variants[f"clustered {k}"] = strip_clustering(cluster(base, ClusterConfig(clusters=k)))
            for label, model in variants.items():
                fp = es.export(model, "onnx", example_inputs=val, path=tmp / f"{name}-{label}.onnx".replace(" ", ""))
                q = es.quantize(model, qcfg, calib=calib)
                art = es.export(q, "onnx", example_inputs=val, path=tmp / f"{name}-{label}-int8.onnx".replace(" ", ""))
                for tag, a in (("FP32", fp), ("INT8", art)):
                    met = es.measure(a, data=val, threads=1, runs=20, peak_memory=False)
                    results["rows"].append(
                        {
                            "model": name,
                            "variant": f"{label} -> {tag}" if label != "FP32" else tag,
                            "accuracy_ort": met["accuracy"],
                            "onnx_bytes": a.size_bytes,
                            "zipped_bytes": _zipped(a.path),
                            "max_distinct_int8_per_channel": _distinct_int8_per_channel(a.path)
                            if tag == "INT8"
                            else None,
                            "latency_p50_ms": met["latency_p50_ms@t1b1"],
                            "macs": int(met["macs"]),
                        }
                    )
    print(
        f"{'model':<20} {'variant':<28} {'top-1 ORT':>9} {'ONNX B':>9} {'zipped B':>9} {'MACs':>11} {'p50 ms':>7}"
        "  notes"
    )
    for r in results["rows"]:
        notes = []
        if r.get("max_distinct_int8_per_channel"):
            notes.append(f"<= {r['max_distinct_int8_per_channel']} int8 values per channel")
        if "vs_original" in r and r["variant"] != "original":
            ratio = r["vs_original"]
            notes.append(
                f"{1 / ratio:.2f}x vs original ({'slower' if ratio > 1.05 else 'faster' if ratio < 0.95 else 'same'})"
            )
        print(
            f"{r['model']:<20} {r['variant']:<28} {r['accuracy_ort']:>9.4f} {r['onnx_bytes']:>9} "
            f"{r.get('zipped_bytes', 0):>9} {r['macs']:>11} {r['latency_p50_ms']:>7.3f}  {'; '.join(notes)}"
        )
    if trained:
        results["train"] = trained
    write_json(args.json, results, force=True)
    print(f"wrote {args.json}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="part", required=True)
    t = sub.add_parser("train")
    t.add_argument("--device", default="cpu")
    t.add_argument("--out", required=True)
    t.add_argument("--epochs", type=int, default=4)
    t.add_argument("--lr", type=float, default=0.01)
    t.add_argument("--smoke", action="store_true", help="2 steps per epoch, 200 validation images")
    m = sub.add_parser("measure")
    m.add_argument("--trained", help="folder written by the train part (omit to measure clustering + INT8 only)")
    m.add_argument("--samples", type=int, default=10000, help="validation images used for accuracy")
    m.add_argument("--rounds", type=int, default=5)
    m.add_argument("--runs", type=int, default=100)
    m.add_argument("--json", type=Path, default=HERE / "results" / "share_recover.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    part_train(args) if args.part == "train" else part_measure(args)


if __name__ == "__main__":
    main()

"""Benchmark: edgeslim's own detector (``yolo_mobilenet_v2``, Apache-2.0) on fmnist-detect at 160x160.

Trains the detector (``--train``: ImageNet MobileNetV2 backbone, ``edgeslim.train.train_detector`` on the 4k-image
train split, a checkpoint every epoch so a killed run resumes) or loads the shipped checkpoint, exports it to FP32
ONNX with ``edgeslim.export``, and measures on the deployed file:
  - mAP@[.5:.95] / mAP@.5 on the full 1k-image val split, run in ONNX Runtime, NMS outside the graph
    (``edgeslim.runtime.evaluate_detector``), next to the torch model's mAP;
  - latency, batch 1, ONNX Runtime at 1 and 2 threads (and torch eager for reference), median over interleaved
    rounds of per-round medians.

    python benchmarks/detect_fmnist.py [--train [--ship] --epochs 4 ...] [--rounds 3] [--runs 50]

Prints a table and writes benchmarks/results/detect_fmnist.json. Not a test: numbers vary run to run.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch
from _harness import host

import edgeslim as es
from edgeslim.core.io import save_torch, write_json
from edgeslim.models._zoo import checkpoint_path
from edgeslim.train import DetectTrainConfig, train_detector

HERE = Path(__file__).parent
NAME, DATASET, SIZE = "yolo_mobilenet_v2", "fmnist-detect", 160


def train(args: argparse.Namespace) -> torch.nn.Module:
    """Train from the ImageNet backbone; with ``--ship`` write the package checkpoint and its JSON sidecar."""
    tr, va = es.data.load(DATASET, size=SIZE)
    model = es.models.load(NAME, dataset=DATASET, pretrained="imagenet")
    cfg = DetectTrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        freeze_backbone=args.freeze,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup,
        cache_frozen=args.cache_frozen,
    )
    val_eval = va.take(args.eval_images, seed=0) if args.eval_images < len(va) else va
    t0 = time.perf_counter()
    res = train_detector(model, tr, val_eval, cfg, checkpoint_dir=args.ckpt_dir, progress=True)
    minutes = (time.perf_counter() - t0) / 60
    spent = sum(r["train_seconds"] + r.get("eval_seconds", 0) for r in res.history) / 60
    print(f"trained {len(res.history)} epochs, {spent:.1f} min in all (this call {minutes:.1f} min)")
    if args.ship:
        ship(res.model, res.history, cfg, va, len(val_eval))
    return res.model


def ship(model: torch.nn.Module, history: list[dict], cfg: DetectTrainConfig, va, eval_images: int) -> None:
    """Write the package checkpoint (FP16 storage, as the other shipped checkpoints) and its JSON record; the mAP
    recorded is the one of the weights as shipped (FP16, loaded back to FP32), on the full val split in torch."""
    ck = checkpoint_path(NAME, DATASET).with_name(f"{NAME}-{DATASET}-{SIZE}.pt")
    threads = torch.get_num_threads()
    fp32 = es.runtime.evaluate_detector(model, va, runtime="torch", threads=threads)
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    reloaded = es.models.build(NAME, DATASET)
    es.models.apply_state_dict(reloaded, half, str(ck))
    full = es.runtime.evaluate_detector(reloaded.eval(), va, runtime="torch", threads=threads)
    spent = sum(r["train_seconds"] + r.get("eval_seconds", 0) for r in history) / 60
    info = {
        "model": NAME,
        "dataset": DATASET,
        "input_size": SIZE,
        "init": "imagenet",
        "val_split": "val",
        "val_size": len(va),
        "map": round(full["map"], 4),
        "map50": round(full["map50"], 4),
        "map75": round(full["map75"], 4),
        "map_fp32_weights": round(fp32["map"], 4),
        "metric": "COCO mAP@[.5:.95] (pycocotools), torch, conf 0.001, class-aware NMS IoU 0.6, 100 per image",
        "per_class": {k: round(v, 4) for k, v in full["per_class"].items()},
        "storage": "fp16",
        "config": cfg.to_dict(),
        "per_epoch_eval": f"val_map: mAP on {eval_images} val images (val.take({eval_images}, seed=0))",
        "history": history,
        "train_minutes": round(spent, 1),
        "torch": torch.__version__,
        "threads": threads,
        "host": host()["cpu"],
        "command": f"python benchmarks/detect_fmnist.py --train --ship --epochs {cfg.epochs} --lr {cfg.lr} "
        f"--batch-size {cfg.batch_size} --freeze {cfg.freeze_backbone} --weight-decay {cfg.weight_decay} "
        f"--warmup {cfg.warmup_steps} --eval-images {eval_images} --threads {threads}"
        + (" --cache-frozen" if cfg.cache_frozen else ""),
    }
    save_torch(half, ck, force=True)
    ck.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    print(
        f"shipped {ck} ({ck.stat().st_size / 1e6:.1f} MB): val mAP {full['map']:.4f} (FP32 weights {fp32['map']:.4f})"
    )


def ship_from(folder: Path, args: argparse.Namespace) -> None:
    """Ship the best weights of a finished (or stopped) ``--train`` run from its checkpoint folder."""
    last = torch.load(folder / "last.pt", map_location="cpu", weights_only=True)
    model = es.models.build(NAME, DATASET)
    model.load_state_dict(torch.load(folder / "best.pt", map_location="cpu", weights_only=True))
    tr, va = es.data.load(DATASET, size=SIZE)
    cfg = DetectTrainConfig.from_dict(last["config"])
    ship(model.eval(), list(last["history"]), cfg, va, args.eval_images)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", action="store_true", help="train instead of loading the shipped checkpoint")
    p.add_argument("--ship", action="store_true", help="with --train: write the package checkpoint + sidecar")
    p.add_argument("--train-only", action="store_true", help="stop after training")
    p.add_argument("--ship-from", help="ship the best weights of a --train run's checkpoint folder, then stop")
    p.add_argument("--epochs", type=int, default=9)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--freeze", type=int, default=4, help="first MobileNetV2 blocks kept frozen (0: train all)")
    p.add_argument("--eval-images", type=int, default=300, help="val images scored after each epoch")
    p.add_argument("--ckpt-dir", default=str(Path(tempfile.gettempdir()) / "edgeslim-detect-fmnist"))
    p.add_argument("--cache-frozen", action="store_true", help="compute the frozen blocks once (DetectTrainConfig)")
    p.add_argument(
        "--threads", type=int, default=1,
        help="torch threads for training and torch evaluation (on a loaded shared host 1 thread was 10x faster per step)",
    )  # fmt: skip
    p.add_argument("--calib", type=int, default=256, help="train images that calibrate the INT8 row")
    p.add_argument("--calibration", default="mse", help="QuantConfig.calibration of the INT8 row")
    p.add_argument("--no-int8", action="store_true", help="FP32 rows only")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runs", type=int, default=50)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    if args.ship_from:
        ship_from(Path(args.ship_from), args)
        return
    if args.train:
        model = train(args)
        if args.train_only:
            return
    else:
        model = es.models.load(NAME, dataset=DATASET, pretrained=True)
    tr, va = es.data.load(DATASET, size=SIZE)
    info = es.models.checkpoint_info(NAME, DATASET)
    x_val = torch.stack([va[i][0] for i in range(64)])
    with tempfile.TemporaryDirectory() as td:
        art = es.export(model, "onnx", example_inputs=x_val, path=Path(td) / "yolo_mobilenet_v2-fp32.onnx")
        t0 = time.perf_counter()
        m_ort = es.runtime.evaluate_detector(art, va, runtime="onnxruntime", threads=args.threads)
        ort_eval_s = time.perf_counter() - t0
        m_torch = es.runtime.evaluate_detector(model, va, runtime="torch", threads=args.threads)
        x1 = x_val[:1].numpy()
        q_art = None
        if not args.no_int8:
            t0 = time.perf_counter()
            qm = es.quantize(model, es.QuantConfig(calibration=args.calibration), data=tr.take(args.calib, seed=0))
            q_art = es.export(qm, "onnx", example_inputs=x_val, path=Path(td) / "yolo_mobilenet_v2-int8.onnx")
            ptq_s = time.perf_counter() - t0
            m_q = es.runtime.evaluate_detector(q_art, va, runtime="onnxruntime", threads=args.threads)
        lat: dict[str, dict[int, float]] = {}
        for t in (1, 2):  # every file in one interleaved run per thread count
            runners = {
                "FP32 ONNX Runtime": es.runtime.load(art, "onnxruntime", threads=t),
                "FP32 torch eager": es.runtime.load(model, "torch", threads=t),
            }
            if q_art is not None:
                runners["edgeslim INT8 ONNX Runtime"] = es.runtime.load(q_art, "onnxruntime", threads=t)
            res = es.runtime.interleaved_latency(runners, x1, rounds=args.rounds, runs=args.runs, warmup=10)
            for k, r in res.items():
                lat.setdefault(k, {})[t] = r["median_of_rounds_ms"]
        size_bytes = art.size_bytes
        int8 = None
        if q_art is not None:
            fp32_ms, int8_ms = lat["FP32 ONNX Runtime"], lat["edgeslim INT8 ONNX Runtime"]
            int8 = {
                "row": "edgeslim INT8 ONNX Runtime",
                "file": "onnx int8 (QDQ)",
                "map": m_q["map"],
                "map50": m_q["map50"],
                "map75": m_q["map75"],
                "drop_pt": round(100 * (m_ort["map"] - m_q["map"]), 2),
                "latency_ms_1t": int8_ms[1],
                "latency_ms_2t": int8_ms[2],
                "fp32_same_run_ms_1t": fp32_ms[1],
                "fp32_same_run_ms_2t": fp32_ms[2],
                "speedup_1t": round(fp32_ms[1] / int8_ms[1], 2),
                "speedup_2t": round(fp32_ms[2] / int8_ms[2], 2),
                "size_bytes": q_art.size_bytes,
                "ptq_seconds": round(ptq_s, 1),
                "calibration": f"{args.calib} train images, {args.calibration}",
                "summary": qm.report.summary(),
                "runtime": m_q["runtime"],
            }
    rows = [
        {
            "row": "FP32 ONNX Runtime",
            "file": "onnx fp32",
            "map": m_ort["map"],
            "map50": m_ort["map50"],
            "map75": m_ort["map75"],
            "latency_ms_1t": lat["FP32 ONNX Runtime"][1],
            "latency_ms_2t": lat["FP32 ONNX Runtime"][2],
            "size_bytes": size_bytes,
            "runtime": m_ort["runtime"],
            "eval_seconds": round(ort_eval_s, 1),
        },
        {
            "row": "FP32 torch eager (reference)",
            "file": "torch module",
            "map": m_torch["map"],
            "map50": m_torch["map50"],
            "map75": m_torch["map75"],
            "latency_ms_1t": lat["FP32 torch eager"][1],
            "latency_ms_2t": lat["FP32 torch eager"][2],
            "runtime": m_torch["runtime"],
        },
    ]
    if int8:
        rows.append(int8)
    out = {
        "benchmark": "detect_fmnist",
        "model": NAME,
        "dataset": f"{DATASET} val ({len(va)} images, {SIZE}x{SIZE})",
        "metric": "COCO mAP@[.5:.95] by pycocotools on the deployed file's output; NMS outside the graph "
        "(conf 0.001, class-aware IoU 0.6, 100 per image)",
        "latency": f"batch 1, median of {args.rounds} interleaved rounds of per-round medians ({args.runs} runs each)",
        "params": sum(p.numel() for p in model.parameters()),
        "macs": art.meta.get("macs"),
        "per_class_map_onnx": m_ort["per_class"],
        "training": {k: info.get(k) for k in ("train_minutes", "config", "history", "map", "command")}
        if info
        else None,
        "rows": rows,
        "host": host(),
    }
    write_json(HERE / "results" / "detect_fmnist.json", out, force=True)
    print(f"\n{'row':32} {'mAP':>7} {'mAP50':>7} {'1T ms':>8} {'2T ms':>8}")
    for r in rows:
        print(f"{r['row']:32} {r['map']:7.4f} {r['map50']:7.4f} {r['latency_ms_1t']:8.2f} {r['latency_ms_2t']:8.2f}")
    print(f"(host {out['host']['cpu']}, ISA {out['host'].get('isa')}, load {out['host']['load_avg']}: shared host)")


if __name__ == "__main__":
    main()

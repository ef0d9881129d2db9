"""Benchmark: structured (channel) pruning of the shipped detector ``yolo_mobilenet_v2`` on fmnist-detect at 160x160.

For each MAC target (default 40% and 50% fewer MACs): ``edgeslim.prune`` (DepGraph channel pruning; the heads'
class-logit and box convs are kept automatically, so the output layout is unchanged), BatchNorm statistics
re-estimated on training images, mAP before recovery; then a short recovery fine-tune with
``edgeslim.train.train_detector`` (``--epochs`` x ``--steps`` steps), mAP after. mAP is computed on the exported
FP32 ONNX file in ONNX Runtime (pycocotools mAP@[.5:.95], NMS outside the graph) on ``--eval-images`` val images.
Latency: batch 1, ONNX Runtime 1 thread, the pruned FP32 ONNX files interleaved with the unpruned FP32 ONNX;
speedup / MAC gain = (t_unpruned / t_pruned) / (MACs_unpruned / MACs_pruned).

    python benchmarks/detect_prune.py [--targets 0.4 0.5] [--epochs 1 --steps 150] [--eval-images 300]

Prints a markdown table and writes benchmarks/results/detect_prune.json. Not a test: numbers vary run to run; on a
shared, loaded host the latencies are labelled "under load".
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
from _harness import host

import edgeslim as es
from edgeslim.core.counting import count_macs
from edgeslim.core.io import write_json
from edgeslim.prune import PruneConfig
from edgeslim.train import DetectTrainConfig, train_detector

HERE = Path(__file__).parent
NAME, DATASET, SIZE = "yolo_mobilenet_v2", "fmnist-detect", 160


def evaluate(model: torch.nn.Module, va, x: torch.Tensor, path: Path, threads: int) -> tuple[dict, object]:
    art = es.export(model.eval(), "onnx", example_inputs=x, path=path)
    return es.runtime.evaluate_detector(art, va, runtime="onnxruntime", threads=threads), art


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", type=float, nargs="+", default=[0.4, 0.5], help="fractions of MACs to remove")
    p.add_argument("--importance", default="l2")
    p.add_argument("--round-to", type=int, default=8)
    p.add_argument("--recal", type=int, default=512, help="training images for BatchNorm recalibration")
    p.add_argument("--epochs", type=int, default=1, help="recovery fine-tune epochs (0: no recovery)")
    p.add_argument("--steps", type=int, default=150, help="recovery steps per epoch (batch --batch-size)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--freeze", type=int, default=0, help="first backbone blocks kept frozen while recovering")
    p.add_argument("--eval-images", type=int, default=300, help="val images scored (seeded subset)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--out", default="detect_prune.json", help="file name under benchmarks/results/")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    tr, va_full = es.data.load(DATASET, size=SIZE)
    va = va_full.take(args.eval_images, seed=0) if args.eval_images < len(va_full) else va_full
    base = es.models.load(NAME, dataset=DATASET, pretrained=True).eval()
    x = torch.stack([va[i][0] for i in range(8)])
    macs0 = count_macs(base, x[:1])
    td = Path(tempfile.mkdtemp(prefix="edgeslim-detect-prune-"))
    m0, art0 = evaluate(base, va, x, td / "fp32.onnx", args.threads)
    rows = [{"row": "FP32 unpruned", "macs": macs0, "params": sum(p.numel() for p in base.parameters()),
             "map": m0["map"], "map50": m0["map50"], "map_after": m0["map"]}]  # fmt: skip
    arts = {"FP32 unpruned": art0}
    for target in args.targets:
        label = f"pruned -{target:.0%} MACs"
        t0 = time.perf_counter()
        cfg = PruneConfig(
            method="channel",
            target_macs=target,
            importance=args.importance,
            round_to=args.round_to,
            recalibrate_bn=args.recal,
        )
        small = es.prune(base, cfg, example_inputs=x[:1], data=tr)
        prune_s = time.perf_counter() - t0
        rep = small.prune_report
        m_pruned, _ = evaluate(small, va, x, td / f"p{target}-recal.onnx", args.threads)
        row = {
            "row": label,
            "target": target,
            "macs": count_macs(small, x[:1]),
            "mac_reduction": round(rep.mac_reduction, 4),
            "params": sum(p.numel() for p in small.parameters()),
            "ignored": rep.ignored,
            "channel_ratio": rep.layers.get("_channel_ratio"),
            "prune_seconds": round(prune_s, 1),
            "map_before_recovery": m_pruned["map"],
            "map50_before_recovery": m_pruned["map50"],
        }
        if args.epochs > 0:
            t1 = time.perf_counter()
            tcfg = DetectTrainConfig(
                epochs=args.epochs,
                batch_size=args.batch_size,
                lr=args.lr,
                warmup_steps=min(20, args.steps),
                freeze_backbone=args.freeze,
            )
            res = train_detector(small, tr, None, tcfg, progress=False, max_steps_per_epoch=args.steps)
            small = res.model.eval()
            row["recovery"] = {**tcfg.to_dict(), "steps_per_epoch": args.steps,
                               "minutes": round((time.perf_counter() - t1) / 60, 2)}  # fmt: skip
        m_after, art = evaluate(small, va, x, td / f"p{target}.onnx", args.threads)
        row.update(map=m_after["map"], map50=m_after["map50"], map_after=m_after["map"])
        row["map_drop_pts"] = round(100 * (m0["map"] - m_after["map"]), 2)
        rows.append(row)
        arts[label] = art
    lat = es.runtime.interleaved_latency(
        {k: es.runtime.load(a, "onnxruntime", threads=1) for k, a in arts.items()},
        x[:1].numpy(),
        rounds=args.rounds,
        runs=args.runs,
        warmup=10,
    )
    t_base = lat["FP32 unpruned"]["median_of_rounds_ms"]
    for r in rows:
        r["latency_ms_1t"] = lat[r["row"]]["median_of_rounds_ms"]
        r["speedup"] = round(t_base / r["latency_ms_1t"], 3)
        r["mac_gain"] = round(macs0 / r["macs"], 3)
        r["speedup_per_mac_gain"] = round(r["speedup"] / r["mac_gain"], 3)
    out = {
        "benchmark": "detect_prune",
        "model": NAME,
        "dataset": f"{DATASET} val, {len(va)} images ({'seeded subset' if len(va) < len(va_full) else 'all'}), "
        f"{SIZE}x{SIZE}",
        "metric": "COCO mAP@[.5:.95] (pycocotools) of the FP32 ONNX file in ONNX Runtime; NMS outside the graph",
        "latency": f"under load (shared host): ONNX Runtime 1 thread, batch 1, median of {args.rounds} interleaved "
        f"rounds of per-round medians ({args.runs} runs each)",
        "prune": {"importance": args.importance, "round_to": args.round_to, "bn_recalibration_images": args.recal},
        "distillation_recovery": "not run (see the report): recovery here is plain fine-tuning with train_detector",
        "rows": rows,
        "minutes": round((time.perf_counter() - t_start) / 60, 1),
        "host": host(),
    }
    out["command"] = "python benchmarks/detect_prune.py " + " ".join(sys.argv[1:])
    write_json(HERE / "results" / args.out, out, force=True)
    print("\n| variant | MACs (M) | mAP before recovery | mAP after | drop (pt) | 1T ms (under load) | speedup | "
          "speedup / MAC gain |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        before = r.get("map_before_recovery", r["map"])
        print(
            f"| {r['row']} | {r['macs'] / 1e6:.1f} | {before:.4f} | {r['map_after']:.4f} | "
            f"{r.get('map_drop_pts', 0.0):.2f} | {r['latency_ms_1t']:.2f} | {r['speedup']:.2f}x | "
            f"{r['speedup_per_mac_gain']:.2f} |"
        )
    print(f"(host {out['host']['cpu']}, load {out['host']['load_avg']}: shared host, {out['minutes']} min in all)")


if __name__ == "__main__":
    main()

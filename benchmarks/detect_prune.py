"""Benchmark: structured (channel) pruning of the shipped detector ``yolo_mobilenet_v2`` on fmnist-detect at 160x160,
recovered by fine-tuning or by distillation from the unpruned detector, then INT8 on top.

For each MAC target (default 40% fewer MACs): ``edgeslim.prune`` (DepGraph channel pruning; the heads'
class-logit and box convs are kept automatically, so the output layout is unchanged), BatchNorm statistics
re-estimated on training images, mAP before recovery; then recovery with the same steps, data order and learning
rate for every method (``--recovery``): ``finetune`` (``edgeslim.train.train_detector`` on the ground truth) and
``distill`` (``edgeslim.distill`` from the unpruned detector: ground truth + score/box KD + neck-feature hints);
mAP after. With ``--int8`` every recovered model (and the unpruned one) is also quantized with
``edgeslim.quantize`` (static, ``--calib`` train images) and scored. mAP is computed on the exported ONNX file in
ONNX Runtime (pycocotools mAP@[.5:.95], NMS outside the graph) on ``--eval-images`` val images. Latency: batch 1,
ONNX Runtime at 1 and 2 threads, every file interleaved with the unpruned FP32 ONNX in one run;
speedup / MAC gain = (t_unpruned / t_pruned) / (MACs_unpruned / MACs_pruned).

    python benchmarks/detect_prune.py [--targets 0.4] [--recovery finetune distill] [--recovery-steps 250]
                                      [--int8] [--eval-images 300]

Prints a markdown table and writes benchmarks/results/detect_prune.json. Not a test: numbers vary run to run; the
host's load average is recorded with them.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
from _harness import host, latency_by_threads

import edgeslim as es
from edgeslim.core.counting import count_macs
from edgeslim.core.io import write_json
from edgeslim.pipeline._task import epochs_and_cap
from edgeslim.prune import PruneConfig
from edgeslim.train import DetectTrainConfig, train_detector

HERE = Path(__file__).parent
NAME, DATASET, SIZE = "yolo_mobilenet_v2", "fmnist-detect", 160


def evaluate(model: torch.nn.Module, va, x: torch.Tensor, path: Path) -> tuple[dict, object]:
    art = es.export(model.eval(), "onnx", example_inputs=x, path=path)
    return es.runtime.evaluate_detector(art, va, runtime="onnxruntime", threads=1), art


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", type=float, nargs="+", default=[0.4], help="fractions of MACs to remove")
    p.add_argument("--importance", default="l2")
    p.add_argument("--round-to", type=int, default=8)
    p.add_argument("--recal", type=int, default=512, help="training images for BatchNorm recalibration")
    p.add_argument("--recovery", nargs="+", default=["finetune", "distill"], choices=["finetune", "distill"])
    p.add_argument("--recovery-steps", type=int, default=250, help="recovery optimizer steps in all (0: none)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--freeze", type=int, default=0, help="first backbone blocks kept frozen while recovering")
    p.add_argument("--kd-weight", type=float, default=1.0, help="weight of the score + box KD term (distill)")
    p.add_argument("--hint-weight", type=float, default=1.0, help="weight of the neck-feature term (distill)")
    p.add_argument("--int8", action="store_true", help="quantize every recovered model and the unpruned one")
    p.add_argument("--calib", type=int, default=256, help="train images that calibrate the INT8 rows")
    p.add_argument("--eval-images", type=int, default=300, help="val images scored (seeded subset)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for pruning and recovery")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--out", default="detect_prune.json", help="file name under benchmarks/results/")
    p.add_argument(
        "--keep", default=None, help="folder the ONNX files are written to and kept (default: a temp folder)"
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    tr, va_full = es.data.load(DATASET, size=SIZE)
    va = va_full.take(args.eval_images, seed=0) if args.eval_images < len(va_full) else va_full
    base = es.models.load(NAME, dataset=DATASET, pretrained=True).eval()
    x = torch.stack([va[i][0] for i in range(8)])
    macs0 = count_macs(base, x[:1])
    td = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="edgeslim-detect-prune-"))
    td.mkdir(parents=True, exist_ok=True)
    m0, art0 = evaluate(base, va, x, td / "fp32.onnx")
    rows = [{"row": "FP32 unpruned", "macs": macs0, "params": sum(p.numel() for p in base.parameters()),
             "map": m0["map"], "map50": m0["map50"]}]  # fmt: skip
    arts = {"FP32 unpruned": art0}
    calib = tr.take(args.calib, seed=0)

    def int8_row(model: torch.nn.Module, label: str, macs: int, extra: dict) -> None:
        t0 = time.perf_counter()
        qm = es.quantize(model, es.QuantConfig(calibration="mse"), data=calib)
        art = es.export(qm, "onnx", example_inputs=x, path=td / f"{len(arts)}-int8.onnx")
        ptq_s = time.perf_counter() - t0
        m = es.runtime.evaluate_detector(art, va, runtime="onnxruntime", threads=1)
        rows.append({"row": label, **extra, "macs": macs, "map": m["map"], "map50": m["map50"],
                     "ptq_seconds": round(ptq_s, 1), "quantize_summary": qm.report.summary()})  # fmt: skip
        arts[label] = art

    if args.int8:
        int8_row(base, "INT8 unpruned", macs0, {})
    kd_cfg = es.DistillConfig(losses=("kd", "hint"), weights=(args.kd_weight, args.hint_weight),
                              student_layers=("neck",), teacher_layers=("neck",))  # fmt: skip
    for target in args.targets:
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
        macs = count_macs(small, x[:1])
        m_pruned, art = evaluate(small, va, x, td / f"p{target}-recal.onnx")
        pruned = {
            "target": target,
            "mac_reduction": round(rep.mac_reduction, 4),
            "params": sum(p.numel() for p in small.parameters()),
            "ignored": rep.ignored,
            "prune_seconds": round(prune_s, 1),
            "map_before_recovery": m_pruned["map"],
        }
        label = f"pruned -{target:.0%} MACs, BN recalibrated only"
        rows.append({"row": label, **pruned, "macs": macs, "map": m_pruned["map"], "map50": m_pruned["map50"]})
        arts[label] = art
        if args.recovery_steps == 0:
            continue
        epochs, cap = epochs_and_cap(len(tr), args.batch_size, args.recovery_steps)
        tcfg = DetectTrainConfig(
            epochs=epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            warmup_steps=min(20, args.recovery_steps),
            freeze_backbone=args.freeze,
        )
        for how in args.recovery:
            t1 = time.perf_counter()
            if how == "finetune":
                rec = train_detector(small, tr, None, tcfg, progress=False, max_steps_per_epoch=cap).model
            else:
                rec = es.distill(small, base, kd_cfg, data=(tr, None), train_config=tcfg, progress=False,
                                 max_steps_per_epoch=cap)  # fmt: skip
            minutes = round((time.perf_counter() - t1) / 60, 2)
            label = f"pruned -{target:.0%} MACs + {how}"
            m_after, art = evaluate(rec.eval(), va, x, td / f"p{target}-{how}.onnx")
            recovery = {"method": how, **tcfg.to_dict(), "steps_per_epoch": cap, "steps": epochs * cap,
                        "minutes": minutes}  # fmt: skip
            if how == "distill":
                recovery["distill"] = kd_cfg.to_dict()
            rows.append({"row": label, **pruned, "recovery": recovery, "macs": macs, "map": m_after["map"],
                         "map50": m_after["map50"]})  # fmt: skip
            arts[label] = art
            if args.int8:
                int8_row(rec, f"{label} + INT8", macs, {"target": target, "recovery": recovery})
    lat = latency_by_threads(arts, x[:1].numpy(), rounds=args.rounds, runs=args.runs)
    for r in rows:
        r["map_drop_pts"] = round(100 * (m0["map"] - r["map"]), 2)
        for t in (1, 2):
            r[f"latency_ms_{t}t"] = lat[r["row"]][t]
            r[f"speedup_{t}t"] = round(lat["FP32 unpruned"][t] / lat[r["row"]][t], 3)
        r["mac_gain"] = round(macs0 / r["macs"], 3)
        r["speedup_per_mac_gain_1t"] = round(r["speedup_1t"] / r["mac_gain"], 3)
        r["size_bytes"] = arts[r["row"]].size_bytes
    h = host()
    out = {
        "benchmark": "detect_prune",
        "model": NAME,
        "dataset": f"{DATASET} val, {len(va)} images ({'seeded subset' if len(va) < len(va_full) else 'all'}), "
        f"{SIZE}x{SIZE}",
        "metric": "COCO mAP@[.5:.95] (pycocotools) of the deployed ONNX file in ONNX Runtime; NMS outside the graph",
        "latency": f"ONNX Runtime 1 and 2 threads, batch 1, median of {args.rounds} interleaved rounds of per-round "
        f"medians ({args.runs} runs each), every file in one run per thread count",
        "prune": {"importance": args.importance, "round_to": args.round_to, "bn_recalibration_images": args.recal},
        "recovery_torch_threads": args.threads,
        "rows": rows,
        "minutes": round((time.perf_counter() - t_start) / 60, 1),
        "host": h,
    }
    out["command"] = "python benchmarks/detect_prune.py " + " ".join(sys.argv[1:])
    write_json(HERE / "results" / args.out, out, force=True)
    print("\n| variant | MACs (M) | mAP | drop (pt) | recovery min | 1T ms | 2T ms | x FP32 1T / 2T | "
          "speedup / MAC gain 1T | MB |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        rec_min = r.get("recovery", {}).get("minutes", "")
        print(
            f"| {r['row']} | {r['macs'] / 1e6:.1f} | {r['map']:.4f} | {r['map_drop_pts']:.2f} | {rec_min} | "
            f"{r['latency_ms_1t']:.2f} | {r['latency_ms_2t']:.2f} | {r['speedup_1t']:.2f}x / {r['speedup_2t']:.2f}x | "
            f"{r['speedup_per_mac_gain_1t']:.2f} | {r['size_bytes'] / 2**20:.2f} |"
        )
    print(f"(host {h['cpu']}, load {h['load_avg']}, {out['minutes']} min in all)")


if __name__ == "__main__":
    main()

"""Benchmark: INT8 of FP32 detector ONNX files with every layer integer vs with host-measured placement.

Takes the FP32 ONNX files a ``detect_prune.py`` run leaves in its folder (``--keep``; ``fp32.onnx`` is the unpruned
detector, ``p<target>-<recovery>.onnx`` the pruned and recovered ones) and quantizes each *as an ONNX file* (the
path of a user who has only the file) with ``edgeslim.quantize`` twice: ``placement="all"`` (every layer the capture
quantizes runs an integer kernel) and ``placement="measured"`` (the layers whose integer kernel ONNX Runtime runs
slower on this host stay float, decided by its profiler and the whole file's timing; measured at 1 and at 2
threads, one file each). Every file's mAP@[.5:.95] is computed on the deployed file in ONNX Runtime (pycocotools, NMS
outside the graph) on the same seeded val subset as ``detect_prune.py``; latency at 1 and 2 threads, batch 1, every
file interleaved with the unpruned FP32 file in one run per thread count.

    python benchmarks/detect_prune.py --targets 0.4 0.55 --recovery-steps 2000 --int8 --keep runs/detect_prune
    python benchmarks/detect_placement.py runs/detect_prune [--eval-images 500]

Prints a markdown table and writes benchmarks/results/detect_placement.json. Not a test.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch
from _harness import host, latency_by_threads

import edgeslim as es
from edgeslim.core.io import write_json
from edgeslim.runtime._static import onnx_macs_detail

HERE = Path(__file__).parent
DATASET, SIZE = "fmnist-detect", 160


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="a detect_prune.py --keep folder (FP32 ONNX files)")
    p.add_argument("--files", nargs="+", default=["fp32.onnx", "p0.4-finetune.onnx", "p0.55-finetune.onnx"])
    p.add_argument("--calib", type=int, default=256, help="train images that calibrate the INT8 files")
    p.add_argument("--eval-images", type=int, default=500, help="val images scored (seeded subset)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--out", default="detect_placement.json", help="file name under benchmarks/results/")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    t_start = time.perf_counter()
    folder = Path(args.folder)
    missing = [f for f in args.files if not (folder / f).is_file()]
    if missing:
        sys.exit(f"error: {folder} lacks {', '.join(missing)} (run detect_prune.py with --keep {folder} first)")
    tr, va_full = es.data.load(DATASET, size=SIZE)
    va = va_full.take(args.eval_images, seed=0) if args.eval_images < len(va_full) else va_full
    calib = tr.take(args.calib, seed=0)
    x = torch.stack([va[i][0] for i in range(8)])
    out_dir = folder / "placement"
    out_dir.mkdir(exist_ok=True)
    rows, arts = [], {}
    for name in args.files:
        src = folder / name
        macs, _ = onnx_macs_detail(src)
        stem = name.removesuffix(".onnx")
        m = es.runtime.evaluate_detector(src, va, runtime="onnxruntime", threads=1)
        rows.append({"row": f"{stem} FP32", "file": name, "macs": macs, "map": m["map"], "map50": m["map50"]})
        arts[rows[-1]["row"]] = src
        for label, cfg in (
            ("INT8 all layers", es.QuantConfig(num_samples=args.calib)),
            ("INT8 placement measured 1T", es.QuantConfig(num_samples=args.calib, placement="measured")),
            (
                "INT8 placement measured 2T",
                es.QuantConfig(num_samples=args.calib, placement="measured", placement_threads=2),
            ),
        ):
            t0 = time.perf_counter()
            q = es.quantize(str(src), cfg, data=calib)
            path = out_dir / f"{stem}-{label.replace(' ', '_')}.onnx"
            art = es.export(q, "onnx", example_inputs=x, path=path, force=True)
            ptq_s = time.perf_counter() - t0
            m = es.runtime.evaluate_detector(art, va, runtime="onnxruntime", threads=1)
            row = {
                "row": f"{stem} {label}",
                "file": name,
                "macs": macs,
                "map": m["map"],
                "map50": m["map50"],
                "ptq_seconds": round(ptq_s, 1),
                "float_layers": [s["name"] for s in q.report.skipped_layers],
                "integer_mac_share": q.report.integer_mac_share,
                "placement": q.report.placement,
                "quantize_summary": q.report.summary(),
            }
            rows.append(row)
            arts[row["row"]] = art
            print(f"{row['row']}: mAP {row['map']:.4f}, {ptq_s:.1f} s", file=sys.stderr, flush=True)
    base = f"{args.files[0].removesuffix('.onnx')} FP32"
    lat = latency_by_threads(arts, x[:1].numpy(), rounds=args.rounds, runs=args.runs, shuffle=True)
    m0 = rows[0]["map"]
    for r in rows:
        r["map_drop_pts"] = round(100 * (m0 - r["map"]), 2)
        for t in (1, 2):
            r[f"latency_ms_{t}t"] = lat[r["row"]][t]
            r[f"round_spread_pct_{t}t"] = lat[r["row"]][f"spread{t}"]
            r[f"speedup_{t}t"] = round(lat[base][t] / lat[r["row"]][t], 3)
    out = {
        "benchmark": "detect_placement",
        "source_folder": str(folder),
        "dataset": f"{DATASET} val, {len(va)} images ({'seeded subset' if len(va) < len(va_full) else 'all'}), "
        f"{SIZE}x{SIZE}",
        "metric": "COCO mAP@[.5:.95] (pycocotools) of the deployed ONNX file in ONNX Runtime; NMS outside the graph",
        "latency": f"ONNX Runtime 1 and 2 threads, batch 1, median of {args.rounds} interleaved rounds (shuffled) of "
        f"per-round medians ({args.runs} runs each), every file in one run per thread count",
        "rows": rows,
        "minutes": round((time.perf_counter() - t_start) / 60, 1),
        "host": host(),
        "command": "python benchmarks/detect_placement.py " + " ".join(sys.argv[1:]),
    }
    write_json(HERE / "results" / args.out, out, force=True)
    print(f"\n| variant | MACs (M) | mAP | drop (pt) | float layers | 1T ms | 2T ms | x {base} 1T / 2T | PTQ s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        nf = len(r["float_layers"]) if "float_layers" in r else ""
        print(
            f"| {r['row']} | {r['macs'] / 1e6:.1f} | {r['map']:.4f} | {r['map_drop_pts']:.2f} | {nf} | "
            f"{r['latency_ms_1t']:.2f} | {r['latency_ms_2t']:.2f} | {r['speedup_1t']:.2f}x / {r['speedup_2t']:.2f}x | "
            f"{r.get('ptq_seconds', '')} |"
        )


if __name__ == "__main__":
    main()

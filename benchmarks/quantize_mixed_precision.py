"""Benchmark: per-layer sensitivity and mixed precision under an accuracy budget, MobileNetV2 W4A8 on Fashion-MNIST.

W4A8 per-channel post-training quantization of the shipped MobileNetV2 checkpoint loses several points; the
budget search keeps the most sensitive layers in float until the drop on a fixed validation subset is within
the budget. Steps:
  1. sensitivity of every quantized layer (one_at_a_time, on a seeded subset of the search data), ranked by the
     SQNR of the logits (top-1 on a few hundred samples is too coarse to rank 53 layers: --rank-by metric);
  2. quantize_with_budget(BudgetConfig(max_accuracy_drop=0.002, ...)): each candidate's top-1 (torch fake-quant) on
     the search data, and its INT8 ONNX file's top-1 and latency in ONNX Runtime (1 thread, batch 1);
  3. the chosen model's top-1 on the full 10k validation split, and FP32 vs chosen ONNX size and latency.
One calibration (512 class-balanced training samples) serves every candidate.

    python benchmarks/quantize_mixed_precision.py [--budget 0.002] [--search-samples 2000]
        [--sensitivity-samples 500] [--search bisect] [--rank-by sqnr]

``--latency-only`` rebuilds the chosen model from the results file (its float layers as ``QuantConfig.exclude``,
the same calibration), checks its 10k top-1 against the recorded one, and times FP32, all-quantized and chosen
again (for a quiet host: the search itself is long and usually shares the machine).

Prints the tables and writes benchmarks/results/quantize_mixed_precision.json. Not a test: numbers vary run to run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch

import edgeslim as es
from edgeslim.core.io import write_json
from edgeslim.core.metrics import host_info
from edgeslim.quantize import quantize_with_budget
from edgeslim.runtime import optimized_op_types

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from quantize_mobilenet_v2 import latencies, ort_runners  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=0.002, help="max top-1 drop, a fraction (0.002 = 0.2 pt)")
    ap.add_argument("--weight-bits", type=int, default=4)
    ap.add_argument("--search-samples", type=int, default=2000)
    ap.add_argument("--sensitivity-samples", type=int, default=500)
    ap.add_argument("--search", default="bisect", choices=["greedy", "bisect"])
    ap.add_argument(
        "--rank-by",
        default="sqnr",
        choices=["sqnr", "metric"],
        help="order in which layers are kept in float: logits SQNR (default) or top-1 lost",
    )
    ap.add_argument(
        "--fallback",
        default="float",
        choices=["float", "int8"],
        help="keep the sensitive layers in float, or at 8-bit weights (every layer stays integer)",
    )
    ap.add_argument("--runs", type=int, default=300, help="timed runs of the final latency comparison")
    ap.add_argument("--out", default=str(HERE / "results" / "quantize_mixed_precision.json"))
    ap.add_argument("--latency-only", action="store_true", help="re-time the recorded result (see above)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    t_start = time.perf_counter()

    train, val = es.data.load("fashion-mnist")
    if args.latency_only:
        return retime(args, train, val)
    search_data = val.take(args.search_samples, seed=0)
    model = es.models.load("mobilenet_v2", "fashion-mnist")
    config = es.QuantConfig(weight_bits=args.weight_bits, per_channel=True, num_samples=512)
    budget = es.BudgetConfig(
        max_accuracy_drop=args.budget,
        quant=config,
        sensitivity_samples=args.sensitivity_samples,
        search=args.search,
        rank_by=args.rank_by,
        measure_latency=True,
        fallback=args.fallback,
    )
    res = quantize_with_budget(model, budget, data=(train, search_data), eval_data=val)
    sens = res.sensitivity
    print(
        f"\nMobileNetV2 on Fashion-MNIST, W{args.weight_bits}A8 per-channel, calibration 512 samples; "
        f"ONNX Runtime {ort.__version__}, host {host_info()['cpu']}"
    )
    print(f"\n[1] {sens.table(10)}\n({len(sens.layers)} layers ranked in {sens.seconds:.0f} s)")
    print(
        f"\n[2] search ({args.search}) on {len(search_data)} validation samples; top-1 in torch (fake-quant) and "
        f"ONNX Runtime, latency p50 at 1 thread, batch 1\n{res.table()}"
    )

    # the final comparison: FP32 vs chosen, exported and timed with more runs, accuracy on the full 10k split
    with tempfile.TemporaryDirectory() as td:
        arts = {
            "fp32": es.export(model, "onnx", example_inputs=val, path=Path(td) / "fp32.onnx"),
            "chosen": es.export(res.model, "onnx", example_inputs=val, path=Path(td) / "chosen.onnx"),
        }
        final = {
            k: es.measure(a, data=val, runtime="onnxruntime", threads=(1,), runs=args.runs, peak_memory=False)
            for k, a in arts.items()
        }
        sizes = {k: a.size_bytes for k, a in arts.items()}
    acc = {k: m["accuracy"] for k, m in final.items()}
    lat = {k: m["latency_p50_ms@t1b1"] for k, m in final.items()}
    ev = res.eval
    print(
        f"\n[3] chosen model: {len(res.kept_float)} of {len(sens.layers)} layers in {args.fallback} "
        f"({'budget met' if res.met else 'budget NOT met: best candidate'} on the search subset)"
    )
    print(
        f"    full 10k validation, torch: float {ev['float_metric'] * 100:.2f}, chosen {ev['metric'] * 100:.2f} "
        f"(drop {ev['drop'] * 100:.2f} pt)"
    )
    print(
        f"    full 10k validation, ONNX Runtime: FP32 {acc['fp32'] * 100:.2f}, chosen {acc['chosen'] * 100:.2f} "
        f"(drop {(acc['fp32'] - acc['chosen']) * 100:.2f} pt)"
    )
    print(
        f"    ONNX size: FP32 {sizes['fp32'] / 1024:.0f} KB, chosen {sizes['chosen'] / 1024:.0f} KB "
        f"({sizes['fp32'] / sizes['chosen']:.2f}x smaller; 4-bit weights travel in int8 containers)"
    )
    print(
        f"    ORT latency p50, 1 thread, batch 1: FP32 {lat['fp32']:.3f} ms, chosen {lat['chosen']:.3f} ms "
        f"({lat['fp32'] / lat['chosen']:.2f}x)"
    )
    total = time.perf_counter() - t_start
    print(f"    total wall time {total:.0f} s (search incl. sensitivity {res.seconds:.0f} s)")

    def block(before: float, after: float) -> dict[str, float]:
        return {"before": before, "after": after, "ratio": after / before}

    write_json(
        args.out,
        {
            "benchmark": "quantize_mixed_precision",
            "model": "mobilenet_v2",
            "dataset": "fashion-mnist",
            "config": config.to_dict(),
            "max_accuracy_drop": args.budget,
            "search": args.search,
            "rank_by": args.rank_by,
            "search_samples": len(search_data),
            "sensitivity_samples": sens.samples,
            "met": res.met,
            "fallback": args.fallback,
            "kept_float": list(res.kept_float),
            "layers": len(sens.layers),
            "accuracy_10k_ort": block(acc["fp32"], acc["chosen"]),
            "accuracy_10k_torch": block(ev["float_metric"], ev["metric"]),
            "latency_p50_ms_t1b1_ort": block(lat["fp32"], lat["chosen"]),
            "size_bytes": block(sizes["fp32"], sizes["chosen"]),
            "result": res.to_dict(),
            "seconds": {"search": res.seconds, "total": total},
            "host": host_info(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
        },
        force=True,
    )
    print(f"wrote {args.out}")


def retime(args, train, val) -> None:
    out = Path(args.out)
    rec = json.loads(out.read_text())
    model = es.models.load("mobilenet_v2", "fashion-mnist")
    config = es.QuantConfig.from_dict(rec["config"])
    models = {
        "fp32": model,
        "all_quantized": es.quantize(model, config, calib=train),
        "chosen": es.quantize(
            model,
            config.replace(**{"int8_layers" if rec.get("fallback") == "int8" else "exclude": tuple(rec["kept_float"])}),
            calib=train,
        ),
    }
    with tempfile.TemporaryDirectory() as td:
        arts = {k: es.export(m, "onnx", example_inputs=val, path=Path(td) / f"{k}.onnx") for k, m in models.items()}
        ops = {k: dict(optimized_op_types(a.path)) for k, a in arts.items()}
        acc = {
            k: es.measure(a, data=val, runtime="onnxruntime", threads=(1,), runs=10, peak_memory=False)["accuracy"]
            for k, a in arts.items()
        }
        runners = ort_runners({k: a.path for k, a in arts.items()})
        lat = latencies(runners, val.normalized()[:1].numpy(), 1, 5, args.runs)  # interleaved rounds
    if abs(acc["chosen"] - rec["accuracy_10k_ort"]["after"]) > 0.0005:
        raise SystemExit(
            f"the rebuilt chosen model scores {acc['chosen']:.4f}, the record says "
            f"{rec['accuracy_10k_ort']['after']:.4f}: not the same model, latency not recorded"
        )
    rec["latency_p50_ms_t1b1_ort"] = {
        "before": lat["fp32"],
        "after": lat["chosen"],
        "ratio": lat["chosen"] / lat["fp32"],
        "all_quantized": lat["all_quantized"],
        "accuracy_all_quantized": acc["all_quantized"],
        "ort_ops": ops,
        "measured_at": time.strftime("%F %T"),
        "runs": args.runs,
        "load_avg": [round(v, 2) for v in os.getloadavg()],
        "how": "--latency-only: rebuilt from kept_float; median of 5 interleaved rounds of per-round medians",
    }
    write_json(out, rec, force=True)
    for k in lat:
        print(f"{k:14s} top-1 {acc[k] * 100:6.2f}  ORT p50 1T {lat[k]:.3f} ms  {lat['fp32'] / lat[k]:.2f}x vs FP32")


if __name__ == "__main__":
    main()

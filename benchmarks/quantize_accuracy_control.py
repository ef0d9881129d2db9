"""Benchmark: accuracy-aware quantization, edgeslim's budget search vs NNCF quantize_with_accuracy_control.

MobileNetV2 on Fashion-MNIST (the shipped checkpoint), same data for every row:
  - calibration: the same 512 class-balanced training samples (``calibration_subset(train, 512, seed=0)``);
  - the accuracy budget is checked on the same 2000-sample seeded validation subset (``val.take(2000, seed=0)``)
    by both tools: NNCF's ``validation_fn`` scores an ONNX model on it in ONNX Runtime, edgeslim's
    ``quantize_with_budget`` scores torch fake-quant candidates on it;
  - every row is then scored on the full 10k validation split in ONNX Runtime (the subset is part of it).
Rows: FP32; NNCF ``quantize`` (INT8, ONNX backend); NNCF ``quantize_with_accuracy_control`` (max_drop, absolute);
edgeslim PTQ W8A8 (defaults); edgeslim ``quantize_with_budget`` at W8A8 and at W4A8 (same max drop); optional
``edgeslim-budget-w4a8-replay``: the float layers chosen by ``quantize_mixed_precision.py``'s W4A8 search,
re-applied with ``QuantConfig.exclude`` (one calibration instead of the search, when time is short).
"Float layers" counts the Conv/Gemm/MatMul nodes of each ONNX file whose weight does not come through a
DequantizeLinear (the layers kept in float), out of all weighted nodes. "Integer kernels" counts, in the graph ONNX
Runtime runs (its optimized graph), the conv/matmul nodes that became integer kernels (QLinearConv, QGemm, ...) out
of all conv/matmul nodes: a Q/DQ pair ORT cannot fuse leaves the layer running in float. Latency: batch 1, 1 and 2 threads,
median over interleaved rounds of per-round medians (as ``quantize_mobilenet_v2.py``).

Two phases, because the host is shared: ``--phase accuracy`` builds the ONNX files in ``--work`` and scores them
(rows are cached in the results file, so a killed run resumes); ``--phase latency`` times the files in ``--work`` (and, like ``--phase graphs``, records what ORT runs).

    python benchmarks/quantize_accuracy_control.py --phase accuracy [--max-drop 0.002] [--work DIR]
    python benchmarks/quantize_accuracy_control.py --phase latency [--rounds 5] [--runs 300] [--work DIR]
    python benchmarks/quantize_accuracy_control.py --phase graphs [--work DIR]

Writes benchmarks/results/quantize_accuracy_control.json. Not a test: numbers vary run to run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

import edgeslim as es
from edgeslim.core.io import write_json
from edgeslim.core.metrics import host_info
from edgeslim.data import calibration_subset
from edgeslim.quantize import quantize_with_budget
from edgeslim.runtime import optimized_op_types

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from quantize_mobilenet_v2 import latencies, ort_accuracy, ort_runners  # noqa: E402

WEIGHTED = {"Conv", "Gemm", "MatMul"}
ROWS = (
    "fp32",
    "nncf-quantize",
    "nncf-accuracy-control",
    "edgeslim-w8a8",
    "edgeslim-budget-w8a8",
    "edgeslim-budget-w4a8",
)


def float_layers(path: Path) -> dict[str, int]:
    """Weighted nodes of an ONNX file, and how many of them take a float (not dequantized) weight."""
    g = onnx.load(str(path)).graph
    producer = {o: n for n in g.node for o in n.output}

    def dequantized(name: str) -> bool:
        n = producer.get(name)
        while n is not None and n.op_type in ("Transpose", "Reshape", "Identity", "Cast"):
            n = producer.get(n.input[0])
        return n is not None and n.op_type == "DequantizeLinear"

    nodes = [n for n in g.node if n.op_type in WEIGHTED]
    kept = [n.name for n in nodes if not dequantized(n.input[1])]
    return {"weighted_nodes": len(nodes), "float_nodes": len(kept), "float_node_names": kept}


INT_KERNELS = ("QLinearConv", "QGemm", "QLinearMatMul", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat")
FLOAT_KERNELS = ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul")


def ort_runs(path: Path) -> dict:
    """Which conv/matmul nodes ONNX Runtime runs with integer kernels, from its optimized graph."""
    ops = optimized_op_types(path)
    return {
        "integer_kernels": sum(ops[o] for o in INT_KERNELS),
        "float_kernels": sum(ops[o] for o in FLOAT_KERNELS),
        "quantize_linear": ops["QuantizeLinear"],
        "dequantize_linear": ops["DequantizeLinear"],
        "op_types": dict(ops.most_common()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phase", choices=["accuracy", "latency", "graphs"], required=True)
    ap.add_argument("--max-drop", type=float, default=0.002, help="absolute top-1 drop, a fraction")
    ap.add_argument("--search-samples", type=int, default=2000)
    ap.add_argument("--sensitivity-samples", type=int, default=500)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--work", default="/tmp/edgeslim-accuracy-control")
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument(
        "--redo",
        default="",
        help="rows to measure again although cached (the old ones are kept under 'superseded' with --redo-reason)",
    )
    ap.add_argument("--redo-reason", default="")
    ap.add_argument("--out", default=str(HERE / "results" / "quantize_accuracy_control.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    out, work = Path(args.out), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    res = {} if args.fresh or not out.exists() else json.loads(out.read_text())
    rows: dict[str, dict] = res.setdefault("rows", {})
    for key in filter(None, args.redo.split(",")):
        if key in rows:
            res.setdefault("superseded", {})[key] = {
                **rows.pop(key),
                "reason": args.redo_reason,
                "superseded_at": time.strftime("%F %T"),
            }

    def save() -> None:
        res.update(
            {
                "benchmark": "quantize_accuracy_control",
                "model": "mobilenet_v2",
                "dataset": "fashion-mnist",
                "max_drop": args.max_drop,
                "drop_type": "absolute top-1",
                "search_samples": args.search_samples,
                "calibration_samples": 512,
                "host": host_info(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "onnxruntime": ort.__version__,
            }
        )
        write_json(out, res, force=True)

    if args.phase in ("latency", "graphs"):
        files = {k: work / f"{k}.onnx" for k, r in rows.items() if r.get("accuracy") is not None}
        missing = [k for k, p in files.items() if not p.exists()]
        if missing:
            raise SystemExit(f"ONNX files missing in {work} for {missing}: run --phase accuracy first")
        for k, p in files.items():
            rows[k]["ort_runs"] = ort_runs(p)
        if args.phase == "graphs":
            save()
            print_table(res)
            return
        x1 = np.asarray(es.data.load("fashion-mnist")[1].normalized()[:1].numpy())
        runners = ort_runners(files)
        for t in (1, 2):
            lat = latencies(runners, x1, t, args.rounds, args.runs)
            for k, v in lat.items():
                rows[k][f"latency_ms_{t}t"] = v
        res["latency"] = {"rounds": args.rounds, "runs": args.runs, "batch": 1, "measured_at": time.strftime("%F %T")}
        save()
        print_table(res)
        return

    train, val = es.data.load("fashion-mnist")
    xv, yv = val.normalized().numpy(), val.labels.numpy()
    xc = calibration_subset(train, 512, seed=0).normalized().numpy()
    search = val.take(args.search_samples, seed=0)
    xs, ys = search.normalized().numpy(), search.labels.numpy()
    model = es.models.load("mobilenet_v2", "fashion-mnist")
    fp32 = work / "fp32.onnx"
    if not fp32.exists():
        es.export(model, "onnx", example_inputs=val, path=fp32)
    input_name = onnx.load(str(fp32)).graph.input[0].name

    def finish(key: str, path: Path, t0: float, **extra) -> None:
        rows[key] = {
            "accuracy": ort_accuracy(path, xv, yv),
            "size_bytes": os.path.getsize(path),
            **float_layers(path),
            "seconds": time.perf_counter() - t0,
            **extra,
        }
        save()
        r = rows[key]
        print(
            f"{key:24s} top-1 {r['accuracy'] * 100:6.2f}  float {r['float_nodes']}/{r['weighted_nodes']}  "
            f"{r['size_bytes'] / 1024:8.0f} KB  ({r['seconds']:.0f} s)",
            flush=True,
        )

    for key in args.rows.split(","):
        if key in rows and rows[key].get("accuracy") is not None:
            continue
        path, t0 = work / f"{key}.onnx", time.perf_counter()
        try:
            if key == "fp32":
                finish(key, fp32, t0)
            elif key.startswith("nncf"):
                import nncf

                calib = nncf.Dataset([{input_name: xc[i : i + 1]} for i in range(len(xc))])
                if key == "nncf-quantize":
                    q = nncf.quantize(onnx.load(str(fp32)), calib, subset_size=len(xc))
                    onnx.save(q, str(path))
                    finish(key, path, t0, tool=f"nncf {nncf.__version__}")
                    continue

                def validate(m: onnx.ModelProto, items) -> tuple[float, list[float]]:
                    so = ort.SessionOptions()
                    so.intra_op_num_threads, so.log_severity_level = 2, 3
                    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
                    hits = [float(s.run(None, {input_name: x})[0].argmax(1)[0] == y) for x, y in items]
                    return float(np.mean(hits)), hits

                vdata = nncf.Dataset(
                    [(xs[i : i + 1], int(ys[i])) for i in range(len(xs))], lambda item: {input_name: item[0]}
                )
                q = nncf.quantize_with_accuracy_control(
                    onnx.load(str(fp32)),
                    calib,
                    vdata,
                    validate,
                    max_drop=args.max_drop,
                    drop_type=nncf.DropType.ABSOLUTE,
                    subset_size=len(xc),
                )
                onnx.save(q, str(path))
                finish(
                    key,
                    path,
                    t0,
                    tool=f"nncf {nncf.__version__}",
                    search_accuracy=validate(q, zip((xs[i : i + 1] for i in range(len(xs))), ys))[0],
                )
            elif key == "edgeslim-budget-w4a8-replay":
                # the layers an earlier quantize_with_budget W4A8 search kept in float (quantize_mixed_precision.py,
                # same model, calibration, subset and budget), replayed as QuantConfig.exclude: one calibration
                prev = json.loads((HERE / "results" / "quantize_mixed_precision.json").read_text())
                cfg = es.QuantConfig(weight_bits=4, num_samples=512, exclude=tuple(prev["kept_float"]))
                q = es.quantize(model, cfg, calib=train)
                es.export(q, "onnx", example_inputs=val, path=path, force=True)
                finish(
                    key,
                    path,
                    t0,
                    tool=f"edgeslim {es.__version__}",
                    config=cfg.to_dict(),
                    kept_float=list(prev["kept_float"]),
                    source="kept_float of benchmarks/results/quantize_mixed_precision.json (search not re-run here)",
                    search_accuracy_there=prev["result"]["metric"],
                    met_there=prev["met"],
                )
            elif key == "edgeslim-w8a8":
                cfg = es.QuantConfig(num_samples=512)
                q = es.quantize(model, cfg, calib=train)
                es.export(q, "onnx", example_inputs=val, path=path, force=True)
                finish(key, path, t0, tool=f"edgeslim {es.__version__}", config=cfg.to_dict())
            else:
                bits = 8 if key.endswith("w8a8") else 4
                cfg = es.QuantConfig(weight_bits=bits, num_samples=512)
                budget = es.BudgetConfig(
                    max_accuracy_drop=args.max_drop,
                    quant=cfg,
                    search="bisect",
                    rank_by="sqnr",
                    sensitivity_samples=args.sensitivity_samples,
                )
                r = quantize_with_budget(model, budget, data=(train, search))
                es.export(r.model, "onnx", example_inputs=val, path=path, force=True)
                finish(
                    key,
                    path,
                    t0,
                    tool=f"edgeslim {es.__version__}",
                    config=cfg.to_dict(),
                    met=r.met,
                    kept_float=list(r.kept_float),
                    search_float_metric=r.float_metric,
                    search_accuracy=r.metric,
                    search_drop=r.drop,
                )
        except Exception as e:  # an anchor that fails is a result: record the exact error
            rows[key] = {
                "accuracy": None,
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc()[-4000:],
                "seconds": time.perf_counter() - t0,
            }
            save()
            print(f"{key}: FAILED {type(e).__name__}: {e}", flush=True)
    print_table(res)


def print_table(res: dict) -> None:
    rows = res["rows"]
    fp = rows.get("fp32", {}).get("accuracy")
    print(
        f"\nMobileNetV2 Fashion-MNIST, top-1 on 10k val in ONNX Runtime, max drop {res['max_drop'] * 100:.1f} pt "
        f"(checked on {res['search_samples']} val samples)"
    )
    hdr = (
        f"{'row':24s} {'top-1':>7s} {'drop pt':>8s} {'float layers':>12s} {'int kernels':>11s} {'size KB':>8s} "
        f"{'1T ms':>7s} {'2T ms':>7s}"
    )
    print(hdr + "\n" + "-" * len(hdr))
    for k, r in rows.items():
        if r.get("accuracy") is None:
            print(f"{k:24s} FAILED: {r.get('error')}")
            continue
        lat = [f"{r[c]:7.3f}" if c in r else f"{'-':>7s}" for c in ("latency_ms_1t", "latency_ms_2t")]
        drop = (fp - r["accuracy"]) * 100 if fp is not None else float("nan")
        o = r.get("ort_runs")
        ik = f"{o['integer_kernels']:>4d} of {o['integer_kernels'] + o['float_kernels']:<3d}" if o else f"{'-':>11s}"
        print(
            f"{k:24s} {r['accuracy'] * 100:7.2f} {drop:8.2f} {r['float_nodes']:>5d} of {r['weighted_nodes']:<3d} "
            f"{ik:>11s} {r['size_bytes'] / 1024:8.0f} {lat[0]} {lat[1]}"
        )


if __name__ == "__main__":
    main()

"""ELPV solar-cell inspection at 224x224: fine-tuned MobileNetV2 and EfficientNet-Lite0, FP32 vs INT8 from edgeslim,
ONNX Runtime's ``quantize_static`` and NNCF, each file run in ONNX Runtime and in OpenVINO, batch 1, 1 and 2 threads.

The models are fine-tuned by benchmarks/elpv_finetune.py (recipe benchmarks/configs/elpv_finetune.yaml; the weights
are cached in $EDGESLIM_CACHE/elpv/ and reused; without them this script fine-tunes first). Per model it writes:

- FP32: ``edgeslim.export`` of the fine-tuned model;
- edgeslim INT8, four settings: per-channel (the default config), per-tensor + cross-layer equalization,
  cross-layer equalization with the weight granularity chosen per layer (one scale where the weights keep 30 dB
  SQNR with it: ``QuantConfig.per_tensor_sqnr_db``; per channel elsewhere), and the per-layer choice alone, each
  ``edgeslim.quantize`` on 256 calibration images, then ``edgeslim.export`` (whose validation gate runs with its
  default floors; a gate failure is recorded and the file re-exported ungated so the row is still measured);
- ORT ``quant_pre_process`` + ``quantize_static`` (QDQ, U8 activations, S8 per-channel weights, MinMax);
- NNCF ``nncf.quantize`` on the FP32 ONNX model (default preset).

Every file runs in ONNX Runtime and OpenVINO (the ONNX file read directly). Columns: accuracy on the full validation
split (655 cells) in that runtime and its drop against FP32 in the same runtime, top-1 agreement and cosine of the
logits against FP32 ONNX in ORT, file size and ratio, median latency at batch 1 (all files, runtimes and both models
interleaved per thread count: ``edgeslim.runtime.interleaved_latency``) and speed against FP32 in the same runtime
and threads, and PTQ wall time (calibration + conversion, plus edgeslim's built-in export validation, which the peer
tools do not have). Host CPU and ISA flags are recorded.

    python benchmarks/elpv_int8.py --smoke      # mobilenet_v2 only, 32 val cells, 32 calibration, short timing
    python benchmarks/elpv_int8.py              # both models, full validation split, 256 calibration images
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from _harness import host  # noqa: E402
from elpv_finetune import finetuned_model, load_recipe  # noqa: E402
from int8_224 import isa_flags, ort_quantize_static  # noqa: E402

import edgeslim as es  # noqa: E402
from edgeslim.core.errors import EdgeslimError  # noqa: E402
from edgeslim.core.io import write_json  # noqa: E402
from edgeslim.core.metrics import compare  # noqa: E402
from edgeslim.data import calibration_subset  # noqa: E402
from edgeslim.runtime import OpenVinoRunner, OrtRunner, interleaved_latency  # noqa: E402

log = logging.getLogger("elpv_int8")
RUNTIMES = {"ort": OrtRunner, "openvino": OpenVinoRunner}
EDGESLIM_VARIANTS = {
    "edgeslim per-channel": {},
    "edgeslim per-tensor+CLE": {"per_channel": False, "equalize": True},
    # per layer: one weight scale where the equalized weights keep 30 dB with it (QuantConfig.per_tensor_sqnr_db)
    "edgeslim mixed+CLE": {"per_tensor_sqnr_db": 30.0, "equalize": True},
    # the same rule without CLE: what the ONNX capture (models fx cannot trace, e.g. timm's EfficientNet-Lite0) does
    "edgeslim mixed": {"per_tensor_sqnr_db": 30.0},
}
UNGATED = es.ValidationFloors(
    min_top1_agreement=0.0, float_min_cosine=-1.0, float_min_sqnr_db=-100.0, float_top1_agreement=0.0
)


def logits(runner: Any, x: np.ndarray, batch: int = 32) -> np.ndarray:
    return np.concatenate([runner.run(x[i : i + batch]) for i in range(0, len(x), batch)])


def edgeslim_int8(model: torch.nn.Module, calib, val, path: Path, overrides: dict) -> dict:
    t0 = time.perf_counter()
    q = es.quantize(copy.deepcopy(model), es.QuantConfig(num_samples=len(calib), **overrides), data=calib)
    t_quant = time.perf_counter() - t0
    gate = "passed"
    t1 = time.perf_counter()
    try:
        art = es.export(q, "onnx", example_inputs=val, path=path, force=True)
    except EdgeslimError as e:  # the gate refused the file: say so, then measure it anyway
        gate = f"failed: {str(e).splitlines()[0][:300]}"
        art = es.export(q, "onnx", example_inputs=val, path=path, force=True, floors=UNGATED)
    t_export = time.perf_counter() - t1
    r = q.report
    return {
        "path": art.path,
        "ptq_seconds": round(t_quant + t_export, 2),
        "ptq_parts": {"quantize_s": round(t_quant, 2), "export_and_validate_s": round(t_export, 2)},
        "config": {"per_channel": True, "equalize": False, **overrides, "num_samples": len(calib)},
        "export_gate": gate,
        "capture": r.capture,
        "integer_mac_share_report": r.integer_mac_share,
        "integer_mac_share_file": art.meta.get("integer_macs", {}).get("share"),
        "export_validation_vs_float": {
            k: art.validation.get("vs_float_reference", {}).get(k) for k in ("cosine", "top1_agreement")
        },
    }


def nncf_int8(fp32: Path, out: Path, calib: np.ndarray) -> dict:
    import nncf
    import onnx

    t0 = time.perf_counter()
    model = onnx.load(str(fp32))
    name = model.graph.input[0].name
    q = nncf.quantize(
        model, nncf.Dataset([{name: calib[i : i + 1]} for i in range(len(calib))]), subset_size=len(calib)
    )
    onnx.save(q, str(out))
    return {"path": out, "ptq_seconds": round(time.perf_counter() - t0, 2), "tool": f"nncf {nncf.__version__}"}


#: edgeslim variants that could not be made, with the one-line reason (written to the JSON and printed)
FAILED: list[dict] = []


def build_files(name: str, model, train, val, work: Path, args) -> tuple[dict[str, dict], Any]:
    """Every file of one model: ``{variant: {path, ptq_seconds, ...}}``."""
    calib_ds = calibration_subset(train, args.calib, seed=0)
    calib = calib_ds.normalized()
    files: dict[str, dict] = {}
    fp32 = es.export(model, "onnx", example_inputs=val.take(32, seed=0), path=work / f"{name}-fp32.onnx", force=True)
    files["FP32"] = {"path": fp32.path}
    for variant, overrides in EDGESLIM_VARIANTS.items():
        slug = variant.split()[1].replace("+", "-")
        try:
            files[variant] = edgeslim_int8(
                model, calib_ds, val.take(64, seed=0), work / f"{name}-es-{slug}.onnx", overrides
            )
        except EdgeslimError as e:  # e.g. CLE needs the fx capture, which cannot trace this model: a row that says so
            FAILED.append({"model": name, "variant": variant, "error": str(e).splitlines()[0][:400]})
            log.warning("%s %s: failed: %s", name, variant, FAILED[-1]["error"])
            continue
        log.warning(
            "%s %s: PTQ %.1f s, gate %s", name, variant, files[variant]["ptq_seconds"], files[variant]["export_gate"]
        )
    ort_path = work / f"{name}-ort.onnx"
    files["ORT quantize_static"] = {"path": ort_path, **ort_quantize_static(fp32.path, ort_path, calib)}
    try:
        files["NNCF"] = nncf_int8(fp32.path, work / f"{name}-nncf.onnx", calib.numpy())
    except ImportError:
        log.warning("nncf is not installed: its rows are left out (pip install nncf)")
    return files, fp32


def fidelity(name: str, files: dict[str, dict], x_val: np.ndarray, y_val: np.ndarray) -> dict:
    """Accuracy of every (file, runtime) on the validation split; fidelity against FP32 ONNX in ORT."""
    out: dict[str, dict] = {}
    ref = None
    for variant, f in files.items():
        for rt, cls in RUNTIMES.items():
            try:
                lg = logits(cls(f["path"], threads=2), x_val)
            except EdgeslimError as e:
                out[f"{variant}|{rt}"] = {"error": str(e)[:300]}
                continue
            if ref is None:
                ref = lg  # FP32 in ORT comes first
            c = compare(ref, lg)
            out[f"{variant}|{rt}"] = {
                "accuracy": float((lg.argmax(1) == y_val).mean()),
                "top1_agreement_vs_fp32_ort": c["top1_agreement"],
                "cosine_vs_fp32_ort": c["cosine"],
            }
        log.warning(
            "%s %s: accuracy ORT %.4f", name, variant, out.get(f"{variant}|ort", {}).get("accuracy", float("nan"))
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="mobilenet_v2, 32 val / 32 calibration cells, short timing")
    ap.add_argument("--models", nargs="+", default=None, help="models of the fine-tune recipe (default: all)")
    ap.add_argument("--calib", type=int, default=256, help="calibration images (from the training split)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--val", type=int, default=0, help="validation cells (0: the whole split)")
    ap.add_argument("--out", default="benchmarks/results/elpv_int8.json")
    ap.add_argument("--label", default="under load", help="how the host was loaded while timing (recorded)")
    args = ap.parse_args()
    if args.smoke:
        args.models, args.calib, args.val, args.threads, args.rounds, args.runs = ["mobilenet_v2"], 32, 32, [1], 2, 5
        args.out = args.out.replace(".json", "-smoke.json")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    recipe = load_recipe()
    names = args.models or list(recipe["models"])
    rows: list[dict] = []
    timed: dict[str, Any] = {}
    models: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as td:
        work = Path(td)
        for name in names:
            model, rec = finetuned_model(name, recipe)
            train, val = es.data.load(
                "elpv", seed=recipe["split_seed"], preprocess=recipe["models"][name]["preprocess"]
            )
            if args.val:
                val = val.take(args.val, seed=0)
            x_val, y_val = val.normalized().numpy(), val.labels.numpy()
            files, _ = build_files(name, model, train, val, work, args)
            fid = fidelity(name, files, x_val, y_val)
            models[name] = {
                "finetune": {k: rec[k] for k in ("val_accuracy", "minutes", "history", "train_config", "recipe_key")},
                "val_size": len(val),
            }
            fp32_size = files["FP32"]["path"].stat().st_size
            for variant, f in files.items():
                for rt in RUNTIMES:
                    key = f"{name}|{variant}|{rt}"
                    row = {
                        "model": name,
                        "variant": variant,
                        "runtime": rt,
                        **fid[f"{variant}|{rt}"],
                        "size_mb": round(f["path"].stat().st_size / 2**20, 3),
                        "size_ratio_vs_fp32": round(fp32_size / f["path"].stat().st_size, 2),
                        **{k: v for k, v in f.items() if k != "path"},
                    }
                    rows.append(row)
                    if "error" not in row:
                        timed[key] = (RUNTIMES[rt], f["path"], x_val[:1])
        for row in rows:  # accuracy drop against FP32 in the same runtime
            base = next(
                r
                for r in rows
                if r["model"] == row["model"] and r["variant"] == "FP32" and r["runtime"] == row["runtime"]
            )
            if "accuracy" in row and "accuracy" in base:
                row["accuracy_drop_pt"] = round(100 * (base["accuracy"] - row["accuracy"]), 2)
        for t in args.threads:  # all models, files and runtimes in one interleaved run per thread count
            runners = {k: (lambda r=cls(p, threads=t), x=x: r.run(x)) for k, (cls, p, x) in timed.items()}
            lat = interleaved_latency(runners, rounds=args.rounds, runs=args.runs, warmup=3, shuffle=True)
            for row in rows:
                key = f"{row['model']}|{row['variant']}|{row['runtime']}"
                if key not in lat:
                    continue
                base = lat[f"{row['model']}|FP32|{row['runtime']}"]["median_of_rounds_ms"]
                base_ort = lat[f"{row['model']}|FP32|ort"]["median_of_rounds_ms"]
                ms = lat[key]["median_of_rounds_ms"]
                row[f"latency_{t}T"] = {
                    "median_ms": round(ms, 3),
                    "x_fp32_same_runtime": round(base / ms, 3),
                    "x_fp32_ort": round(base_ort / ms, 3),
                    "spread_pct": round(lat[key]["round_spread_pct"], 1),
                }
    result = {
        "benchmark": "elpv_int8",
        "task": "ELPV solar cells, functional vs defective (defect probability >= 0.5), 224x224, batch 1",
        "smoke": args.smoke,
        "timing_label": args.label,
        "calibration_images": args.calib,
        "host": {**host(), "isa": isa_flags()},
        "software": {m: __import__(m).__version__ for m in ("onnxruntime", "openvino", "nncf", "torch")},
        "models": models,
        "rows": rows,
        "failed": FAILED,
    }
    write_json(args.out, result, force=True)
    print(markdown(result, args.threads))
    for f in FAILED:
        print(f"| {f['model']} | {f['variant']} | failed: {f['error']} |")


def markdown(result: dict, threads: list[int]) -> str:
    head = (
        "| model | file | runtime | val acc | drop pt | top-1 agr. | cosine | MB (×) | "
        + " | ".join(f"{t}T ms (×FP32)" for t in threads)
        + " | PTQ s |"
    )
    lines = [
        f"ELPV at 224², batch 1, {result['host'].get('cpu', '')} {','.join(result['host']['isa'])}; timing "
        f"{result['timing_label']}",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['variant']} | {r['runtime']} | error: {r['error'][:80]} |")
            continue
        lat = " | ".join(
            f"{r[f'latency_{t}T']['median_ms']:.2f} ({r[f'latency_{t}T']['x_fp32_same_runtime']:.2f}×)"
            if f"latency_{t}T" in r
            else "–"
            for t in threads
        )
        ptq = f"{r['ptq_seconds']:.1f}" if "ptq_seconds" in r else "–"
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['runtime']} | {100 * r['accuracy']:.2f}% | "
            f"{r.get('accuracy_drop_pt', 0):+.2f} | {r['top1_agreement_vs_fp32_ort']:.3f} | "
            f"{r['cosine_vs_fp32_ort']:.4f} | {r['size_mb']:.2f} ({r['size_ratio_vs_fp32']:.2f}×) | {lat} | {ptq} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    main()

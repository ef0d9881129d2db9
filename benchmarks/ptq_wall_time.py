"""PTQ wall time at 224x224: edgeslim (quantize + export with validation) vs ORT (quant_pre_process + quantize_static).

Both quantize the same model on the same 256 calibration images (random crops of scikit-learn's sample photos, see
``int8_224.calibration_images``); the rounds alternate between the two tools so load drifting on a shared host hits
both alike. edgeslim's time is the whole path a user takes: ``edgeslim.quantize`` (capture, calibration, conversion)
then ``edgeslim.export`` to ONNX (export, conversion, validation against the quantized and the FP32 model on
``--val`` samples, integer-MAC share); its per-phase timings come from ``QuantReport.timings`` and the artifact's
``meta["timings"]``. ORT's time is pre-processing plus ``quantize_static`` (U8S8 per-channel QDQ, MinMax), which
validates nothing.

    python benchmarks/ptq_wall_time.py --models resnet18 mobilenet_v2 effnet_like --rounds 3
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from int8_224 import (  # noqa: E402
    calibration_images,
    effnet_like,
    isa_flags,
    mobilenet_v2,
    ort_quantize_static,
    resnet18,
)

import edgeslim as es  # noqa: E402
from edgeslim.core.io import write_json  # noqa: E402
from edgeslim.core.metrics import host_info  # noqa: E402

#: ResNet-18 is random-init: only the quantized-reference floor gates (see int8_224.py)
SPEED_FLOORS = dict(min_top1_agreement=0.0, float_min_cosine=-1.0, float_min_sqnr_db=-100.0, float_top1_agreement=0.0)


def edgeslim_once(model: torch.nn.Module, calib: torch.Tensor, val: torch.Tensor, out: Path) -> dict:
    t0 = time.perf_counter()
    q = es.quantize(copy.deepcopy(model), es.QuantConfig(num_samples=len(calib)), data=calib)
    t1 = time.perf_counter()
    art = es.export(q, "onnx", example_inputs=val, path=out, force=True, floors=es.ValidationFloors(**SPEED_FLOORS))
    t2 = time.perf_counter()
    return {
        "seconds": round(t2 - t0, 2),
        "quantize_seconds": round(t1 - t0, 2),
        "export_seconds": round(t2 - t1, 2),
        "quantize_phases": getattr(q.report, "timings", None),
        "calibration_runtime": getattr(q.report, "calibration_runtime", None),
        "export_phases": art.meta.get("timings"),
        "capture": q.report.capture,
        "vs_fp32": {k: art.validation["vs_float_reference"][k] for k in ("cosine", "sqnr_db", "top1_agreement")},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2", "effnet_like"])
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--val", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--label", default="", help="a note stored with the result (e.g. 'under load', 'before')")
    ap.add_argument("--out", default="benchmarks/results/ptq_wall_time.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    calib = calibration_images(args.calib, 224)
    val = calibration_images(args.val, 224, seed=1)
    builders = {"mobilenet_v2": mobilenet_v2, "resnet18": resnet18, "effnet_like": lambda: effnet_like(224)}
    rows = []
    with tempfile.TemporaryDirectory() as td:
        work = Path(td)
        for name in args.models:
            model = builders[name]()
            fp32 = es.export(model, "onnx", example_inputs=val, path=work / f"{name}-fp32.onnx").path
            runs: dict[str, list] = {"edgeslim": [], "ort_quantize_static": []}
            for r in range(args.rounds):
                order = ["edgeslim", "ort_quantize_static"] if r % 2 == 0 else ["ort_quantize_static", "edgeslim"]
                for tool in order:
                    if tool == "edgeslim":
                        runs[tool].append(edgeslim_once(model, calib, val, work / f"{name}-es.onnx"))
                    else:
                        runs[tool].append(ort_quantize_static(fp32, work / f"{name}-ort.onnx", calib))
            med = {k: statistics.median(x.get("seconds", x.get("ptq_seconds")) for x in v) for k, v in runs.items()}
            rows.append({"model": name, "median_seconds": med, "runs": runs})
            logging.getLogger("ptq_wall_time").warning(
                "%s: edgeslim %.1f s (quantize+export+validation), ORT %.1f s (pre-process+quantize_static)",
                name,
                med["edgeslim"],
                med["ort_quantize_static"],
            )
    write_json(
        args.out,
        {
            "benchmark": "ptq_wall_time",
            "label": args.label,
            "input": [1, 3, 224, 224],
            "calibration_images": args.calib,
            "validation_samples": args.val,
            "host": {**host_info(), "isa": isa_flags()},
            "rows": rows,
        },
        force=True,
    )


if __name__ == "__main__":
    main()

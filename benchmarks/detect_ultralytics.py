"""Benchmark: Ultralytics YOLOv8n trained here on fmnist-detect (160x160), and Ultralytics' own deployed exports.

The peer side of issue 19. Ultralytics (AGPL-3.0) is an optional extra for this benchmark alone
(``pip install 'edgeslim[yolo]'``): edgeslim's library never imports it and no code of it is copied here; the
weights trained by this script stay in the cache (``~/.cache/edgeslim/ultralytics/``), never in the repository.

Steps (each a sub-command; ``all`` runs them in order and every one reuses what an earlier run left):

  prepare  fmnist-detect's COCO files -> Ultralytics' YOLO layout in the cache (image symlinks,
           ``labels/*.txt`` normalised cx cy w h, a ``data.yaml``); deterministic, written atomically, reused.
  train    ``YOLO("yolov8n.yaml")`` (built from its yaml, no hub weights) trained by Ultralytics' own trainer on the
           CPU, imgsz 160, under a wall-time budget (``--hours``, Ultralytics' ``time=``) and an ``--epochs`` cap;
           resumable (``last.pt``). Run it niced in the background: the CPU is shared.
  export   from the same ``best.pt`` (Ultralytics 8.4 spells INT8 ``quantize=8``; ``int8=True`` is deprecated):
           ONNX FP32 (``export(format="onnx")``; ``simplify=False``: onnxslim is not installed);
           ORT ``quantize_static`` on that file (U8S8, per-channel, QDQ, after ``quant_pre_process``, every op ORT
           quantizes; the first 256 train images as Ultralytics preprocesses them: RGB, /255, NCHW);
           Ultralytics' own ONNX INT8 (``export(format="onnx", quantize=8)``: ORT quantize_static on Conv/Gemm/MatMul
           only, ORT's defaults otherwise); OpenVINO FP32 and INT8 (``export(format="openvino", quantize=8)``: NNCF,
           the Detect head's decode left in float); LiteRT INT8 (``format="tflite"``, which 8.4 maps to its
           litert-torch + ai-edge-quantizer export); edgeslim's own INT8 of the FP32 ONNX file
           (``edgeslim.quantize(path, QuantConfig(capture="onnx"))``: the detector head's float nodes found by the
           range-ratio rule and the tail sensitivity pass). Every INT8 export calibrates on the same first 256 train
           images (``split="train"``, ``fraction=256/4000``; Ultralytics' default would calibrate on val).
  eval     mAP of every deployed file in its own runtime (ONNX Runtime, OpenVINO, LiteRT; 1 thread, batch 1) on the
           full val split, plus the PyTorch model through the same decode and Ultralytics' own ``model.val()``;
           latency at batch 1, 1 and 2 threads, median over interleaved rounds of per-round medians.

Every row is decoded the same way (:func:`edgeslim.core.yolo_layout.from_yolov8` on the ``[1, 4 + C, A]`` output,
then :func:`postprocess`: multi-label candidates with score >= 0.001, class-aware ``torchvision.ops.batched_nms`` at
IoU 0.7, at most 100 boxes per image: Ultralytics' validation settings) and scored by pycocotools
(:func:`edgeslim.core.metrics.coco_map`). Other detectors' files join the same table with
``--row NAME=RUNTIME:LAYOUT:PATH`` (or through :func:`evaluate_row` / :func:`latency_table` and a ``decode``).

    nohup nice -n 10 python benchmarks/detect_ultralytics.py train --hours 0.7 &   # background, resumable
    python benchmarks/detect_ultralytics.py eval [--rounds 5] [--runs 50] [--row ...]

Writes benchmarks/results/detect_ultralytics.json and prints a markdown table. Not a test: numbers vary run to run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# Ultralytics must stay offline: no analytics, no pip auto-installs; set before it is imported
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "False")

import numpy as np

HERE = Path(__file__).parent
CACHE = Path(os.environ.get("EDGESLIM_CACHE", Path.home() / ".cache" / "edgeslim")) / "ultralytics"
SIZE = 160
DATASET = "fmnist-detect"
#: post-processing of every row (Ultralytics' own validation settings)
CONF, IOU, MAX_DET = 0.001, 0.7, 100
CALIB_IMAGES = 256

log = logging.getLogger("detect_ultralytics")


# ---------------------------------------------------------------------------------------------------- prepare


def yolo_dataset(train: Any, val: Any, root: Path = CACHE) -> Path:
    """Ultralytics' YOLO layout of a square detection set, in ``root``; returns the ``data.yaml``.

    ``images/<split>/<file>`` are symlinks to the dataset's own images, ``labels/<split>/<stem>.txt`` hold one line
    per box: ``class cx cy w h`` normalised to [0, 1] (crowd regions, which YOLO labels cannot express, are left
    out: fmnist-detect has none). The folder's name carries a digest of both annotation files, so a changed set gets a
    new folder; it is built in a temporary folder and renamed into place, so a killed run leaves nothing half-written.
    """
    import hashlib

    h = hashlib.sha256()
    for ds in (train, val):
        h.update(Path(ds.annotation_file).read_bytes())
    out = root / f"{DATASET}-{train.image_size}-yolo-{h.hexdigest()[:10]}"
    if (out / "data.yaml").exists():
        return out / "data.yaml"
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=root))
    s = train.image_size
    for split, ds in (("train", train), ("val", val)):
        (tmp / "images" / split).mkdir(parents=True)
        (tmp / "labels" / split).mkdir(parents=True)
        for i, r in enumerate(ds.records):
            if (r.width, r.height) != (s, s):
                raise SystemExit(f"{r.path}: {r.width}x{r.height}, the YOLO copy needs {s}x{s} images (no letterbox)")
            name = f"{r.image_id:07d}{r.path.suffix.lower()}"  # one name per image id: ids, not file names, are unique
            os.symlink(r.path.resolve(), tmp / "images" / split / name)
            t = ds.target(i)
            b = t["boxes"].numpy().astype(np.float64)
            cx, cy = (b[:, 0] + b[:, 2]) / 2 / s, (b[:, 1] + b[:, 3]) / 2 / s
            w, hh = (b[:, 2] - b[:, 0]) / s, (b[:, 3] - b[:, 1]) / s
            lines = [
                f"{int(c)} {x:.6f} {y:.6f} {ww:.6f} {hv:.6f}\n"
                for c, x, y, ww, hv in zip(t["labels"].tolist(), cx, cy, w, hh)
            ]
            (tmp / "labels" / split / f"{r.image_id:07d}.txt").write_text("".join(lines))
    names = "\n".join(f"  {k}: {json.dumps(c)}" for k, c in enumerate(train.classes))
    (tmp / "data.yaml").write_text(
        f"# {DATASET} {s}x{s} in Ultralytics' YOLO layout, written by benchmarks/detect_ultralytics.py\n"
        f"path: {out}\ntrain: images/train\nval: images/val\nnames:\n{names}\n"
    )
    try:
        os.rename(tmp, out)
    except OSError:  # another run finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return out / "data.yaml"


def load_data() -> tuple[Any, Any]:
    import edgeslim as es

    return es.data.load(DATASET, size=SIZE)


def offline_ultralytics() -> Any:
    """Import ultralytics with nothing that reaches the network: ``YOLO_OFFLINE`` (no analytics / hub),
    ``YOLO_AUTOINSTALL=False`` (no pip), and its font check, which sends a HEAD request to GitHub for Arial.ttf
    even when offline, replaced by a no-op (``plots=False`` draws nothing)."""
    import ultralytics
    import ultralytics.data.utils as du
    import ultralytics.utils.checks as uc

    def no_font(font: str = "Arial.ttf") -> None:
        return None

    du.check_font = uc.check_font = no_font
    from ultralytics.utils import SETTINGS

    if SETTINGS.get("sync", False):
        SETTINGS.update({"sync": False})
    return ultralytics


# ---------------------------------------------------------------------------------------------------- train

RUN_NAME = "yolov8n-fmnist-detect-160"


def run_dir() -> Path:
    return CACHE / "runs" / RUN_NAME


def train(hours: float, epochs: int, batch: int, workers: int) -> dict:
    """Ultralytics' own trainer on the CPU; resumes from ``last.pt`` when a run was cut off. Returns the record
    written to ``train.json`` beside the weights."""
    tr, va = load_data()
    data = yolo_dataset(tr, va)
    ul = offline_ultralytics()
    from ultralytics import YOLO

    d = run_dir()
    last, best = d / "weights" / "last.pt", d / "weights" / "best.pt"
    rec_path = d / "train.json"
    if rec_path.exists() and best.exists():
        log.info("trained already: %s", rec_path)
        return json.loads(rec_path.read_text())
    t0 = time.time()
    if last.exists():
        log.info("resuming %s", last)
        model = YOLO(str(last))
        model.train(resume=True, plots=False)
    else:
        model = YOLO("yolov8n.yaml")
        model.train(
            data=str(data), imgsz=SIZE, epochs=epochs, time=hours, batch=batch, workers=workers, device="cpu",
            project=str(d.parent), name=d.name, exist_ok=True, pretrained=False, amp=False, plots=False,
            seed=0, deterministic=True, verbose=True,
        )  # fmt: skip
    rows = _results_csv(d / "results.csv")
    # Ultralytics' results.csv holds the cumulative training seconds (resumed runs included) in "time"
    minutes = rows[-1]["time"] / 60 if rows and "time" in rows[-1] else (time.time() - t0) / 60
    rec = {
        "ultralytics": ul.__version__,
        "model": "yolov8n.yaml (built from yaml, no pretrained weights)",
        "data": str(data),
        "imgsz": SIZE, "batch": batch, "workers": workers, "device": "cpu", "time_budget_h": hours,
        "note": "Ultralytics sets dataloader workers to 0 when training on the CPU (its trainer), whatever --workers",
        "epochs_cap": epochs,
        "epochs_done": len(rows),
        "train_minutes": round(minutes, 1),
        "last_epoch": rows[-1] if rows else None,
        "best": str(best),
        "under_load": os.getloadavg(),
    }  # fmt: skip
    rec_path.write_text(json.dumps(rec, indent=2))
    return rec


def _results_csv(path: Path) -> list[dict]:
    import csv

    if not path.exists():
        return []
    with open(path) as f:
        return [{k.strip(): float(v) for k, v in row.items()} for row in csv.DictReader(f)]


# ---------------------------------------------------------------------------------------------------- export


def _size_mb(path: Path) -> float:
    """A file's size, or an OpenVINO IR's (.xml + .bin), in MB."""
    files = [path, path.with_suffix(".bin")] if path.suffix == ".xml" else [path]
    return round(sum(f.stat().st_size for f in files if f.exists()) / 1e6, 3)


def calib_images(train: Any, n: int = CALIB_IMAGES) -> np.ndarray:
    """The first ``n`` train images as Ultralytics feeds them: RGB, /255, NCHW float32 (letterbox to 160 is a no-op
    on 160x160 images). The same images Ultralytics' own INT8 exports calibrate on (``split="train"`` and
    ``fraction=n/len(train)`` keep the first ``n`` files, which are in image-id order)."""
    return np.stack([train.read_image(i).transpose(2, 0, 1) for i in range(n)]).astype(np.float32) / 255.0


def ort_quantize_static(fp32: Path, out: Path, calib: np.ndarray) -> None:
    """ONNX Runtime's static INT8 with the settings its docs give for x86: ``quant_pre_process`` first, QDQ, U8
    activations, per-channel S8 weights, MinMax calibration; every op it supports is quantized (its default)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    name = onnx.load(str(fp32), load_external_data=False).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.i = 0

        def get_next(self) -> dict | None:
            if self.i >= len(calib):
                return None
            self.i += 1
            return {name: calib[self.i - 1 : self.i]}

        def rewind(self) -> None:
            self.i = 0

    pre = out.with_name(out.stem + "_pre.onnx")
    quant_pre_process(str(fp32), str(pre))
    quantize_static(
        str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
    )  # fmt: skip
    pre.unlink(missing_ok=True)


EDGESLIM_ROW = "edgeslim INT8 (quantize capture=onnx, head by sensitivity)"
EDGESLIM_PLACED_ROW = "edgeslim INT8, placement measured here (1 thread)"
EDGESLIM_OV_ROW = "edgeslim INT8, laid out for OpenVINO (runtime='openvino')"
EDGESLIM_OV_SELECTED_ROW = "edgeslim INT8 for OpenVINO, calibration chosen on held-out train images"
#: train images (after the calibration ones) that score each calibration method for the selected row
SELECT_IMAGES = 500


def edgeslim_int8(
    fp32: Path, out: Path, train: Any, placement: str = "all", runtime: str = "onnxruntime"
) -> dict[str, Any]:
    """edgeslim's static INT8 of the FP32 ONNX file (``quantize(path, QuantConfig(capture="onnx"))``, its defaults:
    MSE activation ranges, U8 activations, per-channel S8 weights, the head's float nodes found by the range-ratio
    rule and the tail sensitivity pass), calibrated on the same first 256 train images (a DetectionDataset).
    Returns what the report says (summary, the nodes kept float and why, integer-MAC share)."""
    import edgeslim as es

    q = es.quantize(
        str(fp32),
        es.QuantConfig(capture="onnx", num_samples=CALIB_IMAGES, placement=placement, runtime=runtime),
        data=train.subset(CALIB_IMAGES),
    )
    out.write_bytes(q.onnx_bytes())
    r = q.report
    return {
        "settings": "edgeslim.quantize(capture='onnx') defaults: mse ranges, U8 activations, S8 per-channel weights"
        + (f"; placement={placement!r}" if placement != "all" else "")
        + (f"; runtime={runtime!r} (Q/DQ layout)" if runtime != "onnxruntime" else ""),
        "placement": r.placement,
        "layout": r.layout,
        "calibration": f"first {CALIB_IMAGES} train images (DetectionDataset, RGB /255 NCHW)",
        "summary": r.summary(),
        "kept_float": list(r.float_ops),
        "integer_mac_share": r.integer_mac_share,
        "tail": r.tail,
    }


def edgeslim_int8_selected(fp32: Path, out: Path, train: Any) -> dict[str, Any]:
    """edgeslim's INT8 laid out for OpenVINO with the activation-range method (``mse``, ``percentile``, ``minmax``)
    that keeps the most mAP on ``SELECT_IMAGES`` train images the calibration did not use, scored in OpenVINO: the
    choice ``optimize`` makes on its validation split, made here without touching the val split it is reported on."""
    import edgeslim as es

    held = train.subset(list(range(CALIB_IMAGES, CALIB_IMAGES + SELECT_IMAGES)))
    images = val_images(held)
    scores: dict[str, float] = {}
    files: dict[str, bytes] = {}
    reports: dict[str, Any] = {}
    for method in ("mse", "percentile", "minmax"):
        q = es.quantize(
            str(fp32),
            es.QuantConfig(capture="onnx", num_samples=CALIB_IMAGES, runtime="openvino", calibration=method),
            data=train.subset(CALIB_IMAGES),
        )
        files[method], reports[method] = q.onnx_bytes(), q.report
        with tempfile.TemporaryDirectory() as td:
            path = Path(td) / "q.onnx"
            path.write_bytes(files[method])
            m = evaluate_row(f"select {method}", "openvino", str(path), yolov8_decode(len(train.classes)), held, images)
        scores[method] = m["map"]
    best = max(scores, key=lambda k: scores[k])
    out.write_bytes(files[best])
    r = reports[best]
    return {
        "settings": f"edgeslim.quantize(capture='onnx', runtime='openvino', calibration={best!r}): the best of "
        f"{sorted(scores)} by mAP on train images {CALIB_IMAGES}..{CALIB_IMAGES + SELECT_IMAGES - 1} in OpenVINO",
        "selection_map": scores,
        "chosen": best,
        "calibration": f"first {CALIB_IMAGES} train images (DetectionDataset, RGB /255 NCHW)",
        "summary": r.summary(),
        "layout": r.layout,
        "integer_mac_share": r.integer_mac_share,
    }


#: name -> (runtime, Ultralytics export arguments or None for ORT's quantize_static on the FP32 ONNX file, or
#: {"edgeslim": True} for edgeslim's own INT8 of that file)
EXPORTS: dict[str, tuple[str, dict | None]] = {
    "FP32 ONNX": ("onnxruntime", {"format": "onnx"}),
    "ORT INT8 (quantize_static U8S8 per-channel QDQ)": ("onnxruntime", None),
    "Ultralytics ONNX INT8 (export quantize=8)": ("onnxruntime", {"format": "onnx", "quantize": 8}),
    "OpenVINO FP32": ("openvino", {"format": "openvino"}),
    "OpenVINO INT8 (Ultralytics/NNCF)": ("openvino", {"format": "openvino", "quantize": 8}),
    "LiteRT INT8 (Ultralytics format=tflite)": ("litert", {"format": "tflite", "quantize": 8}),
    EDGESLIM_ROW: ("onnxruntime", {"edgeslim": True}),
    EDGESLIM_PLACED_ROW: ("onnxruntime", {"edgeslim": True, "placement": "measured"}),
    EDGESLIM_OV_ROW: ("openvino", {"edgeslim": True, "runtime": "openvino"}),
    EDGESLIM_OV_SELECTED_ROW: ("openvino", {"edgeslim": True, "select": True}),
}


def export_all(best: Path, data: Path, train: Any, only: Sequence[str] = ()) -> dict[str, dict]:
    """Every row's deployed file from the same ``best.pt``, each in its own folder under the cache (a copy of
    the weights beside it, where Ultralytics writes its export); files already there are reused. Returns
    name -> ``path``, ``runtime``, ``export_s`` (wall time of the export or quantization, under load), or
    ``error`` (one line) for an export that failed."""
    import hashlib

    import onnx  # noqa: F401  (fail early, before any export, if the ONNX stack is missing)

    offline_ultralytics()
    from ultralytics import YOLO

    tag = hashlib.sha256(best.read_bytes()).hexdigest()[:10]
    root = CACHE / "exports" / tag
    frac = CALIB_IMAGES / len(train)
    out: dict[str, dict] = {}
    for k, (name, (runtime, args)) in enumerate(EXPORTS.items()):
        if only and name not in only and name != "FP32 ONNX":  # every INT8 row quantizes the FP32 ONNX file
            continue
        d = root / f"{k}"
        rec_file = d / "export.json"
        if rec_file.exists():
            out[name] = json.loads(rec_file.read_text())
            continue
        d.mkdir(parents=True, exist_ok=True)
        rec: dict[str, Any] = {"runtime": runtime}
        t0 = time.time()
        try:
            if args is not None and args.get("select"):  # calibration chosen on held-out train images
                path = d / "best_edgeslim_int8.onnx"
                rec.update(edgeslim_int8_selected(Path(out["FP32 ONNX"]["path"]), path, train))
            elif args is not None and args.get("edgeslim"):  # edgeslim's INT8 of row 0's FP32 file
                path = d / "best_edgeslim_int8.onnx"
                rec.update(
                    edgeslim_int8(
                        Path(out["FP32 ONNX"]["path"]),
                        path,
                        train,
                        args.get("placement", "all"),
                        args.get("runtime", "onnxruntime"),
                    )
                )
            elif args is None:  # ORT quantize_static on row 0's FP32 file
                fp32 = Path(out["FP32 ONNX"]["path"])
                path = d / "best_ort_int8.onnx"
                ort_quantize_static(fp32, path, calib_images(train))
                rec["settings"] = "quant_pre_process; QDQ, activations QUInt8, weights QInt8 per-channel, MinMax"
                rec["calibration"] = f"first {CALIB_IMAGES} train images, RGB /255 NCHW"
            else:
                shutil.copy(best, d / "best.pt")
                kw = dict(args, imgsz=SIZE, batch=1, device="cpu")
                if args["format"] == "onnx":  # onnxslim (simplify=True) is not installed: plain torch.onnx export
                    kw.update(simplify=False, dynamic=False)
                if args.get("quantize") == 8:
                    kw.update(data=str(data), split="train", fraction=frac)
                    rec["calibration"] = f"Ultralytics' loader: data.yaml split=train fraction={frac:.4f}"
                rec["ultralytics_args"] = {k: v for k, v in kw.items() if k != "data"}
                res = YOLO(str(d / "best.pt")).export(**kw)
                path = Path(res)
                if path.is_dir():  # OpenVINO: a folder holding best.xml / best.bin
                    path = next(path.glob("*.xml"))
            rec.update(path=str(path), export_s=round(time.time() - t0, 1), file_mb=_size_mb(path))
        except Exception as e:  # one failed export is a row with its reason, not the end of the benchmark
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            rec.update(error=f"{type(e).__name__}: {first[:400]}", export_s=round(time.time() - t0, 1))
            log.warning("%s: export failed: %s", name, rec["error"])
        if "error" not in rec:
            rec_file.write_text(json.dumps(rec, indent=2))
        out[name] = rec
    return out


# ---------------------------------------------------------------------------------------------------- evaluate

Decode = Callable[[np.ndarray], np.ndarray]


def yolov8_decode(num_classes: int, normalized: bool = False) -> Decode:
    """The decode of a YOLOv8-layout file (``[1, 4 + C, A]``; LiteRT's boxes are normalised by the input side)."""
    from edgeslim.core.yolo_layout import from_yolov8

    return lambda y: from_yolov8(y, num_classes=num_classes, input_size=SIZE if normalized else None)


def edgeslim_decode(y: np.ndarray) -> np.ndarray:
    """The decode of a file already in edgeslim's detection layout ``[B, A, 4 + C]`` (xyxy pixels + scores)."""
    return np.asarray(y, dtype=np.float32)


def extra_rows(specs: Sequence[str], num_classes: int) -> dict[str, dict]:
    """``--row NAME=RUNTIME:LAYOUT:PATH`` (LAYOUT ``yolov8`` or ``edgeslim``): other detectors' deployed files
    scored and timed beside Ultralytics' rows (edgeslim's own INT8 file of the same weights, say)."""
    rows: dict[str, dict] = {}
    for spec in specs:
        name, _, rest = spec.partition("=")
        runtime, _, rest = rest.partition(":")
        layout, _, path = rest.partition(":")
        if not (name and runtime and path) or layout not in ("yolov8", "edgeslim") or not Path(path).exists():
            raise SystemExit(
                f"--row {spec!r}: use NAME=RUNTIME:LAYOUT:PATH, LAYOUT yolov8 or edgeslim, an existing file"
            )
        rows[name] = {"runtime": runtime, "path": path, "layout": layout, "file_mb": _size_mb(Path(path))}
    return rows


def postprocess(dets: np.ndarray, size: int = SIZE) -> dict[str, np.ndarray]:
    """Class-aware NMS of one image's ``[A, 4 + C]`` (xyxy pixels + class scores), outside the graph, as
    Ultralytics validates: every (anchor, class) pair with score >= CONF is a candidate (multi-label), the 30000
    best go to ``torchvision.ops.batched_nms`` at IoU ``IOU``, the ``MAX_DET`` best stay; boxes clipped to the
    image."""
    import torch
    from torchvision.ops import batched_nms

    t = torch.from_numpy(np.ascontiguousarray(dets, dtype=np.float32))
    boxes, scores = t[:, :4], t[:, 4:]
    a, c = (scores >= CONF).nonzero(as_tuple=True)
    s = scores[a, c]
    if len(s) > 30000:
        s, top = s.topk(30000)
        a, c = a[top], c[top]
    b = boxes[a]
    keep = batched_nms(b, s, c, IOU)[:MAX_DET]
    return {"boxes": b[keep].clamp(0, size).numpy(), "scores": s[keep].numpy(), "labels": c[keep].numpy()}


def val_images(val: Any) -> np.ndarray:
    """The val split as uint8 NCHW RGB (converted to float /255 one image at a time)."""
    return np.stack([val.read_image(i).transpose(2, 0, 1) for i in range(len(val))])


def evaluate_row(
    name: str, runtime: str, target: Any, decode: Decode, val: Any, images: np.ndarray, *, threads: int = 1
) -> dict[str, Any]:
    """mAP of one deployed file (or torch model: ``runtime="torch"`` and a callable ``x -> output``) on the whole val
    split, batch 1, in its own runtime: raw output -> ``decode`` -> :func:`postprocess` -> pycocotools."""
    import edgeslim as es
    from edgeslim.core.metrics import coco_map

    run = target if runtime == "torch" else es.runtime.load(target, runtime, threads=threads)
    dets, t0 = [], time.time()
    for i in range(len(val)):
        y = run(images[i : i + 1].astype(np.float32) / 255.0)
        d = postprocess(decode(y)[0])
        dets.append({"image_id": val.target(i)["image_id"], **d})
    m = coco_map(val, dets)
    log.info("%s: mAP %.4f mAP50 %.4f (%.0f s)", name, m["map"], m["map50"], time.time() - t0)
    return {
        "map": round(float(m["map"]), 4),
        "map50": round(float(m["map50"]), 4),
        "runtime_desc": run.describe() if hasattr(run, "describe") else runtime,
        "eval_s": round(time.time() - t0, 1),
    }


def latency_table(
    rows: dict[str, tuple[str, Any]], x: np.ndarray, threads: Sequence[int], rounds: int, runs: int
) -> dict:
    """Median over interleaved rounds (every row takes a turn in every round) of per-round medians, ms, batch 1,
    per thread count: ``rows`` is name -> (runtime, file)."""
    import edgeslim as es

    out: dict[str, dict[str, float]] = {n: {} for n in rows}
    for t in threads:
        runners = {n: es.runtime.load(p, rt, threads=t) for n, (rt, p) in rows.items()}
        res = es.runtime.interleaved_latency(
            runners, x, rounds=rounds, runs=runs, warmup=20, rewarm=5, shuffle=True, max_seconds_per_turn=10.0
        )
        for n, r in res.items():
            out[n][f"{rt_key(rows[n][0])}_{t}t_ms"] = round(r["median_of_rounds_ms"], 3)
            out[n][f"{rt_key(rows[n][0])}_{t}t_spread_pct"] = round(r["round_spread_pct"], 1)
    return out


def rt_key(runtime: str) -> str:
    return {"onnxruntime": "ort", "openvino": "ov", "litert": "litert"}.get(runtime, runtime)


def ultralytics_val(best: Path, data: Path) -> dict[str, float]:
    """Ultralytics' own ``model.val()`` (its own matcher and AP code) with the same NMS settings."""
    offline_ultralytics()
    from ultralytics import YOLO

    t0 = time.time()
    m = YOLO(str(best)).val(
        data=str(data), imgsz=SIZE, batch=32, conf=CONF, iou=IOU, max_det=MAX_DET, device="cpu", plots=False,
        split="val", workers=0, verbose=False,
    )  # fmt: skip
    return {
        "map": round(float(m.box.map), 4),
        "map50": round(float(m.box.map50), 4),
        "val_s": round(time.time() - t0, 1),
    }


def torch_forward(best: Path) -> Callable[[np.ndarray], np.ndarray]:
    """The trained PyTorch model (FP32, eval, batch-norm fused as Ultralytics' own predictor does) as ``x -> [B, 4 +
    C, A]``."""
    import torch

    offline_ultralytics()
    from ultralytics import YOLO

    net = YOLO(str(best)).model.float().eval().fuse()

    def fwd(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            y = net(torch.from_numpy(x))
        return (y[0] if isinstance(y, (list, tuple)) else y).numpy()

    return fwd


def evaluate(args: argparse.Namespace) -> dict:
    """mAP of the PyTorch model and of every deployed file, latency, the JSON and the table."""
    sys.path.insert(0, str(HERE))
    from _harness import host

    tr, va = load_data()
    data = yolo_dataset(tr, va)
    best = Path(args.weights) if args.weights else run_dir() / "weights" / "best.pt"
    if args.limit:  # a smoke run on the first images of val
        va = va.subset(args.limit)
    if not best.exists():
        raise SystemExit(f"no trained weights at {best}: run `python {Path(__file__).name} train` first")
    trained = json.loads((run_dir() / "train.json").read_text()) if (run_dir() / "train.json").exists() else {}
    exports = export_all(best, data, tr)
    images = val_images(va)
    nc = len(va.classes)
    exports.update(extra_rows(args.row, nc))
    res: dict[str, Any] = {
        "benchmark": "detect_ultralytics",
        "dataset": f"{DATASET} {SIZE}x{SIZE}: {len(tr)} train / {len(va)} val images (mAP on all {len(va)})",
        "weights": str(best),
        "postprocess": f"multi-label candidates with score >= {CONF}, torchvision batched_nms (class-aware) at IoU "
        f"{IOU}, at most {MAX_DET} per image, boxes clipped; mAP by pycocotools (edgeslim.core.metrics.coco_map)",
        "map_runtime_threads": 1,
        "training": trained,
        "host": host(),
        "timings": "under load: a 2-core CPU shared with other jobs (load average in host.load_avg)",
    }
    import ultralytics

    res["host"]["ultralytics"] = ultralytics.__version__
    for mod in ("openvino", "nncf", "ai_edge_litert", "litert_torch"):
        try:
            res["host"][mod] = str(__import__(mod).__version__)
        except (ImportError, AttributeError):
            pass
    res["ultralytics_val"] = ultralytics_val(best, data)
    res["pytorch"] = evaluate_row("PyTorch FP32", "torch", torch_forward(best), yolov8_decode(nc), va, images)
    rows: dict[str, dict] = {}
    for name, rec in exports.items():
        row = dict(rec)
        if "error" not in rec:
            if rec.get("layout") == "edgeslim":
                dec = edgeslim_decode
            else:
                dec = yolov8_decode(nc, normalized=rec["runtime"] == "litert")
            row.update(evaluate_row(name, rec["runtime"], rec["path"], dec, va, images))
        rows[name] = row
    ok = {n: (r["runtime"], r["path"]) for n, r in rows.items() if "error" not in r}
    x1 = images[:1].astype(np.float32) / 255.0
    lat = latency_table(ok, x1, (1, 2), args.rounds, args.runs)
    fp32_map = rows["FP32 ONNX"].get("map")
    for n, r in rows.items():
        r.update(lat.get(n, {}))
        if fp32_map is not None and "map" in r:
            r["drop_pt"] = round(100 * (fp32_map - r["map"]), 2)
    base = rows["FP32 ONNX"]
    for r in rows.values():
        for t in (1, 2):
            k = f"{rt_key(r['runtime'])}_{t}t_ms"
            if k in r and f"ort_{t}t_ms" in base:
                r[f"speedup_{t}t_vs_fp32_onnx_ort"] = round(base[f"ort_{t}t_ms"] / r[k], 2)
    res["rows"] = rows
    res["latency"] = {"batch": 1, "rounds": args.rounds, "runs": args.runs, "input": "val image 0, float32 NCHW"}
    out = Path(args.out) if args.out else HERE / "results" / "detect_ultralytics.json"
    from edgeslim.core.io import write_json

    write_json(out, res, force=True)
    print(table(res))
    print(f"\nwrote {out}")
    return res


def _f(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def table(res: dict) -> str:
    """The markdown table of a result dict (timings under load)."""
    lines = [
        "| row | runtime | mAP@[.5:.95] | mAP@.5 | drop (pt) | ms 1T | ms 2T | × FP32 ONNX 1T / 2T | MB | export s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    p, u = res["pytorch"], res["ultralytics_val"]
    lines.append(f"| PyTorch FP32 (same decode) | torch | {p['map']:.4f} | {p['map50']:.4f} | | | | | | |")
    lines.append(f"| PyTorch FP32, Ultralytics model.val() | torch | {u['map']:.4f} | {u['map50']:.4f} | | | | | | |")
    for n, r in res["rows"].items():
        if "error" in r:
            lines.append(f"| {n} | {r['runtime']} | failed: {r['error']} | | | | | | | {r.get('export_s', '')} |")
            continue
        k = rt_key(r["runtime"])
        ms = [_f(r.get(f"{k}_{t}t_ms")) for t in (1, 2)]
        sp = [_f(r.get(f"speedup_{t}t_vs_fp32_onnx_ort")) for t in (1, 2)]
        lines.append(
            f"| {n} | {r['runtime']} | {r['map']:.4f} | {r['map50']:.4f} | {r.get('drop_pt', 0):+.2f} | "
            f"{ms[0]} | {ms[1]} | {sp[0]} / {sp[1]} | {r['file_mb']:.2f} | {r.get('export_s', '')} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("step", choices=["prepare", "train", "export", "eval", "all"])
    ap.add_argument("--hours", type=float, default=0.7, help="training wall-time budget (Ultralytics' time=)")
    ap.add_argument("--epochs", type=int, default=60, help="training epoch cap")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds")
    ap.add_argument("--runs", type=int, default=100, help="timed runs per round and row")
    ap.add_argument("--weights", help="export/eval: these weights instead of the trained best.pt (a smoke test)")
    ap.add_argument("--limit", type=int, default=0, help="eval: only the first N val images (a smoke test)")
    ap.add_argument(
        "--row", action="append", default=[], metavar="NAME=RUNTIME:LAYOUT:PATH",
        help="eval: another deployed detector file as a row (LAYOUT yolov8 = [1,4+C,A] cxcywh, edgeslim = [1,A,4+C] xyxy)",
    )  # fmt: skip
    ap.add_argument("--out", help="eval: the JSON to write (default benchmarks/results/detect_ultralytics.json)")
    ap.add_argument("--only", nargs="*", default=(), help="export: only these rows")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.step in ("prepare", "all"):
        tr, va = load_data()
        print(yolo_dataset(tr, va))
    if args.step in ("train", "all"):
        print(json.dumps(train(args.hours, args.epochs, args.batch, args.workers), indent=2))
    if args.step == "export":
        tr, va = load_data()
        best = Path(args.weights) if args.weights else run_dir() / "weights" / "best.pt"
        print(json.dumps(export_all(best, yolo_dataset(tr, va), tr, args.only), indent=2))
    if args.step in ("eval", "all"):
        evaluate(args)


if __name__ == "__main__":
    main()

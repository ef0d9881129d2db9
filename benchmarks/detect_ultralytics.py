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
  export   from the same ``best.pt``: ONNX FP32 (``export(format="onnx")``), ORT ``quantize_static`` on it (U8S8,
           per-channel, QDQ, after ``quant_pre_process``; 256 train images as Ultralytics preprocesses them),
           OpenVINO FP32 and INT8 (``export(format="openvino", int8=True)``: NNCF inside, calibrated on the
           data.yaml's train split), TFLite INT8 (``export(format="tflite", int8=True)``) where its converter runs.
  eval     mAP of every deployed file in its own runtime (ONNX Runtime 1 thread, OpenVINO 1 thread) on the full
           val split, plus the PyTorch model through the same decode and Ultralytics' own ``model.val()``;
           latency at batch 1, ORT and OpenVINO at 1 and 2 threads, median over interleaved rounds.

Every row is decoded the same way (:func:`edgeslim.core.detection.decode_yolo` on the ``[1, 4+C, A]`` output, then
class-aware NMS): conf 0.001, IoU 0.7, at most 100 boxes per image (Ultralytics' validation settings), and
scored by pycocotools (:func:`edgeslim.core.metrics.coco_map`). Rows of other detectors are added through
:func:`evaluate_row` / :func:`latency_table` with their own ``decode`` function.

    nohup nice -n 10 python benchmarks/detect_ultralytics.py train --hours 0.7 &   # background, resumable
    python benchmarks/detect_ultralytics.py all [--rounds 5] [--runs 100]

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
            lines = [f"{int(c)} {x:.6f} {y:.6f} {ww:.6f} {hv:.6f}\n" for c, x, y, ww, hv in zip(t["labels"].tolist(), cx, cy, w, hh)]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("step", choices=["prepare", "train", "export", "eval", "all"])
    ap.add_argument("--hours", type=float, default=0.7, help="training wall-time budget (Ultralytics' time=)")
    ap.add_argument("--epochs", type=int, default=60, help="training epoch cap")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds")
    ap.add_argument("--runs", type=int, default=100, help="timed runs per round and row")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.step in ("prepare", "all"):
        tr, va = load_data()
        print(yolo_dataset(tr, va))
    if args.step in ("train", "all"):
        print(json.dumps(train(args.hours, args.epochs, args.batch, args.workers), indent=2))


if __name__ == "__main__":
    main()

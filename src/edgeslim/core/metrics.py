"""Metrics with provenance: every figure says where it came from.

A :class:`Figure` is one number with its unit and its source, e.g. ``measured on onnxruntime 1.32
(CPUExecutionProvider), 1 thread, batch 1, host AMD EPYC 7B13`` or ``computed by torch.utils.flop_counter``
or ``predicted for raspberry-pi-4``. :class:`Metrics` is an ordered collection of figures for one model
or artifact, plus the host it was measured on.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Figure:
    """One number and where it came from.

    Attributes:
        name: e.g. ``accuracy``, ``size_bytes``, ``macs``, ``latency_p50_ms``.
        value: the number.
        unit: e.g. ``fraction``, ``bytes``, ``ms``, ``MACs``.
        source: ``measured``, ``computed`` or ``predicted``.
        detail: how: runtime and version, threads, batch, samples, host; or the device predicted for.
    """

    name: str
    value: float
    unit: str
    source: str
    detail: str = ""


@dataclass
class Metrics:
    """Figures for one model or artifact, in insertion order."""

    label: str
    figures: dict[str, Figure] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, value: float, unit: str, source: str, detail: str = "") -> Figure:
        f = Figure(name, float(value), unit, source, detail)
        self.figures[name] = f
        return f

    def __getitem__(self, name: str) -> float:
        return self.figures[name].value

    def get(self, name: str, default: float | None = None) -> float | None:
        f = self.figures.get(name)
        return f.value if f else default

    def __contains__(self, name: str) -> bool:
        return name in self.figures

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "figures": {k: asdict(v) for k, v in self.figures.items()},
            "context": self.context,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Metrics:
        return cls(d["label"], {k: Figure(**v) for k, v in d.get("figures", {}).items()}, d.get("context", {}))


#: the /proc/cpuinfo flags that decide which integer / vector kernels a runtime can use
ISA_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_int8",
    "amx_bf16",
    "asimd",
    "asimddp",
    "i8mm",
    "sve",
    "bf16",
)


@functools.cache
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """This machine's CPU model name and its first CPU's flags from /proc/cpuinfo (no flags where it is not
    readable)."""
    cpu = platform.processor() or platform.machine()
    flags: set[str] = set()
    named = False
    try:
        with open("/proc/cpuinfo") as f:  # the first CPU's entries
            for line in f:
                if line.startswith("model name") and not named:
                    cpu, named = line.split(":", 1)[1].strip(), True
                elif line.startswith(("flags", "Features")) and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return cpu, frozenset(flags)


#: x86 flags whose integer dot-product instructions accumulate u8 x s8 products in 32 bits
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def u8s8_saturates(flags: frozenset[str] | None = None, machine: str | None = None) -> str | None:
    """Why this host's integer kernels may saturate on 8-bit weights, or None when they do not (or it is not known).

    On an x86 CPU without VNNI (AVX2 or AVX-512 without ``avx512_vnni``), ONNX Runtime's u8 x s8 convolution and
    matmul kernels multiply with ``VPMADDUBSW``, which adds each pair of products in 16 bits with saturation:
    2 x 255 x 127 overflows it, and the file no longer computes what the fake-quantized model does (measured on an
    AVX2-only EPYC: a pruned MobileNetV2's INT8 file at 11-14 dB SQNR against its torch reference, 30 dB with 7-bit
    weights). ONNX Runtime's quantization guide names the two ways out (7-bit weights or u8 x u8); Intel Neural
    Compressor sets ``reduce_range`` by the same test. ``flags`` / ``machine``: this host's by default."""
    if flags is None:
        flags = _cpuinfo()[1]
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i386", "i686", "x86") or not flags:
        return None
    if any(f in flags for f in INT8_DOT_FLAGS):
        return None
    isa = "AVX-512 without VNNI" if "avx512bw" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return (
        f"this host's CPU has {isa} (no {'/'.join(INT8_DOT_FLAGS)}): ONNX Runtime's u8 x s8 kernels add pairs of "
        "products in 16 bits with saturation there"
    )


def host_info() -> dict[str, Any]:
    """The CPU, its vector ISA flags, core count and software versions of this machine (for every measured
    figure: INT8 speed-ups depend on VNNI/AVX-512 being there)."""
    cpu, flags = _cpuinfo()
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "os": platform.platform(),
        "python": platform.python_version(),
    }
    if flags:
        info["isa"] = " ".join(f for f in ISA_FLAGS if f in flags) or "none of " + ", ".join(ISA_FLAGS[:4])
    for mod in ("torch", "onnxruntime", "onnx"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return info


def compare(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    """Cosine similarity, SQNR (dB) and top-1 agreement of ``out`` against ``ref`` (both ``(N, classes)``)."""
    r = ref.astype(np.float64).ravel()
    o = out.astype(np.float64).ravel()
    cos = float(r @ o / max(np.linalg.norm(r) * np.linalg.norm(o), 1e-30))
    noise = float(((r - o) ** 2).sum())
    sqnr = float("inf") if noise == 0 else float(10 * np.log10(max((r**2).sum(), 1e-30) / noise))
    agree = float((ref.reshape(len(ref), -1).argmax(1) == out.reshape(len(out), -1).argmax(1)).mean())
    return {"cosine": cos, "sqnr_db": sqnr, "top1_agreement": agree}


def coco_map(annotations: Any, detections: Any, *, classes: Any = None) -> dict[str, Any]:
    """COCO box mAP of ``detections`` against a COCO annotation file, computed by pycocotools.

    Args:
        annotations: a COCO annotation file (path), or a :class:`~edgeslim.data.DetectionDataset` (its
            ``annotation_file``, restricted to the dataset's own images, so a subset is scored on itself).
        detections: one dict per image: ``image_id``, ``boxes`` (``(N, 4)`` xyxy pixels, the annotation file's
            frame), ``scores`` (``(N,)``) and ``labels`` (``(N,)``, 0-based: label ``k`` is the ``k``-th category
            by increasing id). Images of the annotations without an entry have no detections.
        classes: names for ``per_class`` (default: the categories' names).

    Returns:
        ``map`` (mAP@[.5:.95]), ``map50``, ``map75`` and ``per_class`` (mAP@[.5:.95] per class name; NaN for a
        class with no ground truth in the images scored), plus ``images`` and ``detections`` counted.
    """
    import contextlib
    import io
    from pathlib import Path

    from edgeslim.core.errors import DataError

    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise DataError("mAP needs pycocotools: pip install pycocotools (or pip install 'edgeslim[detect]')") from None

    if isinstance(annotations, (str, Path)):
        from edgeslim.data._detection import read_coco

        path, img_ids = Path(annotations), None
        data = read_coco(path)
    elif hasattr(annotations, "annotation_file") and hasattr(annotations, "image_ids"):
        from edgeslim.data._detection import read_coco

        path, img_ids = Path(annotations.annotation_file), list(annotations.image_ids)
        data = read_coco(path)
    else:
        raise DataError(
            f"coco_map: annotations must be a COCO annotation file or a DetectionDataset, got {type(annotations).__name__}"
        )
    cats = sorted(data["categories"], key=lambda c: c["id"])
    cat_ids = [c["id"] for c in cats]
    names = [str(c.get("name", c["id"])) for c in cats] if classes is None else [str(c) for c in classes]
    if len(names) != len(cat_ids):
        raise DataError(f"coco_map: {len(names)} class names given but {str(path)!r} has {len(cat_ids)} categories")
    known = {im["id"] for im in data["images"]}
    if img_ids is None:
        img_ids = sorted(known)
    scored = set(img_ids)
    rows: list[list[float]] = []
    for k, det in enumerate(detections):
        try:
            iid = int(det["image_id"])
            boxes = np.asarray(det["boxes"], dtype=np.float64).reshape(-1, 4)
            scores = np.asarray(det["scores"], dtype=np.float64).reshape(-1)
            labels = np.asarray(det["labels"]).reshape(-1)
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(
                f"coco_map: detections[{k}] must be a dict with image_id, boxes (N, 4), scores (N,), labels (N,): {e}"
            ) from None
        if iid not in known:
            raise DataError(f"coco_map: detections[{k}].image_id {iid} is not an image of {str(path)!r}")
        if not len(boxes) == len(scores) == len(labels):
            raise DataError(
                f"coco_map: detections[{k}] has {len(boxes)} boxes, {len(scores)} scores and {len(labels)} labels"
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= len(cat_ids)):
            raise DataError(
                f"coco_map: detections[{k}].labels holds {int(labels.min())}..{int(labels.max())}; the annotations "
                f"have {len(cat_ids)} classes (labels 0..{len(cat_ids) - 1})"
            )
        if iid not in scored:
            continue
        for b, s, lab in zip(boxes, scores, labels.astype(np.int64)):
            rows.append([iid, b[0], b[1], b[2] - b[0], b[3] - b[1], s, cat_ids[int(lab)]])
    out: dict[str, Any] = {"images": len(img_ids), "detections": len(rows)}
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink):  # pycocotools prints its progress and its summary table
        gt = COCO()
        gt.dataset = data
        gt.createIndex()
        if not gt.getAnnIds(imgIds=img_ids, iscrowd=False):
            raise DataError(f"coco_map: {str(path)!r} has no (non-crowd) boxes in the {len(img_ids)} images scored")
        if not rows:
            return {**out, "map": 0.0, "map50": 0.0, "map75": 0.0, "per_class": dict.fromkeys(names, 0.0)}
        dt = gt.loadRes(np.asarray(rows, dtype=np.float64))
        ev = COCOeval(gt, dt, "bbox")
        ev.params.imgIds = img_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    precision = ev.eval["precision"]  # (iou thresholds, recall points, classes, areas, max detections)
    per_class = {}
    for k, name in enumerate(names):
        p = precision[:, :, k, 0, -1]
        per_class[name] = float(p[p > -1].mean()) if (p > -1).any() else float("nan")
    return {
        **out,
        "map": float(ev.stats[0]),
        "map50": float(ev.stats[1]),
        "map75": float(ev.stats[2]),
        "per_class": per_class,
    }

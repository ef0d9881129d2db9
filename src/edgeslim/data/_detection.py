"""Object-detection datasets in COCO format, streamed from disk.

A :class:`DetectionDataset` is a list of images and their boxes read from one COCO annotation file. Items are
``(image, target)``: ``image`` a float ``(3, S, S)`` RGB tensor in [0, 1] (not normalised: detectors normalise
inside), ``target`` a dict with ``boxes`` (float ``(N, 4)``, xyxy, pixels of the ``S x S`` model frame), ``labels``
(int64 ``(N,)``, 0-based) and ``image_id``. Pixels are read from disk when an item is asked for.

Images that are not ``S x S`` are letterboxed: scaled by one factor so the longer side is ``S`` (the pixel grid
rounds it to ``nw/w`` and ``nh/h``), centered on a gray ``S x S`` canvas, and their boxes go through the same scale
and shift. mAP is computed in that model frame against :attr:`DetectionDataset.annotation_file`, an annotation file
written in the model frame (IoU is unchanged by a uniform scale and a shift, so mAP@[.5:.95] is that of the original
boxes up to the pixel rounding of the scale); :meth:`DetectionDataset.to_source_frame` maps predicted boxes back to
the original image's pixels.

``coco:<file.json>`` or ``coco:<folder>`` (a folder holding ``annotations/*.json``) loads users' own data: one file
whose name says ``train`` and one that says ``val``, or a single file split by seed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeslim.core.errors import DataError

log = logging.getLogger(__name__)

#: gray of the letterbox padding (the value YOLO-style detectors are trained with)
PAD_VALUE = 114
#: how far (pixels of the source image) a box may reach past the image border before it is refused; within
#: this margin it is clipped (COCO's own files hold boxes a fraction of a pixel outside their image)
EDGE_TOLERANCE = 1.0
DETECT_SIZES = (160, 320)


@dataclass(frozen=True)
class _Record:
    """One image: its file, boxes (model frame, xyxy), labels, crowd flags and the source-to-model transform."""

    image_id: int
    path: Path
    width: int
    height: int
    boxes: np.ndarray  # float32 (N, 4), model frame
    labels: np.ndarray  # int64 (N,)
    crowd: np.ndarray  # bool (N,)
    scale: tuple[float, float]  # sx, sy
    offset: tuple[float, float]  # dx, dy


class DetectionDataset(torch.utils.data.Dataset):
    """Images with boxes from a COCO annotation file; pixels streamed from disk (see the module docstring).

    Attributes:
        name: the source, e.g. ``fmnist-detect`` or ``coco:/data/annotations/instances_val.json``.
        split: ``train`` or ``val`` (``val[16]`` for a subset).
        classes: class names, index = label.
        image_size: side ``S`` of the square model input.
        annotation_file: the COCO JSON of this split in the model frame (mAP is computed against it; for a
            :meth:`subset` it still covers the whole split and :func:`~edgeslim.core.metrics.coco_map` keeps to the
            subset's images).
        source_annotation_file: the user's own annotation file (the same file for generated data).
        category_ids: COCO category id of each label.
    """

    def __init__(
        self,
        name: str,
        split: str,
        records: Sequence[_Record],
        classes: Sequence[str],
        category_ids: Sequence[int],
        image_size: int,
        annotation_file: Path,
        source_annotation_file: Path | None = None,
    ) -> None:
        self.name, self.split = name, split
        self.records = tuple(records)
        self.classes = list(classes)
        self.category_ids = list(category_ids)
        self.image_size = int(image_size)
        self.annotation_file = Path(annotation_file)
        self.source_annotation_file = Path(source_annotation_file or annotation_file)

    def __repr__(self) -> str:
        return (
            f"DetectionDataset({self.name!r}, {self.split!r}, {len(self)} images, {self.num_classes} classes, "
            f"{self.image_size}x{self.image_size})"
        )

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_ids(self) -> list[int]:
        return [r.image_id for r in self.records]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def read_image(self, i: int) -> np.ndarray:
        """Image ``i`` as uint8 ``(S, S, 3)`` RGB in the model frame (letterboxed where needed)."""
        from PIL import Image

        r = self.records[i]
        s = self.image_size
        try:
            with Image.open(r.path) as f:
                im = f.convert("RGB")
        except Exception as e:  # PIL raises many types for bad files
            raise DataError(f"cannot read image {str(r.path)!r}: {e}") from None
        if im.size != (r.width, r.height):
            raise DataError(
                f"image {str(r.path)!r} is {im.width}x{im.height} but its annotation says width={r.width}, "
                f"height={r.height}"
            )
        if im.size == (s, s):
            return np.asarray(im, dtype=np.uint8)
        nw, nh = round(r.width * r.scale[0]), round(r.height * r.scale[1])
        canvas = Image.new("RGB", (s, s), (PAD_VALUE,) * 3)
        canvas.paste(im.resize((nw, nh), Image.BILINEAR), (int(r.offset[0]), int(r.offset[1])))
        return np.asarray(canvas, dtype=np.uint8)

    def target(self, i: int) -> dict[str, Any]:
        """Boxes (model frame, crowd regions left out), labels and image id of image ``i``; no pixels read."""
        r = self.records[i]
        keep = ~r.crowd
        return {
            "boxes": torch.from_numpy(r.boxes[keep].astype(np.float32)).reshape(-1, 4),
            "labels": torch.from_numpy(r.labels[keep].astype(np.int64)),
            "image_id": r.image_id,
        }

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        a = self.read_image(i)
        image = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1), dtype=np.float32)).mul_(1.0 / 255.0)
        return image, self.target(i)

    def subset(self, n_or_indices: int | Sequence[int] | np.ndarray, split: str | None = None) -> DetectionDataset:
        """The first ``n`` images, or those at the given indices (same files, same annotation file)."""
        if isinstance(n_or_indices, (int, np.integer)):
            n = int(n_or_indices)
            if n <= 0:
                raise DataError(f"subset size must be > 0, got {n}")
            idx: Sequence[int] = range(min(n, len(self)))
            label = split or f"{self.split}[{len(idx)}]"
        else:
            idx = [int(i) for i in np.asarray(n_or_indices).reshape(-1)]
            label = split or f"{self.split}[{len(idx)}]"
        return DetectionDataset(
            self.name,
            label,
            [self.records[i] for i in idx],
            self.classes,
            self.category_ids,
            self.image_size,
            self.annotation_file,
            self.source_annotation_file,
        )

    def take(self, n: int, *, seed: int = 0) -> DetectionDataset:
        """A seeded random subset of ``n`` images (all of them if ``n`` >= len), e.g. for calibration."""
        if n >= len(self):
            return self
        g = np.random.default_rng(seed)
        return self.subset(np.sort(g.choice(len(self), size=n, replace=False)), split=f"{self.split}[{n}]")

    def to_source_frame(self, image_id: int, boxes: np.ndarray | torch.Tensor) -> np.ndarray:
        """Boxes (xyxy) predicted in the model frame of ``image_id``, in the pixels of its original image."""
        r = self._by_id().get(int(image_id))
        if r is None:
            raise DataError(f"image_id {image_id} is not in dataset {self.name!r} ({self.split})")
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        sx, sy = r.scale
        dx, dy = r.offset
        return (b - [dx, dy, dx, dy]) / [sx, sy, sx, sy]

    def _by_id(self) -> dict[int, _Record]:
        cached = self.__dict__.get("_id_index")
        if cached is None or len(cached) != len(self.records):
            cached = {r.image_id: r for r in self.records}
            self.__dict__["_id_index"] = cached
        return cached

    def describe(self) -> dict:
        return {
            "name": self.name,
            "split": self.split,
            "size": len(self),
            "image_size": self.image_size,
            "num_classes": self.num_classes,
            "boxes": int(sum(int((~r.crowd).sum()) for r in self.records)),
            "annotation_file": str(self.annotation_file),
        }


def collate_detection(batch: Sequence[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[torch.Tensor, list[dict]]:
    """``DataLoader`` collate: ``(images (B, 3, S, S), [target, ...])`` (box counts differ per image)."""
    if not batch:
        raise DataError("collate_detection got an empty batch")
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]


def check_classes(dataset: DetectionDataset, num_classes: int, what: str = "the model") -> None:
    """Refuse a detection dataset whose labels go beyond the ``num_classes`` a detector predicts."""
    top = max((int(r.labels.max()) for r in dataset.records if len(r.labels)), default=-1)
    if dataset.num_classes > num_classes or top >= num_classes:
        ids = dataset.category_ids
        raise DataError(
            f"{str(dataset.source_annotation_file)!r}: field 'categories' holds {dataset.num_classes} classes "
            f"(category ids {ids[0]}..{ids[-1]}, labels up to {max(top, dataset.num_classes - 1)}) but {what} "
            f"predicts {num_classes}; give a model with num_classes={dataset.num_classes}"
        )


# -------------------------------------------------------------------------------------------- COCO files


def _bad(path: Path, field: str, what: str) -> DataError:
    return DataError(f"annotation file {str(path)!r}: {field} {what}")


def read_coco(path: str | os.PathLike) -> dict:
    """Read and check a COCO detection file: the fields edgeslim uses are there and their values make sense.

    Returns the parsed JSON. Raises :class:`DataError` naming the file and the field at the first problem.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"cannot read annotation file {str(p)!r}: {e.strerror or e}") from None
    if not text.strip():
        raise DataError(f"annotation file {str(p)!r} is empty; a COCO file holds images, annotations and categories")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"annotation file {str(p)!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise DataError(f"annotation file {str(p)!r}: the top level is a {type(data).__name__}, not a JSON object")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise _bad(p, f"field {key!r}", "is missing; a COCO file holds images, annotations and categories")
        if not isinstance(data[key], list):
            raise _bad(p, f"field {key!r}", f"is a {type(data[key]).__name__}, not a list")
    for key in ("images", "annotations", "categories"):
        if not data[key]:
            raise _bad(p, f"field {key!r}", "is empty: there is nothing to train or score on")
    cat_ids: set[int] = set()
    for k, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or isinstance(c.get("id"), bool):
            raise _bad(
                p, f"categories[{k}].id", f"must be an integer, got {c.get('id') if isinstance(c, dict) else c!r}"
            )
        if c["id"] in cat_ids:
            raise _bad(p, f"categories[{k}].id", f"{c['id']} appears twice")
        cat_ids.add(c["id"])
    img_sizes: dict[int, tuple[Any, Any]] = {}
    for k, im in enumerate(data["images"]):
        if not isinstance(im, dict) or not isinstance(im.get("id"), int) or isinstance(im.get("id"), bool):
            raise _bad(p, f"images[{k}].id", "must be an integer")
        if im["id"] in img_sizes:
            raise _bad(p, f"images[{k}].id", f"{im['id']} appears twice")
        if not isinstance(im.get("file_name"), str) or not im["file_name"]:
            raise _bad(p, f"images[{k}].file_name", "must be a non-empty string")
        for dim in ("width", "height"):
            v = im.get(dim)
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0):
                raise _bad(p, f"images[{k}].{dim}", f"must be a positive number of pixels, got {v!r}")
        img_sizes[im["id"]] = (im.get("width"), im.get("height"))
    shown_cats = f"ids {min(cat_ids)}..{max(cat_ids)}" if len(cat_ids) > 8 else f"ids {sorted(cat_ids)}"
    for k, a in enumerate(data["annotations"]):
        if not isinstance(a, dict):
            raise _bad(p, f"annotations[{k}]", "is not an object")
        if a.get("image_id") not in img_sizes:
            raise _bad(p, f"annotations[{k}].image_id", f"{a.get('image_id')!r} is not the id of any entry of 'images'")
        if a.get("category_id") not in cat_ids:
            raise _bad(
                p, f"annotations[{k}].category_id", f"{a.get('category_id')!r} is not in 'categories' ({shown_cats})"
            )
        b = a.get("bbox")
        if (
            not isinstance(b, list)
            or len(b) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in b)
        ):
            raise _bad(p, f"annotations[{k}].bbox", f"must be 4 finite numbers [x, y, width, height], got {b!r}")
        if b[2] < 0 or b[3] < 0:
            raise _bad(p, f"annotations[{k}].bbox", f"has a negative {'width' if b[2] < 0 else 'height'}: {b!r}")
        w, h = img_sizes[a["image_id"]]
        t = EDGE_TOLERANCE
        if b[0] < -t or b[1] < -t or (w is not None and b[0] + b[2] > w + t) or (h is not None and b[1] + b[3] > h + t):
            raise _bad(
                p,
                f"annotations[{k}].bbox",
                f"{b!r} reaches outside its image (image_id {a['image_id']}, {w}x{h} pixels; COCO boxes are "
                "[x, y, width, height] in pixels)",
            )
    return data


def _image_dir(ann: Path, root: Path | None, data: dict) -> Path:
    """The folder the ``file_name`` entries are relative to: the first candidate that holds the first image."""
    first = data["images"][0]["file_name"]
    stem = ann.stem.removeprefix("instances_")
    cands = []
    for base in ([root] if root else []) + [ann.parent.parent, ann.parent]:
        cands += [base, base / "images", base / stem, base / "images" / stem]
    for c in dict.fromkeys(cands):
        if (c / first).is_file():
            return c
    raise DataError(
        f"annotation file {str(ann)!r}: images[0].file_name {first!r} not found in any of "
        + ", ".join(repr(str(c)) for c in dict.fromkeys(cands))
    )


def _records(ann: Path, data: dict, image_dir: Path, size: int) -> list[_Record]:
    """Records of every image of ``data``, boxes moved to the letterboxed ``size x size`` frame."""
    from PIL import Image

    cats = sorted(c["id"] for c in data["categories"])
    label_of = {cid: i for i, cid in enumerate(cats)}
    per_image: dict[int, list[dict]] = {}
    for a in data["annotations"]:
        per_image.setdefault(a["image_id"], []).append(a)
    out = []
    dropped = 0
    for k, im in enumerate(data["images"]):
        path = image_dir / im["file_name"]
        if not path.is_file():
            raise _bad(ann, f"images[{k}].file_name", f"{im['file_name']!r}: no such file in {str(image_dir)!r}")
        w, h = im.get("width"), im.get("height")
        if w is None or h is None:
            try:
                with Image.open(path) as f:
                    w, h = f.size
            except Exception as e:  # PIL raises many types for bad files
                raise DataError(f"cannot read image {str(path)!r}: {e}") from None
        w, h = int(w), int(h)
        if w == size and h == size:
            sx = sy = 1.0
            dx = dy = 0.0
        else:
            s = size / max(w, h)
            nw, nh = max(1, round(w * s)), max(1, round(h * s))
            sx, sy = nw / w, nh / h
            dx, dy = float((size - nw) // 2), float((size - nh) // 2)
        anns = per_image.get(im["id"], [])
        boxes = np.zeros((len(anns), 4), dtype=np.float64)
        for j, a in enumerate(anns):
            x, y, bw, bh = a["bbox"]
            boxes[j] = (max(0.0, x), max(0.0, y), min(float(w), x + bw), min(float(h), y + bh))
        labels = np.array([label_of[a["category_id"]] for a in anns], dtype=np.int64)
        crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
        ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        dropped += int((~ok).sum())
        boxes, labels, crowd = boxes[ok], labels[ok], crowd[ok]
        boxes = boxes * [sx, sy, sx, sy] + [dx, dy, dx, dy]
        out.append(_Record(int(im["id"]), path, w, h, boxes.astype(np.float32), labels, crowd, (sx, sy), (dx, dy)))
    if dropped:
        log.warning("%s: %d box(es) of zero width or height left out of the training targets", ann, dropped)
    return out


def _model_frame_json(data: dict, records: Sequence[_Record], size: int) -> dict:
    """The annotation file of ``records`` with every box in the model frame (the file mAP is computed against)."""
    by_id = {r.image_id: r for r in records}
    images = [
        {
            **im,
            "width": size,
            "height": size,
            "source_width": by_id[im["id"]].width,
            "source_height": by_id[im["id"]].height,
        }
        for im in data["images"]
        if im["id"] in by_id
    ]
    anns = []
    for a in data["annotations"]:
        r = by_id.get(a["image_id"])
        if r is None:
            continue
        x, y, bw, bh = a["bbox"]
        x0, y0 = max(0.0, x), max(0.0, y)
        x1, y1 = min(float(r.width), x + bw), min(float(r.height), y + bh)
        if x1 <= x0 or y1 <= y0:
            continue
        (sx, sy), (dx, dy) = r.scale, r.offset
        nb = [x0 * sx + dx, y0 * sy + dy, (x1 - x0) * sx, (y1 - y0) * sy]
        area = float(a.get("area", bw * bh)) * sx * sy
        anns.append({**a, "bbox": nb, "area": area, "iscrowd": int(a.get("iscrowd", 0))})
    return {
        "info": {"description": "model frame (letterboxed) copy written by edgeslim", "size": size},
        "images": images,
        "annotations": anns,
        "categories": data["categories"],
    }


def from_coco(
    annotation_file: str | os.PathLike,
    *,
    size: int,
    image_dir: str | os.PathLike | None = None,
    name: str | None = None,
    split: str = "val",
) -> DetectionDataset:
    """A dataset from a COCO file whose images are already ``size x size`` (the generated sets): no rewrite."""
    ann = Path(annotation_file)
    data = read_coco(ann)
    folder = Path(image_dir) if image_dir else _image_dir(ann, None, data)
    recs = _records(ann, data, folder, size)
    if any(r.scale != (1.0, 1.0) for r in recs):
        raise DataError(
            f"annotation file {str(ann)!r}: images are not all {size}x{size}; load it with coco:{ann} to letterbox them"
        )
    cats = sorted(data["categories"], key=lambda c: c["id"])
    return DetectionDataset(
        name or f"coco:{ann}",
        split,
        recs,
        [str(c.get("name", c["id"])) for c in cats],
        [c["id"] for c in cats],
        size,
        ann,
    )


def check_size(size: Any, *, generated: bool = True) -> int:
    """The side of square detection inputs: one of ``DETECT_SIZES`` for generated data, any multiple of 32 from 32 to
    4096 for users' COCO data (letterboxed to it)."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise DataError(f"detection image size must be an integer, got {size!r}")
    if generated and int(size) not in DETECT_SIZES:
        raise DataError(f"detection image size must be one of {', '.join(map(str, DETECT_SIZES))}, got {size!r}")
    if not generated and not (32 <= int(size) <= 4096 and int(size) % 32 == 0):
        raise DataError(f"detection image size must be a multiple of 32 from 32 to 4096 (coco: data), got {size!r}")
    return int(size)


def _annotation_files(root: Path) -> tuple[Path | None, Path | None, Path | None]:
    """(train, val, single) annotation files of a ``coco:`` path (a JSON file, or a folder of them)."""
    if root.is_file():
        return None, None, root
    if not root.is_dir():
        raise DataError(f"coco: {str(root)!r} is neither a COCO annotation file (.json) nor a folder")
    folder = root / "annotations" if (root / "annotations").is_dir() else root
    files = sorted(p for p in folder.glob("*.json") if p.is_file())
    if not files:
        raise DataError(f"coco: no annotation file (*.json) in {str(folder)!r}")
    if len(files) == 1:
        return None, None, files[0]
    train = [f for f in files if "train" in f.stem.lower()]
    val = [f for f in files if "val" in f.stem.lower() or "test" in f.stem.lower()]
    if len(train) == 1 and len(val) == 1:
        return train[0], val[0], None
    raise DataError(
        f"coco: {str(folder)!r} holds {len(files)} annotation files ({', '.join(f.name for f in files)}); "
        "keep one, or exactly one whose name says 'train' and one that says 'val'"
    )


def _cache_folder(parts: Sequence[Any]) -> Path:
    from edgeslim.data._sources import cache_dir

    key = hashlib.sha1(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:16]
    return cache_dir() / "data" / f"coco-{key}"


def _write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def coco_source(
    spec: str | os.PathLike,
    *,
    size: int = 320,
    seed: int = 0,
    val_fraction: float = 0.2,
    limit: int | None = None,
) -> tuple[DetectionDataset, DetectionDataset]:
    """Users' COCO data (``coco:<file.json>`` or ``coco:<folder>``) as letterboxed ``(train, val)``.

    With one annotation file, ``val_fraction`` of its images (seeded shuffle) are held out for validation.
    The model-frame annotation files are written under ``~/.cache/edgeslim/data/coco-<hash>/``.
    """
    size = check_size(size, generated=False)
    root = Path(spec)
    train_f, val_f, single = _annotation_files(root)
    img_root = root if root.is_dir() else None
    splits: dict[str, tuple[Path, dict, list[_Record]]] = {}
    if single is not None:
        data = read_coco(single)
        recs = _records(single, data, _image_dir(single, img_root, data), size)
        if len(recs) < 2:
            raise _bad(single, "field 'images'", f"holds {len(recs)} image: a train/val split needs at least 2")
        order = np.random.default_rng(seed).permutation(len(recs))
        n_val = min(len(recs) - 1, max(1, round(len(recs) * val_fraction)))
        val_idx, tr_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
        splits["train"] = (single, data, [recs[i] for i in tr_idx])
        splits["val"] = (single, data, [recs[i] for i in val_idx])
        key_files = [single]
    else:
        for split, f in (("train", train_f), ("val", val_f)):
            data = read_coco(f)
            splits[split] = (f, data, _records(f, data, _image_dir(f, img_root, data), size))
        key_files = [train_f, val_f]
    stamp = [(f.resolve(), f.stat().st_mtime_ns, f.stat().st_size) for f in key_files]
    folder = _cache_folder([stamp, size, seed, val_fraction])
    out = []
    for split, (f, data, recs) in splits.items():
        model_json = folder / f"{split}.json"
        _write_json_atomic(model_json, _model_frame_json(data, recs, size))
        cats = sorted(data["categories"], key=lambda c: c["id"])
        ds = DetectionDataset(
            f"coco:{root}",
            split,
            recs,
            [str(c.get("name", c["id"])) for c in cats],
            [c["id"] for c in cats],
            size,
            model_json,
            f,
        )
        out.append(ds.subset(limit, split) if limit else ds)
    if out[0].classes != out[1].classes:
        raise DataError(
            f"coco: {str(train_f)!r} and {str(val_f)!r} have different 'categories' ({out[0].classes} vs {out[1].classes})"
        )
    log.info("coco %s: %d train / %d val images at %dx%d (letterboxed)", root, len(out[0]), len(out[1]), size, size)
    return out[0], out[1]

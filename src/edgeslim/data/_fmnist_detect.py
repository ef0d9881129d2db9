"""``fmnist-detect``: a detection set built from real pixels, deterministically from a seed.

Each image is a random square crop of a real photograph (the JPEGs of Debian's ``darknet`` package and the
photographs shipped inside scikit-image), resized to ``S x S`` and maybe mirrored, with 1 to 6 Fashion-MNIST items
pasted on it. An item is cut to the box of its non-zero pixels, scaled (aspect kept) so its longer side is 16-96 px
at ``S=320`` (8-48 px at 160), tinted with a random colour shaded by its own intensity, and alpha-composited with
its own intensity as the mask (``alpha = min(1, intensity / 0.3)`` where ``intensity > 0.1``, else 0).

Occlusion rule, checked on every placement and held by the final image: each object keeps at least 60% of its
mask pixels visible (not covered by objects pasted after it), and any two boxes have IoU <= 0.3. An object that
cannot be placed so in 30 tries is left out, so an image holds 1 to 6 objects.

Boxes are exact: the tight box of the object's *visible* mask (COCO's convention: boxes enclose what is seen),
xyxy pixel edges, so the mask touches all four sides of its box. Train images take items from Fashion-MNIST's
60k training set, val images from its 10k test set; backgrounds are drawn from the same photos in both splits
(different random crops). Image ``i`` of a split depends only on ``(seed, split, i)``, so a set of the first
``n`` images is identical to the first ``n`` images of the full set.

Written as JPEG (quality 95) plus a COCO JSON per split, into ``<cache>/data/fmnist-detect-<S>-v1/`` (built in a
temporary folder, then renamed into place; generated once).
"""

from __future__ import annotations

import colorsys
import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgeslim.core.errors import DataError
from edgeslim.data._detection import DetectionDataset, check_size, from_coco

log = logging.getLogger(__name__)

VERSION = "v1"
NAME = "fmnist-detect"
COUNTS = {"train": 4000, "val": 1000}
#: longer side of a pasted item at 320x320 (scaled with the image size)
SIDE_RANGE = (16, 96)
MAX_OBJECTS = 6
MAX_IOU = 0.3
MIN_VISIBLE = 0.6
PLACEMENT_TRIES = 30
#: an item's pixels above this intensity (of 1) belong to its mask
MASK_THRESHOLD = 0.1
#: intensity from which an item is opaque (alpha = min(1, intensity / ALPHA_FULL) inside the mask)
ALPHA_FULL = 0.3
DARKNET_DIR = Path("/usr/share/darknet/data")
#: photographs inside scikit-image's package data (read as files; skimage itself is not imported)
SKIMAGE_PHOTOS = (
    "astronaut.png",
    "brick.png",
    "camera.png",
    "chelsea.png",
    "coffee.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "hubble_deep_field.jpg",
    "motorcycle_left.png",
    "retina.jpg",
    "rocket.jpg",
)
#: photos are downscaled once so their shorter side is at most this many pixels
PHOTO_MAX_SHORT = 640
_SPLIT_CODE = {"train": 0, "val": 1}
#: a temporary build folder this old is from a killed generation (a live one writes files every few ms)
STALE_SECONDS = 3600.0


def photo_files() -> list[Path]:
    """The background photographs found here: darknet's JPEGs, then scikit-image's photos."""
    files = sorted(DARKNET_DIR.glob("*.jpg")) if DARKNET_DIR.is_dir() else []
    spec = importlib.util.find_spec("skimage")
    if spec is not None and spec.submodule_search_locations:
        folder = Path(next(iter(spec.submodule_search_locations))) / "data"
        files += [folder / n for n in SKIMAGE_PHOTOS if (folder / n).is_file()]
    return files


def load_photos(files: Sequence[Path] | None = None) -> list[np.ndarray]:
    """Background photos as uint8 RGB arrays (shorter side at most :data:`PHOTO_MAX_SHORT`)."""
    from PIL import Image

    files = photo_files() if files is None else list(files)
    if not files:
        raise DataError(
            f"fmnist-detect needs real photographs for its backgrounds and found none: install the Debian package "
            f"darknet (apt-get install darknet; JPEGs in {DARKNET_DIR}) or scikit-image (pip install scikit-image)"
        )
    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                im = im.convert("RGB")
        except Exception as e:  # PIL raises many types for bad files
            raise DataError(f"cannot read background photo {str(f)!r}: {e}") from None
        short = min(im.size)
        if short > PHOTO_MAX_SHORT:
            s = PHOTO_MAX_SHORT / short
            im = im.resize((round(im.width * s), round(im.height * s)), Image.BILINEAR)
        out.append(np.asarray(im, dtype=np.uint8))
    return out


def _item_patch(item: np.ndarray, side: int, lo: int) -> tuple[np.ndarray, np.ndarray]:
    """An item scaled so its longer side is ``side`` and trimmed to its mask: (intensity float32, mask bool).

    ``side`` grows until the trimmed mask's longer side reaches ``lo`` (trimming can shave a pixel or two)."""
    from PIL import Image

    ys, xs = np.nonzero(item)
    crop = item[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h0, w0 = crop.shape
    src = Image.fromarray(crop)
    while True:
        f = side / max(h0, w0)
        w, h = max(1, round(w0 * f)), max(1, round(h0 * f))
        a = np.asarray(src.resize((w, h), Image.BILINEAR), dtype=np.float32) / 255.0
        mask = a > MASK_THRESHOLD
        if mask.any():
            ys, xs = np.nonzero(mask)
            mask = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
            a = a[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
            if max(mask.shape) >= lo:
                return a.astype(np.float32), mask
        side += 1


def _tight(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """xyxy pixel-edge box of a boolean mask (None when empty)."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not len(rows):
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def compose(
    rng: np.random.Generator, size: int, items: np.ndarray, labels: np.ndarray, photos: Sequence[np.ndarray]
) -> tuple[np.ndarray, list[dict], np.ndarray]:
    """One image: ``(uint8 (S, S, 3), objects, owner)``.

    ``objects`` are dicts with ``box`` (xyxy pixel edges of the visible mask), ``label``, ``area`` (visible mask
    pixels) and ``mask_area`` (all mask pixels); ``owner`` is int8 ``(S, S)``: the index of the object seen at each
    pixel, -1 for background.
    """
    from PIL import Image

    # background: a random square crop of a photo, resized to S x S, mirrored half of the time
    photo = photos[int(rng.integers(len(photos)))]
    ph, pw = photo.shape[:2]
    side = int(rng.uniform(0.35, 1.0) * min(ph, pw))
    side = max(side, min(ph, pw, size // 2))
    y0, x0 = int(rng.integers(0, ph - side + 1)), int(rng.integers(0, pw - side + 1))
    bg = Image.fromarray(photo).resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + side, y0 + side))
    img = np.asarray(bg, dtype=np.float32)
    if rng.random() < 0.5:
        img = img[:, ::-1]
    img = np.ascontiguousarray(img)

    k = size / 320.0
    lo, hi = max(4, round(SIDE_RANGE[0] * k)), round(SIDE_RANGE[1] * k)
    owner = np.full((size, size), -1, dtype=np.int8)
    objs: list[dict] = []
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        idx = int(rng.integers(len(items)))
        inten, mask = _item_patch(items[idx], int(rng.integers(lo, hi + 1)), lo)
        h, w = mask.shape
        hue, sat, val = rng.random(), rng.uniform(0.5, 1.0), rng.uniform(0.6, 1.0)
        color = np.array(colorsys.hsv_to_rgb(hue, sat, val), dtype=np.float32) * 255.0
        j = len(objs)
        for _try in range(PLACEMENT_TRIES):
            x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            region = owner[y : y + h, x : x + w]
            covered = region[mask]
            new_vis: dict[int, int] = {}
            ok = True
            for i in np.unique(covered[covered >= 0]).tolist():
                left = objs[i]["area"] - int((covered == i).sum())
                if left < MIN_VISIBLE * objs[i]["mask_area"]:
                    ok = False
                    break
                new_vis[i] = left
            if not ok:
                continue
            trial = owner.copy() if new_vis else owner
            trial[y : y + h, x : x + w][mask] = j
            boxes = [o["box"] for o in objs]
            for i in new_vis:
                b = objs[i]["box"]
                t = _tight(trial[b[1] : b[3], b[0] : b[2]] == i)
                boxes[i] = (b[0] + t[0], b[1] + t[1], b[0] + t[2], b[1] + t[3])
            boxes.append((x, y, x + w, y + h))
            if any(_iou(boxes[a], boxes[b]) > MAX_IOU for a in range(len(boxes)) for b in range(a + 1, len(boxes))):
                if trial is owner:
                    owner[y : y + h, x : x + w][mask] = -1  # undo (nothing else owned these pixels)
                continue
            owner = trial
            for i, v in new_vis.items():
                objs[i]["area"], objs[i]["box"] = v, boxes[i]
            shade = 0.3 + 0.7 * inten[..., None]  # the item's own texture
            a3 = np.where(mask, np.minimum(1.0, inten / ALPHA_FULL), 0.0)[..., None]
            patch = img[y : y + h, x : x + w]
            img[y : y + h, x : x + w] = patch * (1.0 - a3) + a3 * (color * shade)
            objs.append(
                {"box": boxes[j], "label": int(labels[idx]), "area": int(mask.sum()), "mask_area": int(mask.sum())}
            )
            break
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), objs, owner


def generate(
    out: str | os.PathLike,
    *,
    size: int = 320,
    counts: dict[str, int] | None = None,
    seed: int = 0,
    fmnist_root: str | os.PathLike | None = None,
    photos: Sequence[Path] | None = None,
) -> Path:
    """Write a fmnist-detect set to the folder ``out`` (which must not exist): ``train/*.jpg``, ``val/*.jpg`` and
    ``annotations/{train,val}.json``. Built in a temporary folder beside ``out``, then renamed; returns ``out``.

    Args:
        size: image side, 160 or 320.
        counts: images per split (default 4,000 train / 1,000 val); image ``i`` does not depend on the counts.
        seed: the generation seed.
        fmnist_root: folder of the Fashion-MNIST IDX files (default: where ``fashion-mnist`` finds them).
        photos: background photo files (default: :func:`photo_files`).
    """
    from PIL import Image

    from edgeslim.data._sources import FMNIST_CLASSES, FMNIST_FILES, _find_fmnist, _read_idx

    size = check_size(size)
    counts = dict(COUNTS if counts is None else counts)
    unknown = set(counts) - set(_SPLIT_CODE)
    if unknown or any(not isinstance(n, int) or n < 1 for n in counts.values()):
        raise DataError(f"counts must map 'train'/'val' to positive image counts, got {counts!r}")
    out = Path(out)
    if out.exists():
        raise DataError(f"fmnist-detect output folder {str(out)!r} already exists")
    pics = load_photos(photos)
    folder = _find_fmnist(Path(fmnist_root) if fmnist_root else None)
    source = {"train": FMNIST_FILES["train"], "val": FMNIST_FILES["test"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    for old in out.parent.glob(f".{out.name}.*.tmp"):  # left by a generation that was killed
        with contextlib.suppress(OSError):
            if time.time() - old.stat().st_mtime > STALE_SECONDS:
                shutil.rmtree(old, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    t0 = time.perf_counter()
    try:
        (tmp / "annotations").mkdir()
        categories = [{"id": i + 1, "name": n, "supercategory": "fashion"} for i, n in enumerate(FMNIST_CLASSES)]
        for split, n in counts.items():
            items = _read_idx(folder / source[split][0])
            labels = _read_idx(folder / source[split][1])
            (tmp / split).mkdir()
            images, anns = [], []
            for i in range(n):
                rng = np.random.default_rng([seed, _SPLIT_CODE[split], i])
                img, objs, _ = compose(rng, size, items, labels, pics)
                fn = f"{i:06d}.jpg"
                Image.fromarray(img).save(tmp / split / fn, quality=95)
                images.append({"id": i + 1, "file_name": fn, "width": size, "height": size})
                for o in objs:
                    x0, y0, x1, y1 = o["box"]
                    anns.append(
                        {
                            "id": len(anns) + 1,
                            "image_id": i + 1,
                            "category_id": o["label"] + 1,
                            "bbox": [x0, y0, x1 - x0, y1 - y0],
                            "area": o["area"],
                            "iscrowd": 0,
                        }
                    )
            info = {
                "description": f"edgeslim fmnist-detect {VERSION} ({split}): Fashion-MNIST items on photo crops",
                "version": VERSION,
                "seed": seed,
                "size": size,
                "fmnist": source[split][0],
                "rule": f"visible mask >= {MIN_VISIBLE:.0%} of each object, box IoU <= {MAX_IOU}",
            }
            doc = {"info": info, "images": images, "annotations": anns, "categories": categories}
            (tmp / "annotations" / f"{split}.json").write_text(json.dumps(doc), encoding="utf-8")
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "annotations").is_dir():  # not a concurrent writer that finished first
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("fmnist-detect %s: %s images in %.1f s", out, counts, time.perf_counter() - t0)
    return out


def folder_name(size: int, seed: int = 0, limit: int | None = None) -> str:
    name = f"{NAME}-{size}-{VERSION}"
    if seed:
        name += f"-seed{seed}"
    if limit:
        name += f"-first{limit}"
    return name


def fmnist_detect(
    root: str | Path | None = None, seed: int = 0, *, size: int = 320, limit: int | None = None
) -> tuple[DetectionDataset, DetectionDataset]:
    """fmnist-detect as ``(train, val)``: generated once into ``root`` (default ``<cache>/data``), then read.

    ``limit`` keeps (and only generates) the first ``limit`` images of each split: the same images as the full set's.
    """
    from edgeslim.data._sources import cache_dir

    size = check_size(size)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be a positive number of images, got {limit!r}")
    counts = {s: min(n, limit) if limit else n for s, n in COUNTS.items()}
    if limit and all(counts[s] == COUNTS[s] for s in COUNTS):
        limit = None
    base = Path(root) if root else cache_dir() / "data"
    folder = base / folder_name(size, seed, limit)
    if not (folder / "annotations" / "val.json").is_file():
        log.info("generating %s (%s images, once)", folder, counts)
        generate(folder, size=size, counts=counts, seed=seed)
    return tuple(  # type: ignore[return-value]
        from_coco(folder / "annotations" / f"{s}.json", size=size, image_dir=folder / s, name=NAME, split=s)
        for s in ("train", "val")
    )

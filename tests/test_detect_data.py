"""Detection data: the fmnist-detect generator, DetectionDataset, coco: folders, bad input, COCO mAP."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeslim import data
from edgeslim.core.errors import DataError
from edgeslim.core.metrics import coco_map
from edgeslim.data import DetectionDataset, check_classes, collate_detection
from edgeslim.data import _fmnist_detect as gen

FMNIST = Path("/usr/share/datasets/fashion-mnist")
N = 16  # images per split of the test set (160x160)

pytestmark = [
    pytest.mark.skipif(
        not gen.photo_files(), reason="no background photos: apt-get install darknet or pip install scikit-image"
    ),
    pytest.mark.skipif(
        not FMNIST.is_dir(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)"
    ),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``load("fmnist-detect", size=160, limit=16)`` generated once into a temporary root: (root, train, val)."""
    root = tmp_path_factory.mktemp("detect")
    train, val = data.load("fmnist-detect", size=160, limit=N, root=root)
    return root, train, val


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_items_collate_and_cache(tiny, monkeypatch):
    root, train, val = tiny
    assert isinstance(train, DetectionDataset) and (len(train), len(val)) == (N, N)
    assert train.classes[0] == "T-shirt/top" and train.num_classes == 10 and train.image_size == 160
    assert train.annotation_file == root / gen.folder_name(160, 0, N) / "annotations" / "train.json"
    image, target = train[3]
    assert image.shape == (3, 160, 160) and image.dtype == torch.float32
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0 and float(image.std()) > 0.05
    boxes, labels = target["boxes"], target["labels"]
    assert boxes.dtype == torch.float32 and labels.dtype == torch.int64 and isinstance(target["image_id"], int)
    assert 1 <= len(boxes) <= 6 and len(labels) == len(boxes)
    assert bool((boxes[:, 2:] > boxes[:, :2]).all()) and float(boxes.min()) >= 0 and float(boxes.max()) <= 160
    assert int(labels.min()) >= 0 and int(labels.max()) <= 9
    loader = torch.utils.data.DataLoader(train, batch_size=4, collate_fn=collate_detection)
    images, targets = next(iter(loader))
    assert images.shape == (4, 3, 160, 160) and len(targets) == 4 and torch.equal(targets[3]["boxes"], boxes)
    # a second load reads the cached set: nothing is generated again
    monkeypatch.setattr(gen, "generate", lambda *a, **k: pytest.fail("regenerated a cached set"))
    again, _ = data.load("fmnist-detect", size=160, limit=N, root=root)
    assert torch.equal(again[3][0], image)
    sub = train.subset(5)
    assert len(sub) == 5 and sub.image_ids == train.image_ids[:5]


def test_generator_is_deterministic_and_independent_of_counts(tiny, tmp_path):
    root, train, _ = tiny
    first = _files(root / gen.folder_name(160, 0, N))
    gen.generate(tmp_path / "again", size=160, counts={"train": N, "val": N}, seed=0)
    assert _files(tmp_path / "again") == first  # same seed: the same bytes, images and JSON
    gen.generate(tmp_path / "four", size=160, counts={"train": 4, "val": 2}, seed=0)
    four = _files(tmp_path / "four")
    assert all(four[f"train/{i:06d}.jpg"] == first[f"train/{i:06d}.jpg"] for i in range(4))
    gen.generate(tmp_path / "other", size=160, counts={"train": 2, "val": 1}, seed=1)
    assert _files(tmp_path / "other")["train/000000.jpg"] != first["train/000000.jpg"]
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary build folders are gone


def test_generator_output_is_pinned_to_its_version(tiny):
    """The first images' boxes at this version; when the generator's output changes, bump VERSION (cached sets
    of the old version are then not mistaken for new ones)."""
    _, train, _ = tiny
    assert gen.VERSION == "v1"
    assert [train.target(i)["boxes"].tolist() for i in range(2)] == [
        [[75.0, 75.0, 116.0, 98.0]],
        [[43.0, 95.0, 55.0, 109.0], [30.0, 26.0, 47.0, 48.0], [36.0, 123.0, 52.0, 145.0], [138.0, 137.0, 144.0, 155.0]],
    ]
    assert [train.target(i)["labels"].tolist() for i in range(2)] == [[5], [0, 0, 4, 1]]


def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return iw * ih / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - iw * ih)


def test_boxes_are_tight_and_occlusion_is_bounded(tiny):
    from edgeslim.data._sources import _read_idx

    _, train, _ = tiny
    items = _read_idx(FMNIST / "train-images-idx3-ubyte.gz")
    labels = _read_idx(FMNIST / "train-labels-idx1-ubyte.gz")
    photos = gen.load_photos()
    counts = []
    for i in range(N):
        img, objs, owner = gen.compose(np.random.default_rng([0, 0, i]), 160, items, labels, photos)
        target = train.target(i)
        assert target["boxes"].tolist() == [list(map(float, o["box"])) for o in objs]  # the file holds these boxes
        assert target["labels"].tolist() == [o["label"] for o in objs]
        counts.append(len(objs))
        for k, o in enumerate(objs):
            x0, y0, x1, y1 = o["box"]
            seen = owner == k
            assert not seen[:y0].any() and not seen[y1:].any() and not seen[:, :x0].any() and not seen[:, x1:].any()
            inside = seen[y0:y1, x0:x1]
            # the visible mask touches all four edges of its box
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            assert int(seen.sum()) == o["area"] >= gen.MIN_VISIBLE * o["mask_area"]
            # pasted at 8..48 px (160 = half of 320's 16..96); a partly covered object's visible box can be smaller
            assert max(x1 - x0, y1 - y0) <= 48 and (o["area"] < o["mask_area"] or max(x1 - x0, y1 - y0) >= 8)
        for a in range(len(objs)):
            for b in range(a + 1, len(objs)):
                assert _iou(objs[a]["box"], objs[b]["box"]) <= gen.MAX_IOU
    assert min(counts) >= 1 and max(counts) <= 6 and len(set(counts)) > 2


def test_coco_json_round_trips_through_pycocotools(tiny):
    from pycocotools.coco import COCO

    _, train, _ = tiny
    doc = json.loads(train.annotation_file.read_text())
    assert [c["id"] for c in doc["categories"]] == list(range(1, 11))
    coco = COCO(str(train.annotation_file))
    assert sorted(coco.getImgIds()) == sorted(train.image_ids)
    for i in range(len(train)):
        t = train.target(i)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=t["image_id"]))
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
        assert np.array_equal(xyxy, t["boxes"].numpy()) and all(a["iscrowd"] == 0 and a["area"] > 0 for a in anns)
        assert [a["category_id"] - 1 for a in anns] == t["labels"].tolist()


def _dets(ds, shift=0.0, label_offset=0):
    out = []
    for i in range(len(ds)):
        t = ds.target(i)
        b = t["boxes"].numpy().copy()
        w = b[:, 2] - b[:, 0]
        b[:, 0] += shift * w
        b[:, 2] += shift * w
        out.append(
            {
                "image_id": t["image_id"],
                "boxes": b,
                "scores": np.linspace(0.9, 0.5, len(b)),
                "labels": (t["labels"].numpy() + label_offset) % 10,
            }
        )
    return out


def test_coco_map_exact_values(tiny):
    _, _, val = tiny
    perfect = coco_map(val, _dets(val))
    assert [perfect[k] for k in ("map", "map50", "map75")] == pytest.approx([1.0] * 3, abs=1e-12)
    assert set(perfect["per_class"]) == set(val.classes)
    assert all(v == pytest.approx(1.0, abs=1e-12) or np.isnan(v) for v in perfect["per_class"].values())
    # every box moved right by 10% of its width: IoU = 0.9 / 1.1 = 0.818, a hit at thresholds .50 .. .80 (7 of 10)
    shifted = coco_map(val.annotation_file, _dets(val, shift=0.1))
    assert shifted["map"] == pytest.approx(0.7, abs=1e-9)
    assert [shifted["map50"], shifted["map75"]] == pytest.approx([1.0, 1.0], abs=1e-12)
    assert coco_map(val, _dets(val, label_offset=1))["map"] == 0.0  # right boxes, wrong classes
    # a subset is scored on its own images: its ground truth found in full is still 1.0
    sub = val.subset(4)
    assert coco_map(sub, _dets(sub))["map"] == pytest.approx(1.0, abs=1e-12)
    assert coco_map(val, _dets(sub))["map"] < 0.9  # the other images' objects are missed
    with pytest.raises(DataError, match=r"detections\[0\].labels holds .*labels 0..9"):
        coco_map(val, [{**_dets(val)[0], "labels": np.full(len(_dets(val)[0]["labels"]), 10)}])
    with pytest.raises(DataError, match=r"detections\[0\].image_id 999"):
        coco_map(val, [{**_dets(val)[0], "image_id": 999}])


# ------------------------------------------------------------------------------------------------ coco: folders


def _coco_folder(tmp_path: Path, n: int = 6) -> tuple[Path, dict]:
    """A COCO folder of non-square PNGs, each with solid red and blue rectangles at its annotated boxes."""
    from PIL import Image, ImageDraw

    (tmp_path / "images").mkdir(parents=True)
    (tmp_path / "annotations").mkdir()
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(n):
        w, h = (200, 100) if i % 2 else (120, 240)
        im = Image.new("RGB", (w, h), (0, 128, 0))
        d = ImageDraw.Draw(im)
        for cat, color in ((3, (255, 0, 0)), (7, (0, 0, 255))):
            bw, bh = int(rng.integers(20, 40)), int(rng.integers(20, 40))
            left = 0 if cat == 3 else w // 2  # red in the left half, blue in the right: they never overlap
            x, y = int(rng.integers(left, left + w // 2 - bw)), int(rng.integers(0, h - bh))
            if cat == 7 and i % 3 == 0:
                continue
            d.rectangle([x, y, x + bw - 1, y + bh - 1], fill=color)
            anns.append({"id": len(anns) + 1, "image_id": 100 + i, "category_id": cat, "bbox": [x, y, bw, bh]})
            anns[-1].update(area=bw * bh, iscrowd=0)
        im.save(tmp_path / "images" / f"p{i}.png")
        images.append({"id": 100 + i, "file_name": f"p{i}.png", "width": w, "height": h})
    doc = {"images": images, "annotations": anns, "categories": [{"id": 3, "name": "red"}, {"id": 7, "name": "blue"}]}
    (tmp_path / "annotations" / "instances.json").write_text(json.dumps(doc))
    return tmp_path, doc


def test_coco_folder_is_letterboxed_with_its_boxes(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGESLIM_CACHE", str(tmp_path / "cache"))
    folder, doc = _coco_folder(tmp_path / "set")
    train, val = data.load(f"coco:{folder}", size=160, seed=0)
    assert (len(train), len(val)) == (5, 1) and train.classes == ["red", "blue"]
    assert sorted(train.image_ids + val.image_ids) == [im["id"] for im in doc["images"]]
    assert train.source_annotation_file == folder / "annotations" / "instances.json"
    assert train.annotation_file.parent.parent == tmp_path / "cache" / "data"
    for ds in (train, val):
        for i in range(len(ds)):
            image, t = ds[i]
            assert image.shape == (3, 160, 160)
            for box, label in zip(t["boxes"], t["labels"]):
                x0, y0, x1, y1 = box.tolist()
                cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
                rgb = image[:, cy, cx]
                assert (float(rgb[0]) > 0.9) == (int(label) == 0) and (float(rgb[2]) > 0.9) == (int(label) == 1)
            src = ds.to_source_frame(t["image_id"], t["boxes"])
            orig = {a["id"]: a for a in doc["annotations"] if a["image_id"] == t["image_id"]}
            want = np.array(
                [
                    [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                    for a in orig.values()
                ]
            )
            assert np.allclose(src, want, atol=1e-4)
    # the padding is gray: a 200x100 image fills 160x80 of the square, rows above and below are padding
    wide = next(i for i in range(len(train)) if train.records[i].width == 200)
    assert float(train[wide][0][:, 2, 80].sub(114 / 255).abs().max()) < 1e-6
    assert coco_map(val, _dets(val))["map"] == pytest.approx(1.0, abs=1e-12)
    assert coco_map(train, _dets(train))["map"] == pytest.approx(1.0, abs=1e-12)
    # crowd regions stay in the annotation file (pycocotools ignores them) but not in the training targets; an
    # image without boxes is a negative
    doc["annotations"][0]["iscrowd"] = 1
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] != 101]
    (folder / "annotations" / "instances.json").write_text(json.dumps(doc))
    t4, v4 = data.load(f"coco:{folder}", size=160, seed=0)
    every = {t["image_id"]: t for ds in (t4, v4) for t in (ds.target(i) for i in range(len(ds)))}
    assert every[101]["boxes"].shape == (0, 4) and t4[t4.image_ids.index(101)][0].shape == (3, 160, 160)
    assert len(every[100]["boxes"]) == sum(a["image_id"] == 100 for a in doc["annotations"]) - 1
    assert coco_map(t4, _dets(t4))["map"] == pytest.approx(1.0, abs=1e-12)
    # one file named directly, and a train/val pair of files
    t2, v2 = data.load(f"coco:{folder / 'annotations' / 'instances.json'}", size=160, seed=0)
    assert t2.image_ids == train.image_ids
    (folder / "annotations" / "instances.json").rename(folder / "annotations" / "instances_train.json")
    doc_val = {
        **doc,
        "images": doc["images"][:2],
        "annotations": [a for a in doc["annotations"] if a["image_id"] < 102],
    }
    (folder / "annotations" / "instances_val.json").write_text(json.dumps(doc_val))
    t3, v3 = data.load(f"coco:{folder}", size=320, limit=3)
    assert (len(t3), len(v3)) == (3, 2) and t3[0][0].shape == (3, 320, 320)


def _bad(folder: Path, doc: dict, edit) -> str:
    d = json.loads(json.dumps(doc))
    edit(d)
    f = folder / "annotations" / "instances.json"
    f.write_text(json.dumps(d) if d is not None else "")
    return f"coco:{folder}"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["annotations"][0].update(bbox=[110, 10, 30, 10]), r"annotations\[0\]\.bbox .*outside its image"),
        (lambda d: d["annotations"].clear(), r"field 'annotations' is empty"),
        (lambda d: d.pop("categories"), r"field 'categories' is missing"),
        (
            lambda d: d["annotations"][1].update(category_id=99),
            r"annotations\[1\]\.category_id 99 is not in 'categories'",
        ),
        (lambda d: d["annotations"][2].update(bbox=[5, 5, -4, 10]), r"annotations\[2\]\.bbox has a negative width"),
        (lambda d: d["images"][3].update(file_name="gone.png"), r"images\[3\]\.file_name 'gone.png': no such file"),
        (lambda d: d["annotations"][0].update(image_id=5), r"annotations\[0\]\.image_id 5 is not the id"),
    ],
)
def test_bad_coco_input_names_the_file_and_field(tmp_path, monkeypatch, edit, message):
    monkeypatch.setenv("EDGESLIM_CACHE", str(tmp_path / "cache"))
    folder, doc = _coco_folder(tmp_path / "set")
    spec = _bad(folder, doc, edit)
    with pytest.raises(DataError, match=message) as e:
        data.load(spec, size=160)
    assert "instances.json" in str(e.value) and "\n" not in str(e.value)


def test_other_bad_input(tmp_path, tiny, monkeypatch):
    monkeypatch.setenv("EDGESLIM_CACHE", str(tmp_path / "cache"))
    folder, _ = _coco_folder(tmp_path / "set")
    (folder / "annotations" / "instances.json").write_text("")
    with pytest.raises(DataError, match=r"instances.json' is empty"):
        data.load(f"coco:{folder}")
    _, train, _ = tiny
    with pytest.raises(DataError, match=r"train.json': field 'categories' holds 10 classes .* predicts 5"):
        check_classes(train, 5)
    check_classes(train, 10)
    with pytest.raises(DataError, match=r"size must be one of 160, 320, got 224"):
        data.load("fmnist-detect", size=224)
    with pytest.raises(DataError, match=r"multiple of 32 from 32 to 4096 \(coco: data\), got 100"):
        data.load(f"coco:{folder}", size=100)
    with pytest.raises(DataError, match=r"size= and limit= apply to detection data"):
        data.load("digits", size=160)
    with pytest.raises(DataError, match=r"apt-get install darknet"):
        gen.load_photos([])

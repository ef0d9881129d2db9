"""Model sources by name (torchvision, timm, hf, factories with arguments) and image folders streamed from disk."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import edgeslim
from edgeslim import data, models
from edgeslim.cli import main
from edgeslim.core.errors import ConfigError, DataError, ModelError
from edgeslim.data import FolderDataset, ImagePreprocess, _folder, calibration_subset
from edgeslim.models._sources import parse_spec

HAVE_TIMM = importlib.util.find_spec("timm") is not None


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """Any attempt to fetch weights fails the test: sources by name never download."""

    def refuse(*a, **k):
        raise AssertionError("a weights download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> bool:
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


def _randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Non-default weights (and BN statistics), so a reload that kept a fresh init would not match."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(
                    torch.rand(t.shape, generator=g) * 0.2 + 0.9
                    if t.ndim == 1
                    else torch.randn(t.shape, generator=g) * 0.05
                )
    return model


# ---------------------------------------------------------------------------------------------- model sources


def test_torchvision_source_with_arguments_runs_and_takes_offline_weights(tmp_path):
    m = models.load("torchvision:mobilenet_v2(num_classes=3, width_mult=0.5)")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert m(x).shape == (2, 3)
    assert m.features[0][0].out_channels == 16  # width_mult=0.5 reached the builder
    assert m.edgeslim_source == {
        "kind": "torchvision",
        "name": "mobilenet_v2",
        "spec": "torchvision:mobilenet_v2(num_classes=3, width_mult=0.5)",
        "kwargs": {"num_classes": 3, "width_mult": 0.5},
    }
    assert m.edgeslim_preprocess["mean"] == pytest.approx(_folder.IMAGENET_MEAN)
    f = tmp_path / "w.pt"
    torch.save(_randomized(m).state_dict(), f)
    again = models.load("torchvision:mobilenet_v2(num_classes=3, width_mult=0.5)", weights=f)
    assert _same_outputs(m, again, x)
    with pytest.raises(ModelError, match="num_classes.*classifier|classifier.*3"):
        models.load("torchvision:mobilenet_v2(num_classes=4, width_mult=0.5)", weights=f)
    with pytest.raises(ModelError, match="never downloads"):
        models.load("torchvision:resnet18(weights='DEFAULT')")


def test_factory_arguments_are_literals_and_nothing_else():
    s = parse_spec("tiny:TinyCNN(3, num_classes=4)")
    assert (s.kind, s.target, s.args, s.kwargs) == ("factory", "tiny:TinyCNN", (3,), {"num_classes": 4})
    m = models.load("tiny:TinyCNN(in_channels=3, num_classes=4)")
    with torch.no_grad():
        assert m(torch.zeros(1, 3, 8, 8)).shape == (1, 4)
    assert m.edgeslim_source == {"kind": "factory", "spec": "tiny:TinyCNN(in_channels=3, num_classes=4)"}
    with pytest.raises(ModelError, match=r"__import__\('os'\) is not a literal"):
        models.load("tiny:TinyCNN(num_classes=__import__('os'))")
    with pytest.raises(ModelError, match="is not a literal"):
        parse_spec("torchvision:resnet18(num_classes=open('/etc/passwd'))")
    with pytest.raises(ModelError, match=r"\*\* unpacking"):
        parse_spec("tiny:TinyCNN(**{'num_classes': 2})")
    with pytest.raises(ModelError, match="not valid Python"):
        parse_spec("tiny:TinyCNN(num_classes=")
    with pytest.raises(ModelError, match="unexpected keyword argument 'classes'.*in_channels, num_classes"):
        models.load("tiny:TinyCNN(classes=2)")


def test_class_needing_a_config_is_one_clear_error():
    pytest.importorskip("transformers")
    with pytest.raises(ModelError, match="Hugging Face class.*hf:<folder"):
        models.load("transformers:BertModel")
    with pytest.raises(ModelError, match="missing a required argument: 'out_features'"):
        models.load("torch.nn:Linear(in_features=2)")


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(
        ModelError, match="unknown torchvision model 'resnt18'.*did you mean 'resnet18'.*valid: alexnet"
    ):
        models.load("torchvision:resnt18")
    with pytest.raises(ConfigError, match="unknown model 'resnet50'.*small_cnn.*torchvision's is torchvision:resnet50"):
        models.load("resnet50", pretrained=False)
    with pytest.raises(ModelError, match="hf:no-such-model is neither a local folder.*all-minilm-l6-v2"):
        models.load("hf:no-such-model")
    with pytest.raises(ModelError, match="must look like 'package.module:function'"):
        models.load("tiny:")
    if HAVE_TIMM:
        with pytest.raises(
            ModelError, match="unknown timm model 'efficientnet_lit0'.*did you mean 'efficientnet_lite0'"
        ):
            models.load("timm:efficientnet_lit0")


def test_recipe_of_a_torchvision_source_reloads_without_the_model(tmp_path):
    m = _randomized(models.load("torchvision:resnet18(num_classes=2)"))
    p = edgeslim.save(m, tmp_path / "r.recipe")
    again = edgeslim.load(p)
    assert type(again).__name__ == "ResNet" and again.fc.out_features == 2
    assert _same_outputs(m, again, torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    # user code still needs model=
    f = edgeslim.save(models.load("tiny:TinyCNN(num_classes=3)"), tmp_path / "f.recipe")
    with pytest.raises(ModelError, match="user code 'tiny:TinyCNN\\(num_classes=3\\)'.*model="):
        edgeslim.load(f)


@pytest.mark.skipif(not HAVE_TIMM, reason="timm is not installed (pip install 'edgeslim[timm]')")
def test_timm_source_runs_declares_its_preprocessing_and_reloads(tmp_path):
    m = _randomized(models.load("timm:efficientnet_lite0(num_classes=2)"))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert m(x).shape == (1, 2)
    pre = data.model_preprocess(m)
    assert pre["mean"] == pytest.approx(_folder.IMAGENET_MEAN) and pre["input_size"] == 224
    assert pre["crop_fraction"] == pytest.approx(0.875)
    assert _same_outputs(m, edgeslim.load(edgeslim.save(m, tmp_path / "t.recipe")), x)
    f = tmp_path / "w.pt"
    torch.save(m.state_dict(), f)
    assert _same_outputs(m, models.load("timm:efficientnet_lite0(num_classes=2)", weights=f), x)
    with pytest.raises(ModelError, match="never downloads"):
        models.load("timm:efficientnet_lite0(pretrained=True)")


def test_hf_local_folder_loads_offline_and_reloads_from_a_recipe(tmp_path):
    pytest.importorskip("transformers")
    from tiny import tiny_bert, tiny_bert_inputs

    ref = tiny_bert()
    ref.save_pretrained(tmp_path / "bert")
    m = models.load(f"hf:{tmp_path / 'bert'}")
    inputs = tiny_bert_inputs(4)
    with torch.no_grad():
        assert torch.equal(m(**inputs).last_hidden_state, ref(**inputs).last_hidden_state)
    assert m.edgeslim_source["kind"] == "hf" and m.edgeslim_source["name"] == str((tmp_path / "bert").resolve())
    again = edgeslim.load(edgeslim.save(m, tmp_path / "b.recipe"))
    with torch.no_grad():
        assert torch.equal(again(**inputs).last_hidden_state, ref(**inputs).last_hidden_state)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        models.load(f"hf:{tmp_path / 'empty'}")


# ---------------------------------------------------------------------------------------------- image folders


def _folder_of(root: Path, n: int = 6, sizes=((20, 40), (30, 24)), classes=("cat", "dog")) -> Path:
    """Images whose center is white and whose left/right quarters are black, of mixed sizes (h, w)."""
    from PIL import Image

    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            h, w = sizes[i % len(sizes)]
            a = np.full((h, w, 3), 255, dtype=np.uint8)
            a[:, : w // 4] = 0
            a[:, w - w // 4 :] = 0
            Image.fromarray(a).save(root / c / f"{i}.png")
    return root


def test_center_crop_and_presets_give_the_expected_tensors(tmp_path):
    root = _folder_of(tmp_path / "f")
    tr, va = data.load(
        f"folder:{root}", preprocess=ImagePreprocess(input_size=10, crop_fraction=0.5, normalize="imagenet")
    )
    assert isinstance(tr, FolderDataset) and tr.input_shape == (3, 10, 10) and tr.classes == ("cat", "dog")
    x, y = tr.batches(4)[0]
    assert x.shape == (4, 3, 10, 10) and y.dtype == torch.long
    white = (1.0 - torch.tensor(_folder.IMAGENET_MEAN)) / torch.tensor(_folder.IMAGENET_STD)
    # a 20x40 image: shorter side 20 = 10 / 0.5 (no resize), its centered 10x10 (columns 15-24) is all white
    wide = [i for i, f in enumerate(tr.files) if f.name in ("0.png", "2.png", "4.png")]
    for i in wide:
        assert torch.allclose(tr[i][0], white.view(3, 1, 1).expand(3, 10, 10), atol=1e-5)
    st, _ = data.load(f"folder:{root}", preprocess=ImagePreprocess(input_size=10, resize="stretch", normalize="0.5"))
    s = st[wide[0]][0]
    assert s.min() == pytest.approx(-1.0) and s.max() == pytest.approx(1.0)  # stretched: the black quarters stay
    assert torch.equal(s[:, :, 0], torch.full((3, 10), -1.0))
    with pytest.raises(DataError, match="grayscale.*0.5 or dataset"):
        data.load(f"folder:{root}", preprocess=ImagePreprocess(normalize="imagenet", grayscale=True))
    with pytest.raises(DataError, match="applies to folder:"):
        data.load("digits", preprocess=ImagePreprocess(input_size=8))


def test_dataset_statistics_and_model_preset(tmp_path):
    root = _folder_of(tmp_path / "f")
    tr, va = data.load(f"folder:{root}", preprocess={"input_size": 12, "resize": "stretch"})
    px = tr.images.float() / 255
    assert tr.mean == pytest.approx(tuple(px.mean(dim=(0, 2, 3)).tolist()), abs=1e-6)
    assert va.mean == tr.mean and va.std == tr.std  # validation is normalised like training
    assert tr.normalized().mean().item() == pytest.approx(0.0, abs=1e-4)
    m = models.load("torchvision:squeezenet1_1(num_classes=2)")
    tr, _ = data.load(f"folder:{root}", preprocess=ImagePreprocess(input_size=16, normalize="model"), model=m)
    assert tr.mean == pytest.approx(_folder.IMAGENET_MEAN) and tr.input_shape == (3, 16, 16)
    assert "torchvision squeezenet1_1" in tr.describe()["preprocess"]["from"]
    with pytest.raises(DataError, match="normalize='model' needs a model"):
        data.load(f"folder:{root}", preprocess=ImagePreprocess(normalize="model"), model=torch.nn.Linear(2, 2))


def test_folder_is_streamed_not_decoded_up_front(tmp_path, monkeypatch):
    root = _folder_of(tmp_path / "f", n=15)
    tr, va = data.load(f"folder:{root}", preprocess=ImagePreprocess(input_size=8, normalize="imagenet"))
    assert tr.decoded == 0 and len(tr) + len(va) == 30
    first = tr.batches(4)[0]
    assert tr.decoded == 4 and first[0].shape == (4, 3, 8, 8)
    sub = tr.take(3, seed=1)
    assert sub.normalized().shape == (3, 3, 8, 8) and tr.decoded == 7
    cal = calibration_subset(tr, 6)
    assert isinstance(cal, FolderDataset) and len(cal) == 6 and tr.decoded == 7
    # dataset statistics read a seeded sample, not the folder
    monkeypatch.setattr(_folder, "STATS_SAMPLES", 5)
    tr2, _ = data.load(f"folder:{root}")
    assert tr2.decoded == 5 < len(tr2)
    assert "5 training images" in tr2.describe()["preprocess"]["from"]
    # materializing everything beyond the memory cap is refused with the way out; streaming still works
    monkeypatch.setenv("EDGESLIM_DATA_MEMORY_MB", "0.001")
    with pytest.raises(DataError, match=r"more than the 0 MB cap.*\.batches\(size\).*\.take\(n\)"):
        tr.normalized()
    assert sum(len(y) for _, y in tr.batches(8)) == len(tr)


def test_zoo_model_takes_classes_and_shape_from_a_folder(tmp_path):
    root = _folder_of(tmp_path / "f", classes=("a", "b", "c"))
    pre = ImagePreprocess(input_size=16, normalize="0.5")
    m = models.load("small_cnn", f"folder:{root}", pretrained=False, preprocess=pre)
    tr, _ = data.load(f"folder:{root}", preprocess=pre)
    with torch.no_grad():
        assert m(tr.batches(2)[0][0]).shape == (2, 3)
    assert m.edgeslim_source["input_shape"] == [3, 16, 16] and m.edgeslim_source["num_classes"] == 3
    again = edgeslim.load(edgeslim.save(_randomized(m), tmp_path / "z.recipe"))
    assert _same_outputs(m, again, tr.batches(2)[0][0])
    with pytest.raises(ModelError, match="no shipped checkpoint.*weights=.*--no-pretrained"):
        models.load("small_cnn", f"folder:{root}")


def test_cli_refuses_a_class_count_mismatch_on_folder_data(tmp_path, capsys):
    root = _folder_of(tmp_path / "f")
    args = ["export", "torchvision:mobilenet_v2", "--dataset", f"folder:{root}", "--input-size", "32"]
    code = main([*args, "--normalize", "model", "--out", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "outputs 1000 classes but dataset" in err[-1] and "has 2 (cat, dog)" in err[-1]
    assert not (tmp_path / "m.onnx").exists()
    code = main(
        [
            "export",
            "small_cnn",
            "--dataset",
            "digits",
            "--input-size",
            "32",
            "--no-pretrained",
            "--out",
            str(tmp_path / "d.onnx"),
        ]
    )
    assert code == 2 and "applies to folder:" in capsys.readouterr().err

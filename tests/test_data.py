import gzip

import numpy as np
import pytest
import torch

from edgeslim import data
from edgeslim.core.errors import ConfigError, DataError
from edgeslim.data import ImageDataset, calibration_subset


def test_fashion_mnist_from_the_debian_package():
    train, val = data.load("fashion-mnist")
    assert (len(train), len(val)) == (60000, 10000)
    assert train.input_shape == (1, 28, 28) and train.num_classes == 10
    assert train.images.dtype == torch.uint8 and set(train.labels.unique().tolist()) == set(range(10))
    x, y = val[0]
    assert x.shape == (1, 28, 28) and abs(float(train.normalized()[:2000].mean())) < 0.1


def test_small_sources_split_deterministically():
    a_tr, a_va = data.load("digits", seed=1)
    b_tr, b_va = data.load("digits", seed=1)
    c_tr, _ = data.load("digits", seed=2)
    assert torch.equal(a_tr.labels, b_tr.labels) and torch.equal(a_va.images, b_va.images)
    assert not torch.equal(a_tr.images, c_tr.images)
    assert len(a_tr) + len(a_va) == 1797
    m_tr, m_va = data.load("mnist-5k")
    assert (len(m_tr), len(m_va)) == (4000, 1000)
    # the held-out split is stratified: every class has ~20%
    counts = np.bincount(m_va.labels.numpy(), minlength=10)
    assert counts.min() >= 80


def test_calibration_subset_is_class_balanced_and_seeded():
    train, _ = data.load("digits")
    c = calibration_subset(train, 200, seed=0)
    assert len(c) == 200
    counts = np.bincount(c.labels.numpy(), minlength=10)
    assert counts.min() >= 20 and counts.max() <= 21
    assert torch.equal(c.images, calibration_subset(train, 200, seed=0).images)
    assert len(calibration_subset(train, 10_000)) == len(train)


def test_missing_and_corrupt_data_give_clear_errors(tmp_path):
    with pytest.raises(DataError, match="Fashion-MNIST not found in .*missing train-images-idx3-ubyte.gz"):
        data.load("fashion-mnist", root=tmp_path)
    for f in (
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ):
        with gzip.open(tmp_path / f, "wb") as fh:
            fh.write(b"\x00\x00\x08\x03\x00\x00\x00\x05garbage")
    with pytest.raises(DataError, match="cannot read IDX file .*train-images-idx3-ubyte.gz"):
        data.load("fashion-mnist", root=tmp_path)
    with pytest.raises(ConfigError, match="unknown dataset 'fashion_mnist'.*did you mean 'fashion-mnist'"):
        data.load("fashion_mnist")
    empty = ImageDataset(
        "x",
        "train",
        torch.zeros(0, 1, 8, 8, dtype=torch.uint8),
        torch.zeros(0, dtype=torch.long),
        ("a",),
        (0.5,),
        (0.5,),
    )
    with pytest.raises(DataError, match="empty"):
        calibration_subset(empty, 8)


def test_image_folder_source(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(tmp_path / c / f"{i}.png")
    train, val = data.load(f"folder:{tmp_path}")
    assert train.classes == ("cat", "dog") and train.input_shape == (3, 12, 10)
    assert len(train) == 16 and len(val) == 4
    with pytest.raises(DataError, match="no class subfolders"):
        data.image_folder(tmp_path / "cat")
    (tmp_path / "cat" / "bad.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="cannot read image .*bad.png"):
        data.load(f"folder:{tmp_path}")

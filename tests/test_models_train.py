import json

import pytest
import torch
from tiny import TinyCNN

from edgeslim import models
from edgeslim.core.errors import ConfigError, DataError, ModelError
from edgeslim.train import TrainConfig, evaluate, fit


@pytest.mark.parametrize("name", ["small_cnn", "mobilenet_v2", "resnet18"])
def test_zoo_models_fit_the_dataset_shapes(name):
    m = models.build(name, "fashion-mnist").eval()
    with torch.no_grad():
        assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    m8 = models.build(name, "digits").eval()
    with torch.no_grad():
        assert m8(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_unknown_model_lists_the_valid_names():
    with pytest.raises(ConfigError, match="unknown model 'mobilenetv2'.*did you mean 'mobilenet_v2'.*resnet18"):
        models.load("mobilenetv2")


def test_shipped_checkpoints_load_and_match_their_record():
    from edgeslim.data import load

    _, val = load("fashion-mnist")
    sub = val.take(2000, seed=0)
    for name in ("small_cnn", "mobilenet_v2"):
        info = models.checkpoint_info(name, "fashion-mnist")
        assert info["accuracy"] > 0.85 and "edgeslim train" in info["command"]
        acc = evaluate(models.load(name, "fashion-mnist"), sub)
        assert abs(acc - info["accuracy"]) < 0.02, (name, acc, info["accuracy"])
    assert sum(models.checkpoint_path(n, "fashion-mnist").stat().st_size for n in ("small_cnn", "mobilenet_v2")) < 15e6


def test_imagenet_initialisation_sums_the_stem_over_rgb():
    from edgeslim.models._zoo import imagenet_mobilenet_v2_weights

    src = torch.load(imagenet_mobilenet_v2_weights(), weights_only=True)
    m = models.load("mobilenet_v2", pretrained="imagenet")
    assert torch.allclose(m.features[0][0].weight, src["features.0.0.weight"].sum(1, keepdim=True))
    assert torch.equal(m.features[5].conv[1][0].weight, src["features.5.conv.1.0.weight"])


def test_bad_weights_files(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a torch file")
    with pytest.raises(ModelError, match="cannot read weights file .*bad.pt"):
        models.load("small_cnn", weights=bad)
    other = tmp_path / "other.pt"
    torch.save(models.build("small_cnn", "digits").state_dict(), other)
    torch.save(TinyCNN().state_dict(), tmp_path / "tiny.pt")
    with pytest.raises(ModelError, match="do not match the model.*missing"):
        models.load("small_cnn", weights=tmp_path / "tiny.pt")
    sd = models.build("small_cnn").state_dict()
    sd["classifier.weight"] = torch.zeros(3, 64)
    torch.save(sd, other)
    with pytest.raises(ModelError, match=r"other shapes.*classifier.weight: file \(3, 64\) vs model \(10, 64\)"):
        models.load("small_cnn", weights=other)
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": TinyCNN()}, pickled)  # a pickled module: refused by weights_only=True
    with pytest.raises(ModelError, match=r"holds a Python object \(tiny.TinyCNN\).*state_dict") as e:
        models.load("small_cnn", weights=pickled)
    assert "weights_only=False" not in str(e.value)  # never advise running the file's code
    with pytest.raises(ModelError, match="does not exist"):
        models.load("small_cnn", weights=tmp_path / "nope.pt")


def test_user_factory_models(tmp_path):
    m = models.load("tiny:TinyCNN")
    assert isinstance(m, TinyCNN) and not m.training
    torch.save(m.state_dict(), tmp_path / "w.pt")
    m2 = models.load("tiny:TinyCNN", weights=tmp_path / "w.pt")
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    with pytest.raises(ModelError, match="has no callable 'TinyCN'.*did you mean 'TinyCNN'"):
        models.load("tiny:TinyCN")
    with pytest.raises(ModelError, match="cannot import module 'nosuchmod'"):
        models.load("nosuchmod:f")


def test_training_learns_and_resumes_exactly_after_an_interruption(tmp_path):
    from edgeslim.data import load

    train, val = load("digits")
    cfg = TrainConfig(epochs=2, lr=0.1, batch_size=32, augment=True, warmup_steps=5)
    torch.manual_seed(0)
    start = TinyCNN()
    start_state = {k: v.clone() for k, v in start.state_dict().items()}
    full = fit(start, train, val, cfg, checkpoint_dir=tmp_path / "a", progress=False)
    assert full.history[-1]["val_accuracy"] > 0.3 and (tmp_path / "a" / "last.pt").is_file()

    calls = {"n": 0}
    steps_per_epoch = -(-len(train) // cfg.batch_size)

    def interrupt(out, y, x):
        calls["n"] += 1
        if calls["n"] == steps_per_epoch + 3:  # in the second epoch
            raise KeyboardInterrupt
        return out.sum() * 0

    with pytest.raises(KeyboardInterrupt):
        fit(start, train, val, cfg, checkpoint_dir=tmp_path / "b", loss_fn=interrupt, progress=False)
    resumed = fit(start, train, val, cfg, checkpoint_dir=tmp_path / "b", progress=False)
    assert resumed.resumed_from_epoch == 1
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)
    assert all(torch.equal(start_state[k], v) for k, v in start.state_dict().items())  # input untouched
    with pytest.raises(DataError, match="empty"):
        fit(start, train.subset([]), val, cfg)
    with pytest.raises(ConfigError, match="epochs=0"):
        TrainConfig(epochs=0)
    assert json.dumps(full.to_dict())


def test_a_checkpoint_is_resumed_only_with_the_same_step_cap(tmp_path):
    from edgeslim.data import load

    train, _ = load("digits")
    cfg = TrainConfig(epochs=1, lr=0.05, batch_size=32, augment=False, warmup_steps=0)
    m = TinyCNN()
    first = fit(m, train, None, cfg, checkpoint_dir=tmp_path, progress=False, max_steps_per_epoch=2)
    assert first.resumed_from_epoch == 0
    again = fit(m, train, None, cfg, checkpoint_dir=tmp_path, progress=False, max_steps_per_epoch=2)
    assert again.resumed_from_epoch == 1  # finished: nothing left to train
    longer = fit(m, train, None, cfg, checkpoint_dir=tmp_path, progress=False, max_steps_per_epoch=3)
    assert longer.resumed_from_epoch == 0  # another step cap: not the same run, trained afresh
    again = fit(m, train, None, cfg, checkpoint_dir=tmp_path, progress=False, max_steps_per_epoch=3)
    assert again.resumed_from_epoch == 1


def test_channels_last_training_matches_the_default_layout():
    from edgeslim.data import load

    train, val = load("digits")
    cfg = TrainConfig(epochs=1, lr=0.05, batch_size=32, augment=True, warmup_steps=2)
    torch.manual_seed(0)
    m = TinyCNN()
    a = fit(m, train, val, cfg, progress=False, max_steps_per_epoch=6)
    b = fit(m, train, val, cfg, progress=False, max_steps_per_epoch=6, channels_last=True)
    for (name, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.allclose(pa, pb, atol=1e-4), name
        assert pb.is_contiguous(), name  # handed back in the default layout
    assert any(not torch.equal(pa, pm) for pa, pm in zip(a.model.parameters(), m.parameters()))  # it trained

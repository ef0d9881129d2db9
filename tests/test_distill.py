"""Knowledge distillation: losses, distill(), teacher cache, kd_loss_fn, students, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgeslim.core.errors import ConfigError, DataError, ModelError
from edgeslim.distill import LOSSES, DistillConfig, LossContext, cnn_student, distill, kd_loss_fn, layer_drop_student
from edgeslim.train import TrainConfig, evaluate, fit
from tiny import TinyCNN, TinyMLP

TC = TrainConfig(epochs=2, lr=0.1, batch_size=32, augment=False, warmup_steps=5)


@pytest.fixture(scope="module")
def digits():
    from edgeslim.data import load

    train, val = load("digits")
    return train.take(400), val.take(200)


@pytest.fixture(scope="module")
def teacher(digits):
    train, val = digits
    torch.manual_seed(0)
    return fit(TinyMLP(), train, val, TrainConfig(epochs=6, lr=0.1, batch_size=32, augment=False, warmup_steps=5),
               progress=False).model


def _state(m: nn.Module) -> dict:
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_losses_are_zero_for_identical_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 10, generator=g)
    fmap = torch.randn(6, 4, 5, 5, generator=g)
    same = LossContext(logits, logits.clone(), torch.zeros(6, dtype=torch.long), 4.0, [fmap], [fmap.clone()],
                       nn.ModuleList([nn.Identity()]))
    other = LossContext(logits, torch.randn(6, 10, generator=g), torch.zeros(6, dtype=torch.long), 4.0, [fmap],
                        [torch.randn(6, 4, 5, 5, generator=g)], nn.ModuleList([nn.Identity()]))
    for name in ("kd", "hint", "attention", "rkd", "similarity"):
        assert float(LOSSES.get(name)(same)) == pytest.approx(0.0, abs=1e-5), name
        assert float(LOSSES.get(name)(other)) > 1e-4, name


def test_kd_distill_makes_student_agree_with_teacher_and_leaves_inputs_alone(digits, teacher):
    train, val = digits
    torch.manual_seed(1)
    student = TinyMLP()
    before_s, before_t = _state(student), _state(teacher)
    out = distill(student, teacher, DistillConfig(hard_weight=0.0, temperature=2.0), data=(train, val),
                  train_config=TC.replace(epochs=4), progress=False)
    x = val.normalized()
    with torch.no_grad():
        agree = float((out(x).argmax(1) == teacher(x).argmax(1)).float().mean())
        agree_init = float((student(x).argmax(1) == teacher(x).argmax(1)).float().mean())
    assert agree > 0.7 and agree > agree_init + 0.4
    assert evaluate(out, val) > 0.6  # learned the task from soft labels only (hard_weight=0)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before_s.items())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before_t.items())
    assert len(out.distill_history) == 4


def test_teacher_cache_is_written_keyed_and_gives_same_result_as_live_teacher(digits, teacher, tmp_path):
    train, val = digits
    cfg = DistillConfig(losses=("kd", "similarity"), weights=(1.0, 0.5))
    torch.manual_seed(2)
    student = TinyMLP()
    cached = distill(student, teacher, cfg, data=(train, val), train_config=TC, progress=False,
                     checkpoint_dir=tmp_path / "a")
    live = distill(student, teacher, cfg.replace(cache_teacher=False), data=(train, val), train_config=TC,
                   progress=False)
    files = list((tmp_path / "a").glob("teacher-*.pt"))
    assert len(files) == 1
    assert torch.load(files[0], weights_only=True)["logits"].shape == (len(train), 10)
    for k, v in cached.state_dict().items():
        torch.testing.assert_close(v, live.state_dict()[k], atol=1e-4, rtol=1e-4)


def test_hint_with_adapters_between_named_layers(digits, teacher):
    train, val = digits
    cfg = DistillConfig(losses=("kd", "hint"), student_layers=("net.2",), teacher_layers=("net.1",))
    torch.manual_seed(3)
    out = distill(TinyMLP(), teacher, cfg, data=(train, val), train_config=TC, progress=False)
    assert evaluate(out, val) > 0.5
    assert "adapters.0.weight" not in out.state_dict()  # the student comes back without the adapters


def test_feature_losses_on_cnn_with_different_spatial_sizes(digits):
    train, val = digits
    torch.manual_seed(4)
    teacher = TinyCNN()
    cfg = DistillConfig(losses=("kd", "hint", "attention", "rkd"), student_layers=("stem", "pw"),
                        teacher_layers=("stem", "dw"))
    out = distill(TinyCNN(), teacher, cfg, data=(train.take(64), None), train_config=TC.replace(epochs=1),
                  progress=False)
    assert isinstance(out, TinyCNN)


def test_kd_loss_fn_plugs_into_fit_and_rejects_feature_losses(digits, teacher):
    train, val = digits
    fn = kd_loss_fn(teacher, DistillConfig(temperature=3.0))
    x = val.normalized()[:8]
    with torch.no_grad():
        assert float(fn(teacher(x), val.labels[:8], x)) == pytest.approx(0.0, abs=1e-5)
    torch.manual_seed(5)
    res = fit(TinyMLP(), train, val, TC, loss_fn=fn, progress=False)
    assert res.best_accuracy > 0.5
    with pytest.raises(ConfigError, match="logit losses only"):
        kd_loss_fn(teacher, DistillConfig(losses=("hint",), student_layers=("net.1",), teacher_layers=("net.1",)))


def test_bad_input_errors(digits, teacher):
    train, val = digits
    with pytest.raises(ConfigError, match="temperature"):
        DistillConfig(temperature=0)
    with pytest.raises(ConfigError, match="temperature"):
        DistillConfig(temperature=-1.0)
    with pytest.raises(ConfigError, match="did you mean 'kd'"):
        DistillConfig(losses=("kdd",))
    with pytest.raises(ConfigError, match="weights"):
        DistillConfig(losses=("kd", "rkd"), weights=(1.0,))
    with pytest.raises(ConfigError, match="student_layers"):
        DistillConfig(losses=("hint",))
    with pytest.raises(ConfigError, match=r"no module 'net\.22'.*did you mean 'net\.2'"):
        distill(TinyMLP(), teacher, DistillConfig(losses=("hint",), student_layers=("net.22",),
                                                  teacher_layers=("net.1",)), data=(train, val), progress=False)
    with pytest.raises(ConfigError, match="teacher has no module 'fc1'"):
        distill(TinyMLP(), teacher, DistillConfig(losses=("hint",), student_layers=("net.1",),
                                                  teacher_layers=("fc1",)), data=(train, val), progress=False)
    with pytest.raises(ModelError, match=r"output shape \(2, 5\) does not match teacher output shape \(2, 10\)"):
        distill(TinyMLP(num_classes=5), teacher, data=(train, val), progress=False)
    with pytest.raises(DataError, match="empty"):
        distill(TinyMLP(), teacher, data=(train.take(0), val), progress=False)
    assert DistillConfig.from_yaml(DistillConfig(losses=("kd", "rkd"), weights=(1, 2)).to_yaml()).weights == (1, 2)


def test_cnn_students_are_smaller_and_run():
    from edgeslim.models import load

    def n(m):
        return sum(p.numel() for p in m.parameters())

    small = cnn_student("small_cnn", width=0.5)
    assert n(small) < n(load("small_cnn", pretrained=False)) / 3
    r = cnn_student("resnet18", width=0.25, depth=0.5)
    assert n(r) < n(load("resnet18", pretrained=False)) / 20
    assert r(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ConfigError, match="valid: resnet18, small_cnn"):
        cnn_student("vgg")


def test_layer_drop_student_copies_every_other_layer():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=6, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16)
    torch.manual_seed(0)
    teacher = transformers.BertModel(cfg).eval()
    student = layer_drop_student(teacher).eval()
    assert len(student.encoder.layer) == 3 and student.config.num_hidden_layers == 3
    assert len(teacher.encoder.layer) == 6
    for s_i, t_i in zip(range(3), (0, 2, 4)):
        for (k, v), (_, w) in zip(student.encoder.layer[s_i].state_dict().items(),
                                  teacher.encoder.layer[t_i].state_dict().items()):
            assert torch.equal(v, w), k
    ids = torch.randint(0, 50, (2, 8))
    assert student(input_ids=ids).last_hidden_state.shape == (2, 8, 16)
    with pytest.raises(ConfigError, match="keep"):
        layer_drop_student(teacher, keep=[0, 7])


def test_checkpoint_resume_and_early_stop(digits, teacher, tmp_path):
    train, val = digits
    cfg = DistillConfig()
    torch.manual_seed(6)
    student = TinyMLP()
    first = distill(student, teacher, cfg, data=(train, val), train_config=TC, progress=False, checkpoint_dir=tmp_path)
    again = distill(student, teacher, cfg, data=(train, val), train_config=TC, progress=False, checkpoint_dir=tmp_path)
    assert len(list(tmp_path.glob("run-*/last.pt"))) == 1
    assert again.distill_history == first.distill_history  # resumed after the last epoch: nothing retrained
    # another config in the same folder gets its own run (no cross-resume)
    other = distill(student, teacher, cfg.replace(temperature=2.0), data=(train, val), train_config=TC,
                    progress=False, checkpoint_dir=tmp_path)
    assert len(list(tmp_path.glob("run-*/last.pt"))) == 2 and len(other.distill_history) == 2
    # early stop: an lr so small that validation accuracy cannot improve for `patience` epochs
    stopped = distill(student, teacher, cfg, data=(train, val), progress=False,
                      train_config=TC.replace(epochs=20, lr=1e-9, patience=2))
    assert len(stopped.distill_history) < 20

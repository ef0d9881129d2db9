"""Distillation of detectors: a pruned detector learns from its unpruned teacher (score + box KD and neck features),
the losses behave, the report and recipe say what was done, bad pairings are one clear line."""

import pytest
import torch
from tiny import TinyCNN, tiny_detect_sets, tiny_detector

import edgeslim as es
from edgeslim.core.errors import ConfigError, ModelError
from edgeslim.distill._detect import score_box_kd
from edgeslim.prune import PruneConfig
from edgeslim.train import DetectTrainConfig, TrainConfig, train_detector

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CFG = DetectTrainConfig(epochs=3, batch_size=16, lr=5e-3, warmup_steps=3, freeze_backbone=0, channels_last=False)
KD = es.DistillConfig(losses=("kd", "hint"), weights=(1.0, 1.0), student_layers=("neck",), teacher_layers=("neck",))


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    return tiny_detect_sets(tmp_path_factory.mktemp("tinydet"))


@pytest.fixture(scope="module")
def teacher_and_student(sets):
    """A trained tiny detector and a channel-pruned copy of it (neck and heads narrower, same anchors)."""
    train, _ = sets
    cfg = DetectTrainConfig(epochs=12, batch_size=16, lr=1e-2, warmup_steps=5, freeze_backbone=0, channels_last=False)
    teacher = train_detector(tiny_detector(), train, None, cfg, progress=False).model
    x = torch.stack([train[i][0] for i in range(2)])
    student = es.prune(teacher, PruneConfig(method="channel", target_macs=0.5, recalibrate_bn=32), example_inputs=x,
                       data=train)  # fmt: skip
    return teacher, student


def test_score_box_kd_is_zero_for_the_teacher_itself_and_grows_with_the_gap():
    torch.manual_seed(0)
    m = tiny_detector()
    with torch.no_grad():
        t = m(torch.rand(2, 3, 64, 64))
    t[..., 4:] = torch.rand_like(t[..., 4:]) * 0.6  # some confident anchors, so the box term is on
    cls_same, box_same = score_box_kd(t, t)
    moved = t.clone()
    moved[..., :4] += 6.0
    moved[..., 4:] = 1 - t[..., 4:]
    cls_far, box_far = score_box_kd(moved, t)
    # BCE against soft targets is minimal (their entropy) at the targets; CIoU of identical boxes is 0
    assert box_same.abs() < 1e-5 and box_far > 0.05
    assert cls_far > cls_same + 0.05


def test_distilled_pruned_detector_is_closer_to_its_teacher_than_a_fine_tuned_one(sets, teacher_and_student):
    train, val = sets
    teacher, student = teacher_and_student
    ft = train_detector(student, train, None, CFG, progress=False).model
    before = {k: v.clone() for k, v in student.state_dict().items()}
    kd = es.distill(student, teacher, KD, data=(train, val), train_config=CFG, progress=False)
    # the input models are untouched; the result is the student architecture (no adapters, no hooks left)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())
    assert type(kd) is type(student) and set(kd.state_dict()) == set(student.state_dict())
    assert not any(m._forward_hooks for m in kd.modules())
    assert not any(m._forward_hooks for m in teacher.modules())
    x = torch.stack([val[i][0] for i in range(len(val))])
    with torch.no_grad():
        t_out, kd_out, ft_out = teacher(x), kd(x), ft(x)
    # same steps, same data: the distilled student's boxes and scores are closer to the teacher's (tiny run here:
    # boxes' CIoU gap 0.24 vs 0.28, mean score difference 0.035 vs 0.038)
    assert score_box_kd(kd_out, t_out)[1] < score_box_kd(ft_out, t_out)[1]
    assert (kd_out[..., 4:] - t_out[..., 4:]).abs().mean() < (ft_out[..., 4:] - t_out[..., 4:]).abs().mean()
    rep = kd.report
    assert rep.metric == "mAP@[.5:.95]" and rep.losses == ["kd", "hint"] and rep.epochs == 3
    assert {"kd_cls", "kd_box", "hint", "box", "cls"} <= set(rep.history[-1])
    assert rep.history[-1]["hint"] < rep.history[0]["hint"]
    assert "mAP@[.5:.95]" in rep.summary()
    assert [s["technique"] for s in es.core.recipe.steps_of(kd)][-2:] == ["prune", "distill"]


def test_distill_detector_resumes_from_its_checkpoint(sets, teacher_and_student, tmp_path):
    train, _ = sets
    teacher, student = teacher_and_student
    cfg = CFG.replace(epochs=2)
    a = es.distill(student, teacher, KD, data=(train, None), train_config=cfg, progress=False,
                   checkpoint_dir=tmp_path)  # fmt: skip
    runs = list(tmp_path.glob("run-*/last.pt"))
    assert len(runs) == 1
    b = es.distill(student, teacher, KD, data=(train, None), train_config=cfg, progress=False,
                   checkpoint_dir=tmp_path)  # fmt: skip
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_bad_detector_pairings_are_one_clear_line(sets, teacher_and_student):
    train, _ = sets
    teacher, student = teacher_and_student
    with pytest.raises(ConfigError, match="DetectTrainConfig"):
        es.distill(student, teacher, KD, data=(train, None), train_config=TrainConfig(epochs=1), progress=False)
    with pytest.raises(ConfigError, match="'rkd' is not defined for detectors"):
        es.distill(student, teacher, es.DistillConfig(losses=("rkd",)), data=(train, None), train_config=CFG)
    with pytest.raises(ConfigError, match="cache_frozen"):
        es.distill(student, teacher, KD, data=(train, None), train_config=CFG.replace(cache_frozen=True))
    with pytest.raises(ModelError, match="classes"):
        es.distill(student, tiny_detector(num_classes=2), KD, data=(train, None), train_config=CFG)
    with pytest.raises(ConfigError, match="no module 'nek'"):
        es.distill(student, teacher, KD.replace(student_layers=("nek",)), data=(train, None), train_config=CFG)
    with pytest.raises(ModelError, match="detection output layout"):
        es.distill(student, TinyCNN(), KD, data=(train, None), train_config=CFG)


def test_train_detector_stops_before_a_step_when_told_and_says_where(sets):
    train, _ = sets
    asked = []

    def stop() -> bool:
        asked.append(1)
        return len(asked) > 3

    res = train_detector(tiny_detector(), train, None, CFG, progress=False, stop=stop)
    assert res.stopped_at_step == 3 and res.history == []  # 3 steps of the first epoch ran, no epoch finished
    assert train_detector(tiny_detector(), train, None, CFG.replace(epochs=1), progress=False).stopped_at_step is None

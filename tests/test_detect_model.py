"""The zoo detector yolo_mobilenet_v2: output layout, NMS post-process, loss/assigner, training, ONNX export, mAP of
the deployed file, bad input."""

import numpy as np
import pytest
import torch
from tiny import TinyCNN, tiny_detect_sets, tiny_detector

import edgeslim as es
from edgeslim.core.detection import DETECT_LAYOUT, detect_postprocess
from edgeslim.core.errors import ConfigError, ModelError
from edgeslim.runtime import evaluate_detector
from edgeslim.train import DetectTrainConfig, detection_loss, train_detector
from edgeslim.train._detect import _pad_targets, assign

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    return tiny_detect_sets(tmp_path_factory.mktemp("tinydet"))


@pytest.fixture(scope="module")
def trained(sets):
    """The tiny detector trained on the tiny set (seconds). 12 epochs: at 6 the mAP after training was 0.05-0.1 on an
    AVX-512 host and 0.02 on an AVX2 one (kernel summation order changes the trajectory); at 12 it is 0.18 here."""
    train, val = sets
    cfg = DetectTrainConfig(epochs=12, batch_size=16, lr=1e-2, warmup_steps=5, freeze_backbone=0, channels_last=False)
    return train_detector(tiny_detector(), train, val, cfg, progress=False)


def test_output_layout_and_declared_attributes():
    m = tiny_detector(num_classes=3)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = m(x)
    pts, strides = m.anchor_points(64, 64)
    assert out.shape == (2, 8 * 8 + 4 * 4 + 2 * 2, 4 + 3) == (2, len(pts), 7)
    assert sorted(set(strides.tolist())) == [8.0, 16.0, 32.0]
    assert m.edgeslim_task == "detect" and m.edgeslim_output == DETECT_LAYOUT and m.num_classes == 3
    boxes, scores = out[..., :4], out[..., 4:]
    assert (boxes[..., 2] > boxes[..., 0]).all() and (boxes[..., 3] > boxes[..., 1]).all()
    assert ((scores > 0) & (scores < 1)).all()
    # every box surrounds its own anchor point (distances are softplus, > 0), rows in anchor order
    assert (boxes[0, :, 0] < pts[:, 0]).all() and (boxes[0, :, 2] > pts[:, 0]).all()
    assert (boxes[0, :, 1] < pts[:, 1]).all() and (boxes[0, :, 3] > pts[:, 1]).all()
    # resuming after cached frozen blocks gives the same output
    for k in (4, 7, 14):
        with torch.no_grad():
            assert torch.equal(m.forward_from(m.backbone_state(x, k), k), out)


def test_zoo_builds_the_full_detector_for_fmnist_detect():
    m = es.models.build("yolo_mobilenet_v2", "fmnist-detect")
    assert isinstance(m, es.models.YoloMobileNetV2) and m.num_classes == 10 and m.input_size == 160
    assert m.backbone[0][0].in_channels == 3
    with pytest.raises(ModelError, match="RGB"):
        es.models.build("yolo_mobilenet_v2", "fmnist-detect", input_shape=(1, 160, 160), num_classes=10)


def _hand_output():
    rows = [
        [0, 0, 10, 10, 0.9, 0.0],  # class 0, best
        [1, 1, 11, 11, 0.8, 0.0],  # class 0, IoU 0.68 with the first: suppressed
        [1, 1, 11, 11, 0.0, 0.7],  # same box, class 1: kept (NMS is per class)
        [50, 50, 60, 60, 0.0005, 0.0],  # below conf
        [30, 30, 40, 40, 0.3, 0.0],  # class 0, no overlap: kept
    ]
    return torch.tensor([rows], dtype=torch.float32)


def test_postprocess_class_aware_nms_on_a_hand_built_case():
    out = _hand_output()
    (d,) = detect_postprocess(out, conf=0.001, iou=0.6)
    assert d["labels"].tolist() == [0, 1, 0]
    assert d["scores"].tolist() == pytest.approx([0.9, 0.7, 0.3])
    assert d["boxes"].tolist() == [[0, 0, 10, 10], [1, 1, 11, 11], [30, 30, 40, 40]]
    (dn,) = detect_postprocess(out.numpy(), conf=0.001, iou=0.6)  # numpy from a runtime: same answer
    assert all(torch.equal(d[k], dn[k]) for k in d)
    assert len(detect_postprocess(out, conf=0.5)[0]["scores"]) == 2
    assert detect_postprocess(out, max_det=1)[0]["scores"].tolist() == pytest.approx([0.9])
    (loose,) = detect_postprocess(out, iou=0.7)  # above the pair's IoU: both class-0 boxes stay
    assert len(loose["scores"]) == 4
    with pytest.raises(ConfigError, match="conf=1.5"):
        detect_postprocess(out, conf=1.5)
    with pytest.raises(ModelError, match=r"shape \(1, 10\)"):
        detect_postprocess(torch.zeros(1, 10))


def test_assigner_picks_anchors_inside_the_box_with_its_class():
    m = tiny_detector()
    pts, _ = m.anchor_points(64, 64)
    pred = torch.cat([torch.cat([pts - 4, pts + 4], 1), torch.full((len(pts), 3), 0.5)], 1)[None]
    gt, labels, valid = _pad_targets(
        [{"boxes": torch.tensor([[16.0, 16.0, 40.0, 40.0]]), "labels": torch.tensor([2])}], "cpu"
    )
    fg, tb, ts = assign(pred, pts, gt, labels, valid, topk=5)
    assert fg.sum() == 5
    inside = (pts[:, 0] > 16) & (pts[:, 0] < 40) & (pts[:, 1] > 16) & (pts[:, 1] < 40)
    assert inside[fg[0]].all()
    assert (tb[0, fg[0]] == torch.tensor([16.0, 16.0, 40.0, 40.0])).all()
    assert (ts[0, fg[0], 2] > 0).all() and (ts[0, fg[0], :2] == 0).all() and (ts[0, ~fg[0]] == 0).all()
    # a box smaller than the anchor spacing still gets the nearest anchor
    gt, labels, valid = _pad_targets(
        [{"boxes": torch.tensor([[8.5, 8.5, 11.5, 11.5]]), "labels": torch.tensor([0])}], "cpu"
    )
    fg, _, _ = assign(pred, pts, gt, labels, valid)
    assert fg.sum() == 1 and pts[fg[0]].tolist() == [[12.0, 12.0]]


def test_loss_decreases_over_a_few_steps(sets):
    train, _ = sets
    m = tiny_detector().train()
    pts, _ = m.anchor_points(64, 64)
    x = torch.stack([train[i][0] for i in range(16)])
    targets = [train[i][1] for i in range(16)]
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        loss, parts = detection_loss(m(x), targets, pts)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.6 * losses[0] and min(losses[-5:]) < min(losses[:5])
    assert parts["box"] > 0 and parts["cls"] > 0


def test_train_detector_learns_and_keeps_its_input(sets, trained):
    train, val = sets
    before = tiny_detector()
    assert trained.history[-1]["loss"] < trained.history[0]["loss"]
    assert trained.best_map > 0.05 and trained.history[-1]["val_map50"] > 0.2  # random init scores ~0
    assert evaluate_detector(before, val)["map"] < 0.02
    # the input model is not modified; frozen blocks stay as they were and caching them gives the same step
    m0 = tiny_detector()
    cfg = DetectTrainConfig(
        epochs=1, batch_size=16, warmup_steps=0, freeze_backbone=4, channels_last=False, hflip=False
    )
    ra = train_detector(m0, train, None, cfg, progress=False)
    rb = train_detector(m0, train, None, cfg.replace(cache_frozen=True), progress=False)
    a = ra.model
    assert all(torch.equal(p, q) for p, q in zip(m0.state_dict().values(), tiny_detector().state_dict().values()))
    assert torch.equal(a.backbone[0][0].weight, m0.backbone[0][0].weight)
    assert not torch.equal(a.heads[0].cls[-1].weight, m0.heads[0].cls[-1].weight)
    # cached frozen outputs are float16: the same steps up to rounding (Adam's first steps amplify it in weights)
    assert rb.history[0]["loss"] == pytest.approx(ra.history[0]["loss"], rel=1e-2)
    assert torch.equal(rb.model.backbone[3].conv[0][0].weight, m0.backbone[3].conv[0][0].weight)


def test_onnx_export_runs_in_ort_like_torch_and_map_agrees(sets, trained, tmp_path):
    _, val = sets
    model = trained.model
    x = torch.stack([val[i][0] for i in range(8)])
    art = es.export(model, "onnx", example_inputs=x, path=tmp_path / "det.onnx")
    runner = es.runtime.load(art, "onnxruntime")
    with torch.no_grad():
        ref = model(x).numpy()
    got = runner.run(x.numpy())
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 1e-3
    m_torch = evaluate_detector(model, val, runtime="torch")
    m_ort = evaluate_detector(art, val, runtime="onnxruntime")
    assert m_torch["map"] > 0.05
    assert m_ort["map"] == pytest.approx(m_torch["map"], abs=2e-3)
    assert m_ort["map50"] == pytest.approx(m_torch["map50"], abs=2e-3)
    assert "onnxruntime" in m_ort["runtime"] and m_ort["images"] == len(val)


def test_unknown_output_layout_is_one_clear_error(sets, tmp_path):
    _, val = sets
    with pytest.raises(ModelError, match=r"TinyCNN does not declare a detection output layout.*edgeslim_task"):
        evaluate_detector(TinyCNN(), val)
    classifier = tmp_path / "classifier.onnx"
    torch.onnx.export(
        TinyCNN(in_channels=3).eval(), (torch.rand(1, 3, 64, 64),), str(classifier), dynamo=False,
        input_names=["input"], dynamic_axes={"input": {0: "batch"}},
    )  # fmt: skip
    with pytest.raises(ModelError, match=r"classifier.onnx has shape \(16, 10\).*\[batch, anchors, 7\]"):
        evaluate_detector(classifier, val, runtime="onnxruntime")
    with pytest.raises(ModelError, match="num_classes=2, the dataset has 3"):
        evaluate_detector(tiny_detector(num_classes=2), val)
    with pytest.raises(ConfigError, match="freeze_backbone=99"):
        train_detector(tiny_detector(), val, None, epochs=1, freeze_backbone=99, progress=False)


def test_detector_is_refused_by_the_classifier_trainer_in_one_line():
    from edgeslim.train import train_baseline

    with pytest.raises(
        ConfigError, match="'yolo_mobilenet_v2' is a detector: train it with edgeslim.train.train_detector"
    ):
        train_baseline("yolo_mobilenet_v2", "fmnist-detect")


def test_shipped_checkpoint_loads_as_the_trained_detector():
    info = es.models.checkpoint_info("yolo_mobilenet_v2", "fmnist-detect")
    assert info["storage"] == "fp16" and info["input_size"] == 160 and info["map"] > 0.3
    m = es.models.load("yolo_mobilenet_v2", dataset="fmnist-detect", pretrained=True)
    assert isinstance(m, es.models.YoloMobileNetV2) and not m.training
    assert es.models.checkpoint_path("yolo_mobilenet_v2", "fmnist-detect", 160).name == (
        "yolo_mobilenet_v2-fmnist-detect-160.pt"
    )
    # the weights are the trained ones, not the random or ImageNet start
    fresh = es.models.load("yolo_mobilenet_v2", dataset="fmnist-detect", pretrained="imagenet")
    assert torch.equal(m.backbone[0][0].weight, fresh.backbone[0][0].weight.half().float())  # frozen stem
    assert not torch.equal(m.heads[0].cls[-1].weight, fresh.heads[0].cls[-1].weight)

"""Static INT8 of a detector's ONNX file: head precision by measurement, detector-aware validation, detection data
as calibration data."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from tiny import TinyDetector

import edgeslim as es
from edgeslim.core.errors import ConfigError
from edgeslim.core.onnx_model import to_onnx


@pytest.fixture(scope="module")
def detector():
    m = TinyDetector().eval()
    x = TinyDetector.example_inputs()
    graph = to_onnx(m, x[:1], opset=17)
    q = es.quantize(onnx.load_from_string(graph), es.QuantConfig(capture="onnx", num_samples=32), data=x)
    return m, x, q


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().ravel(), b.double().ravel()
    return float(a @ b / (a.norm() * b.norm()))


def test_detector_head_keeps_scores(detector):
    m, x, q = detector
    with torch.no_grad():
        ref, out = m(x), q(x)
    assert out.shape == ref.shape == (32, 7, 64)
    assert _cosine(ref[:, 4:], out[:, 4:]) >= 0.99  # the scores survive (a shared scale with boxes would zero them)
    assert float((ref[:, :4] - out[:, :4]).abs().max()) < 4.0  # boxes within a few pixels of 160
    floats = {f["node"]: f["reason"] for f in q.report.float_ops}
    # the output Concat (boxes + scores), found by the range-ratio rule, with its reason
    assert [n for n, r in floats.items() if "Concat" in n and "range ratio" in r]
    assert q.report.tail["after_last_mac"]  # the post-processing after the last convs stays float, said
    assert any("Sigmoid" in n and "no integer kernel" in r for n, r in floats.items())
    assert q.report.tail["detector_output"] and q.report.tail["samples"] > 0
    measured = q.report.tail["measured"]
    assert measured and all(e["op"] == "Conv" and "min_part_sqnr_db" in e for e in measured)
    assert q.report.integer_mac_share and q.report.integer_mac_share > 0.9  # the convs stay integer
    assert "(1 Concat(s) by range ratio" in q.report.summary()


def test_without_the_head_rules_the_scores_are_lost():
    """The same quantizer with the rules off puts one int8 scale on boxes and scores: the test above can fail."""
    m = TinyDetector().eval()
    x = TinyDetector.example_inputs()
    from edgeslim.quantize import _onnx

    graph, _ = _onnx.preprocess(to_onnx(m, x[:1], opset=17))
    cfg = es.QuantConfig(capture="onnx")
    ranges = _onnx.calibrate(graph, [x], cfg)
    from edgeslim.core.onnx_model import ort_session, run_session

    out = run_session(ort_session(_onnx.write_qdq(graph, ranges, {}, cfg)), x)[0]
    with torch.no_grad():
        ref = m(x)
    assert _cosine(ref[:, 4:], torch.from_numpy(out)[:, 4:]) < 0.99


def test_detector_validation_compares_parts_without_top1(detector, tmp_path):
    _, x, q = detector
    art = es.export(q, "onnx", example_inputs=x, path=tmp_path / "det.onnx")
    v = art.validation
    assert v["top1_agreement"] is None and set(v["parts"]) == {"boxes", "scores"}
    assert any("top-1 agreement skipped" in c for c in v["checks"])
    fl = v["vs_float_reference"]
    assert fl["top1_agreement"] is None and fl["parts"]["scores"]["cosine"] >= 0.99
    assert "top-1 agreement skipped" in v["summary"] and "top-1 agreement 0" not in v["summary"]


def test_classifier_validation_says_its_checks(tmp_path):
    from tiny import TinyCNN

    m = TinyCNN().eval()
    art = es.export(m, "onnx", example_inputs=TinyCNN.example_inputs(8), path=tmp_path / "c.onnx")
    assert art.validation["top1_agreement"] == 1.0 and "top-1" in art.validation["checks"][0]


def test_detect_task_on_a_non_detector_is_one_clear_error(tmp_path):
    from tiny import TinyCNN

    with pytest.raises(es.core.errors.ExportError, match=r"detector's output has shape \(8, 10\)"):
        es.export(
            TinyCNN().eval(),
            "onnx",
            example_inputs=TinyCNN.example_inputs(8),
            path=tmp_path / "c.onnx",
            floors=es.ValidationFloors(task="detect"),
        )
    with pytest.raises(ConfigError, match="task"):
        es.ValidationFloors(task="segment")
    with pytest.raises(ConfigError, match="tail_sqnr_db"):
        es.QuantConfig(tail_sqnr_db=-1.0)


def test_detection_dataset_calibrates(tmp_path, monkeypatch):
    from test_detect_data import _coco_folder

    monkeypatch.setenv("EDGESLIM_CACHE", str(tmp_path / "cache"))
    folder, _ = _coco_folder(tmp_path / "set")
    train, _val = es.data.load(f"coco:{folder}", size=160, seed=0)

    class Det160(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = TinyDetector()
            self.pool = torch.nn.AvgPool2d(5)

        def forward(self, x):
            return self.net(self.pool(x))

    m = Det160().eval()
    graph = to_onnx(m, torch.zeros(1, 3, 160, 160), opset=17)
    q = es.quantize(onnx.load_from_string(graph), es.QuantConfig(capture="onnx", num_samples=4), data=train)
    assert q.report.calibration_samples == 4
    x = torch.stack([train[i][0] for i in range(len(train))])
    with torch.no_grad():
        assert _cosine(m(x)[:, 4:], q(x)[:, 4:]) >= 0.99
    assert np.isfinite(q(x).numpy()).all()


def test_auto_capture_sends_a_torch_detector_to_the_onnx_capture(tmp_path, monkeypatch):
    # a map-style dataset of (image, target) samples calibrates too (stacked, not concatenated)
    from tiny import TinyDetectionSet, tiny_detector

    model, data = tiny_detector(), TinyDetectionSet(16, tmp_path, size=64)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    q = es.quantize(model, es.QuantConfig(calibration="minmax", num_samples=16), data=data)
    # ORT's pre-processing fails on this graph and leaves temp files in the working folder: none may land there
    assert "quant_pre_process failed" in q.report.summary() and list(work.iterdir()) == []
    assert q.report.capture == "onnx" and "detector" in q.report.capture_reason
    assert q.report.calibration_samples == 16
    assert "kept float" in q.report.summary()  # the float head is said


def test_near_dead_inputs_do_not_overflow_the_int32_bias(tmp_path):
    """A random-init detector's class convs see inputs of ~1e-6 during calibration: the int32 bias
    (bias / (input_scale * weight_scale)) would saturate and turn a 0.01 score into 0.5; the input range is widened
    so it fits, and the report says which."""
    from tiny import TinyDetectionSet, tiny_detector

    m = tiny_detector()
    ds = TinyDetectionSet(16, tmp_path)
    q = es.quantize(m, es.QuantConfig(calibration="minmax", num_samples=16), data=ds)
    x = torch.stack([ds[i][0] for i in range(8)])
    with torch.no_grad():
        ref, out = m(x), q(x)
    assert float((ref[..., 4:] - out[..., 4:]).abs().max()) < 0.05  # was 0.49 before the bias fit
    widened = q.report.corrections["bias_fit_ranges"]
    assert len(widened) >= 2 and all(v["new_high"] > v["old_high"] for v in widened.values())
    assert "near-dead input range(s) widened" in q.report.summary()


def test_a_near_dead_weight_channel_gets_its_own_scale_raised_not_the_shared_input_range():
    """One output channel with near-zero weights and a real bias (a dead channel, as fine-tuned nets have): the
    int32 bias fits by raising that channel's weight scale (ORT's QDQ writer does), not by widening the input
    range every channel shares (EfficientNet-Lite0 on ELPV fell to cosine 0.16 against FP32 that way)."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 8, 1)).eval()
    with torch.no_grad():
        m[0].weight[0] *= 1e-6
        m[0].bias[0] = 2.0
    x = torch.randn(32, 3, 16, 16)
    q = es.quantize(m, es.QuantConfig(capture="onnx", calibration="minmax", num_samples=32), data=x)
    assert "bias_fit_ranges" not in q.report.corrections
    with torch.no_grad():
        ref, out = m(x[:8]), q(x[:8])
    assert float(torch.nn.functional.cosine_similarity(ref.flatten(), out.flatten(), dim=0)) > 0.995
    assert float((ref[:, 0] - out[:, 0]).abs().max()) < 0.1  # the dead channel's output is its bias


def test_an_onnx_file_detector_with_a_transposed_output_is_found(tmp_path):
    """``yolo_mobilenet_v2``'s file ends in Transpose(Concat(boxes, scores)) -> [B, A, 4 + C] with its anchor grid
    computed from shapes: its output parts are found through the Transpose (symbolic shape inference), so the head
    is measured part by part and export validates it as a detector, with no top-1."""
    from tiny import tiny_detector

    m = tiny_detector()
    x = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    graph = to_onnx(m, x[:1], opset=17)
    q = es.quantize(onnx.load_from_string(graph), es.QuantConfig(capture="onnx", num_samples=8), data=x)
    assert q.plan.get("task") == "detect" and q.report.tail["detector_output"]
    parts = {e["worst_part"] for e in q.report.tail["measured"]}
    assert parts and all("[" in p for p in parts)  # scored per part (boxes, scores), not as one output
    art = es.export(q, "onnx", example_inputs=x, path=tmp_path / "d.onnx")  # no top-1 floor on a detector
    vs_fp32 = art.validation["vs_float_reference"]
    assert set(vs_fp32["parts"]) == {"boxes", "scores"} and vs_fp32["top1_agreement"] is None


def test_measure_gives_a_detectors_map_on_detection_data(tmp_path):
    """``measure`` with detection data scores COCO mAP of the file in its runtime (no top-1), and times real images."""
    from tiny import TinyDetectionSet, tiny_detector

    val = TinyDetectionSet(8, tmp_path, size=64, seed=2)
    art = es.export(tiny_detector(), "onnx", example_inputs=torch.stack([val[i][0] for i in range(4)]),
                    path=tmp_path / "d.onnx")  # fmt: skip
    m = es.measure(art, data=val, runs=3, peak_memory=False)
    assert 0.0 <= m.figures["map"].value <= 1.0 and "map50" in m.figures and "accuracy" not in m.figures
    assert "pycocotools on 8 images" in m.figures["map"].detail and "onnxruntime" in m.figures["map"].detail
    assert "real images" in m.figures["latency_p50_ms@t1b1"].detail

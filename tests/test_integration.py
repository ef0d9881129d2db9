"""Real model, real data: the shipped MobileNetV2 on a Fashion-MNIST slice through the whole chain."""

import collections

import onnx
import onnxruntime as ort
import pytest

import edgeslim as es

pytestmark = pytest.mark.slow


def test_mobilenet_v2_fashion_mnist_int8_end_to_end(tmp_path):
    train, val = es.data.load("fashion-mnist")
    val = val.take(1000, seed=0)
    model = es.models.load("mobilenet_v2", "fashion-mnist")
    q = es.quantize(model, es.QuantConfig(num_samples=256), calib=train)
    assert len(q.report.quantized_layers) == 53 and not q.report.skipped_layers
    fp32 = es.export(model, "onnx", example_inputs=val, path=tmp_path / "fp32.onnx")
    int8 = es.export(q, "onnx", example_inputs=val, path=tmp_path / "int8.onnx")
    # integer kernels really run: ORT's optimized graph has no float convolution left
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(int8.path), so, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    assert ops["QLinearConv"] == 52 and ops["QLinearAdd"] == 10 and ops["QGemm"] == 1 and "Conv" not in ops
    assert fp32.size_bytes / int8.size_bytes > 3.5
    m32 = es.measure(fp32, data=val, runtime="onnxruntime", runs=30, peak_memory=False)
    m8 = es.measure(int8, data=val, runtime="onnxruntime", runs=30, peak_memory=False)
    assert m32["accuracy"] > 0.88
    assert m8["accuracy"] >= m32["accuracy"] - 0.01
    assert m8["latency_p50_ms@t1b1"] < m32["latency_p50_ms@t1b1"]


def test_demo_chain_writes_a_report(tmp_path):
    from edgeslim.pipeline import run_demo

    res = run_demo("small_cnn", "fashion-mnist", tmp_path / "out", threads=(1,), eval_samples=500, runs=20)
    labels = [s.label for s in res["stages"]]
    assert labels == ["FP32 baseline (torch eager)", "FP32 ONNX (onnxruntime)", "INT8 ONNX (onnxruntime)"]
    for f in ("report.json", "report.md", "report.html", "small_cnn-fp32.onnx", "small_cnn-int8.onnx"):
        assert (tmp_path / "out" / f).is_file(), f
    assert res["stages"][2]["accuracy"] >= res["stages"][1]["accuracy"] - 0.02
    with pytest.raises(es.OutputExistsError):
        run_demo("small_cnn", "fashion-mnist", tmp_path / "out", threads=(1,), eval_samples=100, runs=5)

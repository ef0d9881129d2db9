"""Host-measured placement (QuantConfig.placement='measured'): layers whose integer kernel is slower here stay float,
proved by timing the whole file; the record names every figure."""

from __future__ import annotations

import onnx
import pytest
import torch
from tiny import TinyConvNet, tiny_rgb_cnn

import edgeslim as es
from edgeslim.core.errors import ConfigError
from edgeslim.core.onnx_model import to_onnx
from edgeslim.quantize import _placement


def _data(n: int = 16, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_measured_placement_profiles_every_layer_and_keeps_only_a_faster_file(tmp_path):
    model = tiny_rgb_cnn().eval()
    x = _data()
    q = es.quantize(model, es.QuantConfig(placement="measured", num_samples=16), data=x)
    p = q.report.placement
    assert q.report.capture == "onnx" and "placement='measured'" in q.report.capture_reason
    assert p["threads"] == 1 and p["runtime"].startswith("onnxruntime") and p["host"]
    # every integer layer was paired with its float kernel and both were timed
    assert p["layers"] and all(e["float_us"] > 0 and e["integer_us"] > 0 for e in p["layers"])
    assert "QLinearConv" in {e["op"] for e in p["layers"]}
    skipped = {s["name"]: s["reason"] for s in q.report.skipped_layers}
    if p["float_nodes"]:  # kept only when the whole file measured faster, and said per layer
        assert p["chosen_ms"] <= p["all_integer_ms"] * (1 - _placement.MIN_GAIN)
        assert all("integer kernel slower on this host" in skipped[n] for n in p["float_nodes"])
    else:
        assert "all stay integer" in p["decision"]
        assert not any("slower on this host" in r for r in skipped.values())
    assert "placement measured here" in q.report.summary()
    art = es.export(q, "onnx", example_inputs=x[:8], path=tmp_path / "m.onnx")
    assert art.path.is_file()
    # a replay keeps the measured choice (it is in the plan's excluded nodes), nothing is re-timed
    assert set(p["float_nodes"]) <= set(q.plan["excluded"])


def test_placement_decision_follows_the_measurements(monkeypatch):
    """The decision logic with the timings given: the slower layers are tried as float sets and the fastest file is
    kept only when it beats all-integer by MIN_GAIN."""
    model = TinyConvNet().eval()
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    from edgeslim.quantize import _onnx

    graph, _ = _onnx.preprocess(to_onnx(model, x[:1], opset=17))
    convs = [n.name for n in onnx.load_from_string(graph).graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert len(convs) >= 2
    slow, fast = convs[0], convs[1]
    cfg = es.QuantConfig(capture="onnx")
    ranges = _onnx.calibrate(graph, [x], cfg)
    built = []

    def build(extra):
        built.append(sorted(extra))
        return _onnx.build_qdq(graph, ranges, dict(extra), cfg, [])

    def fake_kernels(g, feeds, threads, runs=_placement.PROFILE_RUNS):
        integer = g != graph
        return {f"{slow}_kernel_time": (300.0 if integer else 100.0, "QLinearConv" if integer else "Conv"),
                f"{fast}_kernel_time": (50.0 if integer else 100.0, "QLinearConv" if integer else "Conv")}  # fmt: skip

    feeds = {"input": x[:1].numpy()}
    monkeypatch.setattr(_placement, "kernel_times", fake_kernels)

    def timed(value, won=_placement.ROUNDS):
        return lambda graphs, *a: (
            {k: 1.0 if k == "all integer" else value for k in graphs},
            dict.fromkeys(graphs, won),
        )

    monkeypatch.setattr(_placement, "_time_files", timed(0.8))
    reasons, record = _placement.place(graph, build, {}, feeds)
    assert record["slower_in_integer"] == [slow]  # the 2x faster integer layer is no candidate
    assert list(reasons) == [slow] and "300 us vs 100 us float" in reasons[slow]
    assert record["float_nodes"] == [slow] and record["chosen_ms"] == 0.8
    assert [slow] in built
    # a float set that does not make the file faster: every layer stays integer, and the record says why
    monkeypatch.setattr(_placement, "_time_files", timed(0.995))
    reasons, record = _placement.place(graph, build, {}, feeds)
    assert reasons == {} and record["float_nodes"] == [] and "all stay integer" in record["decision"]
    # the float model faster than any quantized file: kept choice or not, the decision says so
    monkeypatch.setattr(_placement, "_time_files", lambda graphs, *a: (
        {k: {"all integer": 1.0, "float": 0.5}.get(k, 0.8) for k in graphs}, dict.fromkeys(graphs, 5)))  # fmt: skip
    reasons, record = _placement.place(graph, build, {}, feeds)
    assert list(reasons) == [slow] and "WARNING: the float model is faster here" in record["decision"]
    # faster by the median, but in too few rounds: a noisy fluke does not decide either
    monkeypatch.setattr(_placement, "_time_files", timed(0.8, won=_placement.MIN_ROUNDS_WON - 1))
    reasons, record = _placement.place(graph, build, {}, feeds)
    assert reasons == {} and "all stay integer" in record["decision"]
    # nothing slower in integer: no file is built beyond the all-integer one
    monkeypatch.setattr(_placement, "kernel_times", lambda g, *a, **k: {f"{slow}_kernel_time": (10.0, "Conv")})
    built.clear()
    reasons, record = _placement.place(graph, build, {}, feeds)
    assert reasons == {} and built == [[]] and "at least as fast" in record["decision"]


def test_kernel_names_pair_with_the_float_graph_nodes():
    """ORT names a fused integer convolution after the node (``n2_token_17``) and a float NCHWc one after its
    output tensor, possibly a fused activation's (``t171_nchwc`` with t171 the Relu's output)."""
    model = tiny_rgb_cnn().eval()
    x = _data(2)
    from edgeslim.quantize import _onnx

    graph, _ = _onnx.preprocess(to_onnx(model, x[:1], opset=17))
    feeds = {"input": x[:1].numpy()}
    nodes = {n.name for n in onnx.load_from_string(graph).graph.node if n.op_type == "Conv"}
    f = _placement.per_layer(graph, _placement.kernel_times(graph, feeds, 1, runs=2))
    assert nodes <= set(f)
    cfg = es.QuantConfig(capture="onnx")
    qgraph = _onnx.build_qdq(graph, _onnx.calibrate(graph, [x], cfg), {}, cfg, [])
    q = _placement.per_layer(graph, _placement.kernel_times(qgraph, feeds, 1, runs=2))
    assert nodes <= set(q) and {op for _, op in q.values()} >= {"QLinearConv"}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(placement="measured", mode="dynamic"), "placement"),
        (dict(placement="nearest"), "placement"),
        (dict(placement_threads=0), "placement_threads"),
    ],
)
def test_placement_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        es.QuantConfig(**kwargs)


def test_placement_with_the_fx_capture_is_one_clear_error():
    with pytest.raises(ConfigError, match="capture='fx'"):
        es.quantize(tiny_rgb_cnn().eval(), es.QuantConfig(placement="measured", capture="fx"), data=_data())

"""PTQ speed and placement: one-pass calibration, phase timings, and the integer chain of a ResNet-style net in ORT."""

import collections

import numpy as np
import pytest
import torch
from tiny import TinyCNN, TinyFunctional, TinyResNet

import edgeslim as es
from edgeslim.quantize import _calibrate
from edgeslim.quantize._calibrate import CALIBRATORS, ONE_PASS_BINS, Observer, _quant_mse


def _two_pass(batches: list[torch.Tensor]) -> Observer:
    o = Observer()
    for b in batches:
        o.observe_range(b)
    for b in batches:
        o.observe_hist(b)
    return o


def test_one_pass_histogram_doubles_its_range_exactly(monkeypatch):
    monkeypatch.setattr(_calibrate, "HIST_VALUES_PER_SAMPLE", 10**9)  # count every value
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(4, 500, generator=g) * 2 - 1, torch.rand(4, 500, generator=g) * 7 - 3]
    o = Observer()
    for b in batches:
        o.observe(b)
    first = float(batches[0].abs().max())
    assert o._radius == 4 * first  # the first batch's |max|, doubled twice to cover the second batch
    r = o._radius
    direct = torch.histc(torch.cat(batches).flatten(), ONE_PASS_BINS, -r, r).numpy()
    assert o.hist.sum() == direct.sum() == 4000
    assert np.abs(o.hist - direct).sum() <= 2  # the same bins (a value on a bin edge may round either way)
    assert (o.lo, o.hi) == (float(torch.cat(batches).min()), float(torch.cat(batches).max()))


@pytest.mark.parametrize("method", ["minmax", "mse", "percentile", "entropy"])
def test_one_pass_ranges_match_the_two_pass_ones(method):
    g = torch.Generator().manual_seed(1)
    relu = [torch.relu(torch.randn(8, 4096, generator=g) * (1 + i)) for i in range(4)]  # the range grows
    signed = [torch.randn(8, 4096, generator=g) * (1 + i) for i in range(4)]
    for batches, (qmin, qmax) in ((relu, (0, 255)), (signed, (0, 255))):
        one = Observer()
        for b in batches:
            one.observe(b)
        two = _two_pass(batches)
        fn = CALIBRATORS.get(method)
        lo1, hi1 = fn(one.stats(qmin, qmax, 99.9))
        lo2, hi2 = fn(two.stats(qmin, qmax, 99.9))
        width = hi2 - lo2
        if method != "entropy":  # the KL search's optimum is flat: it moves with the bin grid, its error does not
            assert abs((hi1 - lo1) - width) <= 0.1 * width, (method, (lo1, hi1), (lo2, hi2))
        s2 = two.stats(qmin, qmax, 99.9)  # the error each range gives the data, on the exact two-pass histogram
        assert _quant_mse(s2, lo1, hi1) <= 1.1 * _quant_mse(s2, lo2, hi2) + 1e-9, method
        assert one.stats(qmin, qmax, 99.9).hist.sum() == pytest.approx(sum(b.numel() for b in batches), rel=0.01)


def test_quantize_reports_phase_timings_and_where_it_calibrated(tmp_path):
    m = TinyCNN().eval()
    x = m.example_inputs(32)
    q = es.quantize(m, es.QuantConfig(num_samples=32), data=x)
    t = q.report.timings
    assert {"choose_capture", "capture", "calibrate", "ranges", "report"} <= set(t)
    assert all(v >= 0 for v in t.values())
    assert sum(t.values()) <= q.report.seconds + 0.05
    assert q.report.calibration_runtime == "onnxruntime (one pass)"
    assert "calibrate" in q.report.summary()
    assert q.report.to_dict()["timings"] == t
    art = es.export(q, "onnx", example_inputs=x, path=tmp_path / "q.onnx")
    assert {"reference", "export", "count_macs", "convert", "validate", "integer_macs"} <= set(art.meta["timings"])

    f = TinyFunctional().eval()
    qf = es.quantize(f, es.QuantConfig(num_samples=16), data=f.example_inputs(16))
    assert qf.report.capture == "onnx"
    assert {"capture", "calibrate", "convert", "report"} <= set(qf.report.timings)


def test_torch_calibration_fallback_gives_the_same_ranges(monkeypatch):
    from edgeslim.quantize import _observe

    m = TinyCNN().eval()
    x = m.example_inputs(32)
    cfg = es.QuantConfig(num_samples=32, calibration="minmax")
    ort_ranges = {a["value"]: a["range"] for a in es.quantize(m, cfg, data=x).report.activations}

    def fail(*_a, **_k):
        raise RuntimeError("no export")

    monkeypatch.setattr(_observe, "fx_calibration_graph", fail)
    q = es.quantize(m, cfg, data=x)
    assert q.report.calibration_runtime.startswith("torch (one pass; the ONNX Runtime pass failed: RuntimeError")
    torch_ranges = {a["value"]: a["range"] for a in q.report.activations}
    assert torch_ranges.keys() == ort_ranges.keys()
    for k, (lo, hi) in ort_ranges.items():
        assert torch_ranges[k] == pytest.approx([lo, hi], rel=1e-4, abs=1e-5), k


def test_calibration_graph_holds_weights_as_constants_and_leaves_the_model_alone():
    import onnx

    from edgeslim.quantize import _observe
    from edgeslim.quantize._modules import ActQuant, QuantWeight

    m = TinyCNN().eval()
    x = m.example_inputs(16)
    q = es.quantize(m, es.QuantConfig(num_samples=16), data=x)
    gm = q.graph_module
    wq = [w for w in gm.modules() if isinstance(w, QuantWeight)]
    before = [(w.layer.weight.detach().clone(), w.quantized_weight().detach().clone()) for w in wq]
    quants = {n: a for n, a in gm.named_modules() if isinstance(a, ActQuant)}
    graph, tensor_of = _observe.fx_calibration_graph(gm, quants, x[:2])
    g = onnx.load_from_string(graph).graph
    ops = collections.Counter(n.op_type for n in g.node)
    # no Q/DQ left: activation pairs bypassed, weights exported already quantized (not re-quantized every run)
    assert ops["QuantizeLinear"] == ops["DequantizeLinear"] == 0, ops
    assert ops["Conv"] >= 2 and set(tensor_of) == set(quants)
    grids = [c for c in (onnx.numpy_helper.to_array(t) for t in g.initializer) if c.ndim == 4]
    assert grids and all(
        any(np.allclose(g, qw.numpy()) for _, qw in before) for g in grids
    )  # the constants are the quantized weights
    for w, (fw, qw) in zip(wq, before, strict=True):  # the model keeps its float weights and quantizes again
        assert w.enabled and torch.equal(w.layer.weight, fw) and torch.equal(w.quantized_weight(), qw)


def test_quantize_calibrates_constant_weights_in_an_optimized_session(monkeypatch):
    """Inside ``quantize`` (before the model is put in eval mode) the calibration graph holds no Q/DQ, and ONNX
    Runtime runs it with its graph optimizations on; the statistics match the unoptimized pass."""
    import onnx
    import onnxruntime as ort

    from edgeslim.quantize import _observe

    seen = {}
    real_observe, real_session = _observe.observe_graph, _observe._session

    def observe(graph, observers, batches):
        seen["ops"] = collections.Counter(n.op_type for n in onnx.load_from_string(graph).graph.node)
        return real_observe(graph, observers, batches)

    def session(graph):
        s = real_session(graph)
        seen["level"] = s.get_session_options().graph_optimization_level
        return s

    monkeypatch.setattr(_observe, "observe_graph", observe)
    monkeypatch.setattr(_observe, "_session", session)
    m = TinyResNet().eval()
    x = m.example_inputs(16)
    cfg = es.QuantConfig(num_samples=16, calibration="minmax")
    ranges = {a["value"]: a["range"] for a in es.quantize(m, cfg, data=x).report.activations}
    assert seen["ops"]["QuantizeLinear"] == seen["ops"]["DequantizeLinear"] == 0, seen["ops"]
    assert seen["level"] == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    monkeypatch.setattr(_observe, "_session", lambda graph: _observe.ort_session(graph, optimize=False, spin=False))
    plain = {a["value"]: a["range"] for a in es.quantize(m, cfg, data=x).report.activations}
    assert plain.keys() == ranges.keys()
    for k, (lo, hi) in plain.items():
        assert ranges[k] == pytest.approx([lo, hi], rel=1e-4, abs=1e-5), k


def test_eval_fake_quantization_is_exact_and_exporters_still_see_the_op(tmp_path):
    """Without gradients, activation quantizers quantize through torch's 8-bit dtypes (faster), with the same values
    as the fake-quantize op; traced or exported, they still emit it (ONNX QuantizeLinear/DequantizeLinear)."""
    import onnx

    from edgeslim.quantize._modules import ActQuant, _quant_dequant

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, 16, 16, generator=g) * 3
    for qmin, qmax, zp in ((0, 255, 117), (-128, 127, 0)):
        s, z = torch.tensor(0.037), torch.tensor(zp, dtype=torch.int32)
        want = torch.fake_quantize_per_tensor_affine(x, s, z, qmin, qmax)
        assert torch.equal(_quant_dequant(x, s, z, qmin, qmax), want)
        cl = x.contiguous(memory_format=torch.channels_last)
        assert torch.equal(_quant_dequant(cl, s, z, qmin, qmax), want)
    m = TinyCNN().eval()
    xs = m.example_inputs(8)
    q = es.quantize(m, es.QuantConfig(num_samples=8), data=xs)
    acts = [a for a in q.graph_module.modules() if isinstance(a, ActQuant) and a.state == "quant"]
    with torch.no_grad():
        fast = q(xs)
        for a in acts:
            a.train()  # the training path: always the fake-quantize op
        slow = q(xs)
        for a in acts:
            a.eval()
    assert torch.equal(fast, slow)
    xg = xs.clone().requires_grad_(True)
    q(xg).sum().backward()  # gradients still flow (straight-through)
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    art = es.export(q, "onnx", example_inputs=xs, path=tmp_path / "q.onnx")
    ops = collections.Counter(n.op_type for n in onnx.load(str(art.path)).graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0, ops


def test_a_non_finite_batch_is_refused_without_touching_the_statistics():
    o = Observer()
    assert o.observe(torch.tensor([[0.5, -1.0, 2.0]]))
    before = (o.lo, o.hi, o.hist.copy())
    assert not o.observe(torch.tensor([[0.0, float("-inf"), 1.0]]))
    assert not o.observe(torch.tensor([[float("nan"), 1.0, 1.0]]))
    assert (o.lo, o.hi) == before[:2] and np.array_equal(o.hist, before[2])


def _executed_ops(path, tmp_path) -> collections.Counter:
    """Op types of the graph ONNX Runtime runs (after its QDQ fusion), from SessionOptions.optimized_model_filepath."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    out = tmp_path / f"{path.stem}-optimized.onnx"
    so.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(str(out)).graph.node)


def test_resnet_block_stays_integer_in_ort_like_ort_own_quantizer(tmp_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    m = TinyResNet().eval()
    x = m.example_inputs(32)
    q = es.quantize(m, es.QuantConfig(num_samples=32), data=x)
    # MaxPool and flatten outputs reuse their input's scale and zero point (ORT drops the Q/DQ pair around them)
    shared = {a["value"]: a for a in q.report.activations if "shares" in a}
    assert {"maxpool", "flatten"} <= set(shared)
    by_module = {a["module"]: a for a in q.report.activations}
    for a in shared.values():
        src = by_module[a["shares"]]
        assert (a["scale"], a["zero_point"]) == (src["scale"], src["zero_point"])
    floors = es.ValidationFloors(min_top1_agreement=0.0, float_top1_agreement=0.0)
    ours = es.export(q, "onnx", example_inputs=x, path=tmp_path / "es.onnx", floors=floors).path
    ops = _executed_ops(ours, tmp_path)
    assert ops["QLinearConv"] == 6 and ops["QLinearAdd"] == 2 and ops["QGemm"] == 1
    assert ops["Add"] == 0 and ops["Conv"] == 0 and ops["MaxPool"] == 0  # no float Add/Conv/MaxPool
    assert ops["NhwcMaxPool"] == 1  # MaxPool consumes the uint8 tensor
    assert ops["QuantizeLinear"] <= 1 and ops["DequantizeLinear"] <= 1  # only the model input's Q, at most an output DQ

    # ORT's own quantizer on the same model: edgeslim's executed graph has no more of any op type than ORT's
    fp32 = es.export(m, "onnx", example_inputs=x, path=tmp_path / "fp32.onnx").path

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"input": x[i : i + 1].numpy()} for i in range(len(x))])

        def get_next(self):
            return next(self.it, None)

    theirs = tmp_path / "ort.onnx"
    quantize_static(
        str(fp32),
        str(theirs),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    ort_ops = _executed_ops(theirs, tmp_path)
    for op in ("QuantizeLinear", "DequantizeLinear", "Transpose", "MaxPool", "Add", "Conv"):
        assert ops[op] <= ort_ops[op], (op, dict(ops), dict(ort_ops))


def test_validation_references_take_channels_last_batches_and_fall_back_for_models_that_cannot():
    from torch import nn

    from edgeslim.export._api import _forward

    class ViewHead(nn.Module):  # `.view` on a conv output: fails on a channels-last tensor
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 8 * 8, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.conv(x))
            return self.fc(y.view(y.size(0), -1))

    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    m = ViewHead().eval()
    with pytest.raises(RuntimeError):
        m(x.contiguous(memory_format=torch.channels_last))
    with torch.no_grad():
        assert torch.allclose(_forward(m, x), m(x), atol=1e-6)
        conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
        assert torch.allclose(_forward(conv, x), conv(x), atol=1e-5)

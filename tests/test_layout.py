"""Q/DQ layouts per runtime (QuantConfig.runtime): the same calibrated INT8 graph laid out for OpenVINO keeps ONNX
semantics, drops the pairs OpenVINO's low-precision transformations cannot fuse, and runs its convolutions in int8."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from tiny import TinyCSP, TinyFunctional, TinySameConv

import edgeslim as es
from edgeslim.core.errors import ConfigError
from edgeslim.quantize import _layout


def _quantize(runtime: str):
    model = TinyCSP().eval()
    x = TinyCSP.example_inputs(32)
    q = es.quantize(model, es.QuantConfig(capture="onnx", num_samples=32, runtime=runtime), data=x)
    return model, x, q


def _graph(q) -> onnx.ModelProto:
    return onnx.load_from_string(q.onnx_bytes())


def _sqnr_db(ref: np.ndarray, y: np.ndarray) -> float:
    return float(10 * np.log10((ref**2).sum() / max(((ref - y) ** 2).sum(), 1e-20)))


@pytest.fixture(scope="module")
def both():
    model, x, ort_q = _quantize("onnxruntime")
    _, _, ov_q = _quantize("openvino")
    return model, x, ort_q, ov_q


def test_openvino_layout_drops_activation_and_preserving_pairs_and_shares_concat_ranges(both):
    model, x, ort_q, ov_q = both
    lay = ov_q.report.layout
    assert ort_q.report.layout is None
    assert lay["runtime"] == "openvino" and lay["activation_pairs_dropped"] >= 5  # every Conv->SiLU/HardSwish
    assert lay["preserving_pairs_dropped"] >= 2 and lay["concat_inputs_unified"] >= 4
    assert "laid out for openvino" in ov_q.report.summary()
    g = _layout.QdqGraph(_graph(ov_q))
    for n in g.model.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] not in g.inits:
            # no pair between a Conv and its activation, none right after a precision-preserving op
            p = g.producer.get(n.input[0])
            readers = {u.op_type for d in g.consumers[n.output[0]] for u in g.consumers[d.output[0]]}
            assert p is None or p.op_type not in ("Split", "MaxPool", "Resize", "Concat"), n.name
            assert p is None or p.op_type != "Conv" or not (readers and readers <= _layout.ACTIVATIONS), (
                n.name,
                readers,
            )
        if n.op_type == "Concat":  # one scale and zero point for all of a Concat's quantized inputs
            srcs = _layout.quantized_source(g, n.output[0])
            assert srcs, n.name
            params = {
                (float(numpy_helper.to_array(g.inits[d.input[1]])), int(numpy_helper.to_array(g.inits[d.input[2]])))
                for d in srcs
            }
            assert len(params) == 1, (n.name, params)
    # the ORT layout quantizes every Conv output (it fuses into QLinearConv); the OpenVINO one leaves them to the act
    ort_g = _layout.QdqGraph(_graph(ort_q))
    conv_q = [n for n in ort_g.model.graph.node if n.op_type == "QuantizeLinear" and ort_g.op(n.input[0]) == "Conv"]
    assert len(conv_q) >= 5
    # every Conv still runs integer as OpenVINO reads the graph (and the report says so)
    assert ov_q.report.integer_mac_share >= 0.99
    assert "reach a DequantizeLinear" in ov_q.report.integer_macs["source"]


def test_openvino_layout_keeps_the_math(both):
    """Same ranges, same rounding where a pair stays: run in ONNX Runtime, both layouts stay close to FP32 and to
    each other (dropped pairs only remove rounding; shared Concat ranges coarsen a few inputs)."""
    model, x, ort_q, ov_q = both
    ref = model(x[:8]).detach().numpy()
    y_ort = ort_q(x[:8]).detach().numpy()
    y_ov = ov_q(x[:8]).detach().numpy()
    assert _sqnr_db(ref, y_ort) > 20
    assert _sqnr_db(ref, y_ov) > 20
    assert _sqnr_db(y_ort, y_ov) > 20


def test_openvino_runs_every_conv_in_int8_with_fewer_requantizations(both, tmp_path):
    ov = pytest.importorskip("openvino")
    _, x, ort_q, ov_q = both
    core = ov.Core()

    def runtime_layers(q, name):
        path = tmp_path / f"{name}.onnx"
        path.write_bytes(q.onnx_bytes())
        compiled = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_NUM_THREADS": 1})
        y = compiled(x[:1].numpy())[0]
        layers = [
            (str(op.get_rt_info()["layerType"].astype(str)), str(op.get_rt_info()["runtimePrecision"].astype(str)))
            for op in compiled.get_runtime_model().get_ordered_ops()
        ]
        return layers, y

    ort_layers, _ = runtime_layers(ort_q, "ort")
    ov_layers, y = runtime_layers(ov_q, "ov")
    convs = [p for t, p in ov_layers if t == "Convolution"]
    assert convs and all(p.lower() in ("i8", "u8") for p in convs), ov_layers
    standalone = lambda layers: sum(t in ("Subgraph", "FakeQuantize", "Eltwise") for t, _ in layers)  # noqa: E731
    assert standalone(ov_layers) < standalone(ort_layers), (ov_layers, ort_layers)
    assert _sqnr_db(ov_q(x[:1]).detach().numpy(), y) > 20  # OpenVINO computes what ORT does with the file


def test_openvino_layout_exports_and_replays(both, tmp_path):
    _, x, _, ov_q = both
    no_top1 = es.ValidationFloors(min_top1_agreement=0.0, float_top1_agreement=0.0)  # a feature map, no classes
    art = es.export(ov_q, "onnx", example_inputs=x[:8], path=tmp_path / "m.onnx", floors=no_top1)
    assert art.path.read_bytes() == ov_q.onnx_bytes()
    back = es.load(es.save(ov_q, tmp_path / "q.recipe"), model=TinyCSP().eval())
    assert back.config.runtime == "openvino"
    assert back.onnx_bytes() == ov_q.onnx_bytes()


def test_runtime_config_errors():
    with pytest.raises(ConfigError, match="runtime.*onnxruntime, openvino"):
        es.QuantConfig(runtime="tensorrt")
    with pytest.raises(ConfigError, match="static mode"):
        es.QuantConfig(runtime="openvino", mode="dynamic")
    with pytest.raises(ConfigError, match="placement='measured'"):
        es.QuantConfig(runtime="openvino", placement="measured")
    model = TinyFunctional().eval()
    with pytest.raises(ConfigError, match="capture='fx'"):
        es.quantize(model, es.QuantConfig(runtime="openvino", capture="fx"), data=TinyFunctional.example_inputs())
    cfg = es.QuantConfig(runtime="openvino")
    assert es.QuantConfig.from_dict(cfg.to_dict()) == cfg


def test_optimize_lays_int8_candidates_out_for_their_runtime():
    from edgeslim.pipeline._candidate import laid_out_for

    assert laid_out_for(es.QuantConfig(), "openvino").runtime == "openvino"
    assert laid_out_for(es.QuantConfig(), "onnxruntime").runtime == "onnxruntime"
    # settings only the fx capture does keep ORT's layout (the file still runs in OpenVINO), as do runtimes
    # without a layout of their own
    assert laid_out_for(es.QuantConfig(equalize=True), "openvino").runtime == "onnxruntime"
    assert laid_out_for(es.QuantConfig(), "litert").runtime == "onnxruntime"


def test_openvino_export_relays_an_ort_layout_model(tmp_path):
    """An INT8 model quantized for ONNX Runtime (either capture) exported to OpenVINO gets the OpenVINO layout: a
    graph pass on its calibrated scales, validated in OpenVINO against the torch model."""
    pytest.importorskip("openvino")
    model, x = TinyCSP().eval(), TinyCSP.example_inputs(32)
    no_top1 = es.ValidationFloors(min_top1_agreement=0.0, float_top1_agreement=0.0)
    for capture in ("fx", "onnx"):
        q = es.quantize(model, es.QuantConfig(capture=capture, num_samples=32), data=x)
        art = es.export(q, "openvino", example_inputs=x[:8], path=tmp_path / f"{capture}.xml", floors=no_top1)
        lay = art.meta["qdq_layout"]
        assert lay["runtime"] == "openvino" and "at export" in lay["when"], capture
        assert lay["activation_pairs_dropped"] >= 5, (capture, lay)
        assert art.validation["vs_float_reference"]["sqnr_db"] > 20, capture


def test_zero_pads_before_convolutions_carry_the_quantization_and_fold_into_them(tmp_path):
    """EfficientNet-Lite's "same" padding (F.pad before F.conv2d): no pair after a zero Pad, and OpenVINO folds each
    Pad into the convolution it feeds (no Pad layer left in the compiled model)."""
    model, x = TinySameConv().eval(), TinySameConv.example_inputs(32)
    q = es.quantize(model, es.QuantConfig(num_samples=32, runtime="openvino"), data=x)
    g = _layout.QdqGraph(_graph(q))
    pads = [n for n in g.model.graph.node if n.op_type == "Pad"]
    assert len(pads) >= 2
    assert not [c for p in pads for c in g.consumers[p.output[0]] if c.op_type == "QuantizeLinear"]
    assert q.report.layout["preserving_pairs_dropped"] >= 2 and q.report.integer_mac_share >= 0.99
    ov = pytest.importorskip("openvino")
    path = tmp_path / "m.onnx"
    path.write_bytes(q.onnx_bytes())
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_NUM_THREADS": 1})
    kinds = [str(op.get_rt_info()["layerType"].astype(str)) for op in compiled.get_runtime_model().get_ordered_ops()]
    assert "Pad" not in kinds, kinds
    assert _sqnr_db(q(x[:1]).detach().numpy(), compiled(x[:1].numpy())[0]) > 20

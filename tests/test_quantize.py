import dataclasses

import numpy as np
import pytest
import torch
from tiny import NoWeights, TinyCNN, TinyMLP, wide_channel_convs

from edgeslim.core.config import CONFIGS
from edgeslim.core.errors import ConfigError, DataError, QuantizationError
from edgeslim.quantize import CALIBRATORS, ActQuant, QuantConfig, QuantWeight, Stats, quantize
from edgeslim.quantize._calibrate import BINS, Observer, _quant_mse
from edgeslim.train import evaluate


def _stats(x: np.ndarray, qmin: int = 0, qmax: int = 255, pct: float = 99.9) -> Stats:
    o = Observer()
    t = torch.from_numpy(x.astype(np.float32))
    o.observe_range(t)
    o.observe_hist(t)
    return o.stats(qmin, qmax, pct)


def test_every_registered_config_round_trips_through_yaml():
    import edgeslim.export._weight_only  # noqa: F401  (registers WeightOnlyConfig)
    import edgeslim.share  # noqa: F401  (registers its configs)

    assert {"quantize", "train", "validation", "weight_only"} <= set(CONFIGS)
    needs_args = {"tie": {"auto": True}}  # TieConfig has no valid default: groups or auto must be given
    for kind, cls in CONFIGS.items():
        cfg = cls(**needs_args.get(kind, {}))
        again = cls.from_yaml(cfg.to_yaml())
        assert again == cfg
        assert cls.from_dict(cfg.to_dict()) == cfg


def test_config_rejects_unknown_keys_and_values_with_the_valid_ones():
    with pytest.raises(ConfigError, match="calibraton.*did you mean 'calibration'"):
        QuantConfig.from_dict({"calibraton": "mse"})
    with pytest.raises(ConfigError, match="valid: entropy, minmax, mse, percentile"):
        QuantConfig(calibration="kl")
    with pytest.raises(ConfigError, match="mode='int4'.*valid: static, dynamic, fp16"):
        QuantConfig(mode="int4")
    with pytest.raises(ConfigError, match="weight_bits=3.*supported: 4, 8"):
        QuantConfig(weight_bits=3)
    for bits in (2, 16, 0):
        with pytest.raises(ConfigError, match=f"weight_bits={bits}.*supported: 4, 8"):
            QuantConfig(weight_bits=bits)
    with pytest.raises(ConfigError, match="weight_range='l2'.*valid: minmax, mse"):
        QuantConfig(weight_range="l2")
    with pytest.raises(ConfigError, match="adaround_samples"):
        QuantConfig(adaround_samples=0)
    assert QuantConfig(mode="dynamic").mode == "dynamic"
    with pytest.raises(dataclasses.FrozenInstanceError):
        QuantConfig().mode = "fp16"


def test_calibrators_on_a_heavy_tailed_distribution():
    rng = np.random.default_rng(0)
    x = np.abs(rng.standard_normal(100_000))
    x[:5] = 50.0  # rare outliers
    s = _stats(x)
    assert CALIBRATORS.get("minmax")(s) == pytest.approx((0.0, 50.0), abs=1e-4)
    for name in ("percentile", "entropy"):
        lo, hi = CALIBRATORS.get(name)(s)
        assert lo == 0.0 and 2.0 < hi < 25.0, (name, hi)  # outliers clipped, bulk kept
    # mse weighs the outliers' clipping error against the bulk's rounding error: never worse than minmax
    lo, hi = CALIBRATORS.get("mse")(s)
    assert lo == 0.0 and hi <= 50.0 and _quant_mse(s, lo, hi) <= _quant_mse(s, 0.0, 50.0)
    signed = _stats(rng.standard_normal(100_000), -128, 127)
    lo, hi = CALIBRATORS.get("percentile")(signed)
    assert lo < -2.5 and hi > 2.5
    assert len(s.hist) == BINS


def test_quantize_returns_a_new_model_and_leaves_the_input_alone():
    model = TinyCNN().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = quantize(model, QuantConfig(num_samples=16), calib=TinyCNN.example_inputs(16))
    assert q is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, (ActQuant, QuantWeight)) for m in model.modules())
    names = [r["name"] for r in q.report.quantized_layers]
    assert names == ["stem.0", "dw.0", "pw.0", "fc"]
    assert q.report.skipped_layers == []
    # BatchNorm was folded away, every activation has a calibrated uint8 range
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in q.modules())
    assert all(a.state == "quant" and 0 <= int(a.zero_point) <= 255 for a in q.act_quants())
    assert len(q.report.activations) == len(q.act_quants())


def test_relu6_outputs_get_a_range_within_0_and_6():
    q = quantize(TinyCNN(), QuantConfig(calibration="minmax", num_samples=8), calib=TinyCNN.example_inputs(8) * 50)
    clamped = [a for a in q.act_quants() if a.clamp == (0.0, 6.0)]
    assert clamped, "ReLU6 outputs should be folded into their producer's quantization range"
    for a in clamped:
        lo, hi = a.range
        assert lo == pytest.approx(0.0, abs=1e-6) and hi <= 6.0 + 1e-5


def test_float_reference_switches_fake_quantization_off():
    model = TinyCNN().eval()
    x = TinyCNN.example_inputs(8)
    q = quantize(model, QuantConfig(num_samples=8), calib=x)
    with torch.no_grad():
        ref = model(x)
        with q.float_reference():
            folded = q(x)
        simulated = q(x)
    assert torch.allclose(ref, folded, atol=1e-5)
    assert not torch.allclose(ref, simulated, atol=1e-5)


def test_quantized_accuracy_stays_close_on_real_digits(digits_model):
    model, train, val = digits_model
    base = evaluate(model, val)
    assert base > 0.85
    for method in ("minmax", "percentile", "mse"):
        q = quantize(model, QuantConfig(calibration=method, num_samples=256), calib=train)
        assert evaluate(q, val) >= base - 0.02, method
    # KL-divergence calibration clips hard on this tiny model: still far above chance, ranges tighter
    e = quantize(model, QuantConfig(calibration="entropy", num_samples=256), calib=train)
    m = quantize(model, QuantConfig(calibration="minmax", num_samples=256), calib=train)
    assert evaluate(e, val) > 0.3
    assert sum(a["range"][1] for a in e.report.activations) < sum(a["range"][1] for a in m.report.activations)


def test_exclusion_is_reported_and_unknown_patterns_fail_with_near_names():
    x = TinyCNN.example_inputs(8)
    q = quantize(TinyCNN(), QuantConfig(exclude=("fc",), num_samples=8), calib=x)
    assert [s["name"] for s in q.report.skipped_layers] == ["fc"]
    assert "exclude pattern 'fc'" in q.report.skipped_layers[0]["reason"]
    assert "fc" not in [r["name"] for r in q.report.quantized_layers]
    q2 = quantize(TinyCNN(), QuantConfig(exclude=("dw.*", "pw.*"), num_samples=8), calib=x)
    assert {s["name"] for s in q2.report.skipped_layers} == {"dw.0", "pw.0"}
    with pytest.raises(ConfigError, match=r"'stem\.1' matches no quantizable layer.*did you mean 'stem\.0'"):
        quantize(TinyCNN(), QuantConfig(exclude=("stem.1",)), calib=x)


def test_bad_inputs_get_clear_errors():
    with pytest.raises(QuantizationError, match="no quantizable layers"):
        quantize(NoWeights(), QuantConfig(), calib=NoWeights.example_inputs())
    with pytest.raises(DataError, match="never calibrates on random data"):
        quantize(TinyCNN(), QuantConfig())
    with pytest.raises(DataError, match="empty"):
        quantize(TinyCNN(), QuantConfig(), calib=torch.empty(0, 1, 8, 8))
    with pytest.raises(DataError, match=r"input of shape \(3, 8, 8\) does not fit TinyCNN"):
        quantize(TinyCNN(), QuantConfig(), calib=torch.randn(4, 3, 8, 8))


def test_dynamic_and_fp16_modes_need_no_calibration():
    x = TinyMLP.example_inputs()
    d = quantize(TinyMLP(), QuantConfig(mode="dynamic"), example_inputs=x)
    assert d.edgeslim_precision == "int8-dynamic" and all(a.state == "dynamic" for a in d.act_quants())
    m = TinyMLP().eval()
    h = quantize(m, QuantConfig(mode="fp16"), example_inputs=x)
    assert h.edgeslim_precision == "fp16" and not h.act_quants()
    with torch.no_grad():
        err = (h(x) - m(x)).abs().max()
    assert 0 < err < 1e-2  # weights rounded to half precision, nothing else
    assert h.report.quantized_layers[0]["weights"] == "fp16"


def test_int32_bias_never_overflows_when_a_channel_is_dead():
    model = TinyCNN().eval()
    with torch.no_grad():
        model.pw[0].weight[0].zero_()  # a dead channel: weight scale would be ~0
        model.pw[1].bias[0] = 5.0
    q = quantize(model, QuantConfig(num_samples=8), calib=TinyCNN.example_inputs(8))
    w = q.graph_module.get_submodule("pw.0")
    b = w.layer.bias.detach()
    assert (b.abs() / (w.input_scale * w.scale) < 2**31 - 1).all()


@pytest.mark.parametrize("method", ["ste", "lsq"])
def test_qat_trains_scales_and_exports_them_to_integer_onnx(tmp_path, digits_model, method):
    import collections

    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from edgeslim.export import export
    from edgeslim.quantize import QATConfig, qat
    from edgeslim.train import TrainConfig

    model, train, val = digits_model
    ptq = quantize(model, QuantConfig(calibration="minmax", num_samples=256), calib=train)
    before = [float(a.scale) for a in ptq.act_quants()]
    q = qat(
        ptq,
        QATConfig(method=method),
        data=(train, val),
        train_config=TrainConfig(
            epochs=2, lr=1e-3, optimizer="adamw", weight_decay=0.0, warmup_steps=0, augment=False, batch_size=32
        ),
        progress=False,
    )
    after = [float(a.scale.detach()) for a in q.act_quants()]
    assert [float(a.scale) for a in ptq.act_quants()] == before  # the input model is untouched
    assert (after != before) == (method == "lsq")  # LSQ learns activation scales; STE keeps the calibrated ones
    assert evaluate(q, val) >= evaluate(ptq, val) - 0.02
    art = export(q, "onnx", example_inputs=val, path=tmp_path / "qat.onnx")
    g = onnx.load(str(art.path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    act_scales = sorted(float(inits[n.input[1]]) for n in g.node if n.op_type == "QuantizeLinear")
    assert act_scales and all(any(abs(s - a) <= 1e-6 * a for a in after) for s in act_scales)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(art.path), so, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    assert ops["QLinearConv"] == 3 and "Conv" not in ops


def test_saved_quantized_model_replays_exactly(tmp_path, digits_model):
    from edgeslim.core.errors import ModelError
    from edgeslim.quantize import restore_quantized, save_quantized

    model, train, val = digits_model
    q = quantize(model, QuantConfig(num_samples=128, exclude=("fc",)), calib=train)
    path = save_quantized(q, tmp_path / "q.pt")
    blob = torch.load(path, weights_only=True)  # plain data: no pickled modules
    assert blob["steps"][-1]["technique"] == "quantize" and blob["steps"][-1]["config"]["exclude"] == ["fc"]
    r = restore_quantized(model, path)
    x = val.normalized()[:64]
    with torch.no_grad():
        assert torch.equal(q(x), r(x))
    with pytest.raises(ModelError, match="does not match"):
        restore_quantized(TinyMLP(), path)


def test_4bit_weights_use_16_levels_and_export(tmp_path, digits_model):
    from edgeslim.export import export

    model, train, val = digits_model
    q = quantize(model, QuantConfig(weight_bits=4, num_samples=128), calib=train)
    for w in q.weight_quants():
        levels = torch.unique(
            torch.round(w.quantized_weight().detach() / w.scale.view(-1, *[1] * (w.layer.weight.ndim - 1)))
        )
        assert levels.min() >= -8 and levels.max() <= 7
    assert q.report.quantized_layers[0]["weights"].startswith("int4")
    art = export(q, "onnx", example_inputs=val, path=tmp_path / "w4.onnx")
    assert art.validation["top1_agreement"] > 0.9


def test_cross_layer_equalization_is_exact_for_relu_and_balances_ranges():
    from tiny import TinyChain

    from edgeslim.quantize._equalize import equalize
    from edgeslim.quantize._graph import trace_and_fold

    model = TinyChain().eval()
    x = TinyChain.example_inputs()
    gm = trace_and_fold(model)

    def spread(w):
        r = w.detach().abs().flatten(1).amax(1)
        return float(r.max() / r.min())

    before = spread(gm.c1.weight)
    done = equalize(gm)
    assert done["pairs"] == [["c1", "dw"], ["dw", "c2"]] and done["relu6_replaced_by_relu"] == []
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), atol=1e-5)  # exact: ReLU is positively homogeneous
    assert spread(gm.c1.weight) < before / 10
    q_plain = quantize(model, QuantConfig(per_channel=False, num_samples=16), calib=x)
    q_cle = quantize(model, QuantConfig(per_channel=False, equalize=True, num_samples=16), calib=x)
    with torch.no_grad():
        ref = model(x)
        err_plain = (q_plain(x) - ref).pow(2).mean()
        err_cle = (q_cle(x) - ref).pow(2).mean()
    assert err_cle < err_plain / 2
    assert q_cle.report.corrections["equalization"]["pairs"]


def test_equalization_swaps_relu6_and_says_so():
    q = quantize(TinyCNN(), QuantConfig(equalize=True, num_samples=8), calib=TinyCNN.example_inputs(8))
    # stem -> ReLU6 also feeds the residual add, so only dw -> ReLU6 -> pw is a pair
    assert q.report.corrections["equalization"]["pairs"] == [["dw.0", "pw.0"]]
    assert q.report.corrections["equalization"]["relu6_replaced_by_relu"] == ["dw.2"]


def test_bias_correction_removes_the_mean_output_error(digits_model):
    model, train, val = digits_model
    cfg = QuantConfig(per_channel=False, weight_bits=4, num_samples=256)
    plain = quantize(model, cfg, calib=train)
    corrected = quantize(model, cfg.replace(bias_correction=True), calib=train)
    assert corrected.report.corrections["bias_corrected_layers"] == ["stem.0", "dw.0", "pw.0", "fc"]

    reference = plain.graph_module.get_submodule("stem.0").layer  # the float layer, original bias

    def stem_error(q):  # the first layer sees the same quantized input in both models
        seen = {}
        qw = q.graph_module.get_submodule("stem.0")
        h = qw.register_forward_hook(lambda m, i, o: seen.update(err=(o - reference(i[0])).transpose(0, 1).flatten(1)))
        with torch.no_grad():
            q(val.normalized())
        h.remove()
        return float(seen["err"].mean(1).abs().mean())

    before, after = stem_error(plain), stem_error(corrected)
    assert before > 1e-3 and after < before / 5
    assert evaluate(corrected, val) >= evaluate(plain, val) - 0.02


def test_adaround_rounds_to_the_grid_and_never_reconstructs_worse_than_nearest(digits_model):
    model, train, val = digits_model
    cfg = QuantConfig(weight_bits=4, num_samples=64)
    rtn = quantize(model, cfg, calib=train)
    ada = quantize(model, cfg.replace(adaround=True, adaround_iterations=100), calib=train)
    assert set(ada.report.corrections["adarounded_layers"]) <= {"stem.0", "dw.0", "pw.0", "fc"}
    for w in ada.weight_quants():  # the weights now sit exactly on the 4-bit grid
        shape = (-1,) + (1,) * (w.layer.weight.ndim - 1)
        k = w.layer.weight.detach() / w.scale.view(shape)
        assert torch.allclose(k, k.round(), atol=1e-3) and k.abs().max() <= 8
    # the first layer sees the same quantized input in both models: its reconstruction error can only drop
    float_stem = rtn.graph_module.get_submodule("stem.0").layer
    x = val.normalized()
    errs = []
    for q in (rtn, ada):
        seen = {}
        h = q.graph_module.get_submodule("stem.0").register_forward_hook(
            lambda m, i, o, seen=seen: seen.update(e=float((o - float_stem(i[0])).pow(2).mean()))
        )
        with torch.no_grad():
            q(x)
        h.remove()
        errs.append(seen["e"])
    assert errs[1] <= errs[0] * 1.05


def test_mse_weight_scales_never_fit_the_weights_worse_than_minmax():
    x = TinyCNN.example_inputs(16)
    model = TinyCNN().eval()
    qs = {
        r: quantize(model, QuantConfig(weight_bits=4, weight_range=r, num_samples=16), calib=x)
        for r in ("minmax", "mse")
    }
    assert "MSE scales" in qs["mse"].report.quantized_layers[0]["weights"]
    for a, b in zip(qs["minmax"].weight_quants(), qs["mse"].weight_quants()):
        err = [float((w.quantized_weight() - w.layer.weight).pow(2).sum()) for w in (a, b)]
        assert err[1] <= err[0] + 1e-9 and bool((b.scale <= a.scale + 1e-9).all())


def test_per_tensor_where_the_weights_keep_their_sqnr_smaller_file_same_fidelity_replays(tmp_path):
    import onnx
    from onnx import numpy_helper

    from edgeslim.export import export
    from edgeslim.quantize import restore_quantized, save_quantized

    model, x = wide_channel_convs()  # 8 of 64 channels of "2" 40x wider: one scale for it ruins the other 56
    every = quantize(model, QuantConfig(num_samples=64), data=x)
    mixed = quantize(model, QuantConfig(num_samples=64, per_tensor_sqnr_db=35.0), data=x)
    chosen = mixed.report.corrections["per_tensor_layers"]
    assert sorted(chosen) == ["0", "4"]  # the even layers; "2" stays per channel
    assert all(v["per_tensor_sqnr_db"] >= 35.0 for v in chosen.values())
    assert {w.per_channel for w in mixed.weight_quants()} == {True, False}
    layers = {entry["name"]: entry["weights"] for entry in mixed.report.quantized_layers}
    assert "per-tensor" in layers["0"] and "per-channel" in layers["2"]
    assert "2 of 3 layers per-tensor" in mixed.report.summary()
    a = export(every, "onnx", example_inputs=x[:16], path=tmp_path / "every.onnx")
    b = export(mixed, "onnx", example_inputs=x[:16], path=tmp_path / "mixed.onnx")
    assert b.size_bytes < a.size_bytes
    g = onnx.load(str(b.path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    sizes = sorted(inits[n.input[1]].size for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in inits)
    assert 64 in sizes and sizes.count(1) >= 2  # per-channel weight (and bias) scales for "2" only
    fa, fb = a.validation["vs_float_reference"], b.validation["vs_float_reference"]
    assert fb["sqnr_db"] >= fa["sqnr_db"] - 1.0  # the per-tensor layers cost (almost) nothing
    path = save_quantized(mixed, tmp_path / "mixed.pt")
    r = restore_quantized(model, path)
    assert {n for n, w in r.graph_module.named_modules() if isinstance(w, QuantWeight) and not w.per_channel} == set(
        chosen
    )
    with torch.no_grad():
        assert torch.equal(mixed(x[:8]), r(x[:8]))
    with pytest.raises(ConfigError, match="per_tensor_sqnr_db"):
        QuantConfig(per_channel=False, per_tensor_sqnr_db=35.0)
    from edgeslim.core.errors import ModelError
    from edgeslim.quantize._api import build_graph

    with pytest.raises(ModelError, match="no such quantized layer"):
        build_graph(model, mixed.config, ["0", "features.9"])

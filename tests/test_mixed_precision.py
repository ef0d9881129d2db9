"""Per-layer sensitivity and mixed precision under an accuracy budget (tiny models, seconds)."""

import copy
import logging

import pytest
import torch
from tiny import NoWeights, TinyCNN

import edgeslim
from edgeslim import PruneConfig
from edgeslim.core.config import CONFIGS
from edgeslim.core.errors import ConfigError, DataError, QuantizationError
from edgeslim.quantize import BudgetConfig, BudgetSearch, QuantConfig, quantize, quantize_with_budget, sensitivity
from edgeslim.quantize._sensitivity import _Evaluator, _Variants

W4 = QuantConfig(weight_bits=4, num_samples=256)
W8 = QuantConfig(num_samples=256)


@pytest.fixture(scope="module")
def fragile(digits_model):
    """The digits TinyCNN with an outlier column in ``fc``: channel 3 feeding it is exactly zero (both branches'
    BatchNorm silenced), so the float model computes the same with fc.weight[:, 3] = 50, but quantizing fc with
    one scale per output row rounds every other weight to zero."""
    model, train, val = digits_model
    m = copy.deepcopy(model)
    with torch.no_grad():
        for bn in (m.stem[1], m.pw[1]):
            bn.weight[3] = 0.0
            bn.bias[3] = 0.0
        m.fc.weight[:, 3] = 50.0
    return m.eval(), train, val


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _same(m, state):
    return m.state_dict().keys() == state.keys() and all(torch.equal(v, state[k]) for k, v in m.state_dict().items())


@pytest.mark.parametrize("mode", ["one_at_a_time", "all_but_one"])
def test_sensitivity_ranks_the_fragile_layer_first(fragile, mode):
    m, train, val = fragile
    before = _state(m)
    rep = sensitivity(m, W4, data=(train, val), mode=mode)
    assert rep.ranking[0] == "fc"
    assert set(rep.ranking) == {d["name"] for d in quantize(m, W4, calib=train).report.quantized_layers}
    assert rep.layers[0].sensitivity > 0.2 > rep.layers[1].sensitivity
    assert [r.sensitivity for r in rep.layers] == sorted((r.sensitivity for r in rep.layers), reverse=True)
    assert rep.quantized_metric < 0.5 < rep.float_metric
    assert "fc" in rep.table(2) and len(rep.table(2).splitlines()) == 5
    assert rep.to_dict()["layers"][0]["layer"] == "fc"
    assert _same(m, before)


def test_sensitivity_samples_and_custom_metric(fragile):
    m, train, val = fragile
    rep = sensitivity(m, W4, data=(train, val), samples=100)
    assert rep.samples == 100 and rep.ranking[0] == "fc"

    def neg_logit_mse(model, data):
        with torch.no_grad():
            return -float(((model(data.normalized()) - m(data.normalized())) ** 2).mean())

    rep = sensitivity(m, W4, data=(train, val), metric=neg_logit_mse)
    assert rep.metric_name == "neg_logit_mse" and rep.ranking[0] == "fc" and rep.layers[0].sqnr_db is None
    with pytest.raises(ConfigError, match="sqnr"):
        rep.rerank("sqnr")
    with pytest.raises(ConfigError, match="sqnr"):
        sensitivity(m, W4, data=(train, val), metric=neg_logit_mse, rank_by="sqnr")


def test_rank_by_sqnr(fragile):
    m, train, val = fragile
    rep = sensitivity(m, W4, data=(train, val), rank_by="sqnr")
    assert rep.rank_by == "sqnr" and rep.ranking[0] == "fc"
    assert [r.sqnr_db for r in rep.layers] == sorted(r.sqnr_db for r in rep.layers)
    back = rep.rerank("metric")
    assert back.rank_by == "metric" and sorted(back.layers, key=lambda r: r.layer) == sorted(
        rep.layers, key=lambda r: r.layer
    )
    assert [r.sensitivity for r in back.layers] == sorted((r.sensitivity for r in back.layers), reverse=True)


def test_variants_match_a_model_built_with_exclude(fragile):
    m, train, val = fragile
    v = _Variants(m, W4, train)
    x = val.normalized()[:64]
    for floats in ([], ["fc"], ["stem.0", "dw.0"]):
        built = v.build(floats)
        assert [d["name"] for d in built.report.skipped_layers] == floats
        assert len(built.report.quantized_layers) == 4 - len(floats)
        with torch.no_grad(), v.variant(floats) as q:
            assert torch.equal(q(x), built(x))
    # toggling restores the calibrated model
    with torch.no_grad():
        assert torch.equal(v.q(x), v.build([])(x))


def test_int8_variants_match_a_model_built_with_int8_layers(fragile):
    m, train, val = fragile
    v = _Variants(m, W4, train)
    x = val.normalized()[:64]
    for eight in (["fc"], ["stem.0", "dw.0"]):
        built = v.build([], eight)
        assert built.config.int8_layers == tuple(eight) and built.report.skipped_layers == []
        bits = {d["name"]: d["weights"][:4] for d in built.report.quantized_layers}
        assert {n for n, b in bits.items() if b == "int8"} == set(eight) and len(bits) == 4
        for name in eight:  # 8-bit weights: up to 255 levels per channel instead of 15
            qw = built.graph_module.get_submodule(name)
            # 7-bit range on hosts without VNNI, but for the depthwise layer (its kernel does not saturate)
            assert qw.qmax == (63 if built.config.reduce_range and name != "dw.0" else 127)
        with torch.no_grad(), v.variant([], eight) as q:
            assert torch.equal(q(x), built(x))
    with torch.no_grad():  # toggling back restores the 4-bit scales
        assert torch.equal(v.q(x), v.build([])(x))


def test_budget_with_int8_fallback_keeps_every_layer_integer(fragile, tmp_path):
    from edgeslim.export import export
    from edgeslim.runtime import optimized_op_types

    m, train, val = fragile
    res = quantize_with_budget(m, BudgetConfig(max_accuracy_drop=0.05, quant=W4, fallback="int8"), data=(train, val))
    assert res.fallback == "int8" and "at int8" in res.table()
    assert res.met and len(res.kept_float) >= 1
    assert res.model.config.int8_layers == res.kept_float and res.model.config.exclude == ()
    assert res.model.report.skipped_layers == []
    art = export(res.model, "onnx", example_inputs=val, path=tmp_path / "mixed.onnx")
    ops = optimized_op_types(art.path)
    assert ops["QLinearConv"] == 3 and ops["QGemm"] == 1 and "Conv" not in ops and "Gemm" not in ops
    with pytest.raises(ConfigError, match="fallback='int8'.*weight_bits=4"):
        BudgetConfig(max_accuracy_drop=0.05, quant=W8, fallback="int8")
    with pytest.raises(ConfigError, match="int8_layers.*weight_bits=4"):
        QuantConfig(int8_layers=("fc",))
    with pytest.raises(ConfigError, match="int8_layers pattern 'fx' matches no quantizable layer"):
        quantize(m, W4.replace(int8_layers=("fx",)), calib=train)


def test_budget_loose_needs_no_float_layer(digits_model):
    model, train, val = digits_model
    res = quantize_with_budget(
        model, BudgetConfig(max_accuracy_drop=0.03, quant=W8), data=(train, val), eval_data=train
    )
    assert res.met and res.kept_float == () and len(res.steps) == 1
    assert res.drop <= 0.03 and res.model.report.skipped_layers == []
    assert res.eval["samples"] == len(train) and res.eval["float_metric"] > 0.9
    assert res.to_dict()["met"] is True


def test_budget_tight_keeps_the_sensitive_layers_in_float(fragile):
    m, train, val = fragile
    before = _state(m)
    res = quantize_with_budget(m, BudgetConfig(max_accuracy_drop=0.05, quant=W4), data=(train, val))
    assert res.met and len(res.kept_float) >= 1 and res.kept_float[0] == "fc"
    ns = [s.n_float for s in res.steps]
    assert ns == list(range(len(ns)))  # greedy: one more float layer per step
    assert all(not s.met for s in res.steps[:-1]) and res.steps[-1].met
    assert [s.kept_float for s in res.steps][1:] == [res.sensitivity.ranking[:k] for k in ns[1:]]
    # the returned model is the measured candidate, with the float layers excluded in its config and report
    assert res.model.config.exclude == res.kept_float
    assert {d["name"] for d in res.model.report.skipped_layers} == set(res.kept_float)
    ev = _Evaluator(m, val, None, None)
    assert ev.score(res.model)[0] == pytest.approx(res.metric)
    assert _same(m, before)
    # bisection (0, 1, 2, 4, then 3) finds the same candidate, reusing the ranking
    res2 = quantize_with_budget(
        m,
        BudgetConfig(max_accuracy_drop=0.05, quant=W4, search="bisect"),
        data=(train, val),
        sensitivity_report=res.sensitivity,
    )
    assert res2.met and res2.kept_float == res.kept_float


def test_budget_below_the_sampling_noise_is_flagged(fragile, caplog):
    m, train, val = fragile
    fc = _Evaluator(m, val, None, None)
    res = quantize_with_budget(m, BudgetConfig(max_accuracy_drop=0.001, quant=W4), data=(train, val))
    # the paired 2-SE noise of float vs all-quantized, recomputed by hand from per-sample correctness
    with _Variants(m, W4, train).variant(()) as q:
        fc.score(q)
        qc = fc.last_correct
    d = fc.float_correct.double() - qc.double()
    assert res.noise_2se == pytest.approx(float(2 * d.std(unbiased=True) / len(d) ** 0.5))
    assert 0.001 < res.noise_2se < 1  # a few hundred samples cannot resolve 0.1 pt
    assert "below the sampling noise" in caplog.text and "LARGER than the budget" in res.table()
    assert res.to_dict()["noise_2se"] == res.noise_2se


def test_unreachable_budget_returns_the_best_candidate(fragile):
    m, train, val = fragile

    def neg_logit_mse(model, data):  # any quantization (even of the residual add) moves the logits
        with torch.no_grad():
            return -float(((model(data.normalized()) - m(data.normalized())) ** 2).mean())

    res = quantize_with_budget(
        m, BudgetConfig(max_accuracy_drop=0.0, quant=W4), data=(train, val), metric=neg_logit_mse
    )
    assert not res.met and len(res.steps) == 5 and res.drop > 0
    assert res.drop == min(s.drop for s in res.steps) and isinstance(res.model, torch.nn.Module)
    assert res.to_dict()["met"] is False and "NOT met" in res.table()


@pytest.mark.parametrize("bad", [-0.01, 1.5, float("nan"), "0.1", True])
def test_bad_budget_is_a_config_error(bad):
    # out-of-range numbers get the field's own rule; a value of another type, the type it must have
    rule = r"fraction in \[0, 1\]" if isinstance(bad, float) else "expected a number"
    with pytest.raises(ConfigError, match=rf"BudgetConfig\.max_accuracy_drop=.*{rule}"):
        BudgetConfig(max_accuracy_drop=bad, quant=W8)


def test_bad_inputs(digits_model):
    model, train, val = digits_model
    empty = val.subset([])
    with pytest.raises(DataError, match="evaluation data"):
        sensitivity(model, W8, data=(train, empty))
    with pytest.raises(DataError, match="evaluation data"):
        quantize_with_budget(model, BudgetConfig(max_accuracy_drop=0.01, quant=W8), data=(train, empty))
    with pytest.raises(ConfigError, match="mode"):
        sensitivity(model, W8, data=(train, val), mode="all_at_once")
    with pytest.raises(ConfigError, match="BudgetConfig.search='random'.*valid: greedy, bisect"):
        BudgetConfig(max_accuracy_drop=0.01, quant=W8, search="random")
    with pytest.raises(ConfigError, match="samples"):
        sensitivity(model, W8, data=(train, val), samples=0)
    with pytest.raises(QuantizationError, match="no quantizable layers"):
        sensitivity(NoWeights(), W8, data=(train, val))
    with pytest.raises(QuantizationError, match="no quantizable layers"):
        quantize_with_budget(NoWeights(), BudgetConfig(max_accuracy_drop=0.01, quant=W8), data=(train, val))
    with pytest.raises(ConfigError, match=r"matches no quantizable layer.*did you mean"):
        quantize_with_budget(
            model, BudgetConfig(max_accuracy_drop=0.01, quant=W8.replace(exclude=("stem.9",))), data=(train, val)
        )
    with pytest.raises(DataError):
        sensitivity(TinyCNN(), W8, data=(None, val))


def test_budget_config_round_trips_with_its_nested_quant_config(tmp_path):
    cfg = BudgetConfig(
        max_accuracy_drop=0.002,
        quant=QuantConfig(weight_bits=4, exclude=("fc",)),
        search="bisect",
        rank_by="sqnr",
        sensitivity_samples=200,
        fallback="int8",
    )
    assert cfg.to_dict()["quant"] == cfg.quant.to_dict() and cfg.to_dict()["quant"]["weight_bits"] == 4
    assert BudgetConfig.from_yaml(cfg.to_yaml()) == cfg and BudgetConfig.from_dict(cfg.to_dict()) == cfg
    assert edgeslim.BudgetConfig is BudgetConfig and CONFIGS[BudgetConfig.kind] is BudgetConfig
    # a hand-written recipe: the nested mapping names only the fields it changes
    path = tmp_path / "budget.yaml"
    path.write_text(
        "quantize_with_budget:\n  max_accuracy_drop: 0.005\n  quant:\n    weight_bits: 4\n"
        "    calibration: percentile\n  search: bisect\n"
    )
    got = BudgetConfig.from_yaml(path)
    assert got == BudgetConfig(
        max_accuracy_drop=0.005, quant=QuantConfig(weight_bits=4, calibration="percentile"), search="bisect"
    )
    assert isinstance(got.quant, QuantConfig) and got.search is BudgetSearch.BISECT


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"quant": {"weight_bit": 4}}, r"BudgetConfig\.quant: unknown QuantConfig field 'weight_bit'.*weight_bits"),
        ({"quant": {"weight_bits": 3}}, r"QuantConfig\.weight_bits=3 is not allowed; supported: 4, 8"),
        ({"quant": "w4"}, r"BudgetConfig\.quant='w4' is not allowed; use a QuantConfig or a mapping of its fields"),
        ({"quant": PruneConfig()}, r"BudgetConfig\.quant is a PruneConfig; use a QuantConfig"),
        ({"mode": "all"}, r"BudgetConfig\.mode='all' is not allowed.*valid: one_at_a_time, all_but_one"),
        ({"rank_by": "top1"}, r"BudgetConfig\.rank_by='top1' is not allowed.*valid: metric, sqnr"),
        ({"fallback": "fp16"}, r"BudgetConfig\.fallback='fp16' is not allowed.*valid: float, int8"),
        ({"sensitivity_samples": 0}, r"BudgetConfig\.sensitivity_samples=0 is not allowed; use an integer >= 1"),
        ({"latency_runs": 2.5}, r"BudgetConfig\.latency_runs=2\.5 is not allowed; expected an integer"),
        ({"measure_latency": "no"}, r"BudgetConfig\.measure_latency='no' is not allowed; expected true or false"),
        ({"max_accuracy_drop": 0.01, "budget": 1}, r"unknown BudgetConfig field 'budget'"),
    ],
)
def test_a_bad_budget_config_value_names_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        BudgetConfig.from_dict(fields)


def test_budget_verb_refuses_a_wrong_config_type_or_settings_beside_the_config(digits_model):
    model, train, val = digits_model
    with pytest.raises(ConfigError, match=r"quantize_with_budget\(\) needs a BudgetConfig, got PruneConfig"):
        quantize_with_budget(model, PruneConfig(), data=(train, val))
    with pytest.raises(ConfigError, match=r"search belong in the BudgetConfig"):
        quantize_with_budget(model, BudgetConfig(), data=(train, val), search="bisect")
    with pytest.raises(ConfigError, match="needs max_accuracy_drop="):
        quantize_with_budget(model, W8, calib=train, data=val)
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_drop'"):
        quantize_with_budget(model, W8, data=(train, val), max_drop=0.01)
    with pytest.raises(ConfigError, match="calibration data given twice"):
        with pytest.warns(DeprecationWarning):
            quantize_with_budget(model, BudgetConfig(), calib=train, data=(train, val))
    with pytest.raises(DataError, match=r"needs data: pass data=\(calib, score\)"):
        quantize_with_budget(model, BudgetConfig())
    with pytest.raises(ConfigError, match="sensitivity expects a QuantConfig, got BudgetConfig"):
        sensitivity(model, BudgetConfig(), data=(train, val))


def test_the_deprecated_call_warns_and_gives_what_the_new_call_gives(fragile):
    m, train, val = fragile
    with pytest.warns(DeprecationWarning, match=r"deprecated; use quantize_with_budget\(model, BudgetConfig\(") as w:
        old = quantize_with_budget(
            m, W4, calib=train, data=val, max_accuracy_drop=0.05, search="bisect", sensitivity_samples=150
        )
    assert len(w) == 1 and w[0].filename == __file__  # one warning, pointing at the caller's line
    new = quantize_with_budget(
        m, BudgetConfig(max_accuracy_drop=0.05, quant=W4, search="bisect", sensitivity_samples=150), data=(train, val)
    )
    assert old.met and old.kept_float and old.kept_float == new.kept_float
    assert old.sensitivity.ranking == new.sensitivity.ranking and old.sensitivity.samples == 150
    assert [(s.n_float, s.metric, s.drop) for s in old.steps] == [(s.n_float, s.metric, s.drop) for s in new.steps]
    assert old.model.config == new.model.config
    x = val.normalized()[:128]
    with torch.no_grad():
        assert torch.equal(old.model(x), new.model(x))
    msg = r"sensitivity\(.*calib=.*deprecated.*data=\(calib, score_data\)"
    with pytest.warns(DeprecationWarning, match=msg) as w:
        rep_old = sensitivity(m, W4, calib=train, data=val, samples=150)
    assert w[-1].filename == __file__
    rep_new = sensitivity(m, W4, data=(train, val), samples=150)
    assert rep_old.layers == rep_new.layers


def test_one_dataset_as_data_calibrates_and_scores_on_it(fragile, caplog):
    m, train, val = fragile
    with caplog.at_level(logging.INFO, logger="edgeslim.quantize._sensitivity"):
        one = sensitivity(m, W4, data=val, samples=150)
    assert "one dataset given as data=: calibrating on it and scoring on it too" in caplog.text
    both = sensitivity(m, W4, data=(val, val), samples=150)
    assert one.layers == both.layers
    other = sensitivity(m, W4, data=(train, val), samples=150)  # calibrated on other data: other ranges
    assert {r.layer: r.sqnr_db for r in other.layers} != {r.layer: r.sqnr_db for r in one.layers}

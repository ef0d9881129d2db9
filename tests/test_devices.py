"""Device profiles, roofline latency/energy/memory predictions and operator pre-flight (tiny models)."""

import numpy as np
import pytest
import torch
from tiny import TinyCNN, TinyMLP

from edgeslim.core.artifact import Artifact
from edgeslim.core.errors import ConfigError, ModelError
from edgeslim.devices import (calibrate, device_names, estimate_energy, get_device, graph_cost, load_profile,
                              measure_energy, memory_fit, predict_latency, preflight)
from edgeslim.runtime import latency, load, onnx_macs

REQUIRED_DEVICES = {"host", "raspberry-pi-4", "pixel-class-phone", "jetson-orin-nano", "coral-edgetpu",
                    "apple-ane-class"}


def _export(model, path, x):
    torch.onnx.export(model.eval(), x, str(path), dynamo=False, opset_version=17, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return Artifact(path, "onnx", "fp32", tuple(x.shape[1:]))


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    d = tmp_path_factory.mktemp("dev")
    torch.manual_seed(0)
    cnn = _export(TinyCNN(), d / "cnn.onnx", TinyCNN.example_inputs(1))
    mlp = _export(TinyMLP(), d / "mlp.onnx", TinyMLP.example_inputs(1))
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": TinyCNN.example_inputs(4).numpy()}])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(cnn.path), str(d / "cnn_int8.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    return {"cnn": cnn, "mlp": mlp, "cnn_int8": Artifact(d / "cnn_int8.onnx", "onnx", "int8", (1, 8, 8))}


def test_all_profiles_load_with_sources_for_every_number():
    assert REQUIRED_DEVICES <= set(device_names())
    for name in device_names():
        dev = get_device(name)
        assert dev.name == name and dev.peak_gops and dev.mem_bandwidth_gbs > 0 and dev.ram_mb > 0
        for f in ("peak_gops", "mem_bandwidth_gbs", "ram_mb", "tdp_w"):
            assert f in dev.sources and dev.sources[f], (name, f)
    assert get_device("coral-edgetpu").precisions == ("int8",)
    host = get_device("host")
    assert host.measured and host.sources["peak_gops"].startswith("measured")


def test_unknown_device_lists_valid_ones():
    with pytest.raises(ConfigError, match="unknown device 'raspbery-pi-4'.*did you mean 'raspberry-pi-4'.*valid:"):
        get_device("raspbery-pi-4")


def test_profile_missing_or_bad_field_names_file_and_field(tmp_path):
    import yaml

    from edgeslim.devices._profile import _profiles_dir

    data = yaml.safe_load((_profiles_dir() / "raspberry-pi-4.yaml").read_text())
    del data["device"]["mem_bandwidth_gbs"]
    p = tmp_path / "broken.yaml"
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"broken\.yaml.*missing field 'mem_bandwidth_gbs'"):
        load_profile(p)
    data = yaml.safe_load((_profiles_dir() / "raspberry-pi-4.yaml").read_text())
    data["device"]["precisions"] = ["int3"]
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"broken\.yaml.*precisions"):
        load_profile(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_profile(tmp_path / "nope.yaml")


def test_graph_cost_macs_match_static_count_and_int8_moves_fewer_bytes(arts):
    fp, q = graph_cost(arts["cnn"]), graph_cost(arts["cnn_int8"])
    assert fp.macs == onnx_macs(arts["cnn"].path) > 0
    assert q.macs == fp.macs
    assert set(fp.macs_by_precision()) == {"fp32"}
    assert q.macs_by_precision().get("int8", 0) >= 0.9 * q.macs  # the convs read DequantizeLinear outputs
    assert q.bytes < 0.6 * fp.bytes
    assert fp.peak_activation_bytes >= 2 * 8 * 8 * 8 * 4  # two live 8x8x8 fp32 maps around the residual add


def test_predictions_are_labelled_and_faster_devices_predict_less(arts):
    rpi = predict_latency(arts["cnn"], "raspberry-pi-4")
    assert rpi["label"] == "predicted for raspberry-pi-4" and rpi["latency_ms"] > 0
    assert abs(sum(layer["ms"] for layer in rpi["layers"]) - rpi["latency_ms"]) < 1e-9
    big = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(64, 64, 3))
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as td:
        return_art = _export(big, Path(td) / "big.onnx", torch.randn(1, 3, 64, 64))
        t = {d: predict_latency(return_art, d)["latency_ms"] for d in ("raspberry-pi-4", "pixel-class-phone",
                                                                         "jetson-orin-nano")}
    assert t["raspberry-pi-4"] > t["pixel-class-phone"] > t["jetson-orin-nano"]


def test_calibration_on_host_reduces_error(arts):
    samples = []
    x = TinyCNN.example_inputs(1).numpy()
    for label, art in arts.items():
        ms = latency(load(art, "onnxruntime", threads=1), x, warmup=20, runs=200, max_seconds=2)["min_ms"]
        samples.append((label, art, ms))
    cal = calibrate(samples, "host")
    assert set(cal.error_pct) == set(arts)
    uncal = [abs(predict_latency(a, "host")["latency_ms"] - ms) / ms * 100 for _, a, ms in samples]
    # a shared, loaded host makes timings noisy: bounds leave room for it but still fail on a broken fit
    assert cal.median_abs_error_pct < 60
    assert cal.median_abs_error_pct <= np.median(uncal) + 10
    assert 0 < cal.efficiency["fp32"] <= 1 and cal.overhead_s >= 0 and cal.bandwidth_factor > 0
    with pytest.raises(ConfigError, match="at least one"):
        calibrate([])
    with pytest.raises(ConfigError, match="measured latency"):
        calibrate([("x", arts["cnn"], 0.0)])


def test_energy_int8_below_fp32_and_cites_horowitz(arts):
    for dev in ("raspberry-pi-4", "pixel-class-phone", "host"):
        fp, q = estimate_energy(arts["cnn"], dev), estimate_energy(arts["cnn_int8"], dev)
        assert 0 < q["energy_mj"] < fp["energy_mj"]
        assert "Horowitz" in fp["source"] and "assumption" in fp["assumption"]
        assert fp["label"].startswith("estimated")
    r = measure_energy(lambda: None, runs=2)
    assert r["label"].startswith("measured") or "not readable" in r["label"]


def test_memory_fit_flags_models_that_do_not_fit(arts, tmp_path):
    fit = memory_fit(arts["cnn"], "raspberry-pi-4")
    assert fit["fits"] and fit["weights_mb"] > 0
    big = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 200_000))
    art = _export(big, tmp_path / "wide.onnx", torch.randn(1, 1, 8, 8))  # ~49 MB of fp32 weights
    coral = memory_fit(art, "coral-edgetpu")
    assert coral["weights_mb"] > 8 and not coral["fits"]
    assert memory_fit(art, "raspberry-pi-4")["fits"]


def test_preflight_names_unsupported_ops_and_fallback(arts):
    assert preflight(arts["cnn"], "raspberry-pi-4").fully_runs
    p = preflight(arts["cnn"], "coral-edgetpu")  # float model on an INT8-only device
    assert not p.fully_runs and "Conv" in p.unsupported and "full-integer" in str(p)
    assert "fallback: host CPU" in str(p) and "fully runs: no" in str(p)
    q = preflight(arts["cnn_int8"], "coral-edgetpu")
    assert "Conv" not in q.unsupported and not q.reasons
    with pytest.raises(ConfigError, match="unknown device"):
        preflight(arts["cnn"], "tpu-v9")


def test_unreadable_artifact_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(ModelError, match="cannot read ONNX model"):
        graph_cost(bad)


def test_sweep_and_best_setting_for_a_p99_budget(arts):
    from edgeslim.runtime._tune import best_for_budget, sweep

    rows = sweep(arts["cnn"], threads=(1, 2), batch_sizes=(1, 8), runs=20, max_seconds=0.5)
    assert [(r["threads"], r["batch"]) for r in rows] == [(1, 1), (1, 8), (2, 1), (2, 8)]
    assert all(r["p99_ms"] >= r["p50_ms"] > 0 for r in rows)
    budget = max(r["p99_ms"] for r in rows) + 1
    best = best_for_budget(rows, budget)
    assert best["throughput_ips"] == max(r["throughput_ips"] for r in rows)
    tight = min(r["p99_ms"] for r in rows)
    assert best_for_budget(rows, tight)["p99_ms"] <= tight
    with pytest.raises(ConfigError, match="no setting meets p99"):
        best_for_budget(rows, tight / 1000)
    with pytest.raises(ConfigError, match="threads"):
        sweep(arts["cnn"], threads=(0,), batch_sizes=(1,))


def test_fusion_check_counts_conv_bn_relu_before_and_after_ort(arts, tmp_path):
    from edgeslim.runtime._tune import fusion_check

    torch.manual_seed(0)
    model = TinyCNN().eval()
    x = TinyCNN.example_inputs(1)
    torch.onnx.export(model, x, str(tmp_path / "unfolded.onnx"), dynamo=False, opset_version=17,
                      training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False,
                      input_names=["input"], output_names=["logits"])  # keeps BatchNormalization nodes
    unfolded = fusion_check(tmp_path / "unfolded.onnx")
    assert unfolded["exported"]["BatchNormalization"] == 3 and unfolded["exported"]["Conv"] == 3
    r = fusion_check(arts["cnn"])
    assert r["exported"]["BatchNormalization"] == 0 and r["exported"]["Conv"] == 3  # BN folded by the exporter
    assert r["exported"]["Clip"] == 2
    assert r["optimized"]["BatchNormalization"] == 0 and r["folded"]
    assert r["optimized"]["FusedConv"] >= 2 and r["optimized_nodes"] < r["exported_nodes"]


def test_cli_measure_device_prints_predicted_figures(arts, capsys):
    import json

    from edgeslim.cli import main

    assert main(["measure", str(arts["cnn"].path), "--no-data", "--runs", "5", "--device", "raspberry-pi-4",
                 "--device", "coral-edgetpu", "--json"]) == 0
    figs = json.loads(capsys.readouterr().out)["figures"]
    assert figs["predicted_latency_ms@raspberry-pi-4"]["value"] > 0
    assert figs["predicted_latency_ms@raspberry-pi-4"]["source"].startswith("predicted for raspberry-pi-4")
    assert figs["fully_runs@coral-edgetpu"]["value"] == 0.0 and "Conv" in figs["fully_runs@coral-edgetpu"]["detail"]
    assert "latency_p50_ms@t1b1" in figs  # the measured host figures are still there
    assert main(["measure", str(arts["cnn"].path), "--no-data", "--runs", "5", "--device", "rpi5"]) != 0
    assert "unknown device 'rpi5'" in capsys.readouterr().err

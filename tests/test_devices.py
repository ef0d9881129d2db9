"""Device profiles, roofline latency/energy/memory predictions and operator pre-flight (tiny models)."""

import numpy as np
import pytest
import torch
from tiny import TinyCNN, TinyMLP

from edgeslim.core.artifact import Artifact
from edgeslim.core.errors import ConfigError, ModelError
from edgeslim.devices import (
    DEFAULT_CALIBRATION,
    calibrate,
    device_names,
    estimate_energy,
    get_device,
    graph_cost,
    load_profile,
    measure_energy,
    memory_fit,
    predict_latency,
    preflight,
)
from edgeslim.runtime import latency, load, onnx_macs

REQUIRED_DEVICES = {
    "host",
    "raspberry-pi-4",
    "pixel-class-phone",
    "jetson-orin-nano",
    "coral-edgetpu",
    "apple-ane-class",
}


def _export(model, path, x):
    torch.onnx.export(
        model.eval(),
        x,
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
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

    quantize_static(
        str(cnn.path),
        str(d / "cnn_int8.onnx"),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
    )
    return {"cnn": cnn, "mlp": mlp, "cnn_int8": Artifact(d / "cnn_int8.onnx", "onnx", "int8", (1, 8, 8))}


def test_all_profiles_load_with_sources_for_every_number():
    assert set(device_names()) >= REQUIRED_DEVICES
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


def test_executed_graph_cost_sees_ort_fusion_and_costs_unfused_qdq(arts):
    fp, fp_run = graph_cost(arts["cnn"]), graph_cost(arts["cnn"], as_run_by="onnxruntime")
    assert fp_run.macs == fp.macs  # same arithmetic, whatever ORT fused
    assert len(fp_run.nodes) < len(fp.nodes)  # Conv+Relu fused into one kernel
    assert "FusedConv" in {n.op_type for n in fp_run.nodes}
    q, q_run = graph_cost(arts["cnn_int8"]), graph_cost(arts["cnn_int8"], as_run_by="onnxruntime")
    assert q_run.macs == q.macs and q.macs_by_precision().get("int8", 0) >= 0.9 * q.macs
    ops = {n.op_type for n in q_run.nodes}
    assert any(op.startswith(("QLinear", "QGemm")) for op in ops)  # QDQ groups ORT turned into integer kernels
    assert "QuantizeLinear" in ops  # ... and the Q/DQ it left (s8 activations here) are real kernels, costed
    # what ORT left unfused runs in float, though it reads DequantizeLinear outputs; the integer kernels are int8
    prec = {n.op_type: n.precision for n in q_run.nodes}
    assert all(p == "fp32" for op, p in prec.items() if op in ("Conv", "Add", "Relu"))
    assert all(p == "int8" for op, p in prec.items() if op.startswith(("QLinear", "QGemm")))
    assert not {n.op_type for n in q.nodes} & {"QuantizeLinear", "DequantizeLinear"}  # exported graph: folded
    with pytest.raises(ConfigError, match="as_run_by='tflite'.*onnxruntime"):
        graph_cost(arts["cnn"], as_run_by="tflite")


def test_predictions_are_labelled_and_faster_devices_predict_less(arts):
    rpi = predict_latency(arts["cnn"], "raspberry-pi-4")
    assert rpi["label"] == "predicted for raspberry-pi-4" and rpi["latency_ms"] > 0
    assert abs(sum(layer["ms"] for layer in rpi["layers"]) + rpi["call_overhead_ms"] - rpi["latency_ms"]) < 1e-9
    big = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(64, 64, 3))
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as td:
        return_art = _export(big, Path(td) / "big.onnx", torch.randn(1, 3, 64, 64))
        t = {
            d: predict_latency(return_art, d)["latency_ms"]
            for d in ("raspberry-pi-4", "pixel-class-phone", "jetson-orin-nano")
        }
    assert t["raspberry-pi-4"] > t["pixel-class-phone"] > t["jetson-orin-nano"]


class _Family(torch.nn.Module):
    """Tiny conv nets of varied width/depth/kind (dense, depthwise-separable) used as calibration points."""

    def __init__(self, width: int, depth: int, separable: bool):
        super().__init__()
        layers, c = [torch.nn.Conv2d(3, width, 3, padding=1), torch.nn.ReLU()], width
        for _ in range(depth):
            if separable:
                layers += [torch.nn.Conv2d(c, c, 3, padding=1, groups=c), torch.nn.ReLU(), torch.nn.Conv2d(c, c, 1)]
            else:
                layers += [torch.nn.Conv2d(c, c, 3, padding=1)]
            layers += [torch.nn.ReLU()]
        self.body = torch.nn.Sequential(
            *layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(c, 10)
        )

    def forward(self, x):
        return self.body(x)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    d = tmp_path_factory.mktemp("family")
    torch.manual_seed(0)
    x = torch.randn(1, 3, 24, 24)
    out = {}
    for w, depth, sep in [
        (8, 1, False),
        (16, 2, False),
        (32, 3, False),
        (48, 4, False),
        (16, 3, True),
        (32, 4, True),
        (64, 6, True),
        (24, 2, True),
    ]:
        out[f"w{w}d{depth}{'s' if sep else ''}"] = _export(_Family(w, depth, sep), d / f"f{w}_{depth}_{sep}.onnx", x)
    return out, x.numpy()


def test_op_classes_are_assigned(family):
    arts, _ = family
    classes = {n.op_class for n in graph_cost(arts["w16d3s"]).nodes}
    assert {"conv", "dwconv", "conv1x1", "gemm", "pool"} <= classes
    assert {n.op_class for n in graph_cost(arts["w8d1"]).nodes if n.macs} == {"conv", "gemm"}


def test_calibrate_recovers_known_parameters_exactly(family):
    # no timing: "measured" latencies come from a known ground-truth calibration; the fit must reproduce held-out
    # models it never saw (checks the features, the max() resolution and the solver, not the host)
    import dataclasses

    arts, _ = family
    host = get_device("raspberry-pi-4")  # a fixed profile: no load-time measurement, fully deterministic
    truth = dataclasses.replace(
        DEFAULT_CALIBRATION,
        efficiency={
            **DEFAULT_CALIBRATION.efficiency,
            "fp32/conv": 0.6,
            "fp32/dwconv": 0.08,
            "fp32/conv1x1": 0.3,
            "fp32/gemm": 0.2,
        },
        overhead_s={**DEFAULT_CALIBRATION.overhead_s, "fp32/compute": 3e-6, "fp32/light": 1e-6},
        call_overhead_s=30e-6,
    )
    costs = {k: graph_cost(a) for k, a in arts.items()}
    ms = {k: predict_latency(None, host, truth, cost=c)["latency_ms"] for k, c in costs.items()}
    train = [k for k in costs if k not in ("w48d4", "w64d6s")]
    cal = calibrate([(k, costs[k], ms[k]) for k in train], host, prior_weight=1e-6)
    for k in ("w48d4", "w64d6s"):
        pred = predict_latency(None, host, cal, cost=costs[k])["latency_ms"]
        assert abs(pred - ms[k]) / ms[k] < 0.2, (k, pred, ms[k])  # 8 fp32 parameters from 6 models
    unc = [abs(predict_latency(None, host, cost=costs[k])["latency_ms"] - ms[k]) / ms[k] for k in ("w48d4", "w64d6s")]
    assert max(unc) > 0.15, unc  # the check means something: the uncalibrated prior is off on at least one


def test_calibration_on_measured_points_reduces_held_out_error(family, arts):
    # real host timings (min over runs: robust on a loaded machine); calibrate on 5 models, judge on 3 held out.
    # Bounds are loose on purpose (a shared 2-core CI host): the fit only has to beat the uncalibrated roofline.
    fam, x = family
    measured = {
        k: latency(load(a, "onnxruntime", threads=1), x, warmup=10, runs=100, max_seconds=1)["min_ms"]
        for k, a in fam.items()
    }
    held = ["w32d3", "w16d3s", "w64d6s"]
    cal = calibrate([(k, fam[k], ms) for k, ms in measured.items() if k not in held], "host")
    assert set(cal.error_pct) == set(measured) - set(held)

    def err(c):
        return np.median(
            [abs(predict_latency(fam[k], "host", c)["latency_ms"] - measured[k]) / measured[k] * 100 for k in held]
        )

    # the fit must at least halve the uncalibrated roofline's held-out error. The absolute level is host-dependent:
    # 20-50% on the AVX2 host this was written on, ~80% on an AVX-512 VNNI host whose tiny-model timings are
    # launch-bound (uncalibrated there: ~370%); benchmarks/hw_predict.py reports the real leave-one-model-out error.
    assert err(cal) < 0.5 * err(None) and err(cal) < 100
    assert all(0 < v <= 1 for v in cal.efficiency.values()) and cal.call_overhead_s >= 0
    assert all(v >= 0 for v in cal.overhead_s.values()) and all(v > 0 for v in cal.bandwidth_factor.values())
    one = calibrate([("cnn", arts["cnn"], 0.05)], "host")  # one sample: the prior keeps it well-posed
    assert np.isfinite(one.median_abs_error_pct) and abs(one.error_pct["cnn"]) < 50
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
    torch.onnx.export(
        model,
        x,
        str(tmp_path / "unfolded.onnx"),
        dynamo=False,
        opset_version=17,
        training=torch.onnx.TrainingMode.TRAINING,
        do_constant_folding=False,
        input_names=["input"],
        output_names=["logits"],
    )  # keeps BatchNormalization nodes
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

    assert (
        main(
            [
                "measure",
                str(arts["cnn"].path),
                "--no-data",
                "--runs",
                "5",
                "--device",
                "raspberry-pi-4",
                "--device",
                "coral-edgetpu",
                "--json",
            ]
        )
        == 0
    )
    figs = json.loads(capsys.readouterr().out)["figures"]
    assert figs["predicted_latency_ms@raspberry-pi-4"]["value"] > 0
    assert figs["predicted_latency_ms@raspberry-pi-4"]["source"].startswith("predicted for raspberry-pi-4")
    assert figs["fully_runs@coral-edgetpu"]["value"] == 0.0 and "Conv" in figs["fully_runs@coral-edgetpu"]["detail"]
    assert "latency_p50_ms@t1b1" in figs  # the measured host figures are still there
    assert main(["measure", str(arts["cnn"].path), "--no-data", "--runs", "5", "--device", "rpi5"]) != 0
    assert "unknown device 'rpi5'" in capsys.readouterr().err

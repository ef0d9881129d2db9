import time

import numpy as np
import pytest
import torch
from tiny import TinyCNN, TinyMLP
from torch.utils.flop_counter import FlopCounterMode

from edgeslim.core.artifact import Artifact
from edgeslim.core.errors import ConfigError, RuntimeBackendError
from edgeslim.data import ImageDataset
from edgeslim.runtime import (
    RUNTIMES,
    interleaved_latency,
    latency,
    load,
    measure,
    onnx_macs,
    onnx_params,
    optimized_op_types,
)


def export(model, path, dynamic=True):
    torch.onnx.export(
        model.eval(),
        TinyCNN.example_inputs(1),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic else None,
    )
    return Artifact(path, "onnx", "fp32", (1, 8, 8))


def dataset(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    return ImageDataset("rand", "val", images, labels, tuple(str(i) for i in range(10)), (0.5,), (0.25,))


def flop_macs(model):
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model.eval()(TinyCNN.example_inputs(1))
    return fc.get_total_flops() // 2


@pytest.fixture
def cnn(tmp_path):
    torch.manual_seed(0)
    model = TinyCNN().eval()
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):  # distinct folded biases
        bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2), bn.bias.data.uniform_(-0.5, 0.5)
    return model, export(model, tmp_path / "cnn.onnx")


def test_onnxruntime_matches_torch_and_threads_are_restored(cnn):
    model, art = cnn
    x = TinyCNN.example_inputs(4).numpy()
    before = torch.get_num_threads()
    ort_y, torch_y = load(art, "onnxruntime").run(x), load(model, "torch", threads=1).run(x)
    assert ort_y.shape == (4, 10) and np.abs(ort_y - torch_y).max() < 1e-4
    assert torch.get_num_threads() == before
    assert load(str(art.path), threads=2).run(x).shape == (4, 10)  # a plain path works too
    assert {"onnxruntime", "torch"} <= set(RUNTIMES.names())  # the optional runtimes: tests/test_runtimes.py


def test_measure_reports_every_figure_with_its_source(cnn):
    _, art = cnn
    m = measure(art, data=dataset(40), threads=(1, 2), batch_sizes=(1, 4), runs=15, warmup=2, peak_memory=False)
    names = ["size_bytes", "size_zipped_bytes", "params", "macs", "accuracy"] + [
        f"{k}@t{t}b{b}"
        for t in (1, 2)
        for b in (1, 4)
        for k in ("latency_p50_ms", "latency_p90_ms", "latency_p99_ms", "throughput_ips")
    ]
    assert set(names) <= set(m.figures)
    for n in names:
        f = m.figures[n]
        assert f.value > 0 and f.unit and f.source in ("measured", "computed") and f.detail, n
    for t in (1, 2):
        for b in (1, 4):
            assert m[f"latency_p50_ms@t{t}b{b}"] <= m[f"latency_p90_ms@t{t}b{b}"] <= m[f"latency_p99_ms@t{t}b{b}"]
            d = m.figures[f"latency_p50_ms@t{t}b{b}"].detail
            assert f"onnxruntime {m.context['runtime_version']}" in d and f"{t} thread" in d
            assert f"batch {b}" in d and "15 runs" in d and m.context["host"]["cpu"] in d
    assert m["size_bytes"] == art.size_bytes and m["size_zipped_bytes"] < m["size_bytes"]
    assert m.context["host"]["cores"] >= 1 and m.label == "cnn.onnx"


def test_accuracy_equals_hand_computed(cnn):
    model, art = cnn
    ds = dataset(300)  # two batches of 256
    y = ds.labels.numpy()
    ort_pred = load(art).run(ds.normalized().numpy()).argmax(1)
    with torch.no_grad():
        torch_pred = model(ds.normalized()).argmax(1).numpy()
    assert measure(art, data=ds, runs=2, warmup=0, peak_memory=False)["accuracy"] == (ort_pred == y).mean()
    m = measure(model, data=ds, runs=2, warmup=0, peak_memory=False)
    assert m["accuracy"] == (torch_pred == y).mean() and "torch" in m.figures["accuracy"].detail
    sub = measure(art, data=ds, runs=2, warmup=0, peak_memory=False, accuracy_samples=10)
    assert "10 samples" in sub.figures["accuracy"].detail and round(sub["accuracy"] * 10, 6) % 1 == 0


def test_static_macs_and_params(cnn, tmp_path):
    model, art = cnn
    assert onnx_macs(art.path) == flop_macs(model) > 0
    mlp = TinyMLP()
    mlp_art = export(mlp, tmp_path / "mlp.onnx")
    assert onnx_macs(mlp_art.path) == flop_macs(mlp)
    assert onnx_params(mlp_art.path) == sum(p.numel() for p in mlp.parameters())
    m = measure(art, runs=2, warmup=0, peak_memory=False)  # no meta["macs"]: the static count is used
    assert m["macs"] == flop_macs(model) and "shape inference" in m.figures["macs"].detail
    art.meta["macs"] = 123
    assert measure(art, runs=2, warmup=0, peak_memory=False)["macs"] == 123


def test_measure_torch_module_leaves_it_unchanged():
    model = TinyCNN().train()
    before = torch.get_num_threads()
    m = measure(model, input_shape=(1, 8, 8), threads=(1,), runs=3, warmup=1, peak_memory=False)
    assert model.training and torch.get_num_threads() == before
    assert m["macs"] == flop_macs(TinyCNN()) and m["params"] == sum(p.numel() for p in model.parameters())
    assert "torch " + torch.__version__ in m.figures["latency_p50_ms@t1b1"].detail


def test_int8_kernels_are_visible_and_scales_are_not_params(cnn, tmp_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize_static

    _, art = cnn
    xs = [{"input": x[None].numpy()} for x in dataset(16).normalized()]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(xs)

        def get_next(self):
            return next(self.it, None)

    q = tmp_path / "int8.onnx"
    quantize_static(str(art.path), str(q), Reader(), activation_type=QuantType.QUInt8, per_channel=True)
    ops = optimized_op_types(q)
    assert ops["QLinearConv"] >= 2 and "Conv" not in ops
    assert onnx_params(q) == onnx_params(art.path)


def test_errors_are_clear(cnn, tmp_path):
    model, art = cnn
    with pytest.raises(ConfigError, match="onnxruntime"):
        measure(art, runtime="tensorrt-nope")
    with pytest.raises(RuntimeBackendError, match="export"):
        measure(model, runtime="onnxruntime")
    with pytest.raises(RuntimeBackendError, match="'onnx'"):
        load(art, "torch")
    with pytest.raises(RuntimeBackendError, match="'tflite'"):
        load(Artifact(tmp_path / "m.tflite", "tflite", "fp32", (1, 8, 8)))
    with pytest.raises(ConfigError, match="threads"):
        measure(art, threads=(0,))
    fixed = export(model, tmp_path / "fixed.onnx", dynamic=False)
    with pytest.raises(RuntimeBackendError, match="fixed at 1"):
        measure(fixed, batch_sizes=(1, 4), peak_memory=False)


def test_latency_is_bounded_by_runs_and_time():
    lat = latency(lambda x: None, np.zeros(1), runs=50, warmup=3)
    assert lat["runs"] == 50 and lat["warmup_runs"] == 3 and lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"]
    t0 = time.perf_counter()
    lat = latency(lambda x: time.sleep(0.01), np.zeros(1), runs=1000, warmup=0, max_seconds=0.1)
    assert 1 <= lat["runs"] < 30 and time.perf_counter() - t0 < 1 and lat["p50_ms"] >= 10
    with pytest.raises(ConfigError, match="runs"):
        latency(lambda x: None, np.zeros(1), runs=0)


def test_interleaved_latency_takes_turns_and_reports_each_runner(cnn):
    calls: list[str] = []

    def sleeper(label, ms):
        def run():
            calls.append(label)
            time.sleep(ms / 1e3)

        return run

    res = interleaved_latency(
        {"slow": sleeper("slow", 4), "fast": sleeper("fast", 1)}, rounds=3, runs=2, warmup=1, rewarm=0
    )
    # one warm-up each, then every round runs each runner's whole turn before the next runner's
    assert calls == ["slow", "fast"] + ["slow", "slow", "fast", "fast"] * 3
    assert res["slow"]["runs"] == res["fast"]["runs"] == 6 and len(res["slow"]["round_p50_ms"]) == 3
    assert res["fast"]["p50_ms"] >= 1 and res["slow"]["median_of_rounds_ms"] >= 4 > res["fast"]["min_ms"]
    assert res["slow"]["min_ms"] <= res["slow"]["p50_ms"] <= res["slow"]["p90_ms"] <= res["slow"]["p99_ms"]
    calls.clear()
    interleaved_latency({k: sleeper(k, 0) for k in "abcd"}, rounds=4, runs=1, warmup=0, rewarm=0, shuffle=True)
    orders = [calls[i : i + 4] for i in range(0, 16, 4)]
    assert all(sorted(o) == list("abcd") for o in orders) and len({tuple(o) for o in orders}) > 1
    calls.clear()
    turn = interleaved_latency(
        {"s": sleeper("s", 5)}, rounds=1, runs=100, warmup=0, rewarm=0, max_seconds_per_turn=0.02, min_runs=2
    )
    assert 2 <= turn["s"]["runs"] < 100  # the turn ended on time, after at least min_runs
    runner = load(cnn[1], "onnxruntime")  # a Runner gets x
    out = interleaved_latency({"ort": runner}, TinyCNN.example_inputs(1).numpy(), rounds=2, runs=3)
    assert out["ort"]["runs"] == 6
    with pytest.raises(ConfigError, match="rounds"):
        interleaved_latency({"ort": runner}, rounds=0)


def test_peak_memory_is_measured_in_a_child_process(cnn):
    _, art = cnn
    m = measure(art, runs=2, warmup=0)
    assert m["peak_memory_mb"] > 0 and "child process" in m.figures["peak_memory_mb"].detail


def test_a_model_with_two_inputs_is_refused_with_their_names(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from edgeslim.core.errors import RuntimeBackendError

    g = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])],
        "two",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4]) for n in ("a", "b")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    p = tmp_path / "two.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(p))
    with pytest.raises(
        RuntimeBackendError,
        match=r"two\.onnx' has 2 inputs \(a, b\); edgeslim runners take models "
        "with exactly one input",
    ):
        load(str(p), "onnxruntime")

"""The optional runtimes (openvino, litert, executorch) behind the one runner interface, and their exports.

Tests of a runtime whose extra is not installed are skipped with the pip line that installs it. To run them all
(verified beside torch 2.14.1, numpy 2.4.6, onnx 1.23.2, onnxruntime 1.32.0, none of which these replace):

    pip install openvino==2026.4.1 ai-edge-litert==2.3.0 executorch==1.5.1
    pip install --no-deps litert-torch==0.10.0 ai-edge-quantizer==0.10.0 litert-converter==0.5.0 \
        litert-lm-builder==0.18.1 xdsl==0.28.0 absl-py==2.5.1 jax==0.10.2 jaxlib==0.10.2 jaxtyping==0.3.11 \
        wadler_lindig==0.1.8 fire==0.7.1 termcolor==3.3.0 immutabledict==4.2.1 kagglehub==1.0.3 kagglesdk==0.1.38 \
        lark==1.3.1 multipledispatch==1.0.0 opt_einsum==3.4.0 ordered-set==4.1.0 tomli==2.5.0

(--no-deps: litert-torch's xdsl pins typing-extensions<4.13, which would downgrade pydantic and anyio.)
"""

import importlib
import sys

import numpy as np
import pytest
import torch
from tiny import TinyCNN

import edgeslim as es
from edgeslim.core.artifact import Artifact
from edgeslim.core.errors import ConfigError, DataError, RuntimeBackendError
from edgeslim.runtime import RUNTIMES, compare_runtimes, load, missing
from edgeslim.runtime._compare import _outputs

# runtime -> (export format, file suffix, module the runtime needs, module its export needs, extra)
EDGE = {
    "openvino": ("openvino", ".xml", "openvino", "openvino", "openvino"),
    "litert": ("tflite", ".tflite", "ai_edge_litert.interpreter", "litert_torch", "litert"),
    "executorch": ("executorch", ".pte", "executorch.runtime", "executorch.exir", "executorch"),
}


def need(module, extra):
    try:
        importlib.import_module(module)
    except ImportError:
        pytest.skip(f"needs {module.split('.')[0]}: pip install 'edgeslim[{extra}]'")


@pytest.fixture(scope="module")
def digits():
    """TinyCNN (1x8x8) trained briefly on scikit-learn digits: (model, train, val)."""
    from edgeslim.train import TrainConfig, fit

    train, val = es.data.load("digits")
    torch.manual_seed(0)
    res = fit(
        TinyCNN(),
        train,
        val,
        TrainConfig(epochs=3, lr=0.1, batch_size=32, augment=False, warmup_steps=20),
        progress=False,
    )
    return res.model.eval(), train, val.take(128, seed=0)


@pytest.fixture(scope="module")
def onnx_fp32(digits, tmp_path_factory):
    model, _, val = digits
    return es.export(model, "onnx", example_inputs=val, path=tmp_path_factory.mktemp("onnx") / "tiny.onnx")


def torch_out(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def test_runtime_and_export_imports_stay_light():
    import subprocess

    code = (
        "import sys, edgeslim, edgeslim.runtime, edgeslim.export; heavy = [m for m in ('openvino', "
        "'ai_edge_litert', 'litert_torch', 'executorch', 'jax', 'torchao') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"importing edgeslim.runtime/export pulled in: {out}"


def test_every_edge_runtime_is_registered():
    assert {"onnxruntime", "torch", "openvino", "litert", "executorch"} <= set(RUNTIMES.names())


def test_unknown_runtime_lists_the_valid_ones(onnx_fp32):
    with pytest.raises(ConfigError) as e:
        load(onnx_fp32, "tensorrt")
    for name in ("executorch", "litert", "onnxruntime", "openvino", "torch"):
        assert name in str(e.value)


@pytest.mark.parametrize("runtime", ["litert", "executorch"])
def test_wrong_artifact_format_names_file_format_and_allowed(runtime, onnx_fp32):
    with pytest.raises(RuntimeBackendError) as e:
        load(onnx_fp32, runtime)
    msg = str(e.value)
    assert onnx_fp32.path.name in msg and "'onnx'" in msg and EDGE[runtime][0] in msg and EDGE[runtime][1] in msg


def test_openvino_refuses_a_tflite_file_and_a_torch_module(tmp_path):
    f = tmp_path / "m.tflite"
    f.write_bytes(b"\0")
    with pytest.raises(RuntimeBackendError, match=r"m\.tflite.*'tflite'.*'onnx' \(\.onnx\); 'openvino' \(\.xml\)"):
        load(f, "openvino")
    with pytest.raises(RuntimeBackendError, match="not a torch module"):
        load(TinyCNN(), "openvino")


@pytest.mark.parametrize("runtime", ["openvino", "litert", "executorch"])
def test_missing_package_names_the_extra(runtime, onnx_fp32, tmp_path, monkeypatch):
    fmt, sfx, module, _, extra = EDGE[runtime]
    f = onnx_fp32.path if runtime == "openvino" else tmp_path / f"m{sfx}"
    f.touch()
    monkeypatch.setitem(sys.modules, module.split(".")[0], None)  # import now fails as if not installed
    for m in [k for k in sys.modules if k.startswith(module.split(".")[0] + ".")]:
        monkeypatch.delitem(sys.modules, m)
    assert missing(runtime) == f"pip install 'edgeslim[{extra}]'"
    with pytest.raises(RuntimeBackendError, match=rf"pip install 'edgeslim\[{extra}\]'"):
        load(f, runtime)


def test_artifact_format_from_suffix_without_record(tmp_path):
    for sfx, fmt in ((".tflite", "tflite"), (".pte", "executorch"), (".xml", "openvino")):
        f = tmp_path / f"m{sfx}"
        f.write_bytes(b"\0")
        assert Artifact.load(f).format == fmt


@pytest.mark.parametrize("runtime", ["openvino", "litert", "executorch"])
def test_fp32_export_runs_and_agrees_with_torch(runtime, digits, tmp_path):
    fmt, sfx, module, export_module, _ = EDGE[runtime]
    need(module, EDGE[runtime][4]), need(export_module, EDGE[runtime][4])
    model, _, val = digits
    art = es.export(model, fmt, example_inputs=val, path=tmp_path / f"tiny{sfx}")
    assert art.format == fmt and art.precision == "fp32" and art.path.is_file()
    assert art.validation["runtime"] == runtime and art.validation["top1_agreement"] == 1.0
    x = val.normalized().numpy()[:16]
    for t in (1, 2):
        runner = load(Artifact.load(art.path), runtime, threads=t)
        if runtime == "executorch" and t == 2:
            break  # its thread pool is process-wide; one thread count is enough here
        out = _outputs(runner, x)
        ref = torch_out(model, x)
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
        assert runner.describe().startswith(runtime) and runner.version


def test_openvino_runs_onnx_directly_fp32_and_int8(digits, onnx_fp32, tmp_path):
    need("openvino", "openvino")
    model, train, val = digits
    x = val.normalized().numpy()
    out = _outputs(load(onnx_fp32, "openvino"), x)
    np.testing.assert_allclose(out, torch_out(model, x), rtol=1e-4, atol=1e-4)
    q = es.quantize(model, es.QuantConfig(num_samples=128), calib=train)
    int8 = es.export(q, "onnx", example_inputs=val, path=tmp_path / "tiny-int8.onnx")
    ov_out = _outputs(load(int8, "openvino"), x)
    ort_out = _outputs(load(int8, "onnxruntime"), x)
    assert (ov_out.argmax(1) == ort_out.argmax(1)).mean() >= 0.95
    assert (ov_out.argmax(1) == torch_out(model, x).argmax(1)).mean() >= 0.9


@pytest.mark.slow  # PT2E calibration + lowering: 20-30 s each on a 2-core host
@pytest.mark.parametrize("runtime", ["litert", "executorch"])
def test_int8_export_runs_with_integer_kernels_and_keeps_accuracy(runtime, digits, tmp_path):
    fmt, sfx, module, export_module, extra = EDGE[runtime]
    need(module, extra), need(export_module, extra)
    model, train, val = digits
    q = es.quantize(model, es.QuantConfig(num_samples=64), calib=train)
    with pytest.raises(DataError, match="calib="):
        es.export(q, fmt, example_inputs=val, path=tmp_path / f"nocalib{sfx}")
    art = es.export(q, fmt, example_inputs=val, path=tmp_path / f"tiny-int8{sfx}", calib=train)
    assert art.precision == "int8" and art.meta["int8"]["calibration_samples"] == 64
    x, y = val.normalized().numpy(), val.labels.numpy()
    out = _outputs(load(art, runtime), x)
    acc_fp32 = (torch_out(model, x).argmax(1) == y).mean()
    assert (out.argmax(1) == y).mean() >= acc_fp32 - 0.05
    assert (out.argmax(1) == torch_out(model, x).argmax(1)).mean() >= 0.9
    if runtime == "litert":  # full-integer model: int8 input tensor, fed through its own scale
        assert "int8 I/O" in load(art, runtime).describe()


def test_export_format_checks(digits, tmp_path):
    model, _, val = digits
    with pytest.raises(ConfigError, match="does not fit format 'tflite'"):
        es.export(model, "tflite", example_inputs=val, path=tmp_path / "m.onnx")
    with pytest.raises(ConfigError, match="takes precision fp32 or int8"):
        es.export(model, "pte", example_inputs=val, path=tmp_path / "m.pte", precision="fp16")


def test_compare_runtimes_same_inputs_and_lists_missing(digits, onnx_fp32, monkeypatch):
    import edgeslim.runtime._compare as cmp

    model, _, val = digits
    real = cmp.missing
    monkeypatch.setattr(cmp, "missing", lambda n: "pip install 'edgeslim[litert]'" if n == "litert" else real(n))
    cands = {"torch": ("torch", model), "onnxruntime": ("onnxruntime", onnx_fp32)}
    if not real("openvino"):
        cands["openvino"] = ("openvino", onnx_fp32)
    rows = compare_runtimes(cands, data=val, reference=model, threads=1, runs=10, rounds=2, warmup=1, peak_memory=False)
    by = {r["label"]: r for r in rows}
    for label in cands:
        r = by[label]
        assert r["status"] == "ok" and r["threads"] == 1 and r["samples"] == len(val)
        assert r["top1_agreement"] == 1.0 and r["cosine"] > 0.99999 and r["runs"] == 10
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert r["accuracy"] == by["torch"]["accuracy"]
    assert by["litert"]["status"] == "not installed" and "edgeslim[litert]" in by["litert"]["note"]
    assert "not installed" in cmp.render_rows(rows)


def test_cli_measure_runtime_all_prints_one_table_for_every_runtime(onnx_fp32, digits, tmp_path, capsys):
    import json

    from edgeslim.cli import main

    need("openvino", "openvino")
    save = tmp_path / "rows.json"
    assert (
        main(
            [
                "measure",
                str(onnx_fp32.path),
                "--runtime",
                "all",
                "--dataset",
                "digits",
                "--samples",
                "32",
                "--runs",
                "10",
                "--no-memory",
                "--save",
                str(save),
                "--json",
            ]
        )
        == 0
    )
    rows = {r["label"].split()[0]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert json.loads(save.read_text()) and {"onnxruntime", "openvino"} <= set(rows)
    for name in ("onnxruntime", "openvino"):  # both load the .onnx file: measured, and agree with each other
        r = rows[name]
        assert r["p50_ms"] > 0 and r["threads"] == 1 and r.get("status", "ok") == "ok"
    # runtimes that cannot load an .onnx file get a row saying so, never a silent gap
    for name in ("litert", "executorch"):
        if not missing(name):
            assert rows[name]["status"] == "n/a" and "cannot load format 'onnx'" in rows[name]["note"]
    assert main(["measure", str(onnx_fp32.path), "--runtime", "all", "--dataset", "digits", "--threads", "1,2"]) != 0
    assert "one --threads value" in capsys.readouterr().err

import json
import subprocess
import sys

import pytest

from edgeslim.cli import build_parser, main

COMMANDS = ["train", "quantize", "prune", "export", "measure", "report", "optimize", "demo"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeslim.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--json" in out and cmd in out


def test_unknown_model_exits_nonzero_with_the_valid_names(tmp_path):
    r = run_cli("quantize", "mobilenet", "--out", str(tmp_path / "q.onnx"))
    assert r.returncode == 2
    assert "unknown model 'mobilenet'" in r.stderr and "mobilenet_v2" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "q.onnx").exists()


def test_existing_output_is_refused_and_json_errors_are_machine_readable(tmp_path):
    out = tmp_path / "m.onnx"
    out.write_text("keep me")
    r = run_cli("export", "small_cnn", "--out", str(out), "--json")
    assert r.returncode == 2 and out.read_text() == "keep me"
    assert json.loads(r.stdout)["error"] == "OutputExistsError"
    assert "--force" in r.stderr


def test_quantize_and_measure_from_the_command_line(tmp_path):
    out = tmp_path / "q.onnx"
    r = run_cli(
        "quantize", "small_cnn", "--samples", "128", "--calibration", "percentile", "--reduce-range", "--out", str(out),
        "--json",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["artifact"]["precision"] == "int8" and out.is_file()
    assert res["quantize"]["calibration"] == "percentile" and res["quantize"]["calibration_samples"] == 128
    config = (tmp_path / "q.config.yaml").read_text()
    assert config.startswith("quantize:") and "reduce_range: true" in config and (tmp_path / "q.recipe").is_file()
    assert "int8 per-channel symmetric (7-bit range)" in {d["weights"] for d in res["quantize"]["quantized_layers"]}
    m = run_cli("measure", str(out), "--samples", "300", "--runs", "20", "--save", str(tmp_path / "m.json"), "--json")
    assert m.returncode == 0, m.stderr
    figures = json.loads(m.stdout)["figures"]
    assert figures["accuracy"]["value"] > 0.8 and "onnxruntime" in figures["accuracy"]["detail"]
    rep = run_cli("report", str(tmp_path / "m.json"), "--out", str(tmp_path / "rep"))
    assert rep.returncode == 0, rep.stderr
    assert (tmp_path / "rep" / "report.html").is_file()


def test_bad_option_values_are_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["measure", "x.onnx", "--threads", "0"])
    assert e.value.code == 2
    assert "positive integers" in capsys.readouterr().err


def test_a_three_step_chain_through_one_recipe_file(tmp_path):
    import numpy as np
    import onnxruntime as ort
    import torch

    import edgeslim as es

    p1, p2, q = tmp_path / "p.recipe", tmp_path / "pm.recipe", tmp_path / "q.onnx"
    r = run_cli(
        "prune",
        "small_cnn",
        "--method",
        "channel",
        "--ratio",
        "0.25",
        "--round-to",
        "4",
        "--recalibrate-bn",
        "512",
        "--out",
        str(p1),
        "--json",
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["steps"] == ["prune"]
    r = run_cli("prune", str(p1), "--method", "magnitude", "--ratio", "0.5", "--out", str(p2), "--json")
    assert r.returncode == 0, r.stderr
    r = run_cli("quantize", str(p2), "--samples", "128", "--out", str(q), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["steps"] == ["prune", "prune", "quantize"] and res["artifact"]["precision"] == "int8"
    assert (tmp_path / "q.config.yaml").read_text().startswith("quantize:")
    # the recipe reloads by itself (zoo source recorded), channels really removed, masks really kept
    model = es.load(tmp_path / "q.recipe")
    steps = [s["technique"] for s in model.edgeslim_recipe]
    assert steps == ["prune", "prune", "quantize"]
    x = es.data.load("fashion-mnist")[1].take(64, seed=0).normalized()
    sess = ort.InferenceSession(str(q), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model(x).numpy()
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert (ref.argmax(1) == out.argmax(1)).mean() >= 0.9
    es.save(model, tmp_path / "again.recipe")
    with torch.no_grad():
        assert torch.equal(es.load(tmp_path / "again.recipe")(x), model(x))
    # export and measure take the recipe as their model
    r = run_cli("export", str(tmp_path / "q.recipe"), "--out", str(tmp_path / "q2.onnx"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["precision"] == "int8"
    r = run_cli("measure", str(tmp_path / "q.recipe"), "--samples", "200", "--runs", "5", "--json")
    assert r.returncode == 0, r.stderr
    acc = json.loads(r.stdout)["figures"]["accuracy"]
    assert acc["value"] > 0.2 and "torch" in acc["detail"]  # 10 classes: chance is 0.1 (no fine-tuning here)
    # a recipe is refused as --weights, and a truncated one is one clear line
    bad = tmp_path / "bad.recipe"
    bad.write_bytes((tmp_path / "q.recipe").read_bytes()[:100])
    r = run_cli("export", str(bad), "--out", str(tmp_path / "b.onnx"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "bad.recipe" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not np.any([p.name == "b.onnx" for p in tmp_path.iterdir()])


def test_an_onnx_file_is_a_model_for_quantize(tmp_path):
    import onnx

    fp32, q = tmp_path / "fp32.onnx", tmp_path / "q.onnx"
    r = run_cli("export", "small_cnn", "--out", str(fp32), "--json")
    assert r.returncode == 0, r.stderr
    r = run_cli("quantize", str(fp32), "--samples", "128", "--out", str(q), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["quantize"]["capture"] == "onnx" and res["artifact"]["precision"] == "int8"
    assert res["artifact"]["meta"]["integer_macs"]["share"] >= 0.9
    ops = {n.op_type for n in onnx.load(str(q)).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert res["artifact"]["validation"]["vs_float_reference"]["top1_agreement"] >= 0.9


def test_quantize_lays_an_onnx_file_out_for_openvino_from_the_command_line(tmp_path):
    fp32, q = tmp_path / "fp32.onnx", tmp_path / "q.onnx"
    r = run_cli("export", "small_cnn", "--out", str(fp32), "--json")
    assert r.returncode == 0, r.stderr
    r = run_cli("quantize", str(fp32), "--samples", "64", "--runtime", "openvino", "--out", str(q), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["quantize"]["layout"]["runtime"] == "openvino"
    assert res["artifact"]["meta"]["integer_macs"]["share"] >= 0.9
    r = run_cli("quantize", str(fp32), "--runtime", "openvino", "--placement", "measured", "--out", str(q), "--force")
    assert r.returncode == 2 and "placement='measured'" in r.stderr and "Traceback" not in r.stderr

import json
import subprocess
import sys

import pytest

from edgeslim.cli import build_parser, main

COMMANDS = ["train", "quantize", "export", "measure", "report", "demo"]


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
    r = run_cli("quantize", "small_cnn", "--samples", "128", "--calibration", "percentile", "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["artifact"]["precision"] == "int8" and out.is_file()
    assert res["quantize"]["calibration"] == "percentile" and res["quantize"]["calibration_samples"] == 128
    assert (tmp_path / "q.recipe.yaml").read_text().startswith("quantize:")
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

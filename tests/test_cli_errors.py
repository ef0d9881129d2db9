"""Every bad input to the CLI: one stderr line naming what is wrong, exit 2, nothing written, JSON with --json.

Also: Ctrl-C (exit 130, temporary files removed), stale temporary files of killed runs, concurrent writers,
global flags before or after the verb, and progress bars on stderr.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from edgeslim import cli
from edgeslim.cli import build_parser, main

SRC = str(Path(cli.__file__).parents[1])


def run(capsys, *args: str) -> tuple[int, str, str]:
    try:
        code = main(list(args))
    except SystemExit as e:  # usage errors exit from the parser
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def shown_lines(err: str) -> list[str]:
    """stderr as a terminal shows it: a progress bar cleared with carriage returns leaves nothing."""
    return [s for s in (ln.split("\r")[-1] for ln in err.split("\n")) if s.strip()]


def one_line_error(code: int, err: str, *words: str) -> str:
    lines = shown_lines(err)
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("edgeslim") and ": error: " in lines[0], lines[0]
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def json_error(out: str, kind: str | None = None) -> dict:
    d = json.loads(out)
    assert set(d) == {"error", "message"} and d["message"]
    if kind:
        assert d["error"] == kind
    return d


def tiny_onnx(path: Path, *, dynamic_rank: bool = False, classes: int = 10) -> Path:
    """A real ONNX classifier (reshape + matmul) for 1x8x8 inputs; with dynamic_rank its input has no shape."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, None if dynamic_rank else ["N", 1, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", classes])
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, classes)).astype(np.float32), "w")
    s = numpy_helper.from_array(np.array([0, -1], np.int64), "s")
    g = helper.make_graph(
        [helper.make_node("Reshape", ["x", "s"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["y"])],
        "tiny",
        [x],
        [y],
        [w, s],
    )
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def image_folder(root: Path, classes: tuple[str, ...], n: int = 5, size: int = 8) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def no_work(monkeypatch):
    """Make any model loading fail loudly: a refusal must come before the work starts."""

    def boom(a):
        raise AssertionError("work started before the bad input was refused")

    monkeypatch.setattr(cli, "_load_model", boom)
    monkeypatch.setattr(cli, "_load_data", boom)


# ------------------------------------------------------------------------------------------------- ONNX inputs


def test_garbage_and_truncated_onnx_are_one_line(tmp_path, capsys):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(np.random.default_rng(1).integers(0, 256, 400, dtype=np.uint8).tobytes())
    good = tiny_onnx(tmp_path / "good.onnx")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for f in (garbage, truncated):
        code, out, err = run(capsys, "measure", str(f), "--no-data", "--save", str(tmp_path / "m.json"))
        one_line_error(code, err, str(f), "not a readable ONNX model")
        assert "DecodeError" not in err.split(":")[0]
        code, out, err = run(capsys, "measure", str(f), "--no-data", "--json")
        assert json_error(out, "ModelError")["message"].startswith(repr(str(f)))
    assert not (tmp_path / "m.json").exists()


def test_dynamic_rank_onnx_needs_input_shape_and_measure_save_feeds_report(tmp_path, capsys):
    dyn = tiny_onnx(tmp_path / "dyn.onnx", dynamic_rank=True)
    code, out, err = run(capsys, "measure", str(dyn), "--no-data")
    one_line_error(code, err, "dyn.onnx", "input shape is unknown", "--input-shape C,H,W")
    save = tmp_path / "m.json"
    code, out, err = run(
        capsys, "measure", str(dyn), "--no-data", "--input-shape", "1,8,8", "--runs", "3", "--save", str(save), "--json"
    )
    assert code == 0, err
    figs = json.loads(out)["figures"]
    assert figs["latency_p50_ms@t1b1"]["value"] > 0 and "zeros" in figs["latency_p50_ms@t1b1"]["detail"]
    code, out, err = run(capsys, "measure", str(dyn), "--no-data", "--input-shape", "3,5", "--runs", "3")
    one_line_error(code, err, "onnxruntime cannot run", "(1, 3, 5)")
    # what measure --save wrote is the input of report (as its --help says)
    code, out, err = run(capsys, "report", str(save), "--out", str(tmp_path / "rep"))
    assert code == 0, err
    assert (tmp_path / "rep" / "report.html").is_file() and "latency p50, 1 thread, batch 1" in out


def test_measure_runtime_all_save_feeds_report(tmp_path, capsys):
    art = tiny_onnx(tmp_path / "t.onnx")
    save = tmp_path / "all.json"
    code, out, err = run(
        capsys,
        "measure",
        str(art),
        "--runtime",
        "all",
        "--dataset",
        "digits",
        "--samples",
        "50",
        "--runs",
        "5",
        "--no-memory",
        "--save",
        str(save),
        "--json",
        "--input-shape",
        "1,8,8",
    )
    assert code == 0, err
    rows = json.loads(out)["rows"]
    assert any(r["runtime"] == "onnxruntime" and r["status"] == "ok" for r in rows)
    code, out, err = run(capsys, "report", str(save), "--out", str(tmp_path / "rep"), "--json")
    assert code == 0, err
    stages = json.loads((tmp_path / "rep" / "report.json").read_text())["stages"]
    assert [s["context"]["runtime"] for s in stages] == [r["runtime"] for r in rows if r["status"] == "ok"]


def test_save_over_an_artifact_record_is_refused_and_a_foreign_record_is_a_clear_error(tmp_path, capsys):
    from edgeslim.core.artifact import Artifact

    art = Artifact(tiny_onnx(tmp_path / "x.onnx"), "onnx", "fp32", (1, 8, 8))
    art.save_record()
    record = art.record_path.read_text()
    for save in ("x.onnx.json", "other.onnx.json", "x.onnx"):
        if save == "other.onnx.json":
            (tmp_path / "other.onnx").write_bytes(b"")
        code, out, err = run(capsys, "measure", str(art.path), "--no-data", "--save", str(tmp_path / save), "--force")
        one_line_error(code, err, "--save", save)
    assert art.record_path.read_text() == record
    art.record_path.write_text(json.dumps({"label": "x", "figures": {}, "context": {}}))  # a metrics file over it
    code, out, err = run(capsys, "measure", str(art.path), "--no-data", "--runs", "3")
    one_line_error(code, err, "x.onnx.json", "not an artifact record", "move or delete it")


# ------------------------------------------------------------------------------------------------- config files

BOMB = "".join(f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi"))
CONFIGS = {
    "missing": (None, "does not exist"),
    "syntax": ("quantize:\n  num_samples: [1, 2\n", "YAML syntax error (line 3"),
    "lots": ("quantize:\n  num_samples: lots\n", "QuantConfig.num_samples='lots' is not allowed; expected an integer"),
    "no": ('quantize:\n  per_channel: "no"\n', "QuantConfig.per_channel='no' is not allowed; expected true or false"),
    "bool for int": ("quantize:\n  num_samples: yes\n", "num_samples=True is not allowed"),
    "python tag": ("quantize: !!python/object/apply:os.system ['touch PWNED']\n", "python/object/apply:os.system"),
    "alias bomb": ("a: &a [x, x, x, x, x, x, x, x, x]\n" + BOMB + "quantize:\n  exclude: *i\n", "aliases"),
    "nested alias": ("a: &a [x, x]\nquantize:\n  exclude: [*a, *a]\n", "unknown QuantConfig field 'a'"),
    "list of lists": ("quantize:\n  exclude: [[a], [b]]\n", "expected a list of a string"),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_bad_config_files_are_one_line_before_any_work(case, tmp_path, capsys, monkeypatch):
    no_work(monkeypatch)
    monkeypatch.chdir(tmp_path)
    text, words = CONFIGS[case]
    cfg = tmp_path / "c.yaml"
    if text is not None:
        cfg.write_text(text)
    t0 = time.perf_counter()
    code, out, err = run(capsys, "quantize", "small_cnn", "--config", str(cfg), "--out", str(tmp_path / "q.onnx"))
    assert time.perf_counter() - t0 < 5
    line = one_line_error(code, err, words)
    assert "c.yaml" in line and len(line) < 600  # values in messages are bounded
    code, out, err = run(
        capsys, "quantize", "small_cnn", "--config", str(cfg), "--out", str(tmp_path / "q.onnx"), "--json"
    )
    assert json_error(out, "ConfigError")
    assert sorted(p.name for p in tmp_path.iterdir()) == (["c.yaml"] if text is not None else [])  # nothing written


# ------------------------------------------------------------------------------------------------- options


def test_bad_option_values_are_one_line_with_json(capsys):
    for args, words in (
        (["measure", "x.onnx", "--samples", "-5"], "--samples: expected a positive integer"),
        (["quantize", "small_cnn", "--out", "q.onnx", "--samples", "0"], "positive integer"),
        (["measure", "x.onnx", "--threads", "0,1"], "positive integers"),
        (["train", "small_cnn", "--epochs", "none"], "--epochs"),
    ):
        code, out, err = run(capsys, *args)
        one_line_error(code, err, words)
        code, out, err = run(capsys, *args, "--json")
        assert json_error(out, "UsageError")


def test_too_many_samples_and_threads_warn_and_run(tmp_path, capsys):
    art = tiny_onnx(tmp_path / "t.onnx")
    code, out, err = run(
        capsys,
        "measure",
        str(art),
        "--dataset",
        "digits",
        "--samples",
        "100000000",
        "--threads",
        "64",
        "--runs",
        "3",
        "--json",
    )
    assert code == 0, err
    res = json.loads(out)
    warnings = [ln for ln in err.splitlines() if "warning:" in ln]
    assert len(warnings) == 2 and res["warnings"] and len(res["warnings"]) == 2
    assert (
        "--samples 100,000,000" in warnings[1] and f"all {res['context']['accuracy_samples']:,} are used" in warnings[1]
    )
    assert "--threads 64" in warnings[0] and "core" in warnings[0]
    assert "latency_p50_ms@t64b1" in res["figures"]


def test_global_flags_work_before_and_after_the_verb(capsys):
    p = build_parser()
    for argv in (
        ["-v", "--json", "measure", "x.onnx"],
        ["measure", "x.onnx", "-v", "--json"],
        ["--json", "measure", "x.onnx", "--verbose"],
    ):
        a = p.parse_args(argv)
        assert a.verbose is True and a.json is True
    a = p.parse_args(["measure", "x.onnx"])
    assert a.verbose is False and a.json is False
    for argv in (["--json", "measure", "missing.onnx"], ["measure", "missing.onnx", "--json"]):
        code, out, err = run(capsys, *argv)
        assert code == 2 and json_error(out, "ExportError")["message"] == "artifact file 'missing.onnx' does not exist"


# ------------------------------------------------------------------------------------------------- outputs


def test_output_folders_and_existing_outputs_are_checked_before_any_work(tmp_path, capsys, monkeypatch):
    no_work(monkeypatch)
    code, out, err = run(capsys, "quantize", "small_cnn", "--out", str(tmp_path / "missing" / "q.onnx"))
    one_line_error(code, err, "missing", "does not exist; create it first")
    assert not (tmp_path / "missing").exists()
    (tmp_path / "afile").write_text("x")
    code, out, err = run(capsys, "export", "small_cnn", "--out", str(tmp_path / "afile" / "m.onnx"))
    one_line_error(code, err, "is not a folder")
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(cli.os, "access", lambda p, mode: False if Path(p) == ro else real_access(p, mode))
    code, out, err = run(capsys, "quantize", "small_cnn", "--out", str(ro / "q.onnx"), "--json")
    assert json_error(out, "ConfigError")["message"].endswith("is not writable")
    code, out, err = run(capsys, "report", str(tmp_path / "afile"), "--out", str(ro / "rep"))
    one_line_error(code, err, "not writable")
    existing = tmp_path / "q.onnx"
    existing.write_text("keep me")
    code, out, err = run(capsys, "quantize", "small_cnn", "--out", str(existing), "--json")
    assert json_error(out, "OutputExistsError") and existing.read_text() == "keep me"
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "small_cnn-pruned.pt").write_text("keep")
    code, out, err = run(capsys, "prune", "small_cnn", "--out", str(tmp_path / "out"))
    one_line_error(code, err, "small_cnn-pruned.pt", "--force")
    (tmp_path / "m.json").write_text("{}")
    code, out, err = run(capsys, "measure", "x.onnx", "--save", str(tmp_path / "m.json"))
    one_line_error(code, err, "m.json", "already exists")


def test_a_concurrent_run_that_published_first_is_not_overwritten(tmp_path, capsys, monkeypatch):
    export_api = importlib.import_module("edgeslim.export._api")

    out = tmp_path / "m.onnx"
    real_convert = export_api._convert

    def convert_while_another_run_finishes(raw, tmp, precision, opts):
        real_convert(raw, tmp, precision, opts)
        out.write_text("the other run's result")  # it passed the same early check and published first

    monkeypatch.setattr(export_api, "_convert", convert_while_another_run_finishes)
    code, stdout, err = run(capsys, "export", "small_cnn", "--out", str(out), "--json")
    assert code == 2 and json_error(stdout, "OutputExistsError")
    assert out.read_text() == "the other run's result"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_ctrl_c_exits_130_with_one_line_and_no_partial_files(tmp_path, capsys, monkeypatch):
    export_api = importlib.import_module("edgeslim.export._api")

    out = tmp_path / "m.onnx"

    def interrupted_during_an_import(raw, tmp, precision, opts):
        Path(tmp).write_bytes(b"half")
        try:
            signal.raise_signal(signal.SIGINT)  # what Ctrl-C does
        except KeyboardInterrupt:
            raise ImportError("cannot import name 'x' (partially initialized module)") from None

    monkeypatch.setattr(export_api, "_convert", interrupted_during_an_import)
    before = signal.getsignal(signal.SIGINT)  # Python's default handler, or SIG_IGN under `nohup ... &`
    for extra in ((), ("--json",)):
        code, stdout, err = run(capsys, "export", "small_cnn", "--out", str(out), *extra)
        lines = shown_lines(err)
        assert code == 130 and len(lines) == 1 and "interrupted" in lines[0] and "Traceback" not in err
        if extra:
            assert json.loads(stdout)["error"] == "Interrupted"
        assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary file
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back


def test_temporary_files_of_a_killed_writer_are_removed_by_the_next_run(tmp_path):
    from edgeslim.core.io import write_text

    target = tmp_path / "out.json"
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {SRC!r})
        from edgeslim.core.io import atomic_path
        with atomic_path({str(target)!r}) as tmp:
            tmp.write_text("half")
            print("ready", flush=True)
            time.sleep(60)
    """)
    killed = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    alive = subprocess.Popen(
        [sys.executable, "-c", code.replace("out.json", "out.json")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert killed.stdout.readline().strip() == "ready" and alive.stdout.readline().strip() == "ready"
        killed.send_signal(signal.SIGKILL)
        killed.wait(10)
        temps = sorted(p.name for p in tmp_path.glob(".out.json.*.tmp"))
        assert len(temps) == 2  # SIGKILL left one behind
        unrelated = tmp_path / ".other.json.999999.abcdefgh.tmp"
        unrelated.write_text("not ours")
        write_text(target, "done", force=True)
        left = sorted(p.name for p in tmp_path.glob(".out.json.*.tmp"))
        assert left == [f".out.json.{alive.pid}." + n.split(".")[-2] + ".tmp" for n in temps if f".{alive.pid}." in n]
        assert target.read_text() == "done" and unrelated.exists()  # only this target's stale files go
    finally:
        for p in (killed, alive):
            p.kill()
            p.wait(10)


# ------------------------------------------------------------------------------------------------- data and models


def test_class_count_mismatch_and_one_class_datasets_are_refused(tmp_path, capsys, monkeypatch):
    two = image_folder(tmp_path / "two", ("cat", "dog"))
    one = image_folder(tmp_path / "one", ("cat",))
    for ds, words in ((two, ("outputs 10 classes", "has 2 (cat, dog)")), (one, ("has 1 class",))):
        code, out, err = run(
            capsys, "export", "tiny:tiny_rgb_cnn", "--dataset", f"folder:{ds}", "--out", str(tmp_path / "m.onnx")
        )
        one_line_error(code, err, *words)
        assert not (tmp_path / "m.onnx").exists()
    # an artifact measured on a dataset with another class count: refused too, not "accuracy 0%"
    from edgeslim.core.errors import DataError
    from edgeslim.data import load
    from edgeslim.runtime import measure

    art = tiny_onnx(tmp_path / "t.onnx", classes=1000)
    with pytest.raises(DataError, match="outputs 1000 classes but dataset 'digits' has 10"):
        measure(art, data=load("digits")[1].take(20), runs=2, peak_memory=False)


def test_bad_weights_files_are_one_line_and_never_suggest_unsafe_loading(tmp_path, capsys):
    import torch

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(np.random.default_rng(2).integers(0, 256, 600, dtype=np.uint8).tobytes())
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    torch.save({"w": Payload()}, evil)
    for f, words in ((garbage, "corrupt, truncated or not a torch file"), (evil, "posix.system")):
        code, out, err = run(capsys, "export", "small_cnn", "--weights", str(f), "--out", str(tmp_path / "m.onnx"))
        line = one_line_error(code, err, str(f), words)
        assert "weights_only=False" not in line and "file an issue" not in line
    assert not marker.exists() and not (tmp_path / "m.onnx").exists()


def test_train_writes_only_inside_out_and_defaults_to_the_working_folder(tmp_path, capsys, monkeypatch):
    from edgeslim.models._zoo import CHECKPOINT_DIR

    image_folder(tmp_path / "x", ("a", "b"), n=4)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    shipped = sorted(p.name for p in CHECKPOINT_DIR.iterdir())
    code, out, err = run(
        capsys, "train", "small_cnn", "--dataset", "folder:../x", "--epochs", "1", "--out", "ck", "--json"
    )
    assert code == 0, err
    assert sorted(p.name for p in (work / "ck").iterdir()) == [
        ".work",
        "small_cnn-folder-x.json",
        "small_cnn-folder-x.pt",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work", "x"]  # nothing beside the folder named
    code, out, err = run(capsys, "train", "small_cnn", "--dataset", "folder:../x", "--epochs", "1")
    assert code == 0, err
    assert (work / "edgeslim-checkpoints" / "small_cnn-folder-x.pt").is_file()
    assert "epoch 1/1: loss" in err and "val accuracy" in err  # per-epoch accuracy without -v
    assert sorted(p.name for p in CHECKPOINT_DIR.iterdir()) == shipped
    code, out, err = run(capsys, "train", "small_cnn", "--dataset", "folder:../x", "--epochs", "1")
    one_line_error(code, err, "small_cnn-folder-x.pt", "already exists")


# ------------------------------------------------------------------------------------------------- progress


def test_progress_bars_go_to_stderr_in_the_cli_but_not_with_json_or_in_the_library(tmp_path, capsys):
    from edgeslim.runtime import measure

    art = tiny_onnx(tmp_path / "t.onnx")
    code, out, err = run(capsys, "measure", str(art), "--dataset", "digits", "--samples", "64", "--runs", "3")
    assert code == 0 and "accuracy (onnxruntime)" in err and "latency (onnxruntime)" in err
    assert "accuracy (onnxruntime)" not in out
    code, out, err = run(capsys, "measure", str(art), "--dataset", "digits", "--samples", "64", "--runs", "3", "--json")
    assert code == 0 and "latency (onnxruntime)" not in err and json.loads(out)["figures"]
    from edgeslim.data import load

    measure(art, data=load("digits")[1].take(64), runs=3, peak_memory=False)
    assert "latency (" not in capsys.readouterr().err  # the library is quiet by default
    measure(art, data=load("digits")[1].take(64), runs=3, peak_memory=False, progress=True)
    assert "latency (onnxruntime)" in capsys.readouterr().err


def test_a_failing_command_prints_no_traceback_from_a_subprocess(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x01garbage")
    r = subprocess.run(
        [sys.executable, "-m", "edgeslim.cli", "measure", str(bad), "--no-data"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "bad.onnx" in r.stderr


def test_device_predictions_come_from_the_library_and_refuse_a_torch_model(tmp_path, capsys):
    art = tiny_onnx(tmp_path / "t.onnx")
    code, out, err = run(
        capsys, "measure", str(art), "--no-data", "--runs", "5", "--device", "raspberry-pi-4", "--json"
    )
    assert code == 0, err
    figs = json.loads(out)["figures"]
    assert figs["predicted_latency_ms@raspberry-pi-4"]["source"].startswith("predicted for raspberry-pi-4")
    assert {"estimated_energy_mj@raspberry-pi-4", "memory_required_mb@raspberry-pi-4"} <= set(figs)
    code, out, err = run(
        capsys, "measure", str(art), "--no-data", "--runs", "5", "--threads", "2", "--device", "raspberry-pi-4"
    )
    one_line_error(code, err, "1 thread, batch 1")


def test_per_tensor_above_needs_per_channel_weights(tmp_path, capsys):
    code, out, err = run(
        capsys, "quantize", "small_cnn", "--out", str(tmp_path / "q.onnx"), "--per-tensor", "--per-tensor-above", "30"
    )
    one_line_error(code, err, "per_tensor_sqnr_db")
    assert not (tmp_path / "q.onnx").exists()

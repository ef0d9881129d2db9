"""The report verb: side-by-side numbers, honest changes, provenance, safe output."""

import json
import re

import pytest

from edgeslim.core.errors import ConfigError, OutputExistsError
from edgeslim.core.metrics import Metrics
from edgeslim.report import compare_stages, render_table
from edgeslim.report._api import report

HOST = {"cpu": "Test CPU 9000", "cores": 2, "python": "3.12"}


def stages() -> list[Metrics]:
    base = Metrics("FP32 baseline (torch)", context={"host": HOST, "runtime": "torch"})
    base.add("accuracy", 0.92, "fraction", "measured", "top-1 on 1000 samples, measured on torch 2.14 <eager>")
    base.add("size_bytes", 9_000_000, "bytes", "computed", "bytes of the serialized state_dict")
    base.add("macs", 300e6, "MACs", "computed", "computed by torch.utils.flop_counter")
    base.add("latency_p50_ms@t1b1", 1.0, "ms", "measured", "measured on torch 2.14, 1 thread, batch 1")
    base.add("peak_memory_mb", 10.0, "MB", "measured", "extra peak RSS in a child process")
    fp32 = Metrics("FP32 ONNX", context={"host": HOST, "runtime": "onnxruntime"})
    fp32.add("accuracy", 0.92, "fraction", "measured", "top-1 on 1000 samples, measured on onnxruntime 1.32")
    fp32.add("size_bytes", 8_900_000, "bytes", "measured", "bytes of file m-fp32.onnx")
    fp32.add("latency_p50_ms@t1b1", 0.8, "ms", "measured", "measured on onnxruntime 1.32 FP32, 1 thread")
    int8 = Metrics("INT8 ONNX", context={"host": HOST, "runtime": "onnxruntime"})
    int8.add("accuracy", 0.918, "fraction", "measured", "top-1 on 1000 samples, measured on onnxruntime 1.32 INT8")
    int8.add("size_bytes", 2_300_000, "bytes", "measured", "bytes of file m-int8.onnx")
    int8.add("macs", 150e6, "MACs", "computed", "computed from ONNX shape inference")
    int8.add("latency_p50_ms@t1b1", 0.6, "ms", "measured", "measured on onnxruntime 1.32 INT8, 1 thread")
    int8.add("peak_memory_mb", 12.0, "MB", "measured", "extra peak RSS, INT8 in a child process")
    int8.add("latency_p50_ms@t1b1_pi4", 4.2, "ms", "predicted", "predicted for raspberry-pi-4 (roofline)")
    return [base, fp32, int8]


def cell(rows, figure, stage):
    return next(r for r in rows if r["figure"] == figure)["cells"][stage]


def test_changes_are_honest_ratios_and_points():
    rows = compare_stages(stages())
    assert [r["figure"] for r in rows][:5] == [
        "accuracy",
        "size_bytes",
        "macs",
        "latency_p50_ms@t1b1",
        "peak_memory_mb",
    ]
    size = cell(rows, "size_bytes", 2)
    assert size["change"] == "3.9x smaller" and size["factor"] == pytest.approx(3.913, abs=1e-3)
    assert size["worse"] is False and size["sources_differ"] is True
    # speed is compared with the FP32 file on the same runtime, not with torch eager
    lat = cell(rows, "latency_p50_ms@t1b1", 2)
    assert lat["change"] == "1.3x faster" and lat["baseline"] == "FP32 ONNX"
    assert cell(rows, "latency_p50_ms@t1b1", 1)["change"] == "1.2x faster"  # no earlier ORT stage: the first
    assert "baseline" not in cell(rows, "latency_p50_ms@t1b1", 1)
    assert cell(rows, "macs", 2)["change"] == "2.0x fewer MACs"
    acc = cell(rows, "accuracy", 2)  # -0.2 pt on 1000 samples is 2 images: inside two binomial standard errors
    assert acc["change"].startswith("-0.20 pt (within noise") and acc["worse"] is None and acc["within_noise"]
    assert acc["delta_pt"] == pytest.approx(-0.2)
    assert cell(rows, "accuracy", 1)["change"] == "±0.00 pt" and cell(rows, "accuracy", 1)["worse"] is None
    mem = cell(rows, "peak_memory_mb", 2)
    assert mem["change"] == "1.2x more memory" and mem["worse"] is True
    assert cell(rows, "macs", 1) is None and cell(rows, "size_bytes", 0)["change"] == ""
    assert cell(rows, "latency_p50_ms@t1b1_pi4", 2)["change"] == ""  # no first-stage value: nothing to compare


def test_values_are_formatted_by_unit():
    rows = compare_stages(stages())
    assert cell(rows, "size_bytes", 2)["text"] == "2.30 MB"
    assert cell(rows, "accuracy", 2)["text"] == "91.80%"
    assert cell(rows, "latency_p50_ms@t1b1", 2)["text"] == "0.600 ms"
    assert cell(rows, "macs", 0)["text"] == "300.00M MACs"


def test_slower_and_larger_are_said_plainly():
    a, b = Metrics("a"), Metrics("b")
    a.add("latency_p50_ms@t1b1", 1.0, "ms", "measured", "x")
    b.add("latency_p50_ms@t1b1", 1.2, "ms", "measured", "x")
    a.add("size_bytes", 1000, "bytes", "measured", "x")
    b.add("size_bytes", 2000, "bytes", "measured", "x")
    rows = compare_stages([a, b])
    assert cell(rows, "latency_p50_ms@t1b1", 1)["change"] == "1.2x slower"
    assert cell(rows, "size_bytes", 1)["change"] == "2.0x larger"
    assert all(r["cells"][1]["worse"] for r in rows)
    assert render_table([a, b]).endswith("! = worse than the first stage")


def test_report_writes_all_formats_with_provenance(tmp_path):
    paths = report(stages(), tmp_path / "rep", title="demo <report>", notes=["PTQ with 128 samples"])
    assert set(paths) == {"json", "md", "html"} and all(p.is_file() for p in paths.values())
    assert not list((tmp_path / "rep").glob(".*.tmp"))

    md = paths["md"].read_text()
    for s in (
        "3.9x smaller",
        "1.3x faster vs FP32 ONNX",
        "-0.20 pt",
        "2.0x fewer MACs",
        "PTQ with 128 samples",
        "| latency p50, 1 thread, batch 1 |",
        "| file size |",
        "bytes of file m-int8.onnx",
        "computed by torch.utils.flop_counter",
        "predicted for raspberry-pi-4 (roofline)",
        "~4.20 ms",
    ):
        assert s in md, s
    assert "faster" not in next(line for line in md.splitlines() if line.startswith("| MACs"))
    assert "latency_p50_ms@t1b1 |" not in md  # row names are words; the keys stay in the JSON and provenance
    regs = md.split("## Regressions")[1].split("##")[0]
    assert "INT8 ONNX: peak memory 12.0 MB vs 10.0 MB" in regs and "1.2x more memory" in regs
    assert "accuracy" not in regs and "file size" not in regs
    assert md.count("Test CPU 9000") == 1  # host shown once
    assert "torch 2.14 \\<eager>" in md  # no raw HTML tags in the Markdown

    html = paths["html"].read_text()
    assert "<svg" in html and "<rect" in html and 'class="worse"' in html
    assert "demo &lt;report&gt;" in html and "torch 2.14 &lt;eager&gt;" in html and "<eager>" not in html
    assert not re.search(r"https?://|<script|<link|@import|url\(|<img|<iframe", html)
    assert html.count("Test CPU 9000") == 1

    data = json.loads(paths["json"].read_text())
    assert data["title"] == "demo <report>" and data["notes"] == ["PTQ with 128 samples"]
    size = next(r for r in data["comparison"] if r["figure"] == "size_bytes")["cells"][2]
    assert round(size["factor"], 2) == 3.91 and size["ratio"] == pytest.approx(2.3 / 9, abs=1e-6)
    assert {(r["stage"], r["figure"]) for r in data["regressions"]} == {("INT8 ONNX", "peak_memory_mb")}
    assert "latency_p50_ms@t1b1" in {r["figure"] for r in data["comparison"]}  # JSON keys unchanged


def test_json_round_trips_into_the_same_report(tmp_path):
    first = report(stages(), tmp_path / "a", formats=("json",))
    saved = json.loads(first["json"].read_text())
    again = report(saved["stages"], tmp_path / "b", formats="json")
    assert json.loads(again["json"].read_text()) == saved
    assert [Metrics.from_dict(d).to_dict() for d in saved["stages"]] == [s.to_dict() for s in stages()]
    assert render_table(saved["stages"]) == render_table(stages())


def test_zero_nan_and_unit_mismatch_are_shown_not_hidden(tmp_path):
    a, b = Metrics("a"), Metrics("b")
    for m, mem, lat, energy in ((a, 0.0, 1.0, 5.0), (b, 3.0, float("nan"), 4.0)):
        m.add("peak_memory_mb", mem, "MB", "measured", "rss")
        m.add("latency_p50_ms@t1b1", lat, "ms", "measured", "ort")
        m.add("energy", energy, "mJ" if m is a else "J", "predicted", "energy model")
    rows = compare_stages([a, b])
    assert cell(rows, "peak_memory_mb", 1)["change"] == "+3.0 MB" and cell(rows, "peak_memory_mb", 1)["worse"]
    assert (
        cell(rows, "latency_p50_ms@t1b1", 1)["change"] == "" and cell(rows, "latency_p50_ms@t1b1", 1)["worse"] is None
    )
    assert cell(rows, "energy", 1)["change"].startswith("not compared: unit")
    text = report([a, b], tmp_path)["json"].read_text()
    assert "NaN" not in text and json.loads(text)["stages"][1]["figures"]["latency_p50_ms@t1b1"]["value"] is None
    assert "nan ms" in render_table(json.loads(text)["stages"])


def test_existing_files_are_refused_unless_forced(tmp_path):
    report(stages(), tmp_path, formats=("md",))
    before = (tmp_path / "report.md").read_text()
    with pytest.raises(OutputExistsError, match="report.md"):
        report(stages()[:2], tmp_path)
    assert not (tmp_path / "report.json").exists()  # refused before anything was written
    assert (tmp_path / "report.md").read_text() == before
    paths = report(stages()[:2], tmp_path, force=True)
    assert set(paths) == {"json", "md", "html"} and paths["md"].read_text() != before


def test_bad_arguments_raise_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="html") as e:
        report(stages(), tmp_path, formats=("htm",))
    assert "valid: json, md, html" in str(e.value)
    with pytest.raises(ConfigError, match="at least one stage"):
        report([], tmp_path)
    with pytest.raises(ConfigError, match="list of Metrics"):
        report(stages()[0], tmp_path)
    with pytest.raises(ConfigError, match="stage 1"):
        report([stages()[0], {"figures": {}}], tmp_path)
    assert not list(tmp_path.iterdir())


def test_table_text_and_single_stage():
    text = render_table(stages())
    lines = text.splitlines()
    assert lines[0].startswith("figure") and "INT8 ONNX" in lines[0] and set(lines[1]) <= {"-", " "}
    assert "2.30 MB (3.9x smaller†)" in text and "12.0 MB (1.2x more memory) !" in text
    one = render_table([stages()[0]])
    assert "x " not in one and "!" not in one


def test_accuracy_changes_inside_binomial_noise_are_not_regressions():
    def stage(label, acc, n):
        m = Metrics(label, context={"accuracy_samples": n})
        m.add("accuracy", acc, "fraction", "measured", f"top-1 on {n} samples")
        return m

    one_image = compare_stages([stage("fp32", 0.9344, 10_000), stage("int8", 0.9343, 10_000)])
    c = cell(one_image, "accuracy", 1)  # -0.01 pt = 1 image of 10k
    assert c["worse"] is None and c["within_noise"] and "within noise" in c["change"]
    real = compare_stages([stage("fp32", 0.92, 10_000), stage("int8", 0.90, 10_000)])
    c = cell(real, "accuracy", 1)  # -2 pt on 10k samples: far outside 2 SE (about 0.8 pt)
    assert c["worse"] is True and c["change"] == "-2.00 pt" and not c["within_noise"]
    unknown = Metrics("b")
    unknown.add("accuracy", 0.9343, "fraction", "measured", "top-1")  # no sample count: judged as before
    assert cell(compare_stages([stage("a", 0.95, 10_000), unknown]), "accuracy", 1)["worse"] is True
    assert cell(compare_stages([stage("a", 0.9344, 10_000), unknown]), "accuracy", 1)["within_noise"] is False


def test_speed_baseline_is_the_fp32_file_on_the_same_runtime_and_noise_is_not_slower():
    def stage(label, runtime, precision, ms):
        m = Metrics(label, context={"runtime": runtime, "target": {"precision": precision}})
        m.add("latency_p50_ms@t1b1", ms, "ms", "measured", runtime)
        return m

    rows = compare_stages(
        [
            stage("torch", "torch", "fp32", 10.0),
            stage("int8 ort", "onnxruntime", "int8", 2.0),
            stage("fp32 ort", "onnxruntime", "fp32", 4.0),
            stage("int8 noisy", "onnxruntime", "int8", 4.08),
        ]
    )
    assert cell(rows, "latency_p50_ms@t1b1", 1)["change"] == "2.0x faster"  # vs fp32 ort, listed after it
    assert cell(rows, "latency_p50_ms@t1b1", 1)["baseline"] == "fp32 ort"
    assert cell(rows, "latency_p50_ms@t1b1", 2)["change"] == "2.5x faster"  # the FP32 file itself: vs the first
    noisy = cell(rows, "latency_p50_ms@t1b1", 3)  # 2% slower than the FP32 file: timing noise
    assert noisy["worse"] is None and "within noise" in noisy["change"]
    text = render_table(
        [
            stage("torch", "torch", "fp32", 10.0),
            stage("fp32 ort", "onnxruntime", "fp32", 4.0),
            stage("int8 ort", "onnxruntime", "int8", 2.0),
        ]
    )
    assert "latency p50, 1 thread, batch 1" in text and "2.0x faster vs fp32 ort" in text

"""edgeslim.optimize on a detector: candidates scored by mAP@[.5:.95] of the deployed file, pruned candidates
recovered by train_detector or by distillation from the input detector, the report in mAP, bad data and
settings in one line."""

import json

import pytest
import torch
from tiny import TinyCNN, tiny_coco, tiny_detector

import edgeslim as es
from edgeslim.core.errors import ConfigError, DataError
from edgeslim.pipeline import Budget, Space, load_chosen, optimize
from edgeslim.train import DetectTrainConfig, train_detector

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# a small detector space: PTQ variants and one pruned structure recovered both ways
FAST = Space.for_detection(
    probe_structures=False,
    target_macs=(0.0, 0.4),
    prune_scope=("layer",),
    keep_early_layers=(False,),
    round_to=4,
    bn_samples=64,
    finetune_steps=(0, 24),
    scale_steps=False,
    finetune_lr=5e-3,
    recovery=("finetune", "distill"),
    calibration=("minmax", "mse"),
    per_channel=(True,),
    calib_samples=32,
    cheap_trials=2,
    search_samples=24,
    latency_runs=10,
    finetune_gate=None,
    gate_margin=None,
)


@pytest.fixture(scope="module")
def detect_data(tmp_path_factory):
    folder = tiny_coco(tmp_path_factory.mktemp("coco") / "set")
    train, val = es.data.load(f"coco:{folder}", size=64)
    cfg = DetectTrainConfig(epochs=12, batch_size=16, lr=1e-2, warmup_steps=5, freeze_backbone=0, channels_last=False)
    model = train_detector(tiny_detector(), train, None, cfg, progress=False).model
    return model, train, val


@pytest.fixture(scope="module")
def run(detect_data, tmp_path_factory):
    model, train, val = detect_data
    out = tmp_path_factory.mktemp("optdet") / "run"
    space = FAST.replace(quantize=(True,))
    every = space.all_candidates()  # 2 PTQ-only, 6 pruned (no recovery, fine-tuned, distilled; x 2 calibrations)
    ptq = [p for p in every if not p.get("target_macs")]
    pruned = [p for p in every if p.get("target_macs") and p.get("finetune_steps")]
    res = optimize(
        model,
        data=(train, val),
        budget=Budget(max_accuracy_drop=0.2),
        space=space,
        max_trials=len(every),
        out=out,
        seed=0,
        progress=False,
    )
    return res, out, model, val, len(ptq), len(pruned)


def test_optimize_scores_detector_candidates_by_map_of_the_deployed_file(run):
    res, out, model, val, n_ptq, n_pruned = run
    doc = json.loads((out / "report.json").read_text())
    assert doc["task"] == "detect" and doc["metric"] == "mAP@[.5:.95]"
    rows = doc["trials"]["rows"]
    done = [r for r in rows if r["state"] == "complete"]
    assert len(done) >= n_ptq + 1, [r.get("error") for r in rows]
    # the search figures are mAP of the ONNX file in its runtime, with NMS outside it
    for r in done:
        assert 0 <= r["figures"]["accuracy"] <= 1
    base_prov = doc["baseline"]["provenance"]["accuracy"]
    assert "COCO mAP@[.5:.95]" in base_prov and "onnxruntime" in base_prov.lower()
    # the FP32 baseline's file mAP equals the torch model's mAP on the same images (same post-process)
    sub = val.take(FAST.search_samples, seed=0)
    torch_map = es.runtime.evaluate_detector(model, sub, runtime="torch")["map"]
    assert doc["baseline"]["figures"]["accuracy"] == pytest.approx(torch_map, abs=0.01)
    # pruned candidates were recovered (fine-tune or distillation) and their steps say so, in mAP
    rec = [r for r in done if r["params"].get("target_macs") and r["params"].get("finetune_steps")]
    assert len(rec) == n_pruned == 4, [r.get("error") for r in rows]
    chosen = doc["chosen"]
    assert f"{len(val)} images" in chosen["final_provenance"]["accuracy"]
    page = (out / "report.md").read_text()
    assert "mAP@[.5:.95]" in page
    assert "mAP@[.5:.95]" in res.report.summary()
    # INT8 candidates of a detector keep float the layers measured slower in integer here (Space.quant_placement)
    (q_step,) = [s for s in json.loads((out / "chosen" / "recipe.json").read_text())["steps"]
                 if s["technique"] == "quantize"]  # fmt: skip
    assert q_step["config"]["placement"] == "measured" and q_step["config"]["placement_threads"] == 1
    assert "placement measured here (ORT, 1 thread(s))" in q_step["summary"]
    # the chosen detector replays from its recipe and its file gives detector outputs
    again = load_chosen(model, out / "chosen")
    x = torch.stack([val[i][0] for i in range(4)])
    with torch.no_grad():
        assert again(x).shape == model(x).shape


def test_detector_recovery_runs_both_ways_with_the_detector_trainer(run):
    _, out, *_ = run
    done = {how: [json.loads(p.read_text()) for p in (out / "cache").glob(f"{how}-*/done.json")]
            for how in ("finetune", "distill")}  # fmt: skip
    assert len(done["finetune"]) == 1 and len(done["distill"]) == 1  # one structure, cached across calibrations
    for recs in done.values():
        (rec,) = recs
        assert "box_weight" in rec["config"] and rec["steps"] == 24  # a DetectTrainConfig: train_detector ran
        assert 0 <= rec["torch_accuracy_search"] <= 1
    assert done["distill"][0]["distill"]["losses"] == ["kd"]


def test_detector_optimize_refuses_what_it_cannot_do_in_one_line(detect_data, tmp_path):
    model, train, val = detect_data
    with pytest.raises(ConfigError, match=r"drop_blocks.*not searched for detectors"):
        optimize(model, data=(train, val), space=FAST.replace(drop_blocks=(0, 2)), out=tmp_path / "a")
    with pytest.raises(ConfigError, match=r"mixed_precision.*not searched for detectors"):
        optimize(model, data=(train, val), space=FAST.replace(mixed_precision=(False, True)), out=tmp_path / "b")
    with pytest.raises(ConfigError, match=r"equalize.*not searched for detectors"):
        optimize(model, data=(train, val), space=FAST.replace(equalize=(False, True)), out=tmp_path / "c")
    digits_train, digits_val = es.data.load("digits")
    with pytest.raises(DataError, match=r"detector, so data\['train'\] must be an edgeslim DetectionDataset"):
        optimize(model, data=(digits_train, digits_val), space=FAST, out=tmp_path / "d")
    with pytest.raises(DataError, match=r"has 3 classes but the detector 2"):
        optimize(tiny_detector(num_classes=2), data=(train, val), space=FAST, out=tmp_path / "e")
    with pytest.raises(DataError, match=r"ImageDataset"):
        optimize(TinyCNN(), data=(train, val), out=tmp_path / "f")


def test_cli_loads_detection_data_at_the_detectors_input_size(tmp_path):
    from edgeslim.pipeline._cli import _load_data

    folder = tiny_coco(tmp_path / "set", 8, 4)
    train, val = _load_data(f"coco:{folder}", tiny_detector())  # built for 64x64 inputs
    assert train.image_size == val.image_size == 64 and len(train) == 8 and len(val) == 4
    with pytest.raises(DataError, match=r"multiple of 32"):
        _load_data(f"coco:{folder}", es.models.YoloMobileNetV2(3, width=16, width_mult=0.25, input_size=100))


SPEC = "edgeslim.models:YoloMobileNetV2(num_classes=3, width=16, width_mult=0.25, input_size=64)"


def test_cli_quantizes_prunes_and_exports_a_detector_on_coco_data(detect_data, tmp_path):
    import subprocess
    import sys

    model, train, _ = detect_data
    weights = tmp_path / "w.pt"
    torch.save(model.state_dict(), weights)

    def cli(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "edgeslim.cli", args[0], SPEC, "--weights", str(weights), "--dataset", train.name]
        return subprocess.run([*cmd, *args[1:], "--json"], capture_output=True, text=True)

    q = cli("quantize", "--samples", "32", "--out", str(tmp_path / "q.onnx"))
    assert q.returncode == 0, q.stderr
    res = json.loads(q.stdout)
    assert res["artifact"]["precision"] == "int8" and res["quantize"]["capture"] == "onnx"
    # the file is a detector: its mAP on the val split is close to the float model's
    art = es.core.artifact.Artifact.load(tmp_path / "q.onnx")
    _, val = es.data.load(train.name, size=64)
    m_q = es.runtime.evaluate_detector(art, val, runtime="onnxruntime")["map"]
    m_f = es.runtime.evaluate_detector(model, val, runtime="torch")["map"]
    assert m_q > 0.5 * m_f > 0
    # `measure` on the file with the detection data: its mAP in ONNX Runtime, at the file's own input size
    meas = subprocess.run([sys.executable, "-m", "edgeslim.cli", "measure", str(tmp_path / "q.onnx"), "--dataset",
                           train.name, "--runs", "3", "--json"], capture_output=True, text=True)  # fmt: skip
    assert meas.returncode == 0, meas.stderr
    figures = json.loads(meas.stdout)["figures"]
    assert abs(figures["map"]["value"] - m_q) < 1e-6 and "accuracy" not in figures
    p = cli("prune", "--target-macs", "0.4", "--round-to", "4", "--recalibrate-bn", "32", "--out",
            str(tmp_path / "p.recipe"))  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["report"]["mac_reduction"] >= 0.35
    e = cli("export", "--out", str(tmp_path / "f.onnx"))
    assert e.returncode == 0, e.stderr
    assert json.loads(e.stdout)["validation"]["cosine"] > 0.9999
    bad = subprocess.run(
        [sys.executable, "-m", "edgeslim.cli", "quantize", SPEC.replace("num_classes=3", "num_classes=2"),
         "--dataset", train.name, "--out", str(tmp_path / "b.onnx")], capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 2 and "has 3 classes but model" in bad.stderr and "Traceback" not in bad.stderr

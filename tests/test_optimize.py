"""edgeslim.optimize: budget and space validation, a real search on a trained tiny model, the report, the
closest candidate when nothing meets the budget, resume checks, and a SIGKILL-and-resume run in a subprocess."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeslim.core.errors import ConfigError, DataError, OutputExistsError
from edgeslim.core.io import save_torch
from edgeslim.pipeline import Budget, Space, load_chosen, optimize, pareto_front
from edgeslim.pipeline._space import describe

SRC = Path(__file__).resolve().parents[1] / "src"
TESTS = Path(__file__).resolve().parent

# a small space on TinyCNN (8 channels): pruning needs round_to=1 to remove anything
FAST = Space(
    drop_blocks=(0,),
    probe_structures=False,
    target_macs=(0.0, 0.3),
    prune_scope=("layer",),
    keep_early_layers=(False,),
    round_to=1,
    bn_samples=256,
    finetune_steps=(0, 20),
    recovery=("finetune",),
    calibration=("minmax", "mse"),
    calib_samples=128,
    cheap_trials=2,
    search_samples=300,
    latency_runs=20,
)


# ------------------------------------------------------------------------------------------------ Budget
def test_budget_refuses_contradictions_and_unknowns_naming_field_and_value(tmp_path):
    with pytest.raises(ConfigError, match=r"max_latency_ms=2\.0 and min_speedup=3\.0 both limit latency"):
        Budget(max_latency_ms=2.0, min_speedup=3.0)
    with pytest.raises(ConfigError, match=r"Budget.target='raspbery-pi-4'.*did you mean 'raspberry-pi-4'"):
        Budget(target="raspbery-pi-4")
    with pytest.raises(ConfigError, match=r"Budget.runtime='onnxrt'.*did you mean 'onnxruntime'"):
        Budget(runtime="onnxrt")
    with pytest.raises(ConfigError, match=r"Budget.runtime='torch' is not allowed.*ONNX"):
        Budget(runtime="torch")
    with pytest.raises(ConfigError, match=r"max_accuracy_drop=5 .*fraction"):
        Budget(max_accuracy_drop=5)
    with pytest.raises(ConfigError, match=r"min_speedup='lots'"):
        Budget(min_speedup="lots")
    with pytest.raises(ConfigError, match=r"threads=0"):
        Budget(threads=0)
    with pytest.raises(ConfigError, match=r"prefer='speed'.*valid: latency, accuracy, size"):
        Budget(prefer="speed")
    # a latency budget for a device without a latency predictor (an NPU profile that gives no efficiency)
    prof = tmp_path / "npu.yaml"
    prof.write_text(
        textwrap.dedent("""\
        device:
          name: mystery-npu
          description: an NPU with no published efficiency
          kind: npu
          peak_gops: {int8: 1000.0}
          mem_bandwidth_gbs: 10.0
          ram_mb: 512
          tdp_w: 2.0
          process_nm: 16
          precisions: [int8]
          operators: all
          fallback: none
          sources: {peak_gops: assumption}
        """)
    )
    with pytest.raises(ConfigError, match=r"min_speedup=2.*mystery-npu.*no latency predictor"):
        Budget(min_speedup=2.0, target=str(prof))
    assert Budget(max_size_mb=1.0, target=str(prof)).device().name == "mystery-npu"  # a size budget is fine
    assert Budget.from_yaml(Budget(min_speedup=3, target="raspberry-pi-4").to_yaml()) == Budget(
        min_speedup=3, target="raspberry-pi-4"
    )


def test_budget_check_says_which_limit_failed_and_by_how_much():
    b = Budget(max_accuracy_drop=0.005, min_speedup=3.0, max_size_mb=1.0)
    base = {"accuracy": 0.90, "latency_ms": 9.0}
    ok = {"accuracy": 0.896, "latency_ms": 2.9, "size_mb": 0.5}
    assert b.check(ok, base) == [] and all(c <= 0 for c in b.constraint_values(ok, base).values())
    bad = {"accuracy": 0.88, "latency_ms": 4.5, "size_mb": 1.5}
    v = {x.field: x for x in b.check(bad, base)}
    assert set(v) == {"max_accuracy_drop", "min_speedup", "max_size_mb"}
    assert "accuracy drop 2.00 pt > 0.50 pt allowed (1.50 pt over)" in v["max_accuracy_drop"].text
    assert v["min_speedup"].value == pytest.approx(2.0) and v["min_speedup"].excess == pytest.approx(0.5)
    assert "speedup 2.00x < 3x required" in v["min_speedup"].text
    assert v["max_size_mb"].excess == pytest.approx(0.5)
    assert all(c > 0 for c in b.constraint_values(bad, base).values())


# ------------------------------------------------------------------------------------------------ Space
def test_space_is_validated_canonical_and_queues_cheap_trials_first():
    with pytest.raises(ConfigError, match=r"Space.quantize=\('yes',\)"):
        Space(quantize=("yes",))
    with pytest.raises(ConfigError, match=r"target_macs=\(0.0, 1.5\)"):
        Space(target_macs=(0.0, 1.5))
    with pytest.raises(ConfigError, match=r"valid: entropy, minmax, mse, percentile"):
        Space(calibration=("kl",))
    sp = FAST
    cands = sp.all_candidates()
    # 1 unpruned + 2 pruned float chains (ft 0 / 20), each with no PTQ or 2x2x2x2 PTQ variants
    assert len(cands) == 3 * (1 + 16)
    assert len({json.dumps(c, sort_keys=True) for c in cands}) == len(cands)
    cheap = sp.cheap()
    assert len(cheap) == 2 and all(c["target_macs"] == 0 and c["quantize"] for c in cheap)
    assert cheap[0] != cheap[1]
    c = sp.canonical({"target_macs": 0.0, "quantize": False, "per_channel": True, "finetune_steps": 20})
    assert c["per_channel"] is None and c["finetune_steps"] is None  # inactive dimensions are dropped
    assert describe(c) == "FP32 (unchanged)"
    assert Space.from_yaml(sp.to_yaml()) == sp


# ------------------------------------------------------------------------------------------------ search
@pytest.fixture(scope="module")
def run(digits_model, tmp_path_factory):
    model, train, val = digits_model
    out = tmp_path_factory.mktemp("opt") / "run"
    torch.set_num_threads(1)
    try:
        res = optimize(
            model,
            data=(train, val),
            budget=Budget(max_accuracy_drop=0.03),
            space=FAST,
            max_trials=6,
            out=out,
            seed=0,
            progress=False,
        )
    finally:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    return res, out, model, train, val


def test_optimize_searches_measures_and_saves_a_validated_choice(run):
    res, out, model, _, val = run
    doc = json.loads((out / "report.json").read_text())
    rows = doc["trials"]["rows"]
    assert doc["trials"]["complete"] + doc["trials"]["failed"] == 6
    # the cheap PTQ-only candidates ran first
    assert all(r["params"]["target_macs"] == 0 and r["params"]["quantize"] for r in rows[:2])
    # every completed trial has measured figures (latency on the runtime, accuracy on the search subset)
    done = [r for r in rows if r["state"] == "complete"]
    assert done and all(r["figures"]["latency_ms"] > 0 and 0 <= r["figures"]["accuracy"] <= 1 for r in done)
    assert res.meets_budget and not res.violations
    # the choice was re-measured on the whole validation split, not the search proxy
    chosen = doc["chosen"]
    assert f"on {len(val)} samples" in chosen["final_provenance"]["accuracy"]
    assert "interleaved" in chosen["final_provenance"]["latency_ms"]
    assert doc["baseline_final"]["accuracy"] - chosen["final"]["accuracy"] <= 0.03 + 1e-9
    # with prefer=latency the choice is the fastest candidate that met the budget on the search figures
    ok = [r for r in done if not r["violations"]]
    assert chosen["trial"] == min(ok, key=lambda r: (r["figures"]["latency_ms"], -r["figures"]["accuracy"]))["number"]
    # the artifact is the validated ONNX file of the chosen model
    art = res.artifact
    assert art.path == out / "chosen" / "model.onnx" and art.validation["cosine"] > 0.99
    import onnxruntime as ort

    x = val.normalized()[:64]
    sess = ort.InferenceSession(str(art.path), providers=["CPUExecutionProvider"])
    y_onnx = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        y_torch = res.model(x).numpy()
    assert (y_onnx.argmax(1) == y_torch.argmax(1)).mean() >= 0.95
    # the saved recipe rebuilds the same model on a fresh copy of the input model
    again = load_chosen(model, out / "chosen")
    with torch.no_grad():
        assert torch.equal(again(x), res.model(x))
    rec = json.loads((out / "chosen" / "recipe.json").read_text())
    assert rec["params"] == chosen["params"] and rec["meets_budget"] is True


def test_report_has_pareto_plot_budget_line_trial_table_and_provenance(run):
    res, out, *_ = run
    page = (out / "report.html").read_text()
    assert page.count('<svg xmlns="http://www.w3.org/2000/svg" class="pareto"') == 2
    assert 'class="chosen"' in page and "accuracy floor (3 pt drop)" in page
    assert (
        "measured on onnxruntime" in page
        and "<script" not in page
        and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    )
    doc = res.report.to_dict()
    for r in doc["trials"]["rows"]:
        assert f"<td>{r['number']}</td>" in page
    md = (out / "report.md").read_text()
    assert "Meets the budget" in md and "| # | candidate |" in md
    assert res.report.technique == "optimize" and "chosen trial" in res.report.summary()
    pts = [(r["figures"]["accuracy"], r["figures"]["latency_ms"]) for r in doc["trials"]["rows"] if r["figures"]]
    front = pareto_front(pts)
    assert front and all(
        not any(a2 >= pts[i][0] and l2 <= pts[i][1] and (a2, l2) != pts[i] for a2, l2 in pts) for i in front
    )


def _chromium() -> str | None:
    import shutil

    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.mark.skipif(
    _chromium() is None,
    reason="headless Chromium is not installed (Debian: apt-get install chromium); "
    "the HTML report's render check needs it",
)
def test_report_renders_in_headless_chromium_with_its_plots_and_no_errors(run, tmp_path):
    res, out, *_ = run
    page = out / "report.html"
    common = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
    ]
    dom = subprocess.run(
        common + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120, check=False
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    # the browser parsed the page: both plots, one marker per completed trial, the chosen ring and the budget line
    assert dom.stdout.count('class="pareto"') == 2
    n_done = res.report.to_dict()["trials"]["complete"]
    plot = dom.stdout.split('class="pareto"')[1]
    assert plot.count("<circle") >= n_done + 1 and 'class="chosen"' in plot and "accuracy floor" in plot
    bad = [
        ln for ln in dom.stderr.splitlines() if "CONSOLE" in ln or "Failed to load resource" in ln or "Uncaught" in ln
    ]
    assert not bad, bad
    shot = tmp_path / "report.png"
    r = subprocess.run(
        common + ["--window-size=1200,2000", f"--screenshot={shot}", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0 and shot.stat().st_size > 20_000  # a rendered page, not a blank one


def test_rerun_resumes_without_new_work_and_refuses_other_runs(run):
    res, out, model, train, val = run
    n_before = len(json.loads((out / "report.json").read_text())["trials"]["rows"])
    again = optimize(
        model,
        data=(train, val),
        budget=Budget(max_accuracy_drop=0.03),
        space=FAST,
        max_trials=6,
        out=out,
        seed=0,
        progress=False,
    )
    doc = again.report.to_dict()
    assert len(doc["trials"]["rows"]) == n_before  # max_trials already reached: nothing re-run
    assert doc["chosen"]["params"] == res.report.to_dict()["chosen"]["params"]
    with pytest.raises(ConfigError, match="holds a run of another budget"):
        optimize(
            model,
            data=(train, val),
            budget=Budget(max_accuracy_drop=0.01),
            space=FAST,
            max_trials=6,
            out=out,
            progress=False,
        )
    with pytest.raises(ConfigError, match="another model"):  # the same class, other weights
        optimize(
            model.__class__(),
            data=(train, val),
            budget=Budget(max_accuracy_drop=0.03),
            space=FAST,
            max_trials=6,
            out=out,
            progress=False,
        )
    with pytest.raises(OutputExistsError, match="pass resume=True"):
        optimize(
            model,
            data=(train, val),
            budget=Budget(max_accuracy_drop=0.03),
            space=FAST,
            max_trials=6,
            out=out,
            resume=False,
            progress=False,
        )


def test_nothing_meets_the_budget_saves_and_reports_the_closest(digits_model, tmp_path):
    model, train, val = digits_model
    sp = FAST.replace(target_macs=(0.0,), quantize=(True,), cheap_trials=2)
    res = optimize(
        model,
        data=(train, val),
        budget=Budget(max_accuracy_drop=0.0, min_speedup=50.0, target="raspberry-pi-4"),
        space=sp,
        max_trials=2,
        out=tmp_path / "r",
        progress=False,
    )
    assert not res.meets_budget
    fields = {v["field"] for v in res.violations}
    assert "min_speedup" in fields
    sp_v = next(v for v in res.violations if v["field"] == "min_speedup")
    assert sp_v["value"] < 50 and sp_v["excess"] > 1 and "< 50x required" in sp_v["text"]
    assert res.artifact.path.is_file() and (tmp_path / "r" / "chosen" / "recipe.json").is_file()
    md = (tmp_path / "r" / "report.md").read_text()
    assert "Nothing met the budget" in md and sp_v["text"].replace("<", "\\<") in md
    assert "predicted for raspberry-pi-4" in md


def test_bad_data_and_storage_fail_with_one_clear_line(digits_model, tmp_path):
    model, train, val = digits_model
    with pytest.raises(DataError, match=r"data=.*\(train, val\)"):
        optimize(model, data=train, out=tmp_path / "a", progress=False)
    with pytest.raises(DataError, match="single class"):
        optimize(
            model, data=(train, val.subset(np.flatnonzero(val.labels.numpy() == 0))), out=tmp_path / "b", progress=False
        )
    with pytest.raises(ConfigError, match=r"max_trials=0"):
        optimize(model, data=(train, val), max_trials=0, out=tmp_path / "c", progress=False)
    with pytest.raises(ConfigError, match=r"does not answer|needs a database driver.*pip install psycopg2") as e:
        optimize(
            model,
            data=(train, val),
            storage="postgresql://bob:s3cret@127.0.0.1:1/nodb",
            max_trials=1,
            out=tmp_path / "d",
            progress=False,
        )
    assert "s3cret" not in str(e.value) and "\n" not in str(e.value)


def test_gate_stops_hopeless_pruned_candidates_before_fine_tuning(digits_model, tmp_path):
    model, train, val = digits_model
    sp = FAST.replace(target_macs=(0.6,), quantize=(False,), finetune_steps=(20,), finetune_gate=0.02)
    res = optimize(
        model,
        data=(train, val),
        budget=Budget(max_accuracy_drop=0.5),
        space=sp,
        max_trials=1,
        out=tmp_path / "g",
        progress=False,
    )
    doc = res.report.to_dict()
    row = doc["trials"]["rows"][0]
    assert doc["trials"]["gated"] == 1 and row["state"] == "pruned" and "finetune_gate=2 pt" in row["gated"]
    assert not list((tmp_path / "g" / "cache").glob("finetune-*"))  # the expensive step never ran
    assert doc["chosen"]["trial"] is None  # nothing completed: the input model is what is reported
    assert "gated: not fine-tuned" in (tmp_path / "g" / "report.md").read_text()


def test_ctrl_c_mid_trial_is_requeued_on_resume(digits_model, tmp_path, monkeypatch):
    import edgeslim.pipeline._optimize as opt

    model, train, val = digits_model
    real = opt.build_candidate
    calls = {"n": 0}

    def interrupted_second_trial(ctx, params):
        calls["n"] += 1
        if calls["n"] == 3:  # the baseline, trial 0, then Ctrl-C in trial 1
            raise KeyboardInterrupt
        return real(ctx, params)

    monkeypatch.setattr(opt, "build_candidate", interrupted_second_trial)
    sp = FAST.replace(target_macs=(0.0,), cheap_trials=2)
    kw = dict(
        data=(train, val),
        budget=Budget(max_accuracy_drop=0.05),
        space=sp,
        max_trials=3,
        out=tmp_path / "c",
        progress=False,
    )
    with pytest.raises(KeyboardInterrupt):
        optimize(model, **kw)
    monkeypatch.setattr(opt, "build_candidate", real)
    res = optimize(model, **kw)
    rows = res.report.to_dict()["trials"]["rows"]
    failed = [r for r in rows if r["state"] == "fail"]
    assert len(failed) == 1 and failed[0]["number"] == 1
    retry = [r for r in rows if r.get("retry_of") == 1]
    assert len(retry) == 1 and retry[0]["state"] == "complete" and retry[0]["params"] == failed[0]["params"]
    assert res.report.to_dict()["trials"]["complete"] == 3


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_optimize_runs_and_exits_3_when_nothing_meets_the_budget(digits_model, tmp_path, capsys, monkeypatch):
    from edgeslim.cli import main

    model, *_ = digits_model
    weights = save_torch(model.state_dict(), tmp_path / "tiny.pt")
    space = tmp_path / "space.yaml"
    space.write_text(FAST.replace(cheap_trials=1).to_yaml())
    monkeypatch.syspath_prepend(str(TESTS))
    common = [
        "tiny:TinyCNN",
        "--weights",
        str(weights),
        "--dataset",
        "digits",
        "--target",
        "jetson-orin-nano",
        "--trials",
        "2",
        "--space",
        str(space),
        "--json",
    ]
    assert main(["optimize", *common, "--max-drop", "3", "--min-speedup", "0.2", "--out", str(tmp_path / "run")]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["meets_budget"] is True and Path(got["paths"]["artifact"]).is_file()
    # an impossible speedup: exit 3, the closest candidate still saved, the failed limit named with its amount
    assert main(["optimize", *common, "--max-drop", "3", "--min-speedup", "1000", "--out", str(tmp_path / "no")]) == 3
    got = json.loads(capsys.readouterr().out)
    assert got["meets_budget"] is False and Path(got["paths"]["artifact"]).is_file()
    assert any("speedup" in str(v) for v in got["violations"])
    assert main(["optimize", "tiny:TinyCNN", "--max-drop", "-1", "--out", str(tmp_path / "x"), "--json"]) == 2
    assert "--max-drop=-1" in json.loads(capsys.readouterr().out)["message"]


# ------------------------------------------------------------------------------------------------ kill + resume
WORKER = """
import json, sys
import torch
torch.set_num_threads(1)
from tiny import TinyCNN
from edgeslim.data import load
from edgeslim.pipeline import Budget, Space, optimize
model = TinyCNN()
model.load_state_dict(torch.load(sys.argv[2], weights_only=True))
train, val = load("digits")
space = Space.from_yaml(sys.argv[3])
res = optimize(model.eval(), data=(train, val), space=space, out=sys.argv[1], seed=0, max_trials=int(sys.argv[4]),
               budget=Budget(max_accuracy_drop=0.03, min_speedup=1.05, target="jetson-orin-nano"), progress=False)
print(json.dumps({"trial": res.report.data["chosen"]["trial"], "params": res.recipe["params"]}))
"""


def _completed(db: Path) -> dict[int, tuple]:
    """COMPLETE trials in an optimize study.db: number -> (values, datetime_complete)."""
    if not db.is_file():
        return {}
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        rows = con.execute(
            "select t.number, v.objective, v.value, t.datetime_complete from trials t join "
            "trial_values v on v.trial_id = t.trial_id where t.state = 'COMPLETE'"
        ).fetchall()
        con.close()
    except sqlite3.Error:
        return {}
    out: dict[int, dict] = {}
    for n, obj, val, when in rows:
        out.setdefault(n, {})[obj] = (val, when)
    return {n: (tuple(v[k][0] for k in sorted(v)), next(iter(v.values()))[1]) for n, v in out.items()}


def test_sigkill_then_resume_keeps_every_trial_and_the_same_choice(digits_model, tmp_path):
    import optuna

    model, *_ = digits_model
    weights = save_torch(model.state_dict(), tmp_path / "base.pt")
    space = tmp_path / "space.yaml"
    space.write_text(FAST.replace(finetune_steps=(0, 40)).to_yaml())
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS)]), "OMP_NUM_THREADS": "1"}
    n = 6

    def start(out: Path) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, str(script), str(out), str(weights), str(space), str(n)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    ref_out, kill_out = tmp_path / "ref", tmp_path / "killed"
    ref, victim = start(ref_out), start(kill_out)
    deadline = time.time() + 120
    while len(_completed(kill_out / "study.db")) < 3:
        assert victim.poll() is None, f"the run ended before it was killed: {victim.stderr.read()[-2000:]}"
        assert time.time() < deadline, "no 3 trials completed within 120 s"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    before = _completed(kill_out / "study.db")
    assert 3 <= len(before) < n
    con = sqlite3.connect(str(kill_out / "study.db"))
    running = {r[0] for r in con.execute("select number from trials where state = 'RUNNING'")}
    con.close()
    resumed = subprocess.run(
        [sys.executable, str(script), str(kill_out), str(weights), str(space), str(n)],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    r_out, r_err = ref.communicate(timeout=180)
    assert ref.returncode == 0, r_err[-3000:]
    after = _completed(kill_out / "study.db")
    # no completed trial lost: the same values, completed at the same time (not re-run)
    assert all(after.get(k) == v for k, v in before.items())

    def trials(out: Path) -> list:
        name = optuna.get_all_study_names(f"sqlite:///{out / 'study.db'}")[0]
        return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}").get_trials()

    got, want = trials(kill_out), trials(ref_out)
    done = [t for t in got if t.state.name == "COMPLETE"]
    keys = [json.dumps(t.user_attrs["params"], sort_keys=True) for t in done]
    assert len(keys) == len(set(keys)) == n  # none duplicated, none missing
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in got)  # nothing left RUNNING or failed
    # the resumed study is the uninterrupted one: the same candidates in the same order, the same figures
    assert [(t.number, t.state.name, t.user_attrs.get("params")) for t in got] == [
        (t.number, t.state.name, t.user_attrs.get("params")) for t in want
    ]
    assert [t.values for t in done] == [t.values for t in want if t.state.name == "COMPLETE"]
    assert json.loads(resumed.stdout.strip().splitlines()[-1]) == json.loads(r_out.strip().splitlines()[-1])
    # a trial the kill left RUNNING was re-queued in place: same number, completed by the resumed run
    requeued = {t.number for t in got if t.user_attrs.get("requeued")}
    assert requeued == running and all(got[k].state.name == "COMPLETE" for k in running)


def test_host_info_records_the_vector_isa_flags():
    from edgeslim.core.metrics import ISA_FLAGS, host_info

    if not Path("/proc/cpuinfo").is_file():
        pytest.skip("no /proc/cpuinfo on this system")
    info = host_info()
    flags = set(Path("/proc/cpuinfo").read_text().split("\n\n")[0].split())
    assert info["isa"].split() == [f for f in ISA_FLAGS if f in flags] or info["isa"].startswith("none of")

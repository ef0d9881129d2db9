"""edgeslim.optimize's search space beyond PTQ: recovery by distillation (a pruned + distilled + quantized chain that
replays from its recipe), the relative multi-fidelity gate, max_minutes inside a trial, the deployment choice
(runtime, threads) recorded with the chosen artifact, and low-rank factorization and weight clustering as steps
(cached, measured, replayed from the chosen recipe; clustering judged by the zipped size)."""

import json
import time

import pytest
import torch

import edgeslim as es
from edgeslim.core.errors import ConfigError
from edgeslim.pipeline import Budget, Space, load_chosen, optimize, pareto_front
from edgeslim.pipeline._candidate import Context, DeadlineReached, build_candidate, float_model, measure_candidate
from edgeslim.pipeline._space import describe, recovery_steps
from edgeslim.pipeline._store import Cache
from edgeslim.runtime import missing
from edgeslim.train import evaluate

# TinyCNN has 8 channels: round_to=1 so pruning removes something
BASE = dict(
    drop_blocks=(0,),
    probe_structures=False,
    prune_scope=("layer",),
    keep_early_layers=(False,),
    round_to=1,
    bn_samples=256,
    calibration=("minmax",),
    per_channel=(True,),
    equalize=(False,),
    bias_correction=(False,),
    calib_samples=128,
    cheap_trials=0,
    search_samples=300,
    latency_runs=20,
)


def _steps(cache, kind: str) -> list:
    """The cached step folders of one kind (``finetune``, ``distill``, ...), without their lock files."""
    return [p for p in cache.glob(f"{kind}-*") if p.is_dir()]


def _ctx(model, train, val, sp, cache, budget=None) -> Context:
    """A trial context on ``model`` with ``sp``, the step cache in ``cache``."""
    return Context(
        base=model,
        base_key="k",
        train=train,
        val=val,
        search_val=val.take(300, seed=0),
        example_inputs=val.normalized()[:1],
        space=sp,
        budget=budget or Budget(),
        seed=0,
        cache=Cache(cache),
    )


def test_new_dimensions_are_validated_and_canonical():
    with pytest.raises(ConfigError, match=r"Space.recovery=\('kd',\).*finetune, distill"):
        Space(recovery=("kd",))
    with pytest.raises(ConfigError, match=r"Space.prune_scope=\('all',\).*layer, global"):
        Space(prune_scope=("all",))
    with pytest.raises(ConfigError, match=r"Space.runtimes=\('onnxrt',\).*did you mean 'onnxruntime'"):
        Space(runtimes=("onnxrt",))
    with pytest.raises(ConfigError, match=r"Space.threads=\(0,\)"):
        Space(threads=(0,))
    with pytest.raises(ConfigError, match=r"Space.gate_margin=2"):
        Space(gate_margin=2)
    sp = Space(**BASE, target_macs=(0.0, 0.25, 0.75), finetune_steps=(0, 40), recovery=("finetune", "distill"))
    # recovery only applies to a pruned candidate that has recovery steps; FP16 only when not INT8
    c = sp.canonical({"target_macs": 0.25, "finetune_steps": 0, "recovery": "distill", "quantize": True, "fp16": True})
    assert c["recovery"] is None and c["fp16"] is None and c["mixed_precision"] is False
    c = sp.canonical({"target_macs": 0.75, "finetune_steps": 40, "recovery": "distill", "quantize": False})
    assert c["recovery"] == "distill" and c["fp16"] is False and c["runtime"] is None and c["threads"] is None
    assert recovery_steps(sp, c) == 60  # 40 steps at 50 % MACs removed -> 60 at 75 %
    assert recovery_steps(sp.replace(scale_steps=False), c) == 40
    assert "distill 60 steps" in describe(c, sp)
    # per depth: no pruning (1 float chain) + 2 depths x (no recovery + 2 recoveries), each x (INT8 + FP32)
    assert len(sp.all_candidates()) == (1 + 2 * 3) * 2
    assert Space.from_yaml(sp.to_yaml()) == sp


def test_space_must_fit_the_budget(digits_model, tmp_path):
    model, train, val = digits_model
    kw = dict(data=(train, val), max_trials=1, progress=False)
    with pytest.raises(ConfigError, match=r"Space.threads=\(1, 2\) has 2 > Budget.threads=1"):
        optimize(model, budget=Budget(threads=1), space=Space(**BASE, threads=(1, 2)), out=tmp_path / "a", **kw)
    with pytest.raises(ConfigError, match=r"mixed_precision=true .* needs Budget.max_accuracy_drop"):
        optimize(
            model,
            budget=Budget(max_accuracy_drop=None, max_size_mb=1.0),
            space=Space(**BASE, mixed_precision=(True,)),
            out=tmp_path / "b",
            **kw,
        )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before anything is written


def test_pruned_distilled_quantized_candidate_replays_from_its_recipe(digits_model, tmp_path):
    model, train, val = digits_model
    sp = Space(**BASE, target_macs=(0.3,), finetune_steps=(20,), recovery=("distill",), quantize=(True,))
    out = tmp_path / "d"
    res = optimize(
        model, data=(train, val), budget=Budget(max_accuracy_drop=0.5), space=sp, max_trials=1, out=out, progress=False
    )
    doc = res.report.to_dict()
    c = doc["chosen"]
    assert c["trial"] == 0 and c["params"]["recovery"] == "distill" and c["params"]["quantize"]
    assert set(c["steps"]) == {"prune", "distill", "export"}
    assert c["steps"]["distill"]["steps"] == recovery_steps(sp, c["params"]) == 12  # 20 at 50 % -> 12 at 30 %
    assert "distill 12 steps" in c["description"] and "INT8" in c["description"]
    assert len(_steps(out / "cache", "distill")) == 1 and not _steps(out / "cache", "finetune")
    # the recipe names every step in order and rebuilds the chosen model on a fresh instance of the input model
    recipe = json.loads((out / "chosen" / "recipe.json").read_text())
    assert [s["technique"] for s in recipe["steps"]] == ["prune", "distill", "quantize"]
    again = load_chosen(model, out / "chosen")
    x = val.normalized()[:64]
    with torch.no_grad():
        assert torch.equal(again(x).argmax(1), res.model(x).argmax(1))
        assert torch.allclose(again(x), res.model(x), atol=1e-5)
    # and the artifact computes what the recipe's model computes (its validation against torch)
    assert res.artifact.validation["top1_agreement"] >= 0.95
    # the pruned model really is smaller than the input
    assert c["steps"]["prune"]["macs_after"] < 0.75 * c["steps"]["prune"]["macs_before"]


def test_relative_gate_skips_recovery_when_recalibrated_accuracy_ranks_low(digits_model, tmp_path):
    model, train, val = digits_model
    # four candidates at one depth: layer/global ranking x BatchNorm recalibration on/off; margin 0 means a
    # candidate recalibrated worse than one already seen at this depth is not fine-tuned
    sp = Space(
        **{**BASE, "prune_scope": ("layer", "global")},
        target_macs=(0.5,),
        recalibrate_bn=(True, False),
        finetune_steps=(20,),
        recovery=("finetune",),
        quantize=(False,),
        finetune_gate=None,
        gate_margin=0.0,
    )
    out = tmp_path / "g"
    res = optimize(
        model, data=(train, val), budget=Budget(max_accuracy_drop=0.5), space=sp, max_trials=4, out=out, progress=False
    )
    rows = [r for r in res.report.to_dict()["trials"]["rows"] if r.get("duplicate_of") is None]
    assert len(rows) == 4 and all(r["recal_accuracy"] is not None for r in rows)
    best = -1.0
    gated = 0
    for r in sorted(rows, key=lambda r: r["number"]):
        if r["gated"]:
            gated += 1
            assert r["state"] == "pruned" and "gate_margin=0 pt" in r["gated"]
            assert r["recal_accuracy"] < best  # ranked below a candidate already seen at this depth
        else:
            assert r["state"] == "complete" and r["recal_accuracy"] >= best
            assert "finetune" not in r["cached_steps"]  # recovered in this trial, not taken from the cache
        best = max(best, r["recal_accuracy"])
    assert gated >= 1
    # only the candidates that earned their recovery were fine-tuned
    assert len(_steps(out / "cache", "finetune")) == 4 - gated
    assert res.report.to_dict()["trials"]["gated"] == gated


def test_a_recovery_done_ungated_is_rebuilt_from_the_cache_whatever_the_gate_says(digits_model, tmp_path):
    """A promoted (ungated) candidate's recovery is cached; rebuilding it later, when the study's best recalibrated
    accuracy at its depth would gate it (the final choice is rebuilt after the sampler's trials), serves the cache
    instead of refusing the chosen candidate. A candidate not recovered yet is still gated."""
    from edgeslim.pipeline._candidate import Gated, depth

    model, train, val = digits_model
    sp = Space(
        **BASE, target_macs=(0.3,), finetune_steps=(0, 10), recovery=("finetune",), quantize=(False,), gate_margin=0.0
    )
    ctx = _ctx(model, train, val, sp, tmp_path / "cache")
    params = sp.canonical({"target_macs": 0.3, "finetune_steps": 10, "quantize": False})
    ctx.recal_best = {depth(params): 2.0}  # better than any accuracy: the relative gate refuses every recovery
    with pytest.raises(Gated, match="gate_margin=0 pt"):
        build_candidate(ctx, params)
    ctx.ungated = True  # promoted
    assert "cached" not in build_candidate(ctx, params)[3]["finetune"]
    ctx.ungated = False
    assert build_candidate(ctx, params)[3]["finetune"]["cached"]


def test_deadline_stops_a_long_recovery_within_a_step(digits_model, tmp_path):
    model, train, val = digits_model
    sp = Space(**BASE, target_macs=(0.3,), finetune_steps=(0, 200_000), recovery=("finetune",), quantize=(False,))
    ctx = _ctx(model, train, val, sp, tmp_path / "cache")
    # prune first (cached), so the deadline below falls inside the recovery however loaded the host is
    build_candidate(ctx, sp.canonical({"target_macs": 0.3, "finetune_steps": 0, "quantize": False}))
    params = sp.canonical({"target_macs": 0.3, "finetune_steps": 200_000, "quantize": False})
    ctx.deadline = time.perf_counter() + 3.0
    t0 = time.perf_counter()
    with pytest.raises(DeadlineReached, match=r"finetune stopped at step \d+ of 120000"):
        build_candidate(ctx, params)
    assert time.perf_counter() - t0 < 15  # the deadline, then one step (the recovery alone would take minutes)
    assert not any(Cache.done(d) for d in _steps(tmp_path / "cache", "finetune"))  # nothing partial cached
    ctx.deadline = time.perf_counter() - 1  # past it: no step starts at all (the pruned model is cached)
    with pytest.raises(DeadlineReached, match="stopped before finetune"):
        build_candidate(ctx, params)


def test_max_minutes_marks_the_stopped_trial_and_resume_queues_it_again(digits_model, tmp_path):
    model, train, val = digits_model
    sp = Space(**BASE, target_macs=(0.3,), finetune_steps=(200_000,), recovery=("finetune",), quantize=(False,))
    kw = dict(data=(train, val), budget=Budget(max_accuracy_drop=0.5), space=sp, out=tmp_path / "m", progress=False)
    t0 = time.perf_counter()
    res = optimize(model, max_minutes=0.3, **kw)
    took = time.perf_counter() - t0
    doc = res.report.to_dict()
    assert took < 0.3 * 60 + 30  # the deadline, one step and the final re-measurement of the input model
    row = doc["trials"]["rows"][0]
    assert row["state"] == "pruned" and "stopped at step" in row["deadline"]
    assert doc["trials"]["deadline"] == 1 and doc["trials"]["complete"] == 0
    assert "stopped by max_minutes" in (tmp_path / "m" / "report.md").read_text()
    res2 = optimize(model, max_minutes=0.2, **kw)
    assert res2.report.to_dict()["study"]["requeued_on_resume"] == [0]  # its candidate is tried again


@pytest.mark.skipif(bool(missing("openvino")), reason="openvino is not installed")
def test_runtime_choice_is_measured_and_recorded_with_the_chosen_artifact(digits_model, tmp_path):
    model, train, val = digits_model
    sp = Space(**BASE, target_macs=(0.0,), quantize=(False,), runtimes=("onnxruntime", "openvino"))
    out = tmp_path / "r"
    res = optimize(
        model, data=(train, val), budget=Budget(max_accuracy_drop=0.05), space=sp, max_trials=2, out=out, progress=False
    )
    doc = res.report.to_dict()
    rows = [r for r in doc["trials"]["rows"] if r["duplicate_of"] is None]
    assert [r["error"] for r in rows] == [None, None]
    assert sorted(r["deployment"]["runtime"] for r in rows) == ["onnxruntime", "openvino"]
    for r in rows:  # each measured on its own runtime
        assert r["params"]["runtime"] == r["deployment"]["runtime"]
    c = doc["chosen"]
    rt = c["params"]["runtime"]
    assert c["deployment"] == {"runtime": rt, "threads": 1} and f"on {rt}" in c["description"]
    assert c["final_provenance"]["latency_ms"].startswith(f"measured on {rt} ")  # on its own runtime
    assert f"chosen deployment: runtime {rt}, 1 thread(s)" in (out / "report.md").read_text()
    rec = json.loads((out / "chosen" / "model.onnx.json").read_text())
    assert rec["meta"]["deployment"] == {"runtime": rt, "threads": 1}
    assert json.loads((out / "chosen" / "recipe.json").read_text())["deployment"]["runtime"] == rt
    # the baseline stays the FP32 file on the budget's runtime
    assert doc["baseline"]["provenance"]["latency_ms"].startswith("measured on onnxruntime ")


def test_residual_blocks_are_a_search_dimension(tmp_path):
    """drop_blocks: validated, canonical (channel-only dimensions off without channel pruning, recovery on), and a
    candidate that removes a block, recovers and quantizes builds, replays from its recipe and is described."""
    from tiny import TinyRepeat

    from edgeslim.data import load
    from edgeslim.pipeline._optimize import _fit_blocks
    from edgeslim.train import TrainConfig, fit

    with pytest.raises(ConfigError, match=r"Space.drop_blocks=\(-1,\)"):
        Space(drop_blocks=(-1,))
    sp = Space(**{**BASE, "drop_blocks": (0, 1, 5)}, target_macs=(0.0, 0.3), finetune_steps=(0, 20))
    c = sp.canonical({"drop_blocks": 1, "target_macs": 0.0, "finetune_steps": 20, "quantize": True})
    assert c["prune_scope"] is None and c["keep_early"] is None and c["recovery"] == "finetune"
    assert recovery_steps(sp, c) == 20  # blocks only: the choice as given (no MAC depth to scale by)
    assert describe(c, sp).startswith("drop 1 residual block (BN recal, finetune 20 steps) + INT8")
    train, val = load("digits")
    torch.manual_seed(0)
    model = fit(TinyRepeat(), train, None, TrainConfig(epochs=3, lr=0.05, augment=False), progress=False).model
    fitted, note = _fit_blocks(sp, model, val.normalized()[:1])
    assert fitted.drop_blocks == (0, 1) and "has 3 removable residual block(s): drop_blocks choice(s) 5" in note
    ctx = _ctx(model.eval(), train, val, fitted, tmp_path / "cache")
    m, art, _, steps = build_candidate(ctx, c)
    assert list(steps)[:2] == ["blocks", "finetune"] and len(steps["blocks"]["removed"]) == 1
    assert art.validation["top1_agreement"] >= 0.95
    again = build_candidate(ctx, c)[3]  # every step cached
    assert again["blocks"]["cached"] and again["finetune"]["cached"]
    # BatchNorm recalibrated after the blocks, as prune(method="block", recalibrate_bn=...) does it in one step
    rec = steps["blocks"]
    assert rec["bn_recalibrated_on"] == sp.bn_samples and "torch_accuracy_search_before_bn_recal" in rec
    one_step = es.prune(
        model,
        es.PruneConfig(method="block", blocks=1, recalibrate_bn=sp.bn_samples),
        example_inputs=val.normalized()[:1],
        data=train,
    )
    probe = {**c, "finetune_steps": 0, "quantize": False}
    recal_model = float_model(ctx, probe)[0]
    x = val.normalized()[:64]
    with torch.no_grad():
        assert torch.allclose(recal_model.eval()(x), one_step.eval()(x), atol=1e-5)
    # channels pruned after the same blocks: the greedy ranking of that depth is served from the cache, not redone
    c2 = sp.canonical({**c, "target_macs": 0.3, "prune_scope": "layer", "keep_early": False, "finetune_steps": 0})
    steps2 = float_model(ctx, c2)[2]
    assert steps2["blocks"]["cached"] and steps2["blocks"]["removed"] == rec["removed"]
    assert "bn_recalibrated_on" not in steps2["blocks"] and not steps2["prune"].get("cached")


def test_structures_are_probed_then_swept_then_the_best_promoted(digits_model, tmp_path):
    """The multi-fidelity ladder: after the PTQ trial each pruning structure runs once without recovery (seconds);
    then every probed structure is swept with the smallest recovery; then the one whose swept accuracy is best
    among those meeting every non-accuracy limit is queued with the largest recovery, then the rest of the sweep's
    front, before the sampler."""
    import optuna

    model, train, val = digits_model
    sp = Space(
        **{**BASE, "probe_structures": True, "cheap_trials": 1},
        target_macs=(0.0, 0.3, 0.6),
        finetune_steps=(0, 10, 20),
        scale_steps=False,
        recovery=("finetune",),
        quantize=(True,),
        promote=1,
    )
    probes = sp.probes()
    assert [p["target_macs"] for p in probes] == [0.3, 0.6] and all(p["finetune_steps"] == 0 for p in probes)
    res = optimize(
        model,
        data=(train, val),
        budget=Budget(max_accuracy_drop=0.0),  # only accuracy limits: every probe may be swept and promoted
        space=sp,
        max_trials=7,  # the sampler's turn comes after the ladder: it stops there or at the 7th trial
        out=tmp_path / "run",
        progress=False,
    )
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    ts = sorted(study.get_trials(), key=lambda t: t.number)
    ts = [t for t in ts if t.number < 5 or t.user_attrs.get("promoted")]  # the ladder's trials
    params = [t.user_attrs["params"] for t in ts]
    assert params[0]["target_macs"] == 0.0 and [p["target_macs"] for p in params[1:3]] == [0.3, 0.6]
    assert all(ts[i].user_attrs.get("probe") for i in (1, 2))
    # the sweep: both structures (two points need no thinning), the smallest recovery, ungated, by latency
    assert all(ts[i].user_attrs.get("sweep") for i in (3, 4)) and study.user_attrs["swept"] == 2
    assert sorted(p["target_macs"] for p in params[3:5]) == [0.3, 0.6]
    assert all(p["finetune_steps"] == 10 for p in params[3:5])
    assert all(ts[i].state == optuna.trial.TrialState.COMPLETE for i in range(5))
    best = max(ts[3:5], key=lambda t: (t.user_attrs["figures"]["accuracy"], -t.number)).user_attrs["params"]
    assert ts[5].user_attrs.get("promoted") and params[5]["finetune_steps"] == 20
    assert params[5]["target_macs"] == best["target_macs"]
    # promote_front: then the sweep's other front structure (if it is on the front), fastest first
    pts = [(t.user_attrs["figures"]["accuracy"], t.user_attrs["figures"]["latency_ms"]) for t in ts[3:5]]
    front = [params[3 + i]["target_macs"] for i in pareto_front(pts)]
    more = [m for m in front if m != best["target_macs"]]
    assert study.user_attrs["promoted"] == 1 + len(more)
    assert [p["target_macs"] for p in params[6:]] == more and all(p["finetune_steps"] == 20 for p in params[6:])
    stages = [r["stage"] for r in sorted(res.report.data["trials"]["rows"], key=lambda r: r["number"])][: len(ts)]
    assert stages == [None, "probe", "probe", "sweep", "sweep", "promoted"] + ["promoted"] * len(more)
    assert "[sweep]" in (tmp_path / "run" / "report.md").read_text()


def test_promoted_recovery_is_sized_by_measured_step_time_and_time_left():
    """In a timed run the promoted rung fills ``promote_time_share`` of the time left, split evenly: each structure's
    recovery at its swept trial's measured seconds per step (less the trial's other costs), between the largest
    choice and 10 times it, rounded down to 100; untimed runs, a share of 0 or an unmeasured sweep: the largest."""
    from types import SimpleNamespace

    from edgeslim.pipeline._optimize import SIZED_MAX_FACTOR, sized_units

    sp = Space(
        **{**BASE, "probe_structures": True},
        target_macs=(0.0, 0.3, 0.6),
        finetune_steps=(0, 100, 300),
        recovery=("finetune",),
    )
    a, b = sp.probes()[:2]

    def swept(probe, rec_s, trial_s, **extra):
        p = sp.swept(probe)
        return SimpleNamespace(
            user_attrs={"params": p, "seconds": trial_s, "steps": {"finetune": {"seconds": rec_s, **extra}}}
        )

    picks = [sp.promoted(a), sp.promoted(b)]
    sweep = [swept(a, 10.0, 12.0), swept(b, 5.0, 6.0)]  # 0.1 s and 0.05 s per step; 2 s and 1 s of other costs
    assert SIZED_MAX_FACTOR == 10
    assert sized_units(sp, picks, sweep, 1000.0) == [2400, 3000]  # 250 s each: (250-2)/0.1, (250-1)/0.05 capped
    assert sized_units(sp, picks, sweep, None) == [300, 300]  # no time limit: the largest choice
    assert sized_units(sp, picks, sweep, 10.0) == [300, 300]  # too little time: never below the largest choice
    assert sized_units(sp.replace(promote_time_share=0.0), picks, sweep, 1000.0) == [300, 300]
    assert sized_units(sp, picks, sweep[:1], 1000.0) == [2400, 2400]  # b not swept: the sweep's median rate
    assert sized_units(sp, picks, [swept(a, 10.0, 12.0, cached=True)], 1000.0) == [300, 300]  # no measured time
    with pytest.raises(ConfigError, match=r"Space.promote_time_share=1.5 .*fraction in \[0, 0.9\]"):
        Space(promote_time_share=1.5)


def test_a_timed_run_promotes_with_a_sized_recovery_and_a_requeued_trial_keeps_its_rung(digits_model, tmp_path):
    """End to end: with max_minutes the promoted trial's recovery is sized by the time left (here the 10x cap of
    the largest choice on a fast model), recorded on the trial and in the chosen recipe; the same recovered model
    is then quantized as the most accurate PTQ trial was, and left in float (its recovery from the cache); a
    promoted trial stopped
    by the deadline is queued again with its rung (ungated, same sized recovery)."""
    import optuna

    from edgeslim.pipeline._optimize import _requeue_interrupted

    model, train, val = digits_model
    sp = Space(
        **{**BASE, "probe_structures": True, "cheap_trials": 1, "per_channel": (True, False)},
        target_macs=(0.0, 0.3),
        finetune_steps=(0, 5, 10),
        scale_steps=False,
        recovery=("finetune",),
        quantize=(True, False),
        promote=1,
        promote_front=False,
    )
    res = optimize(
        model,
        data=(train, val),
        budget=Budget(max_accuracy_drop=0.0),
        space=sp,
        max_trials=6,  # PTQ (per-channel), probe (per-tensor), sweep, promoted, requantized, float
        max_minutes=30,
        out=tmp_path / "run",
        progress=False,
    )
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    (promoted,) = [t for t in study.get_trials() if t.user_attrs.get("promoted")]
    assert promoted.user_attrs["recovery_units"] == 100 == promoted.user_attrs["params"]["finetune_steps"]
    assert promoted.params["finetune_steps"] == 10  # what the sampler sees: a choice of the space
    assert promoted.user_attrs["steps"]["finetune"]["steps"] == 100
    assert "finetune 100 steps" in " ".join(r["description"] for r in res.report.data["trials"]["rows"])
    requant, floated = [t for t in study.get_trials() if t.user_attrs.get("requant")]
    assert requant.number == promoted.number + 1 and requant.user_attrs["recovery_units"] == 100
    assert floated.user_attrs["params"]["quantize"] is False and floated.user_attrs["steps"]["finetune"]["cached"]
    assert floated.user_attrs["params"]["finetune_steps"] == 100
    rp, pp = requant.user_attrs["params"], promoted.user_attrs["params"]
    assert rp["per_channel"] is True and pp["per_channel"] is False  # the PTQ trial's choice vs the probes'
    assert {k: v for k, v in rp.items() if k != "per_channel"} == {k: v for k, v in pp.items() if k != "per_channel"}
    assert requant.user_attrs["steps"]["finetune"]["cached"]  # the promoted trial's recovery, not trained again
    stages = {r["number"]: r["stage"] for r in res.report.data["trials"]["rows"]}
    assert stages[requant.number] == "requant" and stages[promoted.number] == "promoted"
    # the deadline stops the promoted trial: it is queued again on its rung
    mem = optuna.create_study(directions=["maximize", "minimize"])
    t = mem.ask()
    for k, v in {"deadline": "stopped", "promoted": True, "recovery_units": 100}.items():
        t.set_user_attr(k, v)
    mem.tell(t, state=optuna.trial.TrialState.PRUNED)
    assert _requeue_interrupted(mem) == [0]
    (queued,) = [q for q in mem.get_trials() if q.state == optuna.trial.TrialState.WAITING]
    assert queued.user_attrs == {"retry_of": 0, "promoted": True, "recovery_units": 100}


def test_sweep_picks_fronts_spread_over_latency_feasible_first():
    """The sweep's choice: successive non-dominated fronts of (recalibrated accuracy, latency), a front with more
    points than places left thinned evenly over latency (its fastest and slowest kept); budget-feasible first."""
    from edgeslim.pipeline._optimize import sweep_picks

    # front: 0 (fast, poor), 1, 2, 3 (slow, good); 4 and 5 are dominated (by 1 and by 2)
    pts = [(0.1, 1.0), (0.5, 2.0), (0.8, 3.0), (0.9, 4.0), (0.4, 2.5), (0.7, 3.5)]
    everything = [True] * 6
    assert sweep_picks(pts, everything, 4) == [0, 1, 2, 3]
    assert sweep_picks(pts, everything, 2) == [0, 3]  # thinned: the front's two ends
    assert sweep_picks(pts, everything, 3) == [0, 2, 3] or sweep_picks(pts, everything, 3) == [0, 1, 3]
    assert sorted(sweep_picks(pts, everything, 6)) == [0, 1, 2, 3, 4, 5]  # then the next front
    assert sweep_picks(pts, everything, 5) in ([0, 1, 4, 2, 3], [0, 1, 2, 5, 3])
    fast_only = [True, True, False, False, False, False]  # e.g. a speedup limit only the fast ones meet
    assert sweep_picks(pts, fast_only, 4) == [0, 1, 2, 3]
    assert sweep_picks(pts, [False, False, True, True, False, False], 4) == [2, 3, 0, 1]
    assert sweep_picks([], [], 8) == [] and sweep_picks(pts, everything, 0) == []


def test_recovery_processes_is_validated():
    with pytest.raises(ConfigError, match=r"Space.recovery_processes=0 .*integer >= 1"):
        Space(recovery_processes=0)
    with pytest.raises(ConfigError, match=r"Space.recovery_processes=True"):
        Space(recovery_processes=True)
    with pytest.raises(ConfigError, match=r"Space.recovery_processes=8 .*at most finetune_batch_size=4"):
        Space(recovery_processes=8, finetune_batch_size=4)
    sp = Space(recovery_processes=2)
    assert Space.from_yaml(sp.to_yaml()) == sp


def test_cli_recovery_processes_sets_the_space(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    from edgeslim.cli import main
    from edgeslim.pipeline import _optimize

    seen = {}

    def fake_optimize(**kw):  # stands in for the search: only the arguments the options build are checked
        seen.update(kw)
        raise ConfigError("stopped by the test")

    monkeypatch.setattr(_optimize, "optimize", fake_optimize)
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    common = ["optimize", "tiny:TinyCNN", "--dataset", "digits", "--no-pretrained", "--out", str(tmp_path / "o")]
    assert main([*common, "--recovery-processes", "2", "--space", "ptq"]) == 2
    assert seen["space"].recovery_processes == 2 and seen["space"].target_macs == (0.0,)  # over the named space
    assert main([*common, "--recovery-processes", "0", "--json"]) == 2
    assert "--recovery-processes=0 is not allowed" in capsys.readouterr().out


def test_recovery_runs_in_two_torchrun_processes_and_the_deadline_stops_it(digits_model, tmp_path):
    """recovery_processes=2: the trial's fine-tune runs as 2 DDP ranks (gloo), recovers as one process does, is
    cached apart from it; a deadline stops it within a step (nothing cached); a failing rank is one error line."""
    model, train, val = digits_model
    sp1 = Space(**BASE, target_macs=(0.5,), finetune_steps=(0, 40, 200_000), recovery=("finetune", "distill"))
    sp2 = sp1.replace(recovery_processes=2)
    params = sp1.canonical({"target_macs": 0.5, "finetune_steps": 40, "recovery": "finetune", "quantize": False})
    cache = tmp_path / "cache"
    _, _, k1, one = build_candidate(_ctx(model, train, val, sp1, cache, budget=Budget(threads=2)), params)
    ctx = _ctx(model, train, val, sp2, cache, budget=Budget(threads=2))
    m2, art, k2, two = build_candidate(ctx, params)
    assert two["prune"]["cached"] and not two["finetune"].get("cached")  # the same pruned model, recovered anew
    # the recovery really ran in 2 ranks (the world size rank 0 reported), 2 threads // 2 each, the same steps
    assert two["finetune"]["processes"] == 2 and two["finetune"]["threads_per_process"] == 1
    assert "processes" not in one["finetune"] and two["finetune"]["steps"] == one["finetune"]["steps"] == 40
    recal, acc1, acc2 = (s["torch_accuracy_search"] for s in (one["prune"], one["finetune"], two["finetune"]))
    assert acc2 > recal + 0.05 and abs(acc2 - acc1) <= 0.03  # recovered as the single process did
    assert abs(evaluate(m2, ctx.search_val) - acc2) < 1e-9  # the model rank 0 wrote is the one recorded
    assert art.validation["top1_agreement"] >= 0.95
    assert k1 != k2 and len([d for d in _steps(cache, "finetune") if Cache.done(d)]) == 2  # cached apart
    again = build_candidate(ctx, params)[3]
    assert again["finetune"]["cached"] and again["finetune"]["processes"] == 2
    # a deadline stops a long distillation in the ranks within a step: DeadlineReached, nothing partial kept
    long = sp2.canonical({"target_macs": 0.5, "finetune_steps": 200_000, "recovery": "distill", "quantize": False})
    ctx.deadline = time.perf_counter() + 3.0
    t0 = time.perf_counter()
    with pytest.raises(DeadlineReached, match=r"distill stopped at step \d+ of 200000"):
        build_candidate(ctx, long)
    assert time.perf_counter() - t0 < 60  # start-up, the deadline, one step (the recovery would take an hour)
    (d,) = _steps(cache, "distill")
    assert not Cache.done(d) and not any(d.iterdir())  # no model, no job files


def _ranks_of(folder) -> list[int]:
    """Ids of live processes whose command line names ``folder`` (the recovery ranks of a run there)."""
    import os

    out = []
    for p in os.listdir("/proc"):
        try:
            cmd = open(f"/proc/{p}/cmdline", "rb").read().decode(errors="replace")  # noqa: SIM115
        except (OSError, ValueError):
            continue
        if p.isdigit() and "_recovery_ddp" in cmd and str(folder) in cmd:
            out.append(int(p))
    return out


def test_a_failing_or_hanging_torchrun_recovery_is_one_error_line(digits_model, tmp_path, monkeypatch):
    """A rank that fails is reported in one line (its error); ranks still running at the deadline + margin are
    killed, the launcher and every rank, never left to hang; nothing is cached either way."""
    from edgeslim.pipeline import _recovery_ddp

    model, train, val = digits_model
    sp = Space(**BASE, target_macs=(0.5,), finetune_steps=(40, 200_000), recovery=("distill",), recovery_processes=2)
    cache = tmp_path / "cache"
    ctx = _ctx(model, train, val, sp, cache, budget=Budget(threads=2))
    short = sp.canonical({"target_macs": 0.5, "finetune_steps": 40, "quantize": False})
    ctx.deadline = time.perf_counter() + 3600
    monkeypatch.setattr(_recovery_ddp, "MARGIN_S", -3590.0)  # the parent gives up ~10 s in; the ranks don't stop
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"distill in 2 torchrun processes did not stop within -3590 s .*killed"):
        build_candidate(ctx, sp.canonical({**short, "finetune_steps": 200_000}))
    assert time.perf_counter() - t0 < 10 + 2 * _recovery_ddp.TERM_WAIT_S + 10
    for _ in range(20):  # every rank is gone (the launcher ended them, or they noticed it was gone)
        if not _ranks_of(cache):
            break
        time.sleep(0.5)
    assert not _ranks_of(cache)
    monkeypatch.undo()
    # a rank that fails (here: the run's shared training split is corrupt) is one error line
    ctx.deadline = None
    (next(cache.glob("ddp-*")) / "train.pt").write_bytes(b"not a pickle")
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"distill in 2 torchrun processes failed \(exit 1\): rank \d: \w*Error"):
        build_candidate(ctx, short)
    assert time.perf_counter() - t0 < 60
    assert all(not Cache.done(d) and not any(d.iterdir()) for d in _steps(cache, "distill"))


def _int8_weights(path) -> dict:
    """The int8 weight initializers (rank >= 2) of an ONNX file, by name."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    out = {}
    for init in onnx.load(str(path)).graph.initializer:
        a = numpy_helper.to_array(init)
        if a.dtype == np.int8 and a.ndim >= 2:
            out[init.name] = a
    return out


def test_factorize_and_cluster_dimensions_are_validated_canonical_and_off_by_default():
    from edgeslim.pipeline._space import PRESETS, space_from

    for kw, pat in (
        ({"factorize": (1.0,)}, r"Space.factorize=\(1.0,\) .*fractions in \[0, 1\)"),
        ({"factorize": (0.3, 0.3)}, r"Space.factorize=\(0.3, 0.3\)"),
        ({"factorize_method": "tucker"}, r"Space.factorize_method='tucker' .*svd, spatial_svd"),
        ({"cluster": (1,)}, r"Space.cluster=\(1,\) .*0 \(no clustering\) or 2..256"),
        ({"cluster": (0, 300)}, r"Space.cluster=\(0, 300\)"),
        ({"cluster": (True,)}, r"Space.cluster=\(True,\)"),
    ):
        with pytest.raises(ConfigError, match=pat):
            Space(**kw)
    with pytest.raises(ConfigError, match=r"Budget.max_zipped_size_mb=0 .*must be > 0"):
        Budget(max_zipped_size_mb=0)
    # the default space searches neither: every candidate, cheap trial and probe has them off
    sp = Space()
    assert sp.factorize == (0.0,) and sp.cluster == (0,)
    assert all(c["factorize"] == 0.0 and c["cluster"] == 0 for c in sp.all_candidates() + sp.cheap() + sp.probes())
    full = space_from("full")
    assert full.factorize == PRESETS["full"]["factorize"] == (0.0, 0.3) and full.cluster == (0, 16)
    sp = Space(**BASE, target_macs=(0.0, 0.5), factorize=(0.0, 0.3), cluster=(0, 16), finetune_steps=(0, 40))
    # factorization alone earns BatchNorm recalibration and recovery (its steps as given: no pruning depth)
    c = sp.canonical({"target_macs": 0.0, "factorize": 0.3, "finetune_steps": 40, "quantize": True})
    assert c["prune_scope"] is None and c["recalibrate_bn"] is True and c["recovery"] == "finetune"
    assert recovery_steps(sp, c) == 40
    assert describe(c, sp).startswith("factorize 30% MACs (svd, BN recal, finetune 40 steps) + INT8 per-channel")
    # pruned and factorized: the recovery follows the factorization; clustering rules out CLE
    c = sp.canonical({"target_macs": 0.5, "factorize": 0.3, "finetune_steps": 40, "cluster": 16, "quantize": True})
    assert c["equalize"] is None and list(c).index("factorize") < list(c).index("recovery") < list(c).index("cluster")
    assert describe(c, sp).startswith(
        "prune 50% MACs (BN recal) + factorize 30% MACs (svd, BN recal, finetune 40 steps) + cluster 16 values/layer + INT8"
    )
    # probes cover every structure (pruning x factorization), unclustered; cheap trials neither
    probes = sp.replace(probe_structures=True).probes()
    assert sorted((p["target_macs"], p["factorize"]) for p in probes) == [(0.0, 0.3), (0.5, 0.0), (0.5, 0.3)]
    assert all(p["cluster"] == 0 and p["finetune_steps"] == 0 for p in probes)
    assert Space.from_yaml(sp.to_yaml()) == sp


def test_factorized_recovered_int8_candidate_is_cached_measured_and_replays(digits_model, tmp_path):
    from edgeslim.pipeline._optimize import _save_chosen

    model, train, val = digits_model
    sp = Space(**BASE, target_macs=(0.0,), factorize=(0.3,), finetune_steps=(40,), finetune_gate=None)
    ctx = _ctx(model, train, val, sp, tmp_path / "cache")
    params = sp.canonical({"factorize": 0.3, "finetune_steps": 40, "recovery": "finetune", "quantize": True})
    m, art, ck, steps = build_candidate(ctx, params)
    assert list(steps) == ["factorize", "finetune", "export"] and art.precision == "int8"
    f = steps["factorize"]
    assert f["macs_after"] < 0.8 * f["macs_before"] and f["params_after"] < f["params_before"]
    assert set(f["ranks"]) == {"stem.0", "pw.0", "fc"} and "grouped/depthwise" in f["left_as_is"]["dw.0"]
    assert f["bn_recalibrated_on"] == sp.bn_samples and f["seconds"] >= 0
    assert 0 <= f["torch_accuracy_search"] <= 1 and steps["finetune"]["steps"] == 40
    # the file is measured: its MACs (from the graph) are the factorized model's, its latency timed on the runtime
    base_params = sp.canonical({"factorize": 0.0, "quantize": False})
    figs = measure_candidate(ctx, art, ck, params=params)
    base_figs = measure_candidate(ctx, *build_candidate(ctx, base_params)[1:3], params=base_params)
    assert figs["figures"]["macs"] == f["macs_after"] < base_figs["figures"]["macs"] == f["macs_before"]
    assert figs["figures"]["latency_ms"] > 0 and figs["provenance"]["latency_ms"].startswith("measured on")
    # every step cached: the same model comes back
    again = build_candidate(ctx, params)
    assert all(again[3][k]["cached"] for k in ("factorize", "finetune", "export"))
    x = val.normalized()[:64]
    with torch.no_grad():
        assert torch.allclose(again[0](x), m(x), atol=1e-5)
    # the chosen model as one recipe file: reloads on a fresh input model to the same outputs
    paths, recipe = _save_chosen(ctx, tmp_path / "run", params, 0, m, art, True)
    assert [s["technique"] for s in recipe["steps"]] == ["factorize", "quantize"]  # fit changes weights only
    back = load_chosen(model, tmp_path / "run" / "chosen")
    with torch.no_grad():
        assert torch.allclose(back(x), m(x), atol=1e-5)


def test_clustered_int8_candidate_keeps_k_values_per_channel_and_only_zips_smaller(digits_model, tmp_path):
    from edgeslim.pipeline._optimize import _save_chosen

    model, train, val = digits_model
    k = 4  # below the 8-9 weights of each output channel of TinyCNN, so the property can fail
    sp = Space(**BASE, target_macs=(0.0,), cluster=(0, k))
    ctx = _ctx(model, train, val, sp, tmp_path / "cache")
    plain = sp.canonical({"cluster": 0, "quantize": True})
    params = sp.canonical({"cluster": k, "quantize": True})
    m, art, ck, steps = build_candidate(ctx, params)
    assert list(steps) == ["cluster", "export"] and art.precision == "int8"
    c = steps["cluster"]
    assert c["clusters"] == k and sorted(c["clustered_layers"]) == ["dw.0", "fc", "pw.0", "stem.0"]
    assert c["clustered_weights"] == 72 + 72 + 64 + 80 and 0 <= c["torch_accuracy_search"] <= 1
    # the deployable file: at most k distinct int8 values per output channel (BatchNorm folded per channel)
    weights = _int8_weights(art.path)
    assert len(weights) == 4
    for name, w in weights.items():
        per_channel = [len(set(row.ravel().tolist())) for row in w]
        assert max(per_channel) <= k, (name, per_channel)
    _, art0, ck0, _ = build_candidate(ctx, plain)
    w0 = _int8_weights(art0.path)
    assert max(len(set(row.ravel().tolist())) for w in w0.values() for row in w) > k  # not so without clustering
    # clustering buys the compressed size only: same MACs, same raw file size (within the Q/DQ parameters' bytes)
    f1 = measure_candidate(ctx, art, ck, params=params)["figures"]
    f0 = measure_candidate(ctx, art0, ck0, params=plain)["figures"]
    assert f1["macs"] == f0["macs"] and abs(f1["size_mb"] - f0["size_mb"]) < 0.02 * f0["size_mb"]
    assert f1["size_zipped_mb"] < f0["size_zipped_mb"] < f0["size_mb"]
    # and so only a zipped-size limit sees it
    base = {"accuracy": 1.0, "latency_ms": 1.0}
    lim = (f0["size_zipped_mb"] + f1["size_zipped_mb"]) / 2
    b = Budget(max_accuracy_drop=None, max_zipped_size_mb=lim)
    assert b.check(f1, base) == [] and [v.field for v in b.check(f0, base)] == ["max_zipped_size_mb"]
    assert "zipped size" in b.check(f0, base)[0].text and b.constraint_values(f1, base)["max_zipped_size_mb"] < 0
    assert "zipped file size <= " in " ".join(b.describe())
    # an FP32 clustered file holds plain dense weights (no Gather of indices): same bytes, fewer zipped
    fp32 = sp.canonical({"cluster": k, "quantize": False})
    _, art32, ck32, _ = build_candidate(ctx, fp32)
    _, artb, ckb, _ = build_candidate(ctx, sp.canonical({"cluster": 0, "quantize": False}))
    assert art32.size_bytes == artb.size_bytes
    g32 = measure_candidate(ctx, art32, ck32, params=fp32)["figures"]
    assert g32["size_zipped_mb"] < measure_candidate(ctx, artb, ckb)["figures"]["size_zipped_mb"]
    # cached, and the chosen model's recipe file replays to the same outputs
    again = build_candidate(ctx, params)
    assert again[3]["cluster"]["cached"] and again[3]["export"]["cached"]
    _, recipe = _save_chosen(ctx, tmp_path / "run", params, 0, m, art, True)
    assert [s["technique"] for s in recipe["steps"]] == ["cluster", "quantize"]
    back = load_chosen(model, tmp_path / "run" / "chosen")
    x = val.normalized()[:64]
    with torch.no_grad():
        assert torch.allclose(back(x), m(x), atol=1e-5) and torch.allclose(again[0](x), m(x), atol=1e-5)


def test_optimize_runs_a_factorized_clustered_int8_chain_and_reports_what_each_step_bought(digits_model, tmp_path):
    from edgeslim.cli import build_parser
    from edgeslim.pipeline._cli import budget_from_args

    model, train, val = digits_model
    sp = Space(
        **BASE,
        target_macs=(0.0,),
        factorize=(0.3,),
        cluster=(4,),
        finetune_steps=(20,),
        recovery=("finetune",),
        finetune_gate=None,
        quantize=(True,),
    )
    out = tmp_path / "fc"
    res = optimize(
        model,
        data=(train, val),
        budget=Budget(max_accuracy_drop=0.99, max_zipped_size_mb=1.0),
        space=sp,
        max_trials=1,
        out=out,
        progress=False,
    )
    doc = res.report.to_dict()
    c = doc["chosen"]
    assert c["trial"] == 0 and list(c["steps"]) == ["factorize", "finetune", "cluster", "export"]
    assert c["description"].startswith(
        "factorize 30% MACs (svd, BN recal, finetune 20 steps) + cluster 4 values/layer + INT8 per-channel minmax"
    )
    assert (
        c["final"]["size_zipped_mb"] < c["final"]["size_mb"]
        and "zlib level 9" in c["final_provenance"]["size_zipped_mb"]
    )
    assert c["final"]["macs"] < doc["baseline_final"]["macs"]
    md = (out / "report.md").read_text()
    assert "ONNX file size zipped MB (zlib level 9)" in md and "zipped file size \\<= 1 MB (zlib level 9)" in md
    assert "| size MB | zipped MB |" in md
    assert "| factorize |" in md and "factorize: 3 layers changed, 1 left as is" in md
    assert "| cluster |" in md and "cluster: 7 layers changed, 0 left as is" in md  # the factorized pairs
    recipe = json.loads((out / "chosen" / "recipe.json").read_text())
    assert [s["technique"] for s in recipe["steps"]] == ["factorize", "cluster", "quantize"]
    again = load_chosen(model, out / "chosen")
    x = val.normalized()[:64]
    with torch.no_grad():
        assert torch.allclose(again(x), res.model(x), atol=1e-5)
    for name, w in _int8_weights(res.artifact.path).items():
        assert max(len(set(row.ravel().tolist())) for row in w) <= 4, name
    # the CLI's flag sets the same limit
    a = build_parser().parse_args(["optimize", "small_cnn", "--max-zipped-size-mb", "2.5"])
    assert budget_from_args(a).max_zipped_size_mb == 2.5


def test_factorization_leaves_out_layers_it_cannot_reach_instead_of_failing():
    """A layer whose rank-1 pair keeps more MACs than the choice allows (small heads) is left out and said so; the
    factorize verb itself would refuse the whole model."""
    from types import SimpleNamespace

    from tiny import TinyCNN

    from edgeslim.pipeline._candidate import factorize_config
    from edgeslim.share import factorize

    model = TinyCNN().eval()
    ctx = SimpleNamespace(space=Space(factorize=(0.77,)))
    with pytest.raises(ConfigError, match=r"mac_ratio=0.23 needs rank < 1 for layer 'stem.0'"):
        factorize(model, factorize_config(ctx, {"factorize": 0.77}, model)[0].replace(exclude=()))
    cfg, left = factorize_config(ctx, {"factorize": 0.77}, model)
    assert sorted(left) == ["pw.0", "stem.0"] and "rank 1 keeps 0.25 of its MACs" in left["pw.0"]
    f = factorize(model, cfg, example_inputs=TinyCNN.example_inputs(1))
    assert [r["name"] for r in f.report.done()] == ["fc"] and f.report.done()[0]["rank"] == 1


def test_promoted_structures_skip_the_multi_fidelity_gate(digits_model, tmp_path):
    from edgeslim.pipeline._candidate import Gated, gate

    model, train, val = digits_model
    sp = Space(**BASE, target_macs=(0.0, 0.5), finetune_steps=(0, 20))
    ctx = _ctx(model, train, val, sp, tmp_path / "cache")
    params = sp.canonical({"target_macs": 0.5, "finetune_steps": 20, "quantize": True})
    with pytest.raises(Gated, match="more than finetune_gate=80 pt"):
        gate(ctx, params, 0.0)  # chance accuracy after pruning: not worth recovering ...
    ctx.ungated = True
    gate(ctx, params, 0.0)  # ... unless the structure was promoted for its measured speed


def test_a_structure_that_cannot_be_built_is_not_tried_again(digits_model, tmp_path):
    """A MAC target unreachable with the early layers kept fails once (its probe); the sampler's later proposals
    of the same structure, with any other quantization choice, are skipped instead of failing one by one."""
    import optuna

    model, train, val = digits_model
    sp = Space(
        **{
            **BASE,
            "probe_structures": True,
            "cheap_trials": 1,
            "keep_early_layers": (True,),
            "calibration": ("minmax", "mse", "percentile"),
            "per_channel": (True, False),
        },
        target_macs=(0.0, 0.95),
        finetune_steps=(0,),
        quantize=(True,),
        promote=0,
    )
    optimize(model, data=(train, val), budget=Budget(), space=sp, max_trials=8, out=tmp_path / "r", progress=False)
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{tmp_path / 'r' / 'study.db'}")
    ts = study.get_trials()
    failed = [t for t in ts if t.state.name == "FAIL"]
    assert len(failed) == 1 and failed[0].user_attrs["structure_failed"]
    assert "cannot remove 95% of the MACs" in failed[0].user_attrs["error"]
    skipped = [t for t in ts if t.user_attrs.get("params", {}).get("target_macs") == 0.95 and t is not failed[0]]
    assert all(t.state.name == "PRUNED" and t.user_attrs["duplicate_of"] == failed[0].number for t in skipped)
    assert skipped, "the sampler proposed the failed structure again (with another quantization choice)"
    done = [t for t in ts if t.state.name == "COMPLETE"]
    assert done and all(t.user_attrs["params"]["target_macs"] == 0.0 for t in done)


def test_in_search_latency_is_the_fastest_block_so_one_stall_does_not_move_it():
    from edgeslim.pipeline._candidate import LATENCY_BLOCKS, block_latency

    calls = {"n": 0}

    def run(_x):  # a 1 ms model whose first block (and its warm-up) a neighbour slows to 10 ms
        calls["n"] += 1
        time.sleep(0.010 if calls["n"] <= 15 else 0.001)

    best, blocks = block_latency(run, None, runs=5)
    assert len(blocks) == LATENCY_BLOCKS and calls["n"] == 10 + 5 + (LATENCY_BLOCKS - 1) * (2 + 5)
    assert blocks[0] >= 9.0  # the stalled block is recorded...
    assert 0.9 <= best < 3.0 and best == min(blocks)  # ...and is not the figure


def test_promotion_puts_a_structure_at_the_latency_limit_after_those_clear_of_it():
    """A probe that meets the speedup limit only within measurement noise is promoted after the others; accuracy
    is never one of the limits looked at."""
    from edgeslim.pipeline._optimize import LATENCY_MARGIN, meets_all_but

    b = Budget(max_accuracy_drop=0.005, min_speedup=8.0)
    base = {"accuracy": 0.94, "latency_ms": 4.8}  # limit: 0.6 ms
    at_limit = {"accuracy": 0.5, "latency_ms": 0.59, "size_mb": 1.0}
    clear = {**at_limit, "latency_ms": 0.5}
    skip = {"max_accuracy_drop"}
    assert meets_all_but(b, at_limit, base, skip) and not meets_all_but(b, at_limit, base, skip, LATENCY_MARGIN)
    assert meets_all_but(b, clear, base, skip, LATENCY_MARGIN)
    assert not meets_all_but(b, clear, base, set())  # the accuracy drop counts when not skipped
    assert not meets_all_but(b, {**at_limit, "latency_ms": 0.61}, base, skip)


def test_final_check_tries_the_preferred_then_the_most_accurate_feasible_trials():
    """After the search the fastest feasible trials (prefer=latency) sit at the accuracy limit of the search subset;
    when they fail on the whole split, the feasible trials with the most accuracy to spare are tried next."""
    from types import SimpleNamespace

    from edgeslim.pipeline._optimize import FINAL_CANDIDATES, FINAL_MARGIN_CANDIDATES, final_order

    def t(n, acc):
        return SimpleNamespace(number=n, user_attrs={"figures": {"accuracy": acc}})

    ranked = [t(0, 0.90), t(1, 0.90), t(2, 0.91), t(3, 0.93), t(4, 0.95), t(5, 0.95), t(6, 0.92)]
    order = [x.number for x in final_order(ranked, True)]
    assert FINAL_CANDIDATES == 3 and FINAL_MARGIN_CANDIDATES == 2
    assert order == [0, 1, 2, 4, 5]  # ties keep the prefer order
    assert [x.number for x in final_order(ranked[:4], True)] == [0, 1, 2, 3]
    assert [x.number for x in final_order(ranked, False)] == [0]  # nothing feasible: the closest alone

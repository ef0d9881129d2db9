"""edgeslim.nas: the per-layer latency table, its predictor, the width search, and their bad inputs."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from tiny import TinyBlocks, TinyCNN
from torch import nn

import edgeslim as es
from edgeslim.nas import (
    LatencyTable,
    LayerOp,
    NASConfig,
    build_predictor,
    check_predictor,
    kendall_tau,
    latency_shares,
    micro_onnx,
    requests,
    search_widths,
    trace_layers,
    width_space,
)

FAST = {
    "round_to": 8,
    "min_keep": 0.25,
    "steps": 3,
    "grid_points": 3,
    "fit_samples": 3,
    "rounds": 2,
    "bn_samples": 128,
    "val_samples": 200,
    "max_extra_steps": 1,
}


@pytest.fixture(scope="module")
def table_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("latency")


@pytest.fixture(scope="module")
def trained():
    """TinyBlocks (48 channels, so convolutions and not call overhead dominate its latency) trained on digits."""
    from edgeslim.train import TrainConfig, fit

    train, val = es.data.load("digits")
    torch.manual_seed(0)
    res = fit(
        TinyBlocks(width=48), train, val, TrainConfig(epochs=4, lr=0.1, batch_size=32, augment=False), progress=False
    )
    return res.model.eval(), train, val


# ------------------------------------------------------------------------------------------------ layers
def test_trace_layers_finds_geometry_and_fused_activation():
    layers = {lay.name: lay for lay in trace_layers(TinyCNN(), TinyCNN.example_inputs())}
    assert list(layers) == ["stem.0", "dw.0", "pw.0", "fc"]
    assert layers["stem.0"].op.act == "relu6" and layers["stem.0"].op.kernel == (3, 3)
    assert layers["dw.0"].op.depthwise and layers["dw.0"].op.act == "relu6"
    assert layers["pw.0"].op.act == "none" and not layers["pw.0"].op.depthwise
    assert layers["fc"].op.op == "linear" and (layers["fc"].cin, layers["fc"].cout) == (8, 10)
    assert (layers["stem.0"].op.height, layers["stem.0"].op.width) == (8, 8)


@pytest.mark.parametrize(
    "op,cin,cout",
    [
        (LayerOp("conv", (3, 3), (2, 2), (1, 1), height=9, width=9, act="relu6"), 8, 16),
        (LayerOp("conv", (3, 3), (1, 1), (1, 1), depthwise=True, height=8, width=8, act="relu"), 16, 16),
        (LayerOp("conv", (1, 1), height=4, width=4, act="hardswish"), 24, 8),
        (LayerOp("linear"), 32, 10),
    ],
)
def test_micro_onnx_runs_on_ort_with_the_expected_output(op, cin, cout):
    import onnxruntime as ort

    sess = ort.InferenceSession(micro_onnx(op, cin, cout), providers=["CPUExecutionProvider"])
    shape = (1, cin) if op.op == "linear" else (1, cin, op.height, op.width)
    y = sess.run(None, {"x": np.ones(shape, np.float32)})[0]
    assert y.shape == ((1, cout) if op.op == "linear" else (1, cout, *op.out_size()))
    if op.act in ("relu", "relu6"):
        assert y.min() >= 0 and (op.act != "relu6" or y.max() <= 6)


# ------------------------------------------------------------------------------------------------- table
def test_table_builds_caches_and_never_crosses_hosts(table_dir):
    model, x = TinyBlocks(width=16), TinyBlocks.example_inputs()
    space = width_space(model, x, round_to=8, grid_points=2)
    reqs = requests(space)
    t = LatencyTable("onnxruntime", 1, directory=table_dir)
    unique = {o.key(a, b) for o, a, b in reqs}
    assert len(t.missing(reqs)) == len(unique) and t.measure(reqs, rounds=2) == len(unique)
    assert t.path.is_file() and all(t.get(o, a, b) > 0 for o, a, b in reqs)
    blob = json.loads(t.path.read_text())
    assert blob["host"] == t.host and blob["threads"] == 1 and blob["runtime"] == "onnxruntime"
    again = LatencyTable("onnxruntime", 1, directory=table_dir)  # cache hit: nothing timed again
    assert again.path == t.path and again.measure(reqs) == 0 and again.measured == 0
    other = LatencyTable("onnxruntime", 1, directory=table_dir, host={"cpu": "Some ARM core", "isa": "neon"})
    assert other.path != t.path and other.entries == {} and len(other.missing(reqs)) > 0
    two = LatencyTable("onnxruntime", 2, directory=table_dir)
    assert two.path != t.path and two.entries == {}
    # a file copied under this host's name but made on another host is ignored, never used
    forged = json.loads(t.path.read_text())
    forged["host"] = {"cpu": "Some ARM core", "isa": "neon"}
    t.path.write_text(json.dumps(forged))
    assert LatencyTable("onnxruntime", 1, directory=table_dir).entries == {}
    t.save()  # rewrite the good table for the other tests
    assert LatencyTable("onnxruntime", 1, directory=table_dir).measure(reqs) == 0


def test_missing_table_without_permission_to_build_is_one_clear_error(tmp_path):
    op = LayerOp("conv", (3, 3), padding=(1, 1), height=8, width=8)
    t = LatencyTable("onnxruntime", 1, directory=tmp_path)
    with pytest.raises(es.ModelError, match=r"no latency table for onnxruntime .* build_table=True"):
        t.measure([(op, 8, 8)], allow_build=False)


def test_interpolation_is_bilinear_between_grid_points_and_1d_for_depthwise(tmp_path):
    t = LatencyTable("onnxruntime", 1, directory=tmp_path, version="test", host={"cpu": "c", "isa": "i"})
    op = LayerOp("conv", (1, 1), height=4, width=4)
    gin, gout = (8, 16, 32), (8, 24)

    def f(a, b):
        return 0.01 * a + 0.02 * b + 0.001 * a * b

    for a in gin:
        for b in gout:
            t.entries[op.key(a, b)] = {"ms": f(a, b)}
    assert t.estimate(op, 16, 24, gin, gout) == pytest.approx(f(16, 24))
    assert t.estimate(op, 12, 16, gin, gout) == pytest.approx(f(12, 16))
    assert t.estimate(op, 24, 8, gin, gout) == pytest.approx(f(24, 8))
    dw = LayerOp("conv", (3, 3), padding=(1, 1), depthwise=True, height=4, width=4)
    for w in gin:
        t.entries[dw.key(w, w)] = {"ms": 0.5 * w}
    assert t.estimate(dw, 24, 24, gin, gin) == pytest.approx(12.0)
    assert t.estimate(dw, 40, 40, gin, gin) == pytest.approx(20.0)  # past the grid: extrapolated linearly
    with pytest.raises(es.ModelError, match="no entry"):
        t.get(op, 8, 16)


def test_kendall_tau_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x = list(rng.normal(size=30))
    y = [v + rng.normal(scale=0.5) for v in x]
    y[3] = y[4]  # a tie
    assert kendall_tau(x, y) == pytest.approx(scipy_stats.kendalltau(x, y).statistic)
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


# ----------------------------------------------------------------------------------------- space, predictor
def test_width_space_couples_residual_and_depthwise_layers():
    space = width_space(TinyBlocks(width=48), TinyBlocks.example_inputs(), round_to=8, min_keep=0.25)
    units = space.units
    # stem, the second block conv and the depthwise conv share the residual width; blocks.0.0 is its own unit
    res = next(u for u in units.values() if "stem.0" in u.writers)
    assert {"blocks.1.0", "dw.0"} <= set(res.writers) and "blocks.0.0" in units
    assert all(w % 8 == 0 for u in units.values() for w in u.choices[:-1]) and res.choices[0] == 16
    assert "head.4" not in units and space.output_layer == "head.4"
    small = space.realize(TinyBlocks(width=48), {res.name: 16})
    assert small.stem[0].out_channels == 16 and small.dw[0].groups == 16 and small.blocks[0][0].in_channels == 16


def test_predictor_fits_measured_subnetworks_and_is_checked(trained, table_dir):
    model, _, _ = trained
    space = width_space(model, TinyBlocks.example_inputs(), round_to=8, grid_points=3)
    pred = build_predictor(model, space, directory=table_dir, fit_samples=3, rounds=2)
    assert pred.a > 0 and len(pred.fit_samples) == 3
    assert pred.predict(space.smallest()) < pred.predict(space.full())
    res = check_predictor(model, pred, samples=4, rounds=2, refit=3)
    assert len(res["rows"]) == 4 and all(r["measured_ms"] > 0 for r in res["rows"])
    assert np.isfinite(res["median_abs_error_pct"]) and -1 <= res["kendall_tau"] <= 1
    assert res["fit"]["same_session"] and res["fit"]["samples"] == 3 and res["fit"]["a"] > 0


# ------------------------------------------------------------------------------------------------ search
@pytest.fixture(scope="module")
def searched(trained, table_dir):
    model, train, val = trained
    before = copy.deepcopy(model.state_dict())
    out = search_widths(
        model,
        NASConfig(latency_ratio=0.7, table_dir=str(table_dir), **FAST),
        data=(train, val),
        example_inputs=TinyBlocks.example_inputs(),
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the input is untouched
    return out


def test_search_widths_meets_a_loose_budget_with_narrower_measured_model(searched, trained):
    rep = searched.report
    assert rep.technique == "nas" and rep.device == "host"
    narrowed = {n: w for n, w in rep.widths.items() if w[1] < w[0]}
    assert narrowed, rep.summary()
    convs = {n: m.out_channels for n, m in searched.named_modules() if isinstance(m, nn.Conv2d)}
    assert sum(convs.values()) < 48 * 4
    assert rep.predicted_ms <= rep.budget_ms * 1.0001
    assert rep.measured_ms > 0 and rep.original_measured_ms > 0 and rep.measured_ms != rep.predicted_ms
    assert rep.measured_ms < rep.original_measured_ms
    assert rep.steps and all("accuracy" in s for s in rep.steps)
    assert rep.accuracy > 0.5  # BN-recalibrated, not fine-tuned: still far above chance (0.1) on digits
    _, _, val = trained
    assert es.train.evaluate(searched, val) > 0.5
    assert "nas (widths" in rep.summary() and json.dumps(rep.to_dict())


def test_search_records_one_nas_step_that_save_load_replays(searched, tmp_path):
    steps = searched.edgeslim_recipe
    assert [s["technique"] for s in steps] == ["nas"]
    assert NASConfig.from_dict(steps[0]["config"]).latency_ratio == 0.7
    es.save(searched, tmp_path / "nas.recipe")
    back = es.load(tmp_path / "nas.recipe", TinyBlocks(width=48))
    x = TinyBlocks.example_inputs(8)
    with torch.no_grad():
        assert torch.equal(back.eval()(x), searched.eval()(x))


def test_nas_config_round_trips_yaml_and_validates():
    cfg = NASConfig(latency_budget_ms=2.5, exclude=("stem.*",), threads=2)
    assert NASConfig.from_yaml(cfg.to_yaml()) == cfg
    with pytest.raises(es.ConfigError, match="only one of latency_budget_ms"):
        NASConfig(latency_budget_ms=1.0, latency_ratio=0.5)
    assert NASConfig() == NASConfig(latency_ratio=0.25) == NASConfig.from_yaml(NASConfig().to_yaml())
    with pytest.raises(es.ConfigError, match=r"latency_ratio=1.5 .* in \(0, 1\)"):
        NASConfig(latency_ratio=1.5)
    with pytest.raises(es.ConfigError, match="runtime 'torch'|runtime='torch'"):
        NASConfig(latency_ratio=0.5, runtime="torch")
    with pytest.raises(es.ConfigError, match="device='mars-rover'"):
        NASConfig(latency_ratio=0.5, device="mars-rover")


# ------------------------------------------------------------------------------------------------ bad input
def test_budget_below_the_smallest_subnetwork_names_the_value_and_what_is_possible(trained, table_dir):
    model, train, val = trained
    cfg = NASConfig(latency_budget_ms=1e-4, table_dir=str(table_dir), **FAST)
    with pytest.raises(
        es.ConfigError,
        match=r"latency_budget_ms=0.0001 .* below the smallest sub-network .* "
        r"possible: >= [0-9.]+ ms",
    ):
        search_widths(model, cfg, data=(train, val), example_inputs=TinyBlocks.example_inputs())


def test_space_empty_after_exclusions_is_one_clear_error(trained, table_dir):
    model, train, val = trained
    cfg = NASConfig(latency_ratio=0.5, exclude=("stem.0", "blocks.0.0", "head.2"), table_dir=str(table_dir), **FAST)
    with pytest.raises(es.ConfigError, match=r"NASConfig.exclude=.* leaves nothing to search"):
        search_widths(model, cfg, data=(train, val), example_inputs=TinyBlocks.example_inputs())
    with pytest.raises(es.ConfigError, match="NASConfig.exclude pattern 'nope.*' matches no"):
        search_widths(
            model,
            NASConfig(latency_ratio=0.5, exclude=("nope.*",), **FAST),
            data=(train, val),
            example_inputs=TinyBlocks.example_inputs(),
        )


def test_no_table_for_this_host_and_no_permission_to_build(trained, tmp_path):
    model, train, val = trained
    cfg = NASConfig(latency_ratio=0.5, build_table=False, table_dir=str(tmp_path), **FAST)
    with pytest.raises(es.ModelError, match=r"no latency table for onnxruntime .* on .*build_table=True"):
        search_widths(model, cfg, data=(train, val), example_inputs=TinyBlocks.example_inputs())


def test_data_must_be_train_and_val(trained):
    model, train, _ = trained
    with pytest.raises(es.DataError, match=r"data=\(train, val\)"):
        search_widths(
            model, NASConfig(latency_ratio=0.5, **FAST), data=train, example_inputs=TinyBlocks.example_inputs()
        )


# ------------------------------------------------------------------------------------------------ profiles
def test_latency_shares_differ_between_host_and_a_profile_and_say_predicted(trained, table_dir):
    model, _, _ = trained
    space = width_space(model, TinyBlocks.example_inputs(), round_to=8, grid_points=3)
    pred = build_predictor(model, space, directory=table_dir, fit_samples=0)
    sh = latency_shares(pred, ("host", "raspberry-pi-4"))
    host, pi = sh["devices"]["host"], sh["devices"]["raspberry-pi-4"]
    assert pi["label"] == "predicted for raspberry-pi-4" and "measured" in host["label"]
    assert sum(host["shares"].values()) == pytest.approx(100) and sum(pi["shares"].values()) == pytest.approx(100)
    assert pi["sum_ms"] > host["sum_ms"]  # a Cortex-A72 is slower than this server core
    assert max(abs(host["shares"][k] - pi["shares"][k]) for k in host["shares"]) > 0.5
    scaled = pred.with_device("raspberry-pi-4")
    assert scaled.label == "predicted for raspberry-pi-4" and scaled.predict() > pred.predict()


# ------------------------------------------------------------------------------------------------ evolution
EVO = {**FAST, "searcher": "evolution", "trials": 6, "population": 4}


def _trials(url):
    import optuna

    (summary,) = optuna.get_all_study_summaries(url)
    study = optuna.load_study(study_name=summary.study_name, storage=url)
    return study, study.get_trials(deepcopy=False)


def test_evolution_meets_the_predicted_budget_and_replays_from_its_recipe(trained, table_dir, tmp_path):
    model, train, val = trained
    url = f"sqlite:///{tmp_path / 'evo.db'}"
    out = search_widths(
        model,
        NASConfig(latency_ratio=0.7, table_dir=str(table_dir), **EVO),
        data=(train, val),
        example_inputs=TinyBlocks.example_inputs(),
        storage=url,
    )
    rep = out.report
    assert rep.searcher == "evolution" and rep.search["trials"] == 6
    assert rep.predicted_ms <= rep.budget_ms * 1.0001
    assert all(s["predicted_ms"] <= rep.budget_ms * 1.0001 for s in rep.steps)  # every candidate was repaired in
    assert rep.steps[0]["repaired"]  # trial 0: the uniform shrink (full widths, repaired onto the budget)
    narrowed = {n: w for n, w in rep.widths.items() if w[1] < w[0]}
    assert narrowed and rep.measured_ms < rep.original_measured_ms
    assert rep.accuracy == pytest.approx(rep.search["best_trial_accuracy"], abs=1e-9) or rep.search["best_trial"] == -1
    assert rep.accuracy >= max(s["accuracy"] for s in rep.steps) - 1e-9 or rep.search["best_trial"] != 0
    study, trials = _trials(url)
    assert len(trials) == 6 and study.user_attrs["latency_model"]["budget_ms"] == pytest.approx(rep.budget_ms)
    es.save(out, tmp_path / "evo.recipe")
    back = es.load(tmp_path / "evo.recipe", TinyBlocks(width=48))
    x = TinyBlocks.example_inputs(8)
    with torch.no_grad():
        assert torch.equal(back.eval()(x), out.eval()(x))
    assert NASConfig.from_dict(out.edgeslim_recipe[0]["config"]).searcher == "evolution"


def test_evolution_resumes_after_an_interruption_without_losing_or_repeating_trials(trained, table_dir, tmp_path):
    from optuna.trial import TrialState

    model, train, val = trained
    kw = {"data": (train, val), "example_inputs": TinyBlocks.example_inputs()}
    cfg = NASConfig(latency_ratio=0.7, table_dir=str(table_dir), **{**EVO, "trials": 3})
    url = f"sqlite:///{tmp_path / 'a.db'}"
    search_widths(model, cfg, storage=url, **kw)
    study, trials = _trials(url)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    stuck = study.ask()  # a process killed in the middle of trial 3 leaves it RUNNING
    assert stuck.number == 3
    out = search_widths(model, dataclasses.replace(cfg, trials=6), storage=url, **kw)
    _, trials = _trials(url)
    assert [t.number for t in trials] == list(range(6))  # none lost, none duplicated
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert out.report.search["resumed_trials"] == 3 and out.report.search["requeued"] == [3]
    assert "resumed study" in out.report.note
    # the same trials as an uninterrupted run: NSGA-II's first generation (population 4: trials 0-3, the requeued
    # trial 3 among them) is drawn per trial number, whatever process draws it
    url_b = f"sqlite:///{tmp_path / 'b.db'}"
    search_widths(model, dataclasses.replace(cfg, trials=4), storage=url_b, **kw)
    _, trials_b = _trials(url_b)
    assert [t.params for t in trials[:4]] == [t.params for t in trials_b[:4]]


def test_evolution_refuses_a_second_process_on_its_sqlite_study(trained, table_dir, tmp_path):
    from edgeslim.core.store import file_lock

    model, train, val = trained
    db = tmp_path / "c.db"
    with file_lock(str(db) + ".lock", what="test"), pytest.raises(es.OutputExistsError, match="locked by another"):
        search_widths(
            model,
            NASConfig(latency_ratio=0.7, table_dir=str(table_dir), **EVO),
            data=(train, val),
            example_inputs=TinyBlocks.example_inputs(),
            storage=db,
        )


def test_table_file_name_is_one_file_whatever_the_runtime_version(tmp_path):
    t = LatencyTable("onnxruntime", 1, directory=tmp_path, version="2026.4.1-22982-releases/2026/4")
    assert t.path.parent == tmp_path and "/" not in t.path.name and "2026_4" in t.path.name


def test_evolution_workers_share_one_postgresql_study(trained, table_dir, postgres):
    from optuna.trial import TrialState

    model, train, val = trained
    url = postgres.new_database("nas_workers")
    kw = {"data": (train, val), "example_inputs": TinyBlocks.example_inputs(), "storage": url}
    cfg = NASConfig(latency_ratio=0.7, table_dir=str(table_dir), **{**EVO, "trials": 3})
    first = search_widths(model, cfg, **kw)  # worker 1 creates the study, records the budget and latency model
    second = search_widths(model, dataclasses.replace(cfg, trials=5), **kw)  # worker 2 joins and adds trials
    study, trials = _trials(url)
    assert [t.number for t in trials] == list(range(5)) and all(t.state == TrialState.COMPLETE for t in trials)
    assert second.report.search["resumed_trials"] == 3 and second.report.search["requeued"] == []
    assert second.report.budget_ms == pytest.approx(first.report.budget_ms)  # the study's budget, not re-measured

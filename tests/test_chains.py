"""Every ordered pair of techniques composes: it runs, exports to ONNX that ONNX Runtime agrees with, and its saved
recipe replays to identical outputs; a pair that makes no sense raises one ConfigError that says why.

The expected outcome of each pair is :data:`edgeslim.core.recipe.FORBIDDEN` (the declared, refused orders); the
README's composition table is this matrix.
"""

import pytest
import torch
from tiny import TinyBlocks

import edgeslim as es
from edgeslim.core.recipe import FORBIDDEN
from edgeslim.distill import DistillConfig
from edgeslim.quantize import BudgetConfig, quantize_with_budget
from edgeslim.share import ClusterConfig, FactorizeConfig, SeparableConfig, TieConfig
from edgeslim.train import TrainConfig, fit

#: step name -> (technique it records, how to apply it)
STEPS = {
    "prune magnitude": (
        "prune",
        lambda m, d: es.prune(m, es.PruneConfig(method="magnitude", ratio=0.5), example_inputs=d["x"]),
    ),
    "prune nm": ("prune", lambda m, d: es.prune(m, es.PruneConfig(method="nm"), example_inputs=d["x"])),
    "prune channel": (
        "prune",
        lambda m, d: es.prune(m, es.PruneConfig(method="channel", ratio=0.5, round_to=4), example_inputs=d["x"]),
    ),
    "distill": (
        "distill",
        lambda m, d: es.distill(
            m,
            d["teacher"],
            DistillConfig(),
            data=(d["train"], None),
            train_config=TrainConfig(epochs=1, batch_size=32, lr=0.01, augment=False, warmup_steps=0),
            max_steps_per_epoch=2,
            progress=False,
        ),
    ),
    "cluster": ("cluster", lambda m, d: es.cluster(m, ClusterConfig(clusters=4))),
    "tie_layers": ("tie", lambda m, d: es.tie_layers(m, TieConfig(auto=True))),
    "factorize": ("factorize", lambda m, d: es.factorize(m, FactorizeConfig(rank=4, exclude=("stem.*",)))),
    "separable": ("separable", lambda m, d: es.separable(m, SeparableConfig())),
    "quantize static": ("quantize", lambda m, d: es.quantize(m, es.QuantConfig(num_samples=64), data=d["train"])),
    "quantize with budget": (
        "quantize",
        lambda m, d: (
            quantize_with_budget(
                m,
                BudgetConfig(max_accuracy_drop=0.05, quant=es.QuantConfig(num_samples=64)),
                data=(d["train"], d["score"]),
            ).model
        ),
    ),
}


def refused(first: str, second: str) -> str | None:
    """Why ``second`` may not follow ``first`` (None when the pair composes)."""
    a, b = STEPS[first][0], STEPS[second][0]
    return FORBIDDEN.get((a, b)) or FORBIDDEN.get((a, "*"))


@pytest.fixture(scope="module")
def world():
    train, val = es.data.load("digits")
    torch.manual_seed(0)
    base = fit(
        TinyBlocks(),
        train,
        val,
        TrainConfig(epochs=4, lr=0.05, batch_size=32, augment=False, warmup_steps=5),
        progress=False,
    ).model.eval()
    d = {
        "train": train.take(256, seed=0),
        "score": val.take(128, seed=0),
        "teacher": base,
        "x": val.take(32, seed=1).normalized(),
        "val": val.take(64, seed=2),
    }
    firsts = {name: fn(base, d) for name, (_, fn) in STEPS.items()}
    return base, d, firsts


@pytest.mark.parametrize("second", list(STEPS))
@pytest.mark.parametrize("first", list(STEPS))
def test_pair_composes_or_says_why(first, second, world, tmp_path):
    base, d, firsts = world
    before = {k: v.clone() for k, v in base.state_dict().items()}
    m1 = firsts[first]
    why = refused(first, second)
    if why:
        with pytest.raises(es.ConfigError, match="not supported") as e:
            STEPS[second][1](m1, d)
        assert why in str(e.value)
        return
    m2 = STEPS[second][1](m1, d)
    # the chain is recorded step by step, the report follows the one protocol
    techniques = [s["technique"] for s in m2.edgeslim_recipe]
    assert techniques[-2:] == [STEPS[first][0], STEPS[second][0]]
    assert m2.report.technique == STEPS[second][0] and m2.report.summary() and m2.report.to_dict()
    # exports to ONNX; ONNX Runtime agrees with torch (export raises below its floors)
    art = es.export(m2, "onnx", example_inputs=d["val"], path=tmp_path / "m.onnx")
    assert art.validation["top1_agreement"] >= 0.9 and art.validation["cosine"] >= 0.99
    assert art.meta[STEPS[second][0]]["technique"] == STEPS[second][0]
    assert [s["technique"] for s in art.meta["recipe"]] == techniques
    # one recipe file replays on a fresh model to identical outputs
    es.save(m2, tmp_path / "m.recipe")
    m3 = es.load(tmp_path / "m.recipe", model=TinyBlocks())
    with torch.no_grad():
        assert torch.equal(m2.eval()(d["x"]), m3(d["x"]))
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())  # the input is untouched


def _verbs(d):
    """Every verb, called with a config of its own type (``cfg``) or a wrong one."""
    from edgeslim.quantize import QATConfig, qat

    tc = TrainConfig(epochs=1, batch_size=32, augment=False, warmup_steps=0)
    return {
        "prune": (es.PruneConfig, lambda m, cfg: es.prune(m, cfg, example_inputs=d["x"])),
        "quantize": (es.QuantConfig, lambda m, cfg: es.quantize(m, cfg, data=d["train"])),
        "quantize_with_budget": (
            BudgetConfig,
            lambda m, cfg: quantize_with_budget(m, cfg, data=(d["train"], d["score"])),
        ),
        "qat": (QATConfig, lambda m, cfg: qat(m, cfg, data=(d["train"], None), train_config=tc, progress=False)),
        "distill": (
            DistillConfig,
            lambda m, cfg: es.distill(
                m, d["teacher"], cfg, data=(d["train"], None), train_config=tc, max_steps_per_epoch=1, progress=False
            ),
        ),
        "cluster": (ClusterConfig, lambda m, cfg: es.cluster(m, cfg, data=d["train"])),
        "tie_layers": (TieConfig, lambda m, cfg: es.tie_layers(m, cfg, data=d["train"])),
        "factorize": (FactorizeConfig, lambda m, cfg: es.factorize(m, cfg, data=d["train"])),
        "separable": (SeparableConfig, lambda m, cfg: es.separable(m, cfg, data=d["train"])),
    }


@pytest.mark.parametrize(
    "verb",
    ["prune", "quantize", "quantize_with_budget", "qat", "distill", "cluster", "tie_layers", "factorize", "separable"],
)
def test_every_verb_refuses_a_config_of_another_verb(verb, world):
    base, d, _ = world
    _, call = _verbs(d)[verb]
    wrong = ClusterConfig() if verb != "cluster" else es.PruneConfig()
    with pytest.raises(es.ConfigError, match=f"{verb}\\(\\) needs a"):
        call(base, wrong)


@pytest.mark.parametrize(
    "verb,cfg",
    [
        ("prune", es.PruneConfig(exclude=("blocks.9",))),
        ("quantize", es.QuantConfig(exclude=("blocks.9",))),
        ("cluster", ClusterConfig(clusters=4, exclude=("blocks.9",))),
        ("factorize", FactorizeConfig(exclude=("blocks.9",))),
        ("separable", SeparableConfig(exclude=("blocks.9",))),
        ("tie_layers", TieConfig(groups=(("blocks.0", "blocks.9"),))),
        ("distill", DistillConfig(losses=("kd", "hint"), student_layers=("blocks.9",), teacher_layers=("blocks.1",))),
    ],
)
def test_every_verb_refuses_a_layer_pattern_that_matches_nothing(verb, cfg, world):
    base, d, _ = world
    _, call = _verbs(d)[verb]
    with pytest.raises(es.ConfigError, match="blocks.9"):
        call(base, cfg)


def test_every_verb_result_carries_one_report_protocol(world):
    from edgeslim.core.report import Report

    base, d, firsts = world
    for name, model in firsts.items():
        rep = model.report
        assert isinstance(rep, Report), name
        assert rep.to_dict()["technique"] == rep.technique == STEPS[name][0]
        assert isinstance(rep.summary(), str) and rep.summary()


def test_pruned_clustered_quantized_saves_as_one_recipe_and_reloads_bit_exact(world, tmp_path):
    base, d, firsts = world
    m = STEPS["quantize static"][1](STEPS["cluster"][1](firsts["prune channel"], d), d)
    assert [s["technique"] for s in m.edgeslim_recipe] == ["prune", "cluster", "quantize"]
    path = es.save(m, tmp_path / "chain.recipe")
    blob = torch.load(path, weights_only=True)  # plain data and tensors: no pickled module
    assert [s["technique"] for s in blob["steps"]] == ["prune", "cluster", "quantize"]
    r = es.load(path, model=TinyBlocks())
    with torch.no_grad():
        assert torch.equal(r(d["x"]), m(d["x"]))
    assert r.graph_module is not None and type(r).__name__ == "QuantizedModel"

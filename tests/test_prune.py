"""edgeslim.prune: unstructured / AGP / N:M masks, structured channel + head pruning with physical removal,
recipes that reload exactly, the prune -> fine-tune loop with resume, and clear errors on bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny import TinyCNN, TinyGrouped, TinyMLP
from torch import nn

from edgeslim.core.errors import ConfigError, DataError, ModelError
from edgeslim.prune import (
    IMPORTANCE,
    PruneConfig,
    count_macs,
    get_mask,
    load_pruned,
    prune,
    prune_finetune,
    replay,
    save_pruned,
    sparse_storage,
    strip_masks,
)

pytest.importorskip("torch_pruning")


def _small_cnn() -> nn.Module:
    from edgeslim.models import SmallCNN

    torch.manual_seed(0)
    return SmallCNN(1, 10).eval()


def _x(n: int = 2, size: int = 28) -> torch.Tensor:
    return torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(0))


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("bad", [0.0, 1.0, 1.5, -0.1])
def test_ratio_outside_open_interval_is_rejected(bad):
    with pytest.raises(ConfigError, match=r"PruneConfig.ratio=.*\(0, 1\)"):
        PruneConfig(ratio=bad)


def test_config_errors_name_field_and_allowed_values():
    with pytest.raises(ConfigError, match="l1"):
        PruneConfig(importance="l3")  # lists the valid criteria
    with pytest.raises(ConfigError, match="layer_ratios"):
        PruneConfig(layer_ratios={"features.*": 1.0})  # a layer pruned to nothing
    with pytest.raises(ConfigError, match="max_layer_ratio"):
        PruneConfig(max_layer_ratio=1.0)
    with pytest.raises(ConfigError, match="n"):
        PruneConfig(method="nm", n=4, m=4)
    with pytest.raises(ConfigError, match="schedule"):
        PruneConfig(method="channel", schedule="agp")
    with pytest.raises(ConfigError, match="target_macs"):
        PruneConfig(method="magnitude", target_macs=0.5)
    with pytest.raises(ConfigError, match="did you mean 'channel'"):
        PruneConfig(method="chanel")


def test_config_round_trips_yaml():
    cfg = PruneConfig(
        method="channel",
        target_macs=0.4,
        importance="fpgm",
        scope="global",
        layer_ratios={"features.4": 0.2},
        exclude=("classifier",),
    )
    assert PruneConfig.from_yaml(cfg.to_yaml()) == cfg
    assert PruneConfig.from_dict(cfg.to_dict()) == cfg


# ------------------------------------------------------------------------------------------- structured
def test_channels_physically_removed_and_input_unchanged():
    model = _small_cnn()
    before = copy.deepcopy(model)
    p = prune(model, PruneConfig(ratio=0.5, round_to=8), example_inputs=_x())
    assert _same_state(model, before)  # the input model is not modified
    convs = [m for m in p.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 32]  # 16/32/64 halved, multiples of 8
    assert p.features[1].num_features == 8 and p.classifier.in_features == 32
    assert p.classifier.out_features == 10  # the output layer is kept
    rep = p.prune_report
    assert rep.params_after < 0.35 * rep.params_before
    assert rep.macs_after < 0.35 * rep.macs_before
    assert count_macs(p, _x()) == rep.macs_after
    assert p(_x()).shape == (2, 10)


def test_residual_depthwise_and_rounding():
    model = TinyCNN().eval()
    p = prune(model, PruneConfig(ratio=0.5, round_to=2), example_inputs=TinyCNN.example_inputs())
    # the residual add couples stem, depthwise and pointwise: all keep the same 4 channels
    assert p.stem[0].out_channels == p.dw[0].out_channels == p.pw[0].out_channels == 4
    assert p.dw[0].groups == 4 and p.fc.in_features == 4
    assert p(TinyCNN.example_inputs()).shape == (4, 10)


def test_target_macs_reached():
    model = _small_cnn()
    p = prune(model, PruneConfig(target_macs=0.5, round_to=1), example_inputs=_x())
    assert 0.47 <= p.prune_report.mac_reduction <= 0.53


@pytest.mark.parametrize("crit", IMPORTANCE.names())
def test_every_criterion_prunes(crit, digits_model):
    model, train, _ = digits_model
    cfg = PruneConfig(ratio=0.5, round_to=2, importance=crit)
    p = prune(model, cfg, example_inputs=TinyCNN.example_inputs(), data=train.take(128))
    assert p.stem[0].out_channels == 4


def test_taylor_needs_data():
    with pytest.raises(DataError, match="taylor"):
        prune(_small_cnn(), PruneConfig(importance="taylor"), example_inputs=_x())


def test_ignored_layers_and_unknown_names():
    model = _small_cnn()
    p = prune(model, PruneConfig(ratio=0.5, round_to=8, exclude=("features.0",)), example_inputs=_x())
    assert p.features[0].out_channels == 16
    assert "features.0" in p.prune_report.ignored
    with pytest.raises(ConfigError, match=r"'featurs.0' matches no module.*did you mean 'features.0'"):
        prune(model, PruneConfig(exclude=("featurs.0",)), example_inputs=_x())


def test_repeated_channel_pruning_keeps_torch_pruning_defaults_empty_and_frees_models():
    import gc
    import weakref

    import torch_pruning as tp

    init = tp.pruner.BasePruner.__init__
    defaults = [v for v in (*(init.__defaults__ or ()), *(init.__kwdefaults__ or {}).values()) if isinstance(v, dict)]
    assert len(defaults) >= 3  # in_channel_groups, out_channel_groups, num_heads (and channel_groups)
    for _ in range(3):
        p = prune(TinyGrouped(), PruneConfig(ratio=0.5, round_to=1), example_inputs=TinyGrouped.example_inputs())
        assert p.g2.out_channels < 8 and p.g2.groups == 2  # grouped convs pruned group-wise
        assert [len(d) for d in defaults] == [0] * len(defaults)  # nothing written into the shared defaults
    layer = weakref.ref(p.g2)
    del p
    gc.collect()
    assert layer() is None  # a discarded pruned model is freed


def test_layer_ratio_caps_and_overrides():
    model = _small_cnn()
    p = prune(model, PruneConfig(ratio=0.5, round_to=1, layer_ratios={"features.4": 0.25}), example_inputs=_x())
    assert p.features[4].out_channels == 24  # 32 * (1 - 0.25)
    assert p.features[0].out_channels == 8


def test_unsupported_model_names_the_module():
    class Hardcoded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 8, 3, padding=1)
            self.head = nn.Linear(8 * 8 * 8, 10)

        def forward(self, x):
            return self.head(self.conv(x).view(-1, 8 * 8 * 8))  # a hard-coded width breaks once pruned

    with pytest.raises(ModelError, match="running the pruned model failed in module '(Hardcoded|head)'"):
        prune(
            Hardcoded(),
            PruneConfig(ratio=0.5, round_to=1, ignore_output_layer=False),
            example_inputs=torch.randn(2, 1, 8, 8),
        )
    with pytest.raises(ModelError, match="on example_inputs failed in module 'net.1'"):
        prune(TinyMLP(), PruneConfig(), example_inputs=torch.randn(2, 1, 5, 5))  # wrong input for the model


class _ShuffleNetLike(nn.Module):
    """Two ShuffleNet-v2 units: split -> branch -> concat -> channel shuffle (view to 5-D, transpose, view)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)

        def branch() -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(8, 16, 1),
                nn.BatchNorm2d(16),
                nn.ReLU(),
                nn.Conv2d(16, 16, 3, padding=1, groups=16),
                nn.BatchNorm2d(16),
                nn.Conv2d(16, 8, 1),
                nn.ReLU(),
            )

        self.b1, self.b2 = branch(), branch()
        self.head = nn.Conv2d(16, 32, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for b in (self.b1, self.b2):
            x1, x2 = x.chunk(2, dim=1)
            x = torch.cat([x1, b(x2)], 1)
            n, c, h, w = x.shape
            x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        return self.fc(self.head(x).mean((2, 3)))


def test_channel_shuffle_keeps_crossing_layers_and_prunes_the_rest():
    torch.manual_seed(0)
    m = _ShuffleNetLike().eval()
    x = torch.randn(1, 3, 16, 16)
    p = prune(m, PruneConfig(ratio=0.5, round_to=1), example_inputs=x)
    rep = p.prune_report
    assert p.b1[0].out_channels == 8 and p.b2[3].in_channels == 8  # inside a branch: pruned
    assert p.b1[5].out_channels == 8 and p.stem.out_channels == 16  # crossing the shuffle: kept, and said so
    assert "b1.5" in rep.skipped and "reshape" in rep.skipped["b1.5"]
    assert p.head.out_channels == 16 and rep.params_after < rep.params_before
    assert p(x).shape == (1, 10)


def _tiny_swin(v2: bool) -> nn.Module:
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

    torch.manual_seed(0)
    kw = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if v2 else {}
    return SwinTransformer(
        patch_size=[4, 4],
        embed_dim=32,
        depths=[2, 2],
        num_heads=[2, 4],
        window_size=[4, 4],
        stochastic_depth_prob=0.0,
        num_classes=10,
        **kw,
    ).eval()


@pytest.mark.parametrize("v2", [False, True], ids=["swin", "swin_v2"])
def test_swin_window_attention_kept_mlp_pruned_and_exported(v2, tmp_path):
    # torchvision's shifted_window_attention runs F.linear on qkv.weight / proj.weight: the graph never sees those
    # layers, so the attention is traced as one opaque node whose residual width is kept; the MLPs are pruned
    ort = pytest.importorskip("onnxruntime")
    m = _tiny_swin(v2)
    before = copy.deepcopy(m.state_dict())
    x = torch.randn(1, 3, 32, 32)
    p = prune(m, PruneConfig(ratio=0.3), example_inputs=x)
    rep = p.prune_report
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # the input model is unchanged
    blk = p.features[3][1]
    assert blk.mlp[0].out_features == 176 and blk.mlp[3].in_features == 176  # 256 * 0.7, rounded to 8
    assert (blk.attn.qkv.in_features, blk.attn.qkv.out_features, blk.attn.proj.out_features) == (64, 192, 64)
    assert p.features[2].reduction.out_features == 64 and blk.mlp[3].out_features == 64  # the residual width: kept
    assert "residual width of windowed attention" in rep.skipped["features.2.reduction"]
    assert "features.3.1.attn.qkv" in rep.skipped and rep.params_after < rep.params_before
    path = tmp_path / "swin.onnx"
    torch.onnx.export(p, (x,), str(path), dynamo=False, input_names=["x"], opset_version=17)
    out = ort.InferenceSession(str(path)).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        ref = p(x).numpy()
    assert abs(out - ref).max() < 1e-3
    save_pruned(p, tmp_path / "swin")
    q = load_pruned(_tiny_swin(v2), tmp_path / "swin")
    with torch.no_grad():
        assert torch.equal(q.eval()(x), p(x))


def test_recipe_reloads_exactly_and_replays(tmp_path):
    model = _small_cnn()
    p = prune(model, PruneConfig(target_macs=0.5, importance="fpgm"), example_inputs=_x())
    js, pt = save_pruned(p, tmp_path / "cnn")
    recipe = json.loads(js.read_text())
    assert recipe["steps"][0]["structure"]["features.0"]["tensors"]["weight"][0] < 16
    q = load_pruned(_small_cnn(), tmp_path / "cnn")
    assert torch.equal(q(_x()), p.eval()(_x()))
    r = replay(model, js, example_inputs=_x())  # same channels removed from the original weights
    assert torch.allclose(r.eval()(_x()), p(_x()))
    with pytest.raises(ModelError, match="lacks"):
        load_pruned(TinyCNN(), tmp_path / "cnn")
    from edgeslim.core.errors import OutputExistsError

    with pytest.raises(OutputExistsError):
        save_pruned(p, tmp_path / "cnn")


def test_torchvision_models_prune_and_export(tmp_path):
    import torchvision

    ort = pytest.importorskip("onnxruntime")
    for name in ("mobilenet_v3_small", "squeezenet1_1", "regnet_x_400mf"):
        torch.manual_seed(0)
        m = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
        x = torch.randn(1, 3, 64, 64)
        p = prune(m, PruneConfig(ratio=0.3), example_inputs=x)
        assert p.prune_report.params_after < p.prune_report.params_before, name
        path = tmp_path / f"{name}.onnx"
        torch.onnx.export(p, (x,), str(path), dynamo=False, input_names=["x"])
        out = ort.InferenceSession(str(path)).run(None, {"x": x.numpy()})[0]
        assert abs(out - p(x).detach().numpy()).max() < 1e-3, name


# ------------------------------------------------------------------------------------ unstructured / N:M
def test_magnitude_layer_and_global():
    model = _small_cnn()
    p = prune(model, PruneConfig(method="magnitude", ratio=0.8), example_inputs=_x())
    assert get_mask(model.features[0]) is None  # input untouched
    for n in ("features.0", "features.4", "features.8"):
        w = dict(p.named_modules())[n].weight
        assert abs(float((w == 0).float().mean()) - 0.8) < 0.01
    assert (p.classifier.weight != 0).all()  # output layer skipped, and recorded
    assert "classifier" in p.prune_report.skipped
    g = prune(model, PruneConfig(method="magnitude", ratio=0.8, scope="global"), example_inputs=_x())
    per = [float((dict(g.named_modules())[n].weight == 0).float().mean()) for n in ("features.0", "features.8")]
    assert per[0] != pytest.approx(per[1], abs=0.02)  # global ranking spreads sparsity unevenly
    assert abs(g.prune_report.sparsity - 0.8) < 0.02


def test_masks_survive_finetuning_and_save_storage(digits_model, tmp_path):
    from edgeslim.train import TrainConfig, fit

    model, train, val = digits_model
    p = prune(
        model,
        PruneConfig(method="magnitude", ratio=0.8, ignore_output_layer=False),
        example_inputs=TinyCNN.example_inputs(),
    )
    zeros = p.pw[0].weight == 0
    t = fit(p, train, val, TrainConfig(epochs=1, batch_size=64, augment=False), progress=False, max_steps_per_epoch=10)
    assert (t.model.pw[0].weight[zeros] == 0).all()
    assert not torch.equal(t.model.pw[0].weight[~zeros], p.pw[0].weight[~zeros])  # the rest did train
    save_pruned(t.model, tmp_path / "sparse")
    q = load_pruned(TinyCNN(), tmp_path / "sparse")
    x = TinyCNN.example_inputs()
    assert torch.equal(q(x), t.model.eval()(x))
    dense = strip_masks(copy.deepcopy(t.model))
    assert get_mask(dense.pw[0]) is None and torch.equal(dense(x), q(x))
    st = sparse_storage(dense)
    assert st["sparsity"] > 0.7
    assert st["bitmask"] < 0.5 * st["dense_fp32"] and st[st["best_format"]] <= st["bitmask"]


def test_agp_schedule_ramps_during_fit(digits_model):
    from edgeslim.train import TrainConfig, fit

    model, train, val = digits_model
    cfg = PruneConfig(method="magnitude", ratio=0.6, schedule="agp", schedule_steps=20, schedule_every=5)
    p = prune(model, cfg, example_inputs=TinyCNN.example_inputs())
    assert float((p.pw[0].weight == 0).float().mean()) == 0.0  # starts dense
    mask = get_mask(p.pw[0])
    assert mask.target(10) == pytest.approx(0.6 * (1 - 0.5**3))
    t = fit(
        p,
        train,
        val,
        TrainConfig(epochs=1, batch_size=32, augment=False, warmup_steps=2),
        progress=False,
        max_steps_per_epoch=25,
    )
    assert float((t.model.pw[0].weight == 0).float().mean()) == pytest.approx(0.6, abs=0.02)


def test_n_m_masks():
    model = _small_cnn()
    p = prune(model, PruneConfig(method="nm", n=2, m=4, ignore_output_layer=False), example_inputs=_x())
    w = p.features[4].weight.detach().reshape(32, -1, 4)
    assert ((w != 0).sum(-1) <= 2).all()
    assert "features.0" in p.prune_report.skipped  # 1x3x3 = 9 inputs: not a multiple of 4, said so
    assert "2:4" in p.prune_report.note


# --------------------------------------------------------------------------------- prune -> fine-tune loop
def test_prune_finetune_resumes(digits_model, tmp_path):
    from edgeslim.train import TrainConfig

    model, train, val = digits_model
    cfg = PruneConfig(ratio=0.5, round_to=2)
    tc = TrainConfig(epochs=1, batch_size=64, augment=False, warmup_steps=2)
    kw = dict(
        train=train,
        val=val,
        steps=2,
        train_config=tc,
        example_inputs=TinyCNN.example_inputs(),
        checkpoint_dir=tmp_path,
        max_steps_per_epoch=5,
    )
    a = prune_finetune(model, cfg, **kw)
    assert [r["round"] for r in a.prune_history] == [1, 2]
    assert a.stem[0].out_channels < 8 and [s["technique"] for s in a.edgeslim_recipe] == ["prune", "prune"]
    (tmp_path / "round_2.recipe").unlink()  # "interrupted" before round 2 was saved
    round1 = (tmp_path / "round_1.recipe").stat().st_mtime_ns
    b = prune_finetune(model, cfg, **kw)
    assert (tmp_path / "round_1.recipe").stat().st_mtime_ns == round1  # round 1 was not redone
    assert [r["round"] for r in b.prune_history] == [1, 2]
    assert b.stem[0].out_channels == a.stem[0].out_channels
    assert torch.allclose(b(TinyCNN.example_inputs()), a(TinyCNN.example_inputs()), atol=1e-5)


def test_cli_prune_saves_recipe_and_reports_clear_errors(tmp_path, capsys):
    from edgeslim.cli import main
    from edgeslim.models import build

    out = tmp_path / "out"
    args = [
        "prune",
        "small_cnn",
        "--dataset",
        "digits",
        "--no-pretrained",
        "--target-macs",
        "0.5",
        "--importance",
        "l2",
        "--out",
        str(out),
    ]
    assert main(args + ["--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert 0.4 < res["report"]["mac_reduction"] < 0.6 and res["config"]["importance"] == "l2"
    q = load_pruned(build("small_cnn", "digits"), out / "small_cnn-pruned")
    assert count_macs(q, torch.zeros(1, 1, 8, 8)) == res["report"]["macs_after"]
    assert main(args) == 2  # outputs exist: refused without --force, one-line error
    assert "--force" in capsys.readouterr().err
    assert main(args + ["--force", "--recalibrate-bn", "64"]) == 0
    assert "BatchNorm statistics re-estimated on 64 inputs" in capsys.readouterr().out
    for bad, msg in (
        (["--target-macs", "1.5"], "target_macs"),
        (["--importance", "l3"], "l1"),
        (["--method", "magnitude"], "target_macs"),
        (["--recalibrate-bn", "-3"], "recalibrate_bn"),
    ):
        assert (
            main(
                args[:5]
                + ["--out", str(out), "--force"]
                + (["--target-macs", "0.5"] if "--method" in bad else [])
                + bad
            )
            == 2
        )
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------- transformer
def _tiny_bert(layers: int = 2, ffn: int = 64) -> tuple[nn.Module, dict, object]:
    """A random 4-head BertModel (hidden 32), its example inputs, and its config."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=ffn,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    return transformers.BertModel(cfg).eval(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, cfg


def test_bert_heads_and_ffn_removed_reload_and_export(tmp_path):
    transformers = pytest.importorskip("transformers")
    ort = pytest.importorskip("onnxruntime")
    model, ex, cfg = _tiny_bert()
    ids = ex["input_ids"]
    p = prune(model, PruneConfig(ratio=0.5, heads_ratio=0.5), example_inputs=ex)
    layer = p.encoder.layer[0]
    assert layer.attention.self.num_attention_heads == 2 and layer.attention.self.query.out_features == 16
    assert layer.intermediate.dense.out_features == 32 and layer.output.dense.in_features == 32
    assert model.encoder.layer[0].attention.self.num_attention_heads == 4  # input untouched
    out = p(**ex).last_hidden_state
    assert out.shape == (2, 10, 32)
    save_pruned(p, tmp_path / "bert")
    q = load_pruned(transformers.BertModel(cfg), tmp_path / "bert")
    assert torch.equal(q(**ex).last_hidden_state, out)

    class Wrap(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, a, b):
            return self.m(input_ids=a, attention_mask=b).last_hidden_state

    path = tmp_path / "bert.onnx"
    torch.onnx.export(Wrap(p), (ids, torch.ones_like(ids)), str(path), input_names=["a", "b"], dynamo=True)
    got = ort.InferenceSession(str(path)).run(None, {"a": ids.numpy(), "b": torch.ones_like(ids).numpy()})[0]
    assert abs(got - out.detach().numpy()).max() < 1e-4


def test_transformer_heads_and_neurons_are_ranked_by_the_importance_registry():
    from edgeslim.prune import Criterion

    model, ex, _ = _tiny_bert(layers=1, ffn=16)
    layer = model.encoder.layer[0]
    att = layer.attention.self
    per_head = [
        w.detach().reshape(4, -1).abs().sum(1)
        for w in (att.query.weight, att.key.weight, att.value.weight, layer.attention.output.dense.weight.t())
    ]
    top2 = sorted(torch.stack(per_head).sum(0).argsort(descending=True)[:2].tolist())
    p = prune(model, PruneConfig(ratio=0.5, heads_ratio=0.5, importance="l1"), example_inputs=ex)
    assert p.prune_report.layers["encoder.layer.0"]["kept_heads"] == top2  # the L1 of each head's weights

    # a criterion registered in IMPORTANCE decides: here the units with the highest index are kept
    IMPORTANCE.register("by_index")(
        Criterion(lambda: None, False, "test only", lambda ws, seed=0: torch.arange(ws[0].shape[0], dtype=torch.float))
    )
    try:
        p = prune(model, PruneConfig(ratio=0.5, heads_ratio=0.5, importance="by_index"), example_inputs=ex)
        kept = p.encoder.layer[0]
        assert p.prune_report.layers["encoder.layer.0"]["kept_heads"] == [2, 3]
        assert torch.equal(kept.intermediate.dense.weight, layer.intermediate.dense.weight[8:])
        assert torch.equal(kept.output.dense.weight, layer.output.dense.weight[:, 8:])
    finally:
        IMPORTANCE._items.pop("by_index")
    with pytest.raises(
        ConfigError,
        match=r"importance='bn_scale' is not available for transformer heads/FFN; "
        r"valid: fpgm, l1, l2, random",
    ):
        prune(model, PruneConfig(heads_ratio=0.5, importance="bn_scale"), example_inputs=ex)


# ------------------------------------------------------------------------------------------------ BatchNorm
def test_bn_recalibration_restores_a_pruned_mobilenet_before_any_fine_tuning():
    from edgeslim import data, models
    from edgeslim.train import evaluate

    train, val = data.load("fashion-mnist")
    base = models.load("mobilenet_v2", "fashion-mnist")
    state0 = copy.deepcopy(base.state_dict())
    v = val.take(500, seed=3)
    x = val.normalized()[:2]
    plain = prune(base, PruneConfig(ratio=0.3, importance="l2"), example_inputs=x)
    recal = prune(
        base,
        PruneConfig(ratio=0.3, importance="l2", recalibrate_bn=512),
        example_inputs=x,
        data=train.take(2000, seed=1),
    )
    a_plain, a_recal = evaluate(plain, v), evaluate(recal, v)
    assert a_plain < 0.3 and a_recal > 0.55, (a_plain, a_recal)  # near chance -> most of the way back
    sp, sr = plain.state_dict(), recal.state_dict()
    stats = [k for k in sp if k.endswith(("running_mean", "running_var"))]
    assert stats and all(not torch.equal(sp[k], sr[k]) for k in stats)
    assert all(torch.equal(sp[k], sr[k]) for k in sp if k not in stats and not k.endswith("num_batches_tracked"))
    assert "BatchNorm statistics re-estimated on 512" in recal.prune_report.note
    assert all(torch.equal(v0, base.state_dict()[k]) for k, v0 in state0.items())  # the input is untouched
    with pytest.raises(DataError, match="recalibrate_bn=512 needs data="):
        prune(base, PruneConfig(ratio=0.3, recalibrate_bn=512), example_inputs=x)
    with pytest.raises(ConfigError, match="recalibrate_bn"):
        PruneConfig(recalibrate_bn=-1)


def test_recalibrate_bn_inputs_modes_and_errors(caplog):
    from edgeslim.train import recalibrate_bn

    torch.manual_seed(0)
    m = TinyCNN().train()
    xs = [torch.randn(8, 1, 8, 8) * 3 + 1 for _ in range(4)]
    out = recalibrate_bn(m, xs, num_samples=20)
    assert out.training and out is not m
    assert out.stem[1].momentum == m.stem[1].momentum == 0.1  # momentum restored
    with torch.no_grad():  # the plain average of the batch means, over exactly 20 inputs (8 + 8 + 4)
        want = torch.stack([m.stem[0](b).mean((0, 2, 3)) for b in (xs[0], xs[1], xs[2][:4])]).mean(0)
    assert torch.allclose(out.stem[1].running_mean, want, atol=1e-5)
    assert torch.equal(m.stem[1].running_mean, torch.zeros(8))  # input untouched
    pairs = recalibrate_bn(m.eval(), [(x, torch.zeros(8)) for x in xs], num_samples=20)
    assert not pairs.training and torch.allclose(pairs.stem[1].running_mean, want, atol=1e-5)
    with caplog.at_level("WARNING"):
        same = recalibrate_bn(TinyMLP(), xs)
    assert "no BatchNorm" in caplog.text and isinstance(same, TinyMLP)
    with pytest.raises(DataError, match="no inputs"):
        recalibrate_bn(m, [])
    with pytest.raises(DataError, match="expected input tensors"):
        recalibrate_bn(m, [{"x": xs[0]}])
    with pytest.raises(ConfigError, match="num_samples=0"):
        recalibrate_bn(m, xs, num_samples=0)


def test_old_field_names_still_work_for_one_release():
    with pytest.warns(DeprecationWarning, match="ignored_layers is deprecated; use exclude="):
        cfg = PruneConfig(ignored_layers=("features.0",))
    assert cfg.exclude == ("features.0",) and "ignored_layers" not in cfg.to_dict()
    assert PruneConfig.from_yaml(cfg.to_yaml()) == cfg


# ------------------------------------------------------------------------------------ residual blocks (depth)
def test_block_pruning_finds_blocks_by_family_and_skips_the_rest():
    from tiny import TinyRepeat, TinyResNet, TinyViT

    from edgeslim.prune._blocks import residual_blocks

    # a Linear block with a functional branch, a BasicBlock with a ReLU after the sum (the downsampling one has a
    # projection on its skip), a residual add written in the model's own forward, torch's TransformerEncoderLayer
    # (fx cannot trace its fast-path checks: listed, with the reason), timm's pre-norm ViT blocks (two sums each,
    # an attention mask argument traced at its default None) and EfficientNet blocks
    assert residual_blocks(TinyRepeat(), TinyRepeat.example_inputs())[0] == ["blocks.0", "blocks.1", "blocks.2"]
    assert residual_blocks(TinyResNet(), TinyResNet.example_inputs())[0] == ["layer1"]
    assert residual_blocks(TinyCNN(), TinyCNN.example_inputs())[0] == []
    found, why = residual_blocks(TinyViT().eval(), TinyViT.example_inputs())
    assert found == [] and "not traceable by torch.fx" in why["encoder.layers.0"]
    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, depth=3).eval()
    assert residual_blocks(vit, torch.randn(1, 3, 32, 32))[0] == ["blocks.0", "blocks.1", "blocks.2"]
    xs = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    p = prune(vit, PruneConfig(method="block", blocks=1), example_inputs=xs[:1], data=xs)
    assert sum(type(b).__name__ == "SkippedBlock" or isinstance(b, nn.Identity) for b in p.blocks) == 1
    assert p.prune_report.macs_after < p.prune_report.macs_before
    eff = timm.create_model("efficientnet_lite0", num_classes=10).eval()
    assert len(residual_blocks(eff, torch.randn(1, 3, 64, 64))[0]) == 9


def test_block_pruning_removes_the_least_used_block_and_replays(tmp_path):
    from tiny import TinyRepeat, TinyResNet

    import edgeslim as es
    from edgeslim.core.counting import count_macs

    torch.manual_seed(0)
    m = TinyRepeat().eval()
    with torch.no_grad():  # blocks.1 barely changes its input: it must be the one removed
        m.blocks[1].fc.weight.mul_(1e-3)
        m.blocks[1].fc.bias.fill_(-1.0)
    x = TinyRepeat.example_inputs(64)
    before = copy.deepcopy(m.state_dict())
    p = prune(m, PruneConfig(method="block", blocks=1), example_inputs=x[:1], data=x)
    assert p.prune_report.method == "block" and list(p.prune_report.layers) == ["blocks.1"]
    assert isinstance(p.blocks[1], nn.Identity) and not isinstance(m.blocks[1], nn.Identity)  # input untouched
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    assert count_macs(p, x[:1]) < count_macs(m, x[:1])
    with torch.no_grad():
        assert torch.allclose(p(x), m.head(m.blocks[2](m.blocks[0](m.stem(x)))))
    with pytest.raises(ConfigError, match=r"blocks=4 but TinyRepeat has 3 removable residual block\(s\)"):
        prune(m, PruneConfig(method="block", blocks=4), example_inputs=x[:1], data=x)
    with pytest.raises(DataError, match="ranks blocks on data"):
        prune(m, PruneConfig(method="block"), example_inputs=x[:1])
    with pytest.raises(ConfigError, match="PruneConfig.blocks=0"):
        PruneConfig(method="block", blocks=0)

    # a ResNet BasicBlock keeps its ReLU (tail) and the chain block -> channel pruning replays from one recipe file
    r = TinyResNet().eval()
    xr = TinyResNet.example_inputs(8)
    pb = prune(r, PruneConfig(method="block", blocks=1, recalibrate_bn=8), example_inputs=xr[:1], data=[xr])
    pc = prune(pb, PruneConfig(target_macs=0.3, round_to=1), example_inputs=xr[:1])
    assert type(pc.layer1).__name__ == "SkippedBlock" and pc.layer2.conv1.out_channels < 16
    es.save(pc, tmp_path / "r.recipe")
    back = es.load(tmp_path / "r.recipe", model=TinyResNet())
    with torch.no_grad():
        assert torch.allclose(back.eval()(xr), pc.eval()(xr), atol=1e-6)
    # the kept ReLU now reads the previous block's ReLU output, which autograd saved: it must not work in place
    import torchvision

    tv = torchvision.models.resnet18(num_classes=10).eval()
    x32 = torch.randn(4, 3, 32, 32)
    t = prune(tv, PruneConfig(method="block", blocks=2, block_samples=4), example_inputs=x32[:1], data=x32)
    t.train()(x32).sum().backward()  # "modified by an inplace operation" before the tail was made out of place
    assert tv.layer1[1].relu.inplace  # the input model's modules are untouched
    onnx = pytest.importorskip("onnx")
    art = es.export(pc, "onnx", example_inputs=xr, path=tmp_path / "r.onnx")
    convs = sum(n.op_type == "Conv" for n in onnx.load(str(art.path)).graph.node)
    assert convs == 4  # stem + layer2's two convs and its projection: layer1's two convs are gone

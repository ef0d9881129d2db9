"""share/: weight clustering, compact storage, magnitude pruning, tying, factorization, separable convs."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
import torch
from tiny import TinyCNN, TinyConvNet, TinyMLP, TinyRepeat, TinyRepeatBN
from torch import nn

from edgeslim.core.counting import count_macs
from edgeslim.core.errors import ConfigError, DataError, ModelError
from edgeslim.share import (
    CLUSTER_INITS,
    CODECS,
    ClusterConfig,
    ClusteredLayer,
    FactorizeConfig,
    SeparableConfig,
    TieConfig,
    cluster,
    factorize,
    kmeans_1d,
    load_compressed,
    magnitude_prune,
    save_compressed,
    separable,
    strip_clustering,
    tie_layers,
)
from edgeslim.share._storage import mask_to_runs, runs_to_mask


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not any(isinstance(m, ClusteredLayer) for m in model.modules())


def clustered(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ClusteredLayer)}


# ---- clustering ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("init", CLUSTER_INITS.names())
def test_cluster_gives_exactly_k_values_per_layer(init):
    model = TinyCNN()
    before = snapshot(model)
    c = cluster(model, ClusterConfig(clusters=8, init=init, min_weights=70))
    assert_unchanged(model, before)
    assert set(clustered(c)) == {"stem.0", "dw.0", "fc"}
    for m in clustered(c).values():
        assert len(torch.unique(m.weight)) == 8 and m.indices.dtype == torch.uint8
    assert [r["name"] for r in c.report.skipped()] == ["pw.0"] and "min_weights" in c.report.skipped()[0]["reason"]
    x = TinyCNN.example_inputs()
    plain = strip_clustering(c)
    assert not clustered(plain) and type(plain.fc) is nn.Linear
    assert torch.equal(plain(x), c(x))


def test_kmeans_1d_keeps_all_clusters_on_skewed_data():
    x = np.concatenate([np.random.default_rng(0).normal(0, 0.01, 5000), [5.0, 6.0, 7.0]])
    c, labels = kmeans_1d(x, 16, "linear")
    assert len(np.unique(c)) == 16 and np.all(np.diff(c) > 0) and len(np.unique(labels)) == 16


def test_finetune_keeps_k_unique_values_and_updates_centroids():
    from edgeslim.data import load
    from edgeslim.train import TrainConfig, fit

    train, val = load("digits")
    c = cluster(TinyMLP(), ClusterConfig(clusters=8))
    before = snapshot(c)
    tuned = fit(
        c,
        train,
        val,
        TrainConfig(epochs=1, lr=0.1, batch_size=32, augment=False, warmup_steps=0),
        progress=False,
        max_steps_per_epoch=10,
    ).model
    assert all(torch.equal(c.state_dict()[k], v) for k, v in before.items())
    for name, m in clustered(tuned).items():
        assert len(torch.unique(m.weight)) == 8
        assert torch.equal(m.indices, clustered(c)[name].indices)
        assert not torch.equal(m.centroids, clustered(c)[name].centroids)


def test_pruning_masks_survive_finetuning_and_clustering_keeps_zeros():
    from edgeslim.data import load
    from edgeslim.train import TrainConfig, fit

    train, _ = load("digits")
    model = TinyMLP()
    before = snapshot(model)
    p = magnitude_prune(model, {"net.1": 0.8, "net.3": 0.5})
    assert_unchanged(model, before)
    assert p.report.done()[0]["sparsity"] == pytest.approx(0.8, abs=1e-3)
    zeros = p.net[1].weight == 0
    tuned = fit(
        p,
        train,
        None,
        TrainConfig(epochs=1, lr=0.1, batch_size=32, augment=False, warmup_steps=0),
        progress=False,
        max_steps_per_epoch=5,
    ).model
    assert torch.equal(tuned.net[1].weight == 0, zeros)
    tuned_before = snapshot(tuned)
    c = cluster(tuned, ClusterConfig(clusters=4))
    w = c.net[1].weight
    assert torch.equal(w == 0, zeros) and len(torch.unique(w)) == 4 + 1
    for _ in range(2):  # neither clustering nor stripping a copy may touch the pruned input
        assert torch.equal(strip_clustering(tuned).net[1].weight == 0, zeros)
    assert all(torch.equal(tuned.state_dict()[k], v) for k, v in tuned_before.items())
    assert torch.equal(tuned.net[1].weight == 0, zeros)


def test_cluster_bad_inputs_raise_with_messages():
    with pytest.raises(ConfigError, match="clusters"):
        ClusterConfig(clusters=1)
    with pytest.raises(ConfigError, match="init"):
        ClusterConfig(init="kmeans")
    with pytest.raises(ConfigError, match=r"more than the 72 distinct weights of layer 'stem.0'"):
        cluster(TinyCNN(), ClusterConfig(clusters=100, layers=("stem.*",)))
    with pytest.raises(ConfigError, match=r"'stem.1' is a BatchNorm2d.*did you mean 'stem.0'"):
        cluster(TinyCNN(), ClusterConfig(layers=("stem.1",)))
    with pytest.raises(ConfigError, match="exclude pattern 'nope'"):
        cluster(TinyCNN(), ClusterConfig(clusters=4, exclude=("nope",)))
    with pytest.raises(ConfigError, match="sparsity"):
        magnitude_prune(TinyMLP(), 1.0)


# ---- compact storage ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS.names())
def test_every_codec_round_trips(codec):
    rng = np.random.default_rng(0)
    for alphabet, s in (
        (2, rng.integers(0, 2, 999)),
        (32, np.minimum(rng.geometric(0.2, 5000), 31)),
        (3000, rng.integers(0, 3000, 777)),
        (7, np.full(10, 3)),
    ):
        enc = CODECS.get(codec).encode(s, alphabet)
        assert np.array_equal(CODECS.get(codec).decode(enc, len(s), alphabet), s)
    for p in (0.003, 0.1, 0.9):
        m = rng.random(20000) < p
        assert np.array_equal(runs_to_mask(mask_to_runs(m), len(m)), m)


def test_compressed_file_reloads_exact_weights_and_is_much_smaller(tmp_path):
    from edgeslim.export import export

    model = TinyMLP()
    c = cluster(magnitude_prune(model, 0.75), ClusterConfig(clusters=16))
    before = snapshot(c)
    rep = save_compressed(c, tmp_path / "m.eslz")
    assert_unchanged(model, snapshot(model))
    assert all(torch.equal(c.state_dict()[k], v) for k, v in before.items())
    buf = io.BytesIO()
    torch.save(strip_clustering(c).state_dict(), buf)
    assert rep.dense_bytes == buf.getbuffer().nbytes
    assert rep.compressed_bytes == (tmp_path / "m.eslz").stat().st_size < buf.getbuffer().nbytes / 8
    assert set(rep.codec_bytes["indices"]) == {*CODECS.names(), "best"}
    reloaded = load_compressed(tmp_path / "m.eslz", TinyMLP)
    ref = strip_clustering(c).state_dict()
    assert all(torch.equal(ref[k], v) for k, v in reloaded.state_dict().items())
    same = load_compressed(tmp_path / "m.eslz", c)  # a template works too
    assert all(torch.equal(ref[k], v) for k, v in same.state_dict().items())
    x = TinyMLP.example_inputs()
    art = export(reloaded, "onnx", example_inputs=x, path=tmp_path / "m.onnx")
    assert art.validation["cosine"] > 0.9999
    with pytest.raises(Exception, match="exists"):
        save_compressed(c, tmp_path / "m.eslz")
    (tmp_path / "bad.eslz").write_bytes(b"ESLZ\x01garbage")
    with pytest.raises(ModelError, match="corrupt"):
        load_compressed(tmp_path / "bad.eslz", TinyMLP)
    with pytest.raises(ModelError, match="not an edgeslim compressed"):
        load_compressed(tmp_path / "m.onnx", TinyMLP)


# ---- cross-layer tying --------------------------------------------------------------------------------------


def onnx_weights(path) -> int:
    return sum(int(np.prod(t.dims)) for t in onnx.load(str(path)).graph.initializer)


def test_tied_layers_share_one_tensor_and_onnx_keeps_one_copy(tmp_path):
    from edgeslim.export import export

    model = TinyRepeat()
    before = snapshot(model)
    t = tie_layers(model, TieConfig(auto=True))
    assert_unchanged(model, before)
    assert t.report.done()[0]["name"] == "blocks.0 = blocks.1 = blocks.2"
    assert t.blocks[0].fc.weight is t.blocks[2].fc.weight and t.blocks[1].fc.bias is t.blocks[0].fc.bias
    assert t.report.totals["params_before"] - t.report.totals["params_after"] == 2 * (16 * 16 + 16)
    x = TinyRepeat.example_inputs()
    a = export(model, "onnx", example_inputs=x, path=tmp_path / "dense.onnx")
    b = export(t, "onnx", example_inputs=x, path=tmp_path / "tied.onnx")
    assert onnx_weights(tmp_path / "dense.onnx") - onnx_weights(tmp_path / "tied.onnx") == 2 * (16 * 16 + 16)
    assert b.size_bytes < a.size_bytes - 2 * 4 * 16 * 16
    m = tie_layers(model, TieConfig(groups=[["blocks.0", "blocks.1"]], init="mean"))
    assert torch.allclose(m.blocks[1].fc.weight, (model.blocks[0].fc.weight + model.blocks[1].fc.weight) / 2)


def test_tying_batchnorm_buffers_keeps_one_copy_in_onnx(tmp_path):
    from edgeslim.export import export

    model = TinyRepeatBN().eval()
    with torch.no_grad():
        for i, blk in enumerate(model.blocks):  # per-block statistics, as after training
            blk[1].running_mean.fill_(0.1 * i)
    x = TinyRepeatBN.example_inputs()
    t = tie_layers(model, TieConfig(auto=True))
    assert t.blocks[0][1].running_mean is t.blocks[2][1].running_mean
    assert torch.equal(t.blocks[1](t.stem(x)), model.blocks[0](model.stem(x)))
    per_param = tie_layers(model, TieConfig(auto=True, buffers=False))
    assert per_param.blocks[0][1].running_mean is not per_param.blocks[2][1].running_mean
    conv = 8 * 8 * 9
    sizes = {
        k: onnx_weights(export(m, "onnx", example_inputs=x, path=tmp_path / f"{k}.onnx").path)
        for k, m in (("dense", model), ("params", per_param), ("buffers", t))
    }
    assert sizes["dense"] - sizes["buffers"] >= 2 * conv and sizes["params"] > sizes["buffers"]


def test_tie_bad_inputs_raise_with_messages():
    with pytest.raises(ConfigError, match="exactly one"):
        TieConfig()
    with pytest.raises(ConfigError, match="two or more"):
        TieConfig(groups=[["blocks.0"]])
    with pytest.raises(ConfigError, match=r"no module named 'blocks.7'.*did you mean"):
        tie_layers(TinyRepeat(), TieConfig(groups=[["blocks.0", "blocks.7"]]))
    with pytest.raises(ConfigError, match=r"'head' is not structurally identical to 'blocks.0'"):
        tie_layers(TinyRepeat(), TieConfig(groups=[["blocks.0", "head"]]))
    with pytest.raises(ConfigError, match="inside"):
        tie_layers(TinyRepeat(), TieConfig(groups=[["blocks.0", "blocks.0.fc"]]))
    with pytest.raises(ConfigError, match="found no"):
        tie_layers(TinyConvNet(), TieConfig(auto=True))


# ---- factorization ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,tiny", [("svd", TinyMLP), ("svd", TinyConvNet), ("spatial_svd", TinyConvNet)])
def test_factorize_full_energy_reproduces_and_lower_energy_shrinks(method, tiny):
    model = tiny()
    x = tiny.example_inputs()
    before = snapshot(model)
    full = factorize(model, FactorizeConfig(method=method, energy=1.0), example_inputs=x)
    assert_unchanged(model, before)
    assert full.report.done() and torch.allclose(full(x), model(x), atol=1e-4)
    low = factorize(
        model,
        FactorizeConfig(method=method, energy=0.5, layers=("conv2",) if tiny is TinyConvNet else ()),
        example_inputs=x,
    )
    assert low.report.totals["params_after"] < low.report.totals["params_before"]
    assert low.report.totals["macs_after"] < low.report.totals["macs_before"] == count_macs(model, x)
    assert all(r["rank"] < r["full_rank"] for r in low.report.done())


def test_factorize_by_mac_ratio_and_bad_inputs():
    model = TinyMLP()
    f = factorize(model, FactorizeConfig(mac_ratio=0.5))
    assert all(r["mac_ratio"] <= 0.5 for r in f.report.done())
    with pytest.raises(ConfigError, match=r"cannot factorize layer 'dw.0'.*groups=8"):
        factorize(TinyCNN(), FactorizeConfig(layers=("dw.0",)))
    with pytest.raises(ConfigError, match=r"cannot factorize layer 'fc'.*not Linear"):
        factorize(TinyCNN(), FactorizeConfig(method="spatial_svd", layers=("fc",)))
    with pytest.raises(ConfigError, match=r"rank=40 is out of range for layer 'net.1'.*\[1, 32\]"):
        factorize(model, FactorizeConfig(rank=40, layers=("net.1",)))
    with pytest.raises(ConfigError, match=r"mac_ratio=0.01 needs rank < 1 for layer 'net.1'"):
        factorize(model, FactorizeConfig(mac_ratio=0.01))
    with pytest.raises(ConfigError, match="give one of"):
        FactorizeConfig(energy=0.9, rank=3)
    with pytest.raises(ConfigError, match="energy"):
        FactorizeConfig(energy=1.5)


@pytest.mark.parametrize("fit", ["weights", "activations"])
def test_separable_is_exact_on_an_exactly_separable_conv(fit):
    model = TinyConvNet().make_conv2_separable()
    x = TinyConvNet.example_inputs(16)
    before = snapshot(model)
    s = separable(model, SeparableConfig(layers=("conv2",), fit=fit), data=x, example_inputs=x)
    assert_unchanged(model, before)
    assert s.conv2[0].groups == 8 and s.conv2[1].kernel_size == (1, 1)
    assert torch.allclose(s(x), model(x), atol=1e-4)
    assert s.report.done()[0]["weight_rel_error"] < 1e-10
    assert s.report.totals["macs_after"] < s.report.totals["macs_before"]


def test_separable_bad_inputs_raise_with_messages():
    with pytest.raises(ConfigError, match=r"cannot make layer 'pw.0'.*1x1"):
        separable(TinyCNN(), SeparableConfig(layers=("pw.0",)))
    with pytest.raises(ConfigError, match=r"multiplier=10 is out of range for layer 'conv2'"):
        separable(TinyConvNet(), SeparableConfig(layers=("conv2",), multiplier=10))
    with pytest.raises(DataError, match="needs data"):
        separable(TinyConvNet(), SeparableConfig(fit="activations"))


# ---- configs ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        ClusterConfig(clusters=16, init="kmeans++", layers=("features.*",), exclude=("features.0",), min_weights=100),
        TieConfig(groups=[["layer3.0", "layer3.1"], ["a", "b", "c"]], init="mean"),
        TieConfig(auto=True, buffers=False, min_params=100),
        FactorizeConfig(method="spatial_svd", mac_ratio=0.5, layers=("features.3",)),
        FactorizeConfig(rank=4),
        SeparableConfig(layers=("features.6",), multiplier=2, fit="activations", samples=64),
    ],
)
def test_every_config_round_trips_yaml(cfg):
    again = type(cfg).from_yaml(cfg.to_yaml())
    assert again == cfg and again.to_dict() == cfg.to_dict()


def test_every_share_config_names_left_alone_layers_exclude():
    for cls in (ClusterConfig, FactorizeConfig, SeparableConfig):
        with pytest.warns(DeprecationWarning, match="skip is deprecated; use exclude="):
            cfg = cls(skip=("fc",))
        assert cfg.exclude == ("fc",) and "skip" not in cfg.to_dict()

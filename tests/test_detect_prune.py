"""Channel pruning of the zoo detector: the head's output convs protected, couplings through concat / upsample /
depthwise handled, BN recalibration on detection data, ONNX export and recipe replay."""

import numpy as np
import pytest
import torch
from tiny import TinyCNN, TinyDetectionSet, tiny_detector

import edgeslim as es
from edgeslim.core.counting import count_macs
from edgeslim.core.errors import ConfigError
from edgeslim.prune import PruneConfig
from edgeslim.prune._inspect import output_layers

HEAD_OUTPUTS = sorted(f"heads.{i}.{b}.1" for i in range(3) for b in ("cls", "box"))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return TinyDetectionSet(24, tmp_path_factory.mktemp("tinydet"), seed=3)


@pytest.fixture(scope="module")
def pruned(data):
    model = tiny_detector()
    x = torch.stack([data[i][0] for i in range(2)])
    cfg = PruneConfig(method="channel", target_macs=0.45, recalibrate_bn=16)
    return model, es.prune(model, cfg, example_inputs=x, data=data), x


def test_detector_output_convs_found_on_the_graph():
    model = tiny_detector()
    x = torch.rand(1, 3, 64, 64)
    assert output_layers(model, x) == HEAD_OUTPUTS  # every level's class-logit and box conv, nothing else
    assert output_layers(TinyCNN(), torch.rand(1, 1, 28, 28)) == ["fc"]  # a classifier: its last layer, as before


def test_pruned_detector_is_smaller_with_the_same_output_layout(pruned):
    model, small, x = pruned
    rep = small.prune_report
    assert rep.mac_reduction >= 0.40
    assert count_macs(small, x[:1]) <= 0.60 * count_macs(model, x[:1])
    assert sorted(set(HEAD_OUTPUTS) & set(rep.ignored)) == HEAD_OUTPUTS
    with torch.no_grad():
        assert small(x).shape == model(x).shape  # [B, A, 4 + C]
    mods = dict(small.named_modules())
    ref = dict(model.named_modules())
    for n in HEAD_OUTPUTS:  # the output convs keep their outputs (their inputs shrink with the neck)
        assert mods[n].out_channels == ref[n].out_channels
    # channels physically removed, through the depthwise convs, the concat inputs and the heads
    assert mods["backbone.17.conv.1.0"].out_channels < ref["backbone.17.conv.1.0"].out_channels
    assert mods["backbone.17.conv.1.0"].groups == mods["backbone.17.conv.1.0"].out_channels
    assert mods["heads.0.cls.0.1.0"].out_channels < ref["heads.0.cls.0.1.0"].out_channels
    td4 = mods["neck.td4.0.0"]  # depthwise conv after cat([up(p5), lat4(c4)]): its width is the sum of both
    assert td4.in_channels == td4.groups == mods["neck.lat5.0"].out_channels + mods["neck.lat4.0"].out_channels
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


def test_bn_recalibrated_on_detection_images(pruned):
    model, small, _ = pruned
    assert "BatchNorm statistics re-estimated on 16 inputs" in small.prune_report.note
    bn = dict(small.named_modules())["heads.0.cls.0.1.1"]
    assert int(bn.num_batches_tracked) > 0
    same = dict(model.named_modules())["heads.2.box.1"]  # the protected conv keeps its trained bias
    assert torch.equal(dict(small.named_modules())["heads.2.box.1"].bias, same.bias)


def test_pruned_detector_exports_and_replays(pruned, tmp_path):
    _, small, x = pruned
    art = es.export(small, "onnx", example_inputs=x, path=tmp_path / "small.onnx")
    got = es.runtime.load(art, "onnxruntime").run(x.numpy())
    with torch.no_grad():
        ref = small.eval()(x).numpy()
    assert got.shape == ref.shape and np.abs(got - ref).max() < 1e-3
    es.save(small, tmp_path / "small.recipe")
    again = es.load(tmp_path / "small.recipe", model=tiny_detector())
    with torch.no_grad():
        assert torch.equal(again(x), torch.from_numpy(ref))


def test_taylor_on_a_detector_is_refused_in_one_line(data):
    x = torch.rand(1, 3, 64, 64)
    with pytest.raises(ConfigError, match="detector: use a weight criterion"):
        es.prune(
            tiny_detector(), PruneConfig(method="channel", ratio=0.3, importance="taylor"), example_inputs=x, data=data
        )

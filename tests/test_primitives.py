"""The shared primitives in edgeslim.core: MAC and parameter counting, module selection and surgery."""

from __future__ import annotations

import pytest
import torch
from tiny import TinyAttention, TinyCNN
from torch import nn

from edgeslim.core.counting import count_macs, count_params
from edgeslim.core.errors import ConfigError, ModelError
from edgeslim.core.modules import first_match, get_module, require_matches, select, set_module


# ------------------------------------------------------------------------------------------------ counting
def test_count_macs_counts_attention_at_batch_1_and_restores_the_model():
    model = TinyAttention().train()
    fast = torch.backends.mha.get_fastpath_enabled()
    assert count_macs(model, TinyAttention.example_inputs(4)) == TinyAttention.MACS
    assert count_macs(model, TinyAttention.example_inputs(1)) == TinyAttention.MACS  # batch 1 either way
    assert model.training and torch.backends.mha.get_fastpath_enabled() == fast
    # the eval-mode, no-grad fast path (aten::_native_multi_head_attention) would have counted the encoder as 0
    assert count_macs(model.eval(), TinyAttention.example_inputs(2)) == TinyAttention.MACS


def test_count_macs_takes_tuple_and_dict_inputs():
    mha = nn.MultiheadAttention(16, 2, batch_first=True)
    x = torch.randn(3, 5, 16)
    # in-projection 3 x 5*16*16, attention 2 x 5*5*16, out-projection 5*16*16
    assert count_macs(mha, (x, x, x)) == 3 * 1280 + 800 + 1280
    assert count_macs(mha, {"query": x, "key": x, "value": x}) == 3 * 1280 + 800 + 1280
    assert count_macs(nn.Linear(4, 3), [torch.randn(7, 4)]) == 12


def test_count_macs_failure_is_one_clear_error():
    with pytest.raises(ModelError, match=r"cannot count the MACs of TinyCNN: its forward pass failed \(RuntimeError"):
        count_macs(TinyCNN(), torch.randn(2, 3, 8, 8))  # 3 channels into a 1-channel stem


def test_count_params_counts_tied_weights_once():
    tied = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    tied[1].weight = tied[0].weight
    assert count_params(tied) == 16
    assert count_params(TinyCNN()) == sum(p.numel() for p in TinyCNN().parameters())


# ------------------------------------------------------------------------------------------- module selection
def _is_conv(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d)


def test_select_globs_skip_and_eligibility():
    model = TinyCNN()
    assert [n for n, _ in select(model, (), (), _is_conv)] == ["stem.0", "dw.0", "pw.0"]
    assert [n for n, _ in select(model, ("*.0",), ("dw.*",), _is_conv)] == ["stem.0", "pw.0"]
    assert [n for n, _ in select(model, ("fc",))] == ["fc"]
    assert first_match("stem.0", ("fc", "stem.*")) == "stem.*" and first_match("x", ("fc",)) is None


def test_select_pattern_matching_nothing_names_field_pattern_and_nearest_names():
    model = TinyCNN()
    with pytest.raises(
        ConfigError,
        match=r"^ClusterConfig\.layers pattern 'stem\.1' matches no conv "
        r"\('stem\.1' is a BatchNorm2d\) \(did you mean 'stem\.0'.*conv names: ",
    ):
        select(model, ("stem.1",), (), _is_conv, "conv", owner="ClusterConfig")
    with pytest.raises(ConfigError, match=r"^exclude pattern 'nope' matches no module"):
        select(model, (), ("nope",))
    with pytest.raises(ConfigError, match=r"^QuantConfig\.exclude pattern 'fx' matches no layer \(did you mean 'fc'"):
        require_matches(["fc", "stem.0"], ["f?", "fx"], field="QuantConfig.exclude", what="layer")


def test_get_and_set_module_by_dotted_name():
    model = TinyCNN()
    set_module(model, "dw.2", nn.ReLU())
    assert isinstance(get_module(model, "dw.2"), nn.ReLU) and get_module(model, "") is model
    set_module(model, "fc", nn.Linear(8, 3))
    assert model(TinyCNN.example_inputs(2)).shape == (2, 3)
    with pytest.raises(ModelError, match=r"TinyCNN has no submodule 'dw\.7'"):
        set_module(model, "dw.7.x", nn.ReLU())
    with pytest.raises(ModelError, match="did you mean 'stem'"):
        get_module(model, "stm")

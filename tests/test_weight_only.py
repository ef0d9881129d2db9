"""Weight-only INT4/INT8 Linear quantization exported to ONNX Runtime's MatMulNBits."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from tiny import TinyMLP

from edgeslim.core.errors import ConfigError, ExportError, QuantizationError
from edgeslim.export._weight_only import WeightOnlyConfig, export_weight_only


def _mlp() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    m = TinyMLP(in_features=256, num_classes=10).eval()
    x = torch.randn(64, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    return m, x


@pytest.mark.parametrize("bits,group,sym", [(4, 32, True), (4, 0, False), (4, 128, False), (8, 64, True), (8, 0, True)])
def test_weight_only_matmulnbits_small_and_faithful(tmp_path, bits, group, sym):
    m, x = _mlp()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    cfg = WeightOnlyConfig(bits=bits, group_size=group, symmetric=sym)
    rep = export_weight_only(m, cfg, example_inputs=x, path=tmp_path / "wo.onnx")
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # input model untouched
    g = onnx.load(str(tmp_path / "wo.onnx")).graph
    nbits = [n for n in g.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 2 and rep["quantized"] == 2 and rep["skipped"] == 0
    for n in nbits:
        assert n.domain == "com.microsoft"
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["bits"] == bits
        k_pow2 = 1 << int(np.ceil(np.log2(attrs["K"])))  # a block spans at most K (padded to a power of two)
        assert attrs["block_size"] == min(group or k_pow2, k_pow2)
        packed = {t.name: t for t in g.initializer}[n.input[1]]
        assert packed.data_type == onnx.TensorProto.UINT8  # really packed integer weights
    assert not any(t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) >= 256 * 32 for t in g.initializer)
    # real file size: 4-bit about 1/6, 8-bit about 1/3.5 of FP32 on this MLP (scales included)
    assert rep["bytes"] < rep["fp32_bytes"] * (0.25 if bits == 4 else 0.4)
    assert rep["cosine"] >= 0.99 and rep["top1_agreement"] >= 0.9


def test_int8_closer_than_int4(tmp_path):
    m, x = _mlp()
    r4 = export_weight_only(m, WeightOnlyConfig(bits=4, group_size=0), example_inputs=x, path=tmp_path / "a.onnx")
    r8 = export_weight_only(m, WeightOnlyConfig(bits=8, group_size=0), example_inputs=x, path=tmp_path / "b.onnx")
    assert r8["sqnr_db"] > r4["sqnr_db"] + 10  # ~6 dB per bit
    # one outlier weight per output row (as in real LLM/BERT weights): per-group scales confine it to one group
    with torch.no_grad():
        m.net[1].weight[:, 7] *= 8.0
    c0 = export_weight_only(
        m, WeightOnlyConfig(bits=4, group_size=0, min_cosine=0.5), example_inputs=x, path=tmp_path / "c.onnx"
    )
    c32 = export_weight_only(
        m, WeightOnlyConfig(bits=4, group_size=32, min_cosine=0.5), example_inputs=x, path=tmp_path / "d.onnx"
    )
    assert c32["sqnr_db"] > c0["sqnr_db"] + 3  # smaller groups -> finer scales -> less error
    assert c32["bytes"] > c0["bytes"]  # ... paid for with more scales


def test_weight_only_bad_input(tmp_path):
    with pytest.raises(ConfigError, match="bits"):
        WeightOnlyConfig(bits=3)
    with pytest.raises(ConfigError, match="group_size"):
        WeightOnlyConfig(group_size=48)
    m, x = _mlp()
    with pytest.raises(ExportError, match="min_cosine"):
        export_weight_only(m, WeightOnlyConfig(bits=4, min_cosine=1.0), example_inputs=x, path=tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
    # a model with no Linear layer: nothing to quantize is an error, not a silent FP32 copy
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU()).eval()
    with pytest.raises(QuantizationError, match="no MatMul"):
        export_weight_only(conv, WeightOnlyConfig(), example_inputs=x[:2], path=tmp_path / "c.onnx")
    # existing output is not overwritten without force
    export_weight_only(m, WeightOnlyConfig(), example_inputs=x, path=tmp_path / "o.onnx")
    with pytest.raises(FileExistsError):
        export_weight_only(m, WeightOnlyConfig(), example_inputs=x, path=tmp_path / "o.onnx")


def test_weight_only_config_roundtrip():
    cfg = WeightOnlyConfig(bits=8, group_size=0, symmetric=False)
    assert WeightOnlyConfig.from_dict(cfg.to_dict()) == cfg

"""Techniques compose: each step's output is a valid input of the next, and the properties survive the chain."""

import numpy as np
import onnx
import torch
from onnx import numpy_helper

import edgeslim as es
from edgeslim.share import ClusterConfig, cluster, strip_clustering


def _int8_weights(path):
    return [
        numpy_helper.to_array(i)
        for i in onnx.load(str(path)).graph.initializer
        if i.data_type == onnx.TensorProto.INT8 and len(i.dims) >= 2
    ]


def test_clustered_then_int8_keeps_the_codebook_per_channel(digits_model, tmp_path):
    model, train, val = digits_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    clustered = strip_clustering(cluster(model, ClusterConfig(clusters=4)))
    q = es.quantize(clustered, es.QuantConfig(per_channel=True), calib=train)
    art = es.export(q, "onnx", example_inputs=val, path=tmp_path / "c4-int8.onnx")
    plain = es.export(
        es.quantize(model, es.QuantConfig(per_channel=True), calib=train),
        "onnx",
        example_inputs=val,
        path=tmp_path / "int8.onnx",
    )
    weights = _int8_weights(art.path)
    assert len(weights) == 4  # stem, depthwise, pointwise, fc
    # BN folding scales each output channel, so the clusters survive per output channel, not per layer
    worst = max(len(np.unique(r)) for w in weights for r in w.reshape(w.shape[0], -1))
    assert worst <= 4
    # ... which plain INT8 of the same model does not have
    assert max(len(np.unique(r)) for w in _int8_weights(plain.path) for r in w.reshape(w.shape[0], -1)) > 4
    assert art.validation["top1_agreement"] >= 0.95
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the input is untouched

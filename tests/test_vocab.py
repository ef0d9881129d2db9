"""Vocabulary trimming (edgeslim.prune.prune_vocabulary) on a tiny BERT with a tiny WordPiece tokenizer."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from edgeslim.core.errors import ConfigError, ModelError
from edgeslim.prune import VocabMap, prune_vocabulary

transformers = pytest.importorskip("transformers")

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [
    "the",
    "movie",
    "was",
    "good",
    "bad",
    "great",
    "awful",
    "plot",
    "actors",
    "not",
    "very",
    "boring",
    "fun",
    "story",
    "a",
    "and",
    "##s",
    "##ly",
    "film",
    "music",
]
TRAIN = ["the movie was good", "the plot was boring", "a great story and great actors"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    if "vocab" in inspect.signature(transformers.BertTokenizer.__init__).parameters:  # transformers >= 5
        t = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(SPECIAL + WORDS)}, do_lower_case=True)
    else:
        f = tmp_path_factory.mktemp("vocab") / "vocab.txt"
        f.write_text("\n".join(SPECIAL + WORDS) + "\n")
        t = transformers.BertTokenizer(vocab_file=str(f), do_lower_case=True)
    assert len(t) == len(SPECIAL + WORDS)
    return t


@pytest.fixture(scope="module")
def bert(tok):
    cfg = transformers.BertConfig(
        vocab_size=len(tok),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        pad_token_id=0,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def _run(model, tok, texts, vocab=None):
    enc = tok(texts, padding=True, return_tensors="pt")
    ids = enc["input_ids"] if vocab is None else vocab(enc["input_ids"])
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=enc["attention_mask"]).last_hidden_state


def test_kept_texts_give_identical_outputs_and_fewer_params(bert, tok):
    before = {k: v.clone() for k, v in bert.state_dict().items()}
    small, vocab, report = prune_vocabulary(bert, tok, TRAIN)
    kept_words = {"the", "movie", "was", "good", "plot", "boring", "a", "great", "story", "and", "actors"}
    assert vocab.new_size == len(SPECIAL) + len(kept_words) == report.new_size
    assert small.get_input_embeddings().num_embeddings == vocab.new_size == small.config.vocab_size
    n_small, n_big = sum(p.numel() for p in small.parameters()), sum(p.numel() for p in bert.parameters())
    assert n_big - n_small == (len(tok) - vocab.new_size) * 16 == report.params_before - report.params_after
    # exact equivalence on in-vocabulary text, including a new sentence made only of kept tokens
    texts = TRAIN + ["the great plot and the story"]
    assert torch.equal(_run(small, tok, texts, vocab), _run(bert, tok, texts))
    assert vocab(tok.convert_tokens_to_ids(["[PAD]"])) == [0]  # ids keep their order: [PAD] stays 0
    # the input model is untouched
    assert bert.get_input_embeddings().num_embeddings == len(tok) == bert.config.vocab_size
    assert all(torch.equal(before[k], v) for k, v in bert.state_dict().items())


def test_unseen_token_maps_to_unk(bert, tok):
    small, vocab, _ = prune_vocabulary(bert, tok, TRAIN)
    unk_new = vocab(tok.unk_token_id)
    assert unk_new == vocab.unk_id and vocab.kept[vocab.unk_id] == tok.unk_token_id
    awful = tok.convert_tokens_to_ids("awful")  # in the tokenizer, not in TRAIN
    assert vocab([awful, tok.convert_tokens_to_ids("good")]) == [vocab.unk_id, int(np.searchsorted(vocab.kept, 8))]
    # the trimmed model reads a dropped token exactly as the original model reads [UNK]
    enc = tok(["the awful movie"], return_tensors="pt")
    as_unk = enc["input_ids"].masked_fill(enc["input_ids"] == awful, tok.unk_token_id)
    with torch.no_grad():
        a = small(input_ids=vocab(enc["input_ids"]), attention_mask=enc["attention_mask"]).last_hidden_state
        b = bert(input_ids=as_unk, attention_mask=enc["attention_mask"]).last_hidden_state
    assert torch.equal(a, b)
    # numpy in -> numpy out, same dtype; out-of-range ids are refused
    arr = np.array([[2, awful, 3]], dtype=np.int64)
    assert vocab(arr).dtype == np.int64 and vocab(arr)[0, 1] == vocab.unk_id
    with pytest.raises(ConfigError, match="token ids must lie"):
        vocab([len(tok) + 5])


def test_min_count_and_keep(bert, tok):
    _, v2, r2 = prune_vocabulary(bert, tok, TRAIN, min_count=2, keep=("music", 7))
    old = set(v2.kept.tolist())
    assert tok.convert_tokens_to_ids("music") in old and 7 in old
    assert tok.convert_tokens_to_ids("great") in old  # twice in TRAIN
    assert tok.convert_tokens_to_ids("movie") not in old  # once
    assert set(tok.all_special_ids) <= old and r2.min_count == 2
    assert v2.new_size == len(SPECIAL) + 4  # the, was, great (twice each) + music ("was" is id 7 as well)


def test_save_load_roundtrip(bert, tok, tmp_path):
    _, vocab, _ = prune_vocabulary(bert, tok, TRAIN)
    p = vocab.save(tmp_path / "vocab.json")
    back = VocabMap.load(p)
    assert np.array_equal(back.kept, vocab.kept) and back.unk_id == vocab.unk_id
    assert np.array_equal(back.old_to_new, vocab.old_to_new)


def test_onnx_export_of_trimmed_model(bert, tok, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    small, vocab, _ = prune_vocabulary(bert, tok, TRAIN)

    class Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    enc = tok(TRAIN[:1], return_tensors="pt")
    ids = vocab(enc["input_ids"])
    path = tmp_path / "small.onnx"
    torch.onnx.export(
        Wrap(small).eval(),
        (ids, enc["attention_mask"]),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["input_ids", "attention_mask"],
    )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": enc["attention_mask"].numpy()})[0]
    ref = _run(bert, tok, TRAIN[:1]).numpy()
    assert np.abs(got - ref).max() < 1e-4


@pytest.mark.parametrize(
    ("texts", "kwargs", "match"),
    [
        ([], {}, "texts is empty"),
        ("the movie", {}, "not a single string"),
        (["ok", 3], {}, "must all be strings"),
        (TRAIN, {"min_count": 0}, "min_count=0"),
        (TRAIN, {"min_count": 1.5}, "min_count=1.5"),
        (TRAIN, {"keep": ("zzzz",)}, "'zzzz' is not in"),
        (TRAIN, {"keep": (10_000,)}, "neither a token string nor an id"),
    ],
)
def test_bad_input_is_a_clear_config_error(bert, tok, texts, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        prune_vocabulary(bert, tok, texts, **kwargs)


def test_tied_output_embedding_is_refused(tok):
    cfg = transformers.BertConfig(
        vocab_size=len(tok),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        tie_word_embeddings=True,
    )
    mlm = transformers.BertForMaskedLM(cfg).eval()
    with pytest.raises(ModelError, match="tied output layer"):
        prune_vocabulary(mlm, tok, TRAIN)

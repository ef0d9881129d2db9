"""Vocabulary trimming: keep only the embedding rows of the tokens a task actually uses.

A small text student is often dominated by its word-embedding table (all-MiniLM-L6-v2 cut to 3 layers: 30522 x 384
floats are 47 of its 69 MB). :func:`prune_vocabulary` keeps the rows of the tokens that occur in the given texts (use
the **training** split only) plus every special token, and returns a :class:`VocabMap` that rewrites token ids of
the original tokenizer into the new, dense id space; ids of dropped tokens become the ``[UNK]`` id.

>>> from edgeslim.prune import prune_vocabulary
>>> small, vocab, report = prune_vocabulary(bert, tokenizer, train_texts, min_count=1)
>>> ids = tokenizer(texts, return_tensors="pt")["input_ids"]
>>> out = small(input_ids=vocab(ids), attention_mask=...)   # == bert(ids) when every token of ``texts`` was kept

The remap happens on the tokenizer side (one lookup array, :meth:`VocabMap.__call__`), not inside the model: the
model's input embedding simply has fewer rows, so the ONNX graph of the trimmed model is the original graph with a
smaller ``Gather`` table and takes the *new* ids. Ship ``VocabMap.save`` (a JSON list of kept ids) with the model.
Kept ids stay in their original order, so token 0 (``[PAD]`` for BERT) stays 0.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from edgeslim.core.counting import count_params
from edgeslim.core.errors import ConfigError, ModelError
from edgeslim.core.io import write_json

__all__ = ["VocabMap", "VocabReport", "VocabPruned", "prune_vocabulary"]

VOCAB_FORMAT = "edgeslim.vocab/1"


@dataclass(frozen=True, eq=False)
class VocabMap:
    """Old token id -> new token id, for the tokenizer side of a vocabulary-trimmed model.

    Attributes:
        kept: the old ids that were kept, in increasing order; new id ``i`` is old id ``kept[i]``.
        old_size: rows of the original embedding table (every id below it can be mapped).
        unk_id: the *new* id that dropped tokens map to.
    """

    kept: np.ndarray
    old_size: int
    unk_id: int
    old_to_new: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        kept = np.asarray(self.kept, dtype=np.int64)
        if kept.ndim != 1 or len(kept) == 0 or np.any(np.diff(kept) <= 0):
            raise ConfigError("VocabMap.kept must be a non-empty, strictly increasing list of token ids")
        if kept[0] < 0 or kept[-1] >= self.old_size:
            raise ConfigError(f"VocabMap.kept holds ids outside [0, {self.old_size}): {kept[0]}..{kept[-1]}")
        if not 0 <= self.unk_id < len(kept):
            raise ConfigError(f"VocabMap.unk_id={self.unk_id} is not a new id in [0, {len(kept)})")
        table = np.full(self.old_size, self.unk_id, dtype=np.int64)
        table[kept] = np.arange(len(kept), dtype=np.int64)
        object.__setattr__(self, "kept", kept)
        object.__setattr__(self, "old_to_new", table)

    @property
    def new_size(self) -> int:
        return len(self.kept)

    def __call__(self, ids: Any) -> Any:
        """Map old ids to new ids; a ``torch.Tensor`` / ``np.ndarray`` / nested list comes back as the same type.

        Raises:
            ConfigError: an id outside ``[0, old_size)``.
        """
        if isinstance(ids, torch.Tensor):
            return torch.from_numpy(self._map(ids.detach().cpu().numpy())).to(ids.device)
        if isinstance(ids, np.ndarray):
            return self._map(ids)
        return self._map(np.asarray(ids)).tolist()

    def _map(self, ids: np.ndarray) -> np.ndarray:
        if ids.size and (ids.min() < 0 or ids.max() >= self.old_size):
            raise ConfigError(f"token ids must lie in [0, {self.old_size}); got {int(ids.min())}..{int(ids.max())}")
        return self.old_to_new[ids.astype(np.int64, copy=False)].astype(ids.dtype, copy=False)

    def to_dict(self) -> dict[str, Any]:
        return {"format": VOCAB_FORMAT, "old_size": self.old_size, "unk_id": self.unk_id, "kept": self.kept.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VocabMap:
        if d.get("format") != VOCAB_FORMAT:
            raise ConfigError(f"not a vocabulary map: format {d.get('format')!r}, expected {VOCAB_FORMAT!r}")
        return cls(kept=np.asarray(d["kept"]), old_size=int(d["old_size"]), unk_id=int(d["unk_id"]))

    def save(self, path: str | Path, *, force: bool = False) -> Path:
        """Write the map as JSON (atomically; an existing file needs ``force``)."""
        return write_json(path, self.to_dict(), force=force)

    @classmethod
    def load(cls, path: str | Path) -> VocabMap:
        return cls.from_dict(json.loads(Path(path).read_text()))


@dataclass(frozen=True)
class VocabReport:
    """What one :func:`prune_vocabulary` call did.

    Attributes:
        embedding: the trimmed module's name in the model.
        old_size, new_size: rows of the embedding table before and after.
        special_kept: special / ``keep`` tokens kept whether or not they occur in the texts.
        min_count: occurrences a token needed in the texts to be kept.
        texts, tokens: how many texts and tokens were counted.
        params_before, params_after: parameter counts of the whole model.
    """

    embedding: str
    old_size: int
    new_size: int
    special_kept: int
    min_count: int
    texts: int
    tokens: int
    params_before: int
    params_after: int

    @property
    def param_reduction(self) -> float:
        return 1 - self.params_after / self.params_before if self.params_before else 0.0

    def summary(self) -> str:
        return (
            f"vocabulary {self.old_size} -> {self.new_size} tokens ({self.special_kept} special/kept always, "
            f"min_count {self.min_count}, counted {self.tokens} tokens in {self.texts} texts); "
            f"parameters {self.params_before:,} -> {self.params_after:,} ({self.param_reduction:.1%} fewer)"
        )


class VocabPruned(NamedTuple):
    """``(model, vocab, report)``: the trimmed copy, the id map for its inputs, and what was done."""

    model: nn.Module
    vocab: VocabMap
    report: VocabReport


def _input_embedding(model: nn.Module, vocab_size: int) -> tuple[str, nn.Embedding]:
    """The model's input word embedding: ``get_input_embeddings()`` (outermost module that has it), else the one
    ``nn.Embedding`` with at least ``vocab_size`` rows."""
    names = {id(m): n for n, m in model.named_modules()}
    for m in model.modules():
        get = getattr(m, "get_input_embeddings", None)
        if callable(get):
            emb = get()
            if isinstance(emb, nn.Embedding) and id(emb) in names:
                return names[id(emb)], emb
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Embedding) and m.num_embeddings >= vocab_size]
    if len(found) != 1:
        raise ModelError(
            f"cannot tell which nn.Embedding holds the {vocab_size}-token vocabulary: "
            f"candidates {[n for n, _ in found] or 'none'}"
        )
    return found[0]


def _token_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    try:
        enc = tokenizer(texts, add_special_tokens=True)
    except TypeError:
        enc = tokenizer(texts)
    ids = enc["input_ids"] if isinstance(enc, dict) or hasattr(enc, "keys") else enc
    return [list(map(int, row)) for row in ids]


def prune_vocabulary(
    model: nn.Module, tokenizer: Any, texts: Sequence[str], *, min_count: int = 1, keep: Iterable[str | int] = ()
) -> VocabPruned:
    """Return a copy of ``model`` whose input embedding keeps only the tokens used by ``texts``.

    Kept: every token id that occurs at least ``min_count`` times when ``tokenizer`` encodes ``texts`` (with its
    special tokens), every special token of the tokenizer (``all_special_ids``: ``[PAD]``, ``[UNK]``, ``[CLS]``,
    ``[SEP]``, ``[MASK]`` for BERT) and every token in ``keep``. For a text whose tokens were all kept, the trimmed
    model fed ``vocab(ids)`` gives exactly the original model's output on ``ids``; a dropped token reads as
    ``[UNK]``. Pass the training split only: counting held-out texts leaks them into the model.

    Args:
        model: a ``transformers`` model (or a module containing one), or any module with a single
            ``nn.Embedding`` of at least the tokenizer's size. Not modified.
        tokenizer: a Hugging Face-style tokenizer: ``tokenizer(texts)["input_ids"]``, ``unk_token_id``,
            ``all_special_ids``.
        texts: the texts whose tokens to keep.
        min_count: occurrences needed (>= 1).
        keep: more tokens (strings or ids) to keep whether they occur or not.

    Returns:
        ``VocabPruned(model, vocab, report)``, a named tuple.

    Raises:
        ConfigError: empty or non-string ``texts``, ``min_count`` < 1, a ``keep`` token not in the vocabulary,
            a tokenizer without an unknown token.
        ModelError: no single input embedding found, or its weight is tied to another layer (an LM head).
    """
    if isinstance(texts, (str, bytes)):
        raise ConfigError("texts must be a sequence of strings, not a single string")
    texts = list(texts)
    if not texts:
        raise ConfigError("texts is empty: give the training texts whose tokens to keep")
    bad = next((t for t in texts if not isinstance(t, str)), None)
    if bad is not None:
        raise ConfigError(f"texts must all be strings; got {type(bad).__name__}: {bad!r}")
    if isinstance(min_count, bool) or not isinstance(min_count, (int, np.integer)) or min_count < 1:
        raise ConfigError(f"min_count={min_count!r} is not allowed; use an integer >= 1")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        raise ConfigError("the tokenizer has no unknown token (unk_token_id is None): dropped tokens need one")

    name, emb = _input_embedding(model, len(tokenizer) if hasattr(tokenizer, "__len__") else 0)
    old_size = emb.num_embeddings
    always = {int(unk), *(int(i) for i in getattr(tokenizer, "all_special_ids", []))}
    for k in keep:
        if isinstance(k, str):
            i = tokenizer.convert_tokens_to_ids(k)
            if i is None or (int(i) == unk and k != getattr(tokenizer, "unk_token", None)):
                raise ConfigError(f"keep: token {k!r} is not in the tokenizer's vocabulary")
            always.add(int(i))
        elif isinstance(k, (int, np.integer)) and not isinstance(k, bool) and 0 <= int(k) < old_size:
            always.add(int(k))
        else:
            raise ConfigError(f"keep: {k!r} is neither a token string nor an id in [0, {old_size})")

    rows = _token_ids(tokenizer, texts)
    flat = np.fromiter((i for r in rows for i in r), dtype=np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= old_size):
        raise ModelError(f"the tokenizer produced id {int(flat.max())} but the embedding {name!r} has {old_size} rows")
    counts = np.bincount(flat, minlength=old_size)
    mask = counts >= int(min_count)
    mask[sorted(always)] = True
    kept = np.flatnonzero(mask)
    vocab = VocabMap(kept=kept, old_size=old_size, unk_id=int(np.searchsorted(kept, unk)))

    params_before = count_params(model)
    new = copy.deepcopy(model)
    new_emb = new.get_submodule(name)
    tied = [n for n, p in new.named_parameters(remove_duplicate=False) if p is new_emb.weight and n != f"{name}.weight"]
    if tied:
        raise ModelError(
            f"the embedding {name!r} shares its weight with {tied} (a tied output layer); "
            "trimming it would change the model's output vocabulary, which prune_vocabulary does not do"
        )
    w = new_emb.weight
    with torch.no_grad():
        new_emb.weight = nn.Parameter(w[torch.as_tensor(kept, device=w.device)].clone(), requires_grad=w.requires_grad)
    new_emb.num_embeddings = len(kept)
    if new_emb.padding_idx is not None:
        pad = int(new_emb.padding_idx)
        new_emb.padding_idx = int(vocab.old_to_new[pad]) if mask[pad] else None
    for m in new.modules():  # keep Hugging Face configs truthful (save_pretrained / from_pretrained round-trip)
        cfg = getattr(m, "config", None)
        if getattr(cfg, "vocab_size", None) == old_size:
            cfg.vocab_size = len(kept)
    report = VocabReport(
        embedding=name,
        old_size=old_size,
        new_size=len(kept),
        special_kept=len(always),
        min_count=int(min_count),
        texts=len(texts),
        tokens=int(flat.size),
        params_before=params_before,
        params_after=count_params(new),
    )
    return VocabPruned(new, vocab, report)

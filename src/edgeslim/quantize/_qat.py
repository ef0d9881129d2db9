"""Quantization-aware training and replayable save/restore of quantized models.

QAT starts from post-training quantization (the observers' calibrated ranges initialise the scales) and
trains the fake-quantized model in the project's trainer:

- ``ste``: straight-through estimator; activation scales stay at their calibrated values, weight scales
  follow the weights' per-channel ranges as they train.
- ``lsq``: learned step size (Esser et al., ICLR 2020): activation and weight scales are parameters trained
  with the LSQ gradient.

BatchNorm is folded into the convolutions before quantization, so its statistics are frozen from the first
step (the "freeze BN" schedule of Jacob et al. 2018 with N = 0). The trained model exports to the same integer
ONNX as PTQ, with the learned scales.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeslim.core import recipe as _recipe
from edgeslim.core.config import Config, StrEnum
from edgeslim.core.errors import ConfigError, ModelError, QuantizationError
from edgeslim.core.verbs import check_config
from edgeslim.quantize._api import QuantizedModel, _link_input_scales, quantize, record_quantized
from edgeslim.quantize._config import QuantConfig, QuantMode

log = logging.getLogger(__name__)


class QATMethod(StrEnum):
    STE = "ste"
    LSQ = "lsq"


@dataclass(frozen=True)
class QATConfig(Config):
    """Quantization-aware training settings.

    Attributes:
        method: ``ste`` or ``lsq``.
    """

    kind = "qat"
    method: QATMethod = QATMethod.LSQ


def qat(
    model: nn.Module,
    config: QATConfig = QATConfig(),
    *,
    data: tuple[Any, Any],
    calib: Any = None,
    quant_config: QuantConfig = QuantConfig(),
    train_config: Any = None,
    loss_fn: Any = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    device: str = "cpu",
) -> QuantizedModel:
    """Quantization-aware training of a copy of ``model``.

    Args:
        model: a float model (quantized first with ``quant_config`` on ``calib``, default the training data)
            or a :class:`QuantizedModel` from :func:`quantize` (static mode).
        config: the :class:`QATConfig`.
        data: ``(train, val)`` datasets for :func:`edgeslim.train.fit`.
        train_config: a :class:`~edgeslim.train.TrainConfig` (default: 1 epoch, AdamW, lr 1e-4, no warm-up).
        loss_fn: extra loss term ``loss_fn(outputs, targets, inputs)``, e.g. distillation from the FP32 teacher.
        checkpoint_dir: per-epoch checkpoints; an interrupted run resumes there.
        device: where the training steps run (``"cuda"`` where there is one); the result is on the CPU.

    Returns:
        a new :class:`QuantizedModel` with trained weights and scales.
    """
    from edgeslim.train import TrainConfig, fit

    check_config(config, QATConfig, "qat")
    train, val = data
    if getattr(model, "edgeslim_capture", None) == "onnx":
        raise QuantizationError(
            "QAT trains the torch fake-quant model: a model quantized on its ONNX graph "
            "(capture='onnx') has none; quantize the float model with QuantConfig(capture='fx')"
        )
    if isinstance(model, QuantizedModel):
        if model.config.mode != QuantMode.STATIC:
            raise QuantizationError(f"QAT needs a static-mode quantized model, got mode {model.config.mode.value!r}")
        q = copy.deepcopy(model)
    else:
        if quant_config.capture == "onnx":
            raise QuantizationError(
                "QAT needs QuantConfig.capture 'fx' or 'auto' (it trains the torch fake-quant model), not 'onnx'"
            )
        # QAT trains the torch fake-quant model: the fx capture, whatever share of the model it covers
        q = quantize(model, quant_config.replace(capture="fx"), data=calib if calib is not None else train)
    for a in q.act_quants():
        if config.method == QATMethod.LSQ:
            a.make_learnable()
    for w in q.weight_quants():
        w.qat = config.method.value
        if config.method == QATMethod.LSQ:
            w.make_learnable()
    tc = train_config or TrainConfig(epochs=1, lr=1e-4, optimizer="adamw", weight_decay=0.0, warmup_steps=0)
    result = fit(q, train, val, tc, checkpoint_dir=checkpoint_dir, loss_fn=loss_fn, progress=progress, device=device)
    out: QuantizedModel = result.model
    with torch.no_grad():
        for a in out.act_quants():
            a.scale.clamp_(min=1e-8)
            lo_c, hi_c = a.clamp
            if hi_c is not None:  # a learned range may not pass the activation's own bound (e.g. ReLU6 -> 6)
                a.scale.clamp_(max=(hi_c - (lo_c or 0.0)) / (a.qmax - int(a.zero_point)))
        for w in out.weight_quants():
            w.scale.clamp_(min=1e-12)
        _link_input_scales(out.graph_module)
    out.report.mode = f"qat-{config.method.value}"
    out.qat_history = result.history
    record_quantized(out, model)
    return out.eval()


def save_quantized(q: QuantizedModel, path: str | Path, *, force: bool = False) -> Path:
    """Deprecated: ``edgeslim.save(q, path)`` writes the same one recipe file (steps + state_dict)."""
    warnings.warn("save_quantized() is deprecated; use edgeslim.save(model, path)", DeprecationWarning, stacklevel=2)
    return _recipe.save(q, path, force=force)


def restore_quantized(model: nn.Module, path: str | Path) -> QuantizedModel:
    """Deprecated: ``edgeslim.load(path, model=fresh_float_model)`` replays the file on ``model``.

    Files of the older ``edgeslim.quantized/1`` format (a QuantConfig plus a state_dict) are still read.
    """
    warnings.warn(
        "restore_quantized() is deprecated; use edgeslim.load(path, model=...)", DeprecationWarning, stacklevel=2
    )
    try:
        blob = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt files
        raise ModelError(f"cannot read quantized model file {str(path)!r}: {str(e).splitlines()[0][:160]}") from None
    if isinstance(blob, dict) and blob.get("format") == "edgeslim.quantized/1":  # the format before the recipe
        steps = [
            {
                "technique": "quantize",
                "config": blob["recipe"],
                "state": {"learnable_scales": blob.get("learnable_scales", []), "qat": None},
            }
        ]
        try:
            q = _recipe.replay(model, _recipe.steps_of(model) + steps)
        except (QuantizationError, ConfigError) as e:
            raise ModelError(f"quantized model file {str(path)!r} does not match the model: {e}") from None
        return _recipe.load_state_strict(q, blob["state_dict"], str(path)).eval()
    q = _recipe.load(path, model)
    if not isinstance(q, QuantizedModel):
        raise ModelError(f"{str(path)!r} holds no quantized model (its last step is not quantize)")
    return q

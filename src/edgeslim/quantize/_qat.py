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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeslim.core.config import Config, StrEnum
from edgeslim.core.errors import ConfigError, ModelError, QuantizationError
from edgeslim.core.io import save_torch
from edgeslim.quantize._api import PRECISION, QuantizedModel, QuantReport, _link_input_scales, build_graph, quantize
from edgeslim.quantize._config import QuantConfig, QuantMode
from edgeslim.quantize._modules import ActQuant, QuantWeight

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

    train, val = data
    if isinstance(model, QuantizedModel):
        if model.config.mode != QuantMode.STATIC:
            raise QuantizationError(f"QAT needs a static-mode quantized model, got mode {model.config.mode.value!r}")
        q = copy.deepcopy(model)
    else:
        q = quantize(model, quant_config, calib=calib if calib is not None else train)
    for a in q.act_quants():
        if config.method == QATMethod.LSQ:
            a.make_learnable()
    for w in q.weight_quants():
        w.qat = config.method.value
        if config.method == QATMethod.LSQ:
            w.make_learnable()
    tc = train_config or TrainConfig(epochs=1, lr=1e-4, optimizer="adamw", weight_decay=0.0, warmup_steps=0)
    result = fit(q, train, val, tc, checkpoint_dir=checkpoint_dir, loss_fn=loss_fn, progress=progress,
                 device=device)
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
    return out.eval()


def save_quantized(q: QuantizedModel, path: str | Path, *, force: bool = False) -> Path:
    """Save a quantized model as its recipe (the QuantConfig) plus a state_dict; no pickled modules."""
    state = {k: v.detach().clone() for k, v in q.state_dict().items()}
    learnable = [n for n, m in q.named_modules() if isinstance(m, (ActQuant, QuantWeight))
                 and isinstance(m.scale, nn.Parameter)]
    return save_torch({"recipe": q.config.to_dict(), "state_dict": state, "learnable_scales": learnable,
                       "format": "edgeslim.quantized/1"}, path, force=force)


def restore_quantized(model: nn.Module, path: str | Path) -> QuantizedModel:
    """Replay a saved recipe on a fresh float ``model`` of the same architecture, then load the state_dict."""
    try:
        blob = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt files
        raise ModelError(f"cannot read quantized model file {str(path)!r}: {e}") from None
    if not isinstance(blob, dict) or blob.get("format") != "edgeslim.quantized/1":
        raise ModelError(f"{str(path)!r} is not a file written by edgeslim's save_quantized")
    config = QuantConfig.from_dict(blob["recipe"], source=str(path))
    try:
        gm, placement, quants = build_graph(model, config)
    except (QuantizationError, ConfigError) as e:  # no quantizable layer, or a pattern matching no layer
        raise ModelError(f"quantized model file {str(path)!r} does not match the model: {e}") from None
    precision = PRECISION[config.mode]
    q = QuantizedModel(gm, config, QuantReport(config.mode.value, precision, config.calibration, 0))
    for name in blob.get("learnable_scales", []):
        q.get_submodule(name).make_learnable()
    state = blob["state_dict"]
    own = q.state_dict()
    if set(own) != set(state):
        missing = sorted(set(own) - set(state))[:3]
        raise ModelError(f"quantized model file {str(path)!r} does not match the model: e.g. missing {missing}")
    q.load_state_dict(state)
    for a in quants.values():
        a.state = "quant" if config.mode == QuantMode.STATIC else "dynamic"
    q.report.quantized_layers = [{"name": n} for n in placement.weighted]
    return q.eval()

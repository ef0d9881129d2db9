"""BatchNorm recalibration: re-estimate running statistics after the network under them changed."""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from edgeslim.core.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def recalibrate_bn(model: nn.Module, data: Any, *, num_samples: int = 1024, batch_size: int = 128) -> nn.Module:
    """A copy of ``model`` whose BatchNorm running statistics are re-estimated on ``num_samples`` inputs.

    Pruning, factorizing or clustering a network changes what every BatchNorm layer sees, so the running
    mean/variance it stored while training no longer match and accuracy collapses before any fine-tuning
    (a ResNet-18 on Fashion-MNIST with 30% of its channels removed: 0.13 -> 0.66 after recalibrating on
    1,024 images). Re-estimating them needs only forward passes; the "adaptive BN" of EagleEye (Li et al.
    2020), who also show the recalibrated accuracy ranks pruned candidates the way fine-tuning will.

    Only the BatchNorm layers run in training mode (dropout and the rest stay in eval); the statistics are the
    plain average of the batches' statistics (``momentum=None``), then each layer's momentum is restored. The input
    model is not modified, and the copy is returned in the mode the input was in.

    Args:
        data: an :class:`~edgeslim.data.ImageDataset`, a :class:`~edgeslim.data.DetectionDataset` (its images
            are used, the boxes ignored), or an iterable of input tensors or ``(inputs, labels)``.
        num_samples: inputs to run (the last batch is cut to fit).
        batch_size: batch size used for an :class:`~edgeslim.data.ImageDataset`.

    Raises:
        ConfigError: ``num_samples`` or ``batch_size`` below 1.
        DataError: ``data`` yields no inputs.
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ConfigError(f"recalibrate_bn: num_samples={num_samples!r} must be an integer >= 1")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"recalibrate_bn: batch_size={batch_size!r} must be an integer >= 1")
    was_training = model.training
    model = copy.deepcopy(model)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        log.warning(
            "recalibrate_bn: %s has no BatchNorm layers with running statistics; returned unchanged",
            type(model).__name__,
        )
        return model
    if data is None:
        raise DataError("recalibrate_bn needs data: an ImageDataset or an iterable of inputs / (inputs, labels)")
    if hasattr(data, "take") and hasattr(data, "batches"):
        data = data.take(num_samples, seed=0).batches(batch_size)
    elif _is_detection_set(data):
        data = _image_batches(data, num_samples, batch_size)
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    model.eval()
    for m in bns:
        m.train()
    seen = 0
    with torch.no_grad():
        for batch in data:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            if not isinstance(x, torch.Tensor):
                raise DataError(
                    f"recalibrate_bn: data yielded {type(x).__name__}; expected input tensors or (inputs, labels) pairs"
                )
            x = x[: num_samples - seen]
            model(x.to(device))
            seen += len(x)
            if seen >= num_samples:
                break
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    if not seen:
        raise DataError("recalibrate_bn: data yielded no inputs")
    if seen < num_samples:
        log.info("recalibrate_bn: data held %d inputs (< num_samples=%d); used them all", seen, num_samples)
    return model.train(was_training)


def _is_detection_set(data: Any) -> bool:
    """A map-style dataset whose items are ``(image tensor, target dict)`` (a ``DetectionDataset``)."""
    if not (hasattr(data, "__getitem__") and hasattr(data, "__len__")) or isinstance(data, (list, tuple)):
        return False
    if len(data) == 0:
        return False
    item = data[0]
    return (
        isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], torch.Tensor) and isinstance(item[1], dict)
    )


def _image_batches(data: Any, num_samples: int, batch_size: int) -> Any:
    """Batches of the images only (targets dropped) of a detection dataset, from a seeded subset of it."""
    if hasattr(data, "take"):
        data = data.take(num_samples, seed=0)
    n = min(num_samples, len(data))
    for start in range(0, n, batch_size):
        yield torch.stack([data[i][0] for i in range(start, min(start + batch_size, n))])
